"""The SVD-xt VAE: SD image encoder and temporal decoder (diffusers' AutoencoderKLTemporalDecoder).

Loads `vae/diffusion_pytorch_model.fp16.safetensors` of the official release unchanged.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder
from torch import nn


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 768
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def tiny(cls) -> VAEConfig:
        return cls(block_out_channels=(32, 32, 32, 32), layers_per_block=1)  # GroupNorm(32) is fixed

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        raw = json.loads(Path(path).read_text())
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_vae(config: VAEConfig | None = None) -> AutoencoderKLTemporalDecoder:
    config = config or VAEConfig()
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k != "extra"}
    return AutoencoderKLTemporalDecoder(**kwargs)


def place_vae(vae: AutoencoderKLTemporalDecoder, device, dtype: torch.dtype) -> AutoencoderKLTemporalDecoder:
    """Decoder in `dtype`; the encoder stays fp32 when the config says force_upcast, as the reference runs it
    (it upcasts the whole VAE around the encode call; keeping the encoder fp32 gives the same arithmetic
    without switching dtypes at run time)."""
    vae.to(device, dtype)
    if vae.config.force_upcast:
        vae.encoder.float()
        vae.quant_conv.float()
    return vae


@torch.no_grad()
def encode_image(vae: AutoencoderKLTemporalDecoder, image: torch.Tensor) -> torch.Tensor:
    """(1,3,H,W) in [-1,1] -> unscaled latent mean (1,4,H/8,W/8) in fp32."""
    dtype = next(vae.encoder.parameters()).dtype
    return vae.encode(image.to(dtype)).latent_dist.mean.float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKLTemporalDecoder, latents: torch.Tensor, chunk: int = 8) -> Iterator[torch.Tensor]:
    """(T,4,h,w) scaled latents -> chunks of (<=chunk,3,H,W) float32 frames in [-1,1].

    The temporal decoder mixes frames within a chunk, so chunk boundaries are part of the result.
    """
    dtype = next(vae.decoder.parameters()).dtype
    latents = 1 / vae.config.scaling_factor * latents  # multiply, as the reference does (not divide)
    for start in range(0, latents.shape[0], chunk):
        part = latents[start:start + chunk].to(dtype)
        yield vae.decode(part, num_frames=part.shape[0]).sample.float()


class VAEImageEncoder(nn.Module):
    def __init__(self, vae: AutoencoderKLTemporalDecoder):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_channels = vae.config.latent_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # the posterior's mean is the first half of the moments; its std is never used at inference
        return self.quant_conv(self.encoder(image))[:, :self.latent_channels]


class VAEClipDecoder(nn.Module):
    def __init__(self, vae: AutoencoderKLTemporalDecoder):
        super().__init__()
        self.decoder = vae.decoder
        self.inverse_scale = 1 / vae.config.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        num_frames = latents.shape[0]  # traced as the input's size, so the frame count stays dynamic
        image_only_indicator = torch.zeros(1, num_frames, dtype=latents.dtype, device=latents.device)
        return self.decoder(latents * self.inverse_scale, image_only_indicator=image_only_indicator,
                            num_frames=num_frames)
