"""`hyportrait build`: the exported ONNX models to TensorRT engines, one engine per model.

`build_engine` turns one ONNX file into one engine with the TensorRT Python API (NVIDIA TensorRT, or
TensorRT-RTX where that is what is installed): OnnxParser reading the file by path (so a `.onnx.data` file of
external weights beside it is found), a strongly typed network (the export already holds the types each
layer computes in: fp16 weights with fp32 norms, or Q/DQ nodes; TensorRT-RTX builds nothing else), one
optimization profile from `profiles.py`, the builder optimization level, a workspace limit, a persistent
timing cache (TensorRT only), and optionally REFIT, hardware compatibility (AMPERE_PLUS) and version
compatibility (VERSION_COMPATIBLE + EXCLUDE_LEAN_RUNTIME). The build prints its phases as it goes and
logs everything TensorRT says to `<model>.build.log`; the engine is written atomically.

`build_all` does that for an export folder: it reads the export manifest, quantizes the UNet first for int8
and fp8, skips every model whose engine is current (same cache key) and writes each engine's manifest.
"""
from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hyportrait.errors import EngineBuildError, HyportraitError, InputError
from hyportrait.export.manifest import read_manifest
from hyportrait.export.onnx_io import ensure_writable
from hyportrait.files import atomic_path

from .engine_manifest import (
    BuildFlags,
    EngineManifest,
    build_log_path,
    cache_key,
    engine_path,
    is_current,
    target_compute_capabilities,
    write_engine_manifest,
)
from .profiles import PROFILES, ShapeRange, manifest_profiles
from .quantize import SCHEME, Calibration, ensure_quantized, quantized_path, read_calibration
from .tensorrt_module import TensorRT, current_gpu, import_tensorrt

PRECISIONS = ("fp16", "fp32", "int8", "fp8")
QUANTIZED_MODELS = ("unet",)  # the one model whose compute int8/fp8 pays for
TIMING_CACHE_FILE = "timing.cache"


@dataclass(frozen=True)
class BuildRequest:
    """What `hyportrait build` was asked for."""
    onnx_dir: Path
    out_dir: Path
    precision: str = "fp16"  # fp16 / fp32: the export as is; int8 / fp8: the UNet quantized, the rest as is
    profile: str = "quality"
    flags: BuildFlags = field(default_factory=BuildFlags)
    calibration: Path | None = None  # .npz of UNet input sets or .json of activation ranges (quantize.read_calibration)
    timing_cache: Path | None = None  # default: out_dir/timing.cache
    models: tuple[str, ...] | None = None  # None: every model of the export
    verbose: bool = False  # TensorRT's VERBOSE messages in the build logs


@dataclass
class ModelBuild:
    """The outcome for one model: built, current (reused), or failed."""
    model: str
    status: str
    engine: str | None = None
    precision: str | None = None
    seconds: float = 0.0
    engine_bytes: int = 0
    error: str | None = None
    errors: list[str] = field(default_factory=list)  # parser errors and TensorRT's error messages
    warnings: int = 0  # TensorRT's warnings (in the build log)
    failed_stage: str | None = None  # parse / configure / build, when the builder failed
    notes: list[str] = field(default_factory=list)


@dataclass
class BuiltEngine:
    seconds: float
    engine_bytes: int
    warnings: int
    notes: list[str]


def build_command(request: BuildRequest, models: Sequence[str] | None = None) -> str:
    """The `hyportrait build` command line of `request` (for `models`, default the request's)."""
    flags = request.flags
    args = ["hyportrait", "build", "--onnx", str(Path(request.onnx_dir).resolve()),
            "--out", str(Path(request.out_dir).resolve()), "--precision", request.precision,
            "--profile", request.profile, "--opt-level", str(flags.optimization_level)]
    if request.calibration:
        args += ["--calibration", str(Path(request.calibration).resolve())]
    if flags.workspace_bytes:
        args += ["--workspace-gb", f"{flags.workspace_bytes / 2**30:g}"]
    args += [option for option, on in (("--hardware-compatible", flags.hardware_compatible),
                                       ("--version-compatible", flags.version_compatible)) if on]
    models = models if models is not None else request.models
    if models:
        args += ["--models", *models]
    return shlex.join(args)


def _stamp(start: float) -> str:
    return f"{time.strftime('%H:%M:%S')} +{time.perf_counter() - start:6.1f}s"


def _logger(trt, log_file, verbose: bool, name: str):
    """An ILogger writing every message to `log_file`, echoing errors, and keeping them for the report."""
    severity = trt.ILogger.Severity
    shown = severity.VERBOSE if verbose else severity.INFO

    class BuildLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings = 0
            self._lock = threading.Lock()  # TensorRT logs from its worker threads

        def log(self, level, message):
            if int(level) > int(shown) or log_file.closed:  # TensorRT objects may log as they are freed
                return
            with self._lock:
                log_file.write(f"{time.strftime('%H:%M:%S')} [{str(level).rsplit('.', 1)[-1]}] {message}\n")
                if level in (severity.ERROR, severity.INTERNAL_ERROR):
                    self.errors.append(message)
                    print(f"{name}: TensorRT error: {message}", file=sys.stderr, flush=True)
                elif level == severity.WARNING:
                    self.warnings += 1

    return BuildLogger()


