"""Random weights for any network, scaled so deep stacks keep unit-range activations.

Used by tests and speed runs, which need no checkpoints. Default constructors leave some layers
zero-initialised (PoseGuider.conv_out, ...); a test on such a model could pass while ignoring an input,
so every parameter and float buffer is redrawn here.
"""
import math

import torch
from torch import nn

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def randomize_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std + mean)

    done = set()
    for m in module.modules():
        if isinstance(m, _NORMS):
            if m.weight is not None:
                draw(m.weight, 0.1, 1.0)
                draw(m.bias, 0.1)
                done.update((id(m.weight), id(m.bias)))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                draw(m.running_mean, 0.1)
                m.running_var.copy_(1.0 + torch.rand(m.running_var.shape, generator=gen))
        elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            fan_in = m.weight[0].numel()
            draw(m.weight, 1.0 / math.sqrt(fan_in))
            done.add(id(m.weight))
            if m.bias is not None:
                draw(m.bias, 0.02)
                done.add(id(m.bias))
    for p in module.parameters():
        if id(p) in done:
            continue
        if p.dim() >= 2:  # raw projection matrices (e.g. nn.MultiheadAttention.in_proj_weight)
            draw(p, 1.0 / math.sqrt(p.shape[-1]))
        else:
            draw(p, 0.02)
    return module
