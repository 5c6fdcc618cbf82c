"""The embeddable API: create an `Animator` once (networks loaded, engines checked), then animate many
portrait/video pairs.

    from hyportrait.runtime.api import Animator
    animator = Animator(backend="onnxruntime", models="onnx/")       # or backend="torch", weights=...
    result = animator.animate("face.png", "driving.mp4", "outputs/")  # -> AnimateResult (paths, timings)
    for frame in animator.frames("face.png", "driving.mp4"): ...      # (512, 512, 3) uint8 RGB crops

Outputs, as the official inference writes them, under `{out}/{YYYYmmdd_HHMMSS}_{image}_{video}/`:
`cropped.mp4` (the generated crop) and `full_resolution.mp4` (pasted back onto the source image), both at
the driving video's frame rate and with its audio, each written under a temporary name and renamed when
complete. Inputs are plain types: a path, encoded bytes or an (H, W, 3) uint8 RGB array for the image; a
path or encoded bytes for the video.

Thread safety: an Animator runs one animation at a time; calls from several threads are serialised by a
lock (they share the networks and the GPU stream). For parallel work create one Animator per GPU.
Errors are `hyportrait.errors.HyportraitError` subclasses with a stable `.code`.
"""
from __future__ import annotations

import copy
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hyportrait.errors import InputError
from hyportrait.networks.arcface import load_arcface, zero_identity_embedding
from hyportrait.networks.contract import PRECISIONS

from .backends import Models, resolve_device
from .models import ModelOptions, load_models
from .paste_back import PasteBack
from .pipeline import (
    FAST_MODE,
    AnimateConfig,
    BusyTimes,
    Conditioning,
    build_conditioning,
    consumed_in_background,
    decode_frames,
    motion_tokens,
    prefetched,
    sample_latents,
)
from .preprocess import DrivingPreprocessor, SourceInputs, preprocess_source
from .sampling import WindowMap, i2i_start_index
from .video import VideoInfo, VideoWriter, probe_video, read_frames

# Without official weights the torch backend runs tiny random-weight networks: every stage runs quickly on a
# CPU, and the video is noise. Explicit options still override these.
RANDOM_MODEL_DEFAULTS = {"num_steps": 4, "size": 128}
MODES = ("quality", "fast")


@dataclass
class AnimateResult:
    cropped: Path
    full_resolution: Path
    num_frames: int
    fps: Fraction
    missing_face_frames: int
    timings: dict[str, float]

    def as_dict(self) -> dict:
        """Plain types only (for embedders and JSON)."""
        return {"cropped": str(self.cropped), "full_resolution": str(self.full_resolution),
                "num_frames": self.num_frames, "fps": float(self.fps),
                "missing_face_frames": self.missing_face_frames, "timings": dict(self.timings)}


@dataclass
class Prepared:
    """One video's inputs to the sampler: everything before the denoising loop."""
    source: SourceInputs
    video: VideoInfo
    conditioning: Conditioning
    generator: torch.Generator
    num_frames: int  # driving frames used
    missing_face_frames: int
    timings: dict[str, float] = field(default_factory=dict)


