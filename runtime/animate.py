"""One call from files to videos: preprocessing, the reference pipeline, and the two output videos.

Outputs, as the official inference writes them, under `{out}/{YYYYmmdd_HHMMSS}_{image}_{video}/`:
`cropped.mp4` (the generated crop) and `full_resolution.mp4` (pasted back onto the source image),
both at the driving video's frame rate and with its audio. Each file is written under a temporary
name and renamed when complete.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from hyportrait.errors import InputError
from hyportrait.export.arcface import load_arcface, zero_identity_embedding
from hyportrait.export.face_detector import load_face_detector
from hyportrait.export.weights import load_networks, random_networks

from .paste_back import paste_back, soft_mask
from .pipeline import (
    AnimateConfig,
    build_conditioning,
    decode_frames,
    motion_tokens,
    place_networks,
    sample_latents,
)
from .preprocess import DrivingPreprocessor, preprocess_source
from .sampling import i2i_start_index
from .video import VideoWriter, probe_video, read_frames

# Without official weights a tiny random-weight model runs: it exercises every stage quickly on a CPU,
# and its video is noise. Explicit options still override these.
RANDOM_MODEL_DEFAULTS = {"num_steps": 4, "size": 128}


@dataclass
class AnimateResult:
    cropped: Path
    full_resolution: Path
    num_frames: int
    fps: Fraction
    missing_face_frames: int
    timings: dict[str, float]


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"source image {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"source image {path}: not a readable image ({exc})") from None


def animate_files(image: Path, video: Path, out: Path, *, weights: Path | None = None,
                  overrides: dict | None = None, progress: bool = True) -> AnimateResult:
    image, video, out = Path(image), Path(video), Path(out)
    overrides = dict(overrides or {})
    if weights is None:
        overrides = {**RANDOM_MODEL_DEFAULTS, **overrides}
        print("hyportrait: no --weights given: running a tiny random-weight model "
              f"({overrides['num_steps']} steps, {overrides['size']} px); the video shows noise, not a face. "
              "Pass --weights with the official pretrained_weights/ folder for real results.", file=sys.stderr)
    overrides.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    overrides.setdefault("precision", "fp32" if overrides["device"] == "cpu" else "fp16")  # fp16 is slow on CPUs
    config = AnimateConfig(**overrides)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but no CUDA GPU is available to torch")

    timings: dict[str, float] = {}
    tic = time.perf_counter()
    source_image = load_image(image)
    info = probe_video(video)
    nets = place_networks(load_networks(weights) if weights else random_networks("tiny"), config)
    detector = load_face_detector(weights, device=config.device)
    arcface = load_arcface(weights)
    timings["load"] = time.perf_counter() - tic

    tic = time.perf_counter()
    source = preprocess_source(source_image, detector)
    identity = arcface.embed(source.arcface_image) if arcface else zero_identity_embedding()
    driving = DrivingPreprocessor(detector)
    total = min(info.num_frames, config.max_frames)
    tokens = []
    with tqdm(total=total, desc="preprocess", unit="frame", disable=not progress) as bar:
        for chunk in driving.chunks(read_frames(video, limit=config.max_frames), chunk_frames=config.window):
            tokens.append(motion_tokens(nets, torch.from_numpy(chunk.expression_images),
                                        torch.from_numpy(chunk.pose_images), chunk.head_bucket, chunk.exp_bucket))
            bar.update(len(chunk.landmarks))
    motion = torch.cat(tokens)
    num_frames = motion.shape[0]
    if driving.missing_face_frames:
        print(f"hyportrait: {len(driving.missing_face_frames)} of {num_frames} driving frames had no detectable "
              "face; they reuse the last good landmarks", file=sys.stderr)
    timings["preprocess"] = time.perf_counter() - tic

    tic = time.perf_counter()
    generator = torch.Generator(config.device).manual_seed(config.seed)
    cond = build_conditioning(nets, config, ref_image=torch.from_numpy(source.ref_image),
                              dino_image=torch.from_numpy(source.dino_image),
                              id_embedding=torch.from_numpy(identity), motion=motion, generator=generator)
    steps = config.num_steps - i2i_start_index(config.num_steps, config.i2i_strength)
    with tqdm(total=steps, desc="denoise", unit="step", disable=not progress) as bar:
        latents = sample_latents(nets, cond, config, generator, callback=lambda step: bar.update(1))
    timings["denoise"] = time.perf_counter() - tic

    tic = time.perf_counter()
    folder = out / f"{datetime.now():%Y%m%d_%H%M%S}_{image.stem}_{video.stem}"
    cropped, full = folder / "cropped.mp4", folder / "full_resolution.mp4"
    x1, y1, x2, y2 = source.crop_box
    mask = soft_mask(x2 - x1, y2 - y1)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with VideoWriter(cropped, info.fps, audio_from=video) as crop_out, \
                VideoWriter(full, info.fps, audio_from=video) as full_out, \
                tqdm(total=num_frames, desc="decode+encode", unit="frame", disable=not progress) as bar:
            for frame in decode_frames(nets, latents, config, cond.num_pad):
                crop_out.write(frame)
                full_out.write(paste_back(source.original_image, frame, source.crop_box, mask))
                bar.update(1)
    except BaseException:
        # the writers removed their partial files; leave no empty result folder behind either
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    timings["decode_encode"] = time.perf_counter() - tic
    return AnimateResult(cropped, full, num_frames, info.fps, len(driving.missing_face_frames), timings)
