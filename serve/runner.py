"""Where jobs run: a bounded waiting queue, cancellation, draining, and the outcome of every job.

`LocalRunner` runs jobs on this process's Animator as a three-stage pipeline, one thread per stage, so that
jobs overlap where they can: job N+1 is preprocessed and conditioned while job N denoises, and job N is
decoded and encoded (on the writer threads of `Animator.write`) while job N+1 denoises. Only one job
denoises at a time (the UNet holds the GPU); a stage hands its job on through a queue of one, so at most
three jobs are in flight. A streamed job is prepared, denoised and written segment by segment on the denoise
stage (`Animator.animate_into`), its videos growing as fragmented MP4s that the HTTP layer follows.
`serve/ray_app.py` runs jobs on Ray Serve replicas behind the same interface.
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback

from hyportrait.errors import HyportraitError, OptionError, ServeError
from hyportrait.runtime.api import Animator
from hyportrait.runtime.video import probe_video

from .jobs import Job, JobTable
from .metrics import Metrics
from .options import Limits

log = logging.getLogger("hyportrait.serve")
WORKER = f"{socket.gethostname()}:{os.getpid()}"


class Stopped(Exception):
    """A job stopped by DELETE (code None) or by the shutdown's grace period running out (a code)."""

    def __init__(self, code: str | None = None):
        super().__init__(code)
        self.code = code


def failure(exc: BaseException) -> tuple[str, str]:
    """(code, one-line message) of an exception that ended a job."""
    if isinstance(exc, HyportraitError):
        return exc.code, exc.message
    if "out of memory" in str(exc).lower():
        return "out_of_memory", "the GPU ran out of memory for this job (try fewer frames)"
    log.error("job failed:\n%s", "".join(traceback.format_exception(exc)))
    return "internal", f"{type(exc).__name__}: {exc}"