def _progress_monitor(trt, name: str, start: float):
    """Prints the builder's phases (two levels deep) with timestamps; long builds show they are alive."""

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._depth: dict[str, int] = {}
            self._lock = threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                self._depth[phase_name] = depth
            if depth <= 1:
                print(f"[{_stamp(start)}] {name}: {'  ' * depth}{phase_name} ({num_steps} steps)", flush=True)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
            if depth == 0:
                print(f"[{_stamp(start)}] {name}: {phase_name} done", flush=True)

    return PhasePrinter()


def _require(owner, attribute: str, what: str, trt_info: TensorRT):
    value = getattr(owner, attribute, None)
    if value is None:
        raise EngineBuildError(f"{what} is not available in {trt_info.flavour} {trt_info.version}", stage="configure")
    return value


def _configure(trt_info: TensorRT, builder, network, profile: dict[str, ShapeRange], flags: BuildFlags):
    trt = trt_info.module
    config = builder.create_builder_config()
    config.builder_optimization_level = flags.optimization_level
    if flags.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, flags.workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profile:
            raise EngineBuildError(f"the network input {tensor.name} has no profile (profile inputs: "
                                   f"{', '.join(profile)})", stage="configure")
        if -1 in tuple(tensor.shape):  # static inputs need (and take) no profile
            shapes = profile[tensor.name]
            optimization_profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(optimization_profile)
    if flags.hardware_compatible:
        level = _require(trt, "HardwareCompatibilityLevel", "hardware compatibility", trt_info)
        config.hardware_compatibility_level = level.AMPERE_PLUS
    if flags.version_compatible:  # the lean runtime stays in the plan: a later TensorRT needs no other file
        config.set_flag(_require(trt.BuilderFlag, "VERSION_COMPATIBLE", "BuilderFlag.VERSION_COMPATIBLE", trt_info))
    return config


def _attach_timing_cache(trt_info: TensorRT, config, path: Path | None) -> tuple[object | None, str]:
    if path is None:
        return None, "no timing cache"
    if trt_info.flavour == "tensorrt_rtx":
        # TensorRT-RTX does no autotuning: its timing cache is a deprecated no-op that forces a GPU query
        return None, "timing cache skipped: TensorRT-RTX has none"
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache, f"timing cache {path}"


def build_engine(onnx_path: Path, out_path: Path, profile: dict[str, ShapeRange], flags: BuildFlags, *,
                 trt_info: TensorRT, timing_cache: Path | None = None, verbose: bool = False) -> BuiltEngine:
    """Build one engine from `onnx_path` into `out_path` (atomically), logging to `<model>.build.log` beside
    it. Raises EngineBuildError with the parser's and TensorRT's errors when it fails."""
    trt = trt_info.module
    name = Path(out_path).name
    start = time.perf_counter()
    with open(build_log_path(out_path), "w", encoding="utf-8") as log_file:
        logger = _logger(trt, log_file, verbose, name)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        print(f"[{_stamp(start)}] {name}: parsing {onnx_path}", flush=True)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + logger.errors
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors)}", errors, "parse")
        config = _configure(trt_info, builder, network, profile, flags)
        cache, cache_note = _attach_timing_cache(trt_info, config, timing_cache)
        monitor = _progress_monitor(trt, name, start) if hasattr(trt, "IProgressMonitor") else None
        if monitor is not None:  # kept referenced here for the whole build
            config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT could not build {name}: {'; '.join(logger.errors) or 'no error logged'}"
                                   f" (log: {build_log_path(out_path)})", logger.errors)
        with atomic_path(Path(out_path)) as tmp, open(tmp, "wb") as f:
            f.write(serialized)
        if cache is not None:
            with atomic_path(timing_cache) as tmp, open(tmp, "wb") as f:
                f.write(cache.serialize())
        seconds = round(time.perf_counter() - start, 3)
        print(f"[{_stamp(start)}] {name}: wrote {serialized.nbytes / 2**20:.1f} MiB", flush=True)
        return BuiltEngine(seconds, int(serialized.nbytes), logger.warnings, [cache_note])


