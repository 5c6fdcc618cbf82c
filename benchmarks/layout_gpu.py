"""Where the VAE decoder's and the UNet's time goes, and what channels-last convolutions and torch.compile
change: each network timed as the runtime calls it (fp16, CUDA graphs, random official-size weights) in
every variant, plus the top kernels of one eager call from torch's profiler.

    python -m hyportrait.benchmarks.layout_gpu --report layout.json [--compile] [--networks ...] [--size tiny]

Variants: eager (NCHW, the runtime's default), channels-last (convolution weights in channels-last, so
cuDNN runs its NHWC kernels without transposes; activations follow the weights' layout), and with
--compile the same two compiled by inductor (minutes per network and shape).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from torch import nn

from hyportrait.benchmarks.bench import cuda_ms, first_call_seconds, report_header, unet_inputs
from hyportrait.export.export_unet import UNetWithPoseMap, weight_sharing_copy
from hyportrait.export.export_vae import VAEClipDecoder
from hyportrait.export.onnx_io import relative_error
from hyportrait.export.weights import random_networks
from hyportrait.runtime.backends import TorchSession
from hyportrait.runtime.models import place_networks, torch_models
from hyportrait.runtime.pipeline import AnimateConfig

SIZES = {"official": {}, "tiny": {"size": 64, "window": 4}}
NETWORKS = ["vae_decoder", "unet_b3", "unet_b1"]


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


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--compile", action="store_true", help="also the compiled variants (minutes each)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, default=NETWORKS)
    p.add_argument("--size", choices=list(SIZES), default="official")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    report = {**report_header(), "size": a.size, "networks": {}}

    def save():
        a.report.write_text(json.dumps(report, indent=1) + "\n")

    config = AnimateConfig(device=device, **SIZES[a.size])
    nets = place_networks(random_networks(a.size, seed=0), torch.device(device), dtype)
    models = torch_models(nets, device=device, dtype=dtype, size=config.size)  # for the UNet's inputs
    latent = config.size // 8
    calls = {
        "vae_decoder": (lambda: VAEClipDecoder(nets.vae).eval(),
                        {"latents": torch.randn(config.decode_chunk, 4, latent, latent, device=device, dtype=dtype)}),
        "unet_b3": (lambda: UNetWithPoseMap(weight_sharing_copy(nets.unet).set_engine_rewrites(True)).eval(),
                    unet_inputs(models, config, 3)),
        "unet_b1": (lambda: UNetWithPoseMap(weight_sharing_copy(nets.unet).set_engine_rewrites(True)).eval(),
                    unet_inputs(models, config, 1)),
    }
    variants = [("eager", False, False), ("channels_last", True, False)]
    if a.compile:
        variants += [("compiled", False, True), ("compiled+channels_last", True, True)]
    for name in a.networks:
        make, inputs = calls[name]
        entry = report["networks"][name] = {}
        reference = None
        for variant, channels_last, compiled in variants:
            module = make()  # the module objects are copies; the weights are shared
            set_conv_layout(module, channels_last)
            if compiled:
                module = torch.compile(module, dynamic=False)
            call = functools.partial(TorchSession(name, module, {}, cuda_graph=gpu), **inputs)
            try:
                first = first_call_seconds(call)
                out = call().float()
                reference = out if reference is None else reference
                entry[variant] = {"first_call_s": first, "ms": cuda_ms(call, repeat=10),
                                  "relative_error_vs_eager": relative_error(out.cpu().numpy(), reference.cpu().numpy())}
            except Exception as exc:  # noqa: BLE001 -- record and go on with the other variants
                entry[variant] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(name, variant, entry[variant], flush=True)
            save()
        if name != "unet_b1":
            entry["top_kernels_eager"] = top_kernels(functools.partial(set_conv_layout(make(), False), **inputs))
            save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
