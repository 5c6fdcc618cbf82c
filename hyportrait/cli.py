"""The `hyportrait` command."""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hyportrait.errors import HyportraitError, InputError, OptionError
from hyportrait.files import check_output_file, check_output_folder


def _add_animate(sub) -> None:
    p = sub.add_parser("animate", help="animate a portrait with a driving video")
    p.add_argument("--image", required=True, type=Path, help="source portrait (png/jpg)")
    p.add_argument("--video", required=True, help="driving video: a file, - (a Matroska/MPEG-TS/NUT/fragmented "
                   "MP4 stream on stdin) or a URL FFmpeg opens")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "tensorrt"], default="torch",
                   help="how the networks run (default torch): torch loads --weights, onnxruntime an export "
                   "folder (--models), tensorrt an engine folder (--models)")
    p.add_argument("--weights", type=Path, help="official weights folder (pretrained_weights/), torch backend; "
                   "without it a small random-weight model runs (for trying the pipeline, not for results)")
    p.add_argument("--models", type=Path, help="folder of `hyportrait export` (onnxruntime) or `hyportrait "
                   "build` (tensorrt)")
    p.add_argument("--mode", choices=["quality", "fast"], default="quality",
                   help="quality: the official 25-step sampler with 3 guidance branches; fast: LCM, 4 steps, "
                   "no guidance (for a UNet with an LCM LoRA merged)")
    p.add_argument("--lora", type=Path, help="torch backend: a PEFT LoRA (e.g. LCM) merged into the UNet")
    p.add_argument("--sampler", choices=["euler", "lcm"], help="override the mode's sampler")
    p.add_argument("--guidance-branches", type=int, choices=[1, 2, 3],
                   help="UNet batch per window: 3 official two-stage guidance, 2 motion guidance only, 1 none")
    p.add_argument("--rewrites", action="store_true",
                   help="torch backend: run the engine rewrites (same up to rounding, faster) instead of the "
                   "faithful modules")
    p.add_argument("--cuda-graph", action="store_true", help="any backend on a GPU: replay the UNet and VAE "
                   "decoder as CUDA graphs")
    p.add_argument("--compile", action="store_true", help="torch backend: compile the UNet and VAE decoder with "
                   "torch.compile (faster after minutes of compiling at the first window)")
    p.add_argument("--float8", action="store_true", help="torch backend, GPUs of compute capability 8.9+: the "
                   "UNet's transformer linears as fp8 GEMMs (use with --compile)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    p.add_argument("--steps", type=int, help="denoising steps (official: 25)")
    p.add_argument("--seed", type=int, help="random seed (official: 72580)")
    p.add_argument("--guidance", type=float, help="one scale for both guidance stages (official: 2.0)")
    p.add_argument("--appearance-guidance", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="appearance guidance ramp over the steps")
    p.add_argument("--motion-guidance", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="motion guidance ramp over the steps")
    p.add_argument("--max-frames", type=int, help="use at most this many driving frames")
    p.add_argument("--decode-chunk", type=int, help="frames per VAE decode call (official: 8)")
    p.add_argument("--overlap", type=int, help="frames shared by neighbouring windows (official: 3)")
    p.add_argument("--video-preset", metavar="PRESET", help="libx264 preset of the output videos, ultrafast ... "
                   "veryslow (CRF 17; default medium as the official, veryfast in fast mode)")
    p.add_argument("--precision", choices=["fp16", "fp32"], help="network precision (default fp16 on GPU, "
                   "fp32 on CPU)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for one video (default 1): spawns one worker per GPU "
                   "(GPUs 0..N-1 of CUDA_VISIBLE_DEVICES; with --device cpu, N CPU processes over gloo); under "
                   "torchrun its processes are used instead")
    p.add_argument("--parallel", choices=["window", "guidance"], default="window",
                   help="how --gpus share the work: window (each step's windows; same frames as one GPU) or "
                   "guidance (each UNet call's guidance branches; at most as many GPUs as branches)")
    p.add_argument("--segment", type=int, metavar="FRAMES", help="sample the clip segment by segment, FRAMES "
                   "at once (at least the window, 25): memory bounded at any length, frames out early; 0: the "
                   "whole clip at once (official). Default 25 in fast mode, 0 in quality mode")
    p.add_argument("--first-segment", type=int, metavar="FRAMES", help="frames of the first segment, leading pad "
                   "frames included: shorter than the window, it is one UNet call of FRAMES frames per step, so the "
                   "first frame comes out sooner (0: --segment's). Default 16 in fast mode (the 15 pads and the "
                   "first real frame's decode chunk); live: --pad-frames 0 --first-segment 4 --decode-chunk 4")
    p.add_argument("--pad-frames", type=int, metavar="N", help="motion pad frames faded in before the clip and "
                   "out after it (official: 15)")
    p.add_argument("--stream", action="store_true", help="write the outputs as fragmented MP4 while the frames "
                   "are made (playable while written)")
    p.add_argument("--stall-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="--stream: give up (error source_stalled) when the source gives no frame this long")


def _add_weights(sub) -> None:
    p = sub.add_parser("weights", help="inspect an official weights folder")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    c = wsub.add_parser("check", help="verify every checkpoint's keys and shapes")
    c.add_argument("dir", type=Path)
    wsub.add_parser("expected", help="print the expected keys and shapes of every checkpoint file as JSON")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export every network to ONNX, validated against PyTorch")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="official weights folder (pretrained_weights/)")
    source.add_argument("--tiny-random", action="store_true",
                        help="no weights: tiny random networks (for trying the export and for CI)")
    p.add_argument("--out", required=True, type=Path, help="output folder for the ONNX models and manifest.json")
    p.add_argument("--precision", default="fp32", metavar="{fp32,fp16}",
                   help="model precision (default fp32); fp16 keeps norms and the motion/VAE-encoder/"
                   "detector models in fp32")
    p.add_argument("--lora", type=Path, help="PEFT LoRA (folder or weights file) merged into the UNet first")
    p.add_argument("--unet-attention", choices=["plain", "onnxruntime"], default="plain",
                   help="plain: MatMul-Softmax-MatMul, the form TensorRT fuses (default); onnxruntime: its fused "
                   "MultiHeadAttention op, for the onnxruntime backend on a GPU")


def _add_build(sub) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an export folder (needs TensorRT or TensorRT-RTX)")
    p.add_argument("--onnx", required=True, type=Path, help="export folder (written by `hyportrait export`)")
    p.add_argument("--out", required=True, type=Path, help="engine folder (<model>.engine, .engine.json, .build.log)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32", "int8", "fp8"],
                   help="fp16/fp32: the export's models as exported (engines are strongly typed); int8/fp8: the "
                   "UNet quantized with --calibration data, the other models as exported (default fp16)")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="int8/fp8 calibration of the UNet (`hyportrait calibrate`): FILE.npz, UNet input sets "
                   "(arrays named '<set>/<input>') calibrated with onnxruntime, or FILE.json, activation ranges "
                   "recorded in PyTorch; without it the UNet is built from the export's model")
    p.add_argument("--profile", default="quality", choices=["quality", "fast", "all"],
                   help="input shapes to optimise for: quality (UNet guidance batch 1..3), fast (batch 1), "
                   "all (both; default quality)")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="build only these models (default: all exported)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0..5",
                   help="builder optimization level (default 3; higher builds longer)")
    p.add_argument("--workspace-gb", type=float, help="memory limit for the builder's tactics (default: the GPU's)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file, loaded and updated (default: OUT/timing.cache)")
    p.add_argument("--hardware-compatible", action="store_true",
                   help="engines that run on any Ampere or newer GPU (slower than GPU-specific ones)")
    p.add_argument("--version-compatible", action="store_true",
                   help="engines that later TensorRT versions of the same major version can run (they carry "
                   "their lean runtime)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose messages in the build logs")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="record the calibration of int8/fp8 builds while animating a sample: the "
                       "UNet's inputs (.npz) or, with the PyTorch networks, its activation ranges (.json)")
    p.add_argument("--models", required=True, type=Path, help="the export folder that will be quantized")
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--video", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path,
                   help="FILE.npz: UNet input sets, recorded with onnxruntime on the export; FILE.json: activation "
                   "ranges, recorded on the PyTorch networks of --weights (needed at the official size, where "
                   "onnxruntime cannot run the UNet to calibrate); either goes to `hyportrait build --calibration`")
    p.add_argument("--weights", type=Path, help="official weights folder the export was made from (for .json)")
    p.add_argument("--sets", type=int, default=8, help="steps spread over the schedule (default 8)")
    p.add_argument("--max-frames", type=int, default=25, help="driving frames used (default 25)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a few-step student: training data, training")
    dsub = p.add_subparsers(dest="distill_command", required=True)
    _add_distill_prepare(dsub)
    _add_distill_train(dsub)
    _add_distill_toy(dsub)


