"""Load test of the HTTP service on the CPU with the tiny random-weight model (loopback only, bounded).

N concurrent clients submit a fixed number of jobs to one service process (uvicorn on 127.0.0.1 in this
process, the same app and runner as `hyportrait serve`), each client waiting for its job to end before the
next; a 429 counts as refused and the client waits Retry-After (capped at 1 s) before its next job. It stops
submitting at the job count or the time limit, then waits (bounded) for the jobs in flight. Every submitted
job must end done, refused (429) or failed with a code: `unaccounted` must be 0. The service's memory (RSS
of this process, sampled every 10 done jobs) shows whether it grows with the jobs. Jobs are the smallest that
run every stage (the tiny model at 64 px, one LCM step, a 256 px portrait and a one-frame driving video
without audio), so that 200 of them take about 5-10 minutes on an idle 2-core CPU. Writes a JSON report and a
chart of the memory over the jobs (matplotlib), and prints a table last.

    nice -n 10 python -m hyportrait.benchmarks.serve_load --jobs 200 --clients 4 --out bench-out/
    ... --no-overlap   # one job at a time: what the pipeline's overlap gains on this machine
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from PIL import Image

from hyportrait.benchmarks.bench import report_header
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.api import Animator
from hyportrait.runtime.video import VideoWriter, read_frames
from hyportrait.serve.app import create_app
from hyportrait.serve.client import Client
from hyportrait.serve.jobs import JobTable
from hyportrait.serve.options import Limits
from hyportrait.serve.runner import LocalRunner
from hyportrait.serve.server import start_in_thread, warm_up

# the smallest tiny-model job that runs every stage: 64 px crops, windows of 4, 1 LCM step, 1 driving frame
TINY_JOB = {"mode": "fast", "size": 64, "window": 4, "overlap": 1, "pad_frames": 1, "num_steps": 1,
            "decode_chunk": 4, "video_preset": "ultrafast"}
PORTRAIT_SIDE = 256  # px: the bundled portrait halved (face detection, paste-back and the full video shrink)
POLL = 0.2  # seconds between a client's status requests (shorter polls spend the 2 cores on HTTP)


def job_inputs(folder: Path) -> tuple[bytes, bytes]:
    """The smallest inputs that run every stage: the bundled portrait at 256 px, and the first frame of the
    bundled driving video as a one-frame video without audio."""
    portrait = io.BytesIO()
    with Image.open(SAMPLE_IMAGE) as image:
        image.convert("RGB").resize((PORTRAIT_SIDE, PORTRAIT_SIDE)).save(portrait, format="JPEG", quality=90)
    video = folder / "one_frame.mp4"
    with VideoWriter(video, 24, preset="ultrafast") as writer:
        for frame in read_frames(SAMPLE_VIDEO, limit=1):
            writer.write(frame)
    return portrait.getvalue(), video.read_bytes()


def percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1]) if len(values) > 1 else (
        values[0] if values else float("nan"))


def run_load(url: str, jobs: int, clients: int, time_limit: float, options: dict, on_done,
             inputs: tuple[bytes, bytes]) -> dict:
    """The clients' loop; returns the outcome of every submitted job and the latencies of the done ones."""
    image, video = inputs
    lock, outcomes, latencies, submitted = threading.Lock(), {}, [], []
    stop_submitting = time.monotonic() + time_limit
    counter = iter(range(jobs))

    def client_loop():
        client = Client(url, timeout=60)
        while time.monotonic() < stop_submitting:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            submitted.append(index)
            tic = time.monotonic()
            response = client.submit(image, video, options)
            if response.status_code == 429:
                outcomes[index] = "refused"
                time.sleep(min(1.0, float(response.headers.get("retry-after", 1))))
                continue
            if response.status_code != 202:
                outcomes[index] = f"error:{response.json()['error']['code']}"
                continue
            try:  # bounded: a job that does not end in 5 minutes stays unaccounted
                job = client.wait(response.json()["id"], seconds=300, poll=POLL)
            except TimeoutError:
                continue
            outcomes[index] = job["status"] if job["status"] == "done" else f"{job['status']}:{job['error']}"
            if job["status"] == "done":
                with lock:
                    latencies.append(time.monotonic() - tic)
                    on_done(len(latencies))
            client.session.delete(f"{url}/v1/animations/{job['id']}", timeout=10)  # results not kept

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    tic = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=time_limit + 330)
    wall = time.monotonic() - tic
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"wall_s": wall, "submitted": len(submitted), "outcomes": counts, "latencies": latencies,
            "time_limit_hit": len(submitted) < jobs}  # submitting stopped before the job count


