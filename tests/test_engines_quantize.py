"""INT8 and FP8 Q/DQ insertion on the tiny UNet export, run with onnxruntime on the CPU.

Measured with 2 random calibration sets (the same sets evaluated): int8 about 0.1 and fp8 about 0.22 relative
error against the fp32 model. Both are random-weight networks on random inputs, where per-layer rounding
compounds through every block (fp8 e4m3 keeps 3 mantissa bits, int8 spends its 8 bits on a calibrated
range, hence int8 < fp8 here); the fp16 export of the same UNet is within 1e-3. The thresholds bound those
numbers with margin; real conditioning and trained weights are the device script's business.
"""
import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hyportrait.engines import quantize
from hyportrait.engines.quantize import (
    ACTIVATION_MATMUL,
    PRECISIONS,
    QDQ_OPSET,
    SENSITIVE_SCOPES,
    TORCH_METHOD,
    activation_inputs,
    calibrate,
    current_report,
    feeds_sha256,
    load_calibration_npz,
    quantize_model,
    quantize_unet,
    random_unet_feeds,
    read_calibration,
    read_report,
    report_path,
    save_calibration_npz,
    select_nodes,
)
from hyportrait.engines.torch_quant import fake_quantization, node_modules, qdq_nodes, torch_ranges
from hyportrait.errors import InputError
from hyportrait.export.export_unet import unet_spec
from hyportrait.export.manifest import read_manifest
from hyportrait.export.onnx_io import relative_error
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.weights import random_networks

MAX_ERROR = {"int8": 0.2, "fp8": 0.4}
WEIGHT_TYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def unet(tiny_export, tmp_path_factory):
    """(model path, manifest record, the module exported) of the tiny UNet exported in fp32: the session's
    export (the same seed-0 networks; test_torch_ranges_are_the_onnxruntime_ranges would see other weights),
    copied, as quantizing writes beside its source."""
    out = tmp_path_factory.mktemp("unet")
    record = read_manifest(tiny_export).models["unet"]
    shutil.copy(tiny_export / record.file, out / record.file)
    return out / record.file, record, unet_spec(random_networks("tiny")).module


@pytest.fixture(scope="module")
def feeds(unet):
    return random_unet_feeds(unet[1], 2, batch=1, seed=0)


@pytest.fixture(scope="module")
def ranges(unet, feeds):
    return calibrate(unet[0], feeds)


@pytest.fixture(scope="module")
def large_unet(unet, tmp_path_factory):
    """The UNet in the export's layout past 2 GB (weights in unet.onnx.data), in a folder of its own: the
    Q/DQ models of `qdq` are made from it, so that one quantization per precision checks the large models' files
    too; the small models' are checked on `quantize_unet`."""
    source = tmp_path_factory.mktemp("large") / "unet.onnx"
    onnx.save_model(onnx.load(str(unet[0])), str(source), save_as_external_data=True,
                    location="unet.onnx.data")
    return source


