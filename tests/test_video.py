"""Video probing, streamed reading, the H.264 writer with audio passthrough, and paste-back blending."""

from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from hyportrait.errors import VideoError
from hyportrait.files import SAMPLE_VIDEO
from hyportrait.runtime.paste_back import PasteBack, paste_back, soft_mask
from hyportrait.runtime.video import VideoWriter, probe_video, read_frames

DRIVING = SAMPLE_VIDEO  # the bundled sample
NTSC = Fraction(30000, 1001)


def write_tone(
    path: Path, seconds: float, codec: str = "aac", rate: int = 44100, sample_format: str = "fltp"
):
    """A mono 440 Hz sine, `seconds` long, as the only stream of `path`."""
    samples = int(seconds * rate)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    data = (tone * 32767).astype(np.int16) if sample_format == "s16" else tone.astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(
                data[None, start : start + 1024], format=sample_format, layout="mono"
            )
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def moving_squares(count: int, height: int, width: int) -> list[np.ndarray]:
    """Dark frames with a red square moving right and a green one moving down, 16 px each."""
    frames = []
    for i in range(count):
        frame = np.full((height, width, 3), 30, np.uint8)
        frame[8:24, 4 + 3 * i : 20 + 3 * i] = (230, 20, 20)
        frame[4 + 2 * i : 20 + 2 * i, width - 24 : width - 8] = (20, 230, 20)
        frames.append(frame)
    return frames


