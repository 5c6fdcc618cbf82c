"""Exporting one network to ONNX and proving the file computes what the PyTorch module computes.

Every exporter module describes its network as an `ExportSpec` (an eval-mode wrapper taking flat tensors,
example inputs, output names, dynamic axes); `export_onnx` writes the model atomically and returns its
manifest record, `validate_onnx` runs it with onnxruntime against the module.

The TorchScript-based exporter is used: at opset 18 it emits plain MatMul/Softmax attention and
GroupNorm/LayerNorm patterns that TensorRT and onnxruntime fuse, keeps dynamic axes under the names given,
and exports the tiny test networks in seconds where the torch.export-based one takes minutes.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyportrait.errors import ExportError, InputError
from hyportrait.files import probe_writable, sha256_file
from hyportrait.networks.contract import ModelContract

# 18: the newest opset the TorchScript exporter supports fully; TensorRT 8.6+ and onnxruntime 1.14+ read it.
OPSET = 18
PRECISIONS = ("fp32", "fp16")
# protobuf cannot serialise a message of 2 GiB or more: larger models keep their weights in a .data file
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # a margin for the graph itself
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass
class ExportSpec:
    name: str  # the model file is f"{name}.onnx"
    module: nn.Module  # eval-mode wrapper: flat tensor inputs -> tensor or tuple of tensors
    inputs: dict[str, torch.Tensor]  # example inputs by ONNX input name, in forward-argument order
    outputs: list[str]  # ONNX output names
    dynamic_axes: dict[str, dict[int, str]]  # per input/output name: {axis: "symbolic name"}
    sources: tuple[str, ...] = ()  # weights-folder files it comes from (hashed into the manifest)
    extra_inputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # more sets to validate on
    fp32_inputs: tuple[str, ...] = ()  # floating inputs that stay fp32 in an fp16 export (e.g. the timestep)
    allow_fp16: bool = True  # False: the reference runs it in fp32, so an fp16 export keeps it fp32

    @classmethod
    def of(cls, contract: ModelContract, module: nn.Module, inputs: dict[str, torch.Tensor], **rest) -> ExportSpec:
        """The spec of a contract's model: output names, dynamic axes and dtypes from the contract."""
        if tuple(inputs) != contract.input_names:
            raise ValueError(f"{contract.name}: example inputs {list(inputs)}, the contract's "
                             f"{list(contract.input_names)}")
        return cls(contract.name, module, inputs, list(contract.output_names), contract.dynamic_axes,
                   fp32_inputs=contract.fp32_inputs, allow_fp16=contract.allow_fp16, **rest)


@dataclass
class TensorRecord:
    name: str
    dtype: str
    shape: list[int | str]  # symbolic names on dynamic axes