def _add_distill_prepare(dsub) -> None:
    c = dsub.add_parser("prepare", help="driving clips -> training shards, with the runtime's own preprocessing "
                        "and networks (one clip frame is the source image)")
    c.add_argument("--videos", required=True, type=Path, help="folder of driving clips (searched recursively)")
    c.add_argument("--weights", type=Path, help="official weights folder; without it the tiny random-weight "
                   "networks of `animate` (for trying the command)")
    c.add_argument("--out", required=True, type=Path, help="data folder (a rerun continues after its clips)")
    c.add_argument("--frames", type=int, help="frames per example (default 25, the runtime's window)")
    c.add_argument("--stride", type=int, help="frames between window starts (default: --frames)")
    c.add_argument("--seed", type=int, help="seed of each clip's reference frame (default 0)")
    c.add_argument("--per-shard", type=int, help="examples per shard (default 64)")
    c.add_argument("--precision", choices=["fp16", "fp32"], help="network and data precision (default fp16 on "
                   "GPU, fp32 on CPU)")
    c.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_distill_train(dsub) -> None:
    t = dsub.add_parser("train", help="train a teacher or distil a LoRA student (one GPU, or many with torchrun "
                        "--no-python hyportrait distill train ...); a RUN with a checkpoint resumes")
    t.add_argument("--data", required=True, type=Path, help="training-data folder (`hyportrait distill prepare`)")
    t.add_argument("--weights", type=Path, help="official weights folder; without it tiny random-weight networks")
    t.add_argument("--out", required=True, type=Path, help="run folder: checkpoint, log.csv, lora/, run.json")
    t.add_argument("--mode", choices=["teacher", "distill"], default="distill")
    for name, kind, help_text in [
        ("steps", int, "optimizer steps (default 1000)"), ("batch", int, "examples per GPU per micro-step"),
        ("accumulate", int, "micro-steps per optimizer step"), ("lr", float, "learning rate (default 1e-4)"),
        ("rank", int, "LoRA rank (default 64)"), ("phases", int, ("1: consistency (runtime's LCM fast mode); K: "
         "phased consistency, sampled by `animate --mode fast --sampler euler --steps K`")),
        ("grid", int, "Karras grid points (default 40)"), ("ema", float, "target EMA decay (default 0.95)"),
        ("huber_c", float, "pseudo-Huber loss constant c (default 0.001)"),
        ("spatial_steps", int, "train spatial blocks' LoRA for these steps, then the temporal blocks'"),
        ("checkpoint_every", int, "steps between checkpoints"), ("val_every", int, "steps between validations"),
        ("val_examples", int, "last examples of DATA held out for validation"), ("seed", int, "random seed")]:
        t.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=help_text)
    t.add_argument("--target", choices=["ema", "student", "same-sigma"],
                   help="target network: EMA of the LoRA (default), the student itself, or the same-sigma control")
    t.add_argument("--lora-targets", choices=["attention", "all-linear"],
                   help="LoRA on the attention projections (default, the LCM fork's) or on every Linear")
    t.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (default) or cosine decay to 0 after a 5%% warm-up")
    t.add_argument("--init-lora", type=Path, help="start the student from this adapter (same rank and base)")
    t.add_argument("--sigma-weight", choices=["uniform", "animatelcm"], help="per-sigma loss weight")
    t.add_argument("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="teacher guidance scale drawn per example (default 2.0 2.0, the official)")
    t.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: on CUDA)")


