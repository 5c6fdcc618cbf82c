"""Intensity-aware motion refiner and the assembly of the UNet's motion tokens.

The refiner turns each frame's expression feature (n, 512) into 64 tokens of 1018 channels with a
Perceiver resampler whose latents and layer norms are modulated by two motion-intensity buckets
(head movement and expression, each an id in [0, 127] computed per 25-frame chunk from landmarks).
`assemble_motion_tokens` then appends the head rotation and a zeroed translation to every token,
giving the (n, 64, 1024) motion tokens the UNet attends to. State-dict keys match the official
`motion_proj.pth` (95 keys).
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MotionRefinerConfig:
    input_dim: int = 512
    output_dim: int = 1018  # + 3 rotation + 3 translation = the UNet's 1024-wide motion tokens
    num_queries: int = 64
    intensity_embed_dim: int = 768
    width: int = 768
    layers: int = 6
    heads: int = 8
    num_buckets: int = 128

    @classmethod
    def tiny(cls) -> "MotionRefinerConfig":
        # the official token shape (64 x 1018, +6 pose = the UNet's 1024-wide cross-attention) on a narrow body
        return cls(input_dim=16, output_dim=1018, num_queries=64, intensity_embed_dim=12, width=16, layers=2,
                   heads=2)


class IntensityLayerNorm(nn.Module):
    """LayerNorm without affine weights, shifted and scaled by a projection of the intensity embedding."""

    def __init__(self, dim: int, intensity_dim: int):
        super().__init__()
        self.linear = nn.Linear(intensity_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(intensity)).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


class PerceiverBlock(nn.Module):
    """Latents attend to [latents ; input tokens], then a squared-ReLU MLP; both residual."""

    def __init__(self, width: int, heads: int, intensity_dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), sq_relu=SquaredReLU(), c_proj=nn.Linear(4 * width, width)
        ))
        self.ln_1 = IntensityLayerNorm(width, intensity_dim)  # latents
        self.ln_2 = IntensityLayerNorm(width, intensity_dim)  # input tokens
        self.ln_ff = IntensityLayerNorm(width, intensity_dim)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        normed_latents = self.ln_1(latents, intensity)
        keys = torch.cat([normed_latents, self.ln_2(tokens, intensity)], dim=1)
        latents = latents + self.attn(normed_latents, keys, keys, need_weights=False)[0]
        return latents + self.mlp(self.ln_ff(latents, intensity))


class PerceiverResampler(nn.Module):
    def __init__(self, config: MotionRefinerConfig):
        super().__init__()
        width = config.width
        self.latents = nn.Parameter(torch.randn(config.num_queries, width) * width**-0.5)
        self.intensity_aware_linear = nn.Linear(config.intensity_embed_dim, width)
        self.proj_in = nn.Linear(config.input_dim, width)
        self.perceiver_blocks = nn.ModuleList(
            PerceiverBlock(width, config.heads, config.intensity_embed_dim) for _ in range(config.layers)
        )
        self.proj_out = nn.Sequential(nn.Linear(width, config.output_dim), nn.LayerNorm(config.output_dim))

    def forward(self, tokens: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        """tokens (n, t, input_dim), intensity (1, 1, intensity_dim) shared by all n
        -> (n, queries, output_dim)."""
        latents = self.latents + self.intensity_aware_linear(F.silu(intensity))
        latents = latents.expand(tokens.shape[0], -1, -1)  # shape[0], not len(): export keeps it symbolic
        tokens = self.proj_in(tokens)
        for block in self.perceiver_blocks:
            latents = block(tokens, latents, intensity)
        return self.proj_out(latents)


class IntensityAwareMotionRefiner(nn.Module):
    def __init__(self, config: MotionRefinerConfig = MotionRefinerConfig()):
        super().__init__()
        self.config = config
        self.position_head = nn.Embedding(config.num_buckets, config.intensity_embed_dim)
        self.position_exp = nn.Embedding(config.num_buckets, config.intensity_embed_dim)
        self.connector = PerceiverResampler(config)

    def forward(self, features: torch.Tensor, head_id: torch.Tensor, exp_id: torch.Tensor) -> torch.Tensor:
        """features (n, input_dim) of one chunk; head_id, exp_id: integer tensors of shape (1,), values in
        [0, num_buckets) -> (n, num_queries, output_dim)."""
        # a value check needs the ids on the host, which tracing/export cannot express; the exported
        # graph relies on the caller (the official bucket computation clamps to [0, 127])
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_bucket_ids(head_id, exp_id)
        intensity = self.position_head(head_id) + self.position_exp(exp_id)
        intensity = intensity.to(features.dtype).reshape(1, 1, -1)
        return self.connector(features.unsqueeze(1), intensity)

    def _check_bucket_ids(self, head_id: torch.Tensor, exp_id: torch.Tensor) -> None:
        for name, ids in (("head_id", head_id), ("exp_id", exp_id)):
            if ids.shape != (1,) or ids.dtype.is_floating_point or ids.dtype.is_complex:
                raise ValueError(
                    f"{name} must be an integer tensor of shape (1,), got {ids.dtype} {tuple(ids.shape)}"
                )
            value = int(ids.item())
            if not 0 <= value < self.config.num_buckets:
                raise ValueError(
                    f"{name} = {value} is outside the motion buckets [0, {self.config.num_buckets - 1}]"
                )


def assemble_motion_tokens(refined: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """refined (n, q, c) + rotation (n, 3) -> motion tokens (n, q, c + 6).

    Every token gets the frame's rotation followed by a translation of zeros: the official pipeline
    multiplies the predicted translation by 0, so only its width survives.
    """
    n, q, _ = refined.shape
    rotation = rotation.to(refined.dtype)[:, None, :].expand(n, q, 3)
    return torch.cat([refined, rotation, torch.zeros_like(rotation)], dim=-1)
