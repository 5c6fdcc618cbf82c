"""Video in and out with PyAV: probe, streamed RGB frames, and an H.264 writer that carries the
driving video's audio.

Frames are RGB uint8 (H, W, 3) numpy arrays on both sides and are streamed one at a time, so long
clips never sit in memory. Rotation metadata is ignored: frames come out as stored.
"""

from __future__ import annotations

import inspect
import io
import os
import secrets
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from hyportrait.errors import VideoError, describe

# FFmpeg opens still images (png_pipe, jpeg_pipe, ..., image2) as one-frame videos; refuse them.
_IMAGE_DEMUXER_SUFFIX = "_pipe"
_IMAGE_DEMUXERS = {"image2"}
# Well above 8K UHD (7680x4320): a header claiming more is damaged or hostile (a decompression bomb).
MAX_FRAME_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: Fraction  # exact rational rate as stored, e.g. 30000/1001
    num_frames: int  # from the container header, else counted packets (MKV/WebM), else duration * fps
    has_audio: bool
    duration: float  # seconds


def _name(source) -> str:
    return "video (bytes)" if isinstance(source, (bytes, bytearray)) else str(source)


def _open_file(source, what: str = "video") -> av.container.InputContainer:
    """`source` (a path, or a whole encoded file as bytes) opened for reading; missing or unreadable files are
    VideoErrors naming it, without FFmpeg's errno numbers."""
    if isinstance(source, (bytes, bytearray)):
        file = io.BytesIO(source)  # bytes are read where they are: no temporary file to leave behind
    else:
        path = Path(source)
        if not path.exists():
            raise VideoError(f"{what} not found: {path}")
        if not path.is_file():
            raise VideoError(f"{what} is not a file: {path}")
        file = str(path)
    try:
        return av.open(file)
    except av.FFmpegError as e:
        raise VideoError(f"cannot read {what} {_name(source)}: not a video file or it is damaged "
                         f"({describe(e)})") from None
    except OSError as e:
        raise VideoError(f"cannot read {what} {_name(source)}: {describe(e)}") from None


def _open_input(source) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open `source` for decoding its first video stream; every failure becomes a VideoError naming it."""
    container = _open_file(source)
    return container, _video_stream(container, _name(source))


def _video_stream(container: av.container.InputContainer, name: str) -> av.video.stream.VideoStream:
    """The first video stream of an opened source, set up for decoding; a source that is an image, has no video
    or too large frames is closed and refused with a VideoError naming it."""
    fmt = container.format.name
    if fmt.endswith(_IMAGE_DEMUXER_SUFFIX) or fmt in _IMAGE_DEMUXERS:
        container.close()
        raise VideoError(f"{name} is an image ({fmt}), not a video")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{name} has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > MAX_FRAME_PIXELS:
        container.close()
        raise VideoError(f"{name} has {width}x{height} frames, more than the {MAX_FRAME_PIXELS} pixels per frame "
                         "accepted (a damaged header, or a video far larger than the 512 px crops need)")
    stream.thread_type = "AUTO"  # frame + slice threads: several times faster decode on multi-core
    return stream


def _decode(container, stream, name) -> Iterator[av.VideoFrame]:
    try:
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode {name}: {describe(e)}") from None


def _tagged_seconds(tag: str | None) -> float | None:
    """Seconds of a Matroska "HH:MM:SS.nnnnnnnnn" DURATION tag, the per-stream length that MKV/WebM keep."""
    try:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except (AttributeError, ValueError):
        return None


def _count_packets(container, stream) -> int:
    """Video packets (one per frame) from a demux pass without decoding; 0 when the file cannot seek back."""
    try:
        container.seek(0)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError:
        return 0


def probe_video(path) -> VideoInfo:
    """Size, frame rate, length and audio presence of a video (a path or encoded bytes); decodes its first frame
    to prove it plays."""
    container, stream = _open_input(path)
    name = _name(path)
    with container:
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not fps:
            raise VideoError(f"{name} has no frame rate")
        fps = Fraction(fps)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif (tagged := _tagged_seconds(stream.metadata.get("DURATION"))) is not None:
            duration = tagged
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        first = next(_decode(container, stream, name), None)
        if first is None:
            raise VideoError(f"{name} has a video stream but no decodable frames")
        num_frames = stream.frames or _count_packets(container, stream) or round(duration * fps)
        if duration == 0.0:
            duration = float(num_frames / fps)
        return VideoInfo(
            width=first.width,
            height=first.height,
            fps=fps,
            num_frames=max(num_frames, 1),
            has_audio=bool(container.streams.audio),
            duration=duration,
        )


def read_frames(path, limit: int | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 (H, W, 3) frames of the first video stream of `path` (or encoded bytes), one at a time, at most
    `limit` of them.

    The file is opened and checked at call time (missing, not a video, no video stream raise here);
    a video without a single decodable frame raises when iteration ends.
    """
    container, stream = _open_input(path)
    return _iter_rgb(container, stream, _name(path), limit)


