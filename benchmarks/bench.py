"""Speed and accuracy of every runtime configuration on one GPU, in one run (so ratios are fair).

    hyportrait bench --image IMG --video VID --report bench.json [--onnx DIR]
    (or python -m hyportrait.benchmarks.bench ...)

Networks are random at the official size (speed does not depend on the weights). Configurations:
    reference        torch, the faithful modules, eager fp16: the official code's way (quality mode)
    torch            torch, engine rewrites (K/V dedup, pruned DINO adapters), fp16
    torch+graphs     the same with the UNet and VAE decoder replayed as CUDA graphs
    torch+compile    torch+graphs with the UNet and VAE decoder compiled by torch.compile (inductor)
    torch+compile+fp8  torch+compile with the UNet's transformer linears as fp8 GEMMs (runtime/float8.py)
    onnxruntime      the fp16 export (attention as onnxruntime's fused op) with the CUDA provider
    onnxruntime+graphs  the same with the UNet and VAE decoder captured as CUDA graphs by onnxruntime
each in quality mode (25 Euler steps, 3 guidance branches) and fast mode (LCM 4 steps, 1 branch).

Per configuration: the wall time of the first UNet call and VAE decode (compilation, graph capture),
per-stage times with CUDA events after warm-up (motion encoding of a 25-frame chunk,
appearance, VAE encode, one UNet call, VAE decode of 8 frames); accuracy: the short clip (--accuracy-frames
driving frames) sampled and decoded, PSNR against torch fp32 of the same mode and against the --baseline
configuration's frames (configurations run in the order above); the long-video limit in
output frames per second (per output frame: steps x UNet call / (window - overlap) + decode + motion);
the demo clip (--demo-frames of the driving video) run end to end by `Animator.animate` (preprocessing,
sampling, decoding overlapped with writing both videos) for fast mode, and for quality mode with
--quality-demo (else estimated from the stage times), with the seconds each of its writing threads worked;
device memory in use. Once per run: preprocessing per frame, video encoding per frame (real frames, at the
x264 presets of both modes), the UNet's and VAE decoder's FLOPs (torch's FLOP counter) and the measured fp16
matmul peak.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from hyportrait.engines.quality import psnr
from hyportrait.files import write_json
from hyportrait.networks.face_detector import MTCNNDetector
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.api import Animator, load_image
from hyportrait.runtime.backends import Models
from hyportrait.runtime.inputs import check_inputs
from hyportrait.runtime.models import ModelOptions, load_models
from hyportrait.runtime.pipeline import (
    AnimateConfig,
    build_conditioning,
    decode_frames,
    motion_tokens,
    sample_latents,
)
from hyportrait.runtime.preprocess import DrivingPreprocessor, preprocess_source
from hyportrait.runtime.video import VideoWriter, probe_video, read_frames

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"  # the CPU only for a dry run of this script with --size tiny
# tiny: the small test networks, a 64 px crop, the tiny export's 4-frame window and one pad frame (a quick dry run);
# decode chunks of 2 frames: the stage timing, the 2-frame accuracy clip and the demo clip decode one shape (one
# compilation of the decoder)
SIZES = {"official": {}, "tiny": {"size": 64, "window": 4, "overlap": 1, "num_steps": 2, "pad_frames": 1,
                                  "decode_chunk": 2}}
# calls of each stage before and while timing it (after its first call); the tiny dry run times each once, so
# that it takes under a minute on a CPU
TIMING = {"official": {"warmup": 2, "repeat": 5}, "tiny": {"warmup": 0, "repeat": 1}}


def empty_cache():
    if GPU:
        torch.cuda.empty_cache()


def report_header() -> dict:
    """What every device report starts with: the GPU, the date, the commit (the device has no git:
    "unknown", recorded by hand in RESULTS.md) and torch's version."""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                                     text=True).stdout.strip() or "unknown",
            "torch": torch.__version__}


def synchronize():
    if GPU:
        torch.cuda.synchronize()


def cuda_ms(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median milliseconds of fn() timed with CUDA events (wall time on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if not GPU:
            tic = time.perf_counter()
            fn()
            times.append((time.perf_counter() - tic) * 1000)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))



