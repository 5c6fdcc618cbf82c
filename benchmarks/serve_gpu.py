"""Service throughput on one GPU: jobs per minute for 10-second clips in compiled fast mode, one service
process against back-to-back CLI runs, and what the job overlap gains.

1. Back-to-back CLI: `hyportrait animate --mode fast --compile --rewrites` on the clip, `--cli-runs` times, each
   a new process that loads the weights and compiles (what every request would pay without the service).
2. One service process (the app and runner of `hyportrait serve`, uvicorn on 127.0.0.1 in this process):
   loaded and compiled once (warm-up), then `--jobs` jobs submitted at once over HTTP, with the overlap (the
   next job prepared while one denoises, written while the next denoises) and then without it.
Networks are random at the official size, saved once as a weights folder (speed does not depend on the
weights); the clip is the bundled driving video looped to `--clip-seconds`. Writes a JSON report (device,
date, commit, command, every number) under --out and prints a table last. `--size tiny` dry-runs the same
code on the CPU (tiny model, a short clip, no compile).

    python -m hyportrait.benchmarks.serve_gpu --out bench-out/            # one H200, < 8 minutes
    python -m hyportrait.benchmarks.serve_gpu --size tiny --out /tmp/x/   # CPU dry run
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hyportrait.benchmarks.bench import report_header
from hyportrait.benchmarks.serve_load import TINY_JOB
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.api import Animator
from hyportrait.runtime.video import VideoWriter, probe_video, read_frames
from hyportrait.serve.app import create_app
from hyportrait.serve.client import Client
from hyportrait.serve.jobs import JobTable
from hyportrait.serve.options import Limits
from hyportrait.serve.runner import LocalRunner
from hyportrait.serve.server import start_in_thread, warm_up

SIZES = {"official": {"clip_seconds": 10.0, "jobs": 4, "cli_runs": 1},
         "tiny": {"clip_seconds": 0.5, "jobs": 2, "cli_runs": 1}}


def make_clip(path: Path, seconds: float) -> int:
    """The bundled driving video looped to `seconds` (at its frame rate); returns the frame count."""
    sample = SAMPLE_VIDEO
    fps = probe_video(sample).fps
    frames = list(read_frames(sample))
    count = round(seconds * fps)
    with VideoWriter(path, fps, preset="veryfast") as writer:
        for index in range(count):
            writer.write(frames[index % len(frames)])
    return count


def cli_run(size: str, weights: Path | None, clip: Path, out: Path) -> float:
    """Wall seconds of one `hyportrait animate` process, start to exit."""
    command = [sys.executable, "-m", "hyportrait", "animate", "--image", str(SAMPLE_IMAGE),
               "--video", str(clip), "--mode", "fast", "--out", str(out), "--quiet"]
    if size == "official":
        command += ["--weights", str(weights), "--compile", "--rewrites"]
    else:  # the built-in tiny model; one step and one frame keep the dry run short
        command += ["--steps", "1", "--max-frames", "1"]
    tic = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tic


def submit_all(url: str, count: int, video: bytes) -> dict:
    """`count` jobs submitted at once; wall seconds until the last ended, and each one's latency and timings."""
    image = SAMPLE_IMAGE.read_bytes()

    def one(_):
        client = Client(url, timeout=120)
        tic = time.perf_counter()
        response = client.submit(image, video, {})
        assert response.status_code == 202, response.text
        job = client.wait(response.json()["id"], seconds=900, poll=0.05)
        assert job["status"] == "done", job
        return time.perf_counter() - tic, job["timings"]

    tic = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - tic
    stages = ("preprocess", "conditioning", "denoise", "decode_encode", "run")
    return {"wall_s": round(wall, 2), "jobs_per_minute": round(60 * count / wall, 2),
            "latency_p50_s": round(statistics.median(r[0] for r in results), 2),
            "mean_stage_s": {k: round(statistics.mean(r[1][k] for r in results), 3) for k in stages}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="official")
    p.add_argument("--out", type=Path, required=True, help="folder of the report (and the clip and weights)")
    p.add_argument("--jobs", type=int, help="jobs per service run (default 4; tiny 2)")
    p.add_argument("--cli-runs", type=int, help="back-to-back CLI runs (default 1; 0: none, the service only)")
    p.add_argument("--clip-seconds", type=float, help="driving clip length (default 10; tiny 0.5)")
    a = p.parse_args(argv)
    if a.size == "official" and not torch.cuda.is_available():
        p.error("no GPU: only --size tiny runs on the CPU")
    settings = {**SIZES[a.size], **{k: v for k, v in (("jobs", a.jobs), ("cli_runs", a.cli_runs),
                                                        ("clip_seconds", a.clip_seconds)) if v is not None}}
    a.out.mkdir(parents=True, exist_ok=True)
    clip = a.out / "clip.mp4"
    frames = make_clip(clip, settings["clip_seconds"])
    weights = None
    if a.size == "official":  # random official-size networks, written once as a weights folder
        from hyportrait.networks.weights import random_networks, save_networks

        weights = a.out / "random_weights"
        if not (weights / "hyportrait" / "unet.pth").exists():
            save_networks(random_networks("official", seed=0), weights)
    report = {**report_header(), "command": "python -m hyportrait.benchmarks.serve_gpu " + " ".join(argv or sys.argv[1:]),
              "size": a.size, "clip_frames": frames, "clip_seconds": settings["clip_seconds"]}

    work = Path(tempfile.mkdtemp(prefix="hyportrait-serve-gpu-"))
    try:
        if cli := [cli_run(a.size, weights, clip, work / "cli") for _ in range(settings["cli_runs"])]:
            report["cli"] = {"runs_s": [round(s, 2) for s in cli],
                             "jobs_per_minute": round(60 / statistics.mean(cli), 2)}

        tic = time.perf_counter()
        animator = (Animator(weights=weights, mode="fast", compile=True, faithful=False) if a.size == "official"
                    else Animator(**TINY_JOB))
        limits = Limits(queue_size=settings["jobs"], max_frames=max(frames, 1))
        table = JobTable(work / "jobs", limits)
        runner = LocalRunner(animator, table, limits)
        server, url, thread = start_in_thread(create_app(runner, table, limits, "fast"), runner)
        try:
            warm_up(runner, table)
            report["service_ready_s"] = round(time.perf_counter() - tic, 2)  # load + compile + warm-up job
            video = clip.read_bytes()
            report["service_overlap"] = submit_all(url, settings["jobs"], video)
            runner.overlap = False
            report["service_serial"] = submit_all(url, settings["jobs"], video)
        finally:
            server.should_exit = True
            thread.join(timeout=60)
        if torch.cuda.is_available():
            report["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    overlap, serial = report["service_overlap"]["jobs_per_minute"], report["service_serial"]["jobs_per_minute"]
    report["overlap_gain"] = round(overlap / serial, 3)
    cli_rate = report["cli"]["jobs_per_minute"] if "cli" in report else None
    report["service_vs_cli"] = round(overlap / cli_rate, 2) if cli_rate else None
    path = a.out / f"serve_gpu_{a.size}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    print(f"{'clip frames':>11} {'CLI jobs/min':>12} {'service ready s':>15} {'serial jobs/min':>15} "
          f"{'overlap jobs/min':>16} {'overlap gain':>12} {'vs CLI':>7}")
    print(f"{frames:>11} {cli_rate or '-':>12} {report['service_ready_s']:>15} {serial:>15} "
          f"{overlap:>16} {report['overlap_gain']:>12} {report['service_vs_cli'] or '-':>7}")
    return report


if __name__ == "__main__":
    main()
