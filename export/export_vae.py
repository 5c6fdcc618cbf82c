"""The VAE for export: the image encoder and the temporal decoder as two models.

vae_encoder: image (N, 3, H, W) in [-1, 1] -> latent_mean (N, 4, H/8, W/8), unscaled (the pipeline multiplies
    by the scaling factor where it needs the scaled latent). Always fp32: the reference upcasts the encoder
    (force_upcast).
vae_decoder: latents (F, 4, h, w) as sampled, i.e. scaled by the scaling factor -> frames (F, 3, 8h, 8w) in
    about [-1, 1]. The model multiplies by 1/scaling_factor first, exactly as the reference decode does, so
    the runtime feeds the sampler's latents unchanged. F is the decode chunk (the official 8, or fewer for
    the last chunk): it is the batch axis, and the temporal layers treat the whole batch as one clip.
H and W are dynamic on both (multiples of 8); validation runs at small sizes to stay cheap on a CPU.
"""
from __future__ import annotations

import torch

from hyportrait.networks.contract import DECODE_CHUNK, MODELS
from hyportrait.networks.vae import VAEClipDecoder, VAEImageEncoder
from hyportrait.networks.weights import CHECKPOINTS, Networks

from .onnx_io import ExportSpec

VAE_SOURCE = next(spec.path for spec in CHECKPOINTS if spec.name == "vae")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vae_encoder_spec(nets: Networks, image_size: int = 64, seed: int = 0) -> ExportSpec:
    gen = _generator(seed)

    def image(batch: int, height: int, width: int) -> torch.Tensor:
        return torch.rand(batch, 3, height, width, generator=gen) * 2 - 1

    return ExportSpec.of(
        MODELS["vae_encoder"], VAEImageEncoder(nets.vae).eval(), {"image": image(1, image_size, image_size)},
        sources=(VAE_SOURCE,), extra_inputs=[{"image": image(2, image_size + 16, image_size - 16)}])


def vae_decoder_spec(nets: Networks, latent_size: int = 8, seed: int = 0) -> ExportSpec:
    gen = _generator(seed)
    scale = nets.vae.config.scaling_factor

    def latents(frames: int, height: int, width: int) -> torch.Tensor:
        # the sampler's latents: a unit-variance latent times the scaling factor
        return torch.randn(frames, 4, height, width, generator=gen) * scale

    return ExportSpec.of(
        MODELS["vae_decoder"], VAEClipDecoder(nets.vae).eval(),
        {"latents": latents(DECODE_CHUNK, latent_size, latent_size)},
        sources=(VAE_SOURCE,), extra_inputs=[{"latents": latents(3, latent_size + 2, latent_size)}])
