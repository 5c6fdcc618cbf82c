"""The reference pipeline: the official inference, reproduced step for step in PyTorch.

This is the golden path other backends are compared against. Per video it computes the constants
once (appearance tokens, image latent, motion tokens, the pose map), samples the whole clip with
sliding windows and three guidance branches, then decodes in chunks and streams frames out.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from hyportrait.export.motion_refiner import assemble_motion_tokens
from hyportrait.export.vae import decode_latents, encode_image, place_vae
from hyportrait.export.weights import Networks

from .sampling import (
    c_noise,
    combine_guidance,
    guidance_ramp,
    i2i_start_index,
    karras_sigmas,
    sample_euler_windows,
    scale_input,
)
from .windows import pad_motion_tokens

Precision = Literal["fp16", "fp32"]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
VAE_SCALE = 0.18215


@dataclass
class AnimateConfig:
    """Sampling options; defaults are the official config (config/hunyuan-portrait.yaml)."""
    num_steps: int = 25
    seed: int = 72580
    min_appearance_guidance: float = 2.0
    max_appearance_guidance: float = 2.0
    min_motion_guidance: float = 2.0
    max_motion_guidance: float = 2.0
    window: int = 25  # n_sample_frames: also the chunk of the motion encoders and bucket ids
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
    size: int = 512  # width and height of the generated crop
    max_frames: int = 10000  # driving frames used at most (the official frame_num)
    precision: Precision = "fp16"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self):
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {self.precision!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.decode_chunk:
            raise ValueError(f"decode_chunk must be >= 1, got {self.decode_chunk}")
        if not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window), got {self.overlap}")
        if self.size % 64:
            raise ValueError(f"size must be a multiple of 64 (the UNet downsamples the latent 3 times), got {self.size}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


@dataclass
class Conditioning:
    """Per-video constants of the denoising loop (batch of one; guidance branches are built per call)."""
    appearance: torch.Tensor  # (64, 1024) tokens
    image_latent: torch.Tensor  # (4, h, w) unscaled VAE mean
    ref_latent: torch.Tensor  # (4, h, w) scaled VAE mean (i2i init)
    motion: torch.Tensor  # (T, 64, 1024) tokens, pad frames included
    pose: torch.Tensor  # (320, h, w): the pose guider's output for the all-black pose image
    added_time_ids: torch.Tensor  # (3,)
    num_pad: int = 0
    extras: dict = field(default_factory=dict)


@torch.no_grad()
def appearance_tokens(nets: Networks, dino_image: torch.Tensor, id_embedding: torch.Tensor, dtype) -> torch.Tensor:
    """(3,224,224) normalised image + (1, 512) identity embedding -> (64, 1024) appearance tokens."""
    device = next(nets.dino.parameters()).device
    tokens = nets.dino(dino_image[None].to(device, dtype), id_embedding.reshape(1, -1).to(device, dtype))
    return nets.image_proj(tokens)[0]


@torch.no_grad()
def motion_tokens(nets: Networks, expression_images: torch.Tensor, pose_images: torch.Tensor,
                  head_bucket: int, exp_bucket: int) -> torch.Tensor:
    """Motion tokens (n, 64, 1024) of one chunk of driving frames, fp32 as in the reference.

    The intensity bucket ids are computed per chunk (25 frames), so the encoders run per chunk too.
    """
    device = next(nets.expression.parameters()).device
    face = expression_images.to(device, torch.float32)
    pose = pose_images.to(device, torch.float32)
    head_id, exp_id = (torch.tensor([i], dtype=torch.int32, device=device) for i in (head_bucket, exp_bucket))
    refined = nets.motion_refiner(nets.expression(face), head_id, exp_id)
    rotation, _ = nets.headpose(pose * 2 + 1)  # the official input scaling: values in [1, 3]
    return assemble_motion_tokens(refined, rotation)


@torch.no_grad()
def pose_map(nets: Networks, height: int, width: int, dtype) -> torch.Tensor:
    """(320, height/8, width/8): the pose guider's output for the all-black pose image of every frame."""
    return nets.pose_guider.constant_features(height, width).to(dtype)


@torch.no_grad()
def build_conditioning(nets: Networks, config: AnimateConfig, *, ref_image: torch.Tensor,
                       dino_image: torch.Tensor, id_embedding: torch.Tensor, motion: torch.Tensor,
                       generator: torch.Generator) -> Conditioning:
    """ref_image (3,H,W) in [-1,1]; motion (N,64,1024) fp32 from `motion_tokens`."""
    dtype, device = config.dtype, config.device
    ref = ref_image[None].to(device, torch.float32)
    if ref.shape[-1] != config.size:
        ref = torch.nn.functional.interpolate(ref, size=(config.size, config.size), mode="bilinear",
                                              antialias=True, align_corners=False)
    mean = encode_image(nets.vae, ref)
    ref_latent = mean * VAE_SCALE
    # Drawn even when the strength is 0: it moves the RNG exactly as the reference does.
    aug = torch.randn(ref.shape, generator=generator, device=device, dtype=torch.float32)
    # With no augmentation the reference encodes the same image twice: reuse the first result.
    image_latent = mean if config.noise_aug_strength == 0 else encode_image(
        nets.vae, ref + config.noise_aug_strength * aug)
    _, _, height, width = ref.shape
    return Conditioning(
        appearance=appearance_tokens(nets, dino_image, id_embedding, dtype),
        image_latent=image_latent[0].to(dtype),
        ref_latent=ref_latent[0].to(dtype),
        motion=pad_motion_tokens(motion.to(device), config.pad_frames).to(dtype),
        pose=pose_map(nets, height, width, dtype).to(device),
        added_time_ids=torch.tensor([config.fps_condition, config.motion_bucket_id, config.noise_aug_strength],
                                    dtype=dtype, device=device),
        num_pad=config.pad_frames,
    )


