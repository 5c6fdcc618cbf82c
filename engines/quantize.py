"""INT8 and FP8 explicit quantization of the UNet: Q/DQ nodes placed as onnxruntime's QDQ quantizer places them.

Scheme (what TensorRT's explicit quantization expects):
- Only MatMul, Conv and Gemm are quantized, at their inputs: weights per output channel, activations per
  tensor, both symmetric (zero point 0); outputs and biases stay in the model's float type, so each Q/DQ
  pair sits where TensorRT fuses it into the quantized kernel. Other consumers of a quantized activation
  (skip connections, the norm beside a shortcut convolution) read it unquantized.
- Scales come from a min/max calibration: onnxruntime runs of the model over recorded input sets (the ranges
  of onnxruntime's symmetric MinMax calibrator, in linear time), or the same amax recorded in PyTorch
  (`torch_quant.py`, where onnxruntime cannot run the model). int8 maps amax to 127; fp8 (e4m3fn) maps amax
  to 448, as TensorRT does.
- `_place_qdq` inserts the nodes in one pass. For int8 it gives each quantized node what onnxruntime's
  `quantize_static` (QDQ format, per channel, symmetric) gives it, bit for bit (tested against it): the
  same names, axes, scales and int8 weights (for weights stored as initializers, as every export's are; a
  Constant-node weight is quantized per channel here, per tensor there). That quantizer rewires every node of the graph for each tensor
  it quantizes, time quadratic in the graph's size (13.5 s against 1.2 s on the tiny UNet); its float8
  path would fit a Gaussian to each tensor (a larger error on the test UNet) and quantize weights channel
  by channel in Python (14 minutes at the official size).
- Kept in the source precision: every other op (normalisations, softmax, activations, the sinusoidal
  embeddings) and the sensitive MatMul/Conv/Gemm nodes of `select_nodes` (first and last convolution, the
  time-embedding MLPs, the attention matmuls of two activations). The list, with reasons, goes into the
  quantized model's metadata and its JSON report.
- Opset 19 (QuantizeLinear-19 takes float16 inputs and float8 types); the source is converted first.
Output `<model>.<precision>.onnx` (+ `.onnx.data` past 2 GB) next to the source, with
`<model>.<precision>.quantization.json`: the settings, the calibration, the excluded nodes and, for input-set
calibrations, the quality report (relative error of the output against the unquantized model, per input set,
run with onnxruntime; at the official size benchmarks/quantize_gpu.py reports it with `torch_quant`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from hyportrait.errors import InputError, describe
from hyportrait.export.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    ModelRecord,
    relative_error,
)
from hyportrait.files import atomic_path, read_npz, sha256_file, write_json

PRECISIONS = ("int8", "fp8")
QUANTIZED_OP_TYPES = ("MatMul", "Conv", "Gemm")
QDQ_OPSET = 19
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_QUANTIZED_SUFFIX = "_quantized"  # onnxruntime's name for a quantized weight: the float weight's + this
SCHEME = ("qdq-v2: MatMul/Conv/Gemm inputs (only they read the dequantized activations), weights per channel, "
          "activations per tensor, symmetric, amax scales")
# (graph scope segment, why nodes under it stay unquantized)
SENSITIVE_SCOPES = (
    ("conv_in", "first convolution: reads the noisy latent and the conditioning latent at full precision"),
    ("conv_out", "last convolution: writes the v-prediction the sampler integrates"),
    ("time_embedding", "time-embedding MLP: one vector per call, negligible compute, steers every block"),
    ("add_embedding", "added-time-ids MLP (fps, motion bucket, noise augmentation): negligible compute"),
    ("time_emb_proj", "per-block projection of the time embedding: one vector per call, negligible compute"),
    ("time_pos_embed", "frame-position MLP of the temporal blocks: one vector per frame"),
)
ACTIVATION_MATMUL = ("attention matmul of two activations (Q.K^T, probabilities.V): softmax probabilities "
                     "quantize poorly per tensor, and TensorRT fuses attention in the source precision")
NO_CHANNEL_AXIS = "weight without the channel axis its op is quantized along (a 1-D MatMul operand): kept float"
OTHER_OPS = ("op type not quantized: normalisations, softmax, activations, element-wise ops and the sinusoidal "
             "embeddings keep the source precision")
_METADATA_KEY = "hyportrait.quantization"
RANGES_FORMAT = "hyportrait.activation-ranges/1"
ONNXRUNTIME_METHOD = "onnxruntime MinMax, symmetric"
TORCH_METHOD = "PyTorch forward pre-hooks: amax of the quantized modules' inputs, symmetric"


@dataclass
class NodeSelection:
    quantized: list[str]
    excluded: dict[str, list[str]]  # reason -> node names


@dataclass
class QuantizationReport:
    precision: str
    scheme: str
    source: str
    source_sha256: str
    output: str
    output_sha256: str
    data_file: str | None
    opset: int
    calibration: dict  # how many input sets, their origin and sha256, the calibration method
    quantized_nodes: int
    excluded: dict[str, list[str]]
    not_quantized_op_types: str
    evaluation: dict = field(default_factory=dict)  # relative errors against the unquantized model
    seconds: float = 0.0


def quantized_path(source: Path, precision: str) -> Path:
    """`unet.onnx` -> `unet.int8.onnx` in the same folder."""
    source = Path(source)
    return source.with_name(f"{source.name.removesuffix('.onnx')}.{precision}.onnx")


def report_path(model: Path) -> Path:
    model = Path(model)
    return model.with_name(model.name.removesuffix(".onnx") + ".quantization.json")


def _weight_input(node: onnx.NodeProto, constants: dict[str, int]) -> str | None:
    """The constant (weight) input of a MatMul/Conv/Gemm node, if it has one."""
    return next((name for name in node.input[:2] if name in constants), None)


def _constants(graph: onnx.GraphProto) -> dict[str, int]:
    """The graph's constants (initializers and Constant nodes' outputs) and their ranks."""
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":  # a `value` tensor, or a scalar or list attribute (value_float, ...)
            value = node.attribute[0] if node.attribute else None
            ranks[node.output[0]] = len(value.t.dims) if value is not None and value.name == "value" else 0
    return ranks


def select_nodes(model: onnx.ModelProto) -> NodeSelection:
    """Which MatMul/Conv/Gemm nodes to quantize, and why the others are kept (see SENSITIVE_SCOPES)."""
    graph = model.graph
    constants = _constants(graph)
    quantized, excluded = [], {}
    for node in graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        scopes = set(node.name.split("/"))
        reason = next((why for scope, why in SENSITIVE_SCOPES if scope in scopes), None)
        weight = _weight_input(node, constants) if reason is None else None
        if reason is None and weight is None:
            reason = ACTIVATION_MATMUL
        elif weight is not None and constants[weight] <= _weight_axis(node):
            reason = NO_CHANNEL_AXIS
        if reason is None:
            quantized.append(node.name)
        else:
            excluded.setdefault(reason, []).append(node.name)
    return NodeSelection(quantized, excluded)


def _numpy_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def model_input_dtypes(model_path: Path) -> dict[str, np.dtype]:
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {i.name: _numpy_dtype(i.type.tensor_type.elem_type) for i in graph.input}


def random_unet_feeds(record: ModelRecord, count: int, *, batch: int = 1, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` random input sets for the UNet of an export manifest (for tests and smoke runs; real calibration
    uses the runtime's conditioning). Floats are standard normal except the scalars that feed embeddings,
    drawn over the pipeline's ranges as export_unet draws them: c_noise in [-1.55, 1.64], and time ids
    (fps 5..30, motion bucket 0..255, noise augmentation 0..0.1)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for tensor in record.inputs:
            shape = [batch if isinstance(d, str) else d for d in tensor.shape]
            feed[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
        if "timestep" in feed:
            feed["timestep"] = rng.uniform(-1.55, 1.64, feed["timestep"].shape).astype(feed["timestep"].dtype)
        if "added_time_ids" in feed:
            ids = feed["added_time_ids"]
            columns = [rng.uniform(5, 30, ids.shape[0]), rng.integers(0, 256, ids.shape[0]),
                       rng.uniform(0, 0.1, ids.shape[0])]
            feed["added_time_ids"] = np.stack(columns, axis=1).astype(ids.dtype)
        feeds.append(feed)
    return feeds


def save_calibration_npz(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> Path:
    """Write input sets as one .npz, arrays named `<set index>/<input name>` (the --calibration format)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{f"{i}/{name}": value for i, feed in enumerate(feeds) for name, value in feed.items()})
    return path


