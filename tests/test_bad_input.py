"""Faults a new user met (issue 18), each with its class: bad inputs and options fail before any work with one
coded line naming the flag, runs never share an output folder, a signal at any moment leaves nothing behind,
damaged exports are refused, and the onnxruntime backend leaves no files in the temporary folder."""
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyportrait.cli import main
from hyportrait.errors import InputError, OptionError, VideoError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks import weights
from hyportrait.runtime import api, video
from hyportrait.runtime.api import Animator, result_folder
from hyportrait.runtime.inputs import load_image
from hyportrait.runtime.pipeline import AnimateConfig
from hyportrait.runtime.video import VideoWriter, probe_video

# (`weights` is imported above, at collection: diffusers' log handler then holds the session's stderr, not the
# captured stderr of the first test that builds a network, closed when that test ends)
# the tiny random-weight torch model at its cheapest: 64 px crops, 4-frame windows, one step
TINY = {"size": 64, "window": 4, "num_steps": 1, "overlap": 1, "pad_frames": 0}


def animate(out: Path, *extra: str, image=SAMPLE_IMAGE, video_file=SAMPLE_VIDEO) -> int:
    return main(["animate", "--image", str(image), "--video", str(video_file), "--out", str(out), "--quiet",
                 *extra])


def one_coded_line(err: str, code: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hyportrait: error [{code}]: "), err
    assert "Traceback" not in err and "Errno" not in err
    return lines[0]


@pytest.fixture
def no_network_built(monkeypatch):
    """Building the tiny networks fails the test: what is checked must be checked before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(weights, "random_networks", refuse)


def test_missing_or_unreadable_inputs_fail_before_torch_is_imported(tmp_path):
    """Checked without torch (so in a fraction of a second, and before any network is built)."""
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video")
    cases = [(tmp_path / "missing.png", SAMPLE_VIDEO), (tmp_path, SAMPLE_VIDEO), (SAMPLE_IMAGE, notes),
             (SAMPLE_IMAGE, tmp_path / "missing.mp4")]
    script = ("import sys\n"
              "sys.modules['torch'] = None  # an import of torch fails\n"
              "from hyportrait.cli import main\n"
              f"for image, video in {[(str(i), str(v)) for i, v in cases]!r}:\n"
              f"    print(main(['animate', '--image', image, '--video', video, '--out', {str(tmp_path / 'out')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.split() == ["2"] * len(cases), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert done.stderr.splitlines() == [
        f"hyportrait: error [bad_input]: source image {tmp_path / 'missing.png'}: file not found",
        f"hyportrait: error [bad_input]: source image {tmp_path}: not a readable image (Is a directory)",
        (f"hyportrait: error [bad_video]: cannot read video {notes}: not a video file or it is damaged "
         "(Invalid data found when processing input)"),
        f"hyportrait: error [bad_video]: video not found: {tmp_path / 'missing.mp4'}",
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--guidance", "nan"], "--guidance must be between 0.0 and 50.0, got nan"),
    (["--guidance", "inf"], "--guidance must be between 0.0 and 50.0, got inf"),
    (["--appearance-guidance", "1", "nan"], "--appearance-guidance must be between 0.0 and 50.0, got nan"),
    (["--seed", str(2**70)], f"--seed must be between 0 and {2**64 - 1}, got {2**70}"),
    (["--steps", "1000000000"], "--steps must be between 1 and 1000, got 1000000000"),
    (["--decode-chunk", "0"], "--decode-chunk must be between 1 and 1000, got 0"),
    (["--max-frames", "-3"], "--max-frames must be between 1 and 10000000, got -3"),
    (["--device", "gpu0"], "--device must be cpu, cuda or cuda:N (N the GPU's index), got 'gpu0'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--stall-timeout", "0"], "--stall-timeout must be more than 0 and at most 86400 seconds, got 0.0"),
    (["--stall-timeout", "-1"], "--stall-timeout must be more than 0 and at most 86400 seconds, got -1.0"),
    (["--stall-timeout", "nan"], "--stall-timeout must be more than 0 and at most 86400 seconds, got nan"),
    (["--gpus", "0"], "--gpus must be between 1 and 1024, got 0"),
    (["--gpus", "-3"], "--gpus must be between 1 and 1024, got -3"),
    (["--lora", "no-such-lora"], "--lora no-such-lora: not found"),
], ids=["guidance-nan", "guidance-inf", "ramp-nan", "seed-2**70", "steps-1e9", "chunk-0", "frames-negative",
        "device-gpu0", "steps-text", "stall-0", "stall-negative", "stall-nan", "gpus-0", "gpus-negative",
        "lora-missing"])
def test_options_fail_before_any_work_naming_their_flag(tmp_path, capsys, no_network_built, extra, expected):
    try:
        code = animate(tmp_path / "out", *extra)
    except SystemExit as exc:  # argparse's own checks (coded too)
        code = exc.code
    assert code == 2
    assert expected in one_coded_line(capsys.readouterr().err, "bad_input")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_refused_first(tmp_path, capsys, no_network_built):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert animate(blocker / "out", "--device", "cpu") == 2
    assert f"--out {blocker / 'out'}: {blocker} is a file, not a folder" in one_coded_line(
        capsys.readouterr().err, "bad_input")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_nothing_can_be_written_in_is_refused_first(tmp_path, capsys, no_network_built):
    """/proc takes no new files, whatever its permission bits say (and root passes every permission check: the
    old check asked os.access, so root ran the whole animation and failed at its end)."""
    assert animate(Path("/proc/hyportrait-out"), "--device", "cpu") == 2
    assert "--out /proc/hyportrait-out: /proc is not writable" in one_coded_line(capsys.readouterr().err,
                                                                                 "bad_input")


def test_an_output_folder_name_too_long_for_the_file_system_is_refused(tmp_path, capsys, no_network_built):
    out = tmp_path / ("a" * 300)
    assert animate(out, "--device", "cpu") == 2
    assert f"--out {out}: File name too long" in one_coded_line(capsys.readouterr().err, "bad_input")


def test_api_options_are_checked_whatever_their_type():
    for options, problem in (({"num_steps": "4"}, "num_steps must be a number, got '4'"),
                             ({"num_steps": 2.5}, "num_steps must be a whole number, got 2.5"),
                             ({"seed": True}, "seed must be a number, got True"),
                             ({"seed": -1}, "seed must be between 0"),
                             ({"sigma_min": 10.0, "sigma_max": 5.0}, "sigma_min must be below sigma_max"),
                             ({"fps_condition": float("nan")}, "fps_condition must be between")):
        with pytest.raises(OptionError, match=problem.replace("(", r"\(")):
            AnimateConfig(**options)
    assert AnimateConfig(seed=np.int64(3), min_motion_guidance=np.float32(1.5)).seed == 3
    with pytest.raises(OptionError) as caught:
        Animator(backend="torch", device="cpu", mode="turbo")
    assert (caught.value.option, caught.value.code) == ("mode", "bad_input")
    with pytest.raises(OptionError, match="device must be cpu, cuda or cuda:N"):
        Animator(backend="torch", device="cuda:x")
    with pytest.raises(OptionError, match="segment must be a whole number, got 2.5"):  # before any network loads
        Animator(backend="torch", device="cpu", segment=2.5)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header is edited to claim width x height pixels: a decompression bomb's header."""
    encoded = io.BytesIO()
    Image.new("RGB", (1, 1)).save(encoded, "PNG")
    png = bytearray(encoded.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR's data follows the signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_decompression_bombs_and_oversized_video_frames_are_refused(tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(20000, 20000))
    for source in (bomb, bomb.read_bytes(), _png_claiming(11000, 11000)):  # over 2x, and between 1x and 2x
        with pytest.raises(InputError, match="too large to decode safely"):
            load_image(source)
    assert animate(tmp_path / "out", image=bomb) == 2
    assert "too large to decode safely" in one_coded_line(capsys.readouterr().err, "image_too_large")
    with pytest.raises(InputError, match="must have between 1 and"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 255 * 255)
    with pytest.raises(VideoError, match="has 256x256 frames, more than the 65025 pixels"):
        probe_video(SAMPLE_VIDEO)


@pytest.fixture(scope="module")
def tiny_animator():
    return Animator(backend="torch", device="cpu", max_frames=3, **TINY)


def test_runs_in_the_same_second_get_folders_of_their_own(tmp_path, tiny_animator, monkeypatch):
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(result_folder(tmp_path, "same"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(f.name for f in folders) == sorted(["same"] + [f"same-{n}" for n in range(2, 9)])

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(api, "datetime", Frozen)
    first, second = (tiny_animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "out") for _ in range(2))
    assert first.cropped.parent.name == "20260102_030405_sample_portrait_sample_driving"
    assert second.cropped.parent.name == first.cropped.parent.name + "-2"
    for result in (first, second):
        assert probe_video(result.cropped).num_frames == probe_video(result.full_resolution).num_frames == 3


def _signal_main_thread(signum):
    signal.pthread_kill(threading.main_thread().ident, signum)


@pytest.mark.parametrize("signum, moment", [(signal.SIGINT, "load"), (signal.SIGTERM, "write")])
def test_a_signal_at_any_moment_ends_the_command_cleanly(tmp_path, capsys, monkeypatch, signum, moment):
    if moment == "load":
        build = weights.random_networks
        monkeypatch.setattr(weights, "random_networks", lambda *a, **k: (_signal_main_thread(signum), build(*a, **k))[1])
    else:  # from an encoder thread, at the second frame of a video, while the main thread hands frames over
        write, sent = VideoWriter.write, []

        def interrupted_write(self, frame):
            write(self, frame)
            # once: the second video's writer may reach its frame 2 after the command has given the handlers back,
            # and a SIGTERM then would end the test process itself
            if self.frames_written == 2 and not sent:
                sent.append(signum)
                _signal_main_thread(signum)

        monkeypatch.setattr(VideoWriter, "write", interrupted_write)
    monkeypatch.setattr(api, "RANDOM_MODEL_DEFAULTS", TINY)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert animate(out, "--device", "cpu", "--steps", "2", "--max-frames", "4") == 128 + signum
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "hyportrait: interrupted" and "Traceback" not in err
    assert not out.exists() or not list(out.rglob("*"))  # no partial video, no result folder
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back


def test_an_embedding_script_killed_while_writing_leaves_nothing(tiny_export, tmp_path):
    """With SIGTERM at its default (a plain script), the API unwinds its call, then the process ends by SIGTERM.
    The script runs the onnxruntime backend on video bytes: neither leaves a file in the temporary folder, and
    the backend needs neither diffusers nor transformers at run time (the script's first call imports neither)."""
    temp, out = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    script = (
        "import faulthandler, signal, threading\n"
        "faulthandler.enable()  # a crash shows every thread's stack in the assertion below\n"
        "from pathlib import Path\n"
        "from hyportrait.runtime.api import Animator\n"
        "from hyportrait.runtime.video import VideoWriter\n"
        f"animator = Animator({str(tiny_export)!r}, backend='onnxruntime', device='cpu', max_frames=6, "
        "num_steps=1, overlap=1, pad_frames=0)\n"
        f"video = Path({str(SAMPLE_VIDEO)!r}).read_bytes()\n"
        f"animator.animate({str(SAMPLE_IMAGE)!r}, video, {str(tmp_path / 'complete')!r})\n"
        "import sys\n"
        "print('imported', sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'}), flush=True)\n"
        "write = VideoWriter.write\n"
        "def interrupted(self, frame):\n"
        "    write(self, frame)\n"
        "    if self.frames_written == 2:\n"
        "        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)\n"
        "VideoWriter.write = interrupted\n"
        f"animator.animate({str(SAMPLE_IMAGE)!r}, video, {str(out)!r})\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TMPDIR=str(temp)), check=False)
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "not reached" not in done.stdout and done.stdout.splitlines()[-1] == "imported []", done.stdout
    assert len(list((tmp_path / "complete").glob("*/*.mp4"))) == 2  # the first call, uninterrupted
    assert not out.exists() or not list(out.rglob("*"))
    assert not list(temp.iterdir())  # no video copy, no onnxruntime telemetry file


def _export_copy(tiny_export: Path, folder: Path) -> Path:
    """The export's files linked into `folder`, so that one of them can be replaced."""
    folder.mkdir()
    for path in tiny_export.iterdir():
        (folder / path.name).symlink_to(path)
    return folder


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_damaged_or_edited_export_is_refused(tiny_export, tmp_path):
    def unet_input(manifest, name):
        return next(t for t in manifest["models"]["unet"]["inputs"] if t["name"] == name)

    edits = {
        "truncated": (None, "manifest.json is damaged or was edited"),
        "no inputs": (lambda m: m["models"]["unet"].pop("inputs"), "manifest.json is damaged or was edited"),
        "bad shape": (lambda m: unet_input(m, "sample").update(shape=["batch", -4, 8, 8, 8]),
                      "must have a name, a dtype and a shape of positive sizes"),
        "path outside": (lambda m: m["models"]["vae_decoder"].update(file="../vae_decoder.onnx"),
                         "its files must be names inside the folder"),
        "window edited": (lambda m: unet_input(m, "sample").update(shape=["batch", 5, 8, 8, 8]),
                          (r"says unet takes sample float32 \['batch', 5, 8, 8, 8\], but unet.onnx takes "
                           r"tensor\(float\) \['\?', 4, 8, 8, 8\]: the folder was edited")),
        "models swapped": (lambda m: m["models"]["motion"].update(file="appearance.onnx"),
                           "motion takes face_images .* but appearance.onnx takes no such input"),
    }
    for n, (case, (edit, message)) in enumerate(edits.items()):
        folder = _export_copy(tiny_export, tmp_path / str(n))
        if edit is None:
            (folder / "manifest.json").unlink()
            (folder / "manifest.json").write_text((tiny_export / "manifest.json").read_text()[:500])
        else:
            _edit_manifest(folder, edit)
        with pytest.raises(InputError, match=message) as caught:
            Animator(folder, backend="onnxruntime", device="cpu")
        assert caught.value.code == "bad_input", case
    folder = _export_copy(tiny_export, tmp_path / "pose")
    (folder / "pose_constant.npy").unlink()
    np.save(folder / "pose_constant.npy", np.zeros((32, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"holds a \[32, 4, 4\] map, the UNet takes \[32, 8, 8\]"):
        Animator(folder, backend="onnxruntime", device="cpu")
    (folder / "pose_constant.npy").write_bytes(b"\x93NUMPY damaged")
    with pytest.raises(InputError, match="pose_constant.npy is damaged"):
        Animator(folder, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("extra, expected", [
    (["--phases", "3"], "--phases 3: 3 phases need a grid whose 39 intervals divide into 2 parts"),
    (["--phases", "0"], "--phases must be between 1 and 1000, got 0"),
    (["--checkpoint-every", "0"], f"--checkpoint-every must be between 1 and {2**62}, got 0"),
    (["--batch", "0"], "--batch must be between 1 and 4096, got 0"),
    (["--accumulate", "0"], "--accumulate must be between 1 and 4096, got 0"),
    (["--rank", "0"], "--rank must be between 1 and 4096, got 0"),
    (["--lr", "nan"], "--lr must be between 0.0 and 1.0, got nan"),
    (["--guidance", "1", "inf"], "--guidance must be between 0.0 and 50.0, got inf"),
], ids=["phases-3-grid-40", "phases-0", "checkpoint-every-0", "batch-0", "accumulate-0", "rank-0", "lr-nan",
        "guidance-inf"])
def test_distill_train_options_fail_before_any_network_naming_their_flag(tmp_path, capsys, no_network_built,
                                                                          extra, expected):
    code = main(["distill", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *extra])
    assert code == 2
    assert expected in one_coded_line(capsys.readouterr().err, "bad_input")
    assert not (tmp_path / "run").exists()


def test_distill_toy_phases_fail_before_the_teacher_trains(tmp_path, capsys):
    assert main(["distill", "toy", "--out", str(tmp_path / "toy"), "--phases", "6"]) == 2  # grid 13: 12 intervals
    assert "--phases 6: 6 phases need a grid whose 12 intervals" in one_coded_line(capsys.readouterr().err,
                                                                                    "bad_input")
    assert main(["distill", "toy", "--out", str(tmp_path / "toy"), "--phases", "0"]) == 2  # not "the default"
    assert "--phases must be between 1 and 1000, got 0" in one_coded_line(capsys.readouterr().err, "bad_input")
    assert not (tmp_path / "toy").exists()


def test_output_files_and_folders_are_checked_before_any_work(tmp_path, capsys, no_network_built, tiny_animator):
    """A missing folder for calibrate's --out or verify's --report, or an API `out` that is a file, fails at
    once as bad_input (they were OSErrors after the recording, the comparison, the sampling)."""
    missing = tmp_path / "nodir"
    for argv in (["calibrate", "--models", str(tmp_path), "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO),
                  "--out", str(missing / "cal.npz")],
                 ["verify", "--engines", str(tmp_path), "--onnx", str(tmp_path), "--report", str(missing / "r.json")]):
        assert main(argv) == 2
        assert f"folder {missing} does not exist" in one_coded_line(capsys.readouterr().err, "bad_input")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(InputError, match=re.escape(f"output folder {blocker}: {blocker} is a file, not a folder")):
        tiny_animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, blocker)
    with pytest.raises(InputError, match=r"cannot be created \(File exists\)"):
        result_folder(blocker, "run")
    assert blocker.read_text() == "" and not missing.exists()


@pytest.mark.parametrize("seconds", [0.0, -1.0, float("nan")])
def test_the_apis_stall_timeout_is_checked_before_the_source_opens(tiny_animator, tmp_path, seconds):
    """The API refuses the stall timeouts the CLI refuses (nan never timed out), before reading anything (stdin
    would wait)."""
    for call in (lambda: next(tiny_animator.stream(SAMPLE_IMAGE, iter(()), stall_timeout=seconds)),
                 lambda: tiny_animator.animate(SAMPLE_IMAGE, "-", tmp_path, stream=True, stall_timeout=seconds)):
        with pytest.raises(InputError, match=r"stall_timeout must be more than 0 and at most 86400 seconds"):
            call()


def test_damaged_calibration_and_recorded_inputs_are_refused_before_any_work(tiny_export, tmp_path, capsys):
    """verify --inputs and build --calibration read their file first: a text file, an .npy renamed .npz, a
    truncated or edited ranges file are one bad_input line naming it (they were tracebacks after the other
    models' comparisons, or a build_failed per model)."""
    from hyportrait.engines.quantize import RANGES_FORMAT

    text, npy, cut, listed, keyless, inflate, header = (tmp_path / n for n in (
        "text.npz", "array.npz", "cut.json", "list.json", "keyless.json", "inflate.npz", "header.npz"))
    text.write_text("not an archive")
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    for damaged, at in ((inflate, 100), (header, 200)):  # compressed, damaged: zlib's error; a garbled .npy header
        with open(damaged, "wb") as f:
            np.savez_compressed(f, **{"0/sample": np.arange(4096.0)})
        data = bytearray(damaged.read_bytes())
        data[at:at + 40] = bytes(40)
        damaged.write_bytes(bytes(data))
    cut.write_text(json.dumps({"format": RANGES_FORMAT, "amax": {"a": 1.0}})[:25])
    listed.write_text("[1, 2]")
    keyless.write_text(json.dumps({"format": RANGES_FORMAT, "method": "max"}))
    for bad in (text, npy, inflate, header):
        assert main(["verify", "--engines", str(tiny_export), "--onnx", str(tiny_export), "--inputs", str(bad)]) == 2
        assert f"recorded inputs {bad}: not an .npz file, or it is damaged" in one_coded_line(
            capsys.readouterr().err, "bad_input")
    for bad, problem in ((text, "not an .npz file"), (cut, "a damaged activation-ranges file (JSONDecodeError"),
                         (listed, "is not an activation-ranges file"), (keyless, "(KeyError")):
        assert main(["build", "--onnx", str(tiny_export), "--out", str(tmp_path / "engines"), "--precision", "int8",
                     "--calibration", str(bad)]) == 2
        assert str(bad) in one_coded_line(err := capsys.readouterr().err, "bad_input") and problem in err
    assert not (tmp_path / "engines").exists()


def test_bench_errors_are_one_coded_line(tmp_path, capsys):
    """`hyportrait bench` runs inside the command's error handling (it was dispatched before it: a traceback,
    and exit 0 whatever happened); its inputs are checked before any work."""
    missing = tmp_path / "missing.png"
    assert main(["bench", "--image", str(missing), "--video", str(SAMPLE_VIDEO), "--report", str(tmp_path / "r.json"),
                 "--size", "tiny"]) == 2
    assert f"source image {missing}: file not found" in one_coded_line(capsys.readouterr().err, "bad_input")
    assert not (tmp_path / "r.json").exists()


def test_a_damaged_video_given_as_bytes_is_named_briefly(tmp_path):
    """A video given as bytes is "video (bytes)" in messages, not the repr of its bytes (a 64 MB video made a
    message of ~190 MB): an MP4 with its index first, cut after the index, fails at its first frame."""
    import av

    indexed = tmp_path / "indexed.mp4"
    with av.open(str(SAMPLE_VIDEO)) as source, av.open(str(indexed), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = indexed.read_bytes()
    with pytest.raises(VideoError) as caught:
        list(video.open_live(data[:len(data) // 10]).frames)
    assert len(caught.value.message) < 300 and "video (bytes)" in caught.value.message


def test_a_jobs_folder_that_cannot_be_made_is_refused_before_any_model_loads(tmp_path, capsys, no_network_built):
    """`serve --jobs-dir` at a file, under a file, or where no folder can be made (/proc) was an OSError's
    traceback (from the job table's mkdir)."""
    pytest.importorskip("uvicorn")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(blocker, f"--jobs-dir {blocker}: {blocker} is a file, not a folder"),
             (blocker / "jobs", f"--jobs-dir {blocker / 'jobs'}: {blocker} is a file, not a folder")]
    if Path("/proc/self").is_dir():  # Linux: a folder no one may make folders in, root included (its mkdir fails)
        cases.append((Path("/proc/hyportrait-jobs"), "--jobs-dir /proc/hyportrait-jobs: "))
    for folder, problem in cases:
        assert main(["serve", "--port", "0", "--jobs-dir", str(folder)]) == 2
        assert problem in one_coded_line(capsys.readouterr().err, "bad_input")
    assert blocker.read_text() == ""


@pytest.mark.parametrize("argv, expected", [
    (["--rtol", "nan"], "--rtol must be between 0.0 and 1000000.0, got nan"),
    (["--atol", "nan"], "--atol must be between 0.0 and 1000000.0, got nan"),
    (["--rtol", "-1"], "--rtol must be between 0.0 and 1000000.0, got -1.0"),
    (["--atol", "inf"], "--atol must be between 0.0 and 1000000.0, got inf"),
    (["--rtol", str(2**70)], "--rtol must be between 0.0 and 1000000.0, got 1.1805916207174113e+21"),
], ids=["rtol-nan", "atol-nan", "rtol-negative", "atol-inf", "rtol-2**70"])
def test_verify_tolerances_are_checked_before_any_comparison(tmp_path, capsys, argv, expected):
    """A nan tolerance passed every comparison, a negative one failed them all."""
    assert main(["verify", "--engines", str(tmp_path), "--onnx", str(tmp_path), *argv]) == 2
    assert expected in one_coded_line(capsys.readouterr().err, "bad_input")


@pytest.mark.parametrize("argv, expected", [
    (["calibrate", "--sets", str(2**70)], f"--sets must be between 1 and 1000, got {2**70}"),
    (["calibrate", "--sets", "0"], "--sets must be between 1 and 1000, got 0"),
    (["distill", "prepare", "--stride", "0"], "--stride must be between 1 and 10000000, got 0"),
    (["distill", "prepare", "--frames", str(2**70)], f"--frames must be between 1 and 1000, got {2**70}"),
    (["distill", "prepare", "--per-shard", "0"], "--per-shard must be between 1 and 4096, got 0"),
], ids=["calibrate-sets-2**70", "calibrate-sets-0", "prepare-stride-0", "prepare-frames-2**70",
        "prepare-per-shard-0"])
def test_calibrate_and_prepare_numbers_are_checked_before_anything_is_written(tmp_path, capsys, no_network_built,
                                                                               argv, expected):
    """--stride 0 was taken as the default, --sets 2**70 ran, --frames 2**70 ran to bad_data, leaving the
    data's manifest and report behind."""
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(SAMPLE_VIDEO.read_bytes())
    out = tmp_path / "out"
    inputs = {"calibrate": ["--models", str(tmp_path), "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO),
                            "--out", str(tmp_path / "calibration.npz")],
              "distill": ["--videos", str(videos), "--out", str(out)]}[argv[0]]
    assert main([*argv[:-2], *inputs, *argv[-2:]]) == 2
    assert expected in one_coded_line(capsys.readouterr().err, "bad_input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["videos"]


def test_a_reader_that_leaves_ends_the_command_quietly(monkeypatch, capsys):
    """`hyportrait weights expected | head` was a BrokenPipeError traceback: now no word and exit 128 + SIGPIPE,
    as Unix tools end (handled once in main, for every command); a broken pipe that is not stdout stays an
    error."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    with open(write, "w") as closed, monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", closed)
        assert main(["weights", "expected"]) == 128 + signal.SIGPIPE
    assert capsys.readouterr() == ("", "")

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(weights, "expected_manifest", broken)
    with pytest.raises(BrokenPipeError):
        main(["weights", "expected"])
