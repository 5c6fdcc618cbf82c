"""The denoising loop: per-video constants once, windowed sampling with guidance, streamed decoding.

One loop for every backend: it calls the networks through `Models` (runtime/backends.py, runtime/models.py),
so the PyTorch reference, onnxruntime and TensorRT differ only in how a network is called. With the torch
backend in its faithful form this is the official inference step for step (bit-identical in fp16).

Quality mode is the official sampler: 25 Euler steps, three guidance branches in one UNet batch, windows
of 25 frames. Fast mode is the LCM multistep sampler (4 steps) for a UNet with an LCM LoRA merged,
with one, two or three guidance branches.
"""
from __future__ import annotations

import itertools
import math
import numbers
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from hyportrait.errors import OptionError
from hyportrait.networks.contract import CROP_SIZE, PRECISIONS, WINDOW

from .backends import Models
from .sampling import (
    WindowMap,
    c_noise,
    combine_guidance,
    guidance_ramp,
    i2i_start_index,
    karras_sigmas,
    sample_euler_windows,
    sample_lcm_windows,
    scale_input,
)
from .windows import pad_motion_tokens, padded_motion

Precision = Literal["fp16", "fp32"]
Sampler = Literal["euler", "lcm"]
VAE_SCALE = 0.18215
# fast mode also encodes faster: libx264 "medium" takes about 10.5 ms per 512 px frame for the two output videos
# on the H100 host, "veryfast" 4.4-6.3 ms (benchmarks/RESULTS.md, session 4), at the same CRF (larger files)
# and samples one window at a time (segments of one window: bounded memory, first frames out early); its first
# segment is shorter: with the official 15 leading pad frames the first real frame is latent 15, in the decode
# chunk 8-15, so 16 frames (one UNet window of 16) are the least that puts it out
FAST_MODE = {"sampler": "lcm", "num_steps": 4, "guidance_branches": 1, "video_preset": "veryfast", "segment": WINDOW,
             "first_segment": 16}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# The UNet batch of each guidance setting: branch 0 has no image latent, appearance or motion; branch 1 the
# image latent and appearance; branch 2 everything.
GUIDANCE_BRANCHES = {3: (0, 1, 2), 2: (1, 2), 1: (2,)}
# The numeric options' valid ranges, checked before any work: wide enough for every sensible run, narrow
# enough that a typo fails at once instead of allocating GBs (a billion steps) or writing noise (nan guidance).
_GUIDANCE = (0.0, 50.0)
_LIMITS = (
    ("num_steps", 1, 1000), ("seed", 0, 2**64 - 1),  # torch generators take 64-bit seeds
    ("min_appearance_guidance", *_GUIDANCE), ("max_appearance_guidance", *_GUIDANCE),
    ("min_motion_guidance", *_GUIDANCE), ("max_motion_guidance", *_GUIDANCE),
    ("window", 1, 1000), ("overlap", 0, 999), ("shift_offset", 0, 1000), ("pad_frames", 0, 1000),
    ("decode_chunk", 1, 1000), ("fps_condition", 0.0, 1000.0), ("motion_bucket_id", 0.0, 1000.0),
    ("noise_aug_strength", 0.0, 10.0), ("i2i_strength", 0.001, 1.0), ("sigma_min", 1e-6, 1e6),
    ("sigma_max", 1e-6, 1e6), ("size", 64, 4096), ("max_frames", 1, 10_000_000), ("segment", 0, 10_000_000),
    ("first_segment", 0, 10_000_000),
)


def check_range(option: str, value, ranges=_LIMITS) -> None:
    """OptionError unless `value` is a number in `option`'s valid range (`_LIMITS`, or the caller's
    (name, low, high) table: `hyportrait serve`'s flags)."""
    low, high = next((low, high) for name, low, high in ranges if name == option)
    # bool is an int to Python, but True steps or a seed of False is a caller's mistake
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(option, f"must be a number, got {value!r}")
    if isinstance(low, int) and not isinstance(value, numbers.Integral):
        raise OptionError(option, f"must be a whole number, got {value!r}")
    if not (math.isfinite(value) and low <= value <= high):
        raise OptionError(option, f"must be between {low} and {high}, got {value}")