def audio_seconds(path: Path) -> tuple[str, float]:
    """Codec name and length (first packet start to last packet end) of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        packets = [p for p in container.demux(stream) if p.size]
        start = max(packets[0].pts, 0)  # negative pts are the AAC encoder priming, not heard
        stop = packets[-1].pts + packets[-1].duration
        return stream.codec_context.name, float((stop - start) * stream.time_base)


def test_roundtrip_keeps_frames_size_rate_and_audio(tmp_path):
    tone = tmp_path / "tone.m4a"
    write_tone(tone, seconds=2.0)
    frames = moving_squares(24, 96, 128)
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, NTSC, audio_from=tone, crf=12) as writer:
        for frame in frames:
            writer.write(frame)

    info = probe_video(out)
    assert (info.width, info.height, info.num_frames, info.has_audio) == (128, 96, 24, True)
    assert info.fps == NTSC
    assert info.duration == pytest.approx(24 / NTSC, abs=1e-3)
    back = list(read_frames(out))
    assert len(back) == 24 and all(f.shape == (96, 128, 3) and f.dtype == np.uint8 for f in back)
    for written, read in zip(frames, back):
        assert np.abs(written.astype(int) - read).mean() < 3
    # the red square moved: its column centre in the last frame is 3 px/frame * 23 frames right of the first
    red = [np.nonzero(f[8:24, :, 0].mean(0) > 128)[0].mean() for f in (back[0], back[-1])]
    assert red[1] - red[0] == pytest.approx(69, abs=1)

    with av.open(str(out)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
    codec, seconds = audio_seconds(out)
    assert codec == "aac"
    # the 2 s tone was cut to the 0.8 s video, at AAC packet granularity (1024 samples = 23 ms)
    assert seconds == pytest.approx(24 / NTSC, abs=0.03)


def test_audio_the_container_cannot_take_is_reencoded_to_aac_and_cut(tmp_path):
    tone = tmp_path / "tone.wav"
    write_tone(tone, seconds=2.0, codec="pcm_mulaw", rate=8000, sample_format="s16")
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, 25, audio_from=tone) as writer:
        for frame in moving_squares(10, 64, 64):
            writer.write(frame)
    codec, seconds = audio_seconds(out)
    assert codec == "aac"
    assert seconds == pytest.approx(0.4, abs=0.01)


def test_odd_size_is_padded_to_even_by_repeating_the_edge(tmp_path):
    frames = moving_squares(3, 37, 51)
    frames[0][:, -1] = (200, 200, 40)  # a distinct last column, which the padding must repeat
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 30, crf=0) as writer:
        for frame in frames:
            writer.write(frame)
    info = probe_video(out)
    assert (info.width, info.height) == (52, 38)
    first = next(read_frames(out))
    assert np.abs(first[:37, 51].astype(int) - (200, 200, 40)).max() < 12
    assert np.abs(first[37, :51].astype(int) - first[36, :51]).max() < 12


def test_mkv_without_a_stored_frame_count_is_counted(tmp_path):
    tone = tmp_path / "tone.m4a"
    write_tone(tone, seconds=2.0)
    out = tmp_path / "clip.mkv"
    with VideoWriter(out, 30, audio_from=tone) as writer:
        for frame in moving_squares(45, 32, 48):
            writer.write(frame)
    info = probe_video(out)
    # MKV keeps no frame count, and its duration tag (1.52 s here) would round to 46 frames
    assert (info.width, info.height, info.fps, info.num_frames) == (48, 32, 30, 45)
    assert len(list(read_frames(out))) == 45


def test_failed_writer_leaves_nothing(tmp_path):
    target = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(target, 30) as writer:
        for frame in moving_squares(60, 32, 32):  # past x264's lookahead, so packets reach the file
            writer.write(frame)
        partial = [p.name for p in tmp_path.iterdir()]
        assert len(partial) == 1 and partial[0].startswith(".out.") and partial[0].endswith(".partial.mp4")
        assert not target.exists()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(VideoError, match="no frames"), VideoWriter(target, 30):
        pass
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="uint8"), VideoWriter(target, 30) as writer:
        writer.write(np.zeros((32, 32, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_target_only_on_success(tmp_path):
    target = tmp_path / "out.mp4"
    with VideoWriter(target, 30) as writer:
        for frame in moving_squares(4, 32, 32):
            writer.write(frame)
    first_size = target.stat().st_size
    with pytest.raises(RuntimeError), VideoWriter(target, 30) as writer:
        writer.write(moving_squares(1, 64, 64)[0])
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert target.stat().st_size == first_size and probe_video(target).num_frames == 4


def _text_named_mp4(path: Path):
    path.write_text("just some text, no video\n" * 20)


def _png_named_mp4(path: Path):
    png = path.with_suffix(".png")
    cv2.imwrite(str(png), np.zeros((8, 8, 3), np.uint8))
    png.rename(path)


def _audio_only_mp4(path: Path):
    m4a = path.with_suffix(".m4a")
    write_tone(m4a, 0.5)
    m4a.rename(path)


def _video_stream_without_frames(path: Path):
    """An mkv (the mp4 muxer drops empty tracks) that declares a video stream but carries only audio."""
    mkv = path.with_suffix(".mkv")
    with av.open(str(mkv), "w") as out:
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        audio = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*audio.encode(frame), *audio.encode(None)]:
            out.mux(packet)
    mkv.rename(path)


BAD_INPUTS = {
    "missing": (lambda path: None, "not found"),
    "text": (_text_named_mp4, "not a video file"),
    "png": (_png_named_mp4, "is an image"),
    "audio-only": (_audio_only_mp4, "no video stream"),
    "empty-video-stream": (_video_stream_without_frames, "no decodable frames"),
}


@pytest.mark.parametrize("make, problem", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_video_error_naming_file_and_problem(tmp_path, make, problem):
    path = tmp_path / "input.mp4"
    make(path)
    for attempt in (probe_video, lambda p: list(read_frames(p))):
        with pytest.raises(VideoError, match=problem) as caught:
            attempt(path)
        assert str(path) in str(caught.value) and caught.value.code == "bad_video"
        assert "Errno" not in str(caught.value)  # FFmpeg's reason, without its error number


def test_driving_video_probe_and_decode():
    for driving in (DRIVING, DRIVING.read_bytes()):  # a path, or the encoded file in memory
        info = probe_video(driving)
        assert (info.width, info.height, info.fps, info.num_frames, info.has_audio) == (256, 256, 24, 36, True)
        assert info.duration == pytest.approx(1.5)
        frames = read_frames(driving, limit=3)
        assert not isinstance(frames, list)  # streamed, not loaded
        frames = list(frames)
        assert len(frames) == 3 and all(f.shape == (256, 256, 3) and f.dtype == np.uint8 for f in frames)
        assert frames[0].std() > 10  # a real picture, not a blank


def test_rewrite_driving_clip_keeps_its_aac_audio(tmp_path):
    out, driving = tmp_path / "rewritten.mp4", DRIVING
    info = probe_video(driving)
    with VideoWriter(out, info.fps, audio_from=driving.read_bytes()) as writer:  # audio carried from bytes too
        for frame in read_frames(driving, limit=24):
            writer.write(frame)
    back = probe_video(out)
    assert (back.width, back.height, back.fps, back.num_frames, back.has_audio) == (256, 256, 24, 24, True)
    codec, seconds = audio_seconds(out)
    assert codec == "aac" and seconds == pytest.approx(1.0, abs=0.03)
    # copied, not re-encoded: the first audio packets are byte-identical to the source's
    with av.open(str(driving)) as src, av.open(str(out)) as dst:
        src_packets = [bytes(p) for p, _ in zip(src.demux(src.streams.audio[0]), range(5))]
        dst_packets = [bytes(p) for p, _ in zip(dst.demux(dst.streams.audio[0]), range(5))]
    assert src_packets == dst_packets


def test_soft_mask_matches_closed_form():
    mask = soft_mask(100, 100)  # 10-pixel ramps, steps of 1/9
    assert mask.shape == (100, 100, 1) and mask.dtype == np.float32
    mask = mask[..., 0]
    assert mask[0, 0] == mask[0, 99] == mask[99, 0] == mask[99, 99] == 0
    assert mask[0, 50] == mask[50, 0] == mask[99, 50] == mask[50, 99] == 0
    assert mask[50, 50] == 1 and mask[10:90, 10:90].min() == 1
    assert mask[50, 5] == pytest.approx(5 / 9) and mask[50, 94] == pytest.approx(5 / 9)
    assert mask[3, 50] == pytest.approx(3 / 9) and mask[97, 50] == pytest.approx(2 / 9)
    assert mask[3, 4] == pytest.approx(3 / 9 * 4 / 9) and mask[96, 95] == pytest.approx(3 / 9 * 4 / 9)

    wide = soft_mask(50, 30)[..., 0]  # 5-pixel ramps across (steps 1/4), 3-pixel ramps down (steps 1/2)
    assert wide.shape == (30, 50)
    assert wide[15, 2] == pytest.approx(0.5) and wide[1, 25] == pytest.approx(0.5)
    assert wide[1, 1] == pytest.approx(0.125)
    np.testing.assert_array_equal(wide, wide[::-1, ::-1])  # symmetric ramps


def test_paste_back_blends_inside_box_and_keeps_outside():
    original = np.full((200, 300, 3), 100, np.uint8)
    original[:, :, 2] = np.arange(300) % 256  # texture, so "unchanged" is a real check
    white = np.full((512, 512, 3), 255, np.uint8)
    box = (50, 40, 150, 140)
    mask = soft_mask(100, 100)
    result = paste_back(original, white, box, mask)

    assert result.shape == original.shape and result.dtype == np.uint8
    outside = np.ones((200, 300), bool)
    outside[40:140, 50:150] = False
    np.testing.assert_array_equal(result[outside], original[outside])
    assert (result[90, 100] == 255).all()  # mask 1 at the centre: the crop only
    np.testing.assert_array_equal(result[40, 100], original[40, 100])  # mask 0 on the box edge
    m = 5 / 9  # box-local (row 50, column 5)
    expected = 255 * m + original[90, 55].astype(float) * (1 - m)
    assert np.abs(result[90, 55] - expected).max() <= 1
    np.testing.assert_array_equal(paste_back(original, white, box), result)  # default mask is the same

    with pytest.raises(ValueError, match="outside"):
        paste_back(original, white, (250, 40, 350, 140))
    with pytest.raises(ValueError, match="mask shape"):
        paste_back(original, white, box, soft_mask(90, 100))


def test_paste_back_is_the_official_float32_blend_bit_for_bit():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    box = (30, 41, 230, 251)  # 200 x 210: the crops are resized
    paste = PasteBack(original, box)
    mask = soft_mask(200, 210)
    for _ in range(3):
        crop = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        # the official paste_back_frame, written out
        foreground = cv2.resize(crop, (200, 210)).astype(np.float32) / 255.0
        background = original[41:251, 30:230].astype(np.float32) / 255.0
        expected = original.copy()
        expected[41:251, 30:230] = ((foreground * mask + background * (1 - mask)) * 255).astype(np.uint8)
        np.testing.assert_array_equal(paste(crop), expected)
