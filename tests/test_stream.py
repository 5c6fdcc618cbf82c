"""Segmented sampling and streaming (issue 15) on tiny random networks: the window plan and the seam, the whole clip
through the segment loop bit for bit, memory bounded by the segment, and the streaming API and CLI with sources
that end, fail, stall, or a consumer that stops, and the audio of pipes and URLs in the streamed outputs."""
import dataclasses
import functools
import gc
import http.server
import io
import itertools
import os
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from hyportrait.cli import main as cli
from hyportrait.errors import InputError, OptionError, ServeError, SourceStalledError, VideoError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.api import Animator
from hyportrait.runtime.pipeline import (
    AnimateConfig,
    build_conditioning,
    decode_frames,
    decode_segments,
    sample_latents,
    sample_segments,
)
from hyportrait.runtime.sampling import karras_sigmas, sample_euler_windows, sample_lcm_windows
from hyportrait.runtime.video import VideoWriter, open_live, probe_video, read_frames
from hyportrait.runtime.windows import pad_motion_tokens, padded_motion, segment_window_indices
from hyportrait.serve.jobs import parse_options
from hyportrait.serve.options import Limits

# a 4-frame window with one frame of overlap: segments of 4 frames take 3 new ones each; one guidance branch (the
# segment logic does not depend on it) keeps the UNet calls cheap
TINY = {"size": 64, "window": 4, "overlap": 1, "num_steps": 1, "pad_frames": 1, "decode_chunk": 3,
        "guidance_branches": 1}


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def animator(models):
    return Animator(models, segment=4, max_frames=7, **TINY)


@pytest.fixture(scope="module")
def sample_frames():
    return list(read_frames(SAMPLE_VIDEO))


def conditioning(models, config, motion):
    generator = torch.Generator().manual_seed(config.seed)
    gen = torch.Generator().manual_seed(0)
    cond = build_conditioning(models, config, ref_image=torch.rand(3, 64, 64, generator=gen) * 2 - 1,
                              dino_image=torch.randn(3, 224, 224, generator=gen), id_embedding=torch.zeros(512),
                              motion=motion, generator=generator)
    return cond, generator


def token_chunks(frames: int, chunk: int = 2, pulled: list | None = None):
    gen = torch.Generator().manual_seed(1)
    for start in range(0, frames, chunk):
        if pulled is not None:
            pulled.append(min(chunk, frames - start))
        yield torch.randn(min(chunk, frames - start), 64, 1024, generator=gen)


# -- the plan and the seam -------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [4, 5, 9, 25, 47, 50])
def test_segment_windows_are_full_inside_the_segment_and_cover_it(length):
    for shift in range(0, 25, 3):
        window = 4 if length < 25 else 25
        plan = segment_window_indices(length, window, 1 if window == 4 else 3, shift % window)
        assert all(w == list(range(w[0], w[0] + window)) for w in plan)  # contiguous: no wrap-around
        assert all(0 <= w[0] and w[-1] < length for w in plan)
        assert set(itertools.chain(*plan)) == set(range(length))
        assert len({w[0] for w in plan}) == len(plan)
    # the windows move with the shift, as the whole clip's do
    assert segment_window_indices(47, 25, 3, 0) == [list(range(25)), list(range(22, 47))]
    assert [w[0] for w in segment_window_indices(47, 25, 3, 6)] == [0, 16, 22]
    # shorter than a window: the circular plan is the only way to fill one
    assert segment_window_indices(3, 4, 1) == [[0, 1, 2, 0]]


def test_padded_motion_from_chunks_is_the_padded_clip():
    tokens = torch.randn(7, 2, 3)
    chunks = [tokens[:3], tokens[3:4], tokens[4:]]
    blocks = list(padded_motion(chunks, 2))
    assert torch.equal(torch.cat([b for b, _ in blocks]), pad_motion_tokens(tokens, 2))
    assert [(len(b), real) for b, real in blocks] == [(2, False), (3, True), (1, True), (3, True), (2, False)]
    assert list(padded_motion([], 2)) == []