def _add_distill_toy(dsub) -> None:
    y = dsub.add_parser("toy", help="the proof: train a tiny teacher, distil it, table of errors; last line is "
                        "the verdict")
    y.add_argument("--out", required=True, type=Path)
    y.add_argument("--size", choices=["cpu", "gpu"], default="cpu", help="cpu: 8x8 latents, 4 frames; "
                   "gpu: 16x16, 8 frames")
    y.add_argument("--phases", type=int, help="phases of the student (default: the size's, 4)")
    y.add_argument("--teacher", type=Path, help="the teacher.safetensors of an earlier run of this size: skip "
                   "training the teacher")


def _distill_toy(args) -> int:
    from hyportrait.distill.toy import run_toy

    with _options_named_by_flags({"phases": "--phases"}):
        return 0 if run_toy(args.out, args.size, args.phases, teacher=args.teacher)["verdict"] else 1


def _distill_train(args) -> int:
    import torch

    from hyportrait.distill.data import TrainingData
    from hyportrait.distill.train import TrainConfig, load_networks_for, train

    options = {k: getattr(args, k) for k in ("mode", "steps", "batch", "accumulate", "lr", "rank", "phases",
               "grid", "ema", "huber_c", "spatial_steps", "checkpoint_every", "val_every", "val_examples", "seed",
               "target", "sigma_weight", "checkpointing", "lora_targets", "lr_schedule") if getattr(args, k) is not None}
    options.setdefault("checkpointing", torch.cuda.is_available())
    if args.init_lora:
        options["init_lora"] = str(args.init_lora)
    if args.guidance:
        options.update(appearance_guidance=tuple(args.guidance), motion_guidance=tuple(args.guidance))
    flags = {name: f"--{name.replace('_', '-')}" for name in options}
    with _options_named_by_flags({**flags, "appearance_guidance": "--guidance", "motion_guidance": "--guidance"}):
        config = TrainConfig(**options)  # options and data are refused before any network is built
    latent = TrainingData(args.data).fields["latents"][0][-1]
    nets = load_networks_for(args.weights)
    pose_map = nets.pose_guider.constant_features(latent * 8, latent * 8)
    result = train(config, args.data, args.out, nets.unet.float(), pose_map,
                   weights=str(args.weights) if args.weights else "tiny-random")
    print(f"wrote {result.output} (final loss {result.loss:.4g})")
    return 0

