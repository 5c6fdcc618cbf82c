"""Reading the user's inputs, kept apart from the networks: this module imports neither torch nor any model, so
the CLI checks a missing or unreadable image or video in a fraction of a second, before it loads anything."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hyportrait.errors import ImageTooLargeError, InputError, OptionError, describe

from .video import probe_video


def load_image(image, max_pixels: int = Image.MAX_IMAGE_PIXELS) -> np.ndarray:
    """A path, encoded bytes or an (H, W, 3) uint8 RGB array -> (H, W, 3) uint8 RGB.

    Images of more than `max_pixels` (by default PIL's MAX_IMAGE_PIXELS, 89 MP) are refused with
    ImageTooLargeError before they are decoded: a header can claim any size (a decompression bomb), and the
    portrait is cropped to 512 px anyway. Anything else PIL cannot decode is an InputError (bad_input). The CLI,
    the API and the HTTP service (with its --max-image-pixels) all check images here."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"source image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        if image.shape[0] * image.shape[1] == 0:
            raise InputError(f"source image array is {image.shape[1]}x{image.shape[0]} pixels: it must have "
                             f"between 1 and {max_pixels} pixels")
        _check_pixels("source image array", *image.shape[1::-1], max_pixels)
        return image
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
    name = "source image (bytes)" if isinstance(source, io.BytesIO) else f"source image {source}"
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; both are refused here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_pixels(name, *im.size, max_pixels)  # from the header, before decoding
                return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name}: too large to decode safely ({exc})") from None
    except UnidentifiedImageError:  # its message names the file again, or a BytesIO object's address
        raise InputError(f"{name}: not a readable image (no image format PIL reads)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's plugins raise all of these
        raise InputError(f"{name}: not a readable image ({describe(exc)})") from None


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name} is {width}x{height}, over the limit of {max_pixels} pixels: too large "
                                 "to decode safely")


STALL_LIMIT_SECONDS = 86400  # a live source's stall timeout: at most a day


def check_stall_timeout(seconds: float) -> None:
    """More than 0 and at most a day (nan, which would never time out, is refused too)."""
    if not 0 < seconds <= STALL_LIMIT_SECONDS:
        raise OptionError("stall_timeout", f"must be more than 0 and at most {STALL_LIMIT_SECONDS} seconds, "
                                           f"got {seconds}")


def check_inputs(image, video) -> None:
    """Read the image and probe the video (a path or bytes) without any network, so that a caller that loads
    models for one run (the CLI) fails on a missing or unreadable input at once, before loading them."""
    load_image(image)
    probe_video(video)
