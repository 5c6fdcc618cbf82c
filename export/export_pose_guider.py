"""The pose guider for export: the general per-frame encoder, and its folded constant map.

pose_guider: pose_images (N, 3, H, W) -> pose_features (N, C0, H/8, W/8), each frame on its own; N, H, W
    dynamic. This is the general path, for pose images other than the official all-black ones.
pose_constant.npy: (C0, H/8, W/8) float32, the output for the all-black image at the generated crop size.
    The official preprocessing always produces all-black pose frames, so the runtime feeds this map to the
    UNet's `pose_map` input and never runs the pose guider.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hyportrait.files import atomic_path, sha256_file
from hyportrait.networks.contract import CROP_SIZE, MODELS
from hyportrait.networks.pose_guider import PoseFrameEncoder
from hyportrait.networks.weights import CHECKPOINTS, Networks

from .onnx_io import ExportSpec

POSE_SOURCE = next(spec.path for spec in CHECKPOINTS if spec.name == "pose_guider")
POSE_CONSTANT_FILE = "pose_constant.npy"


def pose_guider_spec(nets: Networks, image_size: int = 64, seed: int = 0) -> ExportSpec:
    gen = torch.Generator().manual_seed(seed)
    channels = nets.pose_guider.config.conditioning_channels

    def images(frames: int, height: int, width: int) -> torch.Tensor:
        return torch.rand(frames, channels, height, width, generator=gen) * 2 - 1

    return ExportSpec.of(MODELS["pose_guider"], PoseFrameEncoder(nets.pose_guider).eval(),
                         {"pose_images": images(2, image_size, image_size)}, sources=(POSE_SOURCE,),
                         extra_inputs=[{"pose_images": images(3, image_size + 16, image_size - 8)}])


def write_pose_constant(nets: Networks, out_dir: Path, size: int = CROP_SIZE) -> dict:
    """Write the all-black map at `size` x `size` (fp32, written atomically); returns its manifest entry."""
    constant = nets.pose_guider.constant_features(size, size).float().cpu().numpy()
    path = Path(out_dir) / POSE_CONSTANT_FILE
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, constant)
    return {"file": POSE_CONSTANT_FILE, "dtype": "float32", "shape": list(constant.shape),
            "image_size": [size, size], "input": "all-black pose image (the official preprocessing's)",
            "feeds": "unet input pose_map", "sha256": sha256_file(path), "sources": [POSE_SOURCE]}
