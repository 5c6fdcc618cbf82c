"""The quantized UNet in PyTorch, for the official size, where onnxruntime cannot run the TensorRT-form export
(its unfused attention scores take 4-8 GB per batch item at the 64x64 latent):

- `RangeRecorder`: the calibration ranges recorded by forward pre-hooks on the nn.Linear / nn.Conv modules
  the quantized nodes were traced from, keyed by the ONNX tensors those nodes read. They are what
  onnxruntime's MinMax calibration of the export gives on the same inputs (the amax of every quantized
  activation), taken while the runtime animates a real sample.
- `fake_quantization`: the Q/DQ of a quantized ONNX model applied to the same modules (their inputs
  quantized per tensor, their weights replaced by the model's dequantized weights), so that the PyTorch
  module computes what the Q/DQ model computes, for the quality report of an engine TensorRT cannot run here.

Nodes are matched to modules by name: the TorchScript exporter names a node by the scopes of the modules
it was traced in, one scope per module entered through `nn.Module.__call__`, each named as torch's
`_unqualified_variable_name` names it (`down_blocks.0`, `to_k_ip.0`); containers and processors called
directly are not scopes, so a node's scopes are a subsequence of its module's ancestry.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from hyportrait.errors import InputError

from .quantize import FP8_MAX, QUANTIZED_OP_TYPES, activation_inputs, ranges_from_amax, select_nodes

QUANTIZED_MODULE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
INT8_RANGE = (-128, 127)  # QuantizeLinear saturates to the int8 range; amax maps to 127


def _scope_segment(qualified_name: str) -> str:
    """The exporter's scope name of a module: its last non-numeric name atom and the numeric ones after it."""
    atoms = qualified_name.split(".")
    last = max((i for i, atom in enumerate(atoms) if not atom.isnumeric()), default=0)
    return ".".join(atoms[last:])


def _ancestry(qualified_name: str, names: set[str]) -> list[str]:
    """The scope names of the module and of each module above it (the root excluded), outermost first."""
    atoms = qualified_name.split(".")
    prefixes = (".".join(atoms[:i]) for i in range(1, len(atoms) + 1))
    return [_scope_segment(prefix) for prefix in prefixes if prefix in names]


def _is_subsequence(part: Sequence[str], whole: Sequence[str]) -> bool:
    remaining = iter(whole)
    return all(segment in remaining for segment in part)


def node_modules(root: nn.Module, node_names: Sequence[str]) -> dict[str, str]:
    """The qualified name (in `root`) of the Linear/Conv module each ONNX node was traced from."""
    names = {name for name, _ in root.named_modules()}
    candidates: dict[str, list[tuple[str, list[str]]]] = {}
    for name, module in root.named_modules():
        if isinstance(module, QUANTIZED_MODULE_TYPES):
            ancestry = _ancestry(name, names)
            candidates.setdefault(ancestry[-1], []).append((name, ancestry))
    found, unmapped = {}, []
    for node in node_names:
        scopes = node.split("/")[1:-1]  # "/unet/.../to_q/MatMul": the scopes, then the op's own name
        matches = [name for name, ancestry in candidates.get(scopes[-1] if scopes else "", [])
                   if _is_subsequence(scopes, ancestry)]
        if len(matches) == 1:
            found[node] = matches[0]
        else:
            unmapped.append(f"{node} ({len(matches)} candidate modules)")
    if unmapped:
        raise InputError(f"{len(unmapped)} quantized ONNX nodes match no single nn.Linear/nn.Conv module of "
                         f"{type(root).__name__}: {', '.join(unmapped[:5])}; is it the module the export was "
                         "traced from?")
    return found


@dataclass
class QuantizedModules:
    """The quantized nodes of an export, by the module each was traced from and the activation it reads."""
    node_module: dict[str, str]
    node_activation: dict[str, str]

    @classmethod
    def of(cls, root: nn.Module, model: onnx.ModelProto) -> QuantizedModules:
        activations = activation_inputs(model, select_nodes(model))
        node_activation = {node: tensor for tensor, nodes in activations.items() for node in nodes}
        return cls(node_modules(root, list(node_activation)), node_activation)

    def modules(self) -> set[str]:
        return set(self.node_module.values())


class RangeRecorder:
    """Forward pre-hooks keeping the running amax of the inputs of the quantized modules while `enabled`.

    A module called several times (or feeding several nodes) gives its nodes the max over its calls, and an
    activation read by several modules (Q, K and V projections) the max over them."""

    def __init__(self, root: nn.Module, model: onnx.ModelProto):
        self.quantized = QuantizedModules.of(root, model)
        self.enabled = True
        self._amax: dict[str, torch.Tensor] = {}
        modules = dict(root.named_modules())
        self._handles = [modules[name].register_forward_pre_hook(self._hook(name))
                         for name in sorted(self.quantized.modules())]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if self.enabled:
                amax = args[0].detach().abs().amax()  # stays on the device: no sync per call
                self._amax[name] = torch.maximum(self._amax[name], amax) if name in self._amax else amax
        return record

    def tensor_amax(self) -> dict[str, float]:
        """amax per activation tensor of the quantized nodes."""
        missing = sorted(self.quantized.modules() - set(self._amax))
        if missing:
            raise InputError(f"{len(missing)} quantized modules were never called while recording (e.g. "
                             f"{missing[0]})")
        module_amax = {name: float(value) for name, value in self._amax.items()}
        amax: dict[str, float] = {}
        for node, tensor in self.quantized.node_activation.items():
            amax[tensor] = max(amax.get(tensor, 0.0), module_amax[self.quantized.node_module[node]])
        return amax

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _load(model: onnx.ModelProto | Path, load_external_data: bool) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model),
                                                                      load_external_data=load_external_data)


