"""INT8 and FP8 Q/DQ insertion on the tiny UNet export, run with onnxruntime on the CPU.

Measured with 2 random calibration sets (the same sets evaluated): int8 about 0.1 and fp8 about 0.22 relative
error against the fp32 model. Both are random-weight networks on random inputs, where per-layer rounding
compounds through every block (fp8 e4m3 keeps 3 mantissa bits, int8 spends its 8 bits on a calibrated
range, hence int8 < fp8 here); the fp16 export of the same UNet is within 1e-3. The thresholds bound those
numbers with margin; real conditioning and trained weights are the device script's business.
"""
import json
import re
from collections import Counter

import numpy as np
import onnx
import pytest

from hyportrait.engines import quantize
from hyportrait.engines.quantize import (
    ACTIVATION_MATMUL,
    QDQ_OPSET,
    SENSITIVE_SCOPES,
    calibrate,
    feeds_sha256,
    load_calibration_npz,
    quantize_model,
    random_unet_feeds,
    read_report,
    report_path,
    save_calibration_npz,
    select_nodes,
)
from hyportrait.errors import InputError
from hyportrait.export.export_unet import unet_spec
from hyportrait.export.onnx_io import export_onnx
from hyportrait.export.weights import random_networks

MAX_ERROR = {"int8": 0.2, "fp8": 0.4}
WEIGHT_TYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """(model path, manifest record) of the tiny UNet exported in fp32."""
    out = tmp_path_factory.mktemp("unet")
    record = export_onnx(unet_spec(random_networks("tiny")), out, "fp32")
    return out / record.file, record


@pytest.fixture(scope="module")
def feeds(unet):
    return random_unet_feeds(unet[1], 2, batch=1, seed=0)


@pytest.fixture(scope="module")
def ranges(unet, feeds):
    return calibrate(unet[0], feeds)


def test_sensitive_layers_are_selected_out(unet):
    selection = select_nodes(onnx.load(str(unet[0]), load_external_data=False))
    reasons = dict(SENSITIVE_SCOPES)
    assert selection.excluded[reasons["conv_in"]] == ["/unet/conv_in/Conv"]
    assert selection.excluded[reasons["conv_out"]] == ["/unet/conv_out/Conv"]
    assert len(selection.excluded[reasons["time_embedding"]]) == 2  # linear_1, linear_2
    assert len(selection.excluded[reasons["add_embedding"]]) == 2
    attention = selection.excluded[ACTIVATION_MATMUL]
    # the score and value matmuls directly under each attention module (attn1, attn2), never a projection
    assert attention and all(re.fullmatch(r".*/attn\d/MatMul(_\d+)?", name) for name in attention)
    quantized = Counter(name.rsplit("/", 1)[-1].split("_")[0] for name in selection.quantized)
    assert quantized["Conv"] > 40 and quantized["MatMul"] > 200  # the resnets' convolutions, the projections
    excluded = {n for names in selection.excluded.values() for n in names}
    assert not excluded & set(selection.quantized)


def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_model_runs_and_stays_close(unet, feeds, ranges, precision):
    source, record = unet
    report = quantize_model(source, precision, ranges, calibration={"origin": "random", "input_sets": 2},
                            source_sha256=record.sha256, eval_feeds=feeds)
    path = source.with_name(f"unet.{precision}.onnx")
    assert report.output == path.name and path.is_file() and report.data_file is None
    assert read_report(report_path(path)) == report
    model = onnx.load(str(path))
    graph = model.graph
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == QDQ_OPSET
    producers = _producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    # every selected node reads both operands through DequantizeLinear: the activation through a Q/DQ pair,
    # the weight stored quantized
    quantized = _selection(source).quantized
    for name in quantized:
        dq_activation, dq_weight = (producers[i] for i in nodes[name].input[:2])
        assert dq_activation.op_type == dq_weight.op_type == "DequantizeLinear"
        assert producers[dq_activation.input[0]].op_type == "QuantizeLinear"
        assert initializers[dq_weight.input[0]].data_type == WEIGHT_TYPE[precision]
    # ...and no kept node does
    for names in report.excluded.values():
        for name in names:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear"
                       for i in nodes[name].input)
    # one QuantizeLinear per distinct activation input: none on the quantized nodes' outputs
    activations = {producers[producers[nodes[name].input[0]].input[0]].input[0] for name in quantized}
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(activations)
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["hyportrait.precision"] == precision
    assert json.loads(metadata["hyportrait.quantization"])["excluded"] == report.excluded
    errors = report.evaluation["relative_errors"]
    assert len(errors) == 2 and all(0 < e < MAX_ERROR[precision] for e in errors), errors


def _selection(source):
    return select_nodes(onnx.load(str(source), load_external_data=False))


def test_calibration_file_round_trip(unet, feeds, tmp_path):
    path = save_calibration_npz(tmp_path / "calibration.npz", feeds)
    loaded = load_calibration_npz(path)
    assert len(loaded) == 2 and feeds_sha256(loaded) == feeds_sha256(feeds)
    assert feeds_sha256(feeds[:1]) != feeds_sha256(feeds)
    np.savez(tmp_path / "bad.npz", sample=feeds[0]["sample"])
    with pytest.raises(InputError, match="is not named '<set index>/<input name>'"):
        load_calibration_npz(tmp_path / "bad.npz")


def test_random_feeds_follow_the_manifest_and_the_pipeline_ranges(unet):
    feed = random_unet_feeds(unet[1], 1, batch=3, seed=1)[0]
    assert {k: (v.shape, str(v.dtype)) for k, v in feed.items()} == {
        "sample": ((3, 4, 8, 8, 8), "float32"), "timestep": ((1,), "float32"),
        "appearance_tokens": ((3, 64, 1024), "float32"), "motion_tokens": ((3, 4, 64, 1024), "float32"),
        "pose_map": ((32, 8, 8), "float32"), "added_time_ids": ((3, 3), "float32")}
    assert -1.55 <= feed["timestep"][0] <= 1.64
    fps, bucket, noise = feed["added_time_ids"].T
    assert np.all((fps >= 5) & (fps <= 30)) and np.all(bucket == np.round(bucket)) and np.all(noise <= 0.1)


def test_large_models_keep_their_weights_in_one_data_file(unet, feeds, ranges, tmp_path, monkeypatch):
    source = tmp_path / "unet.onnx"  # the export's layout past 2 GB: weights in unet.onnx.data
    onnx.save_model(onnx.load(str(unet[0])), str(source), save_as_external_data=True,
                    location="unet.onnx.data")
    monkeypatch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)
    report = quantize_model(source, "int8", ranges, calibration={"origin": "random"}, eval_feeds=feeds[:1])
    assert report.data_file == "unet.int8.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "unet.int8.onnx", "unet.int8.onnx.data", "unet.int8.quantization.json", "unet.onnx", "unet.onnx.data"]
    # the int8 weights are in the data file; scales, zero points and biases under 1 KB stay inline
    assert (tmp_path / "unet.int8.onnx.data").stat().st_size > 2 * (tmp_path / "unet.int8.onnx").stat().st_size
    assert 0 < report.evaluation["max_relative_error"] < MAX_ERROR["int8"]
