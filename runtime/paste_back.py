"""Blending a generated face crop back into the full-resolution source image, as the official inference does.

The mask and the masked background depend only on the source image and the crop box, so a video makes one
`PasteBack` and calls it for every frame.
"""

from __future__ import annotations

import cv2
import numpy as np


def soft_mask(width: int, height: int, border_ratio: float = 0.1) -> np.ndarray:
    """(height, width, 1) float32 weight of the generated crop: 1 inside, linear ramps to 0 over the
    outer `border_ratio` of each side (int(size * ratio) pixels), the two directions multiplied.

    Values match the official create_soft_mask bit for bit: ramps are float64 linspaces stored
    into float32, and the vertical ramps multiply the stored float32 values.
    """
    mask = np.ones((height, width), dtype=np.float32)
    ramp_w = int(width * border_ratio)
    ramp_h = int(height * border_ratio)
    if ramp_w > 0:
        mask[:, :ramp_w] = np.linspace(0, 1, ramp_w)
        mask[:, width - ramp_w :] = np.linspace(1, 0, ramp_w)
    if ramp_h > 0:
        mask[:ramp_h] *= np.linspace(0, 1, ramp_h)[:, None]
        mask[height - ramp_h :] *= np.linspace(1, 0, ramp_h)[:, None]
    return mask[:, :, None]


class PasteBack:
    """Generated crops blended into one source image: what depends only on the image and the box (the mask and
    the masked background) is computed once, so each frame costs a resize and two float passes.

    `original` (H, W, 3) uint8; each crop is resized (bilinear) into `crop_box` = (x1, y1, x2, y2) and blended
    over it with `mask` (default `soft_mask` of the box); pixels outside the box are unchanged. The blend
    runs in float32 on [0, 1] values and is truncated (not rounded) back to uint8, like the official
    paste_back_frame, with its float32 operations in its order (the same bits).
    """

    def __init__(self, original: np.ndarray, crop_box: tuple[int, int, int, int], mask: np.ndarray | None = None):
        x1, y1, x2, y2 = (int(v) for v in crop_box)
        height, width = original.shape[:2]
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f"crop box {crop_box} is empty or outside the {width}x{height} image")
        box_w, box_h = x2 - x1, y2 - y1
        if mask is None:
            mask = soft_mask(box_w, box_h)
        elif mask.shape != (box_h, box_w, 1):
            raise ValueError(f"mask shape {mask.shape} does not fit the {box_w}x{box_h} crop box")
        self.original, self.mask, self.box = original, mask, (x1, y1, x2, y2)
        self.masked_background = original[y1:y2, x1:x2].astype(np.float32) / 255.0 * (1 - mask)

    def __call__(self, generated_crop: np.ndarray) -> np.ndarray:
        x1, y1, x2, y2 = self.box
        blended = cv2.resize(generated_crop, (x2 - x1, y2 - y1)).astype(np.float32)
        blended /= 255.0
        blended *= self.mask
        blended += self.masked_background
        blended *= 255
        result = self.original.copy()
        result[y1:y2, x1:x2] = blended.astype(np.uint8)
        return result


def paste_back(
    original: np.ndarray,
    generated_crop: np.ndarray,
    crop_box: tuple[int, int, int, int],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """One crop blended into `original` (see `PasteBack`, which a video uses to share the per-image work)."""
    return PasteBack(original, crop_box, mask)(generated_crop)
