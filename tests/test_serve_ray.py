"""The service on a real local Ray Serve instance (CPU, num_gpus=0): two replicas of the tiny model behind the
same HTTP API, concurrent jobs on both, and a replica killed mid-job (the job is run again, or fails with
worker_lost: never lost silently). One Ray instance and one server for the module."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
import requests
from ray import serve
from test_serve import LIMITS, STREAMED, TINY, follow, slow_driving_video, submit, wait_final

from hyportrait.runtime.video import read_frames
from hyportrait.serve.app import create_app
from hyportrait.serve.jobs import JobTable
from hyportrait.serve.options import Limits
from hyportrait.serve.ray_app import RayRunner
from hyportrait.serve.runner import Runner
from hyportrait.serve.server import start_in_thread

SCALING = Namespace(ray_address=None, replicas=2, autoscale=None, gpus_per_replica=0, cpus_per_replica=1,
                    max_ongoing_requests=1, health_check_period=2.0, health_check_timeout=30.0)


@pytest.fixture(scope="module")
def cluster():
    jobs = Path(tempfile.mkdtemp(prefix="hyportrait-ray-test-"))
    replicas_tmp = Path(tempfile.mkdtemp(prefix="hyportrait-ray-test-tmp-"))  # the replicas' TMPDIR, checked after
    # replicas inherit this process's environment (OMP_NUM_THREADS=1 in the suite's command)
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"TMPDIR": str(replicas_tmp)}})
    try:
        # room to queue: two jobs sent back to back must not meet a 429 before a dispatcher takes the first
        limits = replace(LIMITS, queue_size=4)
        table = JobTable(jobs, limits)
        runner = RayRunner(table, limits, SCALING, TINY)
        app = create_app(runner, table, limits, "fast")
        server, url, thread = start_in_thread(app, runner, grace=0.0)
        yield {"url": url, "runner": runner}
        server.should_exit = True
        thread.join(timeout=10)
    finally:
        serve.shutdown()
        ray.shutdown()
        left = [p.name for p in replicas_tmp.glob("hyportrait-replica-*")]
        shutil.rmtree(jobs, ignore_errors=True)
        shutil.rmtree(replicas_tmp, ignore_errors=True)
    # a replica stopped by Serve removes its job folder; the one test_replica_killed_mid_job killed cannot
    assert len(left) <= 1, left


def test_two_replicas_run_concurrent_jobs(cluster):
    url = cluster["url"]
    assert requests.get(f"{url}/readyz", timeout=5).json() == {"status": "ready"}
    ids = [submit(url).json()["id"] for _ in range(2)]
    jobs = [wait_final(url, job_id, seconds=120) for job_id in ids]
    assert [job["status"] for job in jobs] == ["done", "done"], jobs
    assert len({job["worker"] for job in jobs}) == 2, jobs  # one on each replica
    video = requests.get(f"{url}{jobs[0]['videos']['full']}", timeout=10)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


def test_streamed_job_behind_ray(cluster, tmp_path):
    """The replica's events carry the videos' new bytes; the HTTP process serves them while the job runs."""
    url = cluster["url"]
    video = slow_driving_video(tmp_path / "slow.mp4").read_bytes()
    job_id = submit(url, video=video, options=STREAMED).json()["id"]
    streams: dict = {}
    reader = follow(url, job_id, "full", streams)
    job = wait_final(url, job_id, seconds=120)
    reader.join(timeout=30)
    assert job["status"] == "done", job
    first, streamed, chunks = streams["full"]
    assert first < job["finished"] and chunks > 1, (first, job["finished"], chunks)
    assert streamed == requests.get(f"{url}{job['videos']['full']}", timeout=10).content
    path = tmp_path / "full.mp4"
    path.write_bytes(streamed)
    assert len(list(read_frames(path))) == 12


def test_replica_killed_mid_job_is_retried_or_failed_with_a_code(cluster):
    url = cluster["url"]
    ids = [submit(url, options={"max_frames": 8}).json()["id"] for _ in range(2)]
    deadline = time.monotonic() + 60
    while True:  # wait until the first job runs on a replica, then kill that replica's process
        job = requests.get(f"{url}/v1/animations/{ids[0]}", timeout=5).json()
        if job["worker"] and job["status"] in ("preparing", "denoising", "writing"):
            break
        assert time.monotonic() < deadline and job["status"] != "done", job
        time.sleep(0.05)
    os.kill(int(job["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    killed = wait_final(url, ids[0], seconds=120)
    other = wait_final(url, ids[1], seconds=120)
    assert other["status"] == "done", other
    if killed["status"] == "done":
        assert killed["attempts"] == 2 and killed["worker"] != job["worker"], killed
    else:
        assert killed["error"]["code"] == "worker_lost", killed


class _ReplayedHandle:
    """Our dispatcher's view of a DeploymentHandle (`.options(stream=True).run.remote(...)`), answering call n
    (from 1) with the events of `script(n)`, a generator that may also act between events (a DELETE arriving, a
    replica lost): how the ingress handles what replicas send, without a replica."""

    def __init__(self, script):
        self.script, self.calls = script, 0
        self.run = self

    def options(self, **kwargs):
        return self

    def remote(self, *args):
        self.calls += 1
        return _Events(self.script(self.calls))


class _Events:
    def __init__(self, events):
        self.events = events

    def __iter__(self):
        return iter(self.events)

    def cancel(self) -> None:
        pass


def _dispatcher(tmp_path, limits: Limits) -> RayRunner:
    runner = RayRunner.__new__(RayRunner)  # the dispatcher alone: no Ray, no replica
    Runner.__init__(runner, JobTable(tmp_path, limits), limits)
    return runner


def _taken_job(runner: RayRunner):
    """A submitted job with its inputs, taken from the queue as a dispatch thread takes it."""
    job = runner.table.create("fast", {})
    job.image.write_bytes(b"image")
    job.video.write_bytes(b"video")
    runner.waiting.put(job)
    assert runner._next() is job
    return job


def test_a_final_status_in_a_progress_event_does_not_end_the_job(tmp_path):
    """A replica may read its job's status just after the job ended (a streamed one reads files in between), so
    a progress event can say "done": the ingress's job still ends through its result, with `finished`, its
    record and retention; a job whose status reads final before it is finished does not break retention."""
    runner = _dispatcher(tmp_path, Limits(retain_jobs=1))
    table = runner.table

    def replica(call):
        yield {"status": "done", "steps_done": 1, "steps_total": 1, "frames_done": 4, "frames_total": 4,
               "worker": "w:1"}
        yield {"done": {"timings": {"denoise": 0.1}, "frames_total": 4, "cropped": b"c", "full": b"f"}}

    runner.handle = _ReplayedHandle(replica)
    jobs = []
    for _ in range(2):
        job = _taken_job(runner)
        runner._dispatch(job)
        jobs.append(job)
        assert job.status == "done" and job.finished is not None and job.worker == "w:1"
        assert not job.image.exists() and job.result("full").read_bytes() == b"f"
        assert json.loads((job.folder / "job.json").read_text())["status"] == "done"
    assert list(table.jobs) == [jobs[1].id] and not jobs[0].folder.exists()  # retention ran: one job kept
    running = table.create("fast", {})
    running.status = "done"  # read as final, not finished
    table.prune()
    assert running.id in table.jobs and running.folder.is_dir()


def test_a_delete_stops_a_dispatched_job_through_its_dispatcher(tmp_path):
    """A replica's first event says "queued" (its own queue). The ingress's job stays taken ("preparing"), so a
    DELETE then stops it through its dispatcher instead of ending it under it (which let the dispatcher store
    videos into the ended job, or run it again); a replica lost after the DELETE does not run it again."""
    from ray.exceptions import RayError

    from hyportrait.serve.runner import Stopped

    runner = _dispatcher(tmp_path, Limits())
    job, seen = _taken_job(runner), []

    def replica(call):
        yield {"status": "queued", "steps_done": 0, "frames_done": 0, "worker": "w:1"}
        seen.append(job.status)
        runner.cancel(job)  # the DELETE
        raise RayError("the replica died")

    runner.handle = _ReplayedHandle(replica)
    with pytest.raises(Stopped) as stopped:
        runner._dispatch(job)
    runner._end(job, stopped.value)  # as the dispatch loop does
    assert seen == ["preparing"] and runner.handle.calls == 1
    assert job.status == "cancelled" and not job.out.exists() and not runner.in_flight
    assert 'hyportrait_jobs_total{outcome="cancelled"} 1.0' in runner.metrics.exposition().decode()
