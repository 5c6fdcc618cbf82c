"""The int8 and fp8 UNet at the official size, calibrated on a real sample, with a quality report against the
fp16 path. Random full-size weights (no checkpoint is needed), on a GPU.

    python -m hyportrait.benchmarks.quantize_gpu --out DIR [--image PNG --video MP4] [--size official|tiny]
        [--steps export animate quantize build quality] [--budget-seconds 330]

Steps, in this order; each one whose result is in DIR already (DIR/report.json) is skipped, so the job can be
split over several calls with the same --out (official size on an H100: about 3 calls of up to 9 minutes):
  export    the fp16 TensorRT-form UNet (unfused attention, 64x64 latent, batch dynamic) -> DIR/export
  animate   the sample animated in fp16 by the torch UNet with the engine rewrites (the module the export
            traces), quality mode, at most --max-frames driving frames, seed fixed: the decoded frames, the
            UNet input sets (first window) of --sets steps spread over the schedule, and the amax of every
            quantized activation over every UNet call of those steps (all windows, all guidance branches)
            -> DIR/calibration
  quantize  int8 and fp8 Q/DQ models of the export with those ranges (onnxruntime quantization)
  build     their engines with TensorRT or TensorRT-RTX, when importable -> DIR/engines-<precision>
  quality   per precision, the PyTorch UNet under `fake_quantization` of the Q/DQ model (each quantized
            module computes what its Q/DQ node computes; onnxruntime cannot run the full-size model and
            TensorRT may not execute here): relative error of the UNet output against fp16 on the recorded
            input sets, and PSNR of the decoded frames of the whole clip (same seed) against the fp16 run
The report, DIR/report.json, is written after every step (device, versions, each step's result and seconds).

--size tiny runs the same on the small test networks, on the CPU in fp32 when there is no GPU (about a
minute): a dry run of this script.
"""
from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from hyportrait.benchmarks.bench import SIZES
from hyportrait.benchmarks.build_gpu import Run, build, environment
from hyportrait.engines.build import BuildRequest
from hyportrait.engines.calibration import record
from hyportrait.engines.engine_manifest import BuildFlags
from hyportrait.engines.quality import psnr
from hyportrait.engines.quantize import (
    PRECISIONS,
    ensure_quantized,
    load_calibration_npz,
    quantized_path,
    read_calibration,
    save_calibration_npz,
    save_ranges_json,
)
from hyportrait.engines.torch_quant import fake_quantization
from hyportrait.export.export_unet import unet_spec
from hyportrait.export.manifest import Manifest, read_manifest, write_manifest
from hyportrait.export.onnx_io import export_onnx, relative_error
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.api import Animator
from hyportrait.runtime.models import ModelOptions, load_models

STEPS = ("export", "animate", "quantize", "build", "quality")
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PRECISION = "fp16" if GPU else "fp32"  # the CPU of a tiny dry run lacks fp16 kernels for some ops
FRAMES_FILE = "frames.npy"  # the decoded frames of the unquantized run
INPUT_SETS_FILE = "input_sets.npz"
RANGES_FILE = "ranges.json"


@functools.cache
def networks(size: str):
    """The random networks (seed 0) and, on them, the runtime's torch sessions with the engine rewrites."""
    nets = random_networks(size, seed=0)
    config = SIZES[size]
    models = load_models("torch", nets, DEVICE, ModelOptions(precision="fp16" if GPU else "fp32",
                                                             size=config.get("size", 512), faithful=False))
    return nets, models


def animator(size: str, max_frames: int) -> Animator:
    return Animator(networks(size)[1], max_frames=max_frames, **SIZES[size])


def export_unet(size: str, folder: Path) -> dict:
    """The UNet in the TensorRT form at the window and latent of the runtime, exported where the networks are."""
    nets, _ = networks(size)
    record = export_onnx(unet_spec(nets, batch=1), folder, PRECISION)
    write_manifest(Manifest(precision=PRECISION, weights=f"random:{size}", models={"unet": record}), folder)
    return {"size_bytes": record.size_bytes, "export_seconds": record.export_seconds, "precision": record.precision}


def animate(a, unet: Path, folder: Path) -> dict:
    recording = record(animator(a.size, a.max_frames), a.image, a.video, a.sets, unet)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / FRAMES_FILE, recording.frames)
    save_calibration_npz(folder / INPUT_SETS_FILE, recording.feeds)
    save_ranges_json(folder / RANGES_FILE, recording.amax, origin=recording.origin)
    return {"origin": recording.origin, "frames": len(recording.frames), "input_sets": len(recording.feeds),
            "tensors": len(recording.amax)}


