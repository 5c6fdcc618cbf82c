"""The HTTP service on a real uvicorn server (127.0.0.1) over a tiny random-weight Animator: jobs, progress,
videos, metrics, every malformed request, the bounded queue, cancellation, the bearer token, the web page
in a real headless Chromium, and the SIGTERM drain. One server for the whole module (the drain runs last)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
import requests
from PIL import Image

from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime.api import Animator
from hyportrait.runtime.video import VideoWriter, probe_video, read_frames
from hyportrait.serve.app import create_app
from hyportrait.serve.client import Client
from hyportrait.serve.jobs import JobTable
from hyportrait.serve.options import Limits
from hyportrait.serve.runner import LocalRunner
from hyportrait.serve.server import start_in_thread, warm_up

IMAGE = (SAMPLE_IMAGE).read_bytes()
VIDEO = (SAMPLE_VIDEO).read_bytes()  # 256x256, 36 frames, 1.5 s
# the smallest tiny model that runs every stage: 64 px crops, windows of 8, 1 LCM step
TINY = {"mode": "fast", "size": 64, "window": 8, "overlap": 2, "pad_frames": 2, "num_steps": 1,
        "decode_chunk": 4}
LIMITS = Limits(max_upload_bytes=256 * 2**10, max_image_pixels=2048 * 2048, max_video_side=1024, max_frames=30,
                max_video_seconds=3.2, queue_size=1, retain_jobs=50)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def service():
    jobs = Path(tempfile.mkdtemp(prefix="hyportrait-serve-test-"))
    animator = Animator(**TINY)
    table = JobTable(jobs, LIMITS)
    runner = LocalRunner(animator, table, LIMITS)
    server, url, thread = start_in_thread(create_app(runner, table, LIMITS, "fast"), runner, grace=0.0)
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503  # not warm yet
    warm_up(runner, table)
    # the same runner behind a token (a second app: tokens are per service)
    secured, secured_url, secured_thread = start_in_thread(
        create_app(runner, table, LIMITS, "fast", token=TOKEN), runner, grace=0.0)
    yield {"url": url, "runner": runner, "table": table, "jobs": jobs, "server": server, "thread": thread,
           "secured_url": secured_url}
    for srv, th in ((server, thread), (secured, secured_thread)):
        srv.should_exit = True
        th.join(timeout=10)
    shutil.rmtree(jobs, ignore_errors=True)


def submit(url, image=IMAGE, video=VIDEO, options=None, raw_options=None):
    return Client(url).submit(image, video, {"max_frames": 4} if options is None else options, raw_options)


def wait_final(url, job_id, seconds=90) -> dict:
    return Client(url).wait(job_id, seconds)


def error_of(response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json()["error"]["code"] == code, response.text


def test_job_runs_with_progress_videos_and_metrics(service, tmp_path):
    url = service["url"]
    assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "alive"}
    assert requests.get(f"{url}/readyz", timeout=5).json() == {"status": "ready"}
    response = submit(url, options={"max_frames": 4, "seed": 7, "video_preset": "ultrafast"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/animations/{job_id}"
    job = wait_final(url, job_id)
    assert job["status"] == "done", job
    assert job["progress"] == {"frames_done": 4, "frames_total": 4, "steps_done": 1, "steps_total": 1,
                               "fraction": 1.0}
    assert {"preprocess", "conditioning", "denoise", "decode_encode", "run"} <= set(job["timings"])
    for kind, size in (("cropped", 64), ("full", 512)):
        video = requests.get(f"{url}{job['videos'][kind]}", timeout=10)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = tmp_path / f"{kind}.mp4"
        path.write_bytes(video.content)
        info = probe_video(path)
        assert (info.num_frames, info.width) == (4, size)
    folder = service["jobs"] / job_id
    # inputs removed when the job ended; the record and the two videos stay
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "out"]
    assert json.loads((folder / "job.json").read_text())["status"] == "done"
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'hyportrait_jobs_total{outcome="done"}' in metrics
    assert "hyportrait_job_latency_seconds_count" in metrics and "hyportrait_queue_depth 0.0" in metrics
    assert requests.delete(f"{url}/v1/animations/{job_id}", timeout=5).json()["deleted"] is True
    assert not folder.exists()
    error_of(requests.get(f"{url}/v1/animations/{job_id}", timeout=5), 404, "unknown_job")


def _png(width, height) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims width x height pixels (PIL refuses over 2x its 89 MP limit)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + _chunk(b"IEND", b""))


def _png_damaged() -> bytes:
    """A PNG whose header reads but whose pixel data stops half-way, followed by a chunk of no known type
    (PIL's load raises SyntaxError)."""
    png = _png(64, 64)
    start = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[start:start + 4])[0]
    data = png[start + 8:start + 8 + length]
    return png[:start] + _chunk(b"IDAT", data[:length // 2]) + b"\0\0\0\4!!!!abcd\0\0\0\0" + png[start + 12 + length:]


def _video(path: Path, width: int, height: int, frames: int, fps: int) -> bytes:
    with VideoWriter(path, fps, preset="ultrafast") as writer:
        for _ in range(frames):
            writer.write(np.zeros((height, width, 3), np.uint8))
    return path.read_bytes()


def test_an_idle_server_removes_jobs_past_their_retention(service, tmp_path):
    """Retention runs on its own (every quarter of --retain-seconds, at most a minute), not only when the next
    job finishes."""
    from dataclasses import replace

    limits = replace(LIMITS, retain_seconds=0.4)
    table = JobTable(tmp_path / "jobs", limits)
    old, running = table.create(None, {}), table.create(None, {})
    table.finish(old, "done")  # nothing finishes after it: no finish prunes it
    server, _, thread = start_in_thread(create_app(service["runner"], table, limits, "fast"), service["runner"])
    try:
        deadline = time.monotonic() + 10
        while old.folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not old.folder.exists() and old.id not in table.jobs
        assert running.folder.is_dir() and table.get(running.id) is running  # not finished: kept
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_malformed_requests_get_json_errors_and_leave_nothing(service, tmp_path):
    url, jobs, runner = service["url"], service["jobs"], service["runner"]
    before = set(jobs.iterdir())
    post = f"{url}/v1/animations"
    cases = [
        # (response, HTTP status, code)
        (requests.post(post, data={"options": "{}"}, timeout=10), 400, "bad_request"),  # no file
        (requests.post(post, files={"video": ("v.mp4", VIDEO)}, data={"image": "text"}, timeout=10), 400,
         "bad_request"),  # a text field where a file belongs
        (requests.post(post, files={"image": ("a.jpg", IMAGE), "video": ("v.mp4", VIDEO),
                                    "options": ("o.json", b"{}")}, timeout=10), 400, "bad_request"),
        (requests.post(post, json={"image": "x"}, timeout=10), 400, "bad_request"),  # not multipart
        (submit(url, raw_options="{"), 422, "bad_options"),
        (submit(url, options=[1]), 422, "bad_options"),
        (submit(url, options={"stepz": 3}), 422, "bad_options"),
        (submit(url, options={"steps": "4"}), 422, "bad_options"),
        (submit(url, options={"steps": True}), 422, "bad_options"),
        (submit(url, options={"steps": 0}), 422, "bad_options"),
        (submit(url, options={"max_frames": 10**6}), 422, "bad_options"),
        (submit(url, options={"mode": "turbo"}), 422, "bad_options"),
        (submit(url, options={"motion_guidance": [1.0]}), 422, "bad_options"),
        (submit(url, options={"video_preset": "../../x"}), 422, "bad_options"),
        (submit(url, image=b"not an image at all"), 422, "bad_input"),
        (submit(url, image=b""), 422, "bad_input"),
        (submit(url, video=IMAGE), 422, "bad_video"),  # a photo is not a video
        (submit(url, image=_png(3000, 3000)), 422, "image_too_large"),
        (submit(url, image=_png_bomb(20000, 10000)), 422, "image_too_large"),  # refused by PIL from its header
        (submit(url, image=_png_damaged()), 422, "bad_input"),
        (submit(url, video=_video(tmp_path / "wide.mp4", 1100, 64, 2, 24)), 422, "video_too_large"),
        (submit(url, video=_video(tmp_path / "long.mp4", 64, 64, 8, 2)), 422, "video_too_long"),
        (submit(url, options={}), 422, "too_many_frames"),  # all 36 frames, over the limit of 30
        (submit(url, image=os.urandom(300 * 2**10)), 413, "too_large"),  # over the per-file limit
        (submit(url, image=os.urandom(2 * 2**20)), 413, "too_large"),  # refused from Content-Length
        (requests.get(f"{url}/v1/animations/{'0' * 32}", timeout=5), 404, "unknown_job"),
        (requests.get(f"{url}/v1/animations/..%2F..%2Fetc", timeout=5), 404, "not_found"),  # no route
        (requests.get(f"{url}/v1/animations/nope/video", timeout=5), 404, "unknown_job"),
        (requests.delete(f"{url}/v1/animations/nope", timeout=5), 404, "unknown_job"),
        (requests.get(f"{url}/v1/nothing", timeout=5), 404, "not_found"),
        (requests.put(post, timeout=5), 405, "method_not_allowed"),
    ]
    for index, (response, status, code) in enumerate(cases):
        assert response.status_code == status, (index, response.status_code, response.text)
        assert response.json()["error"]["code"] == code, (index, response.text)
        # no path of the service's, no Python object in a message
        assert str(jobs) not in response.text and " object at 0x" not in response.text, (index, response.text)
    assert set(jobs.iterdir()) == before  # no refused upload left a folder
    assert runner.alive() and requests.get(f"{url}/readyz", timeout=5).status_code == 200


def test_full_queue_cancellation_and_results_before_they_exist(service):
    url, jobs = service["url"], service["jobs"]
    accepted, refused = [], None
    for _ in range(12):  # the pipeline holds 3 to 5 jobs (stages and hand-overs), the queue 1: then a 429
        response = submit(url, options={"max_frames": 8})
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])
    assert refused is not None, "the bounded queue never refused a job"
    error_of(refused, 429, "queue_full")
    assert int(refused.headers["retry-after"]) >= 1
    last = accepted[-1]  # waiting in the queue (unless the first job finished meanwhile)
    error_of(requests.get(f"{url}/v1/animations/{last}/video", timeout=5), 409, "not_finished")
    error_of(requests.get(f"{url}/v1/animations/{last}/video?kind=poster", timeout=5), 400, "bad_request")
    statuses, forgotten = [], []
    for job_id in reversed(accepted):  # the queued one first, before a cancelled job frees the pipeline for it
        response = requests.delete(f"{url}/v1/animations/{job_id}", timeout=5)
        if response.status_code == 200:  # it finished meanwhile: its DELETE removes it
            assert response.json()["deleted"] is True and response.json()["status"] == "done", response.text
            forgotten.append(job_id)
            continue
        assert response.status_code == 202, response.text
        statuses.append(response.json()["status"])
    # a queued job ends at once; a started one at its next step (the last may have started if the first finished)
    assert statuses and "queued" not in statuses, statuses
    for job_id in (job_id for job_id in accepted if job_id not in forgotten):
        job = wait_final(url, job_id)
        assert job["status"] in ("cancelled", "done"), job  # the first may have finished before its DELETE
        if job["status"] == "cancelled":
            error_of(requests.get(f"{url}/v1/animations/{job_id}/video", timeout=5), 409, "no_result")
            # a stopped job leaves its record only: no inputs, no partial video
            assert [p.name for p in (jobs / job_id).rglob("*") if p.is_file()] == ["job.json"]
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'hyportrait_jobs_total{outcome="refused"}' in metrics
    assert 'hyportrait_jobs_total{outcome="cancelled"}' in metrics


