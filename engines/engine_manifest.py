"""The JSON manifest next to every engine, its cache key, and the check the runtime makes before loading it.

An engine is `<out>/<model>.engine`, described by `<model>.engine.json` (this module) and built with the log
`<model>.build.log`. The cache key hashes everything the engine depends on: the ONNX model (its sha256 in the
export manifest; for a quantized model also the calibration data and quantization settings), precision, the
optimization profile, build flags, the build GPU's compute capability and the TensorRT version and flavour.
`hyportrait build` reuses an engine whose key is unchanged and rebuilds any other.

`check_engine` is what the runtime calls before deserializing: TensorRT itself would fail on a foreign plan
with an opaque error, or worse, accept shapes only to fail in the middle of a run.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hyportrait
from hyportrait.errors import EngineMismatchError
from hyportrait.files import write_json

from .profiles import Shape, ShapeRange

ENGINE_SUFFIX = ".engine"
MANIFEST_SUFFIX = ".engine.json"
LOG_SUFFIX = ".build.log"
FLAVOURS = ("tensorrt", "tensorrt_rtx")
# TensorRT-RTX support matrix: without explicit compute capabilities an engine runs on these (Ampere RTX,
# Ada, Blackwell RTX); data-centre GPUs such as the H100 (9.0) are not among them
RTX_DEFAULT_TARGETS = ("8.6", "8.9", "12.0")
# HardwareCompatibilityLevel.AMPERE_PLUS: the engine runs on any GPU of compute capability 8.0 or newer
HARDWARE_COMPATIBLE_MIN = (8, 0)


@dataclass(frozen=True)
class BuildFlags:
    """Builder settings that change the engine (and so its cache key)."""
    optimization_level: int = 3  # TensorRT's builder optimization level, 0..5
    workspace_bytes: int | None = None  # memory pool limit for tactics; None: TensorRT's default (the GPU's)
    hardware_compatible: bool = False  # HardwareCompatibilityLevel.AMPERE_PLUS
    version_compatible: bool = False  # VERSION_COMPATIBLE: the plan carries its lean runtime, so later
    # TensorRT versions of the same major version run it
    strongly_typed: bool = True  # always: the ONNX model's types decide each layer's precision


@dataclass
class EngineManifest:
    model: str
    engine_file: str
    onnx_dir: str  # the export folder: its manifest and pose map are read by the runtime too
    onnx_file: str  # the model that was parsed (a quantized one lies next to the export's)
    onnx_sha256: str  # of the export's model, from its manifest
    precision: str  # fp16 / fp32 as exported, or int8 / fp8 for a quantized model
    profile_name: str
    profile: dict[str, ShapeRange]
    flags: BuildFlags
    tensorrt_flavour: str
    tensorrt_version: str
    gpu_name: str | None
    compute_capability: str | None  # of the GPU it was built on (None: built without one)
    target_compute_capabilities: list[str]  # where it runs (any >= 8.0 when hardware-compatible)
    cache_key: str
    build_command: str  # `hyportrait build ...` that rebuilds exactly this engine
    quantization: dict | None = None  # calibration sha256, settings and quantized model sha256
    build_seconds: float = 0.0
    engine_bytes: int = 0
    built_at: str = ""
    hyportrait_version: str = hyportrait.__version__
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["profile"] = {name: shapes.to_json() for name, shapes in self.profile.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> EngineManifest:
        data = dict(data)
        data["profile"] = {name: ShapeRange.from_json(s) for name, s in data["profile"].items()}
        data["flags"] = BuildFlags(**data["flags"])
        return cls(**data)


def engine_path(out_dir: Path, model: str) -> Path:
    return Path(out_dir) / f"{model}{ENGINE_SUFFIX}"


def manifest_path(engine: Path) -> Path:
    return Path(engine).with_name(Path(engine).name.removesuffix(ENGINE_SUFFIX) + MANIFEST_SUFFIX)


def build_log_path(engine: Path) -> Path:
    return Path(engine).with_name(Path(engine).name.removesuffix(ENGINE_SUFFIX) + LOG_SUFFIX)


def write_engine_manifest(manifest: EngineManifest, engine: Path) -> Path:
    path = manifest_path(engine)
    write_json(path, manifest.to_json())
    return path


def read_engine_manifest(engine: Path) -> EngineManifest:
    path = manifest_path(engine)
    if not path.is_file():
        raise EngineMismatchError(f"engine {engine} has no manifest ({path.name}), so it cannot be checked against "
                                  "this GPU and TensorRT; rebuild it with `hyportrait build`")
    return EngineManifest.from_json(json.loads(path.read_text()))


def cache_key(*, onnx_sha256: str, quantization: dict | None, precision: str, profile: dict[str, ShapeRange],
              flags: BuildFlags, compute_capability: str | None, tensorrt_version: str, flavour: str) -> str:
    """sha256 over everything an engine depends on (key order fixed, so equal inputs give equal keys)."""
    material = {
        "onnx_sha256": onnx_sha256, "quantization": quantization, "precision": precision,
        "profile": {name: shapes.to_json() for name, shapes in sorted(profile.items())},
        "flags": asdict(flags), "compute_capability": compute_capability,
        "tensorrt_version": tensorrt_version, "flavour": flavour,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def is_current(engine: Path, key: str) -> bool:
    """Whether `engine` exists, complete, with a manifest of cache key `key`."""
    engine = Path(engine)
    if not engine.is_file() or not manifest_path(engine).is_file():
        return False
    try:
        manifest = read_engine_manifest(engine)
    except (ValueError, TypeError, KeyError):  # an unreadable or older manifest: rebuild
        return False
    return manifest.cache_key == key and manifest.engine_bytes == engine.stat().st_size


def target_compute_capabilities(flavour: str, compute_capability: str | None, flags: BuildFlags) -> list[str]:
    """Where an engine will run, recorded at build time."""
    if flags.hardware_compatible:
        return [f"{HARDWARE_COMPATIBLE_MIN[0]}.{HARDWARE_COMPATIBLE_MIN[1]}+"]
    if flavour == "tensorrt_rtx":
        return list(RTX_DEFAULT_TARGETS)
    return [compute_capability] if compute_capability else []


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _capability(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def shapes_outside(profile: dict[str, ShapeRange], shapes: dict[str, Shape]) -> list[str]:
    """One line per requested input shape the profile cannot take (unknown input, rank, or an axis out of range)."""
    problems = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if name not in profile:
            problems.append(f"the engine has no input {name!r} (it has {', '.join(profile)})")
        elif not profile[name].contains(shape):
            r = profile[name]
            problems.append(f"input {name} of shape {list(shape)} is outside the engine's profile "
                            f"(min {list(r.min)}, max {list(r.max)})")
    return problems


def _gpu_problem(manifest: EngineManifest, gpu_name: str, compute_capability: str) -> str | None:
    here = f"this GPU ({gpu_name}) has compute capability {compute_capability}"
    built = f"{manifest.gpu_name or 'no GPU'}, compute capability {manifest.compute_capability or '-'}"
    if manifest.flags.hardware_compatible:
        if _capability(compute_capability) >= HARDWARE_COMPATIBLE_MIN:
            return None
        return f"the engine is hardware-compatible with Ampere and newer (compute capability 8.0+), {here}"
    if compute_capability in manifest.target_compute_capabilities:
        return None
    return (f"the engine runs on compute capability {', '.join(manifest.target_compute_capabilities) or '-'} "
            f"(built on {built}), {here}")


def _version_problem(manifest: EngineManifest, trt_version: str, flavour: str) -> str | None:
    name = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
    if flavour != manifest.tensorrt_flavour:
        return (f"the engine was built with {name.get(manifest.tensorrt_flavour, manifest.tensorrt_flavour)} "
                f"{manifest.tensorrt_version}, this runtime is {name.get(flavour, flavour)} {trt_version}")
    if trt_version == manifest.tensorrt_version:
        return None
    built, here = _version(manifest.tensorrt_version), _version(trt_version)
    if manifest.flags.version_compatible:
        if here[:1] == built[:1] and here >= built:
            return None
        return (f"the engine is version-compatible from {name[flavour]} {manifest.tensorrt_version} within "
                f"major version {built[0]}, this runtime is {trt_version}")
    return f"the engine was built with {name[flavour]} {manifest.tensorrt_version}, this runtime is {trt_version}"


def rebuild_command(manifest: EngineManifest, *, profile: str | None = None) -> str:
    """The manifest's build command, with another profile when asked."""
    args = shlex.split(manifest.build_command)
    if profile is not None and "--profile" in args:
        args[args.index("--profile") + 1] = profile
    return shlex.join(args)


def check_engine(manifest: EngineManifest, *, gpu_name: str, compute_capability: str, trt_version: str,
                 flavour: str, shapes: dict[str, Shape] | None = None) -> None:
    """Refuse an engine this GPU, TensorRT install or these input shapes cannot use.

    GPU: its compute capability must be one the engine targets (any 8.0+ when hardware-compatible). TensorRT:
    same flavour and exact version, or for a version-compatible engine the same major version, not older.
    shapes (optional, by input name): each inside the engine's optimization profile. Raises
    EngineMismatchError naming every difference and the `hyportrait build` command that rebuilds it.
    """
    problems = [p for p in (_gpu_problem(manifest, gpu_name, compute_capability),
                            _version_problem(manifest, trt_version, flavour)) if p]
    outside = shapes_outside(manifest.profile, shapes or {})
    problems += outside
    if not problems:
        return
    command = rebuild_command(manifest, profile="all" if outside and manifest.profile_name != "all" else None)
    raise EngineMismatchError(f"engine {manifest.engine_file} ({manifest.model}, {manifest.precision}) cannot be "
                              f"used here: {'; '.join(problems)}. Rebuild it on this machine with: {command}")