def load_image(image) -> np.ndarray:
    """A path, encoded bytes or an (H, W, 3) uint8 RGB array -> (H, W, 3) uint8 RGB."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"source image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return image
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else Path(image)
    name = "source image (bytes)" if isinstance(source, io.BytesIO) else f"source image {source}"
    try:
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{name}: not a readable image ({exc})") from None


@contextmanager
def video_path(video) -> Iterator[Path]:
    """A path for `video` (a path, or encoded bytes written to a temporary file for the call)."""
    if not isinstance(video, (bytes, bytearray)):
        yield Path(video)
        return
    fd, tmp = tempfile.mkstemp(prefix="hyportrait-video-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(video)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def make_config(settings: dict, **fixed) -> AnimateConfig:
    """An AnimateConfig whose invalid values are input errors (with a code), not tracebacks."""
    try:
        return AnimateConfig(**settings, **fixed)
    except ValueError as exc:
        raise InputError(f"invalid option: {exc}") from None


def _stem(thing, default: str) -> str:
    return Path(thing).stem if isinstance(thing, (str, os.PathLike)) else default


class Animator:
    """The networks of one backend, loaded once, and the whole animation from files to videos.

    backend: "torch" (PyTorch modules from `weights`, the official weights folder; without it tiny random
    networks for trying things), "onnxruntime" (`models` = a `hyportrait export` folder) or "tensorrt"
    (`models` = a `hyportrait build` folder).
    mode: "quality" (the official sampler) or "fast" (LCM, 4 steps, no guidance: for a UNet with an LCM LoRA
    merged, `lora=` on the torch backend or `hyportrait export --lora`).
    faithful (torch only): True runs the modules as the official code does (the reference, bit-identical);
    False the engine rewrites (same up to rounding, faster). cuda_graph (any backend, GPU): replay
    the UNet and VAE decoder as CUDA graphs. compile (torch only): compile the UNet and VAE decoder with
    `torch.compile` (True: inductor, or a torch.compile backend's name; the first window and decode of each
    shape wait for the compiler). float8 (torch only, GPUs of compute capability 8.9+): the UNet's transformer
    linears as fp8 GEMMs (runtime/float8.py; faster with compile, not the reference's numbers). Any `AnimateConfig` field can be given as a keyword (num_steps, seed, ...).
    """

    # how each sampling step's windows run: one after another here (runtime/distributed.py spreads them)
    map_windows: WindowMap | None = None

    def __init__(self, models: str | Path | Models | None = None, *, backend: str = "torch",
                 weights: str | Path | None = None, device: str | None = None, precision: str | None = None,
                 mode: str = "quality", lora: str | Path | None = None, faithful: bool = True,
                 cuda_graph: bool = False, compile: bool | str = False, float8: bool = False,
                 progress: bool = False, **options):
        tic = time.perf_counter()
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: choose quality or fast")
        unknown = set(options) - {f.name for f in fields(AnimateConfig)} - {"precision", "device"}
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}")
        if isinstance(models, Models):  # networks the caller built (e.g. custom sessions, benchmarks)
            backend, device = models.backend, str(models.device)
        self.device = resolve_device(device, backend)
        self.backend = backend
        self.progress = progress
        self._lock = threading.Lock()
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")  # fp16 is slow on CPUs
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}: choose fp16 or fp32")
        settings = dict(FAST_MODE) if mode == "fast" else {}
        model_options = ModelOptions(precision=precision, lora=None if lora is None else Path(lora),
                                     faithful=faithful, cuda_graph=cuda_graph, compile=compile, float8=float8)
        if isinstance(models, Models):  # networks the caller built
            self.models = models
            self.config = self._fixed_size_config(settings, options)
            arcface_folder = None
        elif backend == "torch":
            if models is not None:
                raise InputError("the torch backend loads `weights` (a weights folder), not `models`")
            if weights is None:
                settings.update(RANDOM_MODEL_DEFAULTS)
                print("hyportrait: no weights given: running a tiny random-weight model; the video shows noise, "
                      "not a face. Pass the official pretrained_weights/ folder for real results.", file=sys.stderr)
            settings.update(options)
            self.config = make_config(settings, precision=precision, device=str(self.device))
            self.models = load_models(backend, weights, self.device,
                                      replace(model_options, size=self.config.size))
            arcface_folder = weights
        else:
            self.models = load_models(backend, models, self.device, model_options)
            self.config = self._fixed_size_config(settings, options)
            # ArcFace (arcface.onnx) is copied into the export folder
            arcface_folder = models
        self.detector = self.models.face_detector
        self.arcface = load_arcface(Path(arcface_folder) if arcface_folder else None)
        self.load_seconds = time.perf_counter() - tic

    def _fixed_size_config(self, settings: dict, options: dict) -> AnimateConfig:
        """The config of models whose crop size and window are fixed (by an export, or by the caller)."""
        models = self.models
        size = models.pose_map.shape[-1] * 8  # the UNet's latent fixes the crop size
        for option, fixed in (("size", size), ("window", models.window)):
            if fixed is not None and options.get(option, fixed) != fixed:
                raise InputError(f"the models are built for {option} {fixed} "
                                 f"({'px crops' if option == 'size' else 'frames per UNet call'}), "
                                 f"{option}={options[option]} was asked for")
        settings = {"size": size, **({"window": models.window} if models.window else {}), **settings, **options}
        return make_config(settings, precision="fp16" if models.dtype == torch.float16 else "fp32",
                           device=str(self.device))

    def with_options(self, **options) -> Animator:
        """These networks with other sampling options (any `AnimateConfig` field): a view sharing the networks,
        the detector and the lock, e.g. one per request of a server."""
        view = copy.copy(self)
        view.config = make_config({**asdict(self.config), **options})
        return view

    # -- the stages ----------------------------------------------------------------------------------------

    def prepare(self, image, video: Path) -> Prepared:
        """Source and driving preprocessing, motion tokens and the per-video constants."""
        from tqdm import tqdm

        config = self.config
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        source = preprocess_source(load_image(image), self.detector)
        info = probe_video(video)
        identity = self.arcface.embed(source.arcface_image) if self.arcface else zero_identity_embedding()
        driving = DrivingPreprocessor(self.detector)
        tokens = []
        total = min(info.num_frames, config.max_frames)
        with tqdm(total=total, desc="preprocess", unit="frame", disable=not self.progress) as bar:
            for chunk in driving.chunks(read_frames(video, limit=config.max_frames), chunk_frames=config.window):
                tokens.append(motion_tokens(self.models, torch.from_numpy(chunk.expression_images),
                                            torch.from_numpy(chunk.pose_images), chunk.head_bucket,
                                            chunk.exp_bucket))
                bar.update(len(chunk.landmarks))
        motion = torch.cat(tokens)
        if driving.missing_face_frames:
            print(f"hyportrait: {len(driving.missing_face_frames)} of {motion.shape[0]} driving frames had no "
                  "detectable face; they reuse the last good landmarks", file=sys.stderr)
        timings["preprocess"] = time.perf_counter() - tic
        tic = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(config.seed)
        cond = build_conditioning(self.models, config, ref_image=torch.from_numpy(source.ref_image),
                                  dino_image=torch.from_numpy(source.dino_image),
                                  id_embedding=torch.from_numpy(identity), motion=motion, generator=generator)
        timings["conditioning"] = time.perf_counter() - tic
        return Prepared(source, info, cond, generator, motion.shape[0], len(driving.missing_face_frames), timings)

    def denoise_steps(self) -> int:
        """Denoising steps one window takes (the i2i start skips some)."""
        return self.config.num_steps - i2i_start_index(self.config.num_steps, self.config.i2i_strength)

    def sample(self, prepared: Prepared, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """The denoising loop: whole-clip latents, pad frames included. `on_step(step)` is called after each
        step (a server's progress; an exception it raises stops the loop)."""
        from tqdm import tqdm

        def step_done(step: int) -> None:
            bar.update(1)
            if on_step is not None:
                on_step(step)

        tic = time.perf_counter()
        with tqdm(total=self.denoise_steps(), desc="denoise", unit="step", disable=not self.progress) as bar:
            latents = sample_latents(self.models, prepared.conditioning, self.config, prepared.generator,
                                     callback=step_done, map_windows=self.map_windows)
        prepared.timings["denoise"] = time.perf_counter() - tic
        return latents

    def decode(self, prepared: Prepared, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """The output frames of the sampled latents, decoded chunk by chunk."""
        return decode_frames(self.models, latents, self.config, prepared.conditioning.num_pad)

    def _decoded(self, prepared: Prepared, latents: torch.Tensor, busy: BusyTimes | None = None
                 ) -> Iterator[np.ndarray]:
        """The output frames, decoded a chunk ahead of the caller (decoding overlaps encoding)."""
        frames = self.decode(prepared, latents)
        return prefetched(busy.items("busy_decode", frames) if busy else frames, depth=2 * self.config.decode_chunk)

    # -- whole animations ----------------------------------------------------------------------------------

    def frames(self, image, video) -> Iterator[np.ndarray]:
        """The generated (size, size, 3) uint8 RGB crops, streamed as they are decoded (for callers that
        encode themselves)."""
        with self._lock, video_path(video) as path:
            prepared = self.prepare(image, path)
            latents = self.sample(prepared)
            yield from self._decoded(prepared, latents)

    def animate(self, image, video, out: str | Path) -> AnimateResult:
        """Animate `image` with `video`; write cropped.mp4 and full_resolution.mp4 under a new folder of `out`."""
        with self._lock, video_path(video) as path:
            start = time.perf_counter()
            prepared = self.prepare(image, path)
            latents = self.sample(prepared)
            result = self.write(prepared, latents, path, Path(out) / (
                f"{datetime.now():%Y%m%d_%H%M%S}_{_stem(image, 'image')}_{_stem(video, 'video')}"))
            result.timings["total"] = time.perf_counter() - start
        return result

    def write(self, prepared: Prepared, latents: torch.Tensor, video: Path, folder: Path,
              on_frame: Callable[[], None] | None = None) -> AnimateResult:
        """Decode `latents` and write folder/cropped.mp4 and folder/full_resolution.mp4 (with the audio of the
        driving `video`). `on_frame()` is called after each frame is handed to the writers (an exception it
        raises stops the writing and removes the partial files)."""
        from tqdm import tqdm

        tic = time.perf_counter()
        cropped, full = folder / "cropped.mp4", folder / "full_resolution.mp4"
        paste_back = PasteBack(prepared.source.original_image, prepared.source.crop_box)
        fps = prepared.video.fps

        def write_full(frame):
            full_out.write(paste_back(frame))

        depth, busy = 2 * self.config.decode_chunk, BusyTimes()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # each video is pasted and encoded on its own thread (the encoder releases the GIL)
            preset = self.config.video_preset
            with VideoWriter(cropped, fps, audio_from=video, preset=preset) as crop_out, \
                    VideoWriter(full, fps, audio_from=video, preset=preset) as full_out, \
                    consumed_in_background(busy.calls("busy_write_cropped", crop_out.write), depth,
                                           "hyportrait-crop-video") as to_crop, \
                    consumed_in_background(busy.calls("busy_write_full", write_full), depth,
                                           "hyportrait-full-video") as to_full, \
                    tqdm(total=prepared.num_frames, desc="decode+encode", unit="frame",
                         disable=not self.progress) as bar:
                for frame in self._decoded(prepared, latents, busy):
                    to_crop(frame)
                    to_full(frame)
                    bar.update(1)
                    if on_frame is not None:
                        on_frame()
        except OSError as exc:
            raise InputError(f"cannot write the output videos under {folder}: {exc.strerror or exc}") from None
        finally:
            # the writers removed their partial files; leave no empty result folder behind either
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        # decode_encode is wall time; busy_* the seconds each of its threads worked
        timings = dict(prepared.timings, decode_encode=time.perf_counter() - tic, **busy.seconds)
        return AnimateResult(cropped, full, prepared.num_frames, fps, prepared.missing_face_frames, timings)
