"""Several GPUs for one video, over torch.distributed (NCCL on GPUs, gloo on the CPU).

Two schemes, on any number of ranks (one rank is the one-GPU path):
- window: the windows of each sampling step are spread over the ranks; their updates are all-gathered and
  every rank sums them in window order, so the latents are bit for bit those of one GPU (same UNet calls,
  same shapes, same order of the per-frame sums).
- guidance: each UNet call's guidance branches (3, or 2) are split over the ranks and the v-predictions
  all-gathered (one collective per call); the guidance is then combined on every rank as on one GPU. The
  UNet runs at a smaller batch, so its kernels may round differently: close to one GPU, not bit-identical.
Decoding is split by chunks in both; the frames are gathered on rank 0, which alone writes the outputs. The
per-video constants (preprocessing, motion tokens, conditioning) are made once on rank 0 and broadcast.

Workers are started by `torchrun` (`init_from_env`) or spawned by `launch` (what `hyportrait animate --gpus
N` does): one process per GPU, each with its own networks (a torch module, onnxruntime session or TensorRT
engine on its device). A failure on any rank becomes one coded error: a worker that fails exits, and the
launcher (or torchrun) ends the others; collectives time out rather than wait forever.
"""
from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from hyportrait.errors import (
    BackendError,
    DistributedError,
    HyportraitError,
    InputError,
    OptionError,
    WorkerError,
)

from .api import Animator, Prepared
from .backends import Models
from .pipeline import GUIDANCE_BRANCHES, Conditioning, decode_chunks, decoded_chunk, kept_frames

SCHEMES = ("window", "guidance")
DEFAULT_TIMEOUT_S = 900.0  # a collective waits this long (rank 0 preprocesses, the others wait), then fails
# the UNet inputs that carry the guidance batch; the others (timestep, pose map) are shared by the branches
BATCHED_UNET_INPUTS = ("sample", "appearance_tokens", "motion_tokens", "added_time_ids")