def load_calibration_npz(path: Path) -> list[dict[str, np.ndarray]]:
    path = Path(path)
    sets: dict[int, dict[str, np.ndarray]] = {}
    for key, array in read_npz(path, "calibration file").items():
        index, sep, name = key.partition("/")
        if not sep or not index.isdigit():
            raise InputError(f"{path}: array {key!r} is not named '<set index>/<input name>'")
        sets.setdefault(int(index), {})[name] = array
    if not sets:
        raise InputError(f"{path} holds no input sets")
    return [sets[i] for i in sorted(sets)]


def feeds_sha256(feeds: Sequence[dict[str, np.ndarray]]) -> str:
    """A digest of input sets (names, dtypes, shapes, bytes), for cache keys."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{value.dtype}:{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def default_providers() -> list[str]:
    """onnxruntime's CUDA provider when this install has it (the UNet is heavy for a CPU), else the CPU."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def _is_large(model_path: Path) -> bool:
    size = sum(p.stat().st_size for p in (model_path, Path(f"{model_path}.data")) if p.is_file())
    return size > EXTERNAL_DATA_THRESHOLD


def upgrade_opset(source: Path, out: Path) -> Path:
    """`source` converted to opset QDQ_OPSET at `out` (same folder: external weights stay shared, unloaded)."""
    model = onnx.load(str(source), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < QDQ_OPSET:
        model = onnx.version_converter.convert_version(model, QDQ_OPSET)
    onnx.save_model(model, str(out))
    return out


def calibrate(model_path: Path, feeds: Sequence[dict[str, np.ndarray]], *, providers: Sequence | None = None):
    """Per-tensor symmetric ranges (-amax, amax) of the inputs and outputs of every MatMul/Conv/Gemm over `feeds`,
    run with onnxruntime (providers default: `default_providers()`), as onnxruntime's MinMax calibrator with
    `symmetric` computes them (the same tensors, values and dtypes; its TensorsData is returned). Its calibrator
    is not used: it inserts its reduce nodes in time quadratic in the graph's size (38 s against 2 s here on the
    tiny UNet), and rewrites a large model's weights beside its graph. Tensor names are the export's, so ranges
    taken on one export of a network apply to another export of it (e.g. at a smaller latent size)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, TensorsData

    if not feeds:
        raise ValueError("calibration needs at least one input set")
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    dtypes = tensor_dtypes(model)
    inputs = {i.name: dtypes[i.name] for i in model.graph.input}
    weights = {t.name for t in model.graph.initializer}
    tensors = sorted({name for node in model.graph.node if node.op_type in QUANTIZED_OP_TYPES
                      for name in (*node.input, *node.output)
                      if name and name not in weights and dtypes.get(name) in (np.float32, np.float16)})
    taken = set(dtypes) | {name for node in model.graph.node for name in node.output}
    amax = []
    for name in tensors:  # appended: each reads a tensor made earlier, so the order stays valid
        absolute, top = _unused(f"{name}/abs", taken), _unused(f"{name}/amax", taken)
        model.graph.node.extend([onnx.helper.make_node("Abs", [name], [absolute]),
                                 onnx.helper.make_node("ReduceMax", [absolute], [top], keepdims=0)])
        element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name]))
        model.graph.output.append(onnx.helper.make_tensor_value_info(top, element, []))
        amax.append(top)
    # beside the source, so that its weights file is read under the same relative name (not copied)
    fd, augmented = tempfile.mkstemp(dir=model_path.parent, prefix=f".{model_path.stem}.calibration-",
                                     suffix=".onnx")
    os.close(fd)
    try:
        onnx.save_model(model, augmented)
        del model
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own tensors
        session = ort.InferenceSession(augmented, options, providers=list(providers or default_providers()))
        runs = [session.run(amax, {k: np.asarray(v).astype(inputs[k]) for k, v in feed.items()}) for feed in feeds]
    finally:
        os.unlink(augmented)
    ranges = {}
    for name, values in zip(tensors, zip(*runs)):
        top = np.nanmax(np.stack(values)).reshape(1)
        ranges[name] = (-top, top)
    return TensorsData(CalibrationMethod.MinMax, ranges)


def _unused(name: str, taken: set[str]) -> str:
    """`name`, or with the first counter suffix that no tensor of the graph has; then taken."""
    candidate, count = name, 0
    while candidate in taken:
        count += 1
        candidate = f"{name}_{count}"
    taken.add(candidate)
    return candidate


def _amax(ranges, name: str) -> float:
    low, high = ranges[name].range_value
    return float(np.maximum(np.abs(np.asarray(low, np.float64)), np.abs(np.asarray(high, np.float64))).max())


def tensor_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """The element type of every typed tensor of the graph, after shape inference (run on the graph without
    its weights, so it works past 2 GB)."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for tensor in bare.graph.initializer:  # dims and type are all inference needs
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    graph = onnx.shape_inference.infer_shapes(bare).graph
    values = [*graph.input, *graph.value_info, *graph.output]
    types = {v.name: _numpy_dtype(v.type.tensor_type.elem_type) for v in values if v.type.tensor_type.elem_type}
    types |= {t.name: _numpy_dtype(t.data_type) for t in model.graph.initializer}
    return types


def activation_inputs(model: onnx.ModelProto, selection: NodeSelection) -> dict[str, list[str]]:
    """The activation (non-constant) inputs of the nodes to quantize: tensor name -> the nodes reading it."""
    constants = _constants(model.graph)
    chosen = set(selection.quantized)
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.name in chosen:
            for name in node.input[:2]:
                if name and name not in constants:
                    readers.setdefault(name, []).append(node.name)
    return readers


def _check_coverage(model: onnx.ModelProto, selection: NodeSelection, ranges) -> None:
    """Ranges taken on another export of the network must still name every tensor to be quantized."""
    missing = sorted(set(activation_inputs(model, selection)) - set(ranges.keys()))
    if missing:
        raise InputError(f"the calibration ranges lack {len(missing)} tensors to quantize (e.g. {missing[0]}): "
                         "calibrate on an export of the same network")


def ranges_from_amax(model: onnx.ModelProto, amax: dict[str, float]):
    """Symmetric ranges (-amax, amax) per tensor as `calibrate` returns them: (1,) arrays in the tensor's type."""
    from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData

    dtypes = tensor_dtypes(model)
    return TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array([-value], dtypes.get(name, np.float32)),
                         highest=np.array([value], dtypes.get(name, np.float32)))
        for name, value in amax.items()})