def _iter_rgb(container, stream, name, limit) -> Iterator[np.ndarray]:
    count = 0
    with container:
        if limit is not None and limit <= 0:
            return
        for frame in _decode(container, stream, name):
            yield frame.to_ndarray(format="rgb24")
            count += 1
            if count == limit:
                return
    if count == 0:
        raise VideoError(f"{name} has a video stream but no decodable frames")


STDIN = "-"


def is_url(source) -> bool:
    return isinstance(source, str) and "://" in source


class AudioTap:
    """The audio of a pipe or URL, demuxed from the same container as its video frames (a pipe cannot be opened
    twice): the frame reader hands over each audio packet it meets, and every subscriber (a `VideoWriter`'s
    audio) takes its own copy in stream order when its video has caught up with it.

    Packets whose codec MP4 takes (AAC, MP3, Opus, ...) are kept as they are, to be copied; others are decoded
    here, once, to be encoded to AAC by each subscriber. Times are the source's seconds; `origin` (the first
    video frame's, set by the reader) is the outputs' zero.
    """

    def __init__(self, stream: av.audio.stream.AudioStream):
        # the reader closes the source when it ends, maybe before a writer adds its audio stream: the codec's
        # parameters are kept in a stream of an in-memory container of the tap's own, never written
        self._holder = av.open(io.BytesIO(), "w", format="matroska")
        self.stream = self._holder.add_stream_from_template(stream)
        self.copy = _can_copy(self.stream, "mp4")
        self.origin: float | None = None
        self._queues: list[deque] = []
        self._lock = threading.Lock()

    def subscribe(self) -> deque:
        """A queue of (start s, stop s, `_AudioPacket` or `_AudioSamples`) of every packet put from now on."""
        queue: deque = deque()
        with self._lock:
            self._queues.append(queue)
        return queue

    def put(self, packet: av.Packet) -> None:
        """Called by the reader for each audio packet (an empty one at the end flushes the decoder)."""
        if not self._queues:  # nothing writes this source's audio (e.g. `Animator.frames`)
            return
        if self.copy:
            ts = packet.pts if packet.pts is not None else packet.dts
            if not packet.size or ts is None:
                return
            start = float(ts * packet.time_base)
            items = [(start, start + float((packet.duration or 0) * packet.time_base), _AudioPacket(
                bytes(packet), packet.pts, packet.dts, packet.duration, packet.time_base))]
        else:
            try:
                frames = packet.decode()
            except av.FFmpegError:
                return  # a damaged audio packet of a live source costs its samples, not the video
            items = [(start, start + frame.samples / frame.sample_rate, _AudioSamples(
                frame.to_ndarray(), frame.format.name, frame.layout.name, frame.sample_rate))
                for frame in frames if frame.pts is not None for start in [float(frame.pts * frame.time_base)]]
        with self._lock:
            for queue in self._queues:
                queue.extend(items)