class Runner:
    """The parts every runner shares: submission with back-pressure, cancellation, draining, outcomes."""

    def __init__(self, table: JobTable, limits: Limits):
        self.table, self.limits = table, limits
        self.waiting: queue.Queue[Job] = queue.Queue()
        self.in_flight: set[str] = set()
        self.accepting = True
        self.ready = False
        self.metrics = Metrics(self.depth, lambda: len(self.in_flight))
        self._latencies: list[float] = []
        # a waiting job is taken by a worker, cancelled, or refused by the drain: exactly one of them. Taken, only
        # its worker ends it
        self._taking = threading.RLock()

    # -- called by the HTTP layer --------------------------------------------------------------------------

    def depth(self) -> int:
        """Jobs waiting to start (a job cancelled while queued stays in the queue until a worker skips it)."""
        return sum(not job.final for job in list(self.waiting.queue))

    def check_capacity(self) -> None:
        """Refuse a new job before its upload is stored: draining (503) or a full queue (429)."""
        if not self.accepting:
            raise ServeError("shutting_down", "the service is shutting down; retry on another instance", 503)
        if not self.ready:
            raise ServeError("not_ready", "the models are still loading; retry shortly", 503,
                             {"Retry-After": "5"})
        if self.depth() >= self.limits.queue_size:
            self.metrics.finished("refused")
            raise ServeError("queue_full", f"{self.depth()} jobs are waiting; retry later", 429,
                             {"Retry-After": str(self.retry_after())})

    def check_settings(self, mode: str, settings: dict) -> None:
        """Refuse (422 bad_options), before the upload is stored, a job's settings the served models cannot run
        in its mode (e.g. a segment shorter than their window). Here none are known: Ray replicas check a job's
        when it runs."""

    def submit(self, job: Job) -> None:
        self.check_capacity()
        job.save()
        self.waiting.put(job)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the recent mean job time times the jobs ahead."""
        mean = sum(self._latencies) / len(self._latencies) if self._latencies else 5.0
        return max(1, round(mean * (self.depth() + 1) / max(1, self.parallel_jobs())))

    def parallel_jobs(self) -> int:
        return 1

    def cancel(self, job: Job) -> None:
        with self._taking:
            if job.final:
                return
            job.cancel.set()
            if job.status == "queued":  # its worker will skip it
                self._finish(job, "cancelled")

    def drain(self, grace: float) -> None:
        """Shutdown: refuse new jobs, fail the waiting ones with `shutting_down`, give the running ones `grace`
        seconds, then stop them with `shutdown_timeout` (their partial files are removed)."""
        with self._taking:  # a worker taking a job from now on refuses it (see `_next`)
            self.accepting = False
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            self._finish(job, "failed", ("shutting_down", "the service shut down before the job started"))
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        for job_id in list(self.in_flight):
            job = self.table.jobs.get(job_id)
            if job is not None:
                job.stop_code = "shutdown_timeout"
                job.cancel.set()
        deadline = time.monotonic() + 30  # a stopped job ends at its next step or frame
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- for the subclasses ---------------------------------------------------------------------------------

    def _next(self) -> Job:
        """The next waiting job that is still wanted (blocks)."""
        while True:
            job = self.waiting.get()
            with self._taking:
                if not self.accepting:  # taken while the drain empties the queue, or put after it did
                    self._finish(job, "failed", ("shutting_down", "the service shut down before the job started"))
                elif not job.final:
                    job.status, job.started = "preparing", time.time()
                    self.in_flight.add(job.id)
                    job.attempts += 1
                    return job

    def _check(self, job: Job) -> None:
        if job.cancel.is_set():
            raise Stopped(job.stop_code)

    def _finish(self, job: Job, status: str, error: tuple[str, str] | None = None) -> None:
        """End a job once (a later end of an ended job is ignored); it leaves `in_flight` after its folder is
        settled, so a drain that waits for `in_flight` to empty never exits mid-finish."""
        with self._taking:
            if not job.final:
                self.table.finish(job, status, error)
                self._count(job, status)
        self.in_flight.discard(job.id)

    def _count(self, job: Job, status: str) -> None:
        latency = job.finished - job.created
        fps = None
        if status == "done":
            self._latencies = (self._latencies + [latency])[-20:]
            run_time = job.timings.get("run", latency)
            fps = job.frames_total / run_time if run_time > 0 else None
        self.metrics.finished(status, latency if status == "done" else None, fps)

    def _end(self, job: Job, exc: BaseException) -> None:
        if isinstance(exc, Stopped):
            if exc.code is None:
                self._finish(job, "cancelled")
            else:
                self._finish(job, "failed", (exc.code, "the service shut down before the job ended"))
        else:
            self._finish(job, "failed", failure(exc))


class LocalRunner(Runner):
    """Jobs on one Animator (one GPU), in a prepare -> denoise -> write pipeline of three threads.
    overlap=False runs one job at a time through the same threads (to measure what the overlap gains)."""

    def __init__(self, animator: Animator, table: JobTable, limits: Limits, overlap: bool = True):
        super().__init__(table, limits)
        self.animator, self.overlap = animator, overlap
        self._to_denoise: queue.Queue = queue.Queue(maxsize=1)
        self._to_write: queue.Queue = queue.Queue(maxsize=1)
        self.threads = [threading.Thread(target=stage, name=f"hyportrait-serve-{name}", daemon=True)
                        for name, stage in (("prepare", self._prepare_loop), ("denoise", self._denoise_loop),
                                            ("write", self._write_loop))]
        for thread in self.threads:
            thread.start()

    def check_settings(self, mode: str, settings: dict) -> None:
        try:
            self.animator.with_options(mode, **settings)
        except OptionError as exc:
            raise ServeError("bad_options", exc.message) from None

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)

    def _prepare_loop(self) -> None:
        while True:
            job = self._next()
            try:
                view = self.animator.with_options(job.mode, **job.settings)
                job.worker = WORKER
                prepared = None  # a streamed job is prepared segment by segment on the denoise stage
                if job.stream:
                    job.frames_total = min(probe_video(job.video).num_frames, view.config.max_frames)
                else:
                    job.steps_total = view.denoise_steps()
                    prepared = view.prepare(job.image, job.video)
                    job.frames_total = prepared.num_frames
                self._check(job)
            except BaseException as exc:  # noqa: BLE001 -- every failure ends the job, never the thread
                self._end(job, exc)
                continue
            self._to_denoise.put((job, view, prepared))
            while not self.overlap and not job.final:
                time.sleep(0.01)

    def _denoise_loop(self) -> None:
        while True:
            job, view, prepared = self._to_denoise.get()

            def on_step(step: int, job=job) -> None:
                job.steps_done += 1
                self._check(job)

            try:
                self._check(job)
                job.status = "denoising"
                if prepared is None:
                    self._stream(job, view)
                    continue
                latents = view.sample(prepared, on_step=on_step)
            except BaseException as exc:  # noqa: BLE001
                self._end(job, exc)
                continue
            self._to_write.put((job, view, prepared, latents))

    def _stream(self, job: Job, view: Animator) -> None:
        """A streamed job, whole: segments denoised and written in turn, the videos written as they are made (a
        cancellation is seen at the next frame; the videos then hold the frames before it)."""
        first_frame = []

        def on_frame() -> None:
            if not first_frame:
                job.status = "writing"
                first_frame.append(time.time() - job.started)
            job.frames_done += 1
            self._check(job)

        result = view.animate_into(job.image, job.video, job.out, stream=True, on_frame=on_frame)
        job.frames_total = result.num_frames
        job.timings = dict(result.timings, first_frame=first_frame[0], run=time.time() - job.started)
        self._finish(job, "done")

    def _write_loop(self) -> None:
        while True:
            job, view, prepared, latents = self._to_write.get()

            def on_frame(job=job) -> None:
                job.frames_done += 1
                self._check(job)

            try:
                self._check(job)
                job.status = "writing"
                result = view.write(prepared, latents, job.video, job.out, on_frame=on_frame)
                job.timings = dict(result.timings, run=time.time() - job.started)
                self._finish(job, "done")
            except BaseException as exc:  # noqa: BLE001
                self._end(job, exc)
