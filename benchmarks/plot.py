"""Charts of `bench.py` reports: output fps per configuration and where each output frame's time goes.

    python -m hyportrait.benchmarks.plot REPORT.json [REPORT.json ...] --out chart.png

Reports of one device are merged (configurations named in several keep the last). Needs matplotlib
(`pip install matplotlib`; not a runtime dependency).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("unet", "vae_decode", "motion", "preprocess", "encode")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.loads(r.read_text()) for r in a.reports]
    configs = {k: v for r in reports for k, v in r["configs"].items() if "long_video" in v}
    names = list(configs)
    fig, (fps_ax, stage_ax) = plt.subplots(1, 2, figsize=(13, 5))
    fps = [configs[n]["long_video"]["fps"] for n in names]
    gpu_fps = [configs[n]["long_video"]["gpu_fps"] for n in names]
    y = range(len(names))
    fps_ax.barh([i + 0.2 for i in y], gpu_fps, height=0.4, label="GPU stages only", color="#9ecae1")
    fps_ax.barh([i - 0.2 for i in y], fps, height=0.4, label="with preprocessing + encoding", color="#3182bd")
    for i, (f, g) in enumerate(zip(fps, gpu_fps)):
        fps_ax.text(g, i + 0.2, f" {g:.2f}", va="center", fontsize=8)
        fps_ax.text(f, i - 0.2, f" {f:.2f}", va="center", fontsize=8)
    fps_ax.set_yticks(list(y), names)
    fps_ax.invert_yaxis()
    fps_ax.set_xlabel("output frames per second (long video)")
    fps_ax.legend(loc="center right", fontsize=8)
    left = [0.0] * len(names)
    for stage in STAGES:
        ms = [configs[n]["long_video"]["per_frame_ms"][stage] for n in names]
        stage_ax.barh(list(y), ms, left=left, label=stage)
        left = [a + b for a, b in zip(left, ms)]
    stage_ax.set_yticks(list(y), names)
    stage_ax.invert_yaxis()
    stage_ax.set_xlabel("ms per output frame")
    stage_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(STAGES))
    first = reports[0]
    fig.suptitle(f"{first['device']}, {first['date']}, random weights at the official size, 512x512")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
