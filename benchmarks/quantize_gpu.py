"""The int8 and fp8 UNet at the official size, calibrated on a real sample, with a quality report against the
fp16 path. Random full-size weights (no checkpoint is needed), on a GPU.

    python -m hyportrait.benchmarks.quantize_gpu --out DIR [--image PNG --video MP4] [--size official|tiny]
        [--steps export animate quantize build quality modelopt modelopt_onnx] [--budget-seconds 330]

Steps, in this order; each one whose result is in DIR already (DIR/report.json) is skipped, so the job can be
split over several calls with the same --out (official size on an H100: about 3 calls of up to 9 minutes,
and one more for the modelopt steps):
  export    the fp16 TensorRT-form UNet (unfused attention, 64x64 latent, batch dynamic) -> DIR/export
  animate   the sample animated in fp16 by the torch UNet with the engine rewrites (the module the export
            traces), quality mode, at most --max-frames driving frames, seed fixed: the decoded frames, the
            UNet input sets (first window) of --sets steps spread over the schedule, and the amax of every
            quantized activation over every UNet call of those steps (all windows, all guidance branches)
            -> DIR/calibration
  quantize  int8 and fp8 Q/DQ models of the export with those ranges (engines/quantize.py)
  build     their engines with TensorRT or TensorRT-RTX, when importable -> DIR/engines-<precision>
  quality   per precision, the PyTorch UNet under `fake_quantization` of the Q/DQ model (each quantized
            module computes what its Q/DQ node computes; onnxruntime cannot run the full-size model and
            TensorRT may not execute here): relative error of the UNet output against fp16 on the recorded
            input sets, and PSNR of the decoded frames of the whole clip (same seed) against the fp16 run
  modelopt  per precision, the same torch UNet quantized by NVIDIA ModelOpt's recipe for diffusion UNets
            (engines/modelopt_quant.py: int8 SmoothQuant, fp8 per tensor), calibrated on the recorded input
            sets: the same measures as `quality`. Needs `export` and `animate` only (`--steps export animate
            modelopt modelopt_onnx`), and nvidia-modelopt (the [modelopt] extra)
  modelopt_onnx  (right after modelopt's int8, so that one quantized copy is held at a time) ModelOpt's int8
            UNet (quantized again unless the modelopt step did in this call) exported
            to ONNX Q/DQ as the export step exports the UNet, at opset 19 and checked in full by onnx's
            checker -> DIR/modelopt-int8; its Q/DQ nodes counted against the quantize step's int8 model
The report, DIR/report.json, is written after every step (device, versions, each step's result and seconds);
a table of the quality and modelopt measures, side by side, is printed last.

--size tiny runs the same on the small test networks, on the CPU in fp32 when there is no GPU (about 3
minutes on 2 cores, half of it the modelopt_onnx export): a dry run of this script.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from hyportrait.benchmarks.bench import SIZES
from hyportrait.benchmarks.build_gpu import Run, build, environment
from hyportrait.engines.build import BuildRequest
from hyportrait.engines.calibration import record
from hyportrait.engines.engine_manifest import BuildFlags
from hyportrait.engines.modelopt_quant import (
    RECIPE,
    finish_int8_export,
    qdq_node_counts,
    quantized_copy,
    quantizer_summary,
)
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
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.api import Animator
from hyportrait.runtime.backends import Models, TorchSession
from hyportrait.runtime.models import ModelOptions, load_models

STEPS = ("export", "animate", "quantize", "build", "quality", "modelopt", "modelopt_onnx")
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


def animator(size: str, max_frames: int, models: Models | None = None) -> Animator:
    return Animator(models or networks(size)[1], max_frames=max_frames, **SIZES[size])


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


@functools.cache
def recorded(size: str, calibration: Path) -> tuple[list[dict], list[np.ndarray], np.ndarray]:
    """The recorded input sets, the unquantized UNet's outputs on them, and the unquantized run's frames."""
    feeds = load_calibration_npz(calibration / INPUT_SETS_FILE)
    unet = networks(size)[1].unet
    references = [unet(**unet_inputs(feed)).float().cpu().numpy() for feed in feeds]
    return feeds, references, np.load(calibration / FRAMES_FILE)


def measure(a, calibration: Path, models: Models | None = None) -> dict:
    """A quantized UNet (`models`' or, by default, the runtime's under fake quantization) against the
    unquantized one: per recorded input set, and over the whole clip."""
    models = models or networks(a.size)[1]
    feeds, references, reference_frames = recorded(a.size, calibration)
    errors = [relative_error(models.unet(**unet_inputs(feed)).float().cpu().numpy(), reference)
              for feed, reference in zip(feeds, references)]
    frames = np.stack(list(animator(a.size, a.max_frames, models).frames(a.image, a.video)))
    frame_psnr = [psnr(test, reference, data_range=255) for test, reference in zip(frames, reference_frames)]
    return {"unet_relative_errors": errors, "unet_max_relative_error": max(errors),
            "frames": len(frames), "psnr_db": psnr(frames, reference_frames, data_range=255),
            "min_frame_psnr_db": min(frame_psnr), "frame_psnr_db": frame_psnr,
            "reference": f"the torch {PRECISION} UNet (engine rewrites) and its decoded frames, same seed"}


def quality(a, quantized: Path, calibration: Path) -> dict:
    """The UNet under `fake_quantization` of the Q/DQ model `quantized`: `measure`."""
    recorded(a.size, calibration)  # the references first: computed within the block, they would be quantized
    with fake_quantization(networks(a.size)[1].unet.module, quantized) as modules:
        return {"quantized_modules": modules, **measure(a, calibration)}


@functools.lru_cache(maxsize=1)  # one quantized copy of the UNet at a time (GBs at the official size)
def modelopt_model(size: str, precision: str, calibration: Path) -> tuple[torch.nn.Module, float]:
    """A copy of the runtime's torch UNet quantized by ModelOpt's recipe for `precision`, calibrated on the
    recorded input sets, and the seconds that took."""
    session = networks(size)[1].unet
    feeds = recorded(size, calibration)[0]

    def calibrate(module: torch.nn.Module) -> None:
        calibrating = TorchSession(session.name, module, session.dtypes)  # the inputs cast as the runtime's
        for feed in feeds:
            calibrating(**unet_inputs(feed))

    tic = time.perf_counter()
    quantized = quantized_copy(session.module, precision, calibrate,
                               high_precision_dtype="Half" if PRECISION == "fp16" else "Float")
    return quantized, round(time.perf_counter() - tic, 1)


def modelopt(a, precision: str, calibration: Path) -> dict:
    """ModelOpt's quantized UNet, measured as `quality` measures."""
    quantized, seconds = modelopt_model(a.size, precision, calibration)
    models = networks(a.size)[1]
    models = replace(models, unet=TorchSession(models.unet.name, quantized, models.unet.dtypes))
    sets = len(recorded(a.size, calibration)[0])
    result = {"recipe": RECIPE, "calibration": f"the {sets} recorded input sets", "quantize_seconds": seconds,
              **quantizer_summary(quantized)}
    return result | measure(a, calibration, models)


