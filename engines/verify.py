"""`hyportrait verify`: every engine checked against onnxruntime on the same inputs, through polygraphy.

For each model of the export, polygraphy's `Comparator` runs the export's ONNX model with onnxruntime (the
reference) and the candidate on the same input sets, and `CompareFunc.simple` reports each output's errors
(max and mean absolute and relative difference) against the tolerance:
- candidates: a `hyportrait build` folder (each engine with polygraphy's TensorRT runner, after its manifest
  is checked against this GPU and TensorRT), or another export folder (its models with onnxruntime: an
  fp16 or quantized export against the fp32 one, or a check of the check itself);
- input sets: random inputs (polygraphy's data loader, seeded) at the engine profile's opt and min shapes
  of every model, plus, with `--inputs FILE.npz` (`hyportrait calibrate`), the UNet's recorded inputs.
The report (per model, output and input set) goes to stdout and, with `--report`, to a JSON file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hyportrait.errors import InputError
from hyportrait.export.manifest import MANIFEST_FILE, Manifest, read_manifest
from hyportrait.files import read_npz

from .engine_manifest import check_engine, engine_path, read_engine_manifest
from .profiles import manifest_profiles

# default tolerances by the reference export's precision: what an engine of the same precision should meet
TOLERANCES = {"fp32": {"rtol": 1e-3, "atol": 1e-3}, "fp16": {"rtol": 2e-2, "atol": 2e-2}}
RECORDED_MODEL = "unet"  # the model whose inputs `hyportrait calibrate` records


@dataclass
class OutputError:
    model: str
    output: str
    inputs: str  # which input set: "random opt", "random min", "recorded <set>"
    max_abs: float
    max_rel: float
    mean_abs: float
    mean_rel: float
    passed: bool


@dataclass
class VerifyReport:
    candidates: str
    reference: str
    rtol: float
    atol: float
    errors: list[OutputError] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it was not compared

    @property
    def passed(self) -> bool:
        return bool(self.errors) and all(e.passed for e in self.errors)

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def table(self) -> str:
        header = f"{'model':12s} {'output':18s} {'inputs':14s} {'max abs':>10s} {'max rel':>10s} {'mean abs':>10s}"
        lines = [header + "  result"]
        for e in self.errors:
            lines.append(f"{e.model:12s} {e.output:18s} {e.inputs:14s} {e.max_abs:10.3g} {e.max_rel:10.3g} "
                         f"{e.mean_abs:10.3g}  {'ok' if e.passed else 'FAILED'}")
        lines += [f"{model:12s} skipped: {why}" for model, why in self.skipped.items()]
        return "\n".join(lines)


def _is_export(folder: Path) -> bool:
    return (folder / MANIFEST_FILE).is_file()


def _onnxruntime_runner(path: Path, providers: list[str]):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=providers), name=f"onnxruntime:{path}")


def _engine_runner(path: Path):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from .tensorrt_module import current_gpu, import_tensorrt

    trt_info = import_tensorrt()
    gpu_name, capability = current_gpu()
    if capability is None:
        raise InputError("verifying engines needs the CUDA GPU they were built for; torch sees none")
    check_engine(read_engine_manifest(path), gpu_name=gpu_name, compute_capability=capability,
                 trt_version=trt_info.version, flavour=trt_info.flavour)
    return TrtRunner(EngineFromBytes(path.read_bytes()), name=f"tensorrt:{path}")


def _candidate_runner(folder: Path, model: str, manifest: Manifest | None, providers: list[str]):
    """The candidate's runner for `model`, or None when the folder has no such model."""
    if manifest is not None:
        record = manifest.models.get(model)
        return None if record is None else _onnxruntime_runner(folder / record.file, providers)
    path = engine_path(folder, model)
    return _engine_runner(path) if path.is_file() else None


def _random_sets(shapes: dict, seed: int) -> list[tuple[str, object]]:
    """Polygraphy data loaders at the profile's opt and min shapes (dtypes from the reference model)."""
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader

    sets = []
    for which in ("opt", "min"):
        metadata = TensorMetadata()
        for name, shape_range in shapes.items():
            metadata.add(name, dtype=None, shape=getattr(shape_range, which))
        if which == "min" and all(r.is_static for r in shapes.values()):
            break  # one shape only
        sets.append((f"random {which}", DataLoader(seed=seed, iterations=1, input_metadata=metadata)))
    return sets