@dataclass
class AnimateConfig:
    """Sampling options; defaults are the official config (config/hunyuan-portrait.yaml)."""
    num_steps: int = 25
    seed: int = 72580
    min_appearance_guidance: float = 2.0
    max_appearance_guidance: float = 2.0
    min_motion_guidance: float = 2.0
    max_motion_guidance: float = 2.0
    window: int = WINDOW  # n_sample_frames: also the chunk of the motion encoders and bucket ids (first_chunk_frames)
    overlap: int = 3
    shift_offset: int = 3
    pad_frames: int = 15
    decode_chunk: int = 8
    fps_condition: float = 12.5  # UNet micro-conditioning only; output keeps the driving video's fps
    motion_bucket_id: float = 0.0
    noise_aug_strength: float = 0.0
    i2i_strength: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    size: int = CROP_SIZE  # width and height of the generated crop
    max_frames: int = 10000  # driving frames used at most (the official frame_num)
    precision: Precision = "fp16"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    sampler: Sampler = "euler"  # "lcm": the few-step sampler of fast mode
    guidance_branches: int = 3  # 3: uncond/appearance/full (official); 2: motion guidance only; 1: none
    video_preset: str = "medium"  # libx264 preset of the output videos (official: its default, at CRF 17)
    segment: int = 0  # frames sampled at once, context included (sample_segments); 0: the whole clip (official)
    # frames of the clip's first segment, leading pad frames included (0, or more than `segment`: `segment`);
    # shorter than the window, it is one UNet window of its own length, so the first frames come out sooner.
    # Ignored when `segment` is 0 (the whole clip).
    first_segment: int = 0

    def __post_init__(self):
        for option, *_ in _LIMITS:
            check_range(option, getattr(self, option))
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.overlap < self.window:
            raise OptionError("overlap", f"must be in [0, window), got {self.overlap}")
        if self.size % 64:
            raise OptionError("size", f"must be a multiple of 64 (the UNet downsamples the latent 3 times), "
                              f"got {self.size}")
        if self.sigma_min >= self.sigma_max:
            raise OptionError("sigma_min", f"must be below sigma_max ({self.sigma_max}), got {self.sigma_min}")
        if self.sampler not in ("euler", "lcm"):
            raise OptionError("sampler", f"must be euler or lcm, got {self.sampler!r}")
        if self.guidance_branches not in GUIDANCE_BRANCHES:
            raise OptionError("guidance_branches", f"must be 1, 2 or 3, got {self.guidance_branches}")
        if self.video_preset not in X264_PRESETS:
            raise OptionError("video_preset", f"must be one of {', '.join(X264_PRESETS)}, "
                              f"got {self.video_preset!r}")
        if self.segment and self.segment < self.window:
            raise OptionError("segment", f"must be 0 (the whole clip) or at least the window ({self.window} frames), "
                              f"got {self.segment}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def first_segment_frames(self) -> int:
        """Frames of the clip's first segment with `segment` > 0 (`first_segment` at most `segment`)."""
        return min(self.first_segment or self.segment, self.segment)

    @property
    def first_chunk_frames(self) -> int:
        """Driving frames of the first motion chunk when segmented: the real frames of the first segment (at least
        one, at most a window), so that it starts as soon as they are in; its bucket ids are computed over those
        frames only (a live source has no later frames to look at; one frame gives ids 0), and the later chunks of
        a window each start there. The whole clip (`segment` 0) keeps the official chunks of a window."""
        if not self.segment:
            return self.window
        return min(self.window, max(1, self.first_segment_frames - self.pad_frames))


    @classmethod
    def fast(cls, **overrides) -> AnimateConfig:
        """Fast mode: LCM, 4 steps, one UNet batch per window (no guidance), veryfast encoding; any field can be
        overridden."""
        return replace(cls(), **{**FAST_MODE, **overrides})


@dataclass
class Conditioning:
    """Per-video constants of the denoising loop (batch of one; guidance branches are built per call)."""
    appearance: torch.Tensor  # (64, 1024) tokens
    image_latent: torch.Tensor  # (4, h, w) unscaled VAE mean
    ref_latent: torch.Tensor  # (4, h, w) scaled VAE mean (i2i init)
    motion: torch.Tensor | None  # (T, 64, 1024) tokens, pad frames included; None: made per segment
    pose: torch.Tensor  # (320, h, w): the pose guider's output for the all-black pose image
    added_time_ids: torch.Tensor  # (3,)
    num_pad: int = 0
    extras: dict = field(default_factory=dict)


def motion_tokens(models: Models, expression_images: torch.Tensor, pose_images: torch.Tensor,
                  head_bucket: int, exp_bucket: int) -> torch.Tensor:
    """Motion tokens (n, 64, 1024) fp32 of one chunk of driving frames (n <= 25).

    The intensity bucket ids are computed per chunk (a window; `first_chunk_frames`), so the encoders run per
    chunk too.
    """
    device = models.device
    head_id, exp_id = (torch.tensor([i], dtype=torch.int32, device=device) for i in (head_bucket, exp_bucket))
    return models.motion(face_images=expression_images.to(device), pose_images=pose_images.to(device),
                         head_bucket=head_id, exp_bucket=exp_id).float()


def vae_images(images: torch.Tensor, size: int, device) -> torch.Tensor:
    """(B,3,H,W) VAE inputs in [-1,1] -> fp32 on `device`, resized to size x size (bilinear, antialiased) when
    the crop is another size (the tiny models generate smaller crops than the 512 px preprocessing)."""
    images = images.to(device, torch.float32)
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                 align_corners=False)
    return images


