"""`hyportrait animate` end to end on the tiny random-weight model, and its errors on bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyportrait.cli import main
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.video import probe_video, read_frames


def animate(image, video, out, *extra):
    return main(["animate", "--image", str(image), "--video", str(video), "--out", str(out), "--quiet",
                 "--device", "cpu", *extra])


def outputs(out: Path) -> list[Path]:
    return sorted(out.rglob("*.mp4"))


def check_result(out: Path, frames: int, fps, source_size: tuple[int, int]):
    cropped, full = (out.glob(f"*/{name}.mp4") for name in ("cropped", "full_resolution"))
    cropped, full = next(cropped), next(full)
    for path, size in ((cropped, (128, 128)), (full, source_size)):
        info = probe_video(path)
        assert (info.num_frames, info.fps, info.has_audio) == (frames, fps, True), path
        assert (info.width, info.height) == size
    assert len(list(read_frames(full))) == frames  # every frame decodes


def test_animate_the_bundled_sample(tmp_path, capsys):
    # one guidance branch: a third of the UNet's time (the branches' batch is test_runtime's)
    assert animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path, "--steps", "1", "--max-frames", "6",
                   "--guidance-branches", "1") == 0
    printed = capsys.readouterr()
    assert "random-weight model" in printed.err
    assert printed.out.count("wrote ") == 2
    check_result(tmp_path, 6, probe_video(SAMPLE_VIDEO).fps, Image.open(SAMPLE_IMAGE).size)


def test_python_dash_m_runs_the_command_and_returns_its_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hyportrait", "animate", "--image", str(tmp_path / "missing.png"),
                           "--video", str(SAMPLE_VIDEO), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.startswith("hyportrait: error [bad_input]: source image"), done


def test_no_face_in_the_image(tmp_path, capsys):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(gray)
    assert animate(gray, SAMPLE_VIDEO, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "[no_face]" in err and "no face found in the source image" in err and "Traceback" not in err
    assert outputs(tmp_path / "out") == []


def test_a_video_with_no_frames(tmp_path, capsys):
    import av

    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as container:  # an audio track and no video frames
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert animate(SAMPLE_IMAGE, empty, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "[bad_video]" in err and str(empty) in err
    assert outputs(tmp_path / "out") == []


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert animate(bad, SAMPLE_VIDEO, tmp_path / "out") == 2
    assert "not a readable image" in capsys.readouterr().err


def test_weights_folder_with_a_wrong_key(tmp_path, capsys):
    import torch

    weights = tmp_path / "weights"
    (weights / "hyportrait").mkdir(parents=True)
    torch.save({"conv_in.weight_typo": torch.zeros(1)}, weights / "hyportrait" / "pose_guider.pth")
    assert animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "out", "--weights", str(weights)) == 2
    err = capsys.readouterr().err
    assert "[bad_weights]" in err and "unexpected key conv_in.weight_typo" in err
    assert "MISSING  hyportrait/unet.pth" in err
    assert outputs(tmp_path / "out") == []


def test_bench_command_refuses_the_official_size_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO), "--report",
              str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "only --size tiny runs on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
