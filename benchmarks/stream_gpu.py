"""Long videos and streaming (issue 15) on one GPU: memory against length for the segmented and the whole-clip
schedules, first-frame latency, streaming against file fps, quality mode with segments, and the seam.

    python -m hyportrait.benchmarks.stream_gpu --out DIR [--size official|tiny] [--weights DIR] [--lora FILE]

Networks are random at the official size, fp16, torch backend with the engine rewrites, eager (compiling takes
minutes per shape) except in part 0; `--weights` (and `--lora`, e.g. a trained LCM LoRA or the distillation's toy
model) runs real ones instead, which makes the seam numbers meaningful. Driving input is the bundled sample (36
frames, 24 fps) looped. Plan, sized for < 8 minutes on one H200 for parts 1-4 (about 6 estimated from the H100
stage times: network set-up 1 min, part 1 1.5 min, part 3 3 min, part 4 0.5 min); part 0 adds about 1 minute,
and 3-4 more with a compiled setting (the default: one):
  0. first-frame latency (issue 15's target: <= 0.25 s after the first segment's driving frames; --parts
     first_frame): fast mode with its default first segment (16 frames: the 15 pads and the first real frame's
     decode chunk), the live setup (no pad frames, a first segment of 8; with decode chunks of 4; and a first
     segment of 4) and a first segment of a whole window (25, the behaviour before `first_segment`), each eager
     and with CUDA graphs, and compiled for --compile-configs (default: live; run last, after 1-2, as compiling
     takes minutes). `Animator.stream` until its first frame from a live source that hands over the first
     segment's driving frames (its first motion chunk) and nothing more until that frame is out; the median of
     --repeats runs after one unmeasured run (compiling or capturing the shapes), then one run with each
     network's and the face detector's time, and one with the detector's host profile (cProfile); with --trace
     one more run of each compiled setting under torch.profiler, its Chrome trace (the calling thread's calls and
     every CUDA kernel: the profiler records other threads' calls only when asked) in DIR/trace-<setting>.json.
  1. fast mode (LCM 4 steps, one UNet batch, segments of 25 frames), 192 driving frames (8 s):
     `Animator.stream` from frames in memory: latency of the first output frame after the first motion chunk's
     driving frames were handed over, and steady-state fps (after the first segment); then `Animator.animate`
     on a 192-frame file: streamed (fragmented MP4, --stream), the file path with segments (the fast default)
     and the file path with the whole-clip schedule, end-to-end fps.
  2. the seam, from 1: mean absolute frame-to-frame change across segment seams and inside segments, and the
     difference (PSNR) from the whole-clip schedule's frames on the same input.
  3. memory against length: peak GPU memory (allocated) and peak host RSS of the sampling loop, motion tokens
     made per chunk from the looped, preprocessed sample, sampled and decoded, frames dropped, for both
     schedules (--schedules), 1 LCM step (a step holds the same tensors as every other, so the memory is that
     of 4 steps). Official size at 10 and 40 s (--lengths; at about 22 frames/s 10 minutes at full size would
     take the whole budget); the tiny networks on the same GPU at 1, 3 and 10 minutes (--tiny-lengths; the
     issue allows the tiny model for the longest lengths): GPU and host numbers, plot against length:
     memory.png.
  4. quality mode (3 guidance branches) at 4 steps instead of 25 (fps ratios do not depend on the step count),
     66 driving frames: segments of 25 against the whole clip, fps of sampling and decoding.
--size tiny dry-runs all of it on the tiny networks with short lengths (CPU, well under a minute).
The report (DIR/stream.json: device, date, commit, command, every number) is written after every part; a table
is printed at the end.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import json
import math
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hyportrait.benchmarks.bench import report_header
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.contract import CROP_SIZE
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.api import Animator
from hyportrait.runtime.backends import Models
from hyportrait.runtime.models import ModelOptions, load_models, torch_networks
from hyportrait.runtime.pipeline import AnimateConfig, decode_segments, motion_tokens, sample_segments
from hyportrait.runtime.preprocess import DrivingPreprocessor
from hyportrait.runtime.video import VideoWriter, read_frames

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PARTS = ["first_frame", "stream", "quality", "memory"]
SCHEDULES = ["segmented", "whole clip"]
FPS = 24  # the sample's rate: lengths in seconds are counted at it
# per size: driving frames of parts 1-2, memory lengths in seconds (networks of --size at 1 step, then the tiny
# networks with `tiny_config` at `tiny_steps`), quality mode's frames and steps
PLANS = {
    "official": {"frames": 192, "lengths": (10, 40), "tiny_lengths": (60, 180, 600), "tiny_steps": 1,
                 "quality_frames": 66, "quality_steps": 4, "config": {},
                 "tiny_config": {"size": 64},  # window 25 and 15 pad frames as the official: the same plan
                 # the first-frame latency's settings over fast mode's: its default first segment (16), the live
                 # setup, and the first segment of a whole window (before `first_segment`)
                 "first_frame": {"fast default": {}, "live": {"pad_frames": 0, "first_segment": 8},
                                 # the first frame waits for its decode chunk: smaller ones, and a shorter segment
                                 "live decode 4": {"pad_frames": 0, "first_segment": 8, "decode_chunk": 4},
                                 "live 4": {"pad_frames": 0, "first_segment": 4, "decode_chunk": 4},
                                 "whole window": {"first_segment": 25}}},
    # the dry run's networks are the tiny ones already: no second memory series
    "tiny": {"frames": 6, "lengths": (0.25, 0.5), "tiny_lengths": (), "tiny_steps": 1,
             "quality_frames": 4, "quality_steps": 1,
             "config": {"size": 64, "window": 4, "overlap": 1, "pad_frames": 1, "num_steps": 1, "decode_chunk": 3},
             # two settings keep the dry run short (the code is the same for any number)
             "first_frame": {"live": {"pad_frames": 0, "first_segment": 3}, "whole window": {"first_segment": 4}}},
}
PLANS["tiny"]["tiny_config"] = PLANS["tiny"]["config"]


def synchronize():
    if GPU:
        torch.cuda.synchronize()


def host_rss() -> int:
    """Resident bytes of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@contextmanager