def build_conditioning(models: Models, config: AnimateConfig, *, ref_image: torch.Tensor,
                       dino_image: torch.Tensor, id_embedding: torch.Tensor, motion: torch.Tensor,
                       generator: torch.Generator) -> Conditioning:
    """ref_image (3,H,W) in [-1,1]; motion (N,64,1024) fp32 from `motion_tokens`, or None when the clip is
    sampled segment by segment (`sample_segments` takes the tokens as they are made)."""
    dtype, device = models.dtype, models.device
    ref = vae_images(ref_image[None], config.size, device)
    mean = models.vae_encoder(image=ref).float()
    ref_latent = mean * VAE_SCALE
    # Drawn even when the strength is 0: it moves the RNG exactly as the reference does.
    aug = torch.randn(ref.shape, generator=generator, device=device, dtype=torch.float32)
    # With no augmentation the reference encodes the same image twice: reuse the first result.
    image_latent = mean if config.noise_aug_strength == 0 else models.vae_encoder(
        image=ref + config.noise_aug_strength * aug).float()
    if models.pose_map.shape[-2:] != mean.shape[-2:]:
        raise ValueError(f"the models generate {models.pose_map.shape[-1] * 8} px crops, the config asks for "
                         f"{config.size} px")
    appearance = models.appearance(image=dino_image[None].to(device),
                                   id_embedding=id_embedding.reshape(1, -1).to(device))
    return Conditioning(
        appearance=appearance[0].to(dtype),
        image_latent=image_latent[0].to(dtype),
        ref_latent=ref_latent[0].to(dtype),
        motion=None if motion is None else pad_motion_tokens(motion.to(device), config.pad_frames).to(dtype),
        pose=models.pose_map.to(device, dtype),
        added_time_ids=torch.tensor([config.fps_condition, config.motion_bucket_id, config.noise_aug_strength],
                                    dtype=dtype, device=device),
        num_pad=config.pad_frames,
    )