def _distill(args) -> int:
    return {"prepare": _distill_prepare, "train": _distill_train, "toy": _distill_toy}[args.distill_command](args)


def _distill_prepare(args) -> int:
    from hyportrait.distill.prepare import REPORT, PrepareConfig, prepare_data

    given = {"frames": args.frames, "stride": args.stride, "seed": args.seed, "per_shard": args.per_shard}
    with _options_named_by_flags({name: f"--{name.replace('_', '-')}" for name in given}):
        config = PrepareConfig(**{k: v for k, v in given.items() if v is not None})
    report = prepare_data(args.videos, args.out, args.weights, config, device=args.device,
                          precision=args.precision, progress=not args.quiet)
    print(f"{len(report['added'])} clips added ({report['examples_added']} examples), "
          f"{report['in_data_before']} already in the data, {len(report['skipped'])} skipped "
          f"(see {args.out / REPORT}); {report['examples']} examples in {args.out}")
def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="compare every engine (or another export's models) with onnxruntime on the "
                       "same random and recorded inputs (polygraphy's comparator), output by output")
    p.add_argument("--engines", required=True, type=Path, help="engine folder (`hyportrait build`), or another "
                   "export folder whose models onnxruntime runs")
    p.add_argument("--onnx", required=True, type=Path, help="the export the engines were built from: the reference")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="compare only these models (default: all exported)")
    p.add_argument("--inputs", type=Path, metavar="FILE.npz",
                   help="recorded UNet inputs (`hyportrait calibrate --out FILE.npz`), compared beside random ones")
    p.add_argument("--recorded-only", action="store_true", help="no random inputs for the models that --inputs "
                   "records (a full-size UNet runs long)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default 1e-3 for an fp32 export, 2e-2 fp16)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default as --rtol)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where onnxruntime runs the reference (cuda: its CUDA provider; default cpu)")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="also write the comparison as JSON")


def _verify(args) -> int:
    from hyportrait.engines.verify import verify
    from hyportrait.errors import InputError, VerifyError
    from hyportrait.files import write_json
    from hyportrait.runtime.pipeline import check_range

    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None:
            check_range(flag, value, _RANGES)
    providers = ["CPUExecutionProvider"] if args.device == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if args.recorded_only and not args.inputs:
        raise InputError("--recorded-only needs --inputs FILE.npz")
    if args.report:
        check_output_file(args.report, f"--report {args.report}")
    report = verify(args.engines, args.onnx, models=args.models, recorded=args.inputs,
                    random=not args.recorded_only, rtol=args.rtol, atol=args.atol, providers=providers)
    print(report.table())
    if args.report:
        print(f"wrote {write_json(args.report, report.to_json())}")
    failed = [e for e in report.errors if not e.passed]
    if failed or not report.errors:
        raise VerifyError(f"{len(failed)} of {len(report.errors)} outputs differ from onnxruntime beyond rtol "
                          f"{report.rtol:g} / atol {report.atol:g}: "
                          + ", ".join(sorted({f"{e.model}.{e.output}" for e in failed}))
                          if report.errors else "no model was compared")
    return 0


