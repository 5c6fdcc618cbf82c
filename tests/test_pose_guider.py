"""PoseGuider: official key layout, per-frame video layout, and the constant map for black pose frames."""
import json
from pathlib import Path

import torch

from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.pose_guider import PoseGuider, PoseGuiderConfig

DATA = Path(__file__).resolve().parent / "data"


def test_state_dict_matches_official_checkpoint():
    official = json.loads((DATA / "official_checkpoint_keys.json").read_text())["files"]
    expected = official["hyportrait/pose_guider.pth"]
    with torch.device("meta"):
        guider = PoseGuider(PoseGuiderConfig())
    assert {k: list(v.shape) for k, v in guider.state_dict().items()} == expected


def _tiny_guider() -> PoseGuider:
    return randomize_weights(PoseGuider(PoseGuiderConfig.tiny()), seed=0).eval()


@torch.no_grad()
def test_forward_shape_and_frame_layout():
    guider = _tiny_guider()
    video = torch.randn(2, 3, 3, 32, 40)  # (B, C, F, H, W), every frame different
    features = guider(video)
    assert features.shape == (2, PoseGuiderConfig.tiny().conditioning_embedding_channels, 3, 4, 5)
    for b in range(2):
        for f in range(3):
            torch.testing.assert_close(features[b, :, f], guider.encode_frames(video[b:b + 1, :, f])[0])
    assert not torch.allclose(features[0, :, 0], features[0, :, 1])


@torch.no_grad()
def test_constant_features_equal_the_general_path_on_a_black_video():
    guider = _tiny_guider()
    constant = guider.constant_features(48, 32)
    assert constant.shape == (PoseGuiderConfig.tiny().conditioning_embedding_channels, 6, 4)
    features = guider(torch.zeros(1, 3, 4, 48, 32))
    for f in range(4):
        # batch size changes the conv kernels' summation order, hence float-rounding tolerances
        torch.testing.assert_close(features[0, :, f], constant, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(features[0, :, f], features[0, :, 0], rtol=1e-5, atol=1e-6)
    # bias propagation and zero padding make it a non-trivial, spatially varying map
    assert constant.abs().max() > 0 and not torch.allclose(constant, constant[:, :1, :1].expand_as(constant))
