"""The embeddable API: create an `Animator` once (networks loaded, engines checked), then animate many
portrait/video pairs.

    from hyportrait.runtime.api import Animator
    animator = Animator(backend="onnxruntime", models="onnx/")       # or backend="torch", weights=...
    result = animator.animate("face.png", "driving.mp4", "outputs/")  # -> AnimateResult (paths, timings)
    for frame in animator.frames("face.png", "driving.mp4"): ...      # (512, 512, 3) uint8 RGB crops
    for out in animator.stream("face.png", camera_frames): ...        # StreamFrame: crop, pasted back, time

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
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from hyportrait.errors import InputError, OptionError, SourceStalledError, describe
from hyportrait.files import check_output_folder
from hyportrait.networks.arcface import load_arcface, zero_identity_embedding
from hyportrait.networks.contract import PRECISIONS

from .backends import Models, resolve_device
from .inputs import check_stall_timeout, load_image
from .models import ModelOptions, check_folder, load_models
from .paste_back import PasteBack
from .pipeline import (
    FAST_MODE,
    AnimateConfig,
    BusyTimes,
    Conditioning,
    build_conditioning,
    check_range,
    closed,
    consumed_in_background,
    decode_frames,
    decode_segments,
    motion_tokens,
    prefetched,
    sample_latents,
    sample_segments,
)
from .preprocess import DrivingPreprocessor, SourceInputs, preprocess_source
from .sampling import WindowMap, i2i_start_index
from .video import STDIN, LiveSource, VideoInfo, VideoWriter, is_url, open_live, probe_video, read_frames

# Without official weights the torch backend runs tiny random-weight networks: every stage runs quickly on a
# CPU, and the video is noise. Explicit options still override these.
RANDOM_MODEL_DEFAULTS = {"num_steps": 4, "size": 128}
# each mode's settings over AnimateConfig's defaults (the official config: quality mode)
MODES = {"quality": {}, "fast": FAST_MODE}
STALL_SECONDS = 10.0  # a live source giving no frame for this long has stalled


@dataclass
class StreamFrame:
    """One output frame of `Animator.stream`."""
    index: int
    time: float  # seconds: the driving frame's timestamp
    cropped: np.ndarray  # (size, size, 3) uint8 RGB, the generated crop
    paste_back: PasteBack = field(repr=False)

    @property
    def full(self) -> np.ndarray:
        """The crop pasted back onto the source image, computed at each access (on the caller's thread, so a
        writer thread can do it while the next frames are made)."""
        return self.paste_back(self.cropped)


class _WatchedSource:
    """The driving frames of a live source, read on the preprocessing thread: the time each was waited for
    (a stall is seen from the caller's thread) and their timestamps until their output frame is made.
    Items are RGB arrays or (array, seconds) pairs; bare arrays are timed at `fps`."""

    def __init__(self, frames: Iterable, fps: float, limit: int):
        self.frames, self.fps, self.limit = frames, fps, limit
        self.waiting_since: float | None = None
        self.times: deque[float] = deque()

    def __iter__(self) -> Iterator[np.ndarray]:
        items = iter(self.frames)
        for index in range(self.limit):
            self.waiting_since = time.monotonic()
            item = next(items, None)
            self.waiting_since = None
            if item is None:
                return
            frame, seconds = item if isinstance(item, tuple) else (item, index / self.fps)
            self.times.append(float(seconds))
            yield frame

    def check(self, timeout: float) -> None:
        since = self.waiting_since
        if since is not None and time.monotonic() - since > timeout:
            raise SourceStalledError(f"the driving source gave no frame for {timeout:g} s")


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


def _crops(made: Iterator[StreamFrame]) -> Iterator[np.ndarray]:
    """The cropped frames of a stream; closed (a caller that stopped early), it closes the stream, whose
    preprocessing thread then stops at once, under the Animator's lock."""
    try:
        for frame in made:
            yield frame.cropped
    finally:
        made.close()


def make_config(settings: dict) -> AnimateConfig:
    """An AnimateConfig; an invalid value raises OptionError (a coded input error naming the option)."""
    return AnimateConfig(**settings)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OptionError("mode", f"must be quality or fast, got {mode!r}")


def check_option_names(options: dict) -> None:
    unknown = set(options) - {f.name for f in fields(AnimateConfig)}
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}")