UNetCall = Callable[..., torch.Tensor]


def guided_denoiser(unet: UNetCall, cond: Conditioning, sigmas: torch.Tensor, config: AnimateConfig):
    """The reference denoiser: one UNet batch with the three guidance branches per window.

    Branches: 0 no appearance, no motion; 1 appearance only; 2 appearance and motion.
    """
    steps = len(sigmas) - 1
    g_app = guidance_ramp(config.min_appearance_guidance, config.max_appearance_guidance, steps, cond.motion.dtype)
    g_mot = guidance_ramp(config.min_motion_guidance, config.max_motion_guidance, steps, cond.motion.dtype)
    zeros_tokens = torch.zeros_like(cond.appearance)
    zeros_latent = torch.zeros_like(cond.image_latent)

    def denoise(x: torch.Tensor, step: int, index: torch.Tensor) -> torch.Tensor:
        frames = x.shape[0]
        sigma = sigmas[step]
        x_in = scale_input(x, sigma)[None].expand(3, *x.shape)
        image = torch.stack([zeros_latent, cond.image_latent, cond.image_latent])[:, None].expand(3, frames, -1, -1, -1)
        appearance = torch.stack([zeros_tokens, cond.appearance, cond.appearance])[:, None].expand(3, frames, -1, -1)
        motion = cond.motion.index_select(0, index)
        motion = torch.stack([torch.zeros_like(motion), torch.zeros_like(motion), motion])
        pose = cond.pose[None, None].expand(3, frames, -1, -1, -1)
        v = unet(torch.cat([x_in, image], dim=2), c_noise(sigma), appearance, motion, pose,
                 cond.added_time_ids[None].expand(3, -1))
        uncond, drop, full = v.chunk(3)
        return combine_guidance(uncond[0], drop[0], full[0], g_app[step], g_mot[step])

    return denoise


@torch.no_grad()
def sample_latents(nets: Networks, cond: Conditioning, config: AnimateConfig, generator: torch.Generator,
                   callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Whole-clip latents (T, 4, h, w) after the reference sampler."""
    sigmas_all = karras_sigmas(config.num_steps, config.sigma_min, config.sigma_max).to(config.device)
    sigmas = sigmas_all[i2i_start_index(config.num_steps, config.i2i_strength):]
    num_frames = cond.motion.shape[0]
    noise = torch.randn((1, num_frames, *cond.ref_latent.shape), generator=generator, device=config.device,
                        dtype=config.dtype)[0]
    x = cond.ref_latent[None] + noise * sigmas[0].to(config.dtype)
    denoise = guided_denoiser(nets.unet, cond, sigmas, config)
    return sample_euler_windows(denoise, x, sigmas, window=config.window, overlap=config.overlap,
                                shift_offset=config.shift_offset, callback=callback)


def place_networks(nets: Networks, config: AnimateConfig) -> Networks:
    """Device, dtypes and grad flags as in the reference; motion networks and VAE encoder stay fp32."""
    for name, module in nets.modules().items():
        if name == "vae":
            place_vae(module, config.device, config.dtype)
        else:
            fp32 = name in ("expression", "headpose", "motion_refiner")
            module.to(config.device, torch.float32 if fp32 else config.dtype)
        # The reference leaves requires_grad on (but for the two motion encoders). The flag picks the
        # matmul path of a Linear on a strided input (one folded mm when the weight requires grad, else a
        # bmm), and in fp16 the two round differently. Inference runs under no_grad: no graph is recorded.
        module.requires_grad_(name not in ("expression", "headpose"))
    return nets


@torch.no_grad()
def decode_frames(nets: Networks, latents: torch.Tensor, config: AnimateConfig,
                  num_pad: int) -> Iterator[np.ndarray]:
    """Decoded (H, W, 3) uint8 RGB frames, pad frames dropped, streamed chunk by chunk."""
    total = latents.shape[0]
    index = 0
    for chunk in decode_latents(nets.vae, latents, config.decode_chunk):
        pixels = (chunk * 0.5 + 0.5).clamp(0, 1)
        # truncation, not rounding, as the reference's (x * 255).astype(uint8)
        frames = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8)
        for frame in frames:
            if num_pad <= index < total - num_pad:
                yield frame
            index += 1
