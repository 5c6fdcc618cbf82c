"""Merging a PEFT LoRA into the UNet's weights before export (what `merge_and_unload()` does).

The LCM fork (train_lcm_lora.py) wraps the UNet with `get_peft_model(unet, LoraConfig(r, lora_alpha=r,
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))` and saves it with `save_pretrained(dir)`: the folder
holds `adapter_config.json` and `adapter_model.safetensors` (`adapter_model.bin` from older PEFT), keyed
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). Also read: the same
keys without the `base_model.model.` prefix or with diffusers' `unet.` prefix, and the in-memory PEFT form
with the adapter name, `.lora_A.<adapter>.weight`. Each LoRA pair adds to its Linear's weight

    W += scale * alpha / r * B @ A        (alpha / sqrt(r) with `use_rslora`)

with alpha and r from adapter_config.json when there is one (`alpha_pattern`/`rank_pattern` entries
included), else `alpha` as given (default: r, the fork's setting).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from hyportrait.errors import WeightsError, describe

from .weights import read_checkpoint

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"
KEY_PREFIXES = ("base_model.model.", "unet.")
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A PEFT adapter folder, or one .safetensors/.bin/.pth file -> (state dict, adapter config or {})."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ADAPTER_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path}: LoRA folder holds none of {', '.join(ADAPTER_FILES)}")
        weights_file, config_file = found[0], path / CONFIG_FILE
    else:
        weights_file, config_file = path, path.parent / CONFIG_FILE
    state = read_checkpoint(weights_file)
    if not config_file.is_file():
        return state, {}
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{config_file}: not a readable adapter config ({describe(exc)})") from None
    return state, config


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's per-module override: a pattern applies when it matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": lora_A, "B": lora_B}}; one adapter only; any other key is an error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters, foreign = set(), []
    for key, tensor in state.items():
        match = LORA_KEY.fullmatch(key)
        if not match:
            foreign.append(key)
            continue
        module = match["module"]
        for prefix in KEY_PREFIXES:
            module = module.removeprefix(prefix)
        adapters.add(match["adapter"])
        pairs.setdefault(module, {})[match["part"]] = tensor
    if foreign:
        raise WeightsError(f"LoRA state dict has {len(foreign)} keys that are not lora_A/lora_B weights "
                           f"(DoRA, LoRA biases and base weights are not supported): {', '.join(foreign[:5])}")
    if len(adapters) > 1:
        raise WeightsError(f"LoRA state dict holds several adapters ({', '.join(sorted(map(str, adapters)))}): "
                           "pass the state dict of one")
    unpaired = sorted(m for m, parts in pairs.items() if len(parts) != 2)
    if unpaired:
        raise WeightsError(f"LoRA modules without both lora_A and lora_B: {', '.join(unpaired[:5])}")
    return pairs


@torch.no_grad()
def merge_lora(unet: nn.Module, lora: str | Path | Mapping[str, torch.Tensor], scale: float = 1.0,
               alpha: float | None = None) -> list[str]:
    """Add a LoRA into `unet`'s Linear weights in place; returns the merged module paths.

    lora: a PEFT adapter folder, a weights file (its folder's adapter_config.json is read when present),
    or a state dict. alpha: for LoRAs without a config (default: each module's rank); given together with
    a config, it must agree with the config's `lora_alpha`. Everything is checked before any weight changes.
    """
    state, config = read_lora(lora) if isinstance(lora, (str, Path)) else (dict(lora), {})
    if not state:
        raise WeightsError("LoRA state dict is empty")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise WeightsError("LoRA config uses DoRA or fan_in_fan_out, which merge_lora does not support")
    if alpha is not None and "lora_alpha" in config and float(config["lora_alpha"]) != float(alpha):
        raise WeightsError(f"alpha={alpha} given, but the adapter config says lora_alpha={config['lora_alpha']}")

    updates: list[tuple[str, nn.Linear, torch.Tensor, torch.Tensor, float]] = []
    problems: list[str] = []
    for name, parts in sorted(_lora_pairs(state).items()):
        down, up = parts["A"], parts["B"]
        try:
            linear = unet.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the UNet")
            continue
        if not isinstance(linear, nn.Linear):
            problems.append(f"{name}: is a {type(linear).__name__}, not a Linear")
            continue
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            problems.append(f"{name}: rank mismatch, lora_A {list(down.shape)} and lora_B {list(up.shape)}")
            continue
        if down.shape[1] != linear.in_features or up.shape[0] != linear.out_features:
            problems.append(f"{name}: LoRA maps {down.shape[1]} -> {up.shape[0]} features, the Linear "
                            f"{linear.in_features} -> {linear.out_features}")
            continue
        rank = down.shape[0]
        if "r" in config:
            expected = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
            if rank != expected:
                problems.append(f"{name}: rank {rank}, but the adapter config says r={expected}")
                continue
        default_alpha = config.get("lora_alpha", rank if alpha is None else alpha)
        module_alpha = _pattern_value(config.get("alpha_pattern") or {}, name, default_alpha)
        scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        updates.append((name, linear, down, up, scale * scaling))
    if problems:
        raise WeightsError(f"LoRA does not fit the UNet ({len(problems)} modules): " + "; ".join(problems[:5]))
    for _, linear, down, up, factor in updates:
        weight = linear.weight
        delta = up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)
        weight.copy_(weight.float() + factor * delta)
    return [name for name, *_ in updates]
