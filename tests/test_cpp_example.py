"""examples/cpp: the C++ program that embeds CPython, built with the system compiler and run against the
onnxruntime CPU backend on a tiny export (module fixtures: one build, one export)."""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.video import probe_video

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cpp"
# the tiny export's UNet window is 4 frames: overlap 1 keeps it to two windows
CLIP = ["--max-frames", "4", "--steps", "1", "--overlap", "1"]


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    command = [str(part) for part in command]
    return subprocess.run(command, check=False, capture_output=True, text=True, **kwargs)


def missing_toolchain() -> str | None:
    """Why the example cannot be built here, or None."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        return "no C++ compiler (g++ or c++, or $CXX)"
    if not shutil.which("make"):
        return "no make"
    var = sysconfig.get_config_var
    if not (Path(var("INCLUDEPY")) / "Python.h").is_file():
        return f"no Python.h in {var('INCLUDEPY')} (Python's development files)"
    if not (Path(var("BINDIR")) / f"python{var('VERSION')}-config").is_file():
        return f"no python{var('VERSION')}-config in {var('BINDIR')}"
    if var("Py_ENABLE_SHARED"):
        library = Path(var("LIBDIR")) / var("LDLIBRARY")
    else:
        library = Path(var("LIBPL")) / var("LIBRARY")
    if not library.is_file():
        return f"no embeddable libpython ({library})"
    return None


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    if reason := missing_toolchain():
        pytest.skip(f"cannot build examples/cpp: {reason}")
    build = tmp_path_factory.mktemp("cpp")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    done = run(["make", "-C", EXAMPLE, f"BUILD={build}", f"PYTHON={sys.executable}", f"CXX={cxx}"],
               timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return build / "animate"


def animate(binary: Path, models: Path, out: Path, *options) -> subprocess.CompletedProcess:
    """The program on the sample with the onnxruntime CPU backend; `options` come after the short clip's."""
    env = dict(os.environ, HYPORTRAIT_PYTHON=sys.executable)
    return run([binary, "--models", models, "--image", SAMPLE_IMAGE, "--video", SAMPLE_VIDEO, "--out", out,
                "--backend", "onnxruntime", "--device", "cpu", *CLIP, *options], env=env, timeout=600)


def test_animates_the_sample(binary, tiny_export, tmp_path):
    done = animate(binary, tiny_export, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    frames = int(re.search(r"^frames: (\d+) at ", done.stdout, re.MULTILINE).group(1))
    assert frames == 4
    for name in ("cropped", "full_resolution"):
        path = Path(re.search(rf"^{name}: (.+)$", done.stdout, re.MULTILINE).group(1))
        assert path.name == f"{name}.mp4" and path.parent.parent == tmp_path
        assert probe_video(path).num_frames == frames
    assert re.search(r"^timings:.* total=", done.stdout, re.MULTILINE)


def test_a_hyportrait_error_is_exit_code_2(binary, tiny_export, tmp_path):
    """An option the Animator refuses before it loads anything (the missing image of the Python tests would
    cost the load, and the C++ side handles every HyportraitError alike)."""
    done = animate(binary, tiny_export, tmp_path, "--steps", "0")  # the last --steps counts
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error [bad_input]: num_steps must be between 1 and" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())


def test_bad_command_line(binary):
    done = run([binary, "--models", "x", "--steps", "two"])
    assert done.returncode == 64 and "--steps takes a whole number" in done.stderr


def test_the_streaming_variant_reads_each_frame_as_it_comes(binary, tiny_export, tmp_path):
    done = animate(binary, tiny_export, tmp_path, "--segment", "4", "--stream", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"^streamed: 4 frames of (\d+)x(\d+) to (.+) \(first after", done.stdout, re.MULTILINE)
    width, height, path = int(found.group(1)), int(found.group(2)), Path(found.group(3))
    assert path.stat().st_size == 4 * width * height * 3