# the ranges of the numbers no config dataclass checks (runtime/pipeline.py's check_range): a nan tolerance passed
# every comparison, a negative one failed them all; more sets than the sampler's 1000 steps at most record nothing new
_RANGES = (("--rtol", 0.0, 1e6), ("--atol", 0.0, 1e6), ("--sets", 1, 1000))


@contextmanager
def _options_named_by_flags(flags: dict[str, str]) -> Iterator[None]:
    """An invalid option's error names its flag (`--steps`), not the API keyword (`num_steps`)."""
    try:
        yield
    except OptionError as exc:
        raise InputError(f"{flags.get(exc.option, exc.option)} {exc.problem}") from None


def _calibrate(args) -> int:
    from hyportrait.runtime.inputs import check_inputs

    check_inputs(args.image, args.video)
    check_output_file(args.out, f"--out {args.out}")
    from hyportrait.runtime.pipeline import check_range

    check_range("--sets", args.sets, _RANGES)
    from hyportrait.engines.calibration import record_calibration
    from hyportrait.export.manifest import read_manifest
    from hyportrait.runtime.api import Animator

    with _options_named_by_flags({"max_frames": "--max-frames", "device": "--device"}):
        if args.out.suffix == ".json":  # activation ranges, on the PyTorch networks the export traces
            if args.weights is None:
                raise InputError("activation ranges (.json) are recorded on the PyTorch networks: pass --weights DIR")
            unet = args.models / read_manifest(args.models).models["unet"].file
            animator = Animator(backend="torch", weights=args.weights, faithful=False, device=args.device,
                                max_frames=args.max_frames)
        else:
            unet = None
            animator = Animator(args.models, backend="onnxruntime", device=args.device, max_frames=args.max_frames)
    path = record_calibration(animator, args.image, args.video, args.out, sets=args.sets, unet_onnx=unet)
    print(f"wrote {path}")
    return 0


def _animate_overrides(args) -> tuple[dict, dict[str, str]]:
    """The AnimateConfig fields the command line sets, and for each the flag that set it (for error messages)."""
    given = (("--steps", ("num_steps",), args.steps), ("--seed", ("seed",), args.seed),
             ("--decode-chunk", ("decode_chunk",), args.decode_chunk),
             ("--max-frames", ("max_frames",), args.max_frames), ("--overlap", ("overlap",), args.overlap),
             ("--sampler", ("sampler",), args.sampler),
             ("--guidance-branches", ("guidance_branches",), args.guidance_branches),
             ("--video-preset", ("video_preset",), args.video_preset),
             ("--segment", ("segment",), args.segment),
             ("--first-segment", ("first_segment",), args.first_segment),
             ("--pad-frames", ("pad_frames",), args.pad_frames),
             ("--guidance", ("min_appearance_guidance", "max_appearance_guidance", "min_motion_guidance",
                             "max_motion_guidance"), args.guidance),
             ("--appearance-guidance", ("min_appearance_guidance", "max_appearance_guidance"),
              args.appearance_guidance),
             ("--motion-guidance", ("min_motion_guidance", "max_motion_guidance"), args.motion_guidance))
    overrides, flags = {}, {"device": "--device", "precision": "--precision", "mode": "--mode"}
    for flag, names, value in given:
        if value is None:
            continue
        for name, item in zip(names, value if isinstance(value, list) else [value] * len(names)):
            overrides[name], flags[name] = item, flag
    return overrides, flags