def peak_memory(result: dict):
    """Peak GPU memory allocated and peak host RSS (sampled every 10 ms) while the block runs, into `result`."""
    stop, peak = threading.Event(), [host_rss()]

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], host_rss())

    thread = threading.Thread(target=sample, daemon=True)
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        synchronize()
        result["host_peak_mib"] = max(peak[0], host_rss()) / 2**20
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if GPU else 0.0


def looped_frames(count: int):
    """`count` driving frames: the sample looped, decoded once."""
    sample = list(read_frames(SAMPLE_VIDEO))
    return [sample[i % len(sample)] for i in range(count)]


def write_driving_video(path: Path, count: int) -> Path:
    with VideoWriter(path, FPS, preset="ultrafast") as out:
        for frame in looped_frames(count):
            out.write(frame)
    return path


def networks(a, size: str):
    """The networks, built once: random at `size`, or --weights with --lora merged."""
    return torch_networks(a.weights, a.lora) if a.weights else random_networks(size)


def sessions(a, nets, plan: dict, **options) -> Models:
    """`nets` as the torch backend runs them (engine rewrites, fp16 on a GPU, --weights' face detector);
    `options`: cuda_graph, compile. Every call shares the networks' weights."""
    return load_models("torch", nets, DEVICE, ModelOptions(precision="fp16" if GPU else "fp32", faithful=False,
                                                           size=plan["config"].get("size", CROP_SIZE), **options),
                       weights=a.weights)


def animators(a, nets, plan: dict) -> tuple[Animator, Animator]:
    """Fast and quality mode over the same eager networks (ArcFace from --weights; none: a zero identity)."""
    config = plan["config"]
    fast = Animator(sessions(a, nets, plan), weights=a.weights, mode="fast", **config)
    quality = Animator(fast.models, mode="quality", **{**config, "num_steps": plan["quality_steps"]})
    quality.arcface = fast.arcface
    return fast, quality


