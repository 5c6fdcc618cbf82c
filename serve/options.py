"""The service's limits and the options of `hyportrait serve` (standard library only: the CLI registers them
without importing the serve extra)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Limits:
    """What one request may ask for (the service refuses more with 413/422) and how much work waits."""
    max_upload_bytes: int = 64 * 2**20  # per file
    max_image_pixels: int = 4096 * 4096
    max_video_side: int = 3840  # pixels, width or height
    max_frames: int = 1500  # driving frames used
    max_video_seconds: float = 120.0  # length of the uploaded video
    max_steps: int = 100
    queue_size: int = 8  # jobs waiting (not yet running); more get 429
    retain_jobs: int = 200  # finished jobs kept (oldest removed first)
    retain_seconds: float = 3600.0  # finished jobs older than this are removed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch")
    p.add_argument("--weights", type=Path, help="official weights folder (torch backend); without it a tiny "
                   "random-weight model is served (for trying the service)")
    p.add_argument("--models", type=Path, help="export (onnxruntime) or engine (tensorrt) folder")
    p.add_argument("--mode", choices=["quality", "fast"], default="quality", help="jobs' default mode")
    p.add_argument("--lora", type=Path, help="torch backend: a PEFT LoRA (e.g. LCM, for fast mode) merged")
    p.add_argument("--rewrites", action="store_true", help="torch backend: the engine rewrites")
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the UNet and VAE "
                   "decoder (compiled during the warm-up, before the service is ready)")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--precision", choices=["fp16", "fp32"])
    p.add_argument("--device")
    p.add_argument("--no-overlap", action="store_true", help="one job at a time (by default the next job is "
                   "prepared while one denoises, and written while the next denoises)")
    p.add_argument("--jobs-dir", type=Path, default=Path("outputs/serve"),
                   help="uploads and results, one folder per job (default outputs/serve)")
    p.add_argument("--token-file", type=Path, help="a file holding the bearer token /v1/ requests must carry")
    p.add_argument("--grace", type=float, default=60.0, help="seconds running jobs get to finish on SIGTERM "
                   "(then they fail with shutdown_timeout; default 60)")
    limits = Limits()
    p.add_argument("--queue-size", type=int, default=limits.queue_size, help="waiting jobs; more get 429")
    p.add_argument("--max-upload-mb", type=float, default=limits.max_upload_bytes / 2**20)
    p.add_argument("--max-frames", type=int, default=limits.max_frames, help="driving frames a job may use")
    p.add_argument("--max-video-seconds", type=float, default=limits.max_video_seconds)
    p.add_argument("--max-video-side", type=int, default=limits.max_video_side)
    p.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels)
    p.add_argument("--retain-jobs", type=int, default=limits.retain_jobs, help="finished jobs kept")
    p.add_argument("--retain-seconds", type=float, default=limits.retain_seconds)
    ray = p.add_argument_group("Ray Serve (--ray): jobs run on replicas of a Ray cluster")
    ray.add_argument("--ray", action="store_true", help="run jobs on Ray Serve replicas (one per GPU)")
    ray.add_argument("--ray-address", help="a running cluster's address (default: start a local Ray)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (fixed; see --autoscale)")
    ray.add_argument("--autoscale", type=int, nargs=2, metavar=("MIN", "MAX"),
                     help="autoscale between MIN and MAX replicas on ongoing requests")
    ray.add_argument("--gpus-per-replica", type=float, default=1.0, help="num_gpus of a replica (0 on a CPU)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="num_cpus of a replica")
    ray.add_argument("--max-ongoing-requests", type=int, default=2,
                     help="jobs a replica holds at once (2: the next one is prepared while one denoises)")
    ray.add_argument("--health-check-period", type=float, default=10.0)
    ray.add_argument("--health-check-timeout", type=float, default=30.0)


# each number's flag and valid range (inclusive), checked before anything loads (server.check_numbers); images are
# refused over PIL's MAX_IMAGE_PIXELS (89 MP) in any case (runtime.inputs.load_image)
RANGES = (("--port", 0, 65535), ("--grace", 0.0, 86400.0), ("--queue-size", 1, 100_000),
          ("--max-upload-mb", 0.01, 65536.0), ("--max-frames", 1, 10_000_000), ("--max-video-seconds", 0.1, 86400.0),
          ("--max-video-side", 1, 65536), ("--max-image-pixels", 1, 89_478_485), ("--retain-jobs", 1, 1_000_000),
          ("--retain-seconds", 1.0, 1e8), ("--replicas", 1, 1024), ("--autoscale", 0, 1024),
          ("--gpus-per-replica", 0.0, 1024.0), ("--cpus-per-replica", 0.0, 1024.0),
          ("--max-ongoing-requests", 1, 1024), ("--health-check-period", 0.1, 86400.0),
          ("--health-check-timeout", 0.1, 86400.0))


def limits_from(args) -> Limits:
    return Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_image_pixels,
                  max_video_side=args.max_video_side, max_frames=args.max_frames,
                  max_video_seconds=args.max_video_seconds, queue_size=args.queue_size,
                  retain_jobs=args.retain_jobs, retain_seconds=args.retain_seconds)


