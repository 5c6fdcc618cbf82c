"""One CUDA-graph cache for every torch-driven path (PyTorch modules and TensorRT engines on torch tensors).

`CudaGraphs(run)` captures `run(inputs)` (named CUDA tensors in, a tensor or a dict of tensors out) once per
input-shape key, after a warm-up run on a side stream (cuDNN, cuBLAS and TensorRT do their set-up work
there, outside the capture), and replays it: inputs are copied into the graph's static buffers, outputs are
cloned out of it. Only for computations that depend on input shapes alone.

Calls from several threads (the service overlaps one job's preparation with another's denoising and a third's
decoding, all on the same networks) take turns: the static buffers hold one call's inputs at a time, and the
next call's copy-in waits, on the GPU too, until the last one's outputs were cloned out (its caller may be on
another CUDA stream). TensorRT engines also share one activation-memory block across engines, so their callers
must share one stream, as the runtime's threads do (torch's default stream).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def shape_key(inputs: dict[str, torch.Tensor]) -> tuple:
    """What a captured graph depends on: every input's name, shape and dtype."""
    return tuple(sorted((name, tuple(t.shape), t.dtype) for name, t in inputs.items()))


def _cloned(outputs):
    return {k: v.clone() for k, v in outputs.items()} if isinstance(outputs, dict) else outputs.clone()


class CudaGraphs:
    def __init__(self, run: Callable[[dict[str, torch.Tensor]], object]):
        self.run = run
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], object]] = {}
        self._lock = threading.Lock()
        self._cloned: torch.cuda.Event | None = None  # recorded after each call's outputs are cloned out

    def clear(self) -> None:
        """Forget every capture (e.g. when memory the graphs address was replaced)."""
        self._graphs.clear()

    def __call__(self, inputs: dict[str, torch.Tensor]):
        with self._lock:
            return self._replay(inputs)

    def _replay(self, inputs: dict[str, torch.Tensor]):
        key = shape_key(inputs)
        if key not in self._graphs:
            static = {k: v.clone() for k, v in inputs.items()}
            device = next(iter(static.values())).device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self.run(static)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread-local (as inductor's CUDA graphs): NCCL's watchdog thread may query its events during a
            # capture when several GPUs work on one video (runtime/distributed.py)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.run(static)
            self._graphs[key] = (graph, static, outputs)
        graph, static, outputs = self._graphs[key]
        stream = torch.cuda.current_stream(next(iter(static.values())).device)
        if self._cloned is None:
            self._cloned = torch.cuda.Event()
        stream.wait_event(self._cloned)  # the previous call is out of the graphs (a no-op before any call)
        try:
            for k, v in inputs.items():
                static[k].copy_(v)
            graph.replay()
            return _cloned(outputs)
        finally:
            self._cloned.record(stream)