@pytest.fixture(scope="module")
def qdq(unet, large_unet, feeds, ranges):
    """The report of each precision's Q/DQ model of `large_unet` (as large: the threshold is 0 meanwhile),
    evaluated on the calibration sets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "EXTERNAL_DATA_THRESHOLD", 0)
        return {precision: quantize_model(large_unet, precision, ranges,
                                          calibration={"origin": "random", "input_sets": 2},
                                          source_sha256=unet[1].sha256, eval_feeds=feeds)
                for precision in PRECISIONS}


def test_calibration_ranges_are_onnxruntimes_minmax_ranges(tiny_export):
    """calibrate() adds its own reduce nodes (onnxruntime's calibrator inserts them in time quadratic in the graph's
    size): on the tiny appearance encoder (MatMul and Conv) it gives onnxruntime's symmetric MinMax ranges, the
    same tensors, values and dtypes, and leaves no file beside the model."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.sets = iter(feeds)

        def get_next(self):
            return next(self.sets, None)

    model = tiny_export / "appearance.onnx"
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.standard_normal((1, 3, 224, 224), np.float32),
              "id_embedding": rng.standard_normal((1, 512), np.float32)} for _ in range(2)]
    before = sorted(tiny_export.iterdir())
    ranges = calibrate(model, feeds, providers=["CPUExecutionProvider"])  # as the reference runs
    assert sorted(tiny_export.iterdir()) == before
    with tempfile.TemporaryDirectory() as tmp:
        reference = create_calibrator(model, ["MatMul", "Conv", "Gemm"], augmented_model_path=f"{tmp}/a.onnx",
                                      calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
        reference.collect_data(Reader())
        expected = reference.compute_data()
    assert set(ranges.keys()) == set(expected.keys()) and len(ranges.keys()) > 60
    for name in expected:
        for mine, theirs in zip(ranges[name].range_value, expected[name].range_value):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name


def test_calibration_names_stay_clear_of_the_graphs_own(tmp_path):
    """A graph whose tensors already bear the names calibrate() would give its outputs ("x/amax"): the ranges are
    still each tensor's own amax, and an empty calibration set is refused before any work."""
    from onnx import helper

    w = np.arange(-6, 6, dtype=np.float32).reshape(3, 4) / 4
    w2 = np.arange(8, dtype=np.float32).reshape(4, 2) / 8 - 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["x/amax"]), helper.make_node("Relu", ["x/amax"], ["x/abs"]),
         helper.make_node("MatMul", ["x/abs", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "clash.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.array([[1, -2, 0.5], [0, 3, -1]], np.float32)
    ranges = calibrate(path, [{"x": x}], providers=["CPUExecutionProvider"])
    hidden = x @ w
    expected = {"x": x, "x/amax": hidden, "x/abs": np.maximum(hidden, 0), "y": np.maximum(hidden, 0) @ w2}
    assert set(ranges.keys()) == set(expected)
    for name, value in expected.items():
        assert ranges[name].range_value[1] == pytest.approx([np.abs(value).max()], rel=1e-6), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clash.onnx"]
    with pytest.raises(ValueError, match="at least one input set"):
        calibrate(path, [])


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
def test_qdq_model_runs_and_stays_close(large_unet, qdq, precision):
    source = large_unet
    report = qdq[precision]
    path = source.with_name(f"unet.{precision}.onnx")
    assert report.output == path.name and path.is_file() and report.data_file == f"{path.name}.data"
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
    # ...whose dequantized output only the quantized nodes read (skip connections keep the original)
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    readers = {n.name for n in graph.node if set(n.input) & dequantized}
    assert readers == set(quantized)
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


def test_large_models_keep_their_weights_in_one_data_file(large_unet, qdq):
    folder = large_unet.parent
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".probed.onnx")) == [
        "unet.fp8.onnx", "unet.fp8.onnx.data", "unet.fp8.quantization.json",
        "unet.int8.onnx", "unet.int8.onnx.data", "unet.int8.quantization.json", "unet.onnx", "unet.onnx.data"]
    # the int8 weights are in the data file; scales, zero points and biases under 1 KB stay inline
    assert (folder / "unet.int8.onnx.data").stat().st_size > 2 * (folder / "unet.int8.onnx").stat().st_size
    # fp8: one byte a weight again, in one data file of its own
    sizes = [(folder / f"unet.{precision}.onnx.data").stat().st_size for precision in ("int8", "fp8")]
    assert abs(sizes[1] - sizes[0]) < 0.05 * sizes[0], sizes


def test_torch_ranges_are_the_onnxruntime_ranges(unet, feeds, ranges):
    source, _, module = unet
    model = onnx.load(str(source), load_external_data=False)
    recorded = torch_ranges(module, model, feeds)
    needed = activation_inputs(model, select_nodes(model))
    assert set(recorded.keys()) == set(needed)
    for name in needed:
        np.testing.assert_allclose(recorded[name].range_value, ranges[name].range_value, rtol=1e-4, err_msg=name)
        assert recorded[name].range_value[1].dtype == np.float32


def test_nodes_of_no_module_are_named(unet):
    with pytest.raises(InputError, match=r"/unet/nowhere/to_q/MatMul \(0 candidate modules\)"):
        node_modules(unet[2], ["/unet/down_blocks.0/attentions.0/proj_in/MatMul", "/unet/nowhere/to_q/MatMul"])


