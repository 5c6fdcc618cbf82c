"""Distillation on the GPU, every measurement in one run (< 9 minutes on a 2-GPU H200 host):

    python -m hyportrait.benchmarks.distill_gpu --out DIR [--size official|tiny] [--parts toy one two]

toy  the larger toy proof (16x16 latents, 8 frames; distill/toy.py): teacher, student, controls, the table
     (DIR/toy/table.json) and the side-by-side frames (DIR/toy/frames.png)
one  the official-size UNet (networks' default config, ~1.5 B parameters, random weights), 25 frames, 64x64
     latents, LoRA rank 64, checkpointing, bf16 autocast: distill-mode step time, samples/s and peak memory
     at batch 1 on one GPU, then the largest batch that fits (1, 2, 4, ...)
two  the same through torchrun + DistributedDataParallel, batch 1 per GPU, on 1 GPU and on 2 (the script
     launches torchrun for each, so both run in the same kind of process): samples/s, the scaling factor of
     2 GPUs over 1 (target >= 1.8), and whether the ranks end with the same adapter (they only do when DDP
     averaged the gradients of their different examples)
--accumulate N  micro-batches per optimizer step in every run (default 1; DDP syncs only on the last)
DIR/report.json holds every number with the device, date, commit and command; a short table is printed last.
--size tiny dry-runs the same code on the CPU in seconds (tiny networks, a few steps, 2 gloo processes; no
largest batch, no 1-rank torchrun, so no scaling factor).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from hyportrait.benchmarks.bench import report_header
from hyportrait.distill import toy
from hyportrait.distill.random_run import random_data, train_random


def measure(size: str, data: Path, run: Path, batch: int, accumulate: int = 1) -> dict:
    """Step time (median after the first step), samples/s and peak memory of a distill run on this process's
    GPU(s); under torchrun every rank runs it and rank 0 reports, with whether the ranks' adapters agree."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    unet = train_random(size, data, run, batch=batch, accumulate=accumulate)
    seconds = [float(r.split(",")[3]) for r in (run / "log.csv").read_text().splitlines()[1:] if r.split(",")[3]]
    step = statistics.median(seconds[2:] or seconds)  # DDP builds its buckets in step 1 and rebuilds them in 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"batch_per_gpu": batch, "accumulate": accumulate, "gpus": world, "step_s": step,
            "samples_per_s": batch * accumulate * world / step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "parameters": sum(p.numel() for p in unet.parameters()), "ranks_agree": ranks_agree(unet),
            # trained: peft starts every lora_B at zero (agreeing ranks that never moved would prove nothing)
            "adapter_moved": any(bool(p.any()) for name, p in unet.named_parameters() if "lora_B" in name)}


def ranks_agree(unet) -> bool | None:
    """Whether every rank holds rank 0's trained adapter, value for value (None in a single process)."""
    if not dist.is_initialized():
        return None
    mine = torch.cat([p.detach().flatten() for name, p in unet.named_parameters() if "lora" in name])
    first = mine.clone()
    dist.broadcast(first, 0)
    agree = torch.tensor([float(torch.equal(mine, first))], device=mine.device)
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item())


def largest_batch(size: str, data: Path, out: Path, accumulate: int) -> tuple[int, list[dict]]:
    fits, results = 0, []
    for batch in (2, 4, 8):
        try:
            results.append(measure(size, data, out / f"batch{batch}", batch, accumulate))
            fits = batch
        except torch.OutOfMemoryError:
            results.append({"batch_per_gpu": batch, "error": "out of memory"})
            break
        finally:
            torch.cuda.empty_cache()
    return fits, results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", choices=["official", "tiny"], default="official")
    parser.add_argument("--parts", nargs="+", choices=["toy", "one", "two"], default=["toy", "one", "two"])
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun rank: measure, write JSON
    args = parser.parse_args(argv)
    if args.accumulate < 1:
        parser.error(f"--accumulate must be at least 1, got {args.accumulate}")
    if args.size != "tiny" and not torch.cuda.is_available():
        parser.error("no GPU: only --size tiny runs on the CPU")
    out = args.out
    data = out / f"data-{args.size}"
    if args.worker:
        result = measure(args.size, data, out / f"ddp-run-{os.environ.get('WORLD_SIZE', '1')}", 1, args.accumulate)
        if int(os.environ.get("RANK", "0")) == 0:
            args.worker.write_text(json.dumps(result))
        return
    out.mkdir(parents=True, exist_ok=True)
    report = {**report_header(), "command": " ".join(sys.argv), "size": args.size}
    tic = time.perf_counter()
    if "toy" in args.parts:
        size = toy.SIZES["gpu"]
        if args.size == "tiny":  # the same code in seconds: few steps, few clips
            size = replace(toy.SIZES["cpu"], train_clips=8, eval_clips=2,
                           teacher=replace(size.teacher, steps=2, batch=2),
                           student=replace(size.student, steps=1, batch=2, rank=4))
        report["toy"] = toy.run_toy(out / "toy", size)
    if "one" in args.parts or "two" in args.parts:
        random_data(data, args.size)
    if "one" in args.parts:
        report["one_gpu"] = measure(args.size, data, out / "one", 1, args.accumulate)
        if args.size != "tiny":  # the dry run's CPU has no memory limit to find
            report["largest_batch"], report["batches"] = largest_batch(args.size, data, out, args.accumulate)
    if "two" in args.parts:
        # the dry run leaves out the 1-rank torchrun (the same code; each rank's interpreter start and imports
        # cost a CPU 10 s)
        for gpus, key in ((1, "torchrun_one_gpu"), (2, "two_gpus"))[args.size == "tiny":]:
            result = out / f"ddp-{gpus}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                       "-m", "hyportrait.benchmarks.distill_gpu", "--out", str(out), "--size", args.size,
                       "--accumulate", str(args.accumulate), "--worker", str(result)]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            report[key] = json.loads(result.read_text())
        if "torchrun_one_gpu" in report:
            report["scaling"] = report["two_gpus"]["samples_per_s"] / report["torchrun_one_gpu"]["samples_per_s"]
    report["seconds"] = time.perf_counter() - tic
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out / 'report.json'}")
    if "toy" in report:
        print(f"toy verdict: {'PASS' if report['toy']['verdict'] else 'FAIL'}")
    for key in ("one_gpu", "torchrun_one_gpu", "two_gpus"):
        if key in report:
            r = report[key]
            peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
            print(f"{key:16s} step {r['step_s']:.3f} s  {r['samples_per_s']:.2f} samples/s  peak {peak}")
    if "largest_batch" in report:
        print(f"largest batch on one GPU: {report['largest_batch']}")
    if "scaling" in report:
        print(f"2-GPU scaling: {report['scaling']:.2f}x (target >= 1.8)")
    if "two_gpus" in report:
        print(f"the 2 ranks' adapters {'agree' if report['two_gpus']['ranks_agree'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
