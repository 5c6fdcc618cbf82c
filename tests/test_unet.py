"""UNetWithAdapters: official key layout, config reading, and where each conditioning input enters."""
import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from hyportrait.errors import WeightsError
from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.unet import UNetConfig, UNetWithAdapters

DATA = Path(__file__).resolve().parent / "data"  # the official checkpoint keys, the SVD-xt UNet config
FRAMES, SIZE = 4, 8  # 8x8 latents: three downsamplings leave 1x1 at the deepest level


def test_state_dict_matches_official_checkpoint():
    expected = json.loads((DATA / "official_checkpoint_keys.json").read_text())["files"]["hyportrait/unet.pth"]
    with torch.device("meta"):
        unet = UNetWithAdapters(UNetConfig())
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == expected


def test_config_from_json_is_the_default(tmp_path):
    config_json = DATA / "svd_xt_unet_config.json"
    assert UNetConfig.from_json(config_json) == UNetConfig()
    patched = json.loads(config_json.read_text()) | {"norm_num_groups": 32}
    (tmp_path / "config.json").write_text(json.dumps(patched))
    with pytest.raises(WeightsError, match="norm_num_groups"):
        UNetConfig.from_json(tmp_path / "config.json")


@pytest.fixture(scope="module")
def unet() -> UNetWithAdapters:
    return randomize_weights(UNetWithAdapters(UNetConfig.tiny()), seed=0).eval()


def _inputs(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pose_channels = UNetConfig.tiny().block_out_channels[0]
    return {
        "sample": torch.randn(batch, FRAMES, 8, SIZE, SIZE, generator=gen),
        "timestep": torch.tensor(0.4),
        "appearance_tokens": torch.randn(batch, FRAMES, 64, 1024, generator=gen),
        "motion_tokens": torch.randn(batch, FRAMES, 64, 1024, generator=gen),
        "pose_features": torch.randn(batch, FRAMES, pose_channels, SIZE, SIZE, generator=gen),
        "added_time_ids": torch.tensor([[12.5, 0.0, 0.0]] * batch),
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_batch_items_are_independent(unet):
    batched = _inputs(3)
    out = unet(**batched)
    assert out.shape == (3, FRAMES, 4, SIZE, SIZE)
    for b in range(3):
        single = {k: v if k == "timestep" else v[b:b + 1] for k, v in batched.items()}
        single_out = unet(**single)
        assert single_out.shape == (1, FRAMES, 4, SIZE, SIZE)
        # batch size changes the kernels' summation order: float rounding, amplified by the random net
        assert _rel_err(single_out[0], out[b]) < 2e-5
    per_item_timestep = unet(**(batched | {"timestep": torch.full((3,), 0.4)}))
    torch.testing.assert_close(per_item_timestep, out, rtol=0, atol=0)
    other_timestep = unet(**(batched | {"timestep": torch.tensor([0.4, -1.0, 0.4])}))
    assert _rel_err(other_timestep[1], out[1]) > 1e-3 and torch.equal(other_timestep[2], out[2])


@torch.no_grad()
def test_every_token_set_and_the_pose_change_the_output(unet):
    inputs = _inputs(1)
    out = unet(**inputs)
    for name in ("appearance_tokens", "motion_tokens", "pose_features", "added_time_ids"):
        assert _rel_err(unet(**(inputs | {name: inputs[name] * 0.5})), out) > 1e-3, name


@torch.no_grad()
def test_zero_motion_tokens_equal_a_unet_without_ip_branch(unet):
    inputs = _inputs(1) | {"motion_tokens": torch.zeros(1, FRAMES, 64, 1024)}
    without_ip = copy.deepcopy(unet)
    for module in without_ip.modules():
        if isinstance(module, Attention) and hasattr(module.processor, "to_k_ip"):
            module.processor.scale = [0.0]  # diffusers skips the IP attention at scale 0
    # to_k_ip/to_v_ip have no bias: zero tokens give zero values, so the IP attention adds exactly 0
    torch.testing.assert_close(unet(**inputs), without_ip(**inputs), rtol=0, atol=0)
    assert _rel_err(without_ip(**_inputs(1)), unet(**_inputs(1))) > 1e-3


class _OutputBiasOnly:
    """Cross-attention replaced by what it yields for all-zero keys and values: to_out's bias."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        return attn.to_out[0].bias.expand_as(hidden_states)


@torch.no_grad()
def test_zero_tokens_leave_only_the_cross_attention_output_bias(unet):
    inputs = _inputs(1) | {
        "appearance_tokens": torch.zeros(1, FRAMES, 64, 1024),
        "motion_tokens": torch.zeros(1, FRAMES, 64, 1024),
    }
    bias_only = copy.deepcopy(unet)
    cross_attentions = [m for n, m in bias_only.named_modules() if n.endswith("attn2")]
    assert len(cross_attentions) == 2 * 10  # spatial + temporal in each of the tiny UNet's 10 transformers
    for attn in cross_attentions:
        attn.set_processor(_OutputBiasOnly())
    torch.testing.assert_close(unet(**inputs), bias_only(**inputs), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_pose_features_are_added_to_conv_in_output(unet):
    # float64: the check is an identity, and fp32 rounding of the shifted bias is amplified by the net
    unet = copy.deepcopy(unet).double()
    inputs = {k: v.double() for k, v in _inputs(1).items()}
    channel_shift = torch.randn(UNetConfig.tiny().block_out_channels[0], dtype=torch.float64)
    shifted_bias = copy.deepcopy(unet)
    shifted_bias.conv_in.bias += channel_shift
    pose_shape = inputs["pose_features"].shape
    zero_pose = inputs | {"pose_features": torch.zeros(pose_shape, dtype=torch.float64)}
    constant_pose = inputs | {"pose_features": channel_shift[:, None, None].expand(pose_shape)}
    torch.testing.assert_close(unet(**constant_pose), shifted_bias(**zero_pose), rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_cross_attention_contexts(unet):
    """Spatial attn2 sees each frame's tokens; temporal attn2 sees the window's frame mean at every pixel."""
    batch = 2
    inputs = _inputs(batch)
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a, kw, name=n: seen.append((name, kw["encoder_hidden_states"])),
                                    with_kwargs=True)
        for n, m in unet.named_modules() if n.endswith("attn2")
    ]
    try:
        unet(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 20
    appearance, motion = inputs["appearance_tokens"], inputs["motion_tokens"]
    for name, (context, (ip_context,)) in seen:
        if ".temporal_transformer_blocks." in name:
            pixels = context.shape[0] // batch
            for tokens, got in ((appearance, context), (motion, ip_context)):
                expected = tokens.mean(dim=1, keepdim=True).expand(batch, pixels, 64, 1024).flatten(0, 1)
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            torch.testing.assert_close(context, appearance.flatten(0, 1), rtol=0, atol=0)
            torch.testing.assert_close(ip_context, motion.flatten(0, 1), rtol=0, atol=0)
