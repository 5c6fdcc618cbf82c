"""Several GPUs for one video (runtime/distributed.py): the speed-up of window- and guidance-parallel sampling.

    python -m hyportrait.benchmarks.multigpu_gpu --out DIR [--gpus N] [--image IMG --video VID]
    python -m hyportrait.benchmarks.multigpu_gpu --size tiny --out DIR    (a dry run: CPU, gloo, seconds)

One run of N workers (NCCL; NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for them), each
with random networks at the official size on its GPU (torch, engine rewrites, fp16, CUDA graphs; with
--compile also torch.compile'd: each rank compiles its shapes in an untimed run first). For each GPU count
k = 1..N (the first k ranks work, the others wait) and each of --modes:
- long video: a clip of --long-frames driving frames (default 234: with the 2 x 15 pad frames 264 latents, 12
  windows per step, an even split over 1, 2, 3 and 4 GPUs), in quality mode (3 guidance branches) with the
  window and the guidance scheme, in fast mode (LCM, 1 branch) with the window scheme. --steps steps are
  sampled (default 3; the first, which captures the CUDA graphs, is not timed) and the clip decoded (split
  by chunks); output fps = frames / (25 or 4 x the time of a step + the decode), the GPU stages of a whole
  run (preprocessing and encoding happen on rank 0, before and overlapped). Full-size quality mode runs
  about 2-3 fps on one GPU, so a 25-step run of this clip alone would take 1.5 minutes per configuration.
- the PSNR of the decoded frames against k = 1 (same steps, same noise): the window scheme is exact
  (+inf), the guidance scheme runs the UNet at smaller batches (rounding may differ in fp16).
- the demo clip end to end (`Animator.animate`: preprocessing, sampling, decoding and writing both videos)
  on --demo-frames frames of --video, quality mode at 25 steps and fast mode, on 1 GPU and on N with the
  --demo-scheme (default window).
Writes DIR/multigpu.json (device, date, commit, command, every number) and DIR/multigpu_speedup.png (speed-up
against GPU count), and prints a table last. About 5 minutes on 2 H200s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hyportrait.engines.quality import psnr
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.weights import random_networks
from hyportrait.runtime import distributed
from hyportrait.runtime.api import Animator, Prepared
from hyportrait.runtime.distributed import GuidanceParallelUNet, ParallelAnimator
from hyportrait.runtime.models import ModelOptions, load_models
from hyportrait.runtime.pipeline import FAST_MODE, AnimateConfig, build_conditioning, sample_latents

from .bench import report_header

# what each size changes from the official config; tiny: the small test networks on the CPU, 64 px crops
SIZES = {
    "official": {"config": {}, "long_frames": 234, "steps": 3, "demo_frames": 120, "demo_steps": None},
    "tiny": {"config": {"size": 64, "window": 4, "overlap": 1, "pad_frames": 1, "decode_chunk": 2},
             "long_frames": 5, "steps": 2, "demo_frames": 2, "demo_steps": 1},
}
MODES = {"quality": ({}, 25), "fast": ({k: v for k, v in FAST_MODE.items() if k != "num_steps"}, 4)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def long_video(models, prepared: Prepared, config: AnimateConfig, group, scheme: str, full_steps: int) -> dict:
    """Sample the clip (per-step wall times on rank 0, the first step untimed) and decode it."""
    chosen = replace(models, unet=GuidanceParallelUNet(models.unet, group)) if scheme == "guidance" else models
    map_windows = distributed.window_parallel(group) if scheme == "window" else None
    generator = torch.Generator(group.device)
    generator.set_state(prepared.generator.get_state())
    marks = []

    def mark(step: int) -> None:
        synchronize(group.device)
        marks.append(time.perf_counter())

    latents = sample_latents(chosen, prepared.conditioning, config, generator, callback=mark,
                             map_windows=map_windows)
    tic = time.perf_counter()
    frames = list(distributed.parallel_decode_frames(models, latents, config.decode_chunk,
                                                     prepared.conditioning.num_pad, group))
    decode_s = time.perf_counter() - tic
    step_s = float(np.mean(np.diff(marks)))
    out = len(frames)
    return {"step_s": step_s, "decode_s": decode_s, "frames": out, "fps": out / (full_steps * step_s + decode_s),
            "decoded": np.stack(frames) if frames else None}


def demo(models, config_options: dict, group, scheme: str | None, image: Path, video: Path) -> dict | None:
    """`animate` end to end on one GPU (group None: today's path) or on the group; rank 0's numbers."""
    with tempfile.TemporaryDirectory() as out:
        if group is None:
            result = Animator(models, **config_options).animate(image, video, out)
        else:
            result = ParallelAnimator(models, group=group, scheme=scheme, **config_options).animate(image, video, out)
    if result is None:
        return None
    return {"frames": result.num_frames, "timings": result.timings, "fps": result.num_frames / result.timings["total"]}


def bench_worker(group, options: dict) -> dict | None:
    size = SIZES[options["size"]]
    dtype = torch.float16 if group.device.type == "cuda" else torch.float32
    base = AnimateConfig(**size["config"], device=str(group.device), precision="fp16" if dtype == torch.float16
                         else "fp32")
    tic = time.perf_counter()
    models = load_models("torch", random_networks(options["size"]), group.device,
                         ModelOptions(precision=base.precision, size=base.size, faithful=False, cuda_graph=True,
                                      compile=options["compile"]))
    report = {"setup_s": time.perf_counter() - tic, "long": {}, "demo": {}}
    counts = list(range(1, group.size + 1))
    groups = group.subgroups(counts)
    # rank 0 makes the long clip's constants once (random motion tokens: speed does not depend on them)
    mine = None
    if group.is_root:
        gen = torch.Generator().manual_seed(0)
        motion = torch.randn(options["long_frames"], 64, 1024, generator=gen)
        generator = torch.Generator(group.device).manual_seed(base.seed)
        cond = build_conditioning(models, base, ref_image=torch.rand(3, base.size, base.size, generator=gen) * 2 - 1,
                                  dino_image=torch.randn(3, 224, 224, generator=gen), id_embedding=torch.zeros(512),
                                  motion=motion, generator=generator)
        mine = Prepared(None, None, cond, generator, options["long_frames"], 0)
    prepared = distributed.share_prepared(group, mine, None)
    modes = {mode: MODES[mode] for mode in options["modes"]}
    for mode, (settings, full_steps) in modes.items():
        config = replace(base, **settings, num_steps=options["steps"])
        schemes = ("window", "guidance") if config.guidance_branches > 1 else ("window",)
        reference = None
        if options["compile"]:  # every rank compiles the UNet and decoder shapes once, outside the timed runs
            long_video(models, prepared, config, group, "window", full_steps)
        for k in counts:
            for scheme in schemes if k > 1 else ("window",):
                if scheme == "guidance" and k > config.guidance_branches:
                    continue
                if groups[k] is not None:
                    run = long_video(models, prepared, config, groups[k], scheme, full_steps)
                    if group.is_root:
                        frames = run.pop("decoded")
                        reference = frames if k == 1 else reference
                        run["psnr_vs_1_gpu_db"] = psnr(frames, reference, data_range=255)
                        run["identical_to_1_gpu"] = bool(np.array_equal(frames, reference))
                        report["long"][f"{mode}/{scheme}/{k}"] = run
                group.barrier()
    for mode, (_, full_steps) in modes.items():
        config_options = {**size["config"], "mode": mode, "num_steps": size["demo_steps"] or full_steps,
                          "max_frames": options["demo_frames"]}
        spread = options["demo_scheme"] if mode == "quality" else "window"  # one branch: windows only
        for k, scheme in ((1, None), (group.size, spread)) if group.size > 1 else ((1, None),):
            if groups[k] is not None:
                run = demo(models, config_options, groups[k] if scheme else None, scheme, options["image"],
                           options["video"])
                if group.is_root:
                    report["demo"][f"{mode}/{scheme or 'window'}/{k}"] = run
            group.barrier()
    return report


def speedups(report: dict) -> dict:
    """fps on k GPUs over fps on one, per mode and scheme, for the long video and the demo clip."""
    out = {}
    for part in ("long", "demo"):
        for key, run in report[part].items():
            mode, scheme, k = key.split("/")
            one = report[part][f"{mode}/window/1"]
            if int(k) > 1:
                out[f"{part}/{mode}/{scheme}/{k}"] = run["fps"] / one["fps"]
    return out


def plot(report: dict, path: Path) -> str:
    """The speed-up chart; what was written (matplotlib is a benchmark dependency, not a runtime one)."""
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = list(range(1, report["gpus"] + 1))
    ax.plot(counts, counts, "k--", label="ideal")
    lines = {}
    for key, value in report["speedup"].items():
        part, mode, scheme, k = key.split("/")
        lines.setdefault(f"{part} {mode} {scheme}", {1: 1.0})[int(k)] = value
    for label, points in lines.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], "o-", label=label)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speed-up over 1 GPU (output fps)")
    ax.set_xticks(counts)
    ax.set_title(f"one video on several GPUs ({report['device']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def table(report: dict) -> str:
    """fps, speed-up, seconds (long video: a whole run extrapolated from the step time; demo: end to end) and
    PSNR against one GPU of every run."""
    rows = [f"{'run':28s} {'fps':>8s} {'speed-up':>9s} {'seconds':>8s} {'PSNR vs 1 GPU dB':>17s}"]
    for part in ("long", "demo"):
        for key, run in report[part].items():
            gain = report["speedup"].get(f"{part}/{key}", 1.0)
            seconds = run["frames"] / run["fps"]
            rows.append(f"{part + ' ' + key:28s} {run['fps']:8.2f} {gain:8.2f}x {seconds:8.1f} "
                        f"{run.get('psnr_vs_1_gpu_db', float('nan')):17.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="multigpu_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for multigpu.json and multigpu_speedup.png")
    p.add_argument("--gpus", type=int, help="GPUs (default: every visible one; 2 processes for --size tiny)")
    p.add_argument("--size", choices=list(SIZES), default="official")
    p.add_argument("--image", type=Path, default=SAMPLE_IMAGE, help="demo portrait")
    p.add_argument("--video", type=Path, default=SAMPLE_VIDEO,
                   help="demo driving video (the official 120-frame clip for the demo numbers)")
    p.add_argument("--demo-frames", type=int, help="driving frames of the demo clip (default 120)")
    p.add_argument("--demo-scheme", choices=list(distributed.SCHEMES), default="window")
    p.add_argument("--long-frames", type=int, help="driving frames of the long clip (default 234)")
    p.add_argument("--steps", type=int, help="steps sampled per long-clip run, the first untimed (default 3)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--compile", action="store_true",
                   help="the compiled torch backend (inductor; each rank compiles its shapes in the untimed step)")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available() and a.size != "tiny"
    if not gpu and a.size != "tiny":
        p.error("no GPU: only --size tiny runs on the CPU")
    gpus = a.gpus or (torch.cuda.device_count() if gpu else 2)
    size = SIZES[a.size]
    options = {"size": a.size, "image": a.image, "video": a.video, "demo_scheme": a.demo_scheme,
               "demo_frames": a.demo_frames or size["demo_frames"], "long_frames": a.long_frames or size["long_frames"],
               "steps": a.steps or size["steps"], "modes": a.modes, "compile": a.compile}
    if options["steps"] < 2:
        p.error("--steps must be >= 2 (the first step is not timed)")
    # this machine's NCCL needs NVLink SHARP and symmetric-memory multicast off, in every worker
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    tic = time.perf_counter()
    result = distributed.launch(bench_worker, gpus, options, device_type="cuda" if gpu else "cpu")
    report = {**report_header(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "gpus": gpus, "options": {k: str(v) for k, v in options.items()}, **result,
              "wall_s": time.perf_counter() - tic}
    report["speedup"] = speedups(report)
    a.out.mkdir(parents=True, exist_ok=True)
    report["plot"] = plot(report, a.out / "multigpu_speedup.png")
    (a.out / "multigpu.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