@pytest.mark.parametrize("sampler", ["euler", "lcm"])
def test_the_context_frames_are_pinned_at_every_step_and_windows_never_wrap(sampler):
    sigmas = karras_sigmas(3)
    seen = []

    def denoise(x, step, index):  # a smooth stand-in for the guided UNet: any v works for the sampler's logic
        seen.append((step, index.tolist(), x.clone()))
        return 0.5 * x + 0.01 * index[:, None, None, None]

    context, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    x = torch.randn(9, 4, 2, 2)
    options = {"window": 4, "overlap": 1, "shift_offset": 1, "context": (context, noise), "circular": False}
    if sampler == "lcm":
        sample_lcm_windows(denoise, x, sigmas, torch.Generator().manual_seed(0), **options)
    else:
        sample_euler_windows(denoise, x, sigmas, **options)
    for step, index, xw in seen:
        assert index == list(range(index[0], index[0] + 4))
        for position, frame in enumerate(index):
            if frame < 2:
                torch.testing.assert_close(xw[position], context[frame] + noise[frame] * sigmas[step])
    assert {index[0] for _, index, _ in seen} >= {0, 5}


# -- the segment loop ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "lcm"])
def test_segment_zero_is_the_whole_clip_bit_for_bit(models, sampler):
    config = AnimateConfig(precision="fp32", device="cpu", sampler=sampler, **TINY)
    motion = torch.cat(list(token_chunks(5)))
    cond, generator = conditioning(models, config, motion)
    whole = sample_latents(models, cond, config, generator)
    expected = list(decode_frames(models, whole, config, cond.num_pad))
    cond, generator = conditioning(models, config, None)
    segments = list(sample_segments(models, cond, config, generator, token_chunks(5)))
    assert len(segments) == 1 and torch.equal(segments[0][0], whole)
    frames = list(decode_segments(models, segments, config))
    assert len(frames) == 5 and all(np.array_equal(a, b) for a, b in zip(frames, expected))


def test_segments_cover_the_clip_once_and_pull_motion_as_needed(models):
    config = AnimateConfig(precision="fp32", device="cpu", segment=5, **TINY)
    cond, generator = conditioning(models, config, None)
    pulled = []
    sizes, real = [], []
    for latents, mask in sample_segments(models, cond, config, generator, token_chunks(9, 2, pulled)):
        sizes.append(len(latents))
        real += mask.tolist()
        # at most the next segment's new frames and one chunk are read ahead of what was sampled
        assert sum(pulled) + config.pad_frames <= sum(sizes) + (config.segment - config.overlap) + 2
    # the first segment 5 frames, then 4 new ones after 1 of context; the last short one reaches back further
    assert sizes == [5, 4, 2] and real == [False] + [True] * 9 + [False]


def counting_frames(models, seen: list):
    """`models` with the frame count of every UNet call appended to `seen`."""
    def unet(**inputs):
        seen.append(inputs["sample"].shape[1])
        return models.unet(**inputs)

    return dataclasses.replace(models, unet=unet)


def test_a_short_first_segment_is_one_window_of_its_own_length(models):
    config = AnimateConfig(precision="fp32", device="cpu", sampler="lcm", segment=4, first_segment=2, **TINY)
    cond, generator = conditioning(models, config, None)
    seen = []
    segments = list(sample_segments(counting_frames(models, seen), cond, config, generator, token_chunks(7)))
    # 9 latents (a pad frame each side): 2 in the first segment's own 2-frame window (not 4 with repeats), then
    # 3 new after 1 of context, 3, and the short last one reaching back to fill a window
    assert [len(latents) for latents, _ in segments] == [2, 3, 3, 1] and seen == [2, 4, 4, 4]
    assert torch.cat([real for _, real in segments]).tolist() == [False] + [True] * 7 + [False]
    # the first segment is sampled as a 2-frame clip would be with 2-frame windows, bit for bit
    alone = dataclasses.replace(config, window=2, segment=0)
    tokens = pad_motion_tokens(torch.cat(list(token_chunks(7))), config.pad_frames)[:2]
    cond, generator = conditioning(models, alone, None)
    expected = sample_latents(models, dataclasses.replace(cond, motion=tokens), alone, generator, circular=False)
    assert torch.equal(segments[0][0], expected)
    # a first segment shorter than the overlap: the next takes the context there is and still fills its window
    short = dataclasses.replace(config, overlap=2, first_segment=1)
    cond, generator = conditioning(models, short, None)
    lengths = [len(latents) for latents, _ in sample_segments(models, cond, short, generator, token_chunks(7))]
    assert lengths == [1, 3, 2, 2, 1]


