"""Jobs of the animation service: request options, limits, the job record and the folders on disk.

A job's id is made here (uuid4 hex) and is the only name a client gives that reaches the file system: it is
checked against ID_PATTERN and looked up in the table before any path is built. Uploads are stored as
`image` and `video` (client file names are never used), results under `out/`, the job's record as
`job.json` (written under a temporary name and renamed). Finished jobs beyond the retention limits are
removed with their folders.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from hyportrait.errors import ServeError
from hyportrait.files import write_json
from hyportrait.runtime.api import MODES
from hyportrait.runtime.pipeline import X264_PRESETS

from .options import Limits

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
FINAL = ("done", "failed", "cancelled")
KINDS = ("cropped", "full")  # a job's two videos


def _number(options: dict, name: str, kind: type, low, high):
    value = options[name]
    # bool is an int in Python: refuse it, and ints where a float is asked are fine
    if isinstance(value, bool) or not isinstance(value, (int,) if kind is int else (int, float)):
        raise ServeError("bad_options", f"option {name} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {json.dumps(value)}")
    if not low <= value <= high:
        raise ServeError("bad_options", f"option {name} must be in [{low}, {high}], got {value}")
    return kind(value)


def _pair(options: dict, name: str) -> tuple[float, float]:
    value = options[name]
    if not isinstance(value, list) or len(value) != 2:
        raise ServeError("bad_options", f"option {name} must be [min, max], got {json.dumps(value)}")
    low, high = (_number({name: v}, name, float, 0.0, 20.0) for v in value)
    return low, high


def _choice(options: dict, name: str, choices) -> str:
    if options[name] not in choices:
        raise ServeError("bad_options", f"option {name} must be one of {', '.join(map(str, choices))}, "
                         f"got {json.dumps(options[name])}")
    return options[name]


def parse_options(text: str | None, limits: Limits, default_mode: str) -> tuple[str, dict, bool]:
    """The `options` form field (JSON with the CLI's option names) -> (mode, the options asked for, as the
    Animator's keywords, stream): a job runs on `Animator.with_options(mode, **options)`, which lays the mode's
    settings under them. `default_mode`: the mode of a job that names none. `stream` (default false in both
    modes: a streamed video is a fragmented MP4 of about twice the bytes, benchmarks/RESULTS.md) runs the job on
    the segmented path and writes its videos as they are made; `segment` and `first_segment` apply to streamed jobs
    only."""
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ServeError("bad_options", f"options is not valid JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise ServeError("bad_options", "options must be a JSON object")
    known = {"mode", "steps", "seed", "guidance", "appearance_guidance", "motion_guidance", "max_frames",
             "decode_chunk", "overlap", "sampler", "guidance_branches", "video_preset", "stream", "segment",
             "first_segment"}
    if unknown := sorted(set(options) - known):
        raise ServeError("bad_options", f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    mode = _choice(options, "mode", tuple(MODES)) if "mode" in options else default_mode
    settings = {}
    for name, target, kind, low, high in (("steps", "num_steps", int, 1, limits.max_steps),
                                          ("seed", "seed", int, 0, 2**63 - 1),
                                          ("max_frames", "max_frames", int, 1, limits.max_frames),
                                          ("decode_chunk", "decode_chunk", int, 1, 64),
                                          ("overlap", "overlap", int, 0, 24),
                                          ("guidance_branches", "guidance_branches", int, 1, 3),
                                          ("segment", "segment", int, 0, limits.max_frames),
                                          ("first_segment", "first_segment", int, 0, limits.max_frames)):
        if name in options:
            settings[target] = _number(options, name, kind, low, high)
    if "guidance" in options:
        scale = _number(options, "guidance", float, 0.0, 20.0)
        settings.update(min_appearance_guidance=scale, max_appearance_guidance=scale,
                        min_motion_guidance=scale, max_motion_guidance=scale)
    for stage in ("appearance", "motion"):
        if f"{stage}_guidance" in options:
            low, high = _pair(options, f"{stage}_guidance")
            settings.update({f"min_{stage}_guidance": low, f"max_{stage}_guidance": high})
    if "sampler" in options:
        settings["sampler"] = _choice(options, "sampler", ("euler", "lcm"))
    if "video_preset" in options:
        settings["video_preset"] = _choice(options, "video_preset", X264_PRESETS)
    stream = options.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError("bad_options", f"option stream must be true or false, got {json.dumps(stream)}")
    for name in ("segment", "first_segment"):
        if name in options and not stream:
            # a job that is not streamed samples the whole clip at once (the pipeline's denoise stage)
            raise ServeError("bad_options", f"option {name} applies to streamed jobs (\"stream\": true)")
    return mode, settings, stream


@dataclass
class Job:
    id: str
    folder: Path
    mode: str | None  # None: the served Animator's own (the warm-up job)
    settings: dict  # the options asked for (`parse_options`)
    stream: bool = False  # videos written (and served) as they are made, as fragmented MP4s
    status: str = "queued"  # queued, preparing, denoising, writing, done, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None  # the current run's start
    finished: float | None = None
    frames_total: int = 0
    frames_done: int = 0
    steps_total: int = 0
    steps_done: int = 0
    timings: dict = field(default_factory=dict)
    error: dict | None = None  # {"code": ..., "message": ...}
    attempts: int = 0  # runs started (a run lost with its worker is retried once)
    worker: str = ""  # host:pid of the process that ran it
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    stop_code: str | None = None  # why `cancel` was set by the service (None: the client's DELETE)

    @property
    def image(self) -> Path:
        return self.folder / "image"

    @property
    def video(self) -> Path:
        return self.folder / "video"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def result(self, kind: str) -> Path:
        return self.out / ("cropped.mp4" if kind == "cropped" else "full_resolution.mp4")

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def fraction(self) -> float:
        """Overall progress in [0, 1]: denoising counts 70 %, writing the frames 30 % (a streamed job, whose
        segments are denoised and written in turn, counts its frames written)."""
        if self.status == "done":
            return 1.0
        if self.stream:
            return round(self.frames_done / self.frames_total, 4) if self.frames_total else 0.0
        steps = self.steps_done / self.steps_total if self.steps_total else 0.0
        frames = self.frames_done / self.frames_total if self.frames_total else 0.0
        return round(0.7 * steps + 0.3 * frames, 4)

    def public(self) -> dict:
        """What GET /v1/animations/{id} answers (no paths)."""
        return {"id": self.id, "status": self.status, "mode": self.mode, "stream": self.stream,
                "created": self.created,
                "finished": self.finished,
                "progress": {"frames_done": self.frames_done, "frames_total": self.frames_total,
                             "steps_done": self.steps_done, "steps_total": self.steps_total,
                             "fraction": self.fraction()},
                "timings": {k: round(v, 4) for k, v in self.timings.items()}, "error": self.error,
                "attempts": self.attempts, "worker": self.worker,
                "videos": ({kind: f"/v1/animations/{self.id}/video?kind={kind}" for kind in KINDS}
                           if self.status == "done" or (self.stream and not self.final) else None)}

    def save(self) -> None:
        """job.json, replaced atomically (a reader never sees half a record)."""
        if not self.folder.is_dir():
            return
        record = {**self.public(), "settings": self.settings}
        try:
            write_json(self.folder / "job.json", record)
        except FileNotFoundError:  # a DELETE removed the folder meanwhile: nothing to record
            pass


class JobTable:
    """Jobs by id, their folders under `root`, and the retention limits."""

    def __init__(self, root: Path, limits: Limits):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def create(self, mode: str | None, settings: dict, stream: bool = False) -> Job:
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir()
        job = Job(job_id, folder, mode, settings, stream)
        with self.lock:
            self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if ID_PATTERN.match(job_id) else None
        if job is None:
            raise ServeError("unknown_job", f"no job {job_id!r}", status=404)
        return job

    def forget(self, job: Job) -> None:
        """Remove a job and its folder (a refused upload, or past retention)."""
        with self.lock:
            self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def finish(self, job: Job, status: str, error: tuple[str, str] | None = None) -> None:
        """End a job. Its status turns final last, once its folder is as it stays: whoever sees it final (a
        client, the warm-up, retention) finds the record written and the inputs and partial videos gone."""
        if error:
            job.error = {"code": error[0], "message": error[1]}
        # inputs are no longer needed once the job ends; the record and the results stay
        for path in (job.image, job.video):
            path.unlink(missing_ok=True)
        if status != "done":  # a streamed job's partial videos (a reader still following one keeps its bytes)
            shutil.rmtree(job.out, ignore_errors=True)
        finished = time.time()
        replace(job, status=status, finished=finished).save()
        job.finished = finished
        job.status = status
        self.prune()

    def prune(self) -> None:
        now = time.time()
        with self.lock:
            # `finished` is set by `finish` only, once the job's folder is settled
            finished = sorted((j for j in self.jobs.values() if j.finished is not None), key=lambda j: j.finished)
        excess = len(finished) - self.limits.retain_jobs
        for index, job in enumerate(finished):
            if index < excess or now - job.finished > self.limits.retain_seconds:
                self.forget(job)

    def counts(self) -> dict[str, int]:
        with self.lock:
            statuses = [j.status for j in self.jobs.values()]
        return {s: statuses.count(s) for s in set(statuses)}