def bare_runner(tmp_path):
    """The runner's shared part with no worker thread, and two jobs submitted to it: the test is the worker."""
    from dataclasses import replace

    from hyportrait.serve.runner import Runner

    limits = replace(LIMITS, queue_size=2)
    runner = Runner(JobTable(tmp_path / "jobs", limits), limits)
    runner.ready = True
    jobs = [runner.table.create(None, {}) for _ in range(2)]
    for job in jobs:
        runner.submit(job)
    return runner, jobs


def test_a_job_taken_from_the_queue_is_started_before_a_cancel_can_see_it_queued(tmp_path):
    """A DELETE racing a worker taking the job: either the queued job is cancelled (and skipped) or the worker
    has it as started (the cancel then stops it at its next check). The old worker set the job started after
    taking it, so a cancel in between finished it, and the worker then overwrote `cancelled`."""
    from hyportrait.serve.runner import Stopped

    runner, (skipped, taken) = bare_runner(tmp_path)
    runner.cancel(skipped)
    assert skipped.status == "cancelled" and skipped.final
    assert runner._next() is taken  # the cancelled one is skipped
    assert taken.status == "preparing" and taken.started is not None and taken.id in runner.in_flight
    runner.cancel(taken)
    assert not taken.final  # still the worker's: it ends the job
    with pytest.raises(Stopped):
        runner._check(taken)
    runner._end(taken, Stopped())
    assert taken.status == "cancelled" and taken.id not in runner.in_flight


