"""Load test of the HTTP service on the CPU with the tiny random-weight model (loopback only, bounded).

N concurrent clients submit a fixed number of jobs to one service process (uvicorn on 127.0.0.1 in this
process, the same app and runner as `hyportrait serve`), each client waiting for its job to end before the
next; a 429 counts as refused and the client waits Retry-After (capped at 1 s) before its next job. It stops
submitting at the job count or the time limit, then waits (bounded) for the jobs in flight. Every submitted
job must end done, refused (429) or failed with a code: `unaccounted` must be 0. The service's memory (RSS
of this process, sampled while the jobs run) shows whether it grows with the jobs. Writes a JSON report and
prints a table last.

    nice -n 10 python -m hyportrait.benchmarks.serve_load --jobs 200 --clients 4 --out bench-out/
    ... --no-overlap   # one job at a time: what the pipeline's overlap gains on this machine
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

import hyportrait
from hyportrait.benchmarks.bench import report_header
from hyportrait.runtime.api import Animator
from hyportrait.serve.app import create_app
from hyportrait.serve.client import Client
from hyportrait.serve.jobs import JobTable, mode_settings
from hyportrait.serve.options import Limits
from hyportrait.serve.runner import LocalRunner
from hyportrait.serve.server import start_in_thread, warm_up

ASSETS = Path(hyportrait.__file__).parent / "assets"
# the smallest tiny-model job that runs every stage: 64 px crops, windows of 4, 1 LCM step, 1 driving frame
TINY_JOB = {"mode": "fast", "size": 64, "window": 4, "overlap": 1, "pad_frames": 1, "num_steps": 1,
            "decode_chunk": 4, "video_preset": "ultrafast"}


def percentile(values: list[float], q: float) -> float:
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1]) if len(values) > 1 else (
        values[0] if values else float("nan"))


def run_load(url: str, jobs: int, clients: int, time_limit: float, options: dict, on_done) -> dict:
    """The clients' loop; returns the outcome of every submitted job and the latencies of the done ones."""
    image, video = (ASSETS / "sample_portrait.jpg").read_bytes(), (ASSETS / "sample_driving.mp4").read_bytes()
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
                job = client.wait(response.json()["id"], seconds=300, poll=0.05)
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
    return {"wall_s": wall, "submitted": len(submitted), "outcomes": counts, "latencies": latencies}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="jobs submitted at most (default 200)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds of submitting at most (default 240)")
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
    server, url, thread = start_in_thread(create_app(runner, table, limits, mode_settings("fast", True)), runner)
    try:
        warm_up(runner, table)
        memory = [(0, process.memory_info().rss)]

        def on_done(done: int) -> None:
            if done % 10 == 0:
                memory.append((done, process.memory_info().rss))

        load = run_load(url, a.jobs, a.clients, a.time_limit, {"max_frames": 1}, on_done)
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
              "job": {**TINY_JOB, "max_frames": 1}, "wall_s": round(load["wall_s"], 2),
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
    print(f"wrote {path}")
    print(f"{'clients':>8} {'submitted':>9} {'done':>5} {'refused':>7} {'other':>5} {'unacc.':>6} {'jobs/min':>8} "
          f"{'p50 s':>6} {'p95 s':>6} {'RSS MiB first..last':>20}")
    other = load["submitted"] - done - load["outcomes"].get("refused", 0) - report["unaccounted"]
    print(f"{a.clients:>8} {load['submitted']:>9} {done:>5} {load['outcomes'].get('refused', 0):>7} {other:>5} "
          f"{report['unaccounted']:>6} {report['jobs_per_minute']:>8} {report['latency_p50_s']:>6} "
          f"{report['latency_p95_s']:>6} {report['rss_mib'][0][1]:>9}..{report['rss_mib'][-1][1]:<9}")
    return report


if __name__ == "__main__":
    main()
