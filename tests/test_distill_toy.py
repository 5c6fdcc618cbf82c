"""The proof (distill/toy.py) on the CPU: a tiny teacher trained by the trainer, distilled, the table's pass
line met by the student and failed by both negative controls, then the seam benchmark on the trained toy. Alone in
its file: `make test` starts it first on one worker (about 400 s of one core)."""
import json

import torch

from hyportrait.benchmarks import seam_toy
from hyportrait.distill.toy import run_toy


def test_toy_student_passes_and_controls_fail(tmp_path):
    """About 4 minutes of one core. One thread, as the recipe was measured (thread counts change float sums,
    which 850 training steps carry into the table's last digits)."""
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = run_toy(tmp_path / "toy", "cpu", print_fn=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert lines[-1].startswith("verdict: PASS"), "\n".join(lines)
    assert table["student_passes"] and table["controls_fail"]
    rows = {r["run"]: r for r in table["rows"]}
    assert rows["control lr=0 4, no guidance"]["passes"] is False
    assert rows["control same-sigma target 4, no guidance"]["passes"] is False
    assert json.loads((tmp_path / "toy" / "table.json").read_text())["verdict"] is True
    assert (tmp_path / "toy" / "frames.png").stat().st_size > 0
    # the seam benchmark on the trained toy (benchmarks/seam_toy.py), one short clip
    report = seam_toy.main(["--toy", str(tmp_path / "toy"), "--out", str(tmp_path / "seam"), "--frames", "12",
                            "--clips", "1"])
    assert report["seams_per_clip"] >= 1 and report["seam"]["ratio"] > 0
    assert json.loads((tmp_path / "seam" / "seam_toy.json").read_text())["frames"] == 12