def guided_denoiser(unet: Callable[..., torch.Tensor], cond: Conditioning, sigmas: torch.Tensor,
                    config: AnimateConfig):
    """The denoiser of one window: one UNet batch holding the guidance branches, combined.

    Three branches (the official): no appearance and no motion / appearance / appearance and motion, combined
    in two stages. Two: appearance / appearance and motion, motion guidance only. One: no guidance.
    """
    steps = len(sigmas) - 1
    g_app = guidance_ramp(config.min_appearance_guidance, config.max_appearance_guidance, steps, cond.motion.dtype)
    g_mot = guidance_ramp(config.min_motion_guidance, config.max_motion_guidance, steps, cond.motion.dtype)
    branches = GUIDANCE_BRANCHES[config.guidance_branches]
    batch = len(branches)
    image = torch.stack([torch.zeros_like(cond.image_latent) if b == 0 else cond.image_latent for b in branches])
    appearance = torch.stack([torch.zeros_like(cond.appearance) if b == 0 else cond.appearance for b in branches])
    time_ids = cond.added_time_ids[None].expand(batch, -1)

    def denoise(x: torch.Tensor, step: int, index: torch.Tensor) -> torch.Tensor:
        frames = x.shape[0]
        sigma = sigmas[step]
        x_in = scale_input(x, sigma)[None].expand(batch, *x.shape)
        motion = cond.motion.index_select(0, index)
        motion = torch.stack([motion if b == 2 else torch.zeros_like(motion) for b in branches])
        v = unet(sample=torch.cat([x_in, image[:, None].expand(batch, frames, -1, -1, -1)], dim=2),
                 timestep=c_noise(sigma).reshape(1), appearance_tokens=appearance, motion_tokens=motion,
                 pose_map=cond.pose, added_time_ids=time_ids)
        if batch == 1:
            return v[0]
        if batch == 2:
            drop, full = v.unbind(0)
            return drop + g_mot[step] * (full - drop)
        uncond, drop, full = v.chunk(3)
        return combine_guidance(uncond[0], drop[0], full[0], g_app[step], g_mot[step])

    return denoise


def sampler_sigmas(config: AnimateConfig, device) -> torch.Tensor:
    """The sigmas the sampler walks, i2i strength applied, ending in 0."""
    sigmas = karras_sigmas(config.num_steps, config.sigma_min, config.sigma_max).to(device)
    return sigmas[i2i_start_index(config.num_steps, config.i2i_strength):]


@torch.no_grad()
def sample_latents(models: Models, cond: Conditioning, config: AnimateConfig, generator: torch.Generator,
                   callback: Callable[[int], None] | None = None,
                   map_windows: WindowMap | None = None, *, context: torch.Tensor | None = None,
                   circular: bool = True) -> torch.Tensor:
    """Whole-clip latents (T, 4, h, w) after the configured sampler (`map_windows`: how each step's windows
    are run, e.g. spread over GPUs by runtime/distributed.py). For one segment of a clip: `context` the
    finished latents of its first frames (pinned at every step, `pin_context`), `circular=False`."""
    dtype, device = models.dtype, models.device
    sigmas = sampler_sigmas(config, device)
    num_frames = cond.motion.shape[0]
    noise = torch.randn((1, num_frames, *cond.ref_latent.shape), generator=generator, device=device,
                        dtype=dtype)[0]
    x = cond.ref_latent[None] + noise * sigmas[0].to(dtype)
    denoise = guided_denoiser(models.unet, cond, sigmas, config)
    windows = {"window": config.window, "overlap": config.overlap, "shift_offset": config.shift_offset,
               "callback": callback, "map_windows": map_windows, "circular": circular,
               "context": None if context is None else (context, noise[:context.shape[0]])}
    if config.sampler == "lcm":
        return sample_lcm_windows(denoise, x, sigmas, generator, **windows)
    return sample_euler_windows(denoise, x, sigmas, **windows)