def quantize(source: Path, source_sha256: str, precision: str, ranges: Path) -> dict:
    report, reused = ensure_quantized(source, precision, read_calibration(ranges), source_sha256=source_sha256)
    return {"reused": reused, **asdict(report)}


def unet_inputs(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value).to(DEVICE) for name, value in feed.items()}


def quality(a, quantized: Path, calibration: Path) -> dict:
    """The fake-quantized UNet against the unquantized one: per recorded input set, and over the whole clip."""
    unet = networks(a.size)[1].unet
    feeds = load_calibration_npz(calibration / INPUT_SETS_FILE)
    references = [unet(**unet_inputs(feed)).float().cpu().numpy() for feed in feeds]
    reference_frames = np.load(calibration / FRAMES_FILE)
    with fake_quantization(unet.module, quantized) as modules:
        errors = [relative_error(unet(**unet_inputs(feed)).float().cpu().numpy(), reference)
                  for feed, reference in zip(feeds, references)]
        frames = np.stack(list(animator(a.size, a.max_frames).frames(a.image, a.video)))
    frame_psnr = [psnr(test, reference, data_range=255) for test, reference in zip(frames, reference_frames)]
    return {"quantized_modules": modules, "unet_relative_errors": errors, "unet_max_relative_error": max(errors),
            "frames": len(frames), "psnr_db": psnr(frames, reference_frames, data_range=255),
            "min_frame_psnr_db": min(frame_psnr), "frame_psnr_db": frame_psnr,
            "reference": f"the torch {PRECISION} UNet (engine rewrites) and its decoded frames, same seed"}


def finished(report: dict, section: str, name: str) -> bool:
    entry = report.get(section, {}).get(name)
    return bool(entry) and "error" not in entry and "skipped" not in entry


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder: export/, calibration/, engines-*/, "
                   "report.json")
    p.add_argument("--image", type=Path, default=Path("scratch/source_image.png"))
    p.add_argument("--video", type=Path, default=Path("scratch/driving_video.mp4"))
    p.add_argument("--size", choices=list(SIZES), default="official")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--max-frames", type=int, default=25, help="driving frames of the clip (default 25)")
    p.add_argument("--sets", type=int, default=8, help="calibration steps spread over the schedule (default 8)")
    p.add_argument("--budget-seconds", type=float, default=330,
                   help="start no step after this (default 330: the longest steps take about 3 minutes)")
    a = p.parse_args(argv)
    if not GPU and a.size != "tiny":
        p.error("no GPU: only --size tiny runs on the CPU")

    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}  # the steps of earlier calls stay
    report.update(environment(), size=a.size, precision=PRECISION, max_frames=a.max_frames, sets=a.sets,
                  budget_seconds=a.budget_seconds)
    run = Run(path, a.budget_seconds, report)
    export, calibration = a.out / "export", a.out / "calibration"

    def step(section: str, name: str, work) -> None:
        if section.split("-")[0] in a.steps and not finished(run.report, section, name):
            run.step(section, name, work)

    step("export", "unet", lambda: export_unet(a.size, export))
    if not finished(run.report, "export", "unet"):
        return
    unet = read_manifest(export).models["unet"]
    source = export / unet.file
    step("animate", PRECISION, lambda: animate(a, source, calibration))
    if not finished(run.report, "animate", PRECISION):
        return
    for precision in a.precisions:
        step("quantize", precision, lambda precision=precision: quantize(source, unet.sha256, precision,
                                                                         calibration / RANGES_FILE))
    for precision in (name for name in a.precisions if finished(run.report, "quantize", name)):
        if "build" in a.steps and not finished(run.report, f"build-{precision}", "unet"):
            build(run, BuildRequest(onnx_dir=export, out_dir=a.out / f"engines-{precision}", precision=precision,
                                    flags=BuildFlags(optimization_level=3), calibration=calibration / RANGES_FILE,
                                    models=("unet",)), f"build-{precision}")
        step("quality", precision, lambda precision=precision: quality(a, quantized_path(source, precision),
                                                                       calibration))
    run.log(f"report: {path}")


if __name__ == "__main__":
    main()
