"""The exported motion model: one graph for the reference pipeline's motion tokens, with a dynamic frame axis."""
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hyportrait.export.export_motion import motion_spec
from hyportrait.export.onnx_io import validate_onnx
from hyportrait.networks.contract import WINDOW
from hyportrait.networks.expression_encoder import ExpressionEncoder, ExpressionEncoderConfig
from hyportrait.networks.headpose_encoder import HeadPoseEncoder, HeadPoseEncoderConfig
from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.motion import MotionEncoder
from hyportrait.networks.motion_refiner import (
    IntensityAwareMotionRefiner,
    MotionRefinerConfig,
    assemble_motion_tokens,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def nets():
    # the spec reads only these three networks
    modules = {
        "expression": ExpressionEncoder(ExpressionEncoderConfig.tiny()),
        "headpose": HeadPoseEncoder(HeadPoseEncoderConfig.tiny()),
        "motion_refiner": IntensityAwareMotionRefiner(MotionRefinerConfig.tiny()),
    }
    return types.SimpleNamespace(**{name: randomize_weights(m, seed).eval().requires_grad_(False)
                                    for seed, (name, m) in enumerate(modules.items())})


@pytest.fixture(scope="module")
def spec(nets):
    return motion_spec(nets)


def frame_counts(spec) -> list[int]:
    return [inputs["face_images"].shape[0] for inputs in [spec.inputs, *spec.extra_inputs]]


def test_spec_inputs(spec):
    assert frame_counts(spec) == [WINDOW, 7]
    for inputs in [spec.inputs, *spec.extra_inputs]:
        assert inputs["face_images"].shape[1:] == inputs["pose_images"].shape[1:] == (3, 256, 256)
        assert 0 <= inputs["pose_images"].min() and inputs["pose_images"].max() <= 1
        for name in ("head_bucket", "exp_bucket"):
            assert inputs[name].dtype == torch.int32 and inputs[name].shape == (1,)
    assert spec.sources == ("hyportrait/expression.pth", "hyportrait/headpose.pth", "hyportrait/motion_proj.pth")


@torch.no_grad()
def test_encoder_matches_reference_pipeline(nets, spec):
    inputs = spec.extra_inputs[0]
    tokens = spec.module(**inputs)
    with torch.no_grad():  # the official computation, network by network
        refined = nets.motion_refiner(nets.expression(inputs["face_images"]), inputs["head_bucket"],
                                      inputs["exp_bucket"])
        rotation, _ = nets.headpose(inputs["pose_images"] * 2 + 1)
        reference = assemble_motion_tokens(refined, rotation)
    assert tokens.shape == (7, 64, 1024)
    assert relative_error(tokens, reference) <= 1e-5
    assert torch.equal(tokens[..., -3:], torch.zeros_like(tokens[..., -3:]))  # translation zeroed


@torch.no_grad()
def test_eager_checks(nets):
    encoder = MotionEncoder(nets.expression, nets.headpose, nets.motion_refiner)
    face, pose, bucket = torch.rand(3, 3, 64, 64), torch.rand(2, 3, 64, 64), torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="pose images"):
        encoder(face, pose, bucket, bucket)
    with pytest.raises(ValueError, match="outside the motion buckets"):
        encoder(face, face, bucket, torch.tensor([128], dtype=torch.int32))


def test_onnx_matches_torch_at_two_frame_counts(spec, exported):
    path, _ = exported
    # the traced 25-frame example and a fresh 7-frame set
    errors = validate_onnx(spec, path, providers=["CPUExecutionProvider"],
                           input_sets=[spec.inputs, *spec.extra_inputs])
    assert len(errors) == 2
    assert max(errors) <= 1e-4


def test_onnx_bucket_ids_are_live_inputs(spec, exported):
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: value.numpy() for name, value in spec.extra_inputs[0].items()}
    base = session.run(None, feed)[0]
    for name in ("head_bucket", "exp_bucket"):
        moved = session.run(None, {**feed, name: (feed[name] + 1) % 128})[0]
        assert np.abs(moved - base).max() > 1e-3, f"{name} does not reach the output"


def test_onnx_graph_has_no_control_flow(exported):
    _, model = exported
    ops = {node.op_type for node in model.graph.node}
    assert not model.functions and not ops & {"If", "Loop", "Scan"}
    inputs = {i.name: (i.type.tensor_type.elem_type,
                       [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input}
    frames = inputs["face_images"][1][0]
    assert isinstance(frames, str) and inputs["pose_images"][1][0] == frames
    assert inputs["head_bucket"] == inputs["exp_bucket"] == (onnx.TensorProto.INT32, [1])
    assert [o.name for o in model.graph.output] == ["motion_tokens"]
