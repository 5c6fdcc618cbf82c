"""`hyportrait serve`: load and warm the models once, then answer HTTP on uvicorn until SIGTERM drains it."""
from __future__ import annotations

import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from hyportrait.errors import HyportraitError, InputError, describe
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO, check_output_folder
from hyportrait.runtime.pipeline import check_range

from .jobs import ID_PATTERN, JobTable
from .options import RANGES, Limits, limits_from
from .runner import Runner

WARMUP_FRAMES = 4


def animator_options(args) -> dict:
    """Animator keyword arguments of the CLI's model options (built here, or by each Ray replica)."""
    return {"models": args.models, "backend": args.backend, "weights": args.weights, "device": args.device,
            "precision": args.precision, "mode": args.mode, "lora": args.lora, "faithful": not args.rewrites,
            "cuda_graph": args.cuda_graph, "compile": args.compile}


def warm_up(runner: Runner, table: JobTable) -> None:
    """One short job on the bundled sample through the runner (loads kernels, compiles with --compile);
    the service is ready once it is done."""
    job = table.create(None, {"max_frames": WARMUP_FRAMES})
    shutil.copyfile(SAMPLE_IMAGE, job.image)
    shutil.copyfile(SAMPLE_VIDEO, job.video)
    runner.waiting.put(job)
    while not job.final:
        time.sleep(0.05)
    table.forget(job)
    if job.status != "done":
        raise InputError(f"the warm-up job failed: {job.error['code']}: {job.error['message']}")
    runner.ready = True


def remove_stale_jobs(root: Path) -> None:
    """Job folders of an earlier process (its ids are unknown to this one, so nothing could serve them)."""
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and ID_PATTERN.match(folder.name):
                shutil.rmtree(folder, ignore_errors=True)


def make_jobs_dir(folder: Path) -> None:
    """--jobs-dir found or made before any model loads: a file in its place, or a place no folder can be made
    (under /proc), is one bad_input line (it was an OSError's traceback after the load)."""
    check_output_folder(folder, f"--jobs-dir {folder}")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--jobs-dir {folder}: cannot be created ({describe(exc)})") from None


def check_numbers(args) -> None:
    """Every number of the command line in its range (options.RANGES), named by its flag (bad_input)."""
    for flag, _, _ in RANGES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:  # --autoscale not given
            continue
        for item in value if isinstance(value, list) else [value]:  # --autoscale: MIN MAX
            check_range(flag, item, RANGES)
    if args.autoscale and args.autoscale[1] < max(args.autoscale[0], 1):
        raise InputError(f"--autoscale MIN MAX needs MAX >= MIN and MAX >= 1, got {args.autoscale[0]} "
                         f"{args.autoscale[1]}")


def listen(host: str, port: int) -> socket.socket:
    """The service's socket, listening before the models load: a busy port (or an address this machine does not
    have) is one coded line at once, not uvicorn's error after the load and warm-up."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a port in TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen()  # connections wait in the backlog while the models load; uvicorn accepts them
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} (--host, --port): {describe(exc)}") from None
    return sock


def build(args, limits: Limits) -> tuple[Runner, JobTable]:
    remove_stale_jobs(args.jobs_dir)
    table = JobTable(args.jobs_dir, limits)
    if args.ray:
        from .ray_app import RayRunner

        runner = RayRunner(table, limits, args, animator_options(args))
    else:
        from hyportrait.runtime.api import Animator

        from .runner import LocalRunner

        runner = LocalRunner(Animator(**animator_options(args)), table, limits, overlap=not args.no_overlap)
    return runner, table


def main(args) -> int:
    from .app import create_app

    check_numbers(args)  # before anything loads
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise InputError(f"cannot read the token file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise InputError(f"the token file {args.token_file} is empty")
    limits = limits_from(args)
    with listen(args.host, args.port) as sock:
        make_jobs_dir(args.jobs_dir)
        runner, table = build(args, limits)
        app = create_app(runner, table, limits, args.mode, token=token)
        server = DrainingServer(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5), runner,
                                args.grace)
        failed = []

        def warm_or_stop():
            try:
                warm_up(runner, table)
            except HyportraitError as exc:
                if server.draining:  # stopped by a signal: not a failure of the warm-up
                    return
                print(f"hyportrait: error [{exc.code}]: {exc.message}", file=sys.stderr)
                failed.append(exc)
                server.should_exit = True

        warming = threading.Thread(target=warm_or_stop, daemon=True, name="hyportrait-warmup")
        if not runner.ready:  # the port answers /healthz (and 503 on /readyz) while the models warm up
            warming.start()
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"hyportrait: serving on http://{host}:{sock.getsockname()[1]} (/readyz: 200 once warm)",
              file=sys.stderr)
        server.run(sockets=[sock])
        if warming.is_alive():  # stopped while warming: its job ended, its folder goes before the process does
            warming.join(10)
    return 2 if failed else 0


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT first draining the runner (status and videos are still answered meanwhile),
    then stopping the server (during the warm-up, at once: no client's job to wait for); a second signal stops
    at once."""

    def __init__(self, config: uvicorn.Config, runner: Runner, grace: float):
        super().__init__(config)
        self.runner, self.grace, self.draining = runner, grace, False

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.runner.accepting = False  # now, not when the drain thread runs: a job sent after the signal gets 503
        # still warming up: no client's job to wait for; the warm-up job stops at its next step
        grace = self.grace if self.runner.ready else 0.0
        print(f"hyportrait: {signal.Signals(sig).name}: draining (grace {grace:g} s)", file=sys.stderr)
        threading.Thread(target=self._drain, args=(grace,), name="hyportrait-drain", daemon=True).start()

    def _drain(self, grace: float) -> None:
        self.runner.drain(grace)
        self.should_exit = True


def start_in_thread(app, runner: Runner, grace: float = 0.0) -> tuple[DrainingServer, str, threading.Thread]:
    """The app on uvicorn in a thread of this process, on a free port of 127.0.0.1 (tests and benchmarks);
    returns the server, its URL and its thread once it listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), runner, grace)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="hyportrait-uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}", thread