def test_a_first_segment_streams_the_frames_the_file_path_gives(models, sample_frames):
    animator = Animator(models, mode="fast", segment=4, first_segment=2, max_frames=5, **TINY)
    streamed = list(animator.stream(SAMPLE_IMAGE, sample_frames))
    assert [f.index for f in streamed] == list(range(5))
    assert [f.time for f in streamed] == pytest.approx([i / 25 for i in range(5)])
    from_file = list(animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO))
    assert len(from_file) == 5 and all(np.array_equal(f.cropped, g) for f, g in zip(streamed, from_file))


def test_the_first_frame_needs_only_the_first_segments_driving_frames(models, sample_frames):
    # a live source: 2 frames, then nothing until the first output frame is out. The first segment (3 frames, 1 pad)
    # holds 2 real frames; its motion chunk is those 2, not a window's 4, so the frame comes while the source waits
    animator = Animator(models, mode="fast", segment=4, first_segment=3, max_frames=6, **TINY)
    assert animator.config.first_chunk_frames == 2
    released = threading.Event()

    def live():
        yield from sample_frames[:2]
        if not released.wait(60):
            raise AssertionError("the stream waited for more driving frames before its first frame")
        yield from sample_frames[2:6]

    stream = animator.stream(SAMPLE_IMAGE, live())
    first = next(stream)
    released.set()
    streamed = [first, *stream]
    from_file = list(animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO))
    assert len(streamed) == 6 and all(np.array_equal(f.cropped, g) for f, g in zip(streamed, from_file))
    # a segment of one window starts after its real frames too; the whole clip keeps the official chunks, also
    # in `prepare` (whose tokens feed the whole clip whatever the segment)
    one_window = AnimateConfig(segment=25, first_segment=25)
    assert AnimateConfig(segment=25).first_chunk_frames == one_window.first_chunk_frames == 10
    assert AnimateConfig(segment=0, first_segment=16).first_chunk_frames == 25
    seen = []

    def motion(**inputs):
        seen.append(len(inputs["face_images"]))
        return models.motion(**inputs)

    animator.models = dataclasses.replace(models, motion=motion)
    animator.prepare(SAMPLE_IMAGE, SAMPLE_VIDEO)
    assert seen == [4, 2]


def test_first_segment_options_are_checked(models, tmp_path, capsys):
    with pytest.raises(OptionError, match="first_segment must be between 0 and"):
        AnimateConfig(first_segment=-1)
    # the whole clip at once has no first segment: one asked for is refused, fast mode's default is not
    with pytest.raises(OptionError, match="first_segment applies to segmented sampling"):
        Animator(models, **TINY).with_options(first_segment=2)
    assert Animator(models, mode="fast", segment=0, **TINY).config.first_segment == 16
    assert Animator(models, **TINY).with_options(segment=4, first_segment=2).config.first_segment == 2
    # a first segment from creation goes unused, not refused, in a view without segments
    assert Animator(models, mode="fast", first_segment=2, **TINY).with_options(segment=0).config.segment == 0
    # an exported UNet runs a fixed window: the fast default falls back to it, one asked for is refused
    fixed = dataclasses.replace(models, window=25)
    assert Animator(fixed, mode="fast").config.first_segment == 0
    with pytest.raises(OptionError, match="first_segment must be 0 or at least 25: these models' UNet runs 25"):
        Animator(fixed, mode="fast", first_segment=8)
    # a quality-mode Animator (a service's) switched to fast mode: the mode's first segment falls back, one asked
    # for is refused, also where it is fast mode's default (a service's job gives the mode and what it asked)
    quality = Animator(fixed)
    fast = quality.with_options(mode="fast")
    assert (fast.config.sampler, fast.config.segment, fast.config.first_segment_frames) == ("lcm", 25, 25)
    mode, settings, _ = parse_options('{"mode": "fast"}', Limits(), "quality")
    assert quality.with_options(mode, **settings).config == fast.config
    mode, settings, _ = parse_options('{"mode": "fast", "stream": true, "first_segment": 16}', Limits(), "quality")
    with pytest.raises(OptionError, match="first_segment must be 0 or at least 25") as refused:
        quality.with_options(mode, **settings)
    assert refused.value.option == "first_segment"
    assert fast.with_options(mode="quality").config == quality.config
    # the command names its flags, before any network is built
    for flags, message in ((["--first-segment", "8"], "--first-segment applies to segmented sampling"),
                           (["--mode", "fast", "--first-segment", "-1"], "--first-segment must be between 0"),
                           (["--pad-frames", "-1"], "--pad-frames must be between 0 and 1000")):
        assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO), "--out", str(tmp_path),
                    *flags, *CLI_TINY]) == 2
        assert message in capsys.readouterr().err
    # a service's job: streamed only, like segment
    assert parse_options('{"stream": true, "first_segment": 8}', Limits(), "fast")[1]["first_segment"] == 8
    with pytest.raises(ServeError, match="option first_segment applies to streamed jobs"):
        parse_options('{"first_segment": 8}', Limits(), "fast")


