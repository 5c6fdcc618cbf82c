"""benchmarks/stream_gpu.py dry-runs on the CPU with the tiny networks (its GPU numbers are in RESULTS.md)."""
import json

from hyportrait.benchmarks import stream_gpu


def test_the_stream_benchmark_runs_every_part(tmp_path):
    stream_gpu.main(["--size", "tiny", "--out", str(tmp_path), "--repeats", "1", "--lengths", "0.25", "0.5",
                     "--tiny-lengths", "0.25"])
    report = json.loads((tmp_path / "stream.json").read_text())
    first = report["first_frame"]["eager"]  # the GPU's CUDA graphs and compiled runs are left out on a CPU
    assert [(run["first_segment"], run["pad_frames"]) for run in first.values()] == [(3, 0), (4, 1)]
    assert all(0 < run["after_segment_frames_s"] < run["after_call_s"] for run in first.values())
    assert all(set(run["stages_s"]) == {"preprocess_chunk", "face_detection", "motion", "unet",
                                                 "vae_decoder"} for run in first.values())
    # the driving frames' detection profiled once: its functions by own time, the detector's among them
    assert all(any("face_detector.py" in row["function"] for row in run["detector_profile"]) for run in first.values())
    segmented = report["fast_stream"]["segmented"]
    assert segmented["frames"] == 6 and segmented["first_frame_after_first_chunk_s"] > 0
    assert {run["frames"] for run in report["fast_animate"].values()} == {6}
    assert report["seam"]["seams"] >= 1 and report["seam"]["change_inside_segments"] > 0
    assert [len(runs) for runs in report["memory"].values()] == [2, 2, 1, 1]
    assert all(run["host_peak_mib"] > 0 for runs in report["memory"].values() for run in runs)
    assert {run["frames"] for run in report["quality"].values()} == {4}
    assert (tmp_path / "memory.png").stat().st_size > 0
