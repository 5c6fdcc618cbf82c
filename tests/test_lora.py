"""merge_lora: PEFT LoRA state dicts merged into the tiny UNet, against the formula and an unmerged LoRA path."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hyportrait.errors import WeightsError
from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.lora import merge_lora
from hyportrait.networks.unet import UNetConfig, UNetWithAdapters

RANK, ALPHA, SCALE = 4, 8.0, 0.7
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the LCM fork's LoraConfig target_modules


@pytest.fixture(scope="module")
def unet() -> UNetWithAdapters:
    return randomize_weights(UNetWithAdapters(UNetConfig.tiny()), seed=0).eval()


def _targets(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear PEFT's target_modules select: names ending in one of TARGETS (not the IP to_k_ip.0)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in TARGETS)}


def _lora(unet: nn.Module, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (r, in), B (out, r))}; B non-zero (PEFT initialises it to zero, training moves it)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(RANK, m.in_features, generator=gen) / m.in_features ** 0.5,
                torch.randn(m.out_features, RANK, generator=gen) * 0.1)
            for n, m in _targets(unet).items()}


def _peft_keys(lora, prefix: str = "base_model.model.", adapter: str = "") -> dict[str, torch.Tensor]:
    adapter = f".{adapter}" if adapter else ""
    state = {}
    for name, (down, up) in lora.items():
        state[f"{prefix}{name}.lora_A{adapter}.weight"] = down
        state[f"{prefix}{name}.lora_B{adapter}.weight"] = up
    return state


def _inputs(batch: int = 1, frames: int = 4, size: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, frames, 8, size, size, generator=gen),
        "timestep": torch.tensor([0.4]),
        "appearance_tokens": torch.randn(batch, frames, 64, 1024, generator=gen),
        "motion_tokens": torch.randn(batch, frames, 64, 1024, generator=gen),
        "pose_features": torch.randn(32, size, size, generator=gen),
        "added_time_ids": torch.tensor([[12.5, 0.0, 0.0]] * batch),
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_lcm_targets_cover_the_attention_projections(unet):
    targets = _targets(unet)
    attentions = [n for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(targets) == 4 * len(attentions) == 160
    assert not any("_ip" in n for n in targets)


@torch.no_grad()
def test_merged_weights_and_output_match_the_lora_path(unet, tmp_path):
    lora = _lora(unet)
    # the layout PeftModel.save_pretrained writes
    save_file(_peft_keys(lora), str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS)}))
    merged = copy.deepcopy(unet)
    names = merge_lora(merged, tmp_path, scale=SCALE)
    assert sorted(names) == sorted(lora)

    factor = SCALE * ALPHA / RANK
    base, after = dict(unet.named_parameters()), dict(merged.named_parameters())
    for name, weight in after.items():
        module = name.removesuffix(".weight")
        if module in lora:
            down, up = lora[module]
            expected = base[name].double() + factor * up.double() @ down.double()
            torch.testing.assert_close(weight.double(), expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(weight, base[name]), name

    # the unmerged model with the LoRA branch added to each targeted Linear's output, as PEFT runs it
    unmerged = copy.deepcopy(unet)
    targets = _targets(unmerged)
    for name, (down, up) in lora.items():
        targets[name].register_forward_hook(
            lambda m, args, out, down=down, up=up: out + factor * (args[0] @ down.T @ up.T))
    inputs = _inputs()
    reference = unmerged(**inputs)
    assert _rel_err(merged(**inputs), reference) < 1e-5
    assert _rel_err(unet(**inputs), reference) > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("prefix,adapter,suffix", [
    ("", "", ".safetensors"),  # no base_model.model. prefix
    ("base_model.model.", "default", ".pth"),  # in-memory PEFT keys, with the adapter name
    ("unet.", "", ".bin"),  # diffusers' LoRA layout
])
def test_key_variants_and_file_formats_merge_the_same(unet, tmp_path, prefix, adapter, suffix):
    lora = _lora(unet)
    path = tmp_path / f"lora{suffix}"
    state = _peft_keys(lora, prefix, adapter)
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    merged = copy.deepcopy(unet)
    assert sorted(merge_lora(merged, path, alpha=ALPHA)) == sorted(lora)  # no adapter_config.json: alpha as given
    for name, (down, up) in lora.items():
        expected = unet.get_submodule(name).weight + ALPHA / RANK * up @ down
        torch.testing.assert_close(merged.get_submodule(name).weight, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_alpha_defaults_to_rank_and_rslora_and_patterns_are_read(unet, tmp_path):
    lora = _lora(unet)
    name = next(iter(lora))
    down, up = lora[name]
    weight = unet.get_submodule(name).weight

    def merged_delta(config: dict | None, **kwargs) -> torch.Tensor:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        save_file(_peft_keys({name: lora[name]}), str(folder / "adapter_model.safetensors"))
        if config is not None:
            (folder / "adapter_config.json").write_text(json.dumps(config))
        merged = copy.deepcopy(unet)
        merge_lora(merged, folder, **kwargs)
        return merged.get_submodule(name).weight - weight

    product = up @ down
    torch.testing.assert_close(merged_delta(None), product, rtol=1e-5, atol=1e-6)  # alpha = r
    torch.testing.assert_close(merged_delta({"r": RANK, "lora_alpha": ALPHA, "use_rslora": True}),
                               ALPHA / RANK ** 0.5 * product, rtol=1e-5, atol=1e-6)
    module_end = ".".join(name.split(".")[-3:])  # e.g. "attn1.to_out.0": PEFT matches the path's end
    torch.testing.assert_close(
        merged_delta({"r": 64, "lora_alpha": ALPHA, "rank_pattern": {module_end: RANK},
                      "alpha_pattern": {module_end: 2.0}}),
        2.0 / RANK * product, rtol=1e-5, atol=1e-6)


def test_bad_loras_raise_weights_errors_and_change_nothing(unet, tmp_path):
    lora = _lora(unet)
    good = _peft_keys(lora)
    name = next(iter(lora))
    down, up = lora[name]
    cases = {
        "no such module": good | {"base_model.model.down_blocks.9.attn1.to_q.lora_A.weight": down,
                                  "base_model.model.down_blocks.9.attn1.to_q.lora_B.weight": up},
        "rank mismatch": good | {f"base_model.model.{name}.lora_B.weight": up[:, :RANK - 1]},
        "without both": {k: v for k, v in good.items() if not k.endswith(f"{name}.lora_B.weight")},
        "not lora_A/lora_B": good | {f"base_model.model.{name}.base_layer.weight": torch.zeros(2, 2)},
        "not a Linear": {"conv_in.lora_A.weight": down, "conv_in.lora_B.weight": up},
        "LoRA maps": good | {f"base_model.model.{name}.lora_A.weight": torch.zeros(RANK, 7)},
        "several adapters": _peft_keys(lora, adapter="default") | _peft_keys(lora, adapter="other"),
        "empty": {},
    }
    before = copy.deepcopy(unet.state_dict())
    target = copy.deepcopy(unet)
    for message, state in cases.items():
        with pytest.raises(WeightsError, match=message):
            merge_lora(target, state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key

    save_file(good, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK + 1, "lora_alpha": ALPHA}))
    with pytest.raises(WeightsError, match=f"r={RANK + 1}"):
        merge_lora(target, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    with pytest.raises(WeightsError, match="lora_alpha"):
        merge_lora(target, tmp_path, alpha=ALPHA + 1)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(WeightsError, match="adapter_model"):
        merge_lora(target, empty_folder)
    with pytest.raises(WeightsError, match="not found"):
        merge_lora(target, tmp_path / "missing.safetensors")