def live_tensor_bytes() -> int:
    """Bytes of the CPU tensor storages that Python objects hold (views counted once). One pass over the
    collector's 450 000 objects: a comprehension, in about 60 % of a loop's time."""
    kinds = {torch.Tensor, torch.nn.Parameter}
    storages = {s.data_ptr(): s.nbytes() for s in (o.untyped_storage() for o in gc.get_objects()
                                                     if type(o) in kinds and o.layout == torch.strided)}
    return sum(storages.values())


def test_memory_is_bounded_by_the_segment_not_the_clip(models):
    """Tensor bytes alive at every segment: flat in the clip's length for segments, growing for the whole clip."""
    def peak(frames: int, segment: int) -> int:
        config = AnimateConfig(precision="fp32", device="cpu", segment=segment, **TINY)
        cond, generator = conditioning(models, config, None)
        base, high = live_tensor_bytes(), [0]

        def measured(segments):
            for part in segments:
                yield part
                high[0] = max(high[0], live_tensor_bytes() - base)  # the segment decoded, the next not begun

        segments = sample_segments(models, cond, config, generator, token_chunks(frames, 3))
        assert sum(1 for _ in decode_segments(models, measured(segments), config)) == frames
        return high[0]

    short, long = peak(9, 4), peak(18, 4)
    assert long <= short * 1.05, (short, long)
    # the whole clip holds every frame's motion tokens (256 KB each), and more
    assert peak(18, 0) > 1.5 * peak(9, 0)


# -- the streaming API -----------------------------------------------------------------------------------------

def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hyportrait-prefetch"]


def test_stream_yields_timed_pasted_frames_reading_the_source_as_needed(animator, sample_frames):
    first_out = threading.Event()

    def source():  # one chunk (4 frames), then nothing until the first output frame is out
        for index, frame in enumerate(sample_frames):
            if index == 4:
                first_out.wait(20)
            yield frame, 0.5 + index / 10

    out = []
    for frame in animator.stream(SAMPLE_IMAGE, source(), stall_timeout=10):
        first_out.set()
        out.append(frame)
    with Image.open(SAMPLE_IMAGE) as image:
        assert out[0].full.shape == (image.height, image.width, 3) and out[0].cropped.shape == (64, 64, 3)
    assert [f.index for f in out] == list(range(7))  # max_frames 7
    assert [f.time for f in out] == pytest.approx([0.5 + i / 10 for i in range(7)])
    assert not prefetch_threads()


@pytest.mark.parametrize("failing", ["open", "frame 2"])
def test_a_run_that_fails_closes_its_source(animator, monkeypatch, tmp_path, failing):
    """The output cannot be opened (no driving frame read yet), or fails at its second frame: the run closes its
    source, instead of leaving it open until its generator is collected (the error's traceback holds the
    run's frames, and the CLI's or a service's error path keeps it a while). A pipe or a URL would stay
    connected; a file keeps its descriptor."""
    from hyportrait.runtime import api

    class DiskFull(VideoWriter):
        def __init__(self, *args, **kwargs):
            if failing == "open":
                raise OSError(28, "No space left on device")
            super().__init__(*args, **kwargs)

        def write(self, frame):
            if self.frames_written == 1:
                raise OSError(28, "No space left on device")
            super().write(frame)

    def open_sample() -> list:
        return [fd for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(SAMPLE_VIDEO.resolve())]

    monkeypatch.setattr(api, "VideoWriter", DiskFull)
    gc.collect()  # an earlier test's reader left to the collector must not close during the run
    before = open_sample()  # the module's other readers of the sample
    with pytest.raises(InputError, match="cannot write the output videos.*No space left") as failed:
        animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path)
    assert failed.value.__traceback__ is not None and open_sample() == before


