"""Float8 token linears for the torch backend (Ada and Hopper GPUs): torch's own fp8 GEMM, no other library.

Each converted `nn.Linear` keeps an e4m3 copy of its weight with one fp32 scale (amax / 448) and quantizes
its input the same way at run time (one scale per call, from the input's amax), then multiplies with
`torch._scaled_mm` (cuBLASLt's fp8 GEMM; fp32 accumulation, the scales and bias applied in its epilogue).
Under `torch.compile` the amax and the cast fuse into the kernels around the GEMM.

Only the linears of the UNet's transformer blocks are converted (attention projections, GEGLU and feed-
forward, proj_in/proj_out; 448 at the official size): about half of the rewritten UNet's FLOPs. The
convolutions stay fp16 (torch has no fp8 convolution), and so do the embedding MLPs, whose few rows gain
nothing. Dynamic per-tensor scales need no calibration. Measured on an H100 (benchmarks/RESULTS.md, session 4):
slower than the compiled fp16 UNet (the amax and cast passes cost what the GEMM saves) and 19 dB further from
fp32; kept as the measured torch fp8 path, off by default.
"""
from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def to_float8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as e4m3 values and the fp32 scale that multiplies them back (per tensor, from the amax)."""
    scale = x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class Float8Linear(nn.Module):
    """An `nn.Linear` computed by an fp8 GEMM: weight quantized once, input at every call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = to_float8(linear.weight.detach())
        self.register_buffer("weight_float8", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias  # shared with the fp16 module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        quantized, scale = to_float8(rows)
        # cuBLASLt takes a bias in the epilogue only for a half-precision output
        fused_bias = self.bias is not None and x.dtype in (torch.float16, torch.bfloat16)
        out = torch._scaled_mm(quantized, self.weight_float8.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias if fused_bias else None, out_dtype=x.dtype, use_fast_accum=True)
        if self.bias is not None and not fused_bias:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def is_token_linear(name: str, module: nn.Module) -> bool:
    """A linear of a transformer block that the fp8 GEMM takes (both dimensions multiples of 16)."""
    return (isinstance(module, nn.Linear) and ".attentions." in name and "time_pos_embed" not in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_linears(model: nn.Module) -> int:
    """Replace the token linears of `model` (in place) by `Float8Linear`s; returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if is_token_linear(name, module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Float8Linear(module))
    return len(targets)


def check_float8_device(device: torch.device) -> None:
    """fp8 GEMMs run on CUDA GPUs of compute capability 8.9 and newer (and on CPUs, slowly: for tests)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"float8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