@torch.no_grad()
def sample_segments(models: Models, cond: Conditioning, config: AnimateConfig, generator: torch.Generator,
                    motion: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The clip's finished latents segment by segment: (latents (n, 4, h, w), real (n,) bool) of its next
    frames, `real` False on the pad frames.

    `motion` yields the driving frames' tokens chunk by chunk (`motion_tokens`); a chunk is pulled only when
    the next segment needs it, so nothing per frame is kept beyond one segment and its context. Each segment
    of `config.segment` frames is fully denoised before the next; its first `overlap` frames are the last
    finished frames of the segment before, pinned at every step (`pin_context`), so the two join; windows stay
    inside the segment (no wrap-around from the clip's end to its start). The clip's last segment, when
    short, takes more context frames so that it still fills a window. The first segment has
    `config.first_segment` frames when set (at most `segment`); shorter than the window, it is sampled with one
    window of its own length (the UNet runs at fewer frames, so the first frames come out sooner), not a window
    of repeated frames. With `segment` 0 the whole clip is one segment with the official circular windows: the
    latents of `sample_latents`, bit for bit.
    """
    dtype, whole = models.dtype, config.segment == 0
    first = config.first_segment_frames
    blocks = padded_motion((tokens.to(models.device) for tokens in motion), config.pad_frames)
    tokens = torch.empty(0, device=models.device, dtype=dtype)
    real = torch.empty(0, dtype=torch.bool)
    history: tuple[torch.Tensor, torch.Tensor] | None = None  # (latents, tokens) of the last finished frames
    while True:
        context = 0 if history is None else min(config.overlap, len(history[0]))  # a first segment may be shorter
        wanted = math.inf if whole else (first if history is None else config.segment) - context
        token_blocks, real_blocks, held = [tokens], [real], len(tokens)
        while held < wanted and (block := next(blocks, None)) is not None:
            token_blocks.append(block[0].to(dtype))
            real_blocks.append(torch.full((len(block[0]),), block[1]))
            held += len(block[0])
        tokens, real = torch.cat(token_blocks), torch.cat(real_blocks)  # once: the whole clip's may be large
        if len(tokens) == 0:
            return
        new = min(len(tokens), wanted)
        if history is not None:  # a short last segment reaches further back to fill a window
            context = min(len(history[0]), max(context, config.window - new))
        past = None if history is None else (history[0][len(history[0]) - context:],
                                             history[1][len(history[1]) - context:])
        segment_tokens = tokens[:new] if past is None else torch.cat([past[1], tokens[:new]])
        window = config.window if whole or past is not None else min(first, config.window)
        # a short first segment: its one window holds it (a clip shorter than it wraps round as a short clip does)
        segment_config = config if window == config.window else replace(
            config, window=window, overlap=min(config.overlap, window - 1))
        latents = sample_latents(models, replace(cond, motion=segment_tokens), segment_config, generator,
                                 context=None if past is None else past[0],
                                 circular=whole or len(segment_tokens) < window)[context:]
        yield latents, real[:new]
        keep = config.window - 1  # the longest context a short last segment can take
        history = (latents[-keep:], tokens[:new][-keep:]) if history is None else (
            torch.cat([history[0], latents])[-keep:], torch.cat([history[1], tokens[:new]])[-keep:])
        tokens, real = tokens[new:], real[new:]


@torch.no_grad()
def decode_frames(models: Models, latents: torch.Tensor, config: AnimateConfig,
                  num_pad: int) -> Iterator[np.ndarray]:
    """Decoded (H, W, 3) uint8 RGB frames, pad frames dropped, streamed chunk by chunk.

    The temporal decoder mixes the frames of a chunk, so chunk boundaries are part of the result (the
    official 8); chunks made only of pad frames are skipped.
    """
    total = latents.shape[0]
    for start, stop in decode_chunks(total, config.decode_chunk, num_pad):
        yield from kept_frames(decoded_chunk(models, latents, start, stop), start, total, num_pad)


def decode_chunks(total: int, chunk: int, num_pad: int) -> list[tuple[int, int]]:
    """(start, stop) of the decoder's chunks of a clip of `total` latents that hold output frames."""
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)
            if min(start + chunk, total) > num_pad and start < total - num_pad]