def plot(memory: list[tuple[int, float]], path: Path, title: str) -> None:
    """The service's RSS over the done jobs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([count for count, _ in memory], [mib for _, mib in memory], marker="o")
    ax.set_xlabel("jobs done")
    ax.set_ylabel("service RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="jobs submitted at most (default 200)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds of submitting at most (default 900: "
                   "a bound; 200 jobs take 5-10 minutes on an idle 2-core CPU)")
    p.add_argument("--queue-size", type=int, default=2, help="the service's queue (default 2: clients beyond "
                   "the pipeline and the queue are refused with 429)")
    p.add_argument("--no-overlap", action="store_true", help="one job at a time (no pipeline overlap)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder of the JSON report")
    a = p.parse_args(argv)
    process = psutil.Process()
    jobs_dir = Path(tempfile.mkdtemp(prefix="hyportrait-load-"))
    limits = Limits(queue_size=a.queue_size, retain_jobs=10)
    animator = Animator(**TINY_JOB)
    table = JobTable(jobs_dir, limits)
    runner = LocalRunner(animator, table, limits, overlap=not a.no_overlap)
    server, url, thread = start_in_thread(create_app(runner, table, limits, "fast"), runner)
    try:
        warm_up(runner, table)
        memory = [(0, process.memory_info().rss)]

        def on_done(done: int) -> None:
            if done % 10 == 0:
                memory.append((done, process.memory_info().rss))

        load = run_load(url, a.jobs, a.clients, a.time_limit, {"max_frames": 1}, on_done, job_inputs(jobs_dir))
        memory.append((len(load["latencies"]), process.memory_info().rss))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        shutil.rmtree(jobs_dir, ignore_errors=True)
    done = load["outcomes"].get("done", 0)
    accounted = sum(load["outcomes"].values())
    half = [rss for count, rss in memory if count >= done / 2]
    report = {**report_header(), "command": "python -m hyportrait.benchmarks.serve_load " + " ".join(argv or []),
              "clients": a.clients, "jobs_asked": a.jobs, "queue_size": a.queue_size, "overlap": not a.no_overlap,
              "job": {**TINY_JOB, "max_frames": 1, "portrait_px": PORTRAIT_SIDE, "driving_frames": 1},
              "poll_s": POLL, "wall_s": round(load["wall_s"], 2), "time_limit_hit": load["time_limit_hit"],
              "submitted": load["submitted"], "outcomes": load["outcomes"],
              "unaccounted": load["submitted"] - accounted,
              "jobs_per_minute": round(60 * done / load["wall_s"], 2),
              "latency_p50_s": round(percentile(load["latencies"], 50), 3),
              "latency_p95_s": round(percentile(load["latencies"], 95), 3),
              "rss_mib": [(count, round(rss / 2**20, 1)) for count, rss in memory],
              "rss_growth_second_half_mib": round((half[-1] - half[0]) / 2**20, 1) if half else None}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"serve_load{'_no_overlap' if a.no_overlap else ''}.json"
    path.write_text(json.dumps(report, indent=1))
    plot(report["rss_mib"], path.with_suffix(".png"), f"{report['date']}, {a.clients} clients, {done} jobs done, "
         f"{report['commit']}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    print(f"{'clients':>8} {'submitted':>9} {'done':>5} {'refused':>7} {'other':>5} {'unacc.':>6} {'jobs/min':>8} "
          f"{'p50 s':>6} {'p95 s':>6} {'RSS MiB first..last':>20}")
    other = load["submitted"] - done - load["outcomes"].get("refused", 0) - report["unaccounted"]
    print(f"{a.clients:>8} {load['submitted']:>9} {done:>5} {load['outcomes'].get('refused', 0):>7} {other:>5} "
          f"{report['unaccounted']:>6} {report['jobs_per_minute']:>8} {report['latency_p50_s']:>6} "
          f"{report['latency_p95_s']:>6} {report['rss_mib'][0][1]:>9}..{report['rss_mib'][-1][1]:<9}")
    return report


if __name__ == "__main__":
    main()
