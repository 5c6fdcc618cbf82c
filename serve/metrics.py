"""Prometheus metrics of one service (a registry of its own, so that several services can live in a process)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
FPS_BUCKETS = (0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]):
        self.registry = CollectorRegistry()
        Gauge("hyportrait_queue_depth", "jobs waiting to start", registry=self.registry).set_function(queue_depth)
        Gauge("hyportrait_jobs_running", "jobs being prepared, denoised or written",
              registry=self.registry).set_function(running)
        self.jobs = Counter("hyportrait_jobs", "jobs by outcome (done, failed, cancelled, refused)", ["outcome"],
                            registry=self.registry)
        self.latency = Histogram("hyportrait_job_latency_seconds", "submission to result of done jobs",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.fps = Histogram("hyportrait_job_output_fps", "output frames per second of the job's run time "
                             "(start to result)", buckets=FPS_BUCKETS, registry=self.registry)
        self._gpu = Gauge("hyportrait_gpu_memory_bytes", "GPU memory held by this process's tensors "
                          "(allocated) and by torch's cache (reserved)", ["device", "kind"], registry=self.registry)

    def finished(self, outcome: str, latency: float | None = None, fps: float | None = None) -> None:
        self.jobs.labels(outcome).inc()
        if latency is not None:
            self.latency.observe(latency)
        if fps is not None:
            self.fps.observe(fps)

    def exposition(self) -> bytes:
        import torch

        # read at scrape time; a CPU-only process exports no GPU series
        for index in range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0):
            self._gpu.labels(f"cuda:{index}", "allocated").set(torch.cuda.memory_allocated(index))
            self._gpu.labels(f"cuda:{index}", "reserved").set(torch.cuda.memory_reserved(index))
        return generate_latest(self.registry)