def _check_precision(request: BuildRequest, export_precision: str) -> None:
    if request.precision not in PRECISIONS:
        raise InputError(f"unknown precision {request.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if request.precision in ("fp16", "fp32") and request.precision != export_precision:
        raise InputError(
            f"engines are strongly typed: they compute in the exported models' types, and {request.onnx_dir} is "
            f"an {export_precision} export; for {request.precision} engines export with `hyportrait export "
            f"--precision {request.precision}`")


@dataclass
class _Source:
    """The ONNX file one engine is built from."""
    path: Path
    precision: str
    quantization: dict | None = None


def _quantized_source(request: BuildRequest, record, notes: list[str], calibration: Calibration | None) -> _Source:
    """The quantized UNet (made now unless a current one exists), or the export's model when no calibration
    data was given."""
    source = Path(request.onnx_dir) / record.file
    if calibration is None:
        notes.append(f"{record.name} built from the {record.precision} export: {request.precision} quantization "
                     "needs calibration data (--calibration FILE.npz or FILE.json)")
        return _Source(source, record.precision)
    if record.precision == "fp32":
        notes.append(f"an fp32 export: the layers of {record.name} left unquantized compute in fp32")
    calibration_sha = calibration.record["sha256"]
    report, reused = ensure_quantized(source, request.precision, calibration, source_sha256=record.sha256)
    if not reused:
        error = report.evaluation.get("max_relative_error")
        notes.append(f"quantized {record.name} to {request.precision} ({calibration.record['method']})"
                     + (f": max relative error {error} on the calibration inputs" if error is not None else ""))
    quantization = {"precision": request.precision, "scheme": SCHEME, "calibration_sha256": calibration_sha,
                    "quantized_sha256": report.output_sha256}
    return _Source(quantized_path(source, request.precision), request.precision, quantization)


def build_all(request: BuildRequest, *, trt_info: TensorRT | None = None, keep_going: bool = False) -> list[ModelBuild]:
    """Build (or reuse) the engine of every requested model of the export. keep_going: record a model's
    failure and go on (else the first failure raises)."""
    onnx_dir, out_dir = Path(request.onnx_dir), Path(request.out_dir)
    manifest = read_manifest(onnx_dir)
    if request.profile not in PROFILES:
        raise InputError(f"unknown profile {request.profile!r}: choose one of {', '.join(PROFILES)}")
    _check_precision(request, manifest.precision)
    # read once, before any work: a missing or damaged file is one bad_input error, not a failure per model
    calibration = read_calibration(Path(request.calibration)) if request.calibration is not None else None
    profiles = manifest_profiles(manifest, request.profile, request.models)  # shape problems before long work
    trt_info = trt_info or import_tensorrt()
    ensure_writable(out_dir)
    gpu_name, capability = current_gpu()
    timing_cache = request.timing_cache or out_dir / TIMING_CACHE_FILE
    results = []
    for model, profile in profiles.items():
        record = manifest.models[model]
        result = ModelBuild(model, "failed", precision=record.precision)
        try:
            _build_model(request, record, profile, trt_info, (gpu_name, capability), timing_cache, result,
                         calibration)
        except HyportraitError as exc:
            result.error = f"[{exc.code}] {exc.message}"
            if isinstance(exc, EngineBuildError):
                result.errors, result.failed_stage = exc.errors, exc.stage
            if not keep_going:
                raise
        except Exception as exc:  # TensorRT's own exceptions: recorded like a build failure
            result.error = f"{type(exc).__name__}: {exc}"
            if not keep_going:
                raise EngineBuildError(f"{model}: {result.error}") from exc
        finally:
            results.append(result)
    return results


def _build_model(request: BuildRequest, record, profile: dict[str, ShapeRange], trt_info: TensorRT,
                 gpu: tuple[str | None, str | None], timing_cache: Path, result: ModelBuild,
                 calibration: Calibration | None) -> None:
    gpu_name, capability = gpu
    if request.precision in ("int8", "fp8") and record.name in QUANTIZED_MODELS:
        source = _quantized_source(request, record, result.notes, calibration)
    else:
        source = _Source(Path(request.onnx_dir) / record.file, record.precision)
    key = cache_key(onnx_sha256=record.sha256, quantization=source.quantization, precision=source.precision,
                    profile=profile, flags=request.flags, compute_capability=capability,
                    tensorrt_version=trt_info.version, flavour=trt_info.flavour)
    target = engine_path(request.out_dir, record.name)
    result.engine, result.precision = str(target), source.precision
    if is_current(target, key):
        result.status = "current"
        return
    built = build_engine(source.path, target, profile, request.flags, trt_info=trt_info,
                         timing_cache=timing_cache, verbose=request.verbose)
    result.notes += built.notes
    write_engine_manifest(EngineManifest(
        model=record.name, engine_file=target.name, onnx_dir=str(Path(request.onnx_dir).resolve()),
        onnx_file=source.path.name, onnx_sha256=record.sha256, precision=source.precision,
        profile_name=request.profile, profile=profile, flags=request.flags, tensorrt_flavour=trt_info.flavour,
        tensorrt_version=trt_info.version, gpu_name=gpu_name, compute_capability=capability,
        target_compute_capabilities=target_compute_capabilities(trt_info.flavour, capability, request.flags),
        cache_key=key, build_command=build_command(request, [record.name]), quantization=source.quantization,
        build_seconds=built.seconds, engine_bytes=built.engine_bytes, built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        notes=result.notes), target)
    result.status, result.seconds, result.engine_bytes = "built", built.seconds, built.engine_bytes
    result.warnings = built.warnings