def modelopt_onnx(a, calibration: Path, today: Path) -> dict:
    """ModelOpt's int8 UNet exported as the export step exports the UNet, its Q/DQ nodes counted against the
    quantize step's int8 model `today` (when there)."""
    quantized, _ = modelopt_model(a.size, "int8", calibration)
    folder = a.out / "modelopt-int8"
    spec = replace(unet_spec(networks(a.size)[0], batch=1), module=quantized)  # the export step's inputs
    record = export_onnx(spec, folder, PRECISION)
    tic = time.perf_counter()
    finish_int8_export(folder / record.file)
    counts = qdq_node_counts(onnx.load(str(folder / record.file), load_external_data=False))
    return {"file": str(folder / record.file), "size_bytes": record.size_bytes,
            "export_seconds": record.export_seconds, "full_check": "passed",
            "opset_and_check_seconds": round(time.perf_counter() - tic, 1), "qdq_nodes": counts,
            "today_qdq_nodes": qdq_node_counts(onnx.load(str(today), load_external_data=False))
            if today.is_file() else f"{today.name} absent (the quantize step has not run in this DIR)"}


def table(report: dict) -> str:
    """Today's path (`quality`) and ModelOpt's (`modelopt`), per precision, on the same measures."""
    columns = ("path", "precision", "modules", "UNet rel. error (max)", "PSNR dB", "min")
    lines = ["{:10} {:9} {:>7} {:>21} {:>10} / {}".format(*columns)]
    for section, path in (("quality", "today"), ("modelopt", "modelopt")):
        for precision, entry in report.get(section, {}).items():
            if finished(report, section, precision):
                lines.append(f"{path:10} {precision:9} {entry['quantized_modules']:7d} "
                             f"{entry['unet_max_relative_error']:21.4f} {entry['psnr_db']:10.2f} / "
                             f"{entry['min_frame_psnr_db']:6.2f}")
    return "\n".join(lines)


def finished(report: dict, section: str, name: str) -> bool:
    entry = report.get(section, {}).get(name)
    return bool(entry) and "error" not in entry and "skipped" not in entry


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder: export/, calibration/, engines-*/, "
                   "report.json")
    p.add_argument("--image", type=Path, default=SAMPLE_IMAGE)
    p.add_argument("--video", type=Path, default=SAMPLE_VIDEO)
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
    for precision in a.precisions:
        step("modelopt", precision, lambda precision=precision: modelopt(a, precision, calibration))
        if precision == "int8":  # while the int8 copy is the one held
            step("modelopt_onnx", "int8", lambda: modelopt_onnx(a, calibration, quantized_path(source, "int8")))
    run.log(f"report: {path}")
    print(table(run.report))


if __name__ == "__main__":
    main()
