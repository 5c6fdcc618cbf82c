"""The HTTP API (FastAPI) over a runner: jobs in, status and videos out, health and metrics, the web page.

Every error is JSON `{"error": {"code": ..., "message": ...}}` with the HTTP status of its kind: 400 a
malformed request, 401 a missing or wrong token, 404 an unknown job, 409 a result asked for before it
exists, 413 an upload over the size limit, 422 inputs or options the service refuses, 429 a full queue (with
Retry-After), 503 not ready or shutting down. A refused upload leaves no file behind.

A streamed job's video (`"stream": true`) is answered while the job runs: a chunked response that follows the
fragmented MP4 as it is written and ends with the job (a cancelled or failed job's stream ends after the frames
made so far: a shorter, playable video); once the job is done, the whole file as for any job.
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from hyportrait.errors import HyportraitError, ServeError
from hyportrait.runtime.inputs import load_image
from hyportrait.runtime.video import probe_video

from .jobs import KINDS, Job, JobTable, parse_options
from .options import Limits
from .runner import Runner

WEB_PAGE = Path(__file__).parent / "web" / "index.html"
CHUNK = 2**20
FOLLOW_POLL = 0.05  # seconds between looks at a streamed video's file for new bytes


def _error(code: str, message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _store(upload: UploadFile, path: Path, limit: int, field: str) -> None:
    """Copy an upload into the job's folder in chunks, refusing it once it passes `limit` bytes."""
    written = 0
    upload.file.seek(0)
    with open(path, "wb") as out:
        while chunk := upload.file.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise ServeError("too_large", f"{field} is over the {limit // 2**20} MiB upload limit", 413)
            out.write(chunk)
    if written == 0:
        raise ServeError("bad_input", f"{field} is empty", 422)


async def _opened_while_made(job: Job, path: Path) -> BinaryIO | None:
    """A streamed job's video file, opened once its writer made it (waiting while the job is queued or
    preparing); None when the job ended first. An open file keeps its bytes when a failed job's are removed."""
    while not job.final:
        try:
            return open(path, "rb")  # noqa: ASYNC230 -- a local file: opening it does not wait
        except FileNotFoundError:
            await asyncio.sleep(FOLLOW_POLL)
    return None


async def _follow(job: Job, handle: BinaryIO) -> AsyncIterator[bytes]:
    """The file's bytes as they are written (each fragment of the MP4 as the writer flushes it), until the job
    has ended and every byte is sent: the whole video, or the frames made before a failure or cancellation."""
    with handle:
        while True:
            ended = job.final  # looked at before reading, so the bytes written before the end are all read
            chunk = handle.read(CHUNK)  # new bytes of a local file: no wait worth a thread
            if chunk:
                yield chunk
            elif ended:
                return
            else:
                await asyncio.sleep(FOLLOW_POLL)


def check_inputs(job: Job, limits: Limits) -> None:
    """Refuse, before the job is queued, an image or video the job would fail on or that is over the limits."""
    # the CLI's check, with the service's pixel limit: image_too_large from the header, bad_input when damaged
    load_image(job.image.read_bytes(), limits.max_image_pixels)
    # VideoError (bad_video) for anything that is not a playable video; probed as bytes, so that its message
    # names no path of the service's
    info = probe_video(job.video.read_bytes())
    if max(info.width, info.height) > limits.max_video_side:
        raise ServeError("video_too_large", f"video is {info.width}x{info.height}, over the limit of "
                         f"{limits.max_video_side} pixels a side")
    if info.duration > limits.max_video_seconds:
        raise ServeError("video_too_long", f"video is {info.duration:.1f} s long, over the limit of "
                         f"{limits.max_video_seconds:g} s")
    frames = min(info.num_frames, job.settings.get("max_frames", info.num_frames))
    if frames > limits.max_frames:
        raise ServeError("too_many_frames", f"the job would use {frames} driving frames, over the limit of "
                         f"{limits.max_frames} (set options.max_frames)")
    job.frames_total = frames


async def _prune_periodically(table: JobTable, limits: Limits) -> None:
    """Retention on an idle server too: finished jobs older than --retain-seconds go without waiting for the
    next job to finish."""
    while True:
        await asyncio.sleep(min(60.0, limits.retain_seconds / 4))
        await run_in_threadpool(table.prune)