def _animate(args) -> int:
    from hyportrait.runtime.inputs import check_inputs, check_stall_timeout, load_image

    # inputs and the output folder are checked first (in well under a second: torch is not imported yet),
    # then every option (here too, before workers are spawned for --gpus), all before a network is built
    live = args.video == "-" or "://" in args.video  # a pipe or a URL is read as it arrives: not probed first
    if live:
        load_image(args.image)
    else:
        check_inputs(args.image, args.video)
    check_output_folder(args.out, f"--out {args.out}")
    if args.lora is not None and not args.lora.exists():
        raise InputError(f"--lora {args.lora}: not found")
    if not 1 <= args.gpus <= 1024:
        raise InputError(f"--gpus must be between 1 and 1024, got {args.gpus}")
    with _options_named_by_flags({"stall_timeout": "--stall-timeout"}):
        check_stall_timeout(args.stall_timeout)
    from hyportrait.runtime import distributed
    from hyportrait.runtime.api import Animator, make_config

    overrides, flags = _animate_overrides(args)
    options = dict(models=args.models, backend=args.backend, weights=args.weights, precision=args.precision,
                   mode=args.mode, lora=args.lora, faithful=not args.rewrites, cuda_graph=args.cuda_graph,
                   compile=args.compile, float8=args.float8, progress=not args.quiet, **overrides)
    with _options_named_by_flags(flags):
        make_config(overrides)
        if args.gpus > 1 or distributed.under_torchrun():
            if args.stream or args.segment or args.first_segment or live:
                raise InputError("--stream, --segment, --first-segment and live sources (-, URLs) run on one GPU: "
                                 "--gpus spreads the whole clip's windows")
            result = _animate_parallel(args, {**options, "segment": 0})
        else:
            result = Animator(device=args.device, **options).animate(
                args.image, args.video, args.out, stream=args.stream, stall_timeout=args.stall_timeout).as_dict()
    if result is not None:  # only rank 0 writes (and reports)
        print(f"wrote {result['cropped']}")
        print(f"wrote {result['full_resolution']}")
    return 0


def _animate_parallel(args, options: dict) -> dict | None:
    """`animate` on several GPUs (runtime/distributed.py): under torchrun this process is one rank, else --gpus
    workers are spawned."""
    import torch

    from hyportrait.runtime import distributed

    device_type = torch.device(args.device).type if args.device else (
        "cuda" if torch.cuda.is_available() else "cpu")
    job = (args.parallel, options, args.image, args.video, args.out)
    if not distributed.under_torchrun():
        return distributed.launch(distributed.animate_worker, args.gpus, *job, device_type=device_type)
    group = distributed.init_from_env(device_type)
    result = distributed.animate_worker(group, *job)
    torch.distributed.destroy_process_group()
    return result


def _add_serve(sub) -> None:
    from hyportrait.serve.options import add_arguments

    add_arguments(sub.add_parser("serve", help="an HTTP animation service (needs the serve extra); --ray: on "
                                 "Ray Serve replicas"))


def _serve(args) -> int:
    from hyportrait.errors import InputError

    try:
        from hyportrait.serve.server import main as serve
    except ModuleNotFoundError as exc:
        raise InputError(f"hyportrait serve needs the serve extra: pip install 'hyportrait[serve]' "
                         f"(missing {exc.name})") from None
    return serve(args)


def _weights(args) -> int:
    from hyportrait.networks.weights import check_weights, expected_manifest

    if args.weights_command == "expected":
        json.dump(expected_manifest(), sys.stdout, indent=1)
        print()
        return 0
    report = check_weights(args.dir)
    print(report.summary())
    return 0 if report.ok else 1


def _export(args) -> int:
    from hyportrait.export.export_all import export_all

    manifest = export_all(None if args.tiny_random else args.weights, args.out, args.precision, args.lora,
                          size="tiny" if args.tiny_random else "official",
                          onnxruntime_attention=args.unet_attention == "onnxruntime")
    for name, record in manifest.models.items():
        check = record.validation or {}
        error = check.get("max_relative_error")
        print(f"{name:12s} {record.precision}  {record.size_bytes / 2**20:9.1f} MiB  "
              + (f"max rel err {error:.2g}" if error is not None else f"not validated: {check.get('skipped')}"))
    for name, reason in manifest.skipped.items():
        print(f"{name:12s} skipped: {reason}")
    print(f"wrote {Path(args.out) / 'manifest.json'}")
    return 0