def test_a_job_a_worker_takes_after_the_drain_began_is_refused(tmp_path):
    """A job put in the queue after the drain emptied it (its POST passed the capacity check just before), or
    taken by a worker while the drain ran, is refused (`shutting_down`), not started unseen by the drain."""
    runner, jobs = bare_runner(tmp_path)
    runner.drain(0.0)
    assert [job.error["code"] for job in jobs] == ["shutting_down"] * 2
    late = runner.table.create(None, {})
    runner.waiting.put(late)
    taken = []
    worker = threading.Thread(target=lambda: taken.append(runner._next()), daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while not late.final and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.status == "failed" and late.error["code"] == "shutting_down" and not taken
    runner.accepting = True  # let the worker return: the next job is taken as usual
    wanted = runner.table.create(None, {})
    runner.waiting.put(wanted)
    worker.join(10)
    assert taken == [wanted] and wanted.status == "preparing"


def test_a_job_reads_final_only_once_its_folder_is_settled(tmp_path, monkeypatch):
    """JobTable.finish writes the record and removes the inputs and partial videos before the status turns
    final: the warm-up forgets its job once it reads final, and a client that sees `cancelled` finds only
    job.json (the old order, status first, let the warm-up's rmtree race the record's write)."""
    from hyportrait.serve.jobs import Job

    table = JobTable(tmp_path / "jobs", LIMITS)
    job = table.create(None, {})
    for path in (job.image, job.video, job.out / "full_resolution.mp4"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    seen = []
    save = Job.save

    def watched(record):
        seen.append((job.final, sorted(p.name for p in job.folder.rglob("*"))))
        save(record)

    monkeypatch.setattr(Job, "save", watched)
    table.finish(job, "cancelled")
    assert seen == [(False, [])], seen  # written while not final, the folder already emptied
    assert job.final and json.loads((job.folder / "job.json").read_text())["status"] == "cancelled"
    assert job.finished is not None


def test_the_drain_refuses_waiting_jobs_and_stops_started_ones_with_a_code(tmp_path):
    """The drain: a waiting job fails `shutting_down` at once; a started one is stopped (`shutdown_timeout`)
    after the grace, by its worker at its next check; the drain returns only once that job is ended."""
    runner, (started, waiting) = bare_runner(tmp_path)
    assert runner._next() is started
    drain = threading.Thread(target=runner.drain, args=(0.0,))
    drain.start()
    assert started.cancel.wait(10) and started.stop_code == "shutdown_timeout"
    assert waiting.status == "failed" and waiting.error["code"] == "shutting_down"
    assert drain.is_alive() and not started.final  # the drain waits for the worker
    with pytest.raises(Exception) as stopped:
        runner._check(started)
    runner._end(started, stopped.value)
    drain.join(10)
    assert not drain.is_alive() and started.error["code"] == "shutdown_timeout"
    assert not runner.accepting and not runner.in_flight


def test_bearer_token(service):
    url = service["secured_url"]
    error_of(requests.get(f"{url}/v1/animations/{'0' * 32}", timeout=5), 401, "unauthorized")
    error_of(requests.get(f"{url}/v1/animations/{'0' * 32}", headers={"Authorization": "Bearer wrong"},
                          timeout=5), 401, "unauthorized")
    error_of(submit(url), 401, "unauthorized")
    error_of(requests.get(f"{url}/v1/animations/{'0' * 32}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=5), 404, "unknown_job")
    for open_path in ("/healthz", "/readyz", "/metrics", "/"):
        assert requests.get(f"{url}{open_path}", timeout=5).status_code == 200


class DevTools:
    """Chromium's DevTools protocol over its websocket: commands by id, events skipped."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        result = self("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
def chromium(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's package)")
    profile = tmp_path / "profile"
    # port 0: Chromium binds a free port itself and names it in DevToolsActivePort (no port picked here and
    # bound later, which the other test worker's servers could take meanwhile)
    process = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--mute-audio",
                                "--no-first-run", "--autoplay-policy=no-user-gesture-required",
                                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                                f"--user-data-dir={profile}", "--window-size=900,1100",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                port = int((profile / "DevToolsActivePort").read_text().split()[0])
                pages = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, ValueError, IndexError, requests.ConnectionError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        process.terminate()
        process.wait(timeout=10)


def open_page(chromium, url: str, image: Path, video: Path) -> None:
    """The service's page loaded, with the portrait and the driving video chosen in its file inputs."""
    chromium("Page.navigate", url=f"{url}/")
    deadline = time.monotonic() + 20
    while chromium.eval("document.readyState") != "complete" or not chromium.eval("!!document.getElementById('job')"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    root = chromium("DOM.getDocument")["root"]["nodeId"]
    for selector, path in (("#image", image), ("#video", video)):
        node = chromium("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        chromium("DOM.setFileInputFiles", nodeId=node, files=[str(path)])


def test_web_page_in_headless_chromium(service, chromium, tmp_path):
    url = service["url"]
    image, video = tmp_path / "face.jpg", tmp_path / "drive.mp4"
    image.write_bytes(IMAGE)
    video.write_bytes(VIDEO)
    chromium("Page.enable")
    open_page(chromium, url, image, video)
    chromium.eval("document.getElementById('mode').value = 'fast';"
                  "document.getElementById('max_frames').value = '4';"
                  "document.getElementById('options').value = '{\"stream\": false}';"  # played once done
                  "document.getElementById('submit').click()")
    seen, deadline = set(), time.monotonic() + 90
    while time.monotonic() < deadline:
        state = chromium.eval("({status: document.getElementById('status').textContent,"
                              " progress: document.getElementById('progress').value,"
                              " shown: !document.getElementById('result').hidden,"
                              " time: document.getElementById('player').currentTime,"
                              " width: document.getElementById('player').videoWidth})")
        seen.add(state["status"].split(":")[0])
        if state["shown"] and state["time"] > 0:
            break
        time.sleep(0.1)
    assert state["shown"] and state["time"] > 0 and state["width"] == 512, (state, seen)
    assert state["progress"] == 1 and state["status"].startswith("done"), state
    assert seen & {"uploading", "queued", "preparing", "denoising", "writing"}, seen  # progress was shown
    assert chromium.eval("document.getElementById('download').href").startswith("blob:")
    shot = chromium("Page.captureScreenshot", format="png")["data"]
    target = Path(os.environ.get("HYPORTRAIT_SCREENSHOT", tmp_path / "page.png"))
    target.write_bytes(base64.b64decode(shot))
    assert Image.open(target).size[0] > 0


def slow_driving_video(path: Path, frames: int = 12) -> Path:
    """The sample's first frames at 8 fps (with its audio): a streamed job with segments of 8 frames writes its
    first fragment (a keyframe a second: 8 frames) once its second segment is sampled; with 24 frames a whole
    segment is still to be sampled then (a margin for checks of what comes before the end)."""
    with VideoWriter(path, 8, audio_from=SAMPLE_VIDEO, preset="ultrafast") as writer:
        for frame in read_frames(SAMPLE_VIDEO, limit=frames):
            writer.write(frame)
    return path


STREAMED = {"stream": True, "segment": 8, "video_preset": "ultrafast"}


def follow(url, job_id, kind, into: dict) -> threading.Thread:
    """A streamed GET on a thread: `into[kind]` gets (time of the first bytes, all bytes, chunks). The client's
    timeout is short: it must bound the connection only, not the wait for the next bytes (seconds here)."""
    def run():
        chunks, first = [], None
        for chunk in Client(url, timeout=0.5).stream(job_id, kind):
            first = first or time.time()
            chunks.append(chunk)
        into[kind] = (first, b"".join(chunks), len(chunks))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_streamed_job_is_served_while_it_is_made(service, tmp_path):
    url = service["url"]
    video = slow_driving_video(tmp_path / "slow.mp4").read_bytes()
    error_of(submit(url, video=video, options={"segment": 8}), 422, "bad_options")  # segments need a stream
    error_of(submit(url, video=video, options={"stream": "yes"}), 422, "bad_options")
    error_of(submit(url, video=video, options={"stream": True, "segment": 3}), 422, "bad_options")  # < window
    response = submit(url, video=video, options=STREAMED)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    streams: dict = {}
    readers = [follow(url, job_id, kind, streams) for kind in ("full", "cropped")]
    job = wait_final(url, job_id)
    for reader in readers:
        reader.join(timeout=30)
    assert job["status"] == "done" and job["stream"] is True, job
    assert 0 < job["timings"]["first_frame"] < job["timings"]["run"], job["timings"]
    for kind, size in (("full", 512), ("cropped", 64)):
        first, streamed, chunks = streams[kind]
        assert first < job["finished"], (kind, first, job["finished"])  # bytes came while the job ran
        assert chunks > 1, kind
        whole = requests.get(f"{url}/v1/animations/{job_id}/video?kind={kind}", timeout=10)
        assert whole.status_code == 200 and "content-length" in whole.headers  # done: the file, as for any job
        assert streamed == whole.content, kind  # the stream's bytes are the finished file's
        path = tmp_path / f"{kind}.mp4"
        path.write_bytes(streamed)
        info = probe_video(path)
        assert (info.num_frames, info.width) == (12, size), info
        assert len(list(read_frames(path))) == 12


def test_streamed_job_cancelled_mid_stream(service, tmp_path):
    url, jobs = service["url"], service["jobs"]
    video = slow_driving_video(tmp_path / "slow.mp4", 24).read_bytes()
    job_id = submit(url, video=video, options=STREAMED).json()["id"]
    streams: dict = {}
    reader = follow(url, job_id, "full", streams)
    deadline = time.monotonic() + 60
    # the first segment handed to the writers: the cancel comes while later segments are sampled
    while requests.get(f"{url}/v1/animations/{job_id}", timeout=5).json()["progress"]["frames_done"] < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert requests.delete(f"{url}/v1/animations/{job_id}", timeout=5).status_code == 202
    reader.join(timeout=60)
    job = wait_final(url, job_id)
    assert job["status"] == "cancelled", job
    path = tmp_path / "truncated.mp4"
    path.write_bytes(streams["full"][1])
    frames = len(list(read_frames(path)))  # the stream ended cleanly: a shorter video that plays
    assert 0 < frames < 24, frames
    error_of(requests.get(f"{url}/v1/animations/{job_id}/video", timeout=5), 409, "no_result")
    assert [p.name for p in (jobs / job_id).rglob("*") if p.is_file()] == ["job.json"]  # no partial video kept


def test_web_page_plays_a_streamed_job_while_it_is_made(service, chromium, tmp_path):
    url = service["url"]
    image, video = tmp_path / "face.jpg", slow_driving_video(tmp_path / "drive.mp4", 24)
    image.write_bytes(IMAGE)
    open_page(chromium, url, image, video)
    # when the player first has a frame to show (its clock: this machine's, as the job's `finished`)
    chromium.eval("document.getElementById('player').addEventListener('loadeddata',"
                  " () => { window.firstData = Date.now() / 1000; }, { once: true });"
                  "document.getElementById('mode').value = 'fast';"
                  "document.getElementById('options').value = '{\"segment\": 8, \"steps\": 2}';"
                  "document.getElementById('submit').click()")
    deadline = time.monotonic() + 90
    while not chromium.eval("document.getElementById('status').textContent.startsWith('done')"
                            " && document.getElementById('player').currentTime > 0"):
        assert time.monotonic() < deadline, chromium.eval("document.getElementById('status').textContent")
        time.sleep(0.1)
    job_id = chromium.eval("document.getElementById('job').dataset.id")
    job = requests.get(f"{url}/v1/animations/{job_id}", timeout=5).json()
    assert job["stream"] is True and job["status"] == "done", job
    assert chromium.eval("window.firstData") < job["finished"], job  # it had data before the job ended
    played = chromium.eval("fetch(document.getElementById('download').href).then(r => r.arrayBuffer())"
                           ".then(b => b.byteLength)")
    assert played == len(requests.get(f"{url}{job['videos']['full']}", timeout=10).content)


def test_sigterm_drains(service):
    """Last: the drain stops the module's server. Queued jobs are refused, running ones are stopped with a
    code once the grace period (0 s here) is over, new jobs get 503, and no partial video stays."""
    url, server, jobs = service["url"], service["server"], service["jobs"]
    accepted = []
    for _ in range(12):  # fill the pipeline and the queue: after a 429 the last accepted job is waiting
        response = submit(url, options={"max_frames": 8})
        if response.status_code == 429:
            break
        accepted.append(response.json()["id"])
    assert response.status_code == 429, response.text
    server.handle_exit(signal.SIGTERM, None)
    error_of(submit(url), 503, "shutting_down")
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503
    service["thread"].join(timeout=60)
    assert not service["thread"].is_alive()
    records = [json.loads((jobs / job_id / "job.json").read_text()) for job_id in accepted]
    codes = [record["error"]["code"] if record["error"] else record["status"] for record in records]
    # the waiting jobs were refused, not run (the last may have started if a job finished after the 429);
    # the started ones stopped with a code or finished
    for record, code in zip(records, codes):
        assert code in (("shutdown_timeout", "done") if record["attempts"] else ("shutting_down",)), (record, codes)
    for job_id, code in zip(accepted, codes):
        leftovers = sorted(p.name for p in (jobs / job_id).rglob("*") if p.is_file())
        assert leftovers == (["cropped.mp4", "full_resolution.mp4", "job.json"] if code == "done" else ["job.json"])


def test_serve_command_refuses_a_missing_token_file(tmp_path, capsys):
    from hyportrait.cli import main

    assert main(["serve", "--token-file", str(tmp_path / "none"), "--jobs-dir", str(tmp_path / "jobs")]) == 2
    assert capsys.readouterr().err.startswith("hyportrait: error [bad_input]: cannot read the token file")


def test_serve_command_refuses_a_busy_port_and_bad_numbers_before_loading(tmp_path, capsys):
    """A busy port and an out-of-range number are one coded line naming the port or the flag, before the models
    load: the jobs folder, made first when they do, is never made (nothing is left behind)."""
    from hyportrait.cli import main

    jobs = tmp_path / "jobs"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--jobs-dir", str(jobs)]) == 2
    err = capsys.readouterr().err
    assert err == f"hyportrait: error [bad_input]: cannot listen on 127.0.0.1:{port} (--host, --port): Address " \
                  "already in use\n"
    for flag, value, problem in (("--max-upload-mb", "nan", "between 0.01 and 65536.0, got nan"),
                                 ("--retain-jobs", "-1", "between 1 and 1000000, got -1"),
                                 ("--queue-size", "0", "between 1 and 100000, got 0")):
        assert main(["serve", flag, value, "--jobs-dir", str(jobs)]) == 2
        assert capsys.readouterr().err == f"hyportrait: error [bad_input]: {flag} must be {problem}\n"
    assert not jobs.exists()


def test_a_signal_during_the_warm_up_stops_the_service_at_once(tmp_path):
    """`hyportrait serve` stopped while its models warm up: no client's job to wait for, so the warm-up job is
    stopped at its next step instead of being given --grace (60 s here; minutes of compiling at the official
    size), quietly, and its folder goes."""
    jobs = tmp_path / "jobs"
    process = subprocess.Popen([sys.executable, "-m", "hyportrait", "serve", "--port", "0", "--jobs-dir", str(jobs),
                                "--grace", "60"], stderr=subprocess.PIPE, text=True)
    try:
        line = next(line for line in process.stderr if line.startswith("hyportrait: serving on"))
        url = line.split()[3]  # once the models are loaded, as the warm-up starts
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until uvicorn answers (its signal handlers are in place)
            try:
                requests.get(f"{url}/healthz", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.02)
        assert requests.get(f"{url}/readyz", timeout=5).status_code == 503 and any(jobs.iterdir())  # warming
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0  # "grace 0 s" below shows the 60 s grace was not given
        err = process.stderr.read()
    finally:
        process.kill()
    assert "hyportrait: SIGTERM: draining (grace 0 s)" in err and "error" not in err, err
    assert not any(jobs.iterdir())


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/serve_gpu.py --size tiny: the lead's GPU script on the CPU (the service, overlap on/off), without
    its CLI run (a process that imports and builds everything again: 20 s here; test_cli tests the command)."""
    from hyportrait.benchmarks import serve_gpu

    report = serve_gpu.main(["--size", "tiny", "--out", str(tmp_path), "--clip-seconds", "0.2", "--jobs", "1",
                             "--cli-runs", "0"])
    assert report["clip_frames"] == 5 and "cli" not in report and report["service_vs_cli"] is None
    for run in ("service_overlap", "service_serial"):
        assert report[run]["jobs_per_minute"] > 0 and report[run]["mean_stage_s"]["denoise"] > 0
    assert json.loads((tmp_path / "serve_gpu_tiny.json").read_text())["overlap_gain"] == report["overlap_gain"]


def test_load_benchmark_dry_run(tmp_path):
    """benchmarks/serve_load.py on 3 jobs: every job accounted for, the report and the memory chart written."""
    from hyportrait.benchmarks import serve_load

    report = serve_load.main(["--jobs", "3", "--clients", "2", "--out", str(tmp_path)])
    assert report["submitted"] == 3 and report["unaccounted"] == 0 and not report["time_limit_hit"], report
    assert set(report["outcomes"]) <= {"done", "refused"} and report["outcomes"].get("done", 0) >= 1, report
    assert report["latency_p50_s"] > 0 and report["rss_mib"][0][0] == 0 and report["rss_mib"][-1][1] > 0
    assert json.loads((tmp_path / "serve_load.json").read_text())["outcomes"] == report["outcomes"]
    assert Image.open(tmp_path / "serve_load.png").size[0] > 0
