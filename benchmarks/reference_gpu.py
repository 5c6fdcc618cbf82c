"""The reference pipeline at the official size on a GPU: stage timings and fp16-vs-fp32 agreement.

Random weights at the official size (no checkpoints are needed for speed; outputs are noise, so the
fp16/fp32 comparison measures arithmetic drift through 25 steps of a random network, an upper bound on
what trained weights show). Writes a JSON report.

    python -m benchmarks.reference_gpu --image IMG --video VID --out report.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hyportrait.benchmarks.bench import cuda_ms, report_header
from hyportrait.engines.quality import psnr
from hyportrait.export.face_detector import MTCNNDetector
from hyportrait.export.weights import random_networks
from hyportrait.runtime.api import load_image
from hyportrait.runtime.models import torch_models
from hyportrait.runtime.pipeline import (
    AnimateConfig,
    build_conditioning,
    decode_frames,
    motion_tokens,
    sample_latents,
)
from hyportrait.runtime.preprocess import DrivingPreprocessor, preprocess_source
from hyportrait.runtime.video import read_frames


@torch.no_grad()
def run(image: Path, video: Path, max_frames: int, out: Path) -> dict:
    report = {**report_header(), "python": platform.python_version()}
    nets32 = random_networks("official", seed=0)
    detector = MTCNNDetector(device="cuda")
    source = preprocess_source(load_image(image), detector)
    driving = DrivingPreprocessor(detector)
    chunks = list(driving.chunks(read_frames(video, limit=max_frames)))
    results = {}
    for precision in ("fp32", "fp16"):  # fp32 first: the networks are cast in place
        config = AnimateConfig(precision=precision, device="cuda", max_frames=max_frames)
        models = torch_models(nets32, device="cuda", dtype=config.dtype, size=config.size)
        nets = nets32
        motion = torch.cat([motion_tokens(models, torch.from_numpy(c.expression_images), torch.from_numpy(c.pose_images),
                                          c.head_bucket, c.exp_bucket) for c in chunks])
        generator = torch.Generator("cuda").manual_seed(config.seed)
        cond = build_conditioning(models, config, ref_image=torch.from_numpy(source.ref_image),
                                  dino_image=torch.from_numpy(source.dino_image),
                                  id_embedding=torch.zeros(1, 512), motion=motion, generator=generator)
        torch.cuda.synchronize()
        tic = time.perf_counter()
        latents = sample_latents(models, cond, config, generator)
        torch.cuda.synchronize()
        denoise_s = time.perf_counter() - tic
        tic = time.perf_counter()
        frames = np.stack(list(decode_frames(models, latents, config, cond.num_pad)))
        decode_s = time.perf_counter() - tic
        results[precision] = frames
        dtype = config.dtype
        x = torch.randn(3, 25, 8, 64, 64, device="cuda", dtype=dtype)
        tokens = torch.randn(3, 25, 64, 1024, device="cuda", dtype=dtype)
        pose = cond.pose[None, None].expand(3, 25, -1, -1, -1)
        ids = cond.added_time_ids[None].expand(3, -1)
        t = torch.tensor(0.5, device="cuda")
        lat8 = torch.randn(8, 4, 64, 64, device="cuda", dtype=dtype)
        # each lambda is timed before the loop moves on, so late binding of the loop variables is harmless
        report[precision] = {
            "unet_b3_ms": cuda_ms(lambda: nets.unet(x, t, tokens, tokens, pose, ids)),  # noqa: B023
            "unet_b1_ms": cuda_ms(lambda: nets.unet(x[:1], t, tokens[:1], tokens[:1], pose[:1], ids[:1])),  # noqa: B023
            "vae_decode_8_frames_ms": cuda_ms(lambda: nets.vae.decode(lat8, num_frames=8).sample),  # noqa: B023
            "denoise_s": denoise_s, "decode_s": decode_s, "frames": int(frames.shape[0]),
            "unet_calls": int(config.num_steps * math.ceil(cond.motion.shape[0] / (config.window - config.overlap))),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        torch.cuda.reset_peak_memory_stats()
        print(precision, report[precision], flush=True)
    report["psnr_fp16_vs_fp32_db"] = psnr(results["fp16"], results["fp32"], data_range=255)
    report["max_frames"] = max_frames
    out.write_text(json.dumps(report, indent=2))
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--video", type=Path, required=True)
    p.add_argument("--max-frames", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    print(json.dumps(run(a.image, a.video, a.max_frames, a.out), indent=2))


if __name__ == "__main__":
    main()
