"""Scale-out on Ray Serve: jobs run on `AnimatorReplica`s (one per GPU) behind the same HTTP API.

The HTTP process (`hyportrait serve --ray`) keeps the job table, the queue, the limits and the result files;
it hands each job's inputs to the deployment through a `DeploymentHandle` and reads back a stream of
progress events that ends with the two videos (bytes travel through Ray's object store, so replicas may run
on other hosts with no shared file system). Each replica is a `LocalRunner` over its own Animator, so with
`max_ongoing_requests` 2 the next job is prepared while one denoises. A job whose replica dies (the stream
raises a Ray error) is run again once on another replica, then fails with `worker_lost`: nothing is lost
silently. Ray Serve restarts dead or unhealthy replicas (`check_health`), and autoscales on ongoing requests.
A streamed job's events carry its videos' new bytes as the replica writes them, which the HTTP process appends
to its files (served while they grow); a streamed job whose replica dies after its first bytes fails with
`worker_lost` (its stream cannot restart under a client that already has the beginning).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayError

from hyportrait.runtime.api import Animator

from .jobs import FINAL, KINDS, Job, JobTable
from .options import Limits
from .runner import LocalRunner, Runner, Stopped
from .server import warm_up

HEARTBEAT = 0.5  # seconds between progress events (also how soon the ingress sees a cancellation)
STREAM_POLL = 0.1  # seconds between looks for a streamed job's new bytes
PROGRESS = ("steps_done", "steps_total", "frames_done", "frames_total", "worker")  # an event's counts


class _Growing:
    """The new bytes of a streamed job's videos since the last look. Each file is opened once it exists, and an
    open file keeps its bytes when a failed job's videos are removed."""

    def __init__(self, job: Job):
        self.job, self.handles = job, {}

    def new(self) -> dict[str, bytes]:
        chunks = {}
        for kind in KINDS:
            if kind not in self.handles:
                try:
                    self.handles[kind] = open(self.job.result(kind), "rb")  # noqa: SIM115 -- kept open across looks
                except FileNotFoundError:
                    continue
            if data := self.handles[kind].read():
                chunks[kind] = data
        return chunks

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


