"""Export every network (random weights, fp16) and build its TensorRT engine; make and build the int8 and fp8
Q/DQ UNet too. Writes a JSON report after every step: per model whether TensorRT parsed it, build seconds,
engine bytes, and the errors TensorRT logged (unsupported layers among them); a failing step is recorded
and the next one runs.

    python -m hyportrait.benchmarks.build_gpu --out DIR [--size official|tiny] [--budget-seconds 540]

Steps, most valuable first: export (fp16, on the GPU), fp16 engines of the small models, the fp16 UNet engine,
then per precision int8 and fp8: calibrate, quantize, build. Steps that would start after --budget-seconds
are skipped (and recorded as such). A second run with the same --out reuses the export, the quantized
models and every current engine, so a long job can be split over runs.

Calibration is minimal: 2 random input sets, and at the official size it runs on a second export of the
UNet at a 32x32 latent (onnxruntime cannot allocate the unfused attention of the 64x64 UNet, see
README.md); the ranges are keyed by tensor name, which both exports share. The quality report of the
quantized UNet (relative error against the fp16 UNet) is therefore only produced at the tiny size, where
the model itself fits onnxruntime.

--size tiny runs the same steps on the small test networks, on the CPU when there is no GPU: without
TensorRT each model records "tensorrt not importable" and export and quantization still run.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from hyportrait.benchmarks.bench import report_header
from hyportrait.engines.build import BuildRequest, build_all
from hyportrait.engines.engine_manifest import BuildFlags
from hyportrait.engines.quantize import (
    calibrate,
    calibration_record,
    current_report,
    default_providers,
    feeds_sha256,
    quantize_model,
    random_unet_feeds,
    save_calibration_npz,
)
from hyportrait.engines.tensorrt_module import TensorRTMissingError, import_tensorrt
from hyportrait.export.export_all import network_specs
from hyportrait.export.export_face_detector import mtcnn_specs
from hyportrait.export.export_unet import unet_spec
from hyportrait.export.manifest import MANIFEST_FILE, Manifest, read_manifest, write_manifest
from hyportrait.export.onnx_io import export_onnx
from hyportrait.files import write_json
from hyportrait.networks.contract import LATENT_SIZE
from hyportrait.networks.weights import random_networks

SMALL_FIRST = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "pose_guider", "vae_encoder", "vae_decoder", "motion",
               "appearance")
CALIBRATION_LATENT = 32
CALIBRATION_FILE = "calibration.npz"  # the calibration input sets, for build_all
CALIBRATION_DIR = "calibration"  # inside the export: the UNet at CALIBRATION_LATENT and its manifest
CALIBRATION_SETS = 2


class Run:
    """Timestamps, the time budget, and the report written after every step."""

    def __init__(self, report_path: Path, budget: float, report: dict):
        self.start = time.perf_counter()
        self.budget = budget
        self.path = report_path
        self.report = report

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f}s] {message}", flush=True)

    def step(self, section: str, name: str, work: Callable[[], dict]) -> dict | None:
        """Run one step unless the budget is spent; record its result or its error under report[section][name]."""
        entry: dict
        if time.perf_counter() - self.start > self.budget:
            entry = {"skipped": f"time budget of {self.budget:.0f} s spent"}
            self.log(f"{section} {name}: skipped (budget)")
        else:
            self.log(f"{section} {name}: start")
            tic = time.perf_counter()
            try:
                entry = work()
            except Exception as exc:  # noqa: BLE001 -- record and go on: one failing step must not hide the rest
                entry = {"error": f"{type(exc).__name__}: {exc}"[:4000], "traceback": traceback.format_exc()[-4000:]}
            entry["step_seconds"] = round(time.perf_counter() - tic, 1)
            self.log(f"{section} {name}: {'error: ' + entry['error'][:300] if entry.get('error') else 'done'}")
        self.report.setdefault(section, {})[name] = entry
        write_json(self.path, self.report)
        return None if entry.get("error") or "skipped" in entry else entry


def environment() -> dict:
    """The head of a device report: the machine, the date, the commit, the library versions."""
    import onnxruntime as ort

    try:
        trt = import_tensorrt()
        tensorrt = f"{trt.flavour} {trt.version}"
    except TensorRTMissingError as exc:
        tensorrt = f"not importable: {exc.message}"
    return {**report_header(), "onnxruntime": ort.__version__, "tensorrt": tensorrt}


def export_models(size: str, out: Path, device: str) -> dict:
    """Every network in fp16 (the models the reference keeps in fp32 stay fp32) and the manifest."""
    nets = random_networks(size, seed=0)
    for module in nets.modules().values():
        module.to(device)
    pixels = 512 if size == "official" else 64
    specs = [*mtcnn_specs(), *network_specs(nets, image_size=pixels, batch=1)]
    manifest = Manifest(precision="fp16", weights=f"random:{size}")
    for spec in specs:
        spec.module.to(device)
        record = export_onnx(spec, out, "fp16")
        manifest.models[spec.name] = record
        print(f"  exported {spec.name}: {record.size_bytes / 2**20:.1f} MiB in {record.export_seconds:.1f} s",
              flush=True)
    write_manifest(manifest, out)
    if LATENT_SIZE[size] > CALIBRATION_LATENT:  # a UNet onnxruntime can run, for calibration
        proxy = unet_spec(nets, batch=1, latent_size=CALIBRATION_LATENT)
        calibration = Manifest(precision="fp16", weights=f"random:{size}",
                               models={"unet": export_onnx(proxy, out / CALIBRATION_DIR, "fp16")})
        write_manifest(calibration, out / CALIBRATION_DIR)
    del nets, specs
    if device == "cuda":
        torch.cuda.empty_cache()  # the builds need the memory
    return {name: {"size_bytes": r.size_bytes, "export_seconds": r.export_seconds,
                   "external_data": bool(r.data_file)} for name, r in manifest.models.items()}


def build(run: Run, request: BuildRequest, section: str) -> None:
    """build_all one model at a time, each a step of its own in the report."""
    for model in request.models:
        def work(model=model) -> dict:  # bound now: the loop variable moves on
            try:
                import_tensorrt()
            except TensorRTMissingError as exc:
                return {"error": "tensorrt not importable", "detail": exc.message}
            result = build_all(dataclasses.replace(request, models=(model,)), keep_going=True)[0]
            entry = asdict(result)
            entry["parse_ok"] = result.status in ("built", "current") or result.failed_stage in ("configure",
                                                                                                "build")
            return entry

        run.step(section, model, work)


def quantize(run: Run, export: Path, precision: str, providers: list[str], ranges: dict) -> bool:
    """Calibrate on the calibration UNet (the export's own when there is none; once per run, kept in
    `ranges`) and quantize the export's UNet; the calibration sets go to an .npz, with which build_all
    finds this quantized model current."""
    unet = read_manifest(export).models["unet"]
    source = export / unet.file
    proxy_folder = export / CALIBRATION_DIR
    full_size = not (proxy_folder / MANIFEST_FILE).is_file()  # calibrate the export's UNet itself
    proxy = unet if full_size else read_manifest(proxy_folder).models["unet"]
    calibration_model = source if full_size else proxy_folder / proxy.file

    def work() -> dict:
        feeds = random_unet_feeds(proxy, CALIBRATION_SETS, batch=1, seed=0)
        save_calibration_npz(export / CALIBRATION_FILE, feeds)
        existing = current_report(source, precision, source_sha256=unet.sha256,
                                  calibration_sha256=feeds_sha256(feeds))
        if existing:
            return {"reused": asdict(existing)}
        if "tensors" not in ranges:
            ranges["tensors"] = calibrate(calibration_model, feeds, providers=providers)
        calibration = calibration_record(feeds, f"random (seed 0), run on {calibration_model.relative_to(export)}")
        report = quantize_model(source, precision, ranges["tensors"], calibration=calibration,
                                source_sha256=unet.sha256,
                                eval_feeds=feeds if full_size else None, providers=providers)
        return asdict(report)

    return run.step("quantize", precision, work) is not None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="work folder: export/, engines-*/, report.json")
    p.add_argument("--size", choices=["official", "tiny"], default="official")
    p.add_argument("--budget-seconds", type=float, default=540, help="start no step after this (default 540)")
    p.add_argument("--precisions", nargs="+", default=["fp16", "int8", "fp8"], choices=["fp16", "int8", "fp8"])
    p.add_argument("--opt-level", type=int, default=3)
    a = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    providers = default_providers()
    a.out.mkdir(parents=True, exist_ok=True)
    export = a.out / "export"
    report = {**environment(), "calibration_providers": providers, "size": a.size, "budget_seconds": a.budget_seconds}
    run = Run(a.out / "report.json", a.budget_seconds, report)

    if (export / MANIFEST_FILE).is_file():
        run.report["export"] = {"reused": str(export)}
    elif run.step("export", "all", lambda: export_models(a.size, export, device)) is None:
        return

    flags = BuildFlags(optimization_level=a.opt_level)
    models = tuple(m for m in (*SMALL_FIRST, "unet") if m in read_manifest(export).models)
    if "fp16" in a.precisions:
        build(run, BuildRequest(onnx_dir=export, out_dir=a.out / "engines-fp16", precision="fp16", flags=flags,
                                models=models), "build-fp16")
    ranges: dict = {}  # calibration ranges, shared by int8 and fp8
    for precision in (p for p in ("int8", "fp8") if p in a.precisions):
        if quantize(run, export, precision, providers, ranges):
            build(run, BuildRequest(onnx_dir=export, out_dir=a.out / f"engines-{precision}", precision=precision,
                                    flags=flags, calibration=export / CALIBRATION_FILE, models=("unet",)),
                  f"build-{precision}")
    run.log(f"report: {run.path}")


if __name__ == "__main__":
    main()