def matmul_peak_tflops() -> float:
    n, dtype = (8192, torch.float16) if GPU else (512, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = cuda_ms(lambda: a @ a, warmup=3, repeat=10)
    return 2 * n**3 / ms / 1e9


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def used_gib() -> float:
    if not GPU:
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


class Inputs:
    """The preprocessed sample, shared by every configuration."""

    def __init__(self, image: Path, video: Path, frames: int):
        detector = MTCNNDetector(device=DEVICE)
        tic = time.perf_counter()
        self.source = preprocess_source(load_image(image), detector)
        driving = DrivingPreprocessor(detector)
        self.chunks = list(driving.chunks(read_frames(video, limit=frames)))
        self.num_frames = sum(len(c.landmarks) for c in self.chunks)
        self.preprocess_ms_per_frame = (time.perf_counter() - tic) * 1000 / self.num_frames
        self.fps = probe_video(video).fps

    def conditioning(self, models: Models, config: AnimateConfig, frames: int | None = None):
        frames = frames or self.num_frames
        chunks = [c for c in self.chunks if c.start < frames]  # only the chunks the clip uses
        motion = torch.cat([motion_tokens(models, torch.from_numpy(c.expression_images),
                                          torch.from_numpy(c.pose_images), c.head_bucket, c.exp_bucket)
                            for c in chunks])[:frames]
        generator = torch.Generator(DEVICE).manual_seed(config.seed)
        cond = build_conditioning(models, config, ref_image=torch.from_numpy(self.source.ref_image),
                                  dino_image=torch.from_numpy(self.source.dino_image),
                                  id_embedding=torch.zeros(512), motion=motion, generator=generator)
        return cond, generator


def clip(models: Models, config: AnimateConfig, inputs: Inputs, frames: int | None) -> tuple[np.ndarray, dict]:
    """Sample and decode `frames` driving frames; wall times of each part."""
    times = {}
    synchronize()
    tic = time.perf_counter()
    cond, generator = inputs.conditioning(models, config, frames)
    synchronize()
    times["conditioning_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    latents = sample_latents(models, cond, config, generator)
    synchronize()
    times["denoise_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    out = np.stack(list(decode_frames(models, latents, config, cond.num_pad)))
    times["decode_s"] = time.perf_counter() - tic
    return out, times


def first_call_seconds(fn) -> float:
    """Wall seconds of a first call: compilation, CUDA graph capture, kernel selection."""
    synchronize()
    tic = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - tic


def stage_times(models: Models, config: AnimateConfig, inputs: Inputs, timing: dict) -> dict:
    """Each stage's median time: `timing` gives cuda_ms's warmup and repeat."""
    dtype, size = models.dtype, config.size
    latent = size // 8
    branches = config.guidance_branches
    chunk = inputs.chunks[0]
    face = torch.from_numpy(chunk.expression_images).to(DEVICE)
    pose = torch.from_numpy(chunk.pose_images).to(DEVICE)
    bucket = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    image = torch.rand(1, 3, size, size, device=DEVICE) * 2 - 1
    dino = torch.randn(1, 3, 224, 224, device=DEVICE)
    unet_in = unet_inputs(models, config, branches)
    latents8 = torch.randn(config.decode_chunk, 4, latent, latent, device=DEVICE, dtype=dtype)
    return {
        "first_unet_call_s": first_call_seconds(lambda: models.unet(**unet_in)),
        "first_vae_decode_s": first_call_seconds(lambda: models.vae_decoder(latents=latents8)),
        "motion_chunk_ms": cuda_ms(lambda: models.motion(face_images=face, pose_images=pose, head_bucket=bucket,
                                                         exp_bucket=bucket), **timing),
        "motion_frames": int(face.shape[0]),
        "appearance_ms": cuda_ms(lambda: models.appearance(image=dino, id_embedding=torch.zeros(1, 512, device=DEVICE)),
                                 **timing),
        "vae_encode_ms": cuda_ms(lambda: models.vae_encoder(image=image), **timing),
        "unet_call_ms": cuda_ms(lambda: models.unet(**unet_in), **timing),
        "unet_batch": branches,
        "vae_decode_chunk_ms": cuda_ms(lambda: models.vae_decoder(latents=latents8), **timing),
        "decode_chunk": config.decode_chunk,
    }


def long_video_fps(stages: dict, config: AnimateConfig, encode_ms_per_frame: float,
                   preprocess_ms_per_frame: float) -> dict:
    """Output frames per second far from the clip's ends: each frame costs steps / (window - overlap) UNet
    calls, 1/decode_chunk of a decode, its share of motion encoding and preprocessing; video encoding runs on
    threads while the decoder works, so a frame waits only for the longer of the two."""
    per_frame_ms = {
        "unet": config.num_steps * stages["unet_call_ms"] / (config.window - config.overlap),
        "vae_decode": stages["vae_decode_chunk_ms"] / stages["decode_chunk"],
        "motion": stages["motion_chunk_ms"] / stages["motion_frames"],
        "preprocess": preprocess_ms_per_frame,
        "encode": encode_ms_per_frame,
    }
    gpu = per_frame_ms["unet"] + per_frame_ms["vae_decode"] + per_frame_ms["motion"]
    host = per_frame_ms["preprocess"] + max(per_frame_ms["encode"] - per_frame_ms["vae_decode"], 0)
    return {"per_frame_ms": per_frame_ms, "gpu_fps": 1000 / gpu, "fps": 1000 / (gpu + host)}


def demo_seconds_estimate(stages: dict, config: AnimateConfig, frames: int, encode_ms_per_frame: float,
                          preprocess_ms_per_frame: float) -> float:
    """End-to-end seconds for a clip of `frames` driving frames from the stage times (pads included)."""
    total = frames + 2 * config.pad_frames
    windows = math.ceil(total / (config.window - config.overlap))
    decode_ms = max(stages["vae_decode_chunk_ms"], config.decode_chunk * encode_ms_per_frame)  # overlapped
    ms = (config.num_steps * windows * stages["unet_call_ms"]
          + math.ceil(frames / config.decode_chunk) * decode_ms
          + math.ceil(frames / config.window) * stages["motion_chunk_ms"]
          + stages["appearance_ms"] + stages["vae_encode_ms"]
          + frames * preprocess_ms_per_frame)
    return ms / 1000


def demo_end_to_end(models: Models, config: AnimateConfig, image: Path, video: Path, frames: int) -> dict:
    """`Animator.animate` on the sample: preprocessing, sampling, decoding overlapped with writing both
    videos (with audio), wall times per part."""
    import tempfile

    options = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in ("precision", "device")}
    animator = Animator(models, **{**options, "max_frames": frames})
    with tempfile.TemporaryDirectory() as out:
        result = animator.animate(image, video, out)
    return {"frames": result.num_frames, "seconds": result.timings, "fps": result.num_frames / result.timings["total"]}


def encode_ms_per_frame(video: Path, fps, preset: str, frames: int = 60) -> float:
    """Two H.264 streams per frame (cropped + full resolution, as `animate` writes; no audio, no paste-back) of
    the driving video's first frames: real motion, which costs the encoder far more than a repeated frame."""
    import tempfile

    pixels = list(read_frames(video, limit=frames))
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        with VideoWriter(Path(tmp) / "a.mp4", fps, preset=preset) as a, \
                VideoWriter(Path(tmp) / "b.mp4", fps, preset=preset) as b:
            for frame in pixels:
                a.write(frame)
                b.write(frame)
        return (time.perf_counter() - tic) * 1000 / len(pixels)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="hyportrait bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--video", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--onnx", type=Path, help="fp16 export folder for the onnxruntime configurations "
                   "(`hyportrait export --precision fp16 --unet-attention onnxruntime`); made if absent "
                   "(default: REPORT-onnx/ beside --report)")
    p.add_argument("--accuracy-frames", type=int, help="driving frames of the accuracy clip (default 10; tiny: 2)")
    p.add_argument("--demo-frames", type=int, help="driving frames of the demo clip (default 120; tiny: 4)")
    p.add_argument("--configs", nargs="*", help="only these configurations, as NAME:MODE (e.g. torch:fast); "
                   "--size tiny runs the compiled ones only when named here, the onnxruntime ones also with --onnx")
    p.add_argument("--reference-cache", type=Path,
                   help="an .npz keeping the fp32 reference frames and the baseline's between runs (the quality "
                   "fp32 one takes minutes)")
    p.add_argument("--quality-demo", action="store_true",
                   help="also run the demo clip end to end in quality mode (about a minute per configuration)")
    p.add_argument("--baseline", default="reference",
                   help="the configuration whose frames the later ones are compared with (psnr_vs_<name>_db)")
    p.add_argument("--skip-quality-reference-fp32", action="store_true",
                   help="no fp32 quality run (2 s per UNet call): quality-mode PSNR is then against --baseline only")

    p.add_argument("--size", choices=list(SIZES), default="official",
                   help="tiny: the small test networks (a dry run of this script, on the CPU without a GPU)")
    a = p.parse_args(argv)
    check_inputs(a.image, a.video)  # before any work
    tiny = a.size == "tiny"  # a dry run: short clips, the export beside the report
    a.accuracy_frames = a.accuracy_frames or (2 if tiny else 10)
    a.demo_frames = a.demo_frames or (4 if tiny else 120)
    report = {**report_header(), "size": a.size, "configs": {}}

    def save():
        a.report.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.report, report)

    if not GPU and a.size != "tiny":
        p.error("no GPU: only --size tiny runs on the CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report["matmul_fp16_peak_tflops"] = matmul_peak_tflops()
    inputs = Inputs(a.image, a.video, a.demo_frames)
    report["preprocess_ms_per_frame"] = inputs.preprocess_ms_per_frame
    # per x264 preset: quality mode encodes with "medium" (the official), fast mode with "veryfast"
    report["encode_ms_per_frame"] = encode_ms = {
        preset: encode_ms_per_frame(a.video, inputs.fps, preset, a.demo_frames if tiny else 60)
        for preset in ("medium", "veryfast")}
    report["demo_frames"] = inputs.num_frames
    print("inputs ready", json.dumps(report), flush=True)
    save()

    nets = random_networks(a.size, seed=0)
    sizes = SIZES[a.size]
    # fast mode's 4 LCM steps at the official size; the tiny dry run's steps in both modes
    modes = {"quality": AnimateConfig(device=DEVICE, **sizes),
             "fast": AnimateConfig.fast(device=DEVICE, **{"num_steps": 4, **sizes})}
    crop = modes["quality"].size
    # fp32 references of each mode on the short clip (the networks are cast in place: fp32 first)
    fp32 = load_models("torch", nets, DEVICE, ModelOptions(precision="fp32", size=crop))
    cache = a.reference_cache
    references = dict(np.load(cache)) if cache and cache.is_file() else {}
    for mode, config in modes.items():
        if mode in references or (mode == "quality" and a.skip_quality_reference_fp32):
            continue
        tic = time.perf_counter()
        references[mode], _ = clip(fp32, config, inputs, a.accuracy_frames)
        report[f"fp32_{mode}_seconds"] = time.perf_counter() - tic
        print(f"fp32 {mode} reference done in {report[f'fp32_{mode}_seconds']:.1f} s", flush=True)
        if cache:
            np.savez(cache, **references)
    del fp32
    empty_cache()
    # the tiny dry run (under a minute on a CPU) leaves out, unless --configs names them, the compiled
    # configurations (dynamo traces the UNet once per input shape: minutes there; tests/test_runtime.py checks
    # compiled against eager) and, without --onnx, the onnxruntime ones (the export alone takes half a minute)
    def left_out(name: str) -> bool:
        return tiny and not a.configs and ("compile" in name or (name.startswith("onnxruntime") and a.onnx is None))

    wants_onnx = not left_out("onnxruntime") and (not a.configs or any(c.startswith("onnxruntime")
                                                                       for c in a.configs))
    # exported while the networks are fp32 and on the GPU (tracing the official UNet on a CPU takes long)
    onnx_folder = ensure_onnx(a.onnx or a.report.with_name(f"{a.report.stem}-onnx"), nets) if wants_onnx else None
    # the CPU dry run compiles with dynamo alone: inductor's C++ compile of every variant takes minutes there
    compiler = True if GPU else "eager"
    precision = "fp16" if GPU else "fp32"  # (fp16 convolutions on a CPU take seconds even at tiny size)

    def torch_built(**options):
        return lambda: load_models("torch", nets, DEVICE, ModelOptions(precision=precision, size=crop, **options))

    builders = {
        "reference": torch_built(),
        "torch": torch_built(faithful=False),
        "torch+graphs": torch_built(faithful=False, cuda_graph=True),
        "torch+compile": torch_built(faithful=False, cuda_graph=True, compile=compiler),
        "torch+compile+fp8": torch_built(faithful=False, cuda_graph=True, compile=compiler, float8=True),
        "onnxruntime": lambda: load_models("onnxruntime", onnx_folder, DEVICE),
        "onnxruntime+graphs": lambda: load_models("onnxruntime", onnx_folder, DEVICE, ModelOptions(cuda_graph=True)),
    }
    for name, build in builders.items():
        wanted = [m for m in modes if not left_out(name) and (not a.configs or f"{name}:{m}" in a.configs)]
        if not wanted:
            continue
        try:
            if name.startswith("onnxruntime"):  # the torch modules leave the GPU to onnxruntime
                for module in nets.modules().values():
                    module.to("cpu")
                empty_cache()
            models = build()
        except Exception as exc:  # noqa: BLE001 -- record and go on with the other configurations
            report["configs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            save()
            continue
        for mode in wanted:
            config = modes[mode]
            key = f"{name}:{mode}"
            entry = {}
            try:
                if GPU:
                    torch.cuda.reset_peak_memory_stats()
                entry["stages"] = stages = stage_times(models, config, inputs, TIMING[a.size])
                frames, entry["accuracy_clip_times"] = clip(models, config, inputs, a.accuracy_frames)
                if mode in references:
                    entry["psnr_vs_fp32_db"] = psnr(frames, references[mode], data_range=255)
                baseline = f"{mode}:{a.baseline}"
                if name == a.baseline:
                    references[baseline] = frames
                    if cache:  # a later run compares with it (--baseline and --reference-cache alike)
                        np.savez(cache, **references)
                elif baseline in references:
                    entry[f"psnr_vs_{a.baseline}_db"] = psnr(frames, references[baseline], data_range=255)
                encode = encode_ms[config.video_preset]
                entry["long_video"] = long_video_fps(stages, config, encode, inputs.preprocess_ms_per_frame)
                entry["demo_seconds_estimate"] = demo_seconds_estimate(stages, config, inputs.num_frames, encode,
                                                                       inputs.preprocess_ms_per_frame)
                if mode == "fast" or a.quality_demo:  # the whole demo clip, as `hyportrait animate` runs it
                    entry["demo_end_to_end"] = demo_end_to_end(models, config, a.image, a.video, a.demo_frames)
                if not name.startswith("onnxruntime") and GPU:
                    entry["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                entry["device_used_gib"] = used_gib()
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            report["configs"][key] = entry
            print(key, json.dumps(entry, default=str), flush=True)
            save()
        if name == "reference":  # FLOPs of the faithful networks, once
            report["flops"] = network_flops(models, modes["quality"])
            save()
        del models
        empty_cache()
    save()


def unet_inputs(models: Models, config: AnimateConfig, batch: int) -> dict[str, torch.Tensor]:
    """Random inputs of one UNet call of `batch` guidance branches (speed does not depend on the values)."""
    latent, dtype = config.size // 8, models.dtype
    return {"sample": torch.randn(batch, config.window, 8, latent, latent, device=DEVICE, dtype=dtype),
            "timestep": torch.tensor([0.5], device=DEVICE),
            "appearance_tokens": torch.randn(batch, 64, 1024, device=DEVICE, dtype=dtype),
            "motion_tokens": torch.randn(batch, config.window, 64, 1024, device=DEVICE, dtype=dtype),
            "pose_map": models.pose_map.to(dtype),
            "added_time_ids": torch.tensor([[12.5, 0.0, 0.0]] * batch, device=DEVICE)}


def network_flops(models: Models, config: AnimateConfig) -> dict:
    unet_in = unet_inputs(models, config, 3)
    latents = torch.randn(8, 4, config.size // 8, config.size // 8, device=DEVICE, dtype=models.dtype)
    return {"unet_b3": count_flops(lambda: models.unet(**unet_in)),
            "vae_decode_8": count_flops(lambda: models.vae_decoder(latents=latents))}


def ensure_onnx(folder: Path, nets) -> Path:
    """The fp16 export for onnxruntime (attention as its fused op), exported here when missing."""
    from hyportrait.export.export_all import export_all

    if not (folder / "manifest.json").is_file():
        tic = time.perf_counter()
        # fp32 on a CPU: its provider lacks fp16 kernels for some ops
        export_all(None, folder, "fp16" if GPU else "fp32", networks=nets, onnxruntime_attention=True,
                   validate=False)
        print(f"exported {folder} in {time.perf_counter() - tic:.0f} s", flush=True)
    return folder


if __name__ == "__main__":
    main()