@dataclass(frozen=True)
class _AudioPacket:
    """An audio packet's bytes and times, from which each subscriber makes its own packet (muxing consumes one)."""
    data: bytes
    pts: int | None
    dts: int | None
    duration: int
    time_base: Fraction

    def packet(self) -> av.Packet:
        packet = av.Packet(self.data)
        packet.pts, packet.dts, packet.duration, packet.time_base = self.pts, self.dts, self.duration, self.time_base
        return packet


@dataclass(frozen=True)
class _AudioSamples:
    """Decoded audio samples, from which each subscriber makes its own frame (encoding stamps it)."""
    samples: np.ndarray
    format: str
    layout: str
    rate: int

    def frame(self) -> av.AudioFrame:
        frame = av.AudioFrame.from_ndarray(self.samples, format=self.format, layout=self.layout)
        frame.sample_rate = self.rate
        return frame


@dataclass(frozen=True)
class LiveSource:
    """Driving frames read as they arrive: `frames` yields (RGB uint8 (H, W, 3), seconds since the first
    frame) pairs; `audio` is what the outputs' audio comes from: the file for a file, the `AudioTap` filled
    while `frames` is read for a pipe or a URL, None for a source without audio."""
    fps: Fraction
    frames: Iterator[tuple[np.ndarray, float]]
    audio: Path | str | bytes | AudioTap | None
    container: av.container.InputContainer

    def close(self) -> None:
        """Close the source now, whatever was read: a pipe's or URL's container would otherwise stay open until its
        generator is collected, which the error's traceback of a failed run delays. A generator closed before it
        started never runs its `with`, so its container is closed here; one being read on another thread (a
        stalled read) is left to end with its read."""
        state = inspect.getgeneratorstate(self.frames)
        try:
            self.frames.close()  # a suspended one runs its `with`: the container closes
        except ValueError:  # "generator already executing": the producer is in a read
            return
        if state == inspect.GEN_CREATED:
            self.container.close()


def open_live(source, limit: int | None = None) -> LiveSource:
    """A driving video read frame by frame as it arrives: a file, "-" (a container stream on stdin) or any
    URL FFmpeg opens (rtsp://, http://, udp://, ...).

    A pipe must carry a container that plays without seeking: Matroska/WebM, MPEG-TS, NUT or fragmented
    MP4 (e.g. `ffmpeg -i in.mp4 -f matroska -`); a plain MP4 needs its index, so it is refused as unreadable.
    A source that fails after its first frame (a pipe cut mid-packet, a camera gone) ends the stream there
    with a warning: what came before is used. The audio of a pipe or URL is demuxed with the frames (`AudioTap`).
    """
    if source == STDIN or is_url(source):
        name = "stdin" if source == STDIN else source
        try:
            container = av.open(sys.stdin.buffer if source == STDIN else source, "r")
        except av.FFmpegError as e:
            raise VideoError(f"cannot read {name}: not a video stream or it is damaged ({e})") from e
        stream = _video_stream(container, name)
        audio = AudioTap(container.streams.audio[0]) if container.streams.audio else None
    else:
        container, stream = _open_input(source)
        name, audio = _name(source), source if container.streams.audio else None  # bytes: not their repr
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
    tap = audio if isinstance(audio, AudioTap) else None
    return LiveSource(Fraction(fps), _timed_frames(container, stream, name, limit, Fraction(fps), tap), audio,
                      container)


def _demuxed_frames(container, stream, tap: AudioTap | None) -> Iterator[av.VideoFrame]:
    """The frames of `stream`; with a tap, the audio packets met on the way are handed to it."""
    if tap is None:
        yield from container.decode(stream)
        return
    for packet in container.demux(stream, container.streams.audio[0]):  # the tap's
        if packet.stream.index == stream.index:
            yield from packet.decode()
        else:
            tap.put(packet)