@serve.deployment(name="hyportrait-animator")
class AnimatorReplica:
    """One Animator (one GPU): loads and warms the models, then runs the jobs the ingress hands it."""

    def __init__(self, options: dict, limits: Limits):
        self.table = JobTable(Path(tempfile.mkdtemp(prefix="hyportrait-replica-")), limits)
        self.runner = LocalRunner(Animator(**options), self.table, limits)
        warm_up(self.runner, self.table)

    async def run(self, image: bytes, video: bytes, mode: str, settings: dict, stream: bool = False):
        """Progress events ({"status", "steps_done", ...}; a streamed job's with {"chunks": {kind: new bytes}} as
        its videos grow), then {"done": ...} with the videos (a streamed job's were all sent as chunks), or
        {"failed": {"code", "message"}}; a cancelled request cancels the job."""
        job = self.table.create(mode, settings, stream)
        job.image.write_bytes(image)
        job.video.write_bytes(video)
        self.runner.waiting.put(job)
        growing, last = _Growing(job), 0.0
        try:
            while not job.final:
                chunks = growing.new() if stream else {}
                if not stream or chunks or time.monotonic() - last >= HEARTBEAT:
                    last = time.monotonic()
                    yield {"status": job.status, "steps_done": job.steps_done, "steps_total": job.steps_total,
                           "frames_done": job.frames_done, "frames_total": job.frames_total, "worker": job.worker,
                           **({"chunks": chunks} if chunks else {})}
                await asyncio.sleep(STREAM_POLL if stream else HEARTBEAT)
            if stream and (chunks := growing.new()):  # the bytes written since the last look: the end
                yield {"chunks": chunks}
            if job.status == "done":
                videos = {} if stream else {kind: job.result(kind).read_bytes() for kind in KINDS}
                yield {"done": {"timings": job.timings, "frames_total": job.frames_total, **videos}}
            else:
                yield {"failed": job.error or {"code": "cancelled", "message": "cancelled on the replica"}}
        finally:
            growing.close()
            self.runner.cancel(job)  # no-op once it ended; stops it when the request was cancelled
            threading.Thread(target=self._forget_when_final, args=(job,), daemon=True).start()

    def _forget_when_final(self, job: Job) -> None:
        while not job.final:
            time.sleep(0.1)
        self.table.forget(job)

    def __del__(self):
        """Serve calls this when it stops the replica (a scale-down, a redeploy, its shutdown): the replica's job
        folder goes with it (a killed replica's cannot). Also called for a replica whose __init__ failed."""
        table = getattr(self, "table", None)  # None: its __init__ failed before making the folder
        if table is not None:
            shutil.rmtree(table.root, ignore_errors=True)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose pipeline threads died."""
        if not self.runner.alive():
            raise RuntimeError("a pipeline thread of this replica died")


def deployment(args, limits: Limits, options: dict):
    """The replica deployment with the CLI's scaling, placement and health settings, bound to the Animator's
    keyword arguments `options`."""
    settings = {"max_ongoing_requests": args.max_ongoing_requests,
                "health_check_period_s": args.health_check_period,
                "health_check_timeout_s": args.health_check_timeout,
                "ray_actor_options": {"num_gpus": args.gpus_per_replica, "num_cpus": args.cpus_per_replica}}
    if args.autoscale:
        low, high = args.autoscale
        settings["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                          "target_ongoing_requests": args.max_ongoing_requests}
    else:
        settings["num_replicas"] = args.replicas
    return AnimatorReplica.options(**settings).bind(options, limits)


class RayRunner(Runner):
    """Jobs dispatched to the replicas of a Ray Serve deployment of Animators made with `options` (started
    here, on `args.ray_address` or a local Ray), one dispatcher thread per job the replicas can hold at once."""

    def __init__(self, table: JobTable, limits: Limits, args, options: dict):
        super().__init__(table, limits)
        if not ray.is_initialized():
            ray.init(address=args.ray_address, include_dashboard=False)
        serve.start(proxy_location="Disabled")  # HTTP is ours; Serve's proxy is not needed
        self.handle = serve.run(deployment(args, limits, options), name="hyportrait", route_prefix=None)
        replicas = args.autoscale[1] if args.autoscale else args.replicas
        self.slots = replicas * args.max_ongoing_requests
        for index in range(self.slots):
            threading.Thread(target=self._dispatch_loop, name=f"hyportrait-dispatch-{index}", daemon=True).start()
        self.ready = True  # serve.run returned: every replica has loaded and warmed its models

    def parallel_jobs(self) -> int:
        return self.slots

    def _dispatch_loop(self) -> None:
        while True:
            job = self._next()
            try:
                self._dispatch(job)
            except BaseException as exc:  # noqa: BLE001 -- every failure ends the job, never the thread
                self._end(job, exc)

    def _dispatch(self, job: Job) -> None:
        image, video = job.image.read_bytes(), job.video.read_bytes()
        while True:
            try:
                stream = self.handle.options(stream=True).run.remote(image, video, job.mode, job.settings,
                                                                     job.stream)
                for event in stream:
                    if job.cancel.is_set():
                        stream.cancel()
                        raise Stopped(job.stop_code)
                    self._append(job, event.pop("chunks", {}))
                    if "done" in event:
                        return self._store(job, event["done"])
                    if "failed" in event:
                        error = event["failed"]
                        return self._finish(job, "failed", (error["code"], error["message"]))
                    self._progress(job, event)
                raise RayError("the replica's stream ended without a result")
            except RayError as exc:
                if job.stream and job.out.is_dir():
                    lost = f"the job's replica was lost after its stream began ({exc})"
                    return self._finish(job, "failed", ("worker_lost", lost))
                if job.attempts >= 2:
                    return self._finish(job, "failed", ("worker_lost", f"the job's replica was lost twice ({exc})"))
                self._check(job)  # cancelled meanwhile: not run again
                job.attempts += 1  # run again at once, still this dispatcher's job (a DELETE stops it, not ends it)
                job.status, job.steps_done, job.frames_done = "preparing", 0, 0

    @staticmethod
    def _progress(job: Job, event: dict) -> None:
        """A progress event's counts and stage onto the job. A final status is not taken: a replica may read its
        job's status just after the job ended, and only `_store`/`_finish` end the ingress's job (its record,
        metrics and retention)."""
        if job.final:  # cancelled meanwhile: the event is stale
            return
        for key in PROGRESS:
            if key in event:
                setattr(job, key, event[key])
        # nor "queued": the replica's own queue; to the ingress the job is taken (a DELETE of a queued job ends it
        # at once, which only a job no dispatcher holds may be)
        if event.get("status") not in (None, "queued", *FINAL):
            job.status = event["status"]

    @staticmethod
    def _append(job: Job, chunks: dict[str, bytes]) -> None:
        """A streamed job's new bytes, appended to its videos (which the HTTP layer follows)."""
        for kind, data in chunks.items():
            job.out.mkdir(exist_ok=True)
            with open(job.result(kind), "ab") as out:
                out.write(data)

    def _store(self, job: Job, result: dict) -> None:
        job.out.mkdir(exist_ok=True)
        for kind in KINDS if not job.stream else ():  # a streamed job's videos came as chunks
            path = job.result(kind)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(result[kind])
            os.replace(tmp, path)
        job.frames_done = job.frames_total = result["frames_total"]
        job.timings = dict(result["timings"], run=time.time() - job.started)
        self._finish(job, "done")
