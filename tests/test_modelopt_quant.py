"""NVIDIA ModelOpt's int8/fp8 recipe (engines/modelopt_quant.py) on a small block named like the UNet's
modules, its int8 ONNX Q/DQ export run by onnxruntime, and the dry run of quantize_gpu's `modelopt` step."""
import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hyportrait.benchmarks import quantize_gpu
from hyportrait.engines.modelopt_quant import (
    finish_int8_export,
    qdq_node_counts,
    quantized_copy,
    quantizer_summary,
)
from hyportrait.engines.quantize import QDQ_OPSET
from hyportrait.export.onnx_io import ExportSpec, export_onnx, relative_error
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO


@pytest.fixture(autouse=True, scope="module")
def modelopt():
    """Imported when this file's tests run, not when the suite is collected (4 s of a CPU in every worker)."""
    return pytest.importorskip("modelopt.torch.quantization",
                               reason="nvidia-modelopt (the [modelopt] extra) is missing")


class Block(nn.Module):
    """A first convolution (excluded by the recipe), a convolution, a LayerNorm (its input stays unquantized),
    an attention projection and a block output projection (excluded by ModelOpt's preset)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.to_q = nn.Linear(16, 32)
        self.proj_out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(torch.relu(self.conv_in(x))).flatten(2).transpose(1, 2)
        return self.proj_out(torch.relu(self.to_q(self.norm(h))))


@pytest.fixture(scope="module")
def block_and_inputs():
    torch.manual_seed(0)
    block = Block().eval()
    # channels of different scales: what SmoothQuant migrates into the weights
    scales = torch.tensor([1.0, 4.0, 0.25, 2.0]).view(1, 4, 1, 1)
    inputs = [torch.randn(2, 4, 8, 8) * scales for _ in range(4)]
    return block, inputs


def quantize_block(block, inputs, precision, high_precision_dtype="Float"):
    def calibrate(model):
        for x in inputs:
            model(x)

    with torch.no_grad():
        return quantized_copy(block, precision, calibrate, high_precision_dtype=high_precision_dtype)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_the_recipe_quantizes_a_copy_and_keeps_the_excluded_modules(block_and_inputs, precision):
    block, inputs = block_and_inputs
    before = {name: p.clone() for name, p in block.state_dict().items()}
    quantized = quantize_block(block, inputs, precision)
    summary = quantizer_summary(quantized)
    assert summary["quantized_weights"] == summary["quantized_inputs"] == {"Conv2d": 1, "Linear": 1}
    assert summary["quantized_modules"] == 2
    assert summary["smoothquant_modules"] == (1 if precision == "int8" else 0)
    assert all(torch.equal(p, before[name]) for name, p in block.state_dict().items())  # the original stands
    with torch.no_grad():
        error = relative_error(quantized(inputs[0]).numpy(), block(inputs[0]).numpy())
    assert 1e-4 < error < 0.1  # quantized, and close


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_int8_export_has_standard_qdq_nodes_that_onnxruntime_runs(block_and_inputs, tmp_path, precision):
    """fp16: the quantize script's export on the GPU (fp16 Q/DQ pairs, valid from opset 19 on)."""
    block, inputs = block_and_inputs
    dtype, high_precision = (torch.float16, "Half") if precision == "fp16" else (torch.float32, "Float")
    inputs = [x.to(dtype) for x in inputs]
    quantized = quantize_block(copy.deepcopy(block).to(dtype), inputs, "int8", high_precision)
    spec = ExportSpec("block", quantized, {"x": inputs[0].float()}, ["y"], {})  # export_onnx casts to fp16
    record = export_onnx(spec, tmp_path, precision)
    finish_int8_export(tmp_path / record.file)  # raises unless the model checks in full
    model = onnx.load(str(tmp_path / record.file))
    assert qdq_node_counts(model) == {"QuantizeLinear": 4, "DequantizeLinear": 4, "custom_ops": {}}  # 2 + 2
    assert model.opset_import[0].version == QDQ_OPSET
    session = ort.InferenceSession(str(tmp_path / record.file), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in inputs:
            out = session.run(None, {"x": x.numpy()})[0]
            assert relative_error(out, quantized(x).float().numpy()) < (1e-4 if precision == "fp32" else 1e-2)


def test_the_quantize_script_dry_runs_the_modelopt_step(tmp_path, capsys):
    quantize_gpu.main(["--out", str(tmp_path), "--size", "tiny", "--image", str(SAMPLE_IMAGE), "--video",
                       str(SAMPLE_VIDEO), "--steps", "export", "animate", "modelopt", "--precisions", "int8",
                       "--max-frames", "4", "--sets", "1"])
    entry = json.loads((tmp_path / "report.json").read_text())["modelopt"]["int8"]
    assert "error" not in entry, entry.get("traceback")
    assert entry["quantized_modules"] > 100 and entry["smoothquant_modules"] > 50
    assert 0 < entry["unet_max_relative_error"] < 0.5
    assert entry["frames"] == 4 and np.isfinite(entry["psnr_db"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("modelopt   int8")
