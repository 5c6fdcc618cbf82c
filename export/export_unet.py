"""The denoising UNet for export: flat tensor inputs, the engine rewrites on, the constants kept small.

Engine inputs (B = guidance batch, dynamic; F frames and h x w latent size fixed per engine):
    sample            (B, F, 8, h, w)      scaled noisy latent ++ conditioning image latent
    timestep          (1,) fp32            c_noise of the step: one value for the whole batch, as the
                                           guidance branches always share their step
    appearance_tokens (B, 64, 1024)        the video's appearance tokens, shared by all frames (the pipeline's
                                           are), so their K/V are projected once per batch item
    motion_tokens     (B, F, 64, 1024)
    pose_map          (C0, h, w)           the pose guider's constant map, broadcast to every frame and batch
                                           item in the graph (2.6 MB instead of 197 MB of copies per call)
    added_time_ids    (B, 3) fp32          [fps, motion bucket, noise augmentation]
Output: v_prediction (B, F, 4, h, w).
`shared_appearance=False` / `pose_map=False` give the per-frame forms, appearance_tokens (B, F, 64, 1024)
and pose_features (B, F, C0, h, w), for callers whose conditioning varies over frames.
"""
from __future__ import annotations

import torch

from hyportrait.networks.contract import LATENT_SIZE, MODELS, TOKENS
from hyportrait.networks.unet import UNetWithAdapters, UNetWithPoseMap, weight_sharing_copy
from hyportrait.networks.weights import CHECKPOINTS, Networks

from .onnx_io import ExportSpec


def unet_spec(nets: Networks, dedup: bool = True, batch: int = 3, frames: int | None = None,
              latent_size: int | None = None, pose_map: bool = True, shared_appearance: bool = True,
              seed: int = 0, onnxruntime_attention: bool = False) -> ExportSpec:
    """The "unet" model: batch dynamic (exported at `batch`, also validated at 1, or 2 when `batch` is 1),
    frames and latent size fixed.

    dedup: export with the engine rewrites (`UNetWithAdapters.set_engine_rewrites`), which leave the
    result unchanged up to float rounding; `nets.unet` itself is not modified (the exported module is a
    copy sharing its weights, so a LoRA merged into `nets.unet`, before or after, is exported). frames and
    latent_size default to the UNet's window (25 at official size) and the 512x512 crop's latent (64).
    The export trace runs the attention unfused: at official size the level-0 self-attention scores take
    8.4 GB (fp32) per batch item, so export full size on a GPU with a small `batch`.
    onnxruntime_attention: attention as onnxruntime's fused MultiHeadAttention op (needs dedup), for the
    onnxruntime backend; onnxruntime cannot allocate the unfused chain's scores at the official size.
    """
    unet: UNetWithAdapters = nets.unet
    config = unet.unet_config
    frames = frames or config.num_frames
    size = latent_size or LATENT_SIZE[nets.size]
    if size % 8:
        raise ValueError(f"latent_size must be a multiple of 8 (the UNet downsamples 3 times), got {size}")
    engine_unet = weight_sharing_copy(unet).set_engine_rewrites(dedup, onnxruntime_attention).eval()
    module = UNetWithPoseMap(engine_unet) if pose_map else engine_unet
    pose_name = "pose_map" if pose_map else "pose_features"
    pose_channels, width = config.block_out_channels[0], config.cross_attention_dim
    gen = torch.Generator().manual_seed(seed)

    def inputs(b: int) -> dict[str, torch.Tensor]:
        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=gen)

        time_ids = torch.stack([  # the pipeline's ranges: fps, motion bucket 0..255, noise augmentation
            torch.empty(b).uniform_(5.0, 30.0, generator=gen),
            torch.randint(0, 256, (b,), generator=gen).float(),
            torch.empty(b).uniform_(0.0, 0.1, generator=gen),
        ], dim=1)
        return {  # in the order of the forward's parameters
            "sample": randn(b, frames, config.in_channels, size, size),
            # c_noise = log(sigma)/4 over sigma in [0.002, 700]
            "timestep": torch.empty(1).uniform_(-1.55, 1.64, generator=gen),
            "appearance_tokens": randn(b, TOKENS, width) if shared_appearance else randn(b, frames, TOKENS, width),
            "motion_tokens": randn(b, frames, TOKENS, width),
            pose_name: randn(pose_channels, size, size) if pose_map else randn(b, frames, pose_channels, size, size),
            "added_time_ids": time_ids,
        }

    paths = {spec.name: spec.path for spec in CHECKPOINTS}
    rest = {"sources": (paths["unet"],), "extra_inputs": [inputs(1)] if batch != 1 else [inputs(2)]}
    if pose_map and shared_appearance:  # the engine contract
        return ExportSpec.of(MODELS["unet"], module, inputs(batch), **rest)
    batched = ["sample", "appearance_tokens", "motion_tokens", "added_time_ids", "v_prediction"]
    batched += [] if pose_map else ["pose_features"]
    contract = MODELS["unet"]
    return ExportSpec(
        name="unet", module=module, inputs=inputs(batch), outputs=list(contract.output_names),
        dynamic_axes={name: {0: "batch"} for name in batched}, fp32_inputs=contract.fp32_inputs, **rest)