def test_a_consumer_that_stops_stops_the_producer(animator, sample_frames):
    pulled = []

    def endless():
        for frame in itertools.cycle(sample_frames):
            pulled.append(1)
            yield frame

    stream = animator.stream(SAMPLE_IMAGE, endless())
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10  # the producer ends at its next chunk (slow on a loaded machine)
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()
    count = len(pulled)
    time.sleep(0.2)
    assert len(pulled) == count <= 20
    assert animator._lock.acquire(blocking=False)  # the Animator is free again
    animator._lock.release()


def test_a_stalled_source_raises_a_coded_error_and_its_thread_ends(animator, sample_frames):
    resume = threading.Event()

    def stalling():
        yield from sample_frames[:2]
        resume.wait(20)  # a camera that stops sending
        yield from sample_frames[2:]

    tic = time.perf_counter()
    with pytest.raises(SourceStalledError, match="no frame for 0.3 s") as caught:
        list(animator.stream(SAMPLE_IMAGE, stalling(), stall_timeout=0.3))
    assert caught.value.code == "source_stalled" and time.perf_counter() - tic < 10
    resume.set()  # the read returns: the producer sees it was stopped and ends (its worker goes idle)
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()


def test_a_source_that_fails_ends_the_stream_after_the_frames_made(animator, sample_frames):
    def failing():
        yield from sample_frames[:6]
        raise ConnectionError("camera gone")

    made = []
    with pytest.raises(ConnectionError):
        for frame in animator.stream(SAMPLE_IMAGE, failing()):
            made.append(frame.index)
    assert made == list(range(len(made))) and 0 < len(made) <= 6
    assert not prefetch_threads()


# -- the command -----------------------------------------------------------------------------------------------

def test_progressive_writer_keeps_its_frames_when_the_block_fails(tmp_path, sample_frames):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError), VideoWriter(path, 24, progressive=True) as out:
        for frame in sample_frames[:5]:
            out.write(frame)
        raise RuntimeError("the source failed")
    assert probe_video(path).num_frames == 5 and b"moof" in path.read_bytes()
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "empty.mp4", 24, progressive=True):
        raise RuntimeError("before any frame")
    assert not (tmp_path / "empty.mp4").exists()


def remuxed(path, frames: int | None = None, container: str = "matroska", kinds=("video", "audio")) -> bytes:
    """The sample remuxed to Matroska (or `container`: streamable from a pipe), its streams of `kinds`, cut after
    `frames` video packets mid-packet."""
    buffer = io.BytesIO()
    with av.open(str(path)) as src, av.open(buffer, "w", format=container) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams if s.type in kinds}
        for packet in src.demux():
            if packet.dts is not None and packet.stream.index in streams:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    data = buffer.getvalue()
    return data if frames is None else data[: int(len(data) * frames / 36)]


def outputs(folder: Path) -> list[Path]:
    (result,) = folder.iterdir()
    return [result / "cropped.mp4", result / "full_resolution.mp4"]


CLI_TINY = ["--steps", "1", "--overlap", "1", "--decode-chunk", "3", "--quiet"]


@pytest.fixture
def tiny_cli(monkeypatch):
    # the command's random model at the tests' tiny size, through the Animator options the CLI does not set
    original = Animator.__init__
    monkeypatch.setattr(Animator, "__init__", lambda self, *a, **kw: original(
        self, *a, **{**kw, "size": 64, "window": 4, "pad_frames": 1}))


def test_cli_stream_writes_fragmented_mp4_with_audio(tmp_path, tiny_cli):
    assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO), "--out", str(tmp_path),
                "--mode", "fast", "--stream", "--max-frames", "6", *CLI_TINY]) == 0
    for path in outputs(tmp_path):
        info = probe_video(path)
        assert info.num_frames == 6 and info.has_audio and b"moof" in path.read_bytes()


def test_cli_stream_from_a_pipe_cut_mid_stream_keeps_every_frame_made(tmp_path, tiny_cli, monkeypatch, capsys):
    data = remuxed(SAMPLE_VIDEO, frames=9)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", "-", "--out", str(tmp_path), "--stream",
                "--mode", "fast", *CLI_TINY]) == 0
    frames = [probe_video(path).num_frames for path in outputs(tmp_path)]
    assert 0 < frames[0] == frames[1] < 36
    assert len(list(read_frames(outputs(tmp_path)[0]))) == frames[0]  # every frame plays
    assert outputs(tmp_path)[0].parent.name.endswith("_stream")
    for path in outputs(tmp_path):  # the audio demuxed with the frames, as far as they go
        assert_audio_follows_the_video(path, frames[0], "aac")