def mode_config(mode: str, options: dict, under_mode: dict, fixed_window: int | None,
                asked: dict | None = None) -> AnimateConfig:
    """The config of `mode` on some models: the mode's settings over `under_mode` (what the models set: device,
    precision, crop size, a fixed window; a random-weight model's few steps), the caller's `options` over both;
    the first segment of `asked` (default: `options`) checked against `fixed_window` (`first_segment_checked`)."""
    config = make_config({**under_mode, **MODES[mode], **options})
    return first_segment_checked(config, options if asked is None else asked, fixed_window)


def first_segment_checked(config: AnimateConfig, options: dict, fixed_window: int | None) -> AnimateConfig:
    """`config` with a first segment the models can run. One asked for in `options` needs segments (`segment` >
    0) and, on models whose UNet takes a fixed number of frames (an export or engine: `fixed_window`), at least
    that many (OptionError otherwise); a mode's own first segment falls back to a whole window there."""
    asked = options.get("first_segment")
    if asked and not config.segment:
        raise OptionError("first_segment", f"applies to segmented sampling (segment > 0, fast mode's default), "
                          f"not to the whole clip at once (segment 0), got {asked}")
    if fixed_window and 0 < config.first_segment < fixed_window:
        if asked:
            raise OptionError("first_segment", f"must be 0 or at least {fixed_window}: these models' UNet runs "
                              f"{fixed_window} frames per call (an export or engine; the torch backend runs any "
                              f"count), got {asked}")
        return replace(config, first_segment=0)
    return config