def _timed_frames(container, stream, name, limit, fps, tap=None) -> Iterator[tuple[np.ndarray, float]]:
    count, origin = 0, None
    with container:
        frames = _demuxed_frames(container, stream, tap)
        while limit is None or count < limit:
            try:
                frame = next(frames, None)
            except av.FFmpegError as e:
                if count == 0:
                    raise VideoError(f"cannot decode {name}: {e}") from e
                print(f"hyportrait: {name} failed after {count} frames ({e}); ending the stream there",
                      file=sys.stderr)
                return
            if frame is None:
                break
            seconds = frame.time if frame.time is not None else float(count / fps)
            if origin is None:
                origin = seconds
                if tap is not None:
                    tap.origin = seconds
            yield frame.to_ndarray(format="rgb24"), seconds - origin
            count += 1
    if count == 0:
        raise VideoError(f"{name} has a video stream but no decodable frames")


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: an odd width/height grows by one replicated edge column/row."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        return np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame


class _AudioCarry:
    """The first audio stream of a source file, or the audio of an `AudioTap`, fed into the output up to a
    given time.

    Packets are copied as they are when the output container takes the codec; otherwise they are
    decoded and re-encoded to AAC. Times are relative to the source's first video frame, so the
    sound stays in sync with a video generated from that source's frames.
    """

    def __init__(self, source):
        if isinstance(source, AudioTap):
            self.name, self.src, self.tap, self.in_stream = "the driving stream", None, source, source.stream
            self.queue = source.subscribe()
            return
        self.name, self.tap = _name(source), None
        self.src = _open_file(source, "audio source")
        self.in_stream = self.src.streams.audio[0] if self.src.streams.audio else None
        video = self.src.streams.video[0] if self.src.streams.video else None
        has_origin = video is not None and video.start_time is not None
        self._origin = float(video.start_time * video.time_base) if has_origin else 0.0

    @property
    def origin(self) -> float:
        """The source's seconds at its first video frame (a tap's is known once the first frame is read)."""
        return self._origin if self.tap is None else self.tap.origin or 0.0

    @property
    def present(self) -> bool:
        return self.in_stream is not None

    def attach(self, output: av.container.OutputContainer) -> None:
        """Add the audio stream to `output` (after its video stream, so video stays stream 0)."""
        self.output = output
        self.copy = self.tap.copy if self.tap else _can_copy(self.in_stream, output.format.name)
        if self.copy:
            self.out_stream = output.add_stream_from_template(self.in_stream)
        else:
            # the source's own layout may be an unordered "N channels" one, which the AAC encoder refuses
            layout = "mono" if self.in_stream.channels == 1 else "stereo"
            self.out_stream = output.add_stream("aac", rate=self.in_stream.rate, layout=layout)
            self.samples_out = 0
        self.items = self._tapped_items() if self.tap else self._timed_items()
        self.held = None  # the first item not muxed yet, read ahead to see its time

    def _tapped_items(self) -> Iterator[tuple[float, float, av.Packet | av.AudioFrame] | None]:
        """The tap's items as they come (None while it has none yet): own packets and frames, the outputs' times."""
        while True:
            if not self.queue:
                yield None
                continue
            start, stop, item = self.queue.popleft()
            made = item.packet() if isinstance(item, _AudioPacket) else item.frame()
            yield start - self.origin, stop - self.origin, made

    def _timed_items(self) -> Iterator[tuple[float, float, av.Packet | av.AudioFrame]]:
        """(start second, stop second, packet or frame) in stream order."""
        try:
            if self.copy:
                for packet in self.src.demux(self.in_stream):
                    ts = packet.pts if packet.pts is not None else packet.dts
                    if packet.size and ts is not None:
                        start = float(ts * packet.time_base) - self.origin
                        yield start, start + float((packet.duration or 0) * packet.time_base), packet
            else:
                for frame in self.src.decode(self.in_stream):
                    if frame.pts is not None:
                        start = float(frame.pts * frame.time_base) - self.origin
                        yield start, start + frame.samples / frame.sample_rate, frame
        except av.FFmpegError as e:
            raise VideoError(f"cannot read the audio of {self.name}: {describe(e)}") from None

    def feed_until(self, end: float, final: bool = False) -> None:
        """Mux the items that end by `end` seconds. With `final` (`end` is the video's end), also the
        ones that start before it, re-encoded audio cut exactly at `end`, and flush the encoder."""
        while True:
            if self.held is None:
                self.held = next(self.items, None)
                if self.held is None:  # the source's audio ended (or a tap has no more yet)
                    break
            start, stop, item = self.held
            if start >= end or (stop > end and not final):
                break
            self.held = None
            if self.copy:
                self._mux_packet(item)
            else:
                self._encode_frame(item, start, end if final else None)
        if final and not self.copy:
            for packet in self.out_stream.encode(None):
                self.output.mux(packet)

    def _mux_packet(self, packet: av.Packet) -> None:
        shift = round(self.origin / packet.time_base)
        if shift:
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts = None if packet.dts is None else packet.dts - shift
        packet.stream = self.out_stream
        self.output.mux(packet)

    def _encode_frame(self, frame: av.AudioFrame, start: float, end: float | None) -> None:
        if end is not None and start + frame.samples / frame.sample_rate > end:
            # the frame crossing the video's end keeps only the samples before it
            keep = max(round((end - start) * frame.sample_rate), 0)
            if keep == 0:
                return
            values_per_sample = 1 if frame.format.is_planar else len(frame.layout.channels)
            data = np.ascontiguousarray(frame.to_ndarray()[:, : keep * values_per_sample])
            cut = av.AudioFrame.from_ndarray(data, format=frame.format.name, layout=frame.layout.name)
            cut.sample_rate = frame.sample_rate
            frame = cut
        frame.pts = self.samples_out
        frame.time_base = Fraction(1, frame.sample_rate)
        self.samples_out += frame.samples
        for packet in self.out_stream.encode(frame):
            self.output.mux(packet)

    def close(self) -> None:
        if self.src is not None:
            self.src.close()


