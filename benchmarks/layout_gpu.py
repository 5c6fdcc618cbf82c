"""Where the VAE decoder's and the UNet's time goes, and what layouts, cuDNN's autotuner and torch.compile
change: each network timed as the runtime calls it (fp16, CUDA graphs, random official-size weights) in
every variant asked for, plus the top kernels of the variants named in --profile from torch's profiler.

    python -m hyportrait.benchmarks.layout_gpu --report layout.json [--compile] [--networks ...] [--size tiny]
    python -m hyportrait.benchmarks.layout_gpu --report layout.json --variants eager compiled+forced_layout_opt

A variant is "eager" or a "+"-joined set of:
    compiled          torch.compile (inductor; minutes per network and shape)
    channels_last     convolution weights in channels-last, so cuDNN runs its NHWC kernels without transposes
                      (activations follow the weights' layout)
    cudnn_benchmark   torch.backends.cudnn.benchmark: cuDNN times its algorithms per shape and keeps the fastest
    temporal_conv2d   the temporal (k, 1, 1) Conv3d layers as a Conv2d over a (B, C, F, H*W) view
    forced_layout_opt inductor's layout optimisation forced on (channels-last convolutions decided by inductor;
                      its heuristics may leave them off)
Default: eager and channels_last; --compile adds compiled and compiled+channels_last.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hyportrait.benchmarks.bench import cuda_ms, first_call_seconds, report_header, unet_inputs
from hyportrait.export.onnx_io import relative_error
from hyportrait.files import write_json
from hyportrait.networks.unet import UNetWithPoseMap, weight_sharing_copy
from hyportrait.networks.vae import VAEClipDecoder
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.backends import TorchSession
from hyportrait.runtime.models import ModelOptions, load_models, place_networks
from hyportrait.runtime.pipeline import AnimateConfig

SIZES = {"official": {}, "tiny": {"size": 64, "window": 4, "decode_chunk": 2}}
NETWORKS = ["vae_decoder", "unet_b3", "unet_b1"]
OPTIONS = ("compiled", "channels_last", "cudnn_benchmark", "temporal_conv2d", "forced_layout_opt")


def variant_options(name: str) -> set[str]:
    """"eager" -> {}; "compiled+channels_last" -> {"compiled", "channels_last"}."""
    options = set() if name == "eager" else set(name.split("+"))
    unknown = options - set(OPTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant option(s) {', '.join(sorted(unknown))} in {name!r}: "
                                         f"use eager or a +-joined set of {', '.join(OPTIONS)}")
    return options


def set_conv_layout(module: nn.Module, channels_last: bool) -> nn.Module:
    """Convolution weights in channels-last (NHWC / NDHWC) or the default layout, in place. Convolutions
    follow their weight's layout, so the activations become channels-last too and cuDNN skips its
    NCHW<->NHWC transposes; the temporal layers' (B*F,C,H,W) -> (B,C,F,H,W) permutes keep the layout."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            layout = {4: torch.channels_last, 5: torch.channels_last_3d}[m.weight.dim()] if channels_last \
                else torch.contiguous_format
            m.weight.data = m.weight.data.contiguous(memory_format=layout)
    return module


class TemporalConvAs2d(nn.Module):
    """A Conv3d with a (k, 1, 1) kernel (stride 1, zero padding in time only) as a Conv2d over the
    (B, C, F, H*W) view of its input: the same sums, through cuDNN's 2-D kernels."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.conv = conv

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        return (isinstance(conv, nn.Conv3d) and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
                and conv.dilation == (1, 1, 1) and conv.padding[1:] == (0, 0) and conv.groups == 1
                and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        y = F.conv2d(x.reshape(b, c, f, h * w), self.conv.weight.flatten(3), self.conv.bias,
                     padding=(self.conv.padding[0], 0))
        return y.reshape(b, -1, y.shape[2], h, w)


def temporal_convs_as_2d(module: nn.Module) -> nn.Module:
    """Every (k, 1, 1) Conv3d of `module` wrapped as a TemporalConvAs2d, in place (weights shared)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if TemporalConvAs2d.applies_to(child):
                setattr(parent, name, TemporalConvAs2d(child))
    return module