def _qdq_node_tensors(path, feed) -> tuple[dict, dict[str, np.ndarray]]:
    """The quantized nodes of a Q/DQ model ({name: (node, its unquantized activation input)}) and every
    intermediate tensor of a run on `feed`, the model's output included."""
    model = onnx.load(str(path))
    graph = model.graph
    producers = _producers(graph)
    weights = {t.name for t in graph.initializer}
    nodes = {}
    for name in qdq_nodes(model):
        node = next(n for n in graph.node if n.name == name)
        dq = next(producers[i] for i in node.input[:2] if producers[i].input[0] not in weights)
        nodes[name] = (node, producers[dq.input[0]].input[0])
    inputs = {i.name for i in graph.input}
    wanted = {t for node, activation in nodes.values() for t in (node.output[0], activation)} - inputs
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in sorted(wanted))
    path = path.with_name(f"{path.stem}.probed.onnx")
    onnx.save_model(model, str(path))
    session = quantize._session(path, None)
    return nodes, {**feed, **dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fake_quantization_computes_what_the_qdq_model_does(unet, large_unet, feeds, qdq, precision):
    """Each fake-quantized module, given the activation the Q/DQ model's node reads, returns that node's
    output (plus the bias a MatMul leaves to the next Add) to float rounding. Over the whole UNet the two
    differ by rounding decisions (a 1e-7 difference upstream flips a value to the neighbouring quantization
    step, and the flips spread), so they agree statistically: the same error against the unquantized module.
    One run of the Q/DQ model gives both its output and every node's tensors."""
    module, path, feed = unet[2], large_unet.with_name(qdq[precision].output), feeds[0]
    nodes, tensors = _qdq_node_tensors(path, feed)
    modules = dict(module.named_modules())
    names = node_modules(module, list(nodes))
    inputs = {name: torch.from_numpy(value) for name, value in feed.items()}
    errors = {}
    with torch.no_grad():
        reference = module(**inputs).numpy()
        with fake_quantization(module, path) as count:
            for name, (node, activation) in nodes.items():
                torch_module = modules[names[name]]
                expected = tensors[node.output[0]]
                if node.op_type == "MatMul" and torch_module.bias is not None:
                    expected = expected + torch_module.bias.numpy()
                errors[name] = relative_error(torch_module(torch.from_numpy(tensors[activation])).numpy(), expected)
            fake = module(**inputs).numpy()
        assert np.array_equal(module(**inputs).numpy(), reference)  # the weights are restored
    assert count == len(nodes) == qdq[precision].quantized_nodes
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])
    qdq_error = relative_error(tensors[unet[1].outputs[0].name], reference)
    fake_error = relative_error(fake, reference)
    assert 0.02 < qdq_error and abs(fake_error - qdq_error) < 0.15 * qdq_error, (fake_error, qdq_error)


def test_float8_weights_are_onnxruntimes_float8_quantization_bit_for_bit(unet, large_unet, qdq, ranges):
    """The fp8 model's weights are what onnxruntime's own float8 quantizer makes of the float weights with the
    same per-channel amax / 448 scales, and its activation scales are amax / 448 of the calibration."""
    from onnxruntime.quantization import quant_utils

    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(unet[0])).graph.initializer}
    model = onnx.load(str(large_unet.with_name(qdq["fp8"].output)))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    weights = activations = 0
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        scale, zero_point = (numpy_helper.to_array(initializers[name]) for name in dq.input[1:3])
        assert initializers[dq.input[2]].data_type == onnx.TensorProto.FLOAT8E4M3FN and not np.any(zero_point)
        if dq.input[0] in initializers:
            weight = source[dq.input[0].removesuffix("_quantized")]
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            channels = np.moveaxis(weight, axis, 0)
            np.testing.assert_array_equal(scale, np.abs(channels).reshape(len(scale), -1).max(axis=1) / 448)
            if weights < 3:  # onnxruntime's reference runs one evaluator per channel: a few channels suffice
                quantized = np.moveaxis(numpy_helper.to_array(initializers[dq.input[0]]), axis, 0)[:8]
                expected = [quant_utils.quantize_nparray(onnx.TensorProto.FLOAT8E4M3FN, channel, s, zero)
                            for channel, s in zip(channels[:8], scale[:8])]
                assert quantized.tobytes() == np.stack(expected).tobytes()
            weights += 1
        else:
            low, high = ranges[producers[dq.input[0]].input[0]].range_value
            amax = max(np.abs(np.asarray(low, np.float64)).max(), np.abs(np.asarray(high, np.float64)).max())
            assert scale == np.float32(amax / 448)
            activations += 1
    assert weights > 5 and activations > 5