@dataclass
class ModelRecord:
    name: str
    file: str
    data_file: str | None  # external weights next to the model, for models over 2 GB
    precision: str
    opset: int
    inputs: list[TensorRecord]
    outputs: list[TensorRecord]
    dynamic_axes: dict[str, dict[int, str]]
    size_bytes: int  # model file plus data file
    sha256: str  # of the model file
    data_sha256: str | None
    export_seconds: float
    sources: list[str]
    validation: dict | None = None  # filled by the caller after `validate_onnx`


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def ensure_writable(out_dir: Path) -> Path:
    """Create the output folder and prove a file can be written there, before any long work."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(out_dir)
    except OSError as exc:
        raise InputError(f"output folder {out_dir} is not writable ({exc.strerror or exc})") from None
    return out_dir


def _fp32_norm_forward(norm: nn.GroupNorm | nn.LayerNorm):
    def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float()

    if isinstance(norm, nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x.float(), norm.num_groups, fp32(norm.weight), fp32(norm.bias), norm.eps).to(x.dtype)
    else:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.float(), norm.normalized_shape, fp32(norm.weight), fp32(norm.bias),
                                norm.eps).to(x.dtype)
    return forward


def fp16_module(module: nn.Module) -> nn.Module:
    """An fp16 copy of `module` whose GroupNorm/LayerNorm layers compute in fp32.

    Their statistics over thousands of fp16 activations lose precision (and may overflow); the exported
    graph gets a Cast to fp32 before each norm and back after it, which TensorRT keeps in fp32. The norms'
    parameters stay fp16 like every other one (code that reads a block's dtype off its first parameter,
    as diffusers' temporal decoder does, still sees fp16) and are upcast inside the computation.
    """
    half = copy.deepcopy(module).half()
    for m in half.modules():
        if isinstance(m, _NORMS):
            m.forward = _fp32_norm_forward(m)
    return half


def _cast_inputs(spec: ExportSpec, precision: str) -> dict[str, torch.Tensor]:
    if precision == "fp32":
        return dict(spec.inputs)
    return {k: v.half() if v.is_floating_point() and k not in spec.fp32_inputs else v
            for k, v in spec.inputs.items()}


def effective_precision(spec: ExportSpec, precision: str) -> str:
    return "fp16" if check_precision(precision) == "fp16" and spec.allow_fp16 else "fp32"


def _dtype_name(elem_type: int) -> str:
    import onnx

    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def _tensor_records(values) -> list[TensorRecord]:
    return [TensorRecord(v.name, _dtype_name(v.type.tensor_type.elem_type),
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def module_device(module: nn.Module) -> torch.device:
    """Where the module's weights are: export traces and validation references run there (a GPU when the
    networks were moved to one; the example inputs stay on the CPU)."""
    return next(iter(module.parameters()), torch.empty(0)).device


def _trace_to_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], spec: ExportSpec, path: Path) -> None:
    dynamic_axes = {k: v for k, v in spec.dynamic_axes.items() if k in inputs or k in spec.outputs}
    device = module_device(module)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation notice and tracer warnings about Python constants
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=list(spec.outputs), dynamic_axes=dynamic_axes, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False,
                          custom_opsets={"com.microsoft": 1})  # onnxruntime's fused attention, when asked for


def export_onnx(spec: ExportSpec, out_dir: Path, precision: str = "fp32", *,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> ModelRecord:
    """Write `out_dir/{spec.name}.onnx` (and `{spec.name}.onnx.data` when the model exceeds
    `external_data_threshold` bytes) and return its manifest record.

    The model is built in a hidden temporary folder inside `out_dir` and moved into place at the end (data
    file first, model last), so an interrupted or failed export leaves no model file behind.
    """
    import onnx

    precision = effective_precision(spec, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = fp16_module(spec.module) if precision == "fp16" else spec.module
    inputs = _cast_inputs(spec, precision)
    model_name, data_name = f"{spec.name}.onnx", f"{spec.name}.onnx.data"
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{spec.name}.partial-"))
    try:
        traced = tmp / "traced" / model_name
        traced.parent.mkdir()
        try:
            _trace_to_onnx(module, inputs, spec, traced)
        except Exception as exc:
            raise ExportError(f"exporting {spec.name} to ONNX failed: {type(exc).__name__}: {exc}") from exc
        # the exporter writes one file per tensor past 2 GB; reload and save as one model (+ one data file)
        external = sum(f.stat().st_size for f in traced.parent.iterdir()) > external_data_threshold
        model = onnx.load(str(traced), load_external_data=True)
        onnx.helper.set_model_props(model, {"hyportrait.model": spec.name, "hyportrait.precision": precision})
        if external:  # set by hand: onnx.save_model's own option checks the location against the cwd
            for tensor in model.graph.initializer:
                if tensor.HasField("raw_data"):
                    onnx.external_data_helper.set_external_data(tensor, data_name)
        final = tmp / model_name
        onnx.save_model(model, str(final))
        del model
        onnx.checker.check_model(str(final))  # by path: works past 2 GB
        graph = onnx.load(str(final), load_external_data=False).graph
        record = ModelRecord(
            name=spec.name, file=model_name, data_file=data_name if external else None, precision=precision,
            opset=OPSET, inputs=_tensor_records(graph.input), outputs=_tensor_records(graph.output),
            dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
            size_bytes=final.stat().st_size + ((tmp / data_name).stat().st_size if external else 0),
            sha256=sha256_file(final), data_sha256=sha256_file(tmp / data_name) if external else None,
            export_seconds=0.0, sources=list(spec.sources))
        if external:
            os.chmod(tmp / data_name, final.stat().st_mode)  # onnx creates it owner-only
            os.replace(tmp / data_name, out_dir / data_name)
        os.replace(final, out_dir / model_name)
        if not external:
            (out_dir / data_name).unlink(missing_ok=True)  # a stale data file of an earlier export
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record.export_seconds = round(time.perf_counter() - start, 3)
    return record


def relative_error(a, b) -> float:
    """||a - b|| / ||b||, in float64; b is the reference. Falls back to ||a - b|| when b is all zeros."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    diff = np.linalg.norm(a - b)
    ref = np.linalg.norm(b)
    return float(diff / ref) if ref > 0 else float(diff)