def _can_copy(stream: av.audio.stream.AudioStream, container_format: str) -> bool:
    """Whether `stream`'s packets can go into a `container_format` file untouched.

    Decided by writing a header with that stream into memory, which catches codecs the muxer refuses
    or takes only as experimental. Raw PCM is never copied into MP4: ISO raw-PCM boxes are too new
    for most players, so it becomes AAC there.
    """
    if container_format == "mp4" and stream.codec_context.name.startswith("pcm_"):
        return False
    if stream.codec_context.name == "aac" and not stream.codec_context.extradata:
        return False  # ADTS AAC (MPEG-TS): its config would reach an MP4 only after the header that needs it
    probe = av.open(io.BytesIO(), "w", format=container_format)
    try:
        probe.add_stream_from_template(stream)
        probe.start_encoding()
        return True
    except (av.FFmpegError, ValueError):
        return False
    finally:
        try:
            probe.close()
        except av.FFmpegError:
            pass  # an empty probe file may refuse its trailer; the header is what was tested


class VideoWriter:
    """H.264 (libx264, yuv420p) writer of RGB uint8 frames, optionally with the audio of `audio_from`.

    Use as a context manager. The file is written under a temporary name next to `path` and renamed
    to `path` only when the block ends without an exception; otherwise the temporary file is deleted
    and nothing is left behind. Odd frame sizes are padded to even by replicating the last row/column
    (yuv420p subsamples chroma 2x2). The audio of `audio_from` (the driving video: a path, encoded bytes, or
    the `AudioTap` of a pipe or URL, whose audio is muxed as it is read) is copied without
    re-encoding when the container takes its codec (else re-encoded to AAC), and cut at the video's end
    (copied audio is cut at packet granularity, so it may overrun by under one audio frame, ~23 ms for
    AAC). A source without audio gives a silent video.

    progressive: a fragmented MP4 written under its final name, playable while it is written (a fragment per
    second: one keyframe a second, x264 without look-ahead); a block ending in an exception still finishes
    it, so it holds every frame written (a file without frames is removed).
    """

    def __init__(self, path, fps, audio_from=None, crf: int = 17, preset: str = "medium",
                 progressive: bool = False):
        self.path = Path(path)
        # floats are turned into the closest fraction with a NTSC-sized denominator (29.97 -> 2997/100)
        self.fps = Fraction(fps).limit_denominator(1001) if isinstance(fps, float) else Fraction(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.audio_from = audio_from
        self.crf = crf
        self.preset = preset
        self.progressive = progressive
        self.frames_written = 0
        self._container = None
        self._video = None
        self._audio = None
        self._tmp = None
        self._frame_shape = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a hidden sibling that keeps the target's extension, from which the container format is chosen
        self._tmp = self.path if self.progressive else self.path.with_name(
            f".{self.path.stem}.{secrets.token_hex(4)}.partial{self.path.suffix}")
        try:
            if self.audio_from is not None:
                self._audio = _AudioCarry(self.audio_from)
            try:
                # flush_packets: each fragment reaches the file when it is made, not when FFmpeg's buffer fills
                self._container = av.open(str(self._tmp), "w", **({"format": "mp4", "options": {
                    "movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}}
                    if self.progressive else {}))
            except ValueError:
                raise VideoError(f"cannot write {self.path}: no video format for '{self.path.suffix}'") from None
            except (OSError, av.FFmpegError) as e:
                raise VideoError(f"cannot write {self.path}: {describe(e)}") from None
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, frame: np.ndarray) -> None:
        if self._container is None:
            raise RuntimeError("VideoWriter.write outside its `with` block")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be uint8 (H, W, 3) RGB, got {frame.dtype} {frame.shape}")
        if self._frame_shape is None:
            self._frame_shape = frame.shape
            self._open_video_stream(frame.shape[1] + frame.shape[1] % 2, frame.shape[0] + frame.shape[0] % 2)
        elif frame.shape != self._frame_shape:
            raise ValueError(f"frame size changed from {self._frame_shape} to {frame.shape}")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(_pad_to_even(frame)), format="rgb24")
        video_frame.pts = self.frames_written
        for packet in self._video.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1
        if self._audio is not None and self._audio.present:
            self._audio.feed_until(float(self.frames_written / self.fps))

    def _open_video_stream(self, width: int, height: int) -> None:
        options = {"crf": str(self.crf), "preset": self.preset}
        if self.progressive:  # each keyframe starts a fragment; no look-ahead holding frames back
            options.update(tune="zerolatency", g=str(max(round(self.fps), 1)))
        try:
            stream = self._container.add_stream("libx264", rate=self.fps, options=options)
        except ValueError as e:  # the container cannot hold H.264 (.webm, ...)
            raise VideoError(f"cannot write {self.path}: {e}; use .mp4, .mov or .mkv") from e
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / self.fps
        self._video = stream
        if self._audio is not None and self._audio.present:
            self._audio.attach(self._container)

    def close(self) -> None:
        """Finish the file and move it to its final name."""
        if self._container is None:
            return
        try:
            if self.frames_written == 0:
                raise VideoError(f"no frames were written to {self.path}")
            for packet in self._video.encode(None):
                self._container.mux(packet)
            if self._audio is not None and self._audio.present:
                self._audio.feed_until(float(self.frames_written / self.fps), final=True)
            self._close_handles()
            if self._tmp != self.path:
                os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self._abort()
            raise

    def _close_handles(self) -> None:
        container, audio = self._container, self._audio
        # the stream too: its encoder (x264's threads) goes with the file, not whenever the collector frees a
        # writer caught in an exception's reference cycle (in a forked process that free never returns)
        self._container = self._audio = self._video = None
        try:
            if audio is not None:
                audio.close()
        finally:
            if container is not None:
                container.close()

    def _abort(self) -> None:
        try:
            self._close_handles()
        except av.FFmpegError:
            pass  # the partial file is being thrown away; a trailer it cannot take does not matter
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (self.progressive and self.frames_written):
            self.close()
        else:
            self._abort()