def decoded_chunk(models: Models, latents: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """(stop - start, H, W, 3) uint8 RGB frames of latents[start:stop]."""
    chunk = models.vae_decoder(latents=latents[start:stop]).float()
    pixels = (chunk * 0.5 + 0.5).clamp(0, 1)
    # truncation, not rounding, as the reference's (x * 255).astype(uint8)
    return (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)


def kept_frames(frames: np.ndarray, start: int, total: int, num_pad: int) -> Iterator[np.ndarray]:
    """The frames of a decoded chunk starting at `start` that are not pad frames."""
    for index, frame in enumerate(frames, start):
        if num_pad <= index < total - num_pad:
            yield frame


@torch.no_grad()
def decode_segments(models: Models, segments: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    config: AnimateConfig) -> Iterator[np.ndarray]:
    """Decoded (H, W, 3) uint8 RGB frames of the real frames of `segments` ((latents, real) in clip order).

    The temporal decoder mixes the frames of a chunk, so chunk boundaries are part of the result (the
    official 8): chunks are counted from the clip's first frame whatever the segments, a segment's last
    frames waiting for the next segment to fill their chunk; chunks made only of pad frames are skipped.
    """
    chunk = config.decode_chunk
    latents, real = None, None
    for part, part_real in itertools.chain(segments, [(None, None)]):
        if part is not None:
            latents = part if latents is None else torch.cat([latents, part])
            real = part_real if real is None else torch.cat([real, part_real])
        if latents is None:
            return
        ready = len(latents) if part is None else len(latents) - len(latents) % chunk
        for start in range(0, ready, chunk):
            keep = real[start:start + chunk].numpy()
            if keep.any():
                yield from decoded_chunk(models, latents, start, start + chunk)[keep]
        latents, real = latents[ready:], real[ready:]


_END = object()


def prefetched(items: Iterator, depth: int, check: Callable[[], None] | None = None) -> Iterator:
    """`items` produced by a background thread, up to `depth` ahead: the GPU decodes the next chunk while the
    caller encodes the frames of this one. The producer's exceptions are raised in the caller; when the
    caller stops early, the producer stops at its next item. `check` is called while the caller waits (a
    tenth of a second apart) and may raise to stop waiting: a live source that stalled; the producer, blocked
    in it, is then not waited for and ends when its read returns."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                pending.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    closed(items)  # the caller stopped: what `items` holds (a source, the clip's latents) goes now
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread, raised there
            put((_END, exc))

    ended = None
    consumer = threading.current_thread()
    try:
        ended = _started(produce, "hyportrait-prefetch")  # inside: an interrupt right after it still sets stop
        while True:
            try:
                item, error = pending.get(timeout=None if check is None else 0.1)
            except queue.Empty:
                check()
                continue
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        if ended is None or threading.current_thread() is not consumer:
            pass  # not started (or the interrupt came before its event was returned: it stops at its next item), or
            # finalized by the garbage collector on another thread (the producer, or one holding a lock the
            # producer may wait for): stopping is all it can do
        elif check is None:
            _wait_through_interrupts(ended)
        else:  # a producer blocked in a stalled source is not waited for long: it ends when its read returns
            ended.wait(timeout=1.0)


@contextmanager
def consumed_in_background(consume: Callable, depth: int, name: str) -> Iterator[Callable]:
    """A function that hands items to `consume`, called on a thread of its own in order, up to `depth` queued:
    each output video is pasted and encoded on its own thread while the GPU decodes. A failure of `consume`
    is raised in the caller at its next hand-over or when the block ends; later items are dropped."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []

    def run():
        while (item := pending.get()) is not _END:
            if errors:
                continue  # drained, so that the caller never blocks on a full queue
            try:
                consume(item)
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread, raised there
                errors.append(exc)

    def hand_over(item) -> None:
        if errors:
            raise errors[0]
        pending.put(item)

    ended = None
    try:
        ended = _started(run, name)
        yield hand_over
    except BaseException as exc:
        errors.append(exc)  # the caller failed or was interrupted: what is queued is dropped, not consumed
        raise
    finally:
        if ended is None:  # interrupted while starting: should it have started all the same, this ends it
            pending.put(_END)
        else:
            _wait_through_interrupts(ended, lambda: pending.put(_END), errors)
    if errors:
        raise errors[0]


class _Workers:
    """Long-lived daemon threads for the background work (prefetching, encoding), reused from call to call.
    CUDA libraries keep caches per thread: cuDNN builds its execution plans again on every new thread (about 2 ms
    a convolution shape: 0.09 of the first chunk's 0.11 s of face detection on an H200), so a stream or a job
    that started threads of its own paid that every time. A worker is named after its task while it runs it,
    and IDLE between tasks."""

    IDLE = "idle worker"

    def __init__(self):
        self._forget()
        os.register_at_fork(after_in_child=self._forget)  # a forked child has none of the parent's threads

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []  # the inboxes of the idle workers, the latest last

    def start(self, target: Callable[[], None], name: str) -> threading.Event:
        """Run `target` on an idle worker (the one idle last: its caches are the warmest) or a new one; the event
        is set once it has returned or raised, after the worker has taken the IDLE name again and, when it
        returned, is idle again (a task started next reuses it)."""
        ended = threading.Event()
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name=name, daemon=True).start()
        inbox.put((target, name, ended))
        return ended

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        me = threading.current_thread()
        while True:
            target, me.name, ended = inbox.get()
            returned = False
            try:
                target()  # what it raises ends this worker, as it ended a thread of its own (threading.excepthook)
                returned = True
            finally:
                target = None  # an idle worker keeps nothing of its last task alive (its generators, its tensors)
                me.name = self.IDLE
                if returned:
                    with self._lock:
                        self._idle.append(inbox)
                ended.set()