def random_like(inputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fresh inputs of the same shapes and dtypes: floats uniform over the example's range (widened by 1
    either side when it is a single value), integers within the example's [min, max]."""
    gen = torch.Generator().manual_seed(seed)
    fresh = {}
    for name, x in inputs.items():
        if x.dtype == torch.bool:
            fresh[name] = torch.randint(0, 2, x.shape, generator=gen).bool()
        elif x.is_floating_point():
            lo, hi = float(x.min()), float(x.max())
            if lo == hi:
                lo, hi = lo - 1.0, hi + 1.0
            fresh[name] = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(x.dtype)
        else:
            fresh[name] = torch.randint(int(x.min()), int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype)
    return fresh


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def default_input_sets(spec: ExportSpec) -> list[dict[str, torch.Tensor]]:
    """The example, each of `spec.extra_inputs`, then one fresh random set shaped like each of those."""
    given = [spec.inputs, *spec.extra_inputs]
    return given + [random_like(s, seed=1000 + i) for i, s in enumerate(given)]


@torch.no_grad()
def module_references(spec: ExportSpec, input_sets: Sequence[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    """The module's outputs (on the CPU) for each input set, run where the module's weights are."""
    device = module_device(spec.module)
    return [tuple(r.cpu() for r in _as_tuple(spec.module(*(v.to(device) for v in inputs.values()))))
            for inputs in input_sets]


def ort_session(model_path: Path, providers: Sequence[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    return ort.InferenceSession(str(model_path), options, providers=list(providers or ["CPUExecutionProvider"]))


def validate_onnx(spec: ExportSpec, model_path: Path, providers: Sequence[str] | None = None,
                  input_sets: Iterable[dict[str, torch.Tensor]] | None = None,
                  references: Sequence[tuple[torch.Tensor, ...]] | None = None) -> list[float]:
    """Relative error of the ONNX model against `spec.module` (fp32, in torch) per input set.

    Default sets: the example, each of `spec.extra_inputs`, then one fresh random set shaped like each of
    those. The ONNX model gets each input in its own declared dtype, so an fp16 model is measured
    against the fp32 module. Per set the error is the largest over the outputs. `references`: the module's
    outputs per set, computed beforehand (from `module_references`), so that the module need not share the GPU
    with onnxruntime.
    """
    input_sets = list(input_sets) if input_sets is not None else default_input_sets(spec)
    if references is None:
        references = module_references(spec, input_sets)
    session = ort_session(model_path, providers)
    onnx_dtypes = {i.name: _ORT_TYPES[i.type] for i in session.get_inputs()}
    errors = []
    for inputs, reference in zip(input_sets, references):
        feed = {k: v.numpy().astype(onnx_dtypes[k]) for k, v in inputs.items() if k in onnx_dtypes}
        results = session.run(list(spec.outputs), feed)
        if len(results) != len(reference):
            raise ExportError(f"{spec.name}: ONNX model has {len(results)} outputs, module {len(reference)}")
        errors.append(max(relative_error(o, r.float().numpy()) for o, r in zip(results, reference)))
    return errors


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}
