"""NVIDIA ModelOpt's int8 and fp8 recipes for diffusion UNets, applied to the PyTorch UNet with the engine
rewrites (the module the TensorRT-form export traces), to be compared with this project's own Q/DQ path
(quantize.py: onnxruntime places the Q/DQ nodes; torch_quant.py: the same arithmetic in PyTorch). Not the
default path: benchmarks/quantize_gpu.py's `modelopt` step reports both side by side.

The recipe is the one of ModelOpt's diffusers quantization example for SD/SDXL UNets:
- int8: ModelOpt's SmoothQuant preset with alpha 0.8 (the example's value for SDXL; percentile 1.0, i.e.
  plain max calibration): per-channel smoothing folded into the Linear weights, weights int8 per output
  channel, activations int8 per tensor, at the inputs of the Linear and Conv modules.
- fp8 (e4m3): weights and activations per tensor, max calibration. The attention matmuls (Q.K^T, P.V) stay
  unquantized, as in the example without --quantize-mha and as in quantize.py.
- kept unquantized, by module name: `EXCLUDED` (the example's list for UNets) and the preset's own
  exclusions (among them `*proj_out.*`, the output projection of every transformer block).
Both are PyTorch modules that fake-quantize (quantize and dequantize) where the Q/DQ nodes go; ModelOpt
exports them to ONNX through its symbolic functions: int8 as standard QuantizeLinear/DequantizeLinear pairs
(weights stored in float, quantized by their own pair), which TensorRT's explicit quantization reads; an
fp16 model's pairs are fp16, valid from opset 19 on (`finish_int8_export`).
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
from torch import nn

from hyportrait.errors import BackendError
from hyportrait.files import atomic_path

from .quantize import QDQ_OPSET, check_precision

SMOOTHQUANT_ALPHA = 0.8
# module-name scopes the example keeps unquantized in UNets (conv_shortcut: the residual path's 1x1 conv;
# pos_embed also matches this UNet's time_pos_embed, the temporal blocks' frame-position MLP)
EXCLUDED = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding",
            "pos_embed")
RECIPE = (f"ModelOpt diffusers example: int8 SmoothQuant alpha {SMOOTHQUANT_ALPHA} (weights per channel, "
          "activations per tensor), fp8 e4m3 per tensor, max calibration; attention matmuls unquantized; "
          f"excluded: {', '.join(EXCLUDED)} and the preset's exclusions")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def modelopt_quantization():
    """`modelopt.torch.quantization`, or a clear error naming the extra that installs it."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise BackendError(f"NVIDIA ModelOpt is not importable ({exc}): pip install 'hyportrait[modelopt]'") \
            from None
    return mtq


def recipe_config(precision: str, high_precision_dtype: str) -> dict:
    """ModelOpt's quantization config for `precision`: its preset, the example's algorithm settings, the
    exclusions, and the float type of the exported Q/DQ scales ("Half" for an fp16 model, "Float" for fp32:
    ModelOpt's int8 export casts a Q/DQ's input to that type and leaves the output in it)."""
    check_precision(precision)
    mtq = modelopt_quantization()
    config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG if precision == "int8" else mtq.FP8_DEFAULT_CFG)
    if precision == "int8":
        config["algorithm"] = {"method": "smoothquant", "alpha": SMOOTHQUANT_ALPHA}
    for entry in config["quant_cfg"]:
        if isinstance(entry.get("cfg"), dict) and "num_bits" in entry["cfg"]:
            entry["cfg"]["trt_high_precision_dtype"] = high_precision_dtype
    # last, so that they win over the preset's enabling entries: excluded modules are not calibrated either
    config["quant_cfg"] += [{"quantizer_name": f"*{scope}*", "enable": False} for scope in EXCLUDED]
    # ModelOpt registers LayerNorm for its output quantizer (fp8 attention fusion), so the preset's
    # `*input_quantizer` also quantizes LayerNorm inputs: not done when the example was published, no
    # kernel TensorRT fuses, and lost in the fp16 export, whose norms compute in fp32 (export.onnx_io)
    config["quant_cfg"].append({"quantizer_name": "*input_quantizer", "parent_class": "nn.LayerNorm",
                                "enable": False})
    return config


def quantized_copy(module: nn.Module, precision: str, forward_loop: Callable[[nn.Module], None], *,
                   high_precision_dtype: str) -> nn.Module:
    """A copy of `module` (weights copied: SmoothQuant rescales them) quantized by ModelOpt's recipe for
    `precision`, calibrated by `forward_loop(model)`, which runs the model on the calibration inputs."""
    mtq = modelopt_quantization()
    quantized = copy.deepcopy(module)
    with warnings.catch_warnings():
        # SmoothQuant warns for each excluded Linear (left uncalibrated on purpose)
        warnings.filterwarnings("ignore", message=".* is not calibrated, skip smoothing")
        return mtq.quantize(quantized, recipe_config(precision, high_precision_dtype), forward_loop)


def quantizer_summary(module: nn.Module) -> dict:
    """The modules whose weights and whose inputs are quantized, by module type; the smoothed ones."""
    weights, inputs = Counter(), Counter()
    smoothed = 0
    for child in module.modules():
        kind = type(child).__name__.removeprefix("Quant")
        if getattr(getattr(child, "weight_quantizer", None), "is_enabled", False):
            weights[kind] += 1
        input_quantizer = getattr(child, "input_quantizer", None)
        if getattr(input_quantizer, "is_enabled", False):
            inputs[kind] += 1
            smoothed += getattr(input_quantizer, "pre_quant_scale", None) is not None
    return {"quantized_weights": dict(weights), "quantized_inputs": dict(inputs),
            "quantized_modules": sum(weights.values()), "smoothquant_modules": smoothed}


def qdq_node_counts(model: onnx.ModelProto) -> dict:
    """The Q/DQ nodes of an ONNX model: standard (default domain) QuantizeLinear/DequantizeLinear by op, and
    every op of another domain (a custom op TensorRT would need a plugin for), by domain::op."""
    counts = Counter(node.op_type for node in model.graph.node if node.domain in ("", "ai.onnx")
                     and node.op_type in _QDQ_OPS)
    custom = Counter(f"{node.domain}::{node.op_type}" for node in model.graph.node
                     if node.domain not in ("", "ai.onnx"))
    return {**{op: counts.get(op, 0) for op in _QDQ_OPS}, "custom_ops": dict(custom)}


def finish_int8_export(path: Path) -> None:
    """ModelOpt's int8 Q/DQ export made a valid model, checked in full (types included) by onnx's checker:
    converted to opset 19, where QuantizeLinear takes float16 (the export's opset has it take float only),
    and without the exporter's value types, which give each DequantizeLinear an opset-13 float output."""
    path = Path(path)
    model = onnx.version_converter.convert_version(onnx.load(str(path), load_external_data=False), QDQ_OPSET)
    del model.graph.value_info[:]
    with atomic_path(path) as tmp:  # next to `path`: the external weights file keeps its relative name
        onnx.save_model(model, str(tmp))
    onnx.checker.check_model(str(path), full_check=True)