@torch.no_grad()
def torch_ranges(module: nn.Module, model: onnx.ModelProto | Path, feeds: Sequence[dict], device="cpu"):
    """The calibration ranges of `model` (an export of `module`) for `quantize_model`, recorded in PyTorch over
    input sets `feeds` (arrays or tensors, passed as they are: in the dtypes `module` takes)."""
    model = _load(model, load_external_data=False)
    recorder = RangeRecorder(module, model)
    try:
        for feed in feeds:
            module(**{name: torch.as_tensor(value).to(device) for name, value in feed.items()})
    finally:
        recorder.remove()
    return ranges_from_amax(model, recorder.tensor_amax())


# --- fake quantization --------------------------------------------------------------------------------------

@dataclass
class _NodeQDQ:
    """One quantized node of a Q/DQ model: its activation's scale and its dequantized weight."""
    precision: str
    activation_scale: float
    weight: np.ndarray  # dequantized, in the layout of the module's weight


def _int8_fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    # torch.round rounds half to even, as QuantizeLinear does
    return torch.clamp(torch.round(x.float() / scale), *INT8_RANGE).mul(scale).to(x.dtype)


def _fp8_fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    # QuantizeLinear saturates to +-448, where torch's float8 cast would give NaN
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.float().mul(scale).to(x.dtype)


_FAKE_QUANT = {"int8": _int8_fake_quant, "fp8": _fp8_fake_quant}
_PRECISION = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8"}


def _dequantized(dq: onnx.NodeProto, initializers: dict[str, np.ndarray]) -> np.ndarray:
    """What DequantizeLinear outputs for a stored weight (per channel or per tensor), in float32."""
    quantized, scale = initializers[dq.input[0]], initializers[dq.input[1]].astype(np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim:
        scale = scale.reshape([-1 if i == axis else 1 for i in range(quantized.ndim)])
    return quantized.astype(np.float32) * scale


def _module_layout(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """An ONNX weight in the layout of the module's: MatMul reads Linear's weight transposed, Gemm unless
    transB, Conv as it is."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)
    return weight.T if transposed else weight


def qdq_nodes(model: onnx.ModelProto) -> dict[str, _NodeQDQ]:
    """Every MatMul/Conv/Gemm of a Q/DQ model (loaded with its weights) that reads a dequantized activation
    and a dequantized stored weight."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    stored_types = {t.name: t.data_type for t in graph.initializer}
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = {}
    for node in graph.node:
        dqs = [producers.get(name) for name in node.input[:2]]
        if node.op_type not in QUANTIZED_OP_TYPES or \
                not all(dq is not None and dq.op_type == "DequantizeLinear" for dq in dqs):
            continue
        weight_dq = next(dq for dq in dqs if dq.input[0] in initializers)
        activation_dq = next(dq for dq in dqs if dq is not weight_dq)
        found[node.name] = _NodeQDQ(
            precision=_PRECISION[stored_types[weight_dq.input[0]]],
            activation_scale=float(initializers[activation_dq.input[1]]),
            weight=_module_layout(node, _dequantized(weight_dq, initializers)))
    return found


def _module_qdq(root: nn.Module, nodes: dict[str, _NodeQDQ]) -> dict[str, _NodeQDQ]:
    """The Q/DQ per module; the nodes of a module called more than once must agree on it."""
    per_module: dict[str, _NodeQDQ] = {}
    for node, module in node_modules(root, list(nodes)).items():
        qdq = per_module.setdefault(module, nodes[node])
        if qdq.activation_scale != nodes[node].activation_scale:
            raise InputError(f"{module} is called more than once with different activation scales "
                             f"({qdq.activation_scale} and {nodes[node].activation_scale}): a per-call fake "
                             "quantization is not implemented")
    return per_module


@contextmanager
def fake_quantization(root: nn.Module, quantized: onnx.ModelProto | Path) -> Iterator[int]:
    """Within the block, `root` (the module the quantized model was exported from, on its device) computes
    what the Q/DQ model `quantized` computes: each quantized module's input goes through QuantizeLinear and
    DequantizeLinear with the model's activation scale, and its weight is the model's dequantized weight
    (restored on exit). Yields the number of modules quantized."""
    per_module = _module_qdq(root, qdq_nodes(_load(quantized, load_external_data=True)))
    modules = dict(root.named_modules())
    originals, handles = {}, []
    try:
        for name, qdq in per_module.items():
            module = modules[name]
            if tuple(qdq.weight.shape) != tuple(module.weight.shape):
                raise InputError(f"{name}: the quantized model's weight is {qdq.weight.shape}, the module's "
                                 f"{tuple(module.weight.shape)}")
            originals[name] = module.weight.data
            module.weight.data = torch.from_numpy(np.ascontiguousarray(qdq.weight)).to(module.weight.data)
            quantize, scale = _FAKE_QUANT[qdq.precision], qdq.activation_scale
            handles.append(module.register_forward_pre_hook(
                lambda module, args, quantize=quantize, scale=scale: (quantize(args[0], scale), *args[1:])))
        yield len(per_module)
    finally:
        for handle in handles:
            handle.remove()
        for name, weight in originals.items():
            modules[name].weight.data = weight