def test_ranges_recorded_while_animating_quantize_the_export(unet, tmp_path):
    """`hyportrait calibrate --weights ... --out ranges.json`: the torch UNet with the engine rewrites, hooked
    over every call of the chosen steps; the ranges file names every tensor the export quantizes."""
    from hyportrait.engines.calibration import record_calibration
    from hyportrait.runtime.api import Animator

    source = tmp_path / "unet.onnx"
    shutil.copy(unet[0], source)
    animator = Animator(backend="torch", device="cpu", faithful=False, size=64, window=4, overlap=1,
                        max_frames=2, num_steps=3, pad_frames=0)
    path = record_calibration(animator, SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "ranges.json", sets=2,
                              unet_onnx=source)
    calibration = read_calibration(path)
    model = onnx.load(str(source), load_external_data=False)
    assert set(calibration.amax) == set(activation_inputs(model, select_nodes(model)))
    assert calibration.feeds is None and calibration.record["method"] == TORCH_METHOD
    assert "2 UNet calls at steps [0, 2] of 3" in calibration.record["origin"]  # one window per step
    report = quantize_unet(source, "int8", calibration)
    assert report.calibration == calibration.record and report.evaluation == {}
    # a small model keeps its weights inline: no data file beside it
    assert report.data_file is None and not list(tmp_path.glob("*.data"))
    assert current_report(source, "int8", source_sha256=report.source_sha256,
                          calibration_sha256=calibration.record["sha256"]) == report
    with pytest.raises(InputError, match="need the export's UNet"):
        record_calibration(animator, SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "ranges.json", sets=2)


def test_calibrate_command_records_ranges_only_with_the_torch_networks(tmp_path, capsys):
    from hyportrait.cli import main

    args = ["calibrate", "--models", str(tmp_path), "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO),
            "--out", str(tmp_path / "ranges.json"), "--device", "cpu"]
    assert main(args) == 2
    assert "pass --weights DIR" in capsys.readouterr().err
    assert main([*args, "--weights", str(tmp_path)]) == 2
    assert "is not a finished export" in capsys.readouterr().err