@dataclass
class Group:
    """The ranks that work on one video: this process's rank in it, its device, and the torch process group
    (None: the default group). Collectives that fail or time out raise DistributedError."""
    rank: int
    size: int
    device: torch.device
    ranks: tuple[int, ...]  # global rank of each group rank
    handle: object = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, collective: Callable, *args, **kwargs):
        try:
            return collective(*args, group=self.handle, **kwargs)
        except RuntimeError as exc:  # gloo and NCCL report failed peers and timeouts as RuntimeError subclasses
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} failed (another rank failed or "
                                   f"timed out): {str(exc).splitlines()[0][:200]}") from None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._run("all_gather", dist.all_gather, parts, tensor.contiguous())
        return parts

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` on rank 0 (None elsewhere)."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.is_root else None
        self._run("gather", dist.gather, tensor.contiguous(), parts, dst=self.ranks[0])
        return parts

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (received in place; sent from a contiguous copy, as the backends
        send a tensor's storage as it lies)."""
        tensor = tensor.contiguous() if self.is_root else tensor
        self._run("broadcast", dist.broadcast, tensor, src=self.ranks[0])
        return tensor

    def broadcast_object(self, obj):
        box = [obj]
        self._run("broadcast", dist.broadcast_object_list, box, src=self.ranks[0], device=self.device)
        return box[0]

    def barrier(self) -> None:
        self._run("barrier", dist.barrier)

    def subgroups(self, sizes: Sequence[int]) -> dict[int, Group | None]:
        """Groups of this group's first `size` ranks, for each size (None for ranks outside one). Every rank
        must call this (creating a process group is collective)."""
        groups = {}
        for size in sizes:
            handle = dist.new_group(list(self.ranks[:size]))
            groups[size] = replace(self, size=size, ranks=self.ranks[:size], handle=handle) \
                if self.rank < size else None
        return groups


def process_device(device_type: str, local_rank: int) -> torch.device:
    """The device of a worker: GPU `local_rank`, or the CPU."""
    if device_type != "cuda":
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise BackendError(f"worker {local_rank} has no GPU: torch sees {torch.cuda.device_count()}")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_from_env(device_type: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT: what torchrun and `launch` set): NCCL on GPUs, gloo on the CPU."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    device = process_device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    options = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                            **options)
    size = dist.get_world_size()
    return Group(dist.get_rank(), size, device, tuple(range(size)))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


# --- guidance-parallel --------------------------------------------------------------------------------------

def branch_shares(batch: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of each rank's guidance branches: contiguous, as even as possible (3 over 2: 2 and 1)."""
    if batch < size:
        raise InputError(f"guidance-parallel sampling splits the {batch} guidance branch(es) of each UNet call "
                         f"over the GPUs: it needs at most {batch} GPUs, {size} were given (use --parallel window)")
    bounds = [batch * i // size for i in range(size + 1)]  # rank 0, which also writes, gets the smaller share
    return [(bounds[i], bounds[i + 1]) for i in range(size)]


class GuidanceParallelUNet:
    """A `Models.unet` whose call runs this rank's guidance branches and all-gathers every rank's v-predictions
    (padded to the largest share), so each rank returns the whole batch."""

    def __init__(self, unet, group: Group):
        self.name = "unet"
        self.unet = unet
        self.group = group

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        shares = branch_shares(inputs["sample"].shape[0], self.group.size)
        start, stop = shares[self.group.rank]
        mine = self.unet(**{k: v[start:stop] if k in BATCHED_UNET_INPUTS else v for k, v in inputs.items()})
        width = max(b - a for a, b in shares)
        padded = torch.cat([mine, mine.new_zeros((width - (stop - start), *mine.shape[1:]))]) \
            if stop - start < width else mine
        parts = self.group.all_gather(padded)
        return torch.cat([part[:b - a] for part, (a, b) in zip(parts, shares)])


# --- window-parallel ----------------------------------------------------------------------------------------

def window_parallel(group: Group):
    """A `WindowMap` (runtime/sampling.py) that runs windows rank, rank + size, ... here and all-gathers the
    updates, each rank's padded to the same number of windows."""

    def map_windows(update: Callable[[torch.Tensor], torch.Tensor], indices: list[torch.Tensor],
                    x: torch.Tensor) -> list[torch.Tensor]:
        width = math.ceil(len(indices) / group.size)
        local = x.new_zeros((width, len(indices[0]), *x.shape[1:]))
        for slot, k in enumerate(range(group.rank, len(indices), group.size)):
            local[slot] = update(indices[k])
        parts = group.all_gather(local)
        return [parts[k % group.size][k // group.size] for k in range(len(indices))]

    return map_windows


def parallel_decode_frames(models, latents: torch.Tensor, decode_chunk: int, num_pad: int,
                           group: Group) -> Iterator[np.ndarray]:
    """`decode_frames` with the chunks dealt round-robin to the ranks: each round every rank decodes one chunk
    and rank 0 gathers them and yields their frames in order (other ranks yield nothing)."""
    if group.device.type == "cuda":  # this may run on a prefetch worker, whose current device is GPU 0 when new
        torch.cuda.set_device(group.device)
    total = latents.shape[0]
    chunks = decode_chunks(total, decode_chunk, num_pad)
    for first in range(0, len(chunks), group.size):
        round_chunks = chunks[first:first + group.size]
        mine = round_chunks[group.rank] if group.rank < len(round_chunks) else round_chunks[0]
        frames = decoded_chunk(models, latents, *mine)  # ranks without a chunk this round decode a spare
        padded = np.zeros((decode_chunk, *frames.shape[1:]), np.uint8)
        padded[:len(frames)] = frames
        parts = group.gather(torch.from_numpy(padded).to(group.device))
        if parts is None:
            continue
        for (start, stop), part in zip(round_chunks, parts):
            yield from kept_frames(part[:stop - start].cpu().numpy(), start, total, num_pad)


# --- per-video constants ------------------------------------------------------------------------------------

def share_prepared(group: Group, prepared: Prepared | None, error: HyportraitError | None) -> Prepared:
    """Rank 0's prepared video (its conditioning and the sampler's generator state) on every rank, or rank 0's
    error raised on every rank. Rank 0 keeps its own Prepared (with the source image and video info)."""
    if group.is_root:
        head = ("error", error.code, error.message) if error is not None else (
            "ok", {k: (tuple(v.shape), v.dtype) for k, v in _tensors(prepared.conditioning).items()},
            prepared.conditioning.num_pad, prepared.generator.get_state(), prepared.num_frames)
    head = group.broadcast_object(head if group.is_root else None)
    if head[0] == "error":
        raise WorkerError(head[1], head[2])
    _, specs, num_pad, state, num_frames = head
    tensors = _tensors(prepared.conditioning) if group.is_root else {
        k: torch.empty(shape, dtype=dtype, device=group.device) for k, (shape, dtype) in specs.items()}
    for name in specs:  # in rank 0's order on every rank
        group.broadcast(tensors[name])
    if group.is_root:
        return prepared
    generator = torch.Generator(group.device)
    generator.set_state(state)
    return Prepared(None, None, Conditioning(**tensors, num_pad=num_pad), generator, num_frames, 0)


def _tensors(cond: Conditioning) -> dict[str, torch.Tensor]:
    return {k: getattr(cond, k) for k in ("appearance", "image_latent", "ref_latent", "motion", "pose",
                                          "added_time_ids")}


# --- the animator -------------------------------------------------------------------------------------------

def whole_clip(options: dict) -> dict:
    """`options` with segment 0: the ranks sample the whole clip in step (an option, so views keep it); segments
    asked for are refused (as the CLI refuses --segment with --gpus)."""
    if options.get("segment"):
        raise OptionError("segment", f"runs on one GPU: several GPUs sample the whole clip, got {options['segment']}")
    return {**options, "segment": 0}


class ParallelAnimator(Animator):
    """An Animator on one rank of `group`: its networks on this rank's device, the sampling spread by `scheme`
    ("window" or "guidance"), decoding by chunks. Every rank calls `animate` (or iterates `frames`) with the
    same arguments; rank 0 alone reads the inputs and writes the outputs, the others return None (yield
    nothing)."""

    def __init__(self, models=None, *, group: Group, scheme: str = "window", **options):
        if scheme not in SCHEMES:
            raise InputError(f"unknown parallel scheme {scheme!r}: choose {' or '.join(SCHEMES)}")
        if not isinstance(models, Models):  # networks the caller built are already on their device
            options["device"] = str(group.device)
        options["progress"] = options.get("progress", False) and group.is_root
        super().__init__(models, **whole_clip(options))
        self.group, self.scheme = group, scheme
        if scheme == "guidance":
            self._check_branches()
            self.models = replace(self.models, unet=GuidanceParallelUNet(self.models.unet, group))
        elif group.size > 1:
            self.map_windows = window_parallel(group)

    def with_options(self, mode: str | None = None, **options) -> ParallelAnimator:
        view = super().with_options(mode, **whole_clip(options))
        if self.scheme == "guidance":
            view._check_branches()
        return view

    def _check_branches(self) -> None:
        """InputError unless the guidance branches can be shared by the ranks (before any work)."""
        branch_shares(len(GUIDANCE_BRANCHES[self.config.guidance_branches]), self.group.size)

    def prepare(self, image, video) -> Prepared:
        prepared, error = None, None
        if self.group.is_root:
            try:
                prepared = super().prepare(image, video)
            except HyportraitError as exc:  # handed to every rank, so that all of them stop with it
                error = exc
        return share_prepared(self.group, prepared, error)

    def decode(self, prepared: Prepared, latents: torch.Tensor) -> Iterator[np.ndarray]:
        return parallel_decode_frames(self.models, latents, self.config.decode_chunk,
                                      prepared.conditioning.num_pad, self.group)

    def _work(self) -> None:
        """A rank other than 0: its part of sampling and decoding."""
        prepared = self.prepare(None, None)
        for _ in self.decode(prepared, self.sample(prepared)):
            pass

    def animate(self, image, video, out):
        if self.group.is_root:
            return super().animate(image, video, out)
        with self._lock:
            self._work()
        return None

    def frames(self, image, video) -> Iterator[np.ndarray]:
        if self.group.is_root:
            yield from super().frames(image, video)
            return
        with self._lock:
            self._work()


# --- starting workers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Callable, size: int, *args, device_type: str = "cuda", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run `worker(group, *args)` on `size` new processes (one per GPU, or CPU processes with gloo) and return
    rank 0's result. A worker's error ends all of them and is raised here as one coded error (the root cause:
    a coded error before the collective failures it caused in the other ranks).

    CUDA workers are spawned (CUDA cannot be forked); CPU workers are forked, which spares each the seconds
    of importing torch again. Results travel through a pipe: keep them small."""
    import torch.multiprocessing as mp

    if device_type == "cuda" and torch.cuda.device_count() < size:
        raise BackendError(f"{size} GPUs were asked for, torch sees {torch.cuda.device_count()}")
    method = "spawn" if device_type == "cuda" or sys.platform != "linux" else "fork"
    results = mp.get_context(method).SimpleQueue()
    earlier = set(multiprocessing.active_children())
    try:
        with parent_garbage_frozen() if method == "fork" else contextlib.nullcontext():
            context = mp.start_processes(_worker_main, args=(size, free_port(), worker, args, results, device_type,
                                                             timeout_s), nprocs=size, join=False, start_method=method)
    except BaseException:  # an interrupt while starting: the workers started so far are not in a context yet
        _stop([process for process in multiprocessing.active_children() if process not in earlier])
        raise
    messages = []
    try:
        while not context.join(timeout=0.2):
            while not results.empty():
                messages.append(results.get())
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:
        while not results.empty():
            messages.append(results.get())
        errors = [m for m in messages if m[1] == "error"]
        if not errors:
            raise DistributedError(f"worker {exc.error_index} died (exit code "
                                   f"{getattr(exc, 'exit_code', None)}) without an error report") from None
        rank, _, code, message = next((e for e in errors if e[2] != DistributedError.code), errors[0])
        raise WorkerError(code, f"{message} (rank {rank} of {size})") from None
    except BaseException:  # an interrupt (the CLI's SIGINT/SIGTERM): the workers end with it, not after their run
        _stop(context.processes)
        raise
    while not results.empty():
        messages.append(results.get())
    return next(m[2] for m in messages if m[0] == 0)


@contextlib.contextmanager
def parent_garbage_frozen() -> Iterator[None]:
    """For the processes forked in the block: this process's garbage (e.g. a PyAV encoder in an exception's
    reference cycle) is freed here, where its library's threads exist, and what is left is hidden from the
    children's collectors; freed by a forked child's collector, such an encoder waits for its threads forever."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _stop(processes, grace_s: float = 5.0) -> None:
    """SIGTERM to the live workers, SIGKILL to those still alive `grace_s` later (a SIGTERM sent to the parent
    alone, as `docker stop` does, never reaches them; multiprocessing would then wait for their whole run)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline, interrupt = time.monotonic() + grace_s, None
    for process in processes:
        try:  # a second interrupt meanwhile does not spare the workers not yet stopped
            process.join(max(deadline - time.monotonic(), 0))
        except BaseException as exc:  # noqa: BLE001 -- raised below, once every worker was stopped
            interrupt = exc
        if process.is_alive():
            process.kill()
            process.join(grace_s)  # a worker stuck in the driver is not waited for without end
    if interrupt is not None:
        raise interrupt


def _worker_main(rank: int, size: int, port: int, worker: Callable, args: tuple, results, device_type: str,
                 timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type != "cuda":
        # forked: OpenMP's thread pool does not survive a fork (as in torch's DataLoader workers), and N
        # processes share the cores anyway
        torch.set_num_threads(1)
    try:
        group = init_from_env(device_type, timeout_s)
        value = worker(group, *args)
    except HyportraitError as exc:
        results.put((rank, "error", exc.code, exc.message))
        os._exit(1)  # without tearing the process group down: the launcher ends the other ranks
    except Exception as exc:  # noqa: BLE001 -- any failure becomes a one-line report, never a hang
        results.put((rank, "error", DistributedError.code, f"{type(exc).__name__}: {str(exc)[:500]}"))
        os._exit(1)
    results.put((rank, "ok", value if rank == 0 else None))
    dist.destroy_process_group()


def animate_worker(group: Group, scheme: str, options: dict, image, video, out) -> dict | None:
    """One rank of `hyportrait animate --gpus N`: rank 0 returns the result (plain types)."""
    animator = ParallelAnimator(group=group, scheme=scheme, **options)
    result = animator.animate(image, video, out)
    return result.as_dict() if result is not None else None