def fragment_ends(data: bytes) -> list[int]:
    """The byte offsets at which a fragmented MP4's fragments end (each `moof` box but the first starts one)."""
    offsets, offset = [], 0
    while offset + 8 <= len(data):
        if data[offset + 4:offset + 8] == b"moof":
            offsets.append(offset)
        offset += int.from_bytes(data[offset:offset + 4], "big")
    return offsets[1:] + [len(data)]


def assert_audio_follows_the_video(path: Path, frames: int, codec: str):
    """`path` (`frames` at the sample's 24 fps) has `codec` audio from about 0 to about its end (AAC frames are
    43 ms at the sample's 24 kHz), and the file as a player sees it while it is written (cut after any fragment)
    plays sound as long as its video."""
    data = path.read_bytes()
    for cut in fragment_ends(data):
        with av.open(io.BytesIO(data[:cut])) as container:
            (audio,) = container.streams.audio
            assert audio.codec_context.name == codec
            sound, shown = [], 0
            for p in container.demux():
                if p.size and p.stream.type == "audio":
                    sound.append((float(p.pts * p.time_base), float((p.pts + p.duration) * p.time_base)))
                shown += p.size > 0 and p.stream.type == "video"
        sound.sort()
        assert abs(sound[0][0]) < 0.05 and abs(sound[-1][1] - shown / 24) < 0.25, (cut, sound[0], sound[-1], shown)
    assert shown == frames and abs(sound[-1][1] - frames / 24) < 0.1


def test_cli_stream_from_an_mpegts_pipe_carries_its_audio_in_sync(tmp_path, tiny_cli, monkeypatch):
    # MPEG-TS: timestamps that do not start at 0, and ADTS AAC (which MP4 cannot copy: re-encoded)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(remuxed(SAMPLE_VIDEO, container="mpegts"))))
    assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", "-", "--out", str(tmp_path), "--stream",
                "--mode", "fast", "--max-frames", "12", *CLI_TINY]) == 0
    for path in outputs(tmp_path):
        assert_audio_follows_the_video(path, 12, "aac")


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on a free local port serving `tmp_path/www`; yields its URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", root
    server.shutdown()
    thread.join(5)
    server.server_close()


def test_cli_stream_from_a_url_carries_its_audio(tmp_path, tiny_cli, http_server):
    url, root = http_server
    (root / "clip.mkv").write_bytes(remuxed(SAMPLE_VIDEO))
    out = tmp_path / "out"
    assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", f"{url}/clip.mkv", "--out", str(out),
                "--stream", "--mode", "fast", "--max-frames", "12", *CLI_TINY]) == 0
    for path in outputs(out):
        assert_audio_follows_the_video(path, 12, "aac")  # copied
    with av.open(str(SAMPLE_VIDEO)) as src, av.open(str(outputs(out)[0])) as dst:
        first = [bytes(p) for p, _ in zip(src.demux(src.streams.audio[0]), range(3))]
        assert [bytes(p) for p, _ in zip(dst.demux(dst.streams.audio[0]), range(3))] == first


def test_a_silent_pipe_gives_silent_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(remuxed(SAMPLE_VIDEO, kinds=("video",)))))
    live = open_live("-")
    assert live.audio is None
    with VideoWriter(tmp_path / "out.mp4", live.fps, audio_from=live.audio, progressive=True) as out:
        for frame, _ in live.frames:
            out.write(frame)
    info = probe_video(tmp_path / "out.mp4")
    assert info.num_frames == 36 and not info.has_audio


def test_a_pipe_is_checked_as_a_file_is(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SAMPLE_IMAGE.read_bytes())))
    with pytest.raises(VideoError, match=r"stdin is an image \(\w+_pipe\), not a video"):
        open_live("-")


def test_cli_segment_shorter_than_a_window_is_a_coded_error(tmp_path, capsys):
    assert cli(["animate", "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO), "--out", str(tmp_path),
                "--segment", "3", *CLI_TINY]) == 2
    err = capsys.readouterr().err
    assert "hyportrait: error [" in err and "segment must be 0 (the whole clip) or at least the window" in err