def _weight_axis(node: onnx.NodeProto) -> int:
    """onnxruntime's per-channel axis of a weight: Conv's output channels, Gemm's B as transB lays it out, and
    axis 1 of a MatMul's."""
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0 if node.op_type == "Conv" else 1


def _int8_scale(amax: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """onnxruntime's symmetric int8 scale (compute_scale_zp over [-127, 127]): 2 amax / 254 in float64, stored
    in the tensor's type; one too small to store is 1."""
    scale = np.asarray(2 * np.asarray(amax, np.float64) / 254.0)
    stored = scale.astype(dtype)
    finfo = np.finfo(dtype)
    small = stored < finfo.smallest_subnormal if dtype == np.float16 else scale < finfo.tiny
    return np.where(small, np.ones((), dtype), stored)


def _quantized_weight(weight: np.ndarray, axis: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(quantized weight, per-channel scale): int8 rounded as onnxruntime's quantize_nparray does (in float32,
    half to even), float8 e4m3fn with amax / 448 scales in one saturating cast (onnxruntime's float8 weight
    path runs a reference evaluator per channel: 834 s at the official size on 2 cores)."""
    channels = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(channels).max(axis=1)
    shape = [1] * weight.ndim
    shape[axis] = -1
    if precision == "int8":
        scale = _int8_scale(amax, weight.dtype)
        divided = weight.astype(np.float32) / scale.astype(np.float32).reshape(shape)
        return np.clip(divided.round(), -128, 127).astype(np.int8), scale
    scale = (np.maximum(amax.astype(np.float32), 1e-12) / FP8_MAX).astype(weight.dtype)
    scale = np.maximum(scale, np.finfo(weight.dtype).smallest_subnormal)  # an fp16 all-zero channel's was 0: NaNs
    divided = weight.astype(np.float32) / scale.astype(np.float32).reshape(shape)
    return numpy_helper.saturate_cast(divided, ml_dtypes.float8_e4m3fn), scale


def _activation_scale(ranges, name: str, precision: str) -> np.ndarray:
    """The per-tensor scale of an activation, in its range's type (the tensor's): amax / 127 as onnxruntime
    computes it for int8, amax / 448 for float8 (as TensorRT maps it)."""
    dtype = np.asarray(ranges[name].range_value[1]).dtype
    if precision == "int8":
        return _int8_scale(_amax(ranges, name), dtype)
    return np.asarray(max(_amax(ranges, name) / FP8_MAX, np.finfo(dtype).tiny), dtype=dtype)


def _place_qdq(model: onnx.ModelProto, selection: NodeSelection, ranges, precision: str) -> None:
    """Q/DQ nodes before the selected nodes, in one pass over the graph: each activation input through one
    QuantizeLinear/DequantizeLinear pair (shared by every selected reader, read by no other node), each weight
    (an initializer or a Constant) stored quantized per channel behind a DequantizeLinear, and a float weight
    no node reads any more dropped."""
    graph = model.graph
    # the constants' protos: only the weights quantized are read into arrays (GBs at the official size)
    weights = {t.name: t for t in graph.initializer}
    weights |= {n.output[0]: n.attribute[0].t for n in graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    zero_type = np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn
    chosen, dequantized, added, nodes = set(selection.quantized), {}, [], []

    def initializer(name: str, array: np.ndarray) -> str:
        added.append(numpy_helper.from_array(array, name))
        return name

    def dequantize(name: str, axis: int) -> str:
        if name in weights:
            quantized, scale = _quantized_weight(numpy_helper.to_array(weights[name]), axis, precision)
            inputs = [initializer(f"{name}{_QUANTIZED_SUFFIX}", quantized), initializer(f"{name}_scale", scale),
                      initializer(f"{name}_zero_point", np.zeros(scale.shape, zero_type))]
            nodes.append(onnx.helper.make_node("DequantizeLinear", inputs, [f"{name}_DequantizeLinear_Output"],
                                               name=f"{name}_DequantizeLinear", axis=axis))
        else:
            scale = _activation_scale(ranges, name, precision)
            params = [initializer(f"{name}_scale", scale),
                      initializer(f"{name}_zero_point", np.zeros((), zero_type))]
            nodes.append(onnx.helper.make_node("QuantizeLinear", [name, *params], [f"{name}_QuantizeLinear_Output"],
                                               name=f"{name}_QuantizeLinear"))
            nodes.append(onnx.helper.make_node("DequantizeLinear", [f"{name}_QuantizeLinear_Output", *params],
                                               [f"{name}_DequantizeLinear_Output"], name=f"{name}_DequantizeLinear"))
        return f"{name}_DequantizeLinear_Output"

    axes: dict[str, int] = {}  # weight -> the channel axis of its quantized copy
    for node in graph.node:
        if node.name in chosen:
            axis = _weight_axis(node)
            for i, name in enumerate(node.input[:2]):
                if name in weights and axes.setdefault(name, axis) != axis:
                    raise InputError(f"weight {name} is read along two channel axes (by {node.name} too): "
                                     "one quantized copy cannot serve both; exclude one of its readers")
                if name not in dequantized:
                    dequantized[name] = dequantize(name, axis)
                node.input[i] = dequantized[name]
        nodes.append(node)
    read = {name for node in nodes for name in node.input}
    unread = set(dequantized) - read  # float weights that only the quantized nodes read
    kept = [t for t in graph.initializer if t.name not in unread]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + added)


def _session(model_path: Path, providers: Sequence | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # onnxruntime's extended fusions turn float8 Q/DQ around Gemm into a QGemm it has no float8 kernel for
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(model_path), options, providers=list(providers or default_providers()))


def evaluate(reference: Path, quantized: Path, feeds: Sequence[dict[str, np.ndarray]], *,
             providers: Sequence | None = None) -> dict:
    """Relative error of the quantized model's first output against the unquantized model's, per input set."""
    models = (quantized, reference)
    sessions = [_session(path, providers) for path in models]
    dtypes = [model_input_dtypes(path) for path in models]
    errors = []
    for feed in feeds:
        quantized_out, reference_out = (
            session.run(None, {k: np.asarray(v).astype(types[k]) for k, v in feed.items()})[0]
            for session, types in zip(sessions, dtypes))
        errors.append(relative_error(quantized_out, reference_out))
    return {"reference": f"the unquantized model {Path(reference).name}", "input_sets": len(errors),
            "relative_errors": errors, "max_relative_error": max(errors),
            "provider": str((providers or default_providers())[0])}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown quantization precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def quantize_model(source: Path, precision: str, ranges, *, calibration: dict, source_sha256: str | None = None,
                   eval_feeds: Sequence[dict[str, np.ndarray]] | None = None,
                   providers: Sequence | None = None) -> QuantizationReport:
    """Insert Q/DQ nodes into `source` for `precision` with calibration `ranges` (from `calibrate`), writing
    `quantized_path(source, precision)` and its report. calibration: a description of the ranges' inputs
    (recorded). eval_feeds: input sets for the quality report (None: no evaluation, e.g. a model too large
    for onnxruntime on this machine)."""
    check_precision(precision)
    start = time.perf_counter()
    source = Path(source)
    final = quantized_path(source, precision)
    tmp = Path(tempfile.mkdtemp(dir=source.parent, prefix=f".{final.name}.partial-"))
    # next to the source, so that its external weights file is found under the same relative name
    upgraded = tmp.with_name(f"{tmp.name}.opset{QDQ_OPSET}.onnx")
    try:
        upgrade_opset(source, upgraded)
        model = onnx.load(str(upgraded))  # the weights too: they are quantized here
        selection = select_nodes(model)
        _check_coverage(model, selection, ranges)
        _place_qdq(model, selection, ranges, precision)
        props = {p.key: p.value for p in model.metadata_props}
        props["hyportrait.precision"] = precision
        props[_METADATA_KEY] = json.dumps({"scheme": SCHEME, "quantized_nodes": len(selection.quantized),
                                           "excluded": selection.excluded, "not_quantized_op_types": OTHER_OPS})
        onnx.helper.set_model_props(model, props)
        output = tmp / final.name
        if _is_large(source):  # one data file of its own; scales, zero points and biases under 1 KB stay inline
            onnx.save_model(model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{output.name}.data")
        else:
            onnx.save_model(model, str(output))
        del model
        source_sha256 = source_sha256 or sha256_file(source)
        data = Path(f"{output}.data")
        external = data.is_file()
        if external:  # data first, model last: a model file is never seen without its weights
            os.chmod(data, output.stat().st_mode)  # onnx creates it owner-only
            os.replace(data, final.with_name(data.name))
        os.replace(output, final)
        if not external:
            final.with_name(data.name).unlink(missing_ok=True)  # a stale data file of an earlier run
    finally:
        upgraded.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report = QuantizationReport(
        precision=precision, scheme=SCHEME, source=source.name,
        source_sha256=source_sha256, output=final.name, output_sha256=sha256_file(final),
        data_file=f"{final.name}.data" if final.with_name(f"{final.name}.data").is_file() else None,
        opset=QDQ_OPSET, calibration=calibration, quantized_nodes=len(selection.quantized),
        excluded=selection.excluded, not_quantized_op_types=OTHER_OPS)
    if eval_feeds:
        try:
            report.evaluation = evaluate(source, final, eval_feeds, providers=providers)
        except Exception as exc:  # noqa: BLE001 -- onnxruntime's own types (e.g. out of memory): the model stands
            report.evaluation = {"error": f"onnxruntime could not run the models: {type(exc).__name__}: {exc}"}
    report.seconds = round(time.perf_counter() - start, 3)
    write_report(report, report_path(final))
    return report


def write_report(report: QuantizationReport, path: Path) -> Path:
    write_json(path, asdict(report))
    return path


def read_report(path: Path) -> QuantizationReport | None:
    path = Path(path)
    return QuantizationReport(**json.loads(path.read_text())) if path.is_file() else None


def calibration_record(feeds: Sequence[dict[str, np.ndarray]], origin: str) -> dict:
    """What a quantization report says about its calibration (its sha256 decides whether a model is current)."""
    return {"method": ONNXRUNTIME_METHOD, "input_sets": len(feeds), "origin": origin, "sha256": feeds_sha256(feeds)}


def save_ranges_json(path: Path, amax: dict[str, float], *, origin: str) -> Path:
    """Write activation ranges recorded in PyTorch (amax per ONNX tensor name) as a `--calibration` file."""
    path = Path(path)
    document = {"format": RANGES_FORMAT, "method": TORCH_METHOD, "origin": origin, "amax": dict(sorted(amax.items()))}
    write_json(path, document)
    return path


@dataclass
class Calibration:
    """A `--calibration` file: UNet input sets (.npz; ranges taken with onnxruntime on the model quantized,
    which also evaluates the quantized model on them) or activation ranges recorded in PyTorch (.json; for
    the official size, where onnxruntime cannot run the UNet)."""
    record: dict  # what the quantization report keeps: method, origin, sha256 (which decides currency)
    feeds: list[dict[str, np.ndarray]] | None = None
    amax: dict[str, float] | None = None


def read_calibration(path: Path) -> Calibration:
    path = Path(path)
    if path.suffix != ".json":
        feeds = load_calibration_npz(path)
        return Calibration(calibration_record(feeds, str(path)), feeds=feeds)
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist")
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("format") != RANGES_FORMAT:
            raise InputError(f"{path} is not an activation-ranges file (format {RANGES_FORMAT}): record one with "
                             "`hyportrait calibrate --weights DIR ... --out FILE.json`")
        amax = {str(name): float(value) for name, value in document["amax"].items()}
        record = {"method": document["method"], "tensors": len(amax), "origin": document["origin"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # truncated, edited
        raise InputError(f"{path}: a damaged activation-ranges file ({type(exc).__name__}: {describe(exc)})") from None
    return Calibration({**record, "sha256": sha256_file(path)}, amax=amax)


def current_report(source: Path, precision: str, *, source_sha256: str,
                   calibration_sha256: str | None = None) -> QuantizationReport | None:
    """The report of the quantized model of `source` when that model is current: made from this source, with
    this calibration (None: any) and the present scheme."""
    target = quantized_path(source, precision)
    report = read_report(report_path(target))
    current = (report and target.is_file() and report.source_sha256 == source_sha256 and report.scheme == SCHEME
               and calibration_sha256 in (None, report.calibration.get("sha256")))
    return report if current else None


def ensure_quantized(source: Path, precision: str, calibration: Calibration, *,
                     source_sha256: str) -> tuple[QuantizationReport, bool]:
    """The quantized model of `source` with `calibration`: (its report, whether it was current and reused)."""
    existing = current_report(source, precision, source_sha256=source_sha256,
                              calibration_sha256=calibration.record["sha256"])
    if existing:
        return existing, True
    return quantize_unet(source, precision, calibration, source_sha256=source_sha256), False


def quantize_unet(source: Path, precision: str, calibration: Calibration, *, source_sha256: str | None = None,
                  providers: Sequence | None = None) -> QuantizationReport:
    """Quantize `source` with the ranges of `calibration`: its input sets calibrated with onnxruntime (the
    quality report then runs on the same sets), or its recorded ranges."""
    if calibration.feeds is not None:
        ranges = calibrate(source, calibration.feeds, providers=providers)
    else:
        ranges = ranges_from_amax(onnx.load(str(source), load_external_data=False), calibration.amax)
    return quantize_model(source, precision, ranges, calibration=calibration.record, source_sha256=source_sha256,
                          eval_feeds=calibration.feeds, providers=providers)