def result_folder(out: Path, name: str) -> Path:
    """A new folder `out/name`, else `out/name-2`, `-3`, ...: created atomically, so runs that finish in the same
    second, in one process or several, never write into one folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way (FileExistsError), no permission
        raise InputError(f"output folder {out}: cannot be created ({describe(exc)})") from None
    folder, n = out / name, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1
            folder = out / f"{name}-{n}"
        except OSError as exc:  # no permission, a full disk
            raise InputError(f"output folder {out}: cannot create {folder.name} in it ({describe(exc)})") from None


@contextmanager
def _unwound_on_sigterm() -> Iterator[None]:
    """While a call runs in the main thread of a process whose SIGTERM still has its default action (end at
    once, as an embedding script has), a SIGTERM first unwinds the call, removing its partial videos and
    empty folder, then ends the process as SIGTERM would have. Processes with their own handler (the CLI, a
    server) keep it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def unwind(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the clean-up short
        raise _Terminated

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Terminated(BaseException):
    """SIGTERM arrived during a call (see `_unwound_on_sigterm`)."""


def _stem(thing, default: str) -> str:
    return Path(thing).stem if isinstance(thing, (str, os.PathLike)) else default


class Animator:
    """The networks of one backend, loaded once, and the whole animation from files to videos.

    backend: "torch" (PyTorch modules from `weights`, the official weights folder; without it tiny random
    networks for trying things), "onnxruntime" (`models` = a `hyportrait export` folder) or "tensorrt"
    (`models` = a `hyportrait build` folder); or `models` = `Models` the caller built (e.g. with
    `load_models`), `weights` then the folder of their ArcFace.
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
        check_mode(mode)
        check_option_names(options)
        if precision is not None and precision not in PRECISIONS:
            raise OptionError("precision", f"must be fp16 or fp32, got {precision!r}")
        # every value is checked before any network loads; the segment against the window only once the models,
        # which may fix the window, are known
        make_config({k: v for k, v in options.items() if k != "segment"})
        check_range("segment", options.get("segment", 0))
        if isinstance(models, Models):  # networks the caller built (e.g. custom sessions, benchmarks)
            backend, device = models.backend, str(models.device)
        self.device = resolve_device(device, backend)
        self.backend = backend
        self.progress = progress
        self._lock = threading.Lock()
        # what the caller asked: a view (`with_options`) lays its own over them
        self.mode, self.options = mode, options
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")  # fp16 is slow on CPUs
        model_options = ModelOptions(precision=precision, lora=None if lora is None else Path(lora),
                                     faithful=faithful, cuda_graph=cuda_graph, compile=compile, float8=float8)
        # the settings under the mode's: a random-weight model's few steps, then those the models fix
        under_mode = {"device": str(self.device)}
        if isinstance(models, Models):  # networks the caller built (`weights`: their folder, for ArcFace)
            if weights is not None:
                check_folder(weights)
            self.models = models
            arcface_folder = weights
        elif backend == "torch":
            if models is not None:
                raise InputError("the torch backend loads `weights` (a weights folder), not `models`")
            if weights is None:
                under_mode.update(RANDOM_MODEL_DEFAULTS)
                print("hyportrait: no weights given: running a tiny random-weight model; the video shows noise, "
                      "not a face. Pass the official pretrained_weights/ folder for real results.", file=sys.stderr)
            size = mode_config(mode, options, {**under_mode, "precision": precision}, None).size
            self.models = load_models(backend, weights, self.device, replace(model_options, size=size))
            arcface_folder = weights
        else:
            self.models = load_models(backend, models, self.device, model_options)
            if self.models.random_weights:
                under_mode["num_steps"] = RANDOM_MODEL_DEFAULTS["num_steps"]
            # ArcFace (arcface.onnx) is copied into the export folder, which engines are built from
            arcface_folder = self.models.export_dir
        self._under_mode = {**under_mode, **self._fixed_settings(options)}
        self.config = mode_config(mode, options, self._under_mode, self.models.window)
        self.detector = self.models.face_detector
        self.arcface = load_arcface(Path(arcface_folder) if arcface_folder else None)
        self.load_seconds = time.perf_counter() - tic

    def _fixed_settings(self, options: dict) -> dict:
        """The settings the models fix: the crop size, the precision and, for an export or engine, the window
        (InputError when `options` ask for another size or window)."""
        models = self.models
        size = models.pose_map.shape[-1] * 8  # the UNet's latent fixes the crop size
        for option, fixed in (("size", size), ("window", models.window)):
            if fixed is not None and options.get(option, fixed) != fixed:
                raise InputError(f"the models are built for {option} {fixed} "
                                 f"({'px crops' if option == 'size' else 'frames per UNet call'}), "
                                 f"{option}={options[option]} was asked for")
        # a fixed window keeps the official overlap's share of it (3 of 25): 3 of a tiny export's 4 frames would
        # sample every frame four times
        window = {"window": models.window, "overlap": min(3, models.window // 4)} if models.window else {}
        return {"size": size, "precision": "fp16" if models.dtype == torch.float16 else "fp32", **window}

    def with_options(self, mode: str | None = None, **options) -> Animator:
        """These networks in `mode` (None: this Animator's) with other sampling options (any `AnimateConfig`
        field) laid over the ones this Animator was made with: a view sharing the networks, the detector and the
        lock, e.g. one per job of a server. The mode's settings are defaults, as at creation: on models with a
        fixed window (exports, engines) its own first segment falls back to a whole window, while a shorter one
        asked for (here or at creation) is refused."""
        check_mode(mode or self.mode)
        check_option_names(options)
        self._fixed_settings(options)
        view = copy.copy(self)
        view.mode, view.options = mode or self.mode, {**self.options, **options}
        # only a first segment asked here is checked: one from creation was, and goes unused without segments
        view.config = mode_config(view.mode, view.options, self._under_mode, self.models.window, options)
        return view

    # -- the stages ----------------------------------------------------------------------------------------

    def prepare(self, image, video) -> Prepared:
        """Source and driving preprocessing, motion tokens and the per-video constants."""
        from tqdm import tqdm

        config = self.config
        timings: dict[str, float] = {}
        tic = time.perf_counter()
        image = load_image(image)
        info = probe_video(video)  # both inputs are read before the first network runs
        source, identity = self._source(image)
        driving = DrivingPreprocessor(self.detector)
        tokens = []
        total = min(info.num_frames, config.max_frames)
        with tqdm(total=total, desc="preprocess", unit="frame", disable=not self.progress) as bar:
            # window-sized chunks: `sample` takes the whole clip (segments go through `_streamed`)
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
        cond, generator = self._conditioning(source, identity, motion)
        timings["conditioning"] = time.perf_counter() - tic
        return Prepared(source, info, cond, generator, motion.shape[0], len(driving.missing_face_frames), timings)

    def _source(self, image) -> tuple[SourceInputs, np.ndarray]:
        """The source image's network inputs and identity embedding."""
        source = preprocess_source(load_image(image), self.detector)
        identity = self.arcface.embed(source.arcface_image) if self.arcface else zero_identity_embedding()
        return source, identity

    def _conditioning(self, source: SourceInputs, identity: np.ndarray, motion: torch.Tensor | None
                      ) -> tuple[Conditioning, torch.Generator]:
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        cond = build_conditioning(self.models, self.config, ref_image=torch.from_numpy(source.ref_image),
                                  dino_image=torch.from_numpy(source.dino_image),
                                  id_embedding=torch.from_numpy(identity), motion=motion, generator=generator)
        return cond, generator

    def _streamed(self, source: SourceInputs, identity: np.ndarray, frames: Iterable, driving: DrivingPreprocessor,
                  fps: float, stall_timeout: float) -> Iterator[StreamFrame]:
        """Output frames made segment by segment from driving frames read as they are needed: preprocessing
        runs a chunk ahead on a thread, motion tokens are made per chunk when a segment needs them, each
        segment is decoded as soon as it is sampled (`sample_segments`, `decode_segments`)."""
        config = self.config
        cond, generator = self._conditioning(source, identity, None)
        paste = PasteBack(source.original_image, source.crop_box)
        watched = _WatchedSource(frames, fps, config.max_frames)
        chunks = prefetched(driving.chunks(watched, chunk_frames=config.window, first=config.first_chunk_frames),
                            depth=2,
                            check=lambda: watched.check(stall_timeout))
        motion = (motion_tokens(self.models, torch.from_numpy(chunk.expression_images),
                                torch.from_numpy(chunk.pose_images), chunk.head_bucket, chunk.exp_bucket)
                  for chunk in chunks)
        try:
            segments = sample_segments(self.models, cond, config, generator, motion)
            for index, crop in enumerate(decode_segments(self.models, segments, config)):
                yield StreamFrame(index, watched.times.popleft(), crop, paste)
        finally:
            chunks.close()  # stops the preprocessing thread when the caller stops early

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

    @contextmanager
    def _streamed_video(self, image, video, stall_timeout: float
                        ) -> Iterator[tuple[Iterator[StreamFrame], SourceInputs, LiveSource, DrivingPreprocessor]]:
        """`_streamed` over a video file, "-" or a URL (`open_live`); the source is closed when the block ends,
        also when it failed before reading a frame."""
        check_stall_timeout(stall_timeout)
        source, identity = self._source(image)
        driving, opened = DrivingPreprocessor(self.detector), open_live(video, self.config.max_frames)
        try:
            yield self._streamed(source, identity, opened.frames, driving, float(opened.fps), stall_timeout), \
                source, opened, driving
        finally:
            opened.close()

    # -- whole animations ----------------------------------------------------------------------------------

    def stream(self, image, frames: Iterable, *, fps: float = 25.0,
               stall_timeout: float = STALL_SECONDS) -> Iterator[StreamFrame]:
        """Animate `image` with driving frames from any iterable (a file's frames, a pipe, a camera, a socket):
        RGB uint8 (H, W, 3) arrays, or (array, seconds) pairs; bare arrays are timed at `fps`. Yields a
        `StreamFrame` per driving frame (the crop, `.full` pasted back, the driving frame's time) as each
        segment is decoded, keeping nothing per frame for the whole clip (with `segment` 0, the official
        whole-clip schedule, frames come out only after the source ends).

        The source is read a chunk ahead on a thread; when it ends (or its iterator raises) the output ends
        after the frames made so far; when it gives no frame for `stall_timeout` seconds a
        `SourceStalledError` (code source_stalled) is raised; when the caller stops iterating (or closes this
        generator), reading stops. The Animator's lock is held until the generator ends or is closed.
        """
        check_stall_timeout(stall_timeout)
        with self._lock:
            source, identity = self._source(image)
            yield from self._streamed(source, identity, frames, DrivingPreprocessor(self.detector), fps,
                                      stall_timeout)

    def frames(self, image, video) -> Iterator[np.ndarray]:
        """The generated (size, size, 3) uint8 RGB crops, streamed as they are decoded (for callers that
        encode themselves)."""
        with self._lock:
            if self.config.segment:
                with self._streamed_video(image, video, STALL_SECONDS) as (made, *_):
                    yield from _crops(made)
                return
            prepared = self.prepare(image, video)
            latents = self.sample(prepared)
            yield from self._decoded(prepared, latents)

    def animate(self, image, video, out: str | Path, *, stream: bool = False,
                stall_timeout: float = STALL_SECONDS) -> AnimateResult:
        """Animate `image` with `video`; write cropped.mp4 and full_resolution.mp4 under a new folder of `out`.

        With a segmented schedule (`segment` > 0, the fast mode's default) the driving frames are read, and the
        output written, segment by segment. stream: the outputs are fragmented MP4s written under their final
        names as frames come (playable while written; a failed run leaves them with every frame made so far).
        `video` may also be "-" (a container stream on stdin) or a URL (see `video.open_live`).
        """
        check_output_folder(Path(out), f"output folder {out}")  # before any work
        if self.config.segment or stream or video == STDIN or is_url(video):
            return self._animate_segmented(image, video, out, stream, stall_timeout)
        with self._lock, _unwound_on_sigterm():
            start = time.perf_counter()
            prepared = self.prepare(image, video)
            latents = self.sample(prepared)
            name = f"{datetime.now():%Y%m%d_%H%M%S}_{_stem(image, 'image')}_{_stem(video, 'video')}"
            result = self.write(prepared, latents, video, result_folder(Path(out), name))
            result.timings["total"] = time.perf_counter() - start
        return result

    def animate_into(self, image, video, folder: str | Path, *, stream: bool = False,
                     on_frame: Callable[[], None] | None = None,
                     stall_timeout: float = STALL_SECONDS) -> AnimateResult:
        """`animate` on the segmented path (the config's `segment`; 0: the whole clip at once), writing
        cropped.mp4 and full_resolution.mp4 into `folder` itself (a server's job folder). `on_frame()` is called
        after each frame is handed to the writers; an exception it raises stops the run (with `stream` the
        videos then keep the frames written so far, as on any failure)."""
        return self._animate_segmented(image, video, None, stream, stall_timeout, Path(folder), on_frame)

    def _animate_segmented(self, image, video, out, progressive: bool, stall_timeout: float,
                           folder: Path | None = None, on_frame: Callable[[], None] | None = None) -> AnimateResult:
        live = video == STDIN or is_url(video)
        with self._lock, _unwound_on_sigterm():
            start, busy = time.perf_counter(), BusyTimes()
            with self._streamed_video(image, video, stall_timeout) as (made, source, opened, driving):
                # the seconds the writing waited for frames: sampling and decoding, preprocessing a chunk ahead
                crops = busy.items("busy_sample_decode", _crops(made))
                paste_back = PasteBack(source.original_image, source.crop_box)
                name = (f"{datetime.now():%Y%m%d_%H%M%S}_{_stem(image, 'image')}_"
                        f"{'stream' if live else _stem(video, 'video')}")
                folder = folder or result_folder(Path(out), name)
                tic = time.perf_counter()
                written = self._write(folder, crops, paste_back, opened.fps, opened.audio, busy,
                                      progressive=progressive, total=None, on_frame=on_frame)
            # decode_encode is wall time; busy_* the seconds each of its threads worked
            timings = dict(preprocess_source=tic - start, decode_encode=time.perf_counter() - tic, **busy.seconds)
            timings["total"] = time.perf_counter() - start
        return AnimateResult(folder / "cropped.mp4", folder / "full_resolution.mp4", written, opened.fps,
                             len(driving.missing_face_frames), timings)

    def write(self, prepared: Prepared, latents: torch.Tensor, video: Path, folder: Path,
              on_frame: Callable[[], None] | None = None) -> AnimateResult:
        """Decode `latents` and write folder/cropped.mp4 and folder/full_resolution.mp4 (with the audio of the
        driving `video`). `on_frame()` is called after each frame is handed to the writers (an exception it
        raises stops the writing and removes the partial files)."""
        tic, busy = time.perf_counter(), BusyTimes()
        paste_back = PasteBack(prepared.source.original_image, prepared.source.crop_box)
        self._write(folder, self._decoded(prepared, latents, busy), paste_back, prepared.video.fps, video, busy,
                    progressive=False, total=prepared.num_frames, on_frame=on_frame)
        # decode_encode is wall time; busy_* the seconds each of its threads worked
        timings = dict(prepared.timings, decode_encode=time.perf_counter() - tic, **busy.seconds)
        return AnimateResult(folder / "cropped.mp4", folder / "full_resolution.mp4", prepared.num_frames,
                             prepared.video.fps, prepared.missing_face_frames, timings)

    def _write(self, folder: Path, crops: Iterator[np.ndarray], paste_back: PasteBack, fps, audio, busy: BusyTimes,
               *, progressive: bool, total: int | None, on_frame: Callable[[], None] | None = None) -> int:
        """Both output videos from the generated crops: each pasted and encoded on its own thread (the encoder
        releases the GIL). Returns the frames written; `busy` gets the seconds each thread worked."""
        from tqdm import tqdm

        depth, written = 2 * self.config.decode_chunk, 0
        cropped, full = folder / "cropped.mp4", folder / "full_resolution.mp4"

        def write_full(frame):
            full_out.write(paste_back(frame))

        try:
            folder.mkdir(parents=True, exist_ok=True)
            preset = self.config.video_preset
            with VideoWriter(cropped, fps, audio_from=audio, preset=preset, progressive=progressive) as crop_out, \
                    VideoWriter(full, fps, audio_from=audio, preset=preset, progressive=progressive) as full_out, \
                    consumed_in_background(busy.calls("busy_write_cropped", crop_out.write), depth,
                                           "hyportrait-crop-video") as to_crop, \
                    consumed_in_background(busy.calls("busy_write_full", write_full), depth,
                                           "hyportrait-full-video") as to_full, \
                    tqdm(total=total, desc="decode+encode", unit="frame", disable=not self.progress) as bar:
                for frame in crops:
                    to_crop(frame)
                    to_full(frame)
                    written += 1
                    bar.update(1)
                    if on_frame is not None:
                        on_frame()
        except OSError as exc:
            raise InputError(f"cannot write the output videos under {folder}: {describe(exc)}") from None
        finally:
            try:
                closed(crops)  # stopped early (a failure, an interrupt): the decoding thread stops now
            finally:
                # the writers removed their partial files; leave no empty result folder behind either
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        return written