def create_app(runner: Runner, table: JobTable, limits: Limits, default_mode: str, *,
               token: str | None = None) -> FastAPI:
    """The service's app. `default_mode`: the mode of a job whose options name none;
    `token`: the bearer token /v1/ requests must carry (None: no authentication)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pruning = asyncio.create_task(_prune_periodically(table, limits))
        try:
            yield
        finally:
            pruning.cancel()

    app = FastAPI(title="hyportrait", summary="Portrait animation jobs", docs_url="/docs", redoc_url=None,
                  lifespan=lifespan)
    app.state.runner = runner

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return _error(exc.code, exc.message, exc.status, exc.headers)

    @app.exception_handler(HyportraitError)
    async def input_error(request, exc: HyportraitError):
        return _error(exc.code, exc.message, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(codes.get(exc.status_code, "bad_request"), str(exc.detail), exc.status_code, exc.headers)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if token is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error("unauthorized", "a valid bearer token is required", 401,
                              {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(WEB_PAGE.read_text())

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not runner.ready or not runner.accepting:
            return _error("not_ready", "loading models" if runner.accepting else "shutting down", 503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        body = await run_in_threadpool(runner.metrics.exposition)
        return Response(body, media_type="text/plain; version=0.0.4")

    @app.post("/v1/animations", status_code=202)
    async def submit(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 2 * limits.max_upload_bytes + CHUNK:
            raise ServeError("too_large", f"the request is over the upload limit ({limits.max_upload_bytes // 2**20}"
                             " MiB per file)", 413)
        runner.check_capacity()  # before the upload is read
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServeError("bad_request", "send multipart/form-data with the fields image, video and options", 400)
        try:
            form = await request.form(max_files=2, max_fields=4)
        except HTTPException as exc:  # a broken multipart body, too many parts
            raise ServeError("bad_request", f"malformed form: {exc.detail}", 400) from None
        try:
            image, video, options = form.get("image"), form.get("video"), form.get("options")
            for name, value in (("image", image), ("video", video)):
                if not isinstance(value, UploadFile):
                    raise ServeError("bad_request", f"the field {name} must be a file upload"
                                     + ("" if value is None else ", got text"), 400)
            if options is not None and not isinstance(options, str):
                raise ServeError("bad_request", "the field options must be text (JSON), got a file", 400)
            if unknown := sorted(set(form.keys()) - {"image", "video", "options"}):
                raise ServeError("bad_request", f"unknown field(s) {', '.join(unknown)}", 400)
            mode, settings, stream = parse_options(options, limits, default_mode)
            runner.check_settings(mode, settings)
            job = table.create(mode, settings, stream)
            try:
                await run_in_threadpool(_store, image, job.image, limits.max_upload_bytes, "image")
                await run_in_threadpool(_store, video, job.video, limits.max_upload_bytes, "video")
                await run_in_threadpool(check_inputs, job, limits)
                runner.submit(job)
            except BaseException:
                table.forget(job)
                raise
        finally:
            await form.close()  # the spooled uploads
        return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/animations/{job.id}"})

    @app.get("/v1/animations/{job_id}")
    async def status(job_id: str):
        return table.get(job_id).public()

    @app.get("/v1/animations/{job_id}/video")
    async def video(job_id: str, kind: str = "full"):
        job = table.get(job_id)
        if kind not in KINDS:
            raise ServeError("bad_request", f"kind must be cropped or full, got {kind!r}", 400)
        name = f"{job.id}_{'cropped' if kind == 'cropped' else 'full_resolution'}.mp4"
        if job.stream and not job.final and (handle := await _opened_while_made(job, job.result(kind))):
            # chunked, following the file while it is written; ends when the job does
            return StreamingResponse(_follow(job, handle), media_type="video/mp4",
                                     headers={"Content-Disposition": f'inline; filename="{name}"',
                                              "Cache-Control": "no-store"})
        if job.status in ("failed", "cancelled"):
            raise ServeError("no_result", f"the job {job.status}; it has no video", 409)
        if job.status != "done":
            raise ServeError("not_finished", f"the job is {job.status}; poll /v1/animations/{job.id}", 409,
                             {"Retry-After": "1"})
        return FileResponse(job.result(kind), media_type="video/mp4", filename=name,
                            content_disposition_type="inline")

    @app.delete("/v1/animations/{job_id}")
    async def delete(job_id: str):
        job = table.get(job_id)
        if job.final:  # a finished job: its record and videos are removed
            table.forget(job)
            return {"id": job.id, "status": job.status, "deleted": True}
        await run_in_threadpool(runner.cancel, job)  # it may wait for a job ending meanwhile (files removed)
        return JSONResponse(job.public(), status_code=202)

    return app
