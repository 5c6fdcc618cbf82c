"""The segmented schedule's seam on a trained model: the distillation toy's student (issue 15 asks for the seam on
the trained toy where it exists; random weights show only the mechanics).

    python -m hyportrait.benchmarks.seam_toy --toy DIR --out DIR [--size cpu] [--frames 32] [--clips 8]

DIR is a finished `hyportrait distill toy --out DIR` run (its teacher and its student's LoRA). Held-out moving-
shape clips of --frames frames (the toy's networks were trained on clips of the size's frames: the runtime's
windows of that many frames cover the long clip) are sampled by the runtime's own `sample_segments` with the
student in fast mode (Euler over the phase edges, no guidance): segments of two windows against the whole clip
(the official circular windows), from the same noise, and the same segments after a short first segment (half a
window, `first_segment`: the UNet at fewer frames). Reported: frame-to-frame change across seams and inside
segments (`stream_gpu.seam_report`), the segmented latents' difference from the whole clip's, and the shape's
position error for both (is the seam visible in what the conditions drive?). Writes DIR/seam_toy.json and
prints a line last. About 4.5 minutes on a (loaded) 2-core CPU at the defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from hyportrait.distill import toy
from hyportrait.networks.unet import UNetWithPoseMap
from hyportrait.runtime.pipeline import AnimateConfig, Conditioning, sample_segments

from .bench import report_header
from .stream_gpu import seam_report


def student_config(size: toy.ToySize, segment: int) -> AnimateConfig:
    """The runtime's fast mode for a K-phase student (`--sampler euler --steps K`, one guidance branch) on the
    toy's window."""
    window = size.frames
    return replace(AnimateConfig(), sampler="euler", num_steps=size.student.phases, guidance_branches=1,
                   window=window, overlap=1, shift_offset=1, pad_frames=1, segment=segment)


def sample(unet, task: toy.Task, example: dict, config: AnimateConfig, seed: int) -> torch.Tensor:
    a = AnimateConfig()
    cond = Conditioning(appearance=example["appearance"], image_latent=example["image_latent"],
                        ref_latent=torch.zeros_like(example["image_latent"]), motion=None, pose=task.pose_map,
                        added_time_ids=torch.tensor([a.fps_condition, a.motion_bucket_id, a.noise_aug_strength]))
    models = SimpleNamespace(unet=UNetWithPoseMap(unet), dtype=torch.float32, device=torch.device("cpu"))
    motion = example["motion"].split(config.window)  # chunks, as the motion encoders make them
    out = [latents[real] for latents, real in sample_segments(models, cond, config,
                                                              torch.Generator().manual_seed(seed), motion)]
    return torch.cat(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", type=Path, required=True, help="a finished `hyportrait distill toy --out` folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=list(toy.SIZES), default="cpu", help="the toy's size (as it was run)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--clips", type=int, default=8)
    a = p.parse_args(argv)
    size = toy.SIZES[a.size]
    teacher = a.toy / toy.TEACHER
    unet = toy.merged_student(size, teacher, a.toy / "student" / "lora").set_engine_rewrites(True).eval()
    task = toy.Task(replace(size, frames=a.frames))  # the same colours, tokens and pose map, longer clips
    clips = task.clips(a.clips, seed=3)  # held out: neither the training (1) nor the table's (2) seed
    segmented = student_config(size, 2 * size.frames)
    # a short first segment (half a window: the UNet at fewer frames than it was trained on) and its seam
    configs = {"segmented": segmented, "whole clip": student_config(size, 0),
               "short first segment": replace(segmented, first_segment=max(2, size.frames // 2))}
    runs = {name: [] for name in configs}
    with torch.no_grad():
        for i, (example, _, _) in enumerate(clips):
            for name, config in configs.items():
                runs[name].append(sample(unet, task, example, config, seed=i))
    pos = torch.stack([c[1] for c in clips])
    kinds = [c[2] for c in clips]
    report = {**report_header(), "command": " ".join(sys.argv), "toy": str(a.toy), "size": a.size,
              "frames": a.frames, "clips": a.clips, "window": size.frames,
              "segment": configs["segmented"].segment, "overlap": configs["segmented"].overlap}
    # per clip, then averaged: frames as (F, C, h, w) arrays on the 0-255 scale seam_report's PSNR assumes
    for name, key in (("segmented", "seam"), ("short first segment", "seam_short_first_segment")):
        seams = [seam_report(configs[name], _as_image(s), _as_image(w))
                 for s, w in zip(runs[name], runs["whole clip"])]
        report[key] = {k: float(np.mean([s[k] for s in seams])) for k in (
            "change_across_seams", "change_across_first_seam", "change_inside_segments", "ratio",
            "psnr_vs_whole_clip_db")}
        report[key]["seams_per_clip"] = seams[0]["seams"]
    report["seams_per_clip"] = report["seam"]["seams_per_clip"]
    report["first_segment"] = configs["short first segment"].first_segment
    report["position_error"] = {name: task.position_error(torch.stack(r), pos, kinds) for name, r in runs.items()}
    report["latent_mse_segmented_vs_whole"] = float(
        (torch.stack(runs["segmented"]) - torch.stack(runs["whole clip"])).square().mean())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "seam_toy.json").write_text(json.dumps(report, indent=1))
    s, f = report["seam"], report["seam_short_first_segment"]
    print(f"seam (toy student, {a.clips} clips of {a.frames} frames, segments of {report['segment']}): change "
          f"across {s['change_across_seams']:.4f} / inside {s['change_inside_segments']:.4f} (x{s['ratio']:.2f}); "
          f"{s['psnr_vs_whole_clip_db']:.1f} dB vs whole clip; position error segmented "
          f"{report['position_error']['segmented']:.3f} / whole {report['position_error']['whole clip']:.3f} px; "
          f"first segment of {report['first_segment']}: change across its seam {f['change_across_first_seam']:.4f} "
          f"/ inside {f['change_inside_segments']:.4f}, position error "
          f"{report['position_error']['short first segment']:.3f} px")
    return report


def _as_image(latents: torch.Tensor) -> np.ndarray:
    """Latents (F, 4, h, w), about -1.5..1.5, on a 0-255 scale."""
    return ((latents.float().clamp(-1.5, 1.5) + 1.5) / 3 * 255).numpy()


if __name__ == "__main__":
    main()