def stream_run(animator: Animator, frames: list) -> dict:
    """`Animator.stream` over frames in memory: first-frame latency, steady fps, thumbnails of the output."""
    handed = {}
    window, first = animator.config.window, animator.config.first_chunk_frames

    def source():
        for index, frame in enumerate(frames):
            if index == min(first, len(frames)) - 1:  # the first motion chunk is complete
                handed["first_chunk"] = time.perf_counter()
            yield frame

    times, thumbs = [], []
    start = time.perf_counter()
    for out in animator.stream(SAMPLE_IMAGE, source(), fps=FPS):
        times.append(time.perf_counter())
        thumbs.append(torch.nn.functional.avg_pool2d(torch.from_numpy(out.cropped).permute(2, 0, 1).float(),
                                                     max(out.cropped.shape[0] // 64, 1)).numpy())
    steady = times[window:]
    return {"frames": len(times), "seconds": times[-1] - start,
            "first_frame_after_call_s": times[0] - start,
            "first_frame_after_first_chunk_s": times[0] - handed["first_chunk"],
            "steady_fps": (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else None,
            "thumbs": np.stack(thumbs)}


def clocked(function: Callable, name: str, seconds: dict, first_calls: dict,
            counted: Callable[[float], bool] | None = None):
    """`function` with the seconds of its calls (synchronised around each) added to `seconds[name]` (those whose
    start time is `counted`; default all), and the time of its first call in `first_calls[name]`."""
    def call(*args, **kwargs):
        synchronize()
        tic = time.perf_counter()
        first_calls.setdefault(name, tic)
        out = function(*args, **kwargs)
        synchronize()
        if counted is None or counted(tic):
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - tic
        return out

    return call


def profiled(function: Callable, rows: list, counted: Callable[[float], bool], top: int = 15):
    """`function`, its first `counted` call (by start time) run under cProfile: `rows` gets the `top` functions by
    own time (GPU work shows where the host waits for it: `.cpu()`, synchronisation)."""
    def call(*args, **kwargs):
        tic = time.perf_counter()
        if rows or not counted(tic):
            return function(*args, **kwargs)
        profile = cProfile.Profile()
        out = profile.runcall(function, *args, **kwargs)
        synchronize()
        stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
        for (file, line, name), (calls, _, own, cumulative, _) in sorted(stats.items(), key=lambda i: -i[1][2])[:top]:
            rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": round(own, 4),
                         "cumulative_s": round(cumulative, 4)})
        return out

    return call


def first_frame_run(animator: Animator, frames: list, stages: dict | None = None,
                    detector_profile: list | None = None) -> dict:
    """`Animator.stream` until its first output frame, from a live source: it hands over the first segment's
    driving frames (its first motion chunk) at once, then gives nothing more until the first frame is out.
    Seconds from the call and from the hand-over to the first frame. `stages`: the seconds of each network's
    calls (synchronised, so the latency is then slightly longer), of the first chunk's preprocessing (face
    detection and crops: from its hand-over to the motion encoder's first call) and of its face detection.
    `detector_profile`: the host profile of the driving frames' face detection (`profiled`)."""
    real = animator.config.first_chunk_frames
    handed, out = {}, threading.Event()

    def source():
        for index, frame in enumerate(frames[:real]):
            if index == real - 1:  # handed over when yielded (after the yield runs only once more is asked)
                handed["segment"] = time.perf_counter()
            yield frame
        out.wait()
        yield from frames[real:]

    def first_frames_calls(tic: float) -> bool:  # not the source image's (before), nor the next chunk's (after)
        return handed.get("segment", math.inf) <= tic < handed.get("out", math.inf)

    first_calls = {}
    if stages is not None:
        models = animator.models
        animator = animator.with_options()
        animator.models = replace(models, **{name: clocked(getattr(models, name), name, stages, first_calls,
                                                           first_frames_calls)
                                             for name in ("motion", "unet", "vae_decoder")})
        animator.detector = copy.copy(animator.detector)
        animator.detector.detect_batch = clocked(animator.detector.detect_batch, "face_detection", stages, {},
                                                 first_frames_calls)
    if detector_profile is not None:
        animator = animator.with_options()
        animator.detector = copy.copy(animator.detector)
        animator.detector.detect_batch = profiled(animator.detector.detect_batch, detector_profile,
                                                  first_frames_calls)
    start = time.perf_counter()
    stream = animator.stream(SAMPLE_IMAGE, source(), fps=FPS)
    try:
        next(stream)
        end = handed["out"] = time.perf_counter()
    finally:
        out.set()  # the source goes on (and ends) whatever happened
        stream.close()
    if stages is not None:
        stages["preprocess_chunk"] = first_calls["motion"] - handed["segment"]
    return {"after_call_s": end - start, "after_segment_frames_s": end - handed["segment"]}


def first_frame_part(a, nets, plan: dict, eager: Animator, frames: list, compiled: bool) -> dict:
    """First-frame latency of each of the plan's settings on each way the torch backend runs the networks:
    eager and with CUDA graphs, or (`compiled`) with the UNet and VAE decoder compiled (torch.compile, with CUDA
    graphs) for the settings in --compile-configs. One way's networks at a time (they share the weights)."""
    names = list(plan["first_frame"])
    ways = [] if compiled else [("eager", lambda: eager.models, names)]
    if GPU and not compiled:  # CUDA graphs and inductor's code need a GPU (on a CPU compiling takes minutes)
        ways.append(("cuda graphs", lambda: sessions(a, nets, plan, cuda_graph=True), names))
    if GPU and compiled and a.compile_configs:
        ways.append(("compiled", lambda: sessions(a, nets, plan, cuda_graph=True, compile=True), a.compile_configs))
    results = {}
    for way, make, settings in ways:
        trace = a.out if a.trace and way == "compiled" else None
        results[way] = first_frames(make(), settings, a, plan, eager, frames, trace)
        gc.collect()  # a session and its CUDA graphs refer to each other
        if GPU:  # the graphs' memory pools and compiled code go before the parts that measure memory
            torch.cuda.empty_cache()
    return results


def first_frames(models: Models, settings: list[str], a, plan: dict, eager: Animator, frames: list,
                 trace: Path | None = None) -> dict:
    """Each setting runs once unmeasured (compiling or capturing its shapes), then --repeats times (the median
    reported), then once with each network's time, once with the detector's profile and (`trace`: a folder) once
    under torch.profiler."""
    animator = Animator(models, mode="fast", **plan["config"])
    animator.arcface = eager.arcface
    results = {}
    for name in settings:
        view = animator.with_options(**plan["first_frame"][name])
        tic = time.perf_counter()
        first_frame_run(view, frames)
        warm_up_s = time.perf_counter() - tic
        runs = [first_frame_run(view, frames) for _ in range(a.repeats)]
        stages: dict = {}
        first_frame_run(view, frames, stages)
        profile: list = []
        first_frame_run(view, frames, detector_profile=profile)
        if trace is not None:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as profiler:
                first_frame_run(view, frames)
            profiler.export_chrome_trace(str(trace / f"trace-{name.replace(' ', '_')}.json"))
        results[name] = {"first_segment": view.config.first_segment_frames, "pad_frames": view.config.pad_frames,
                         **{key: float(np.median([run[key] for run in runs])) for key in runs[0]},
                         "runs": runs, "warm_up_s": warm_up_s, "stages_s": stages, "detector_profile": profile}
    return results


def seam_frames(config: AnimateConfig, frames: int) -> list[int]:
    """Output frame indices that start a segment after the first (where a seam lies)."""
    first_new = [config.first_segment_frames]
    while first_new[-1] < frames + config.pad_frames:
        first_new.append(first_new[-1] + config.segment - config.overlap)
    return [g - config.pad_frames for g in first_new if 0 < g - config.pad_frames < frames]


def seam_report(config: AnimateConfig, segmented: np.ndarray, whole: np.ndarray) -> dict:
    change = np.abs(np.diff(segmented, axis=0)).mean(axis=(1, 2, 3))  # change[i]: frame i -> i + 1
    seams = [i - 1 for i in seam_frames(config, len(segmented))]
    inside = np.delete(change, seams)
    mse = float(((segmented - whole) ** 2).mean())
    return {"seams": len(seams), "change_across_seams": float(change[seams].mean()) if seams else None,
            # the first seam: after a short first segment (`first_segment`) the one that differs
            "change_across_first_seam": float(change[seams[0]]) if seams else None,
            "change_inside_segments": float(inside.mean()),
            "ratio": float(change[seams].mean() / inside.mean()) if seams else None,
            "psnr_vs_whole_clip_db": 10 * np.log10(255**2 / mse) if mse else float("inf")}


def animate_fps(animator: Animator, video: Path, **kwargs) -> dict:
    with tempfile.TemporaryDirectory() as out:
        result = animator.animate(SAMPLE_IMAGE, video, out, **kwargs)
    return {"frames": result.num_frames, "seconds": result.timings["total"],
            "fps": result.num_frames / result.timings["total"]}


def memory_run(animator: Animator, chunks: list, frames: int, segment: int, steps: int) -> dict:
    """The sampling loop alone over `frames` driving frames (the preprocessed chunks looped): motion tokens
    made per chunk, sampled, decoded and dropped; peak memory and time."""
    config = replace(animator.config, segment=segment, num_steps=steps)
    models = animator.models
    source, identity = animator._source(SAMPLE_IMAGE)
    cond, generator = animator._conditioning(source, identity, None)
    window = config.window

    # the chunks' frames looped as one sequence (the last chunk of a clip is shorter than a window)
    expression = np.concatenate([c.expression_images for c in chunks])
    pose = np.concatenate([c.pose_images for c in chunks])
    owner = np.concatenate([np.full(len(c.expression_images), i) for i, c in enumerate(chunks)])

    def motion():
        for index in range(0, frames, window):
            rows = np.arange(index, min(index + window, frames)) % len(expression)
            chunk = chunks[owner[rows[0]]]
            yield motion_tokens(models, torch.from_numpy(expression[rows]), torch.from_numpy(pose[rows]),
                                chunk.head_bucket, chunk.exp_bucket)

    result = {"frames": frames, "segment": segment}
    tic = time.perf_counter()
    with peak_memory(result):
        made = sum(1 for _ in decode_segments(models, sample_segments(models, cond, config, generator, motion()),
                                              config))
    result["seconds"] = time.perf_counter() - tic
    assert made == frames, (made, frames)
    return result


def plot(memory: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = any(run["gpu_peak_mib"] > 0 for runs in memory.values() for run in runs)  # measured on a GPU
    fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(11 if gpu else 6, 4), squeeze=False)
    keys = [("host_peak_mib", "host peak RSS (MiB)")] + ([("gpu_peak_mib", "GPU peak allocated (MiB)")] if gpu else [])
    for ax, (key, label) in zip(axes[0], keys):
        for name, runs in memory.items():
            minutes = [r["frames"] / FPS / 60 for r in runs]
            ax.plot(minutes, [r[key] for r in runs], marker="o", label=name)
        ax.set_xlabel("driving video (minutes)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="stream_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", choices=list(PLANS), default="official",
                   help="tiny: the small test networks and short lengths (a dry run, on the CPU without a GPU)")
    p.add_argument("--weights", type=Path, help="a weights folder instead of random networks (torch backend)")
    p.add_argument("--lora", type=Path, help="with --weights: a LoRA merged into the UNet (e.g. LCM)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                   help="first_frame: 0; stream: 1-2 (fast mode, latency, fps, seam); quality: 4; memory: 3")
    p.add_argument("--compile-configs", nargs="*", choices=list(PLANS["official"]["first_frame"]), default=["live"],
                   help="first-frame settings also run compiled (GPU; each compiles the UNet at its frame count, "
                   "2-3 minutes, and the first one the VAE decoder, about 1 minute); none: no compiled run")
    p.add_argument("--trace", action="store_true", help="part 0: a Chrome trace of each compiled setting's run")
    p.add_argument("--repeats", type=int, default=3, help="measured first-frame runs per setting (median)")
    p.add_argument("--lengths", type=float, nargs="+", help="part 3: driving seconds at --size (default: the plan's)")
    p.add_argument("--tiny-lengths", type=float, nargs="*",
                   help="part 3: driving seconds of the tiny networks' series (default: the plan's; none: no series)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=SCHEDULES, help="part 3's schedules")
    a = p.parse_args(argv)
    if not GPU and a.size != "tiny":
        p.error("no GPU: only --size tiny runs on the CPU")
    a.out.mkdir(parents=True, exist_ok=True)
    plan = {**PLANS[a.size], **{key: getattr(a, key) for key in ("lengths", "tiny_lengths")
                                if getattr(a, key) is not None}}
    report = {**report_header(), "command": " ".join(sys.argv), "size": a.size, "plan": plan}
    tic = time.perf_counter()

    def save():  # after every part, so that a run cut short keeps what it measured
        report["seconds"] = time.perf_counter() - tic
        (a.out / "stream.json").write_text(json.dumps(report, indent=2, default=float))

    # 0: first-frame latency; 1-2: fast mode, latency, fps and the seam
    nets = networks(a, a.size)
    fast, quality = animators(a, nets, plan)
    segment = fast.config.segment = fast.config.window  # fast mode's default: one window per segment
    frames = looped_frames(plan["frames"])
    if "first_frame" in a.parts:
        report["first_frame"] = first_frame_part(a, nets, plan, fast, frames, compiled=False)
        save()
    if GPU and "stream" in a.parts:
        stream_run(fast, frames[: fast.config.window])  # warm-up: first calls of every network
    if "stream" in a.parts:
        segmented = stream_run(fast, frames)
        fast.config = replace(fast.config, segment=0)
        whole = stream_run(fast, frames)
        fast.config = replace(fast.config, segment=segment)
        report["fast_stream"] = {"segmented": {k: v for k, v in segmented.items() if k != "thumbs"},
                                 "whole_clip": {k: v for k, v in whole.items() if k != "thumbs"}}
        report["seam"] = seam_report(fast.config, segmented["thumbs"], whole["thumbs"])
        with tempfile.TemporaryDirectory() as tmp:
            video = write_driving_video(Path(tmp) / "driving.mp4", plan["frames"])
            report["fast_animate"] = {"stream": animate_fps(fast, video, stream=True),
                                      "file_segmented": animate_fps(fast, video)}
            fast.config = replace(fast.config, segment=0)
            report["fast_animate"]["file_whole_clip"] = animate_fps(fast, video)
            fast.config = replace(fast.config, segment=segment)
        save()
    if "first_frame" in a.parts:  # compiled: after 1-2, as compiling takes minutes, so a run cut short keeps them
        report["first_frame"].update(first_frame_part(a, nets, plan, fast, frames, compiled=True))
        save()
    del nets  # the memory part frees the full-size networks (fast and quality hold them until then)

    # 4: quality mode, segments against the whole clip
    if "quality" in a.parts:
        frames = looped_frames(plan["quality_frames"])
        if GPU:
            stream_run(quality, frames[: quality.config.window])  # warm-up
        report["quality"] = {}
        for name, frames_at_once in (("segmented", segment), ("whole_clip", 0)):
            quality.config = replace(quality.config, segment=frames_at_once)
            run = stream_run(quality, frames)
            report["quality"][name] = {"frames": run["frames"], "seconds": run["seconds"],
                                       "fps": run["frames"] / run["seconds"]}
        save()
    if "memory" in a.parts:
        held = [fast, quality]
        del fast, quality  # the memory part frees the full-size networks before the tiny ones run
        memory_part(a, plan, held, segment, report, save)
    print_table(report)
    return report


def memory_part(a, plan: dict, held: list[Animator], segment: int, report: dict, save) -> None:
    """3: memory against length, at --size, then on the tiny networks. `held`: the fast and quality animators,
    emptied before the tiny networks run so that their peaks hold no full-size weights."""
    fast = held[0]
    # the sample preprocessed once (one chunk in a dry run), its chunks looped
    limit = fast.config.window if a.size == "tiny" else None
    chunks = list(DrivingPreprocessor(fast.detector).chunks(read_frames(SAMPLE_VIDEO, limit), fast.config.window))
    memory = report["memory"] = {}
    for name in a.schedules:
        memory[f"{a.size}, {name}"] = [memory_run(fast, chunks, round(seconds * FPS),
                                                  segment if name == "segmented" else 0, 1)
                                       for seconds in plan["lengths"]]
        save()
    if not plan["tiny_lengths"]:  # no tiny series (the dry run's networks are the tiny ones already)
        tiny = None
    elif a.size == "tiny":
        tiny, tiny_chunks = fast, chunks
    else:
        held.clear()
        del fast
        torch.cuda.empty_cache()
        tiny = Animator(load_models("torch", random_networks("tiny"), DEVICE, ModelOptions(precision="fp16", size=64)),
                        mode="fast", **plan["tiny_config"])
        tiny_chunks = list(DrivingPreprocessor(tiny.detector).chunks(read_frames(SAMPLE_VIDEO), tiny.config.window))
    for name in a.schedules if tiny else ():
        memory[f"tiny networks, {name}"] = [memory_run(tiny, tiny_chunks, round(seconds * FPS),
                                                       tiny.config.window if name == "segmented" else 0,
                                                       plan["tiny_steps"]) for seconds in plan["tiny_lengths"]]
        save()
    plot(memory, a.out / "memory.png")
    save()


def print_table(report: dict) -> None:
    rows = []
    for way, settings in report.get("first_frame", {}).items():
        for name, run in settings.items():
            stages = ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in run["stages_s"].items())
            setting = f"first frame, {way}, {name} (first segment {run['first_segment']}, {run['pad_frames']} pads)"
            latency = (f"{run['after_segment_frames_s']:.3f} s after its driving frames ({run['after_call_s']:.3f} "
                       f"after the call; {stages})")
            rows.append((setting, latency))
            if run.get("detector_profile"):
                rows.append(("  its detection's host time, most first", ", ".join(
                    f"{r['function']} {r['own_s']:.3f}" for r in run["detector_profile"][:3])))
    if "fast_stream" in report:
        rows += _stream_rows(report)
    for name, runs in report.get("memory", {}).items():
        rows.append((f"memory {name}", ", ".join(
            f"{r['frames'] / FPS / 60:.2f} min: GPU {r['gpu_peak_mib']:.0f} host {r['host_peak_mib']:.0f} MiB"
            for r in runs)))
    rows += [(f"quality fps, {name}", f"{run['fps']:.2f}") for name, run in report.get("quality", {}).items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _stream_rows(report: dict) -> list[tuple[str, str]]:
    s, w = report["fast_stream"]["segmented"], report["fast_stream"]["whole_clip"]
    rows = [("first frame after first chunk (fast, segmented)", f"{s['first_frame_after_first_chunk_s']:.3f} s"),
            ("first frame after call (fast, segmented / whole clip)",
             f"{s['first_frame_after_call_s']:.2f} / {w['first_frame_after_call_s']:.2f} s"),
            ("steady fps, stream() (segmented)", f"{s['steady_fps'] or 0:.2f}")]
    rows += [(f"animate fps, {name}", f"{run['fps']:.2f}") for name, run in report["fast_animate"].items()]
    seam = report["seam"]
    rows.append(("seam: change across / inside segments", (f"{seam['change_across_seams'] or 0:.2f} / "
                 f"{seam['change_inside_segments']:.2f} (x{seam['ratio'] or 0:.2f}), "
                 f"{seam['psnr_vs_whole_clip_db']:.1f} dB vs whole clip")))
    return rows


if __name__ == "__main__":
    main()
