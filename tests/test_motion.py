"""Motion networks: expression encoder, head-pose encoder, intensity-aware refiner, token assembly."""
import json
from pathlib import Path

import pytest
import torch

from hyportrait.networks.expression_encoder import ExpressionEncoder, ExpressionEncoderConfig
from hyportrait.networks.headpose_encoder import HeadPoseEncoder, HeadPoseEncoderConfig
from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.motion_refiner import (
    IntensityAwareMotionRefiner,
    MotionRefinerConfig,
    assemble_motion_tokens,
)

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    "checkpoint, build",
    [
        ("hyportrait/expression.pth", lambda: ExpressionEncoder(ExpressionEncoderConfig())),
        ("hyportrait/headpose.pth", lambda: HeadPoseEncoder(HeadPoseEncoderConfig())),
        ("hyportrait/motion_proj.pth", lambda: IntensityAwareMotionRefiner(MotionRefinerConfig())),
    ],
)
def test_state_dict_matches_official_checkpoint(checkpoint, build):
    expected = json.loads((DATA / "official_checkpoint_keys.json").read_text())["files"][checkpoint]
    with torch.device("meta"):
        module = build()
    assert {k: list(v.shape) for k, v in module.state_dict().items()} == expected


@torch.no_grad()
def test_expression_encoder_shape():
    encoder = randomize_weights(ExpressionEncoder(ExpressionEncoderConfig.tiny()), seed=0).eval()
    features = encoder(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, ExpressionEncoderConfig.tiny().out_dim)
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


@torch.no_grad()
def test_headpose_splits_and_squashes_the_six_outputs():
    encoder = randomize_weights(HeadPoseEncoder(HeadPoseEncoderConfig.tiny()), seed=1).eval()
    frames = torch.rand(3, 3, 64, 64) * 2 + 1
    rotation, translation = encoder(frames)
    assert rotation.shape == (3, 3) and translation.shape == (3, 3)
    raw = encoder.head_pose_net(frames)
    torch.testing.assert_close(rotation, torch.sigmoid(raw[:, :3]) * 360 - 180)
    torch.testing.assert_close(translation, torch.sigmoid(raw[:, 3:]) * 4 - 2)


@torch.no_grad()
def test_headpose_output_ranges():
    encoder = randomize_weights(HeadPoseEncoder(HeadPoseEncoderConfig.tiny()), seed=2).eval()
    encoder.head_pose_net.fc.weight.mul_(1e3)  # drive the sigmoids into saturation at both ends
    pose = encoder(torch.rand(8, 3, 64, 64) * 2 + 1)
    assert pose.rotation.abs().max() > 170 and pose.translation.abs().max() > 1.9
    assert pose.rotation.min() >= -180 and pose.rotation.max() <= 180
    assert pose.translation.min() >= -2 and pose.translation.max() <= 2


def _tiny_refiner(seed: int = 3) -> IntensityAwareMotionRefiner:
    return randomize_weights(IntensityAwareMotionRefiner(MotionRefinerConfig.tiny()), seed=seed).eval()


def _ids(head: int, exp: int, dtype=torch.int32):
    return torch.tensor([head], dtype=dtype), torch.tensor([exp], dtype=dtype)


@torch.no_grad()
def test_refiner_shape_and_frame_independence():
    config = MotionRefinerConfig.tiny()
    refiner = _tiny_refiner()
    features = torch.randn(3, config.input_dim)
    tokens = refiner(features, *_ids(5, 40))
    assert tokens.shape == (3, config.num_queries, config.output_dim)
    # each frame is refined on its own: a chunk of one frame gives the same tokens
    torch.testing.assert_close(refiner(features[1:2], *_ids(5, 40)), tokens[1:2])
    torch.testing.assert_close(refiner(features, *_ids(5, 40, torch.int64)), tokens)


@torch.no_grad()
def test_refiner_depends_on_both_bucket_ids():
    refiner = _tiny_refiner()
    features = torch.randn(2, MotionRefinerConfig.tiny().input_dim)
    base = refiner(features, *_ids(10, 10))
    for head, exp in [(11, 10), (10, 11), (0, 127)]:
        assert (refiner(features, *_ids(head, exp)) - base).abs().max() > 1e-3


@pytest.mark.parametrize("head, exp", [(-1, 0), (0, 128), (128, 5)])
def test_refiner_rejects_ids_outside_the_buckets(head, exp):
    refiner = _tiny_refiner()
    with pytest.raises(ValueError, match="outside the motion buckets"):
        refiner(torch.randn(1, MotionRefinerConfig.tiny().input_dim), *_ids(head, exp))


def test_refiner_rejects_badly_shaped_ids():
    refiner = _tiny_refiner()
    features = torch.randn(1, MotionRefinerConfig.tiny().input_dim)
    with pytest.raises(ValueError, match="shape"):
        refiner(features, torch.tensor([1, 2]), torch.tensor([3]))
    with pytest.raises(ValueError, match="integer"):
        refiner(features, torch.tensor([1.0]), torch.tensor([3]))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # nn.MultiheadAttention's own shape checks
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.trace itself; the exporter still uses it
@torch.no_grad()
def test_refiner_traces_without_the_host_check():
    # the legacy ONNX exporter traces the module; the id check must not end up in (or break) the trace
    refiner = _tiny_refiner()
    features = torch.randn(2, MotionRefinerConfig.tiny().input_dim)
    traced = torch.jit.trace(refiner, (features, *_ids(3, 4)))
    torch.testing.assert_close(traced(features, *_ids(90, 7)), refiner(features, *_ids(90, 7)))


def test_assemble_motion_tokens():
    refined = torch.randn(4, 64, 1018)
    rotation = torch.randn(4, 3) * 100
    tokens = assemble_motion_tokens(refined, rotation)
    assert tokens.shape == (4, 64, 1024)
    assert torch.equal(tokens[..., :1018], refined)
    assert torch.equal(tokens[..., 1018:1021], rotation[:, None, :].expand(4, 64, 3))
    assert torch.count_nonzero(tokens[..., 1021:]) == 0