def _recorded_sets(path: Path, input_names: list[str]) -> list[tuple[str, list[dict[str, np.ndarray]]]]:
    """The UNet input sets of a `hyportrait calibrate` .npz (arrays named '<set>/<input>')."""
    sets: dict[str, dict[str, np.ndarray]] = {}
    for key, array in read_npz(path, "recorded inputs").items():
        name, _, tensor = key.partition("/")
        sets.setdefault(name, {})[tensor] = array
    usable = {name: feed for name, feed in sets.items() if set(feed) == set(input_names)}
    if not usable:
        raise InputError(f"{path} holds no complete set of the {RECORDED_MODEL}'s inputs ({', '.join(input_names)})")
    return [(f"recorded {name}", [feed]) for name, feed in sorted(usable.items())]


def verify(candidates: Path, reference: Path, *, models: list[str] | None = None, recorded: Path | None = None,
           random: bool = True, rtol: float | None = None, atol: float | None = None,
           providers: list[str] | None = None, seed: int = 1) -> VerifyReport:
    """Compare the models of `candidates` (an engine folder or an export folder) with the export `reference`
    run by onnxruntime; `models` limits the comparison, `recorded` adds the UNet's recorded input sets,
    random=False leaves the UNet's random sets out then (a full-size UNet's runs are long)."""
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    candidates, reference = Path(candidates), Path(reference)
    ref_manifest = read_manifest(reference)
    cand_manifest = read_manifest(candidates) if _is_export(candidates) else None
    if cand_manifest is None and not any(candidates.glob("*.engine")):
        raise InputError(f"{candidates} is neither an engine folder (`hyportrait build`) nor an export folder "
                         "(`hyportrait export`)")
    names = list(models) if models else list(ref_manifest.models)
    unknown = [name for name in names if name not in ref_manifest.models]
    if unknown:
        raise InputError(f"the export {reference} has no model {', '.join(unknown)}")
    tolerance = TOLERANCES.get(ref_manifest.precision, TOLERANCES["fp16"])
    report = VerifyReport(str(candidates), str(reference), rtol if rtol is not None else tolerance["rtol"],
                          atol if atol is not None else tolerance["atol"])
    providers = providers or ["CPUExecutionProvider"]
    profiles = manifest_profiles(ref_manifest, "all", names)
    compare = SimpleCompareFunc(rtol=report.rtol, atol=report.atol)
    # read before any model runs: a bad file fails at once, not after the other models' comparisons
    recorded_sets = (_recorded_sets(Path(recorded), list(profiles[RECORDED_MODEL]))
                     if recorded is not None and RECORDED_MODEL in names else [])
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # the report says what matters, once
        for name in names:
            candidate = _candidate_runner(candidates, name, cand_manifest, providers)
            if candidate is None:
                report.skipped[name] = f"{candidates} has no {name}"
                continue
            records = recorded is not None and name == RECORDED_MODEL
            sets = _random_sets(profiles[name], seed) if random or not records else []
            if records:
                sets += recorded_sets
            runners = [_onnxruntime_runner(reference / ref_manifest.models[name].file, providers), candidate]
            report.errors += _compare(name, runners, sets, compare)
    return report


def _compare(name: str, runners: list, sets: list, compare) -> list[OutputError]:
    """Each input set through both runners (polygraphy's Comparator), each output's errors."""
    from polygraphy.comparator import Comparator

    errors = []
    for label, loader in sets:
        results = Comparator.run(runners, data_loader=loader)
        (accuracy,) = Comparator.compare_accuracy(results, compare_func=compare)
        for iteration in next(iter(accuracy.values())):
            for output, result in iteration.items():
                errors.append(OutputError(name, output, label, float(result.max_absdiff), float(result.max_reldiff),
                                          float(result.mean_absdiff), float(result.mean_reldiff), bool(result)))
    return errors
