"""Consistency distillation in SVD's sigma parameterisation (the AnimateLCM-SVD recipe), as small pure functions.

Everything is written with the runtime's own sampler functions (runtime/sampling.py), so what the student learns
is what the runtime samples:
- the grid: N Karras sigmas from 700 down to 0.002 plus a final 0 (`karras_sigmas(N)`); with N = 40 the runtime's
  4-step fast-mode sigmas are grid points 0, 13, 26, 39 (39 intervals = 3 x 13);
- the teacher target: one Euler step (`euler_step`) of the frozen teacher between adjacent grid points, with the
  official three-branch guidance (`combine_guidance`);
- the consistency function of phase edge s: `euler_step(x, v, sigma, s)` = D + s/sigma (x - D), with D the EDM
  denoiser of the v-prediction (`denoised_from_v`: c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)). With
  one phase s = 0 and it is D itself, exactly what the runtime's LCM sampler computes, so fast mode uses the
  student unchanged. The boundary f(x, s) = x holds exactly at s; at sigma_min = 0.002 the EDM form is the
  identity only up to c_out = -0.002 (times v), so the last interval ends at sigma = 0, where the target is the
  teacher's own step (its x0), never a network call.
- phases K > 1 (phased consistency): the edges are the runtime's K-step Karras sigmas, and the student samples
  deterministically with the runtime's Euler sampler over them (`sample_euler_windows`, `--sampler euler --steps
  K`): no new sampler is needed.
"""
from __future__ import annotations

import torch

from hyportrait.runtime.sampling import combine_guidance, denoised_from_v, euler_step, karras_sigmas

GRID_POINTS = 40
HUBER_C = 1e-3


def sigma_grid(points: int = GRID_POINTS, sigma_min: float = 0.002, sigma_max: float = 700.0) -> torch.Tensor:
    """The N grid sigmas, 700 ... 0.002, plus the final 0 (N + 1 values, fp32)."""
    return karras_sigmas(points, sigma_min, sigma_max)


def phase_edges(points: int, phases: int) -> list[int]:
    """Grid indices of the phase edges, first 0, last `points` (sigma 0): the runtime's K-step Karras sigmas."""
    if phases < 1:
        raise ValueError(f"phases must be >= 1, got {phases}")
    if phases == 1:
        return [0, points]
    if (points - 1) % (phases - 1):
        raise ValueError(f"{phases} phases need a grid whose {points - 1} intervals divide into {phases - 1} "
                         f"parts (e.g. --grid {1 + (phases - 1) * 13})")
    stride = (points - 1) // (phases - 1)
    return [k * stride for k in range(phases)] + [points]


def lower_edge(index: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """For grid indices i (intervals i -> i+1), the index of their phase's lower edge."""
    edges_t = torch.tensor(edges[1:], device=index.device)
    return edges_t[torch.searchsorted(edges_t, index, right=True)]


def consistency(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """The consistency function: x at sigma mapped to the phase edge sigma `edge` (D itself where edge = 0)."""
    return torch.where(edge == 0, denoised_from_v(x, v, sigma), euler_step(x, v, sigma, edge))


def guided_v(uncond: torch.Tensor, drop: torch.Tensor, cond: torch.Tensor, appearance_scale: torch.Tensor,
             motion_scale: torch.Tensor) -> torch.Tensor:
    """The official three-branch guidance of the teacher's v-predictions."""
    return combine_guidance(uncond, drop, cond, appearance_scale, motion_scale)


def teacher_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the (guided) teacher from sigma to the next grid sigma."""
    return euler_step(x, v, sigma, sigma_next)


def distill_target(x_next: torch.Tensor, v_target: torch.Tensor, sigma_next: torch.Tensor,
                   edge: torch.Tensor) -> torch.Tensor:
    """The target network's consistency value at the teacher's step; at the phase edge, the step itself (the
    boundary condition). `v_target` is ignored where sigma_next is the edge (it may come from any sigma > 0)."""
    return torch.where(sigma_next == edge, x_next, consistency(x_next, v_target, sigma_next, edge))


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                 c: float = HUBER_C) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c), each example weighted by `weight` (B,) when given."""
    per_example = ((pred.float() - target.float()) ** 2 + c * c).sqrt().sub(c).flatten(1).mean(1)
    return per_example.mean() if weight is None else (per_example * weight).mean()


def interval_weight(sigma: torch.Tensor, sigma_next: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sigma loss weight: "uniform" or AnimateLCM's (1 / (sigma_i - sigma_i+1))^0.1 (its author calls it
    fragile)."""
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "animatelcm":
        return (1.0 / (sigma - sigma_next)) ** 0.1
    raise ValueError(f"unknown sigma weighting {kind!r} (uniform, animatelcm)")


def edm_training_sigma(generator: torch.Generator, batch: int, mean: float = 0.7, std: float = 1.6,
                       device=None) -> torch.Tensor:
    """Training sigmas of the teacher's denoising loss: log sigma ~ N(mean, std) (SVD's P_mean/P_std)."""
    return (torch.randn(batch, generator=generator) * std + mean).exp().to(device)


def denoising_loss(x0: torch.Tensor, v: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SVD's EDM v-prediction loss: (sigma^2+1)/sigma^2 weighted MSE of the denoised estimate."""
    weight = (sigma**2 + 1) / sigma**2
    error = (denoised_from_v(noisy, v, sigma).float() - x0.float()) ** 2
    return (error.flatten(1).mean(1) * weight.flatten()).mean()
