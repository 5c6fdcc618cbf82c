"""`hyportrait distill prepare`: driving clips -> training shards, with the runtime's own preprocessing and models.

Each clip is its own source: one of its frames (chosen at random, seeded by the clip's name, recorded in the
manifest) is the source image, as in the official training, and goes through `Animator.prepare` exactly as a
portrait does at inference (crop, appearance tokens, unscaled image latent; the clip's motion tokens chunk by
chunk). The clip's frames, cut at the reference frame's crop box, are VAE-encoded and scaled: the x0 the
sampler produces. Windows of `frames` frames every `stride` frames are the examples (distill/data.py).

The next clip is decoded, its faces detected and its conditioning computed on a worker thread while this
thread encodes the current clip's frames; frames are cropped a batch ahead of the VAE. A clip that cannot be
used (unreadable, no face, too few frames) is skipped and listed in DATA/prepare_report.json; a rerun skips the
clips already in the data.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hyportrait.errors import DataError, InputError, TooFewFramesError, VideoError
from hyportrait.export.onnx_io import ensure_writable
from hyportrait.files import sha256_file, write_json
from hyportrait.networks.contract import CROP_SIZE, MOTION_SIZE, WINDOW
from hyportrait.networks.weights import ARCFACE_FILE, CHECKPOINTS, CONFIG_FILES, DETECTOR_FILE
from hyportrait.runtime.api import Animator, Prepared
from hyportrait.runtime.pipeline import VAE_SCALE, check_range, prefetched, vae_images
from hyportrait.runtime.preprocess import CROP_EXPAND, EXPRESSION_EXPAND, crop_resize, vae_input
from hyportrait.runtime.video import probe_video, read_frames

from .data import ShardWriter

REPORT = "prepare_report.json"
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")
ENCODE_BATCH = 8  # frames per VAE encoder call (512 px crops in fp32: a few GB of activations)


# checked before anything is written (runtime/pipeline.py's check_range): frames within the runtime's window limit
# (2**70 fitted no clip: every clip was skipped and the run ended bad_data); a shard is held in memory until
# written (about 4 MB an example of 25 frames at the official size)
_LIMITS = (("frames", 1, 1000), ("stride", 1, 10_000_000), ("seed", 0, 2**64 - 1), ("per_shard", 1, 4096))


@dataclass
class PrepareConfig:
    frames: int = WINDOW  # frames per example: the runtime's UNet window
    stride: int | None = None  # frames between window starts (default: `frames`, windows do not overlap)
    seed: int = 0  # picks each clip's reference frame (with the clip's name)
    per_shard: int = 64  # examples per shard (cut between clips)

    def __post_init__(self):
        if self.stride is None:  # not `or`: a stride of 0 is refused, not taken as the default
            self.stride = self.frames
        for option, *_ in _LIMITS:
            check_range(option, getattr(self, option), _LIMITS)


@dataclass
class Clip:
    source: str  # path relative to the videos folder
    path: Path
    sha256: str
    reference_frame: int
    prepared: Prepared


def make_animator(weights: Path | None = None, device: str | None = None, precision: str | None = None,
                  **options) -> Animator:
    """The runtime's torch networks for data: no pad frames, so the conditioning's motion tokens are the clip's
    own frames. Without weights: the tiny random-weight networks `animate` runs."""
    return Animator(backend="torch", weights=weights, device=device, precision=precision, pad_frames=0, **options)


def weights_identity(weights: Path | None) -> dict:
    """The sha256 of every file of the weights folder that the runtime reads."""
    if weights is None:
        return {"random": "tiny"}  # random_networks("tiny"): fixed seeds
    names = [spec.path for spec in CHECKPOINTS] + list(CONFIG_FILES) + [DETECTOR_FILE, ARCFACE_FILE]
    return {"sha256": {name: sha256_file(Path(weights) / name) for name in names if (Path(weights) / name).is_file()}}


def find_videos(videos: Path) -> tuple[dict[str, Path], list[str]]:
    """The video files under `videos` (recursively) by relative name, and the other files' names."""
    videos = Path(videos)
    if not videos.is_dir():
        raise InputError(f"videos folder {videos} does not exist or is not a folder")
    files = sorted(p for p in videos.rglob("*") if p.is_file() and not p.name.startswith("."))
    found = {p.relative_to(videos).as_posix(): p for p in files if p.suffix.lower() in VIDEO_SUFFIXES}
    if not found:
        raise InputError(f"{videos} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
    return found, [p.relative_to(videos).as_posix() for p in files if p.suffix.lower() not in VIDEO_SUFFIXES]


def data_config(animator: Animator, config: PrepareConfig, weights: Path | None) -> dict:
    """What makes the data: a resumed run must match it."""
    run = animator.config
    return {
        **asdict(config),
        "size": run.size, "latent_size": run.size // 8, "precision": run.precision, "vae_scale": VAE_SCALE,
        "preprocess": {"crop_size": CROP_SIZE, "motion_size": MOTION_SIZE, "crop_expand": CROP_EXPAND,
                       "expression_expand": EXPRESSION_EXPAND, "motion_chunk": run.window,
                       "max_frames": run.max_frames, "detector": type(animator.detector).__name__,
                       "identity": "arcface" if animator.arcface else "zeros"},
        "weights": weights_identity(weights),
    }


def reference_frame(source: str, num_frames: int, seed: int) -> int:
    # seeded by the name, not the order: a resumed or reordered run picks the same frame
    return random.Random(f"{seed}:{source}").randrange(num_frames)


def load_clip(animator: Animator, source: str, path: Path, config: PrepareConfig) -> Clip:
    """Reference frame and conditioning of one clip (the worker thread's part)."""
    info = probe_video(path)
    num_frames = min(info.num_frames, animator.config.max_frames)
    if num_frames < config.frames:
        raise TooFewFramesError(f"{num_frames} frames, an example needs {config.frames}")
    index = reference_frame(source, num_frames, config.seed)
    frame = next(itertools.islice(read_frames(path, limit=index + 1), index, None), None)
    if frame is None:
        raise VideoError(f"frame {index} cannot be decoded (the header says {info.num_frames} frames)")
    prepared = animator.prepare(frame, path)
    if prepared.num_frames < config.frames:
        raise TooFewFramesError(f"{prepared.num_frames} decodable frames, an example needs {config.frames}")
    return Clip(source, path, sha256_file(path), index, prepared)


def _crops(clip: Clip, limit: int) -> Iterator[np.ndarray]:
    """The clip's frames cut at the reference frame's crop box, as (ENCODE_BATCH, 3, 512, 512) VAE inputs."""
    frames = read_frames(clip.path, limit=limit)
    box = clip.prepared.source.crop_box
    while batch := list(itertools.islice(frames, ENCODE_BATCH)):
        yield np.stack([vae_input(crop_resize(frame, box, CROP_SIZE)) for frame in batch])


@torch.no_grad()
def clip_examples(animator: Animator, clip: Clip, config: PrepareConfig) -> list[dict[str, torch.Tensor]]:
    """The examples of one clip: its scaled frame latents and motion tokens, window by window."""
    models, cond = animator.models, clip.prepared.conditioning
    latents = torch.cat([
        (models.vae_encoder(image=vae_images(torch.from_numpy(batch), animator.config.size, models.device))
         .float() * VAE_SCALE).to(models.dtype).cpu()
        for batch in prefetched(_crops(clip, clip.prepared.num_frames), depth=2)])
    if latents.shape[0] != cond.motion.shape[0]:
        raise VideoError(f"decoding the clip again gave {latents.shape[0]} frames, not {cond.motion.shape[0]}")
    shared = {"image_latent": cond.image_latent.cpu(), "appearance": cond.appearance.cpu()}
    motion = cond.motion.cpu()
    return [{"latents": latents[start:start + config.frames], "motion": motion[start:start + config.frames],
             **shared} for start in range(0, latents.shape[0] - config.frames + 1, config.stride)]


def _loaded(animator: Animator, todo: dict[str, Path], config: PrepareConfig
            ) -> Iterator[tuple[str, Clip | InputError]]:
    for source, path in todo.items():
        try:
            yield source, load_clip(animator, source, path, config)
        except InputError as exc:  # a bad clip is skipped; other errors (out of memory, weights) end the run
            yield source, exc


def prepare_data(videos: Path, out: Path, weights: Path | None = None, config: PrepareConfig | None = None, *,
                 animator: Animator | None = None, device: str | None = None, precision: str | None = None,
                 progress: bool = False) -> dict:
    """Write the examples of every clip under `videos` to `out`; returns the report (also DATA/prepare_report.json).

    animator: networks from `make_animator` (built from weights, device and precision when not given)."""
    from tqdm import tqdm

    config = config or PrepareConfig()
    found, ignored = find_videos(Path(videos))
    out = ensure_writable(Path(out))
    animator = animator or make_animator(weights, device, precision)
    if animator.config.pad_frames:
        raise ValueError("the data's animator must have no pad frames (make_animator)")
    report = {"clips": len(found), "in_data_before": 0, "added": [], "examples_added": 0, "skipped": {},
              "ignored": ignored}
    with ShardWriter(out, data_config(animator, config, weights), config.per_shard) as writer:
        done = writer.done_sources()
        todo = {source: path for source, path in found.items() if source not in done}
        report["in_data_before"] = len(found) - len(todo)
        with tqdm(total=len(todo), desc="prepare", unit="clip", disable=not progress) as bar:
            for source, clip in prefetched(_loaded(animator, todo, config), depth=1):
                try:
                    if isinstance(clip, InputError):
                        raise clip
                    examples = clip_examples(animator, clip, config)
                except InputError as exc:
                    report["skipped"][source] = {"code": exc.code, "reason": exc.message}
                else:
                    for example in examples:
                        writer.add(example, source)
                    writer.end_source({"sha256": clip.sha256, "frames": clip.prepared.num_frames,
                                       "reference_frame": clip.reference_frame, "examples": len(examples),
                                       "missing_face_frames": clip.prepared.missing_face_frames})
                    report["added"].append(source)
                    report["examples_added"] += len(examples)
                bar.update(1)
                bar.set_postfix(examples=report["examples_added"], skipped=len(report["skipped"]))
    report["examples"] = writer.manifest["examples"]
    write_json(out / REPORT, report)
    if not report["examples"]:
        raise DataError(f"no clip of {videos} gave an example: {out / REPORT} says why")
    return report