def top_kernels(fn, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


@contextlib.contextmanager
def variant_settings(options: set[str]):
    """The process-wide switches of a variant, for its compilation, timing and profile."""
    import torch._inductor.config as inductor_config

    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in options
    try:
        with inductor_config.patch(force_layout_optimization="forced_layout_opt" in options):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def variant_module(make, options: set[str]) -> nn.Module:
    module = make()  # a copy; the weights are shared
    set_conv_layout(module, "channels_last" in options)
    if "temporal_conv2d" in options:
        temporal_convs_as_2d(module)
    if "compiled" not in options:
        return module
    # dynamo would reuse an earlier variant's code for this copy (modules of one class share it), whatever
    # inductor options that code was built with
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--compile", action="store_true", help="also the compiled variants (minutes each)")
    p.add_argument("--variants", nargs="+", help="the variants to run (instead of the defaults), eager first")
    p.add_argument("--profile", nargs="+", default=["eager"], help="variants whose top kernels are recorded")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=NETWORKS)
    p.add_argument("--size", choices=list(SIZES), default="official")
    a = p.parse_args(argv)
    variants = a.variants or ["eager", "channels_last"] + (["compiled", "compiled+channels_last"] if a.compile else [])
    try:  # every variant's options, in run order (a profiled-only variant last)
        options_of = {name: variant_options(name) for name in variants + a.profile}
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    report = {**report_header(), "size": a.size, "networks": {}}

    def save():
        write_json(a.report, report)

    config = AnimateConfig(device=device, **SIZES[a.size])
    nets = place_networks(random_networks(a.size, seed=0), torch.device(device), dtype)
    # for the UNet's inputs
    models = load_models("torch", nets, device, ModelOptions(precision="fp16" if gpu else "fp32", size=config.size))
    latent = config.size // 8

    def make_unet():
        return UNetWithPoseMap(weight_sharing_copy(nets.unet).set_engine_rewrites(True)).eval()

    calls = {
        "vae_decoder": (lambda: VAEClipDecoder(weight_sharing_copy(nets.vae)).eval(),
                        {"latents": torch.randn(config.decode_chunk, 4, latent, latent, device=device, dtype=dtype)}),
        "unet_b3": (make_unet, unet_inputs(models, config, 3)),
        "unet_b1": (make_unet, unet_inputs(models, config, 1)),
    }
    for name in a.networks:
        make, inputs = calls[name]
        entry = report["networks"][name] = {}
        reference = None
        for variant, options in options_of.items():
            with variant_settings(options):
                try:
                    module = variant_module(make, options)
                    if variant in variants:
                        call = functools.partial(TorchSession(name, module, {}, cuda_graph=gpu), **inputs)
                        first = first_call_seconds(call)
                        out = call().float()
                        reference = out if reference is None else reference
                        # the CPU dry run times twice: its numbers only show the code runs
                        ms = cuda_ms(call, repeat=10) if gpu else cuda_ms(call, warmup=0, repeat=2)
                        entry[variant] = {"first_call_s": first, "ms": ms,
                                          "relative_error_vs_first_variant":
                                              relative_error(out.cpu().numpy(), reference.cpu().numpy())}
                        print(name, variant, entry[variant], flush=True)
                    if variant in a.profile:
                        entry[f"top_kernels_{variant}"] = top_kernels(functools.partial(module, **inputs), rows=30)
                except Exception as exc:  # noqa: BLE001 -- record and go on with the other variants
                    # a failed profile keeps the variant's times beside the error
                    entry.setdefault(variant, {})["error"] = f"{type(exc).__name__}: {exc}"[:1000]
                    print(name, variant, entry[variant], flush=True)
            save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
