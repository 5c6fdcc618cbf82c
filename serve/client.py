"""A small Python client of the service's HTTP API (used by the benchmarks; a starting point for callers).

    from hyportrait.serve.client import Client
    client = Client("http://127.0.0.1:8000", token=None)
    job = client.wait(client.submit(image_bytes, video_bytes, {"mode": "fast"}).json()["id"])
    mp4 = client.video(job["id"], "full")
    for chunk in client.stream(job_id, "full"): ...  # a streamed job's video while it is made
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

import requests

FINAL = ("done", "failed", "cancelled")


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def submit(self, image: bytes, video: bytes, options: dict | None = None,
               raw_options: str | None = None) -> requests.Response:
        """POST /v1/animations; the response as it came: 202 with the job (`.json()["id"]`), or an error with
        its code (a 429 or 503 carries Retry-After)."""
        files = {"image": ("image", image), "video": ("video", video)}
        data = {"options": raw_options if raw_options is not None else json.dumps(options or {})}
        return self.session.post(f"{self.url}/v1/animations", files=files, data=data, timeout=self.timeout)

    def status(self, job_id: str) -> dict:
        return self.session.get(f"{self.url}/v1/animations/{job_id}", timeout=self.timeout).json()

    def wait(self, job_id: str, seconds: float = 600.0, poll: float = 0.1) -> dict:
        """The job's status once it ended (done, failed or cancelled); TimeoutError after `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            job = self.status(job_id)
            if job.get("status") in FINAL or ("error" in job and "status" not in job):  # ended, or unknown
                return job
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} did not end in {seconds} s")

    def video(self, job_id: str, kind: str = "full") -> bytes:
        response = self.session.get(f"{self.url}/v1/animations/{job_id}/video", params={"kind": kind},
                                    timeout=self.timeout)
        response.raise_for_status()
        return response.content

    def stream(self, job_id: str, kind: str = "full", read_timeout: float | None = None) -> Iterator[bytes]:
        """The video's bytes as they arrive: a streamed job's while it is made (ending with the job: the whole
        video, or the frames made before a failure), else the finished file. requests.HTTPError for an error.
        read_timeout: the longest wait for the next bytes (None: as long as the job runs; its first fragment
        comes once a second of video is made, minutes on a CPU)."""
        with self.session.get(f"{self.url}/v1/animations/{job_id}/video", params={"kind": kind}, stream=True,
                              timeout=(self.timeout, read_timeout)) as response:
            response.raise_for_status()
            yield from response.iter_content(None)  # each chunk as it comes
