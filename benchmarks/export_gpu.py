"""Export every network at the official size (random weights) and check each ONNX model with onnxruntime's
CUDA provider against the PyTorch module in fp32 on the GPU. Writes a JSON report per precision.

    python -m benchmarks.export_gpu --precision fp32 --out DIR --report report.json

The ONNX files are deleted after their check unless --keep is given (the fp32 UNet alone is 6.3 GB).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hyportrait.benchmarks.bench import report_header
from hyportrait.export.export_all import network_specs
from hyportrait.export.export_face_detector import mtcnn_specs
from hyportrait.export.onnx_io import default_input_sets, export_onnx, module_references, validate_onnx
from hyportrait.files import write_json
from hyportrait.networks.weights import random_networks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--only", nargs="*", help="export only these models")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--onnxruntime-attention", action="store_true",
                   help="UNet attention as onnxruntime's fused MultiHeadAttention op (runs at 64x64 in onnxruntime)")
    p.add_argument("--unet-latent", type=int, help="latent size of the UNet model (default 64: 512 px crops)")
    p.add_argument("--unet-batch", type=int, default=3, help="guidance batch of the UNet example (also checked at 1, or 2)")
    p.add_argument("--size", choices=["official", "tiny"], default="official",
                   help="tiny: the small test networks (a quick check of this script, on the CPU if there is no GPU)")
    a = p.parse_args()

    import onnxruntime as ort

    gpu = torch.cuda.is_available()
    device, provider = ("cuda", "CUDAExecutionProvider") if gpu else ("cpu", "CPUExecutionProvider")
    # onnxruntime's CUDA provider computes fp32 matmuls and convolutions in TF32 unless told not to
    provider_options = {"use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"} if gpu else {}
    report = {**report_header(), "onnxruntime": ort.__version__, "precision": a.precision,
              "reference": f"PyTorch module, fp32, on {device}", "provider": provider, "provider_options": provider_options, "size": a.size,
              "models": {}}
    nets = random_networks(a.size, seed=0)
    for module in nets.modules().values():
        module.to(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not tf32
    torch.backends.cudnn.allow_tf32 = False
    pixels = 512 if a.size == "official" else 64
    # the UNet last: if a run is cut short, the others are already in the report
    specs = [*mtcnn_specs(), *network_specs(nets, image_size=pixels, batch=a.unet_batch, latent_size=a.unet_latent,
                                            onnxruntime_attention=a.onnxruntime_attention)]
    for spec in specs:
        if a.only and spec.name not in a.only:
            continue
        spec.module.to(device)
        entry = {}
        try:
            record = export_onnx(spec, a.out, a.precision)
            entry.update(export_seconds=record.export_seconds, size_bytes=record.size_bytes,
                         precision=record.precision, external_data=bool(record.data_file),
                         inputs={t.name: [t.dtype, t.shape] for t in record.inputs})
            # the fp32 references first; then the module leaves the GPU, so that onnxruntime has it to itself
            tic = time.perf_counter()
            input_sets = default_input_sets(spec)
            references = module_references(spec, input_sets)
            entry["reference_seconds"] = round(time.perf_counter() - tic, 1)
            spec.module.to("cpu")
            if gpu:  # the trace ran the attention unfused: hand its cached blocks to onnxruntime
                torch.cuda.empty_cache()
            tic = time.perf_counter()
            errors = validate_onnx(spec, a.out / record.file, providers=[(provider, provider_options)],
                                   input_sets=input_sets, references=references)
            entry.update(relative_errors=errors, max_relative_error=max(errors),
                         validate_seconds=round(time.perf_counter() - tic, 1),
                         input_sets=len(errors))
            if not a.keep:
                for name in (record.file, record.data_file):
                    if name:
                        (a.out / name).unlink()
        except Exception as exc:  # noqa: BLE001 -- record and go on: one failing model should not hide the others
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        report["models"][spec.name] = entry
        print(spec.name, json.dumps(entry), flush=True)
        write_json(a.report, report)


if __name__ == "__main__":
    main()
