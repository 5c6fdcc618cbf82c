"""Samplers as small pure functions over a sigma schedule (k-diffusion style).

The reference path is SVD-xt's: Karras sigmas, v-prediction, Euler steps, input scaling
x / sqrt(sigma^2 + 1), c_noise = ln(sigma) / 4. Expressions are written in the same order as the
official scheduler so that, in fp16, every rounding step happens where it happens there: the sigmas
are 0-dim fp32 tensors, so the result keeps the dtype of the latents.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .windows import segment_window_indices, window_indices

Denoiser = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
# How the windows of one step are run: (update of one window's frame index, the step's window indices, the
# step's latents) -> the updates in window order. None runs them one after another here; runtime/distributed.py
# spreads them over ranks.
WindowMap = Callable[[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor], torch.Tensor], Sequence[torch.Tensor]]


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0,
                  rho: float = 7.0) -> torch.Tensor:
    """`num_steps` Karras sigmas from sigma_max down to sigma_min, plus a final 0 (fp32, as diffusers stores them)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The UNet's continuous timestep for a sigma."""
    return 0.25 * sigma.log()


def scale_input(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / ((sigma**2 + 1) ** 0.5)


def denoised_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 from a v-prediction (c_out * v + c_skip * x)."""
    return v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Euler step of the probability-flow ODE from sigma to sigma_next."""
    derivative = (x - denoised_from_v(x, v, sigma)) / sigma
    return x + derivative * (sigma_next - sigma)


def combine_guidance(uncond: torch.Tensor, drop: torch.Tensor, cond: torch.Tensor,
                     appearance_scale: torch.Tensor, motion_scale: torch.Tensor) -> torch.Tensor:
    """Two-stage classifier-free guidance: appearance (uncond -> drop) then motion (drop -> cond)."""
    return uncond + appearance_scale * (drop - uncond) + motion_scale * (cond - drop)


def guidance_ramp(minimum: float, maximum: float, num_steps: int, dtype=torch.float32) -> torch.Tensor:
    return torch.linspace(minimum, maximum, num_steps).to(dtype)


def i2i_start_index(num_steps: int, strength: float) -> int:
    """First step that runs for an image-to-image strength (1.0 runs them all)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"i2i strength must be in (0, 1], got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


def window_average(update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, *,
                   window: int, overlap: int, shift: int, map_windows: WindowMap | None = None,
                   circular: bool = True) -> torch.Tensor:
    """`update(x_window, frame_index)` over the windows of one step, averaged per frame (uniform weights).

    Windows start every `window - overlap` frames, moved back by `shift`, and wrap around the clip
    (`circular`; else they stay inside it, `segment_window_indices`). The updates are summed in window order
    whoever computed them (`map_windows`), so the sums round the same.
    """
    total = torch.zeros_like(x)
    count = torch.zeros((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
    plan = window_indices if circular else segment_window_indices
    indices = [torch.as_tensor(index, device=x.device) for index in plan(x.shape[0], window, overlap, shift)]

    def window_update(index: torch.Tensor) -> torch.Tensor:
        return update(x.index_select(0, index), index)

    updates = (window_update(index) for index in indices) if map_windows is None else map_windows(
        window_update, indices, x)
    for index, value in zip(indices, updates):
        total.index_add_(0, index, value)
        count.index_add_(0, index, torch.ones((len(index), 1, 1, 1), dtype=x.dtype, device=x.device))
    return total / count


def pin_context(x: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor] | None,
                sigma: torch.Tensor) -> torch.Tensor:
    """x with its first frames set to `context` = (finished latents, noise) re-noised to `sigma`: the seam of a
    segmented schedule, where the previous segment's last frames guide this segment's first ones at every
    step (they enter the same windows as the new frames). None leaves x as it is."""
    if context is None:
        return x
    latents, noise = context
    return torch.cat([latents + noise * sigma.to(x.dtype), x[latents.shape[0]:]])


def sample_euler_windows(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, window: int = 25,
                         overlap: int = 3, shift_offset: int = 3,
                         callback: Callable[[int], None] | None = None,
                         map_windows: WindowMap | None = None,
                         context: tuple[torch.Tensor, torch.Tensor] | None = None,
                         circular: bool = True) -> torch.Tensor:
    """Euler sampling of a whole clip with circular sliding windows (the reference sampler).

    x: (T, C, h, w) latents at sigmas[0]. `denoise(x_window, step, frame_index)` returns the guided
    v-prediction for the window's frames. Each step the windows' Euler updates are averaged per frame; the
    windows move back by a shift that grows by `shift_offset` per step. A segment of a longer clip passes
    `context` (see `pin_context`) and `circular=False`.
    """
    shift = 0
    for step in range(len(sigmas) - 1):
        def update(xw: torch.Tensor, index: torch.Tensor, step: int = step) -> torch.Tensor:
            return euler_step(xw, denoise(xw, step, index), sigmas[step], sigmas[step + 1])

        x = pin_context(x, context, sigmas[step])
        x = window_average(update, x, window=window, overlap=overlap, shift=shift, map_windows=map_windows,
                           circular=circular)
        shift = (shift + shift_offset) % window
        if callback is not None:
            callback(step)
    return x


def sample_lcm_windows(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator, *,
                       window: int = 25, overlap: int = 3, shift_offset: int = 3,
                       callback: Callable[[int], None] | None = None,
                       map_windows: WindowMap | None = None,
                       context: tuple[torch.Tensor, torch.Tensor] | None = None,
                       circular: bool = True) -> torch.Tensor:
    """LCM multistep sampling (k-diffusion's `sample_lcm`) of a whole clip with the same sliding windows.

    Each step jumps to the denoised estimate (the windows' estimates averaged per frame), then re-noises it
    to the next sigma with fresh noise from `generator`; the last step returns the estimate. `context` and
    `circular` as in `sample_euler_windows`.
    """
    shift = 0
    for step in range(len(sigmas) - 1):
        def update(xw: torch.Tensor, index: torch.Tensor, step: int = step) -> torch.Tensor:
            return denoised_from_v(xw, denoise(xw, step, index), sigmas[step])

        x = pin_context(x, context, sigmas[step])
        x = window_average(update, x, window=window, overlap=overlap, shift=shift, map_windows=map_windows,
                           circular=circular)
        if sigmas[step + 1] > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise * sigmas[step + 1].to(x.dtype)
        shift = (shift + shift_offset) % window
        if callback is not None:
            callback(step)
    return x


def window_calls(num_frames: int, num_steps: int, window: int = 25, overlap: int = 3) -> int:
    """How many denoiser calls a clip costs (for progress bars and benchmarks)."""
    return num_steps * len(window_indices(num_frames, window, overlap, 0))


__all__: Sequence[str] = [
    "WindowMap",
    "c_noise",
    "combine_guidance",
    "denoised_from_v",
    "euler_step",
    "guidance_ramp",
    "i2i_start_index",
    "karras_sigmas",
    "pin_context",
    "sample_euler_windows",
    "sample_lcm_windows",
    "scale_input",
    "window_average",
    "window_calls",
]