def _small_graph(path: Path, dtype) -> dict[str, np.ndarray]:
    """Conv -> Conv with a skip Add (the first conv's output also read unquantized), MatMul, then Gemm with B
    transposed and not; an all-zero output channel (the smallest-scale rule) and rounding ties. Returns a
    calibration feed."""
    from onnx import helper

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    w1[2] = 0
    weights = {"w1": w1, "b1": rng.standard_normal(4).astype(dtype), "w2": rng.standard_normal((4, 4, 1, 1)),
               "w3": rng.standard_normal((4, 6)) * 1e-3, "w4": rng.standard_normal((5, 6)),
               "w5": rng.standard_normal((5, 3))}
    weights["w3"][:, 0] = [127, 0.5, 1.5, -2.5]  # scale 1: ties, which int8 rounds half to even
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    shapes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value), name))
              for name, value in (("shape", [1, 4, 64]), ("flat", [64, 6]))]  # as torch exports them
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [*shapes, helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="/a/conv1/Conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], name="/a/conv2/Conv"),
             helper.make_node("Add", ["c1", "c2"], ["skip"], name="/a/Add"),
             helper.make_node("Reshape", ["skip", "shape"], ["r"], name="/a/Reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="/a/Transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w3"], ["m"], name="/a/proj/MatMul"),
             helper.make_node("Reshape", ["m", "flat"], ["f"], name="/a/Reshape_1"),
             helper.make_node("Gemm", ["f", "w4"], ["g1"], name="/a/fc1/Gemm", transB=1),
             helper.make_node("Gemm", ["g1", "w5"], ["y"], name="/a/fc2/Gemm")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", element, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", element, [64, 3])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return {"x": rng.standard_normal((1, 3, 8, 8)).astype(dtype)}


def _read_qdq(path: Path) -> dict[str, tuple]:
    """Per quantized node: what it reads through DequantizeLinear (the tensor quantized, and each
    initializer's type, shape and bytes), keyed by node name."""
    model = onnx.load(str(path))
    graph = model.graph
    producers, initializers = _producers(graph), {t.name: t for t in graph.initializer}

    def tensor(name):
        t = initializers[name]
        return t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()

    read = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        inputs = []
        for name in node.input[:2]:
            dq = producers[name]
            assert dq.op_type == "DequantizeLinear", (node.name, name)
            axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
            if dq.input[0] in initializers:  # a weight stored quantized
                inputs.append(("weight", axis, *map(tensor, dq.input[:3])))
            else:  # an activation through its Q/DQ pair
                q = producers[dq.input[0]]
                assert q.op_type == "QuantizeLinear" and q.input[1:] == dq.input[1:]
                inputs.append(("activation", q.input[0], axis, *map(tensor, dq.input[1:3])))
        read[node.name] = tuple(inputs)
    return read


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_int8_models_read_what_onnxruntimes_quantizer_places(tmp_path, dtype):
    """The Q/DQ placement is our own (onnxruntime's takes time quadratic in the graph's size); what each quantized
    node reads is what onnxruntime's QDQ quantizer gives it with the same settings: the same per-channel axes,
    int8 weights, scales and zero points, bit for bit, in fp32 and fp16 models. Only the quantized nodes read
    dequantized tensors (the skip Add reads the convolution's own output)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
        save_tensors_data,
    )

    source = tmp_path / "small.onnx"
    feed = _small_graph(source, dtype)
    ranges = calibrate(source, [feed], providers=["CPUExecutionProvider"])
    report = quantize_model(source, "int8", ranges, calibration={"origin": "test"}, eval_feeds=[feed],
                            providers=["CPUExecutionProvider"])
    assert report.quantized_nodes == 5 and report.evaluation["max_relative_error"] < 0.1
    ours = tmp_path / report.output
    # onnxruntime's quantizer as the reference, on the same opset-19 source
    upgraded = quantize.upgrade_opset(source, tmp_path / "upgraded.onnx")
    save_tensors_data(ranges, tmp_path / "calibration.json")
    reference = tmp_path / "reference.onnx"
    quantize_static(str(upgraded), str(reference), None, quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv", "Gemm"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(tmp_path / "calibration.json"),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Conv", "Gemm"]})
    mine, theirs = _read_qdq(ours), _read_qdq(reference)
    assert mine == theirs
    assert [inputs[1][1] for inputs in mine.values()] == [0, 0, 1, 0, 1]  # Conv, Conv, MatMul, Gemm transB, Gemm
    skip = next(n for n in onnx.load(str(ours)).graph.node if n.op_type == "Add")
    assert list(skip.input) == ["c1", "c2"]
    # fp8 of the same graph: the all-zero channel's scale stays above 0 in fp16 too (it was 0: NaN weights)
    fp8 = quantize_model(source, "fp8", ranges, calibration={"origin": "test"}, eval_feeds=[feed],
                         providers=["CPUExecutionProvider"])
    weights = [numpy_helper.to_array(t).astype(np.float32) for t in onnx.load(str(tmp_path / fp8.output)).graph.initializer
               if t.name.endswith("_quantized")]
    assert len(weights) == 5 and all(np.isfinite(w).all() for w in weights)
    assert fp8.evaluation["max_relative_error"] < 0.2


def test_a_one_dimensional_weight_stays_float(tmp_path):
    """A MatMul of an activation and a 1-D constant (an initializer or a Constant node) has no channel axis to
    scale along: it is kept float with its reason (it raised numpy's AxisError), and the model still runs."""
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    w, v, u = (rng.standard_normal(shape).astype(np.float32) for shape in ((4, 4), (4,), (4,)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="/a/MatMul"),
         helper.make_node("MatMul", ["h", "v"], ["y"], name="/a/MatMul_vector"),
         helper.make_node("Constant", [], ["u"], value=numpy_helper.from_array(u)),
         helper.make_node("MatMul", ["h", "u"], ["z"], name="/a/MatMul_constant_vector")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2]) for name in ("y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")])
    source = tmp_path / "vector.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    ranges = calibrate(source, [{"x": x}], providers=["CPUExecutionProvider"])
    report = quantize_model(source, "int8", ranges, calibration={"origin": "test"})
    assert report.quantized_nodes == 1
    assert report.excluded == {quantize.NO_CHANNEL_AXIS: ["/a/MatMul_vector", "/a/MatMul_constant_vector"]}
    y, z = ort.InferenceSession(str(quantize.quantized_path(source, "int8")), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    np.testing.assert_allclose(y, x @ w @ v, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(z, x @ w @ u, rtol=0.05, atol=0.05)


def test_a_weight_read_along_two_axes_is_refused(tmp_path):
    """One quantized copy of a weight serves all its readers: a MatMul (axis 1) and a Gemm with B transposed (axis
    0) reading the same weight cannot share it, and the graph is refused with a clear error."""
    from onnx import helper

    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 8
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="/a/MatMul"),
         helper.make_node("Gemm", ["m", "w"], ["y"], name="/a/Gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [numpy_helper.from_array(w, "w")])
    source = tmp_path / "shared.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    ranges = calibrate(source, [{"x": np.ones((2, 4), np.float32)}], providers=["CPUExecutionProvider"])
    with pytest.raises(InputError, match="weight w is read along two channel axes"):
        quantize_model(source, "int8", ranges, calibration={"origin": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.onnx"]