_started = _Workers().start


def _wait_through_interrupts(ended: threading.Event, end: Callable | None = None, errors: list | None = None):
    """Call `end` (what tells a worker's task to stop) once and wait until the task has `ended`, even when an
    interrupt (SIGINT, or SIGTERM as the CLI turns it) arrives meanwhile, then raise that interrupt: the caller
    goes on to close what the task may still be using (the video writers). An interrupt is also appended to
    `errors`, which makes a consumer drop what is still queued."""
    interrupt = None
    while end is not None or not ended.is_set():
        try:
            if end is not None:
                end()
                end = None
            ended.wait()
        except BaseException as exc:  # noqa: BLE001 -- raised below, once the task has ended
            interrupt = exc
            if errors is not None:
                errors.append(exc)
    if interrupt is not None:
        raise interrupt


class BusyTimes:
    """Seconds each overlapped part of the writing spent working, keyed by part: with decoding and both encoders
    on threads of their own, the wall time alone does not say which of them bounds the rest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def _add(self, key: str, tic: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - tic

    def calls(self, key: str, fn: Callable) -> Callable:
        def timed(*args):
            tic = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._add(key, tic)
        return timed

    def items(self, key: str, items: Iterator) -> Iterator:
        items = iter(items)
        try:
            while True:
                tic = time.perf_counter()
                item = next(items, _END)
                self._add(key, tic)
                if item is _END:
                    return
                yield item
        finally:
            closed(items)


def closed(items: Iterator) -> None:
    """Close `items` when it is a generator (a `prefetched` one then stops and waits for its thread): a caller
    that stops early closes what it read, instead of leaving it, and its thread, to the garbage collector."""
    close = getattr(items, "close", None)
    if close is not None:
        close()
