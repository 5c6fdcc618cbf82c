"""Distill runs of a random-weight UNet on random examples at the shapes the runtime feeds: what the trainer's
speed and its ranks' agreement under DDP (benchmarks/distill_gpu.py) are measured on; neither depends on the
values."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from hyportrait.networks.unet import UNetConfig, UNetWithAdapters

from .data import write_dataset
from .train import TrainConfig, train

SHAPES = {"official": {"frames": 25, "latent": 64, "unet": UNetConfig(), "pose_channels": 320, "steps": 8},
          "tiny": {"frames": 4, "latent": 8, "unet": UNetConfig.tiny(), "pose_channels": 32, "steps": 3}}
# the benchmark's run: a rank-64 LoRA with checkpointing, no checkpoint written (nothing resumes)
RUN = TrainConfig(mode="distill", rank=64, checkpointing=True, checkpoint_every=10**9)


def random_data(out: Path, size: str, examples: int = 8) -> Path:
    """`examples` random examples at `size`'s shapes in the dataset folder `out` (kept when it exists)."""
    s = SHAPES[size]
    f, h = s["frames"], s["latent"]
    g = torch.Generator().manual_seed(0)

    def example():
        return {"latents": torch.randn(f, 4, h, h, generator=g).half(),
                "image_latent": torch.randn(4, h, h, generator=g).half(),
                "appearance": torch.randn(64, 1024, generator=g).half(),
                "motion": torch.randn(f, 64, 1024, generator=g).half()}

    if (out / "manifest.json").is_file():
        return out
    return write_dataset(((example(), f"random-{i}") for i in range(examples)), out, {"random": size},
                         per_shard=examples)


def train_random(size: str, data: Path, run: Path, **config) -> UNetWithAdapters:
    """Train the UNet of `size` (random weights, the same on every rank: seeded) on `data` (`random_data`) into
    `run`: `RUN` at `size`'s steps, `config` overriding TrainConfig fields. Returns the UNet, its LoRA trained."""
    s = SHAPES[size]
    torch.manual_seed(0)
    unet = UNetWithAdapters(s["unet"])
    train(replace(RUN, **{"steps": s["steps"], **config}), data, run, unet,
          torch.zeros(s["pose_channels"], s["latent"], s["latent"]), weights="random")
    return unet