def _build(args) -> int:
    from hyportrait.engines.build import BuildRequest, build_all
    from hyportrait.engines.engine_manifest import BuildFlags

    if args.workspace_gb is not None and not 0 < args.workspace_gb < 2**20:  # also refuses nan
        raise InputError(f"--workspace-gb must be a positive number of GB, got {args.workspace_gb}")
    workspace = int(args.workspace_gb * 2**30) if args.workspace_gb else None
    flags = BuildFlags(optimization_level=args.opt_level, workspace_bytes=workspace,
                       hardware_compatible=args.hardware_compatible, version_compatible=args.version_compatible)
    request = BuildRequest(onnx_dir=args.onnx, out_dir=args.out, precision=args.precision, profile=args.profile,
                           flags=flags, calibration=args.calibration, timing_cache=args.timing_cache,
                           models=tuple(args.models) if args.models else None, verbose=args.verbose)
    results = build_all(request, keep_going=True)
    for result in results:
        detail = result.error or (f"{result.engine_bytes / 2**20:9.1f} MiB in {result.seconds:.1f} s"
                                  if result.status == "built" else "up to date")
        print(f"{result.model:12s} {result.status:8s} {result.precision or '':5s} {detail}")
        for note in result.notes:
            print(f"{'':12s} note: {note}")
    failed = [r.model for r in results if r.status == "failed"]
    if failed:
        print(f"hyportrait: error [build_failed]: {', '.join(failed)} failed (see the .build.log files in "
              f"{args.out})", file=sys.stderr)
        return 2
    return 0


def _bench(argv: list[str]) -> int:
    from hyportrait.benchmarks.bench import main as bench

    bench(argv)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one coded line, like every other error (`--help` still prints the usage)."""

    def error(self, message: str):
        print(f"hyportrait: error [bad_input]: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised in the main thread, so that every `with` and `finally` removes what it was
    writing on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum, frame):
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)  # a second signal does not cut the clean-up short
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """The command; SIGINT and SIGTERM at any moment end it as `hyportrait: interrupted` (exit 128 + signal
    number) with nothing half-written left behind; a reader of its output that goes away ends it quietly (exit
    128 + SIGPIPE)."""
    catch = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {signum: signal.signal(signum, _interrupted) for signum in (signal.SIGINT, signal.SIGTERM)
                } if catch else {}
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a closed pipe fails here, in the handling below, not at the interpreter's exit
        return code
    except KeyboardInterrupt as exc:
        print("hyportrait: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe (a worker's, a socket): a fault, not the reader going away
            raise
        # the reader of our output left (`hyportrait weights expected | head`): end quietly as Unix tools do,
        # as if killed by SIGPIPE; what is still buffered goes nowhere instead of failing again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    finally:
        for signum, handler in previous.items():  # for callers that run main() in their own process
            signal.signal(signum, handler)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (io.StringIO)
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


class _CurrentStderr(logging.StreamHandler):
    """Log lines go to sys.stderr as it is when each is written, not as it was at the first main() (callers that
    run main() in their own process, tests among them, swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _main(argv: list[str]) -> int:
    # our INFO lines; other libraries' only from WARNING up (torch printed its FakeTensor cache stats at exit)
    logging.basicConfig(format="hyportrait: %(message)s", level=logging.WARNING, handlers=[_CurrentStderr()])
    logging.getLogger("hyportrait").setLevel(logging.INFO)
    # diffusers warns on every fp16 cast about modules it would keep in fp32; ours have none (its list is empty)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    parser = _Parser(prog="hyportrait", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_animate(sub)
    _add_weights(sub)
    _add_export(sub)
    _add_build(sub)
    _add_calibrate(sub)
    _add_distill(sub)
    _add_serve(sub)
    _add_verify(sub)
    sub.add_parser("bench", help="speed and accuracy of every runtime configuration on this GPU "
                   "(hyportrait bench --help)", add_help=False)
    bench = argv[:1] == ["bench"]  # its own options: benchmarks/bench.py parses them
    args = None if bench else parser.parse_args(argv)
    try:
        if bench:
            return _bench(argv[1:])
        return {"animate": _animate, "weights": _weights, "export": _export, "build": _build,
                "calibrate": _calibrate, "distill": _distill, "serve": _serve, "verify": _verify}[args.command](args)
    except HyportraitError as exc:
        print(f"hyportrait: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"hyportrait: error [missing_package]: {exc.name} is not installed; this command needs it: "
              f"pip install {extra}", file=sys.stderr)
        return 2


# the optional packages (pyproject.toml's extras) and how to install each
_EXTRAS = {"diffusers": "'hyportrait[networks]'", "safetensors": "'hyportrait[networks]'",
           "onnxruntime": "'hyportrait[onnxruntime]' (or 'hyportrait[gpu]' on a GPU)",
           "tensorrt": "'hyportrait[trt]'", "polygraphy": "'hyportrait[trt]'"}


if __name__ == "__main__":
    sys.exit(main())
