"""Sampling over several processes (runtime/distributed.py) with gloo on the CPU and the tiny networks: the same
latents and frames as one process, one coded error when a rank fails.

Each test is one multi-process run (CPU workers are forked from the test process and share its networks);
every rank records its checks in a JSON file that the test reads after the run."""
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from hyportrait.benchmarks import multigpu_gpu
from hyportrait.cli import main as cli_main
from hyportrait.errors import InputError, OptionError, WorkerError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.runtime import distributed
from hyportrait.runtime.api import Animator, Prepared
from hyportrait.runtime.distributed import GuidanceParallelUNet, ParallelAnimator, branch_shares
from hyportrait.runtime.pipeline import (
    AnimateConfig,
    build_conditioning,
    decode_frames,
    motion_tokens,
    sample_latents,
)
from hyportrait.runtime.video import read_frames

# 3 driving frames + 2 x 2 pads = 7 latents: 3 windows of 4 frames per step, 2 decode chunks of 2
CONFIG = {"size": 64, "window": 4, "overlap": 1, "num_steps": 1, "pad_frames": 2, "decode_chunk": 2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CPU workers run one thread each (OpenMP's pool does not survive their fork); the one-process references
    here too, since a CPU kernel's rounding depends on its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


class SplitUNet:
    """The one-process counterpart of guidance-parallel sampling: the UNet called on the same branch shares,
    one after another."""

    def __init__(self, unet, size: int):
        self.unet, self.size = unet, size

    def __call__(self, **inputs):
        shares = branch_shares(inputs["sample"].shape[0], self.size)
        return torch.cat([self.unet(**{k: v[a:b] if k in distributed.BATCHED_UNET_INPUTS else v
                                       for k, v in inputs.items()}) for a, b in shares])


def test_branch_shares():
    assert branch_shares(3, 1) == [(0, 3)]
    assert branch_shares(3, 2) == [(0, 1), (1, 3)]
    assert branch_shares(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(InputError, match="at most 1 GPUs"):
        branch_shares(1, 2)


def test_sampling_over_2_and_3_processes_matches_one_process(models, tmp_path):
    config = AnimateConfig(**CONFIG, device="cpu", precision="fp32")
    lcm = replace(config, sampler="lcm", guidance_branches=1)
    gen = torch.Generator().manual_seed(0)
    motion = motion_tokens(models, torch.rand(3, 3, 256, 256, generator=gen), torch.rand(3, 3, 256, 256, generator=gen),
                           3, 7)
    cond = build_conditioning(models, config, ref_image=torch.rand(3, 64, 64, generator=gen) * 2 - 1,
                              dino_image=torch.randn(3, 224, 224, generator=gen), id_embedding=torch.zeros(512),
                              motion=motion, generator=torch.Generator().manual_seed(1))

    def latents(config, map_windows=None, unet=None):
        chosen = replace(models, unet=unet) if unet is not None else models
        return sample_latents(chosen, cond, config, torch.Generator().manual_seed(5), map_windows=map_windows)

    euler, fast = latents(config), latents(lcm)
    split = {size: latents(config, unet=SplitUNet(models.unet, size)) for size in (2, 3)}
    frames = np.stack(list(decode_frames(models, euler, config, cond.num_pad)))
    generator = torch.Generator().manual_seed(9)
    torch.randn(3, generator=generator)

    def worker(group):
        groups = group.subgroups([2, 3])
        checks = {}
        for size, sub in groups.items():
            if sub is None:
                continue
            checks[f"window_euler_{size}"] = torch.equal(latents(config, distributed.window_parallel(sub)), euler)
            guided = latents(config, unet=GuidanceParallelUNet(models.unet, sub))
            checks[f"guidance_{size}_equals_split_calls"] = torch.equal(guided, split[size])
            checks[f"guidance_{size}_close"] = torch.allclose(guided, euler, rtol=1e-3, atol=1e-3)
            decoded = list(distributed.parallel_decode_frames(models, euler, config.decode_chunk, cond.num_pad, sub))
            checks[f"decode_{size}"] = bool(np.array_equal(np.stack(decoded), frames)) if sub.is_root \
                else decoded == []
        checks["window_lcm_3"] = torch.equal(latents(lcm, distributed.window_parallel(groups[3])), fast)
        mine = Prepared(None, None, cond, generator, 3, 0) if group.is_root else None
        shared = distributed.share_prepared(group, mine, None)
        checks["conditioning_shared"] = all(torch.equal(getattr(shared.conditioning, k), getattr(cond, k))
                                            for k in ("appearance", "image_latent", "ref_latent", "motion", "pose",
                                                      "added_time_ids"))
        checks["generator_shared"] = torch.equal(shared.generator.get_state(), generator.get_state())
        (tmp_path / f"rank{group.rank}.json").write_text(json.dumps(checks))
        if group.rank == 2:  # a failure on one rank while the others wait in a collective
            raise InputError("rank 2 cannot go on")
        group.barrier()

    with pytest.raises(WorkerError, match=r"rank 2 cannot go on \(rank 2 of 3\)") as failure:
        distributed.launch(worker, 3, device_type="cpu", timeout_s=60)
    assert failure.value.code == "bad_input"
    for rank in range(3):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(checks) == (11 if rank < 2 else 7), checks
        assert [k for k, ok in checks.items() if not ok] == [], rank


class _Interrupted(Exception):
    pass


def _sleep(group):
    time.sleep(120)


def test_an_interrupted_launch_ends_its_workers():
    """An interrupt of the parent's wait (the CLI turns SIGTERM into an exception; a SIGTERM to the parent alone
    never reaches the workers) ends the workers too, instead of the parent waiting out their run at exit."""
    def interrupted(signum, frame):
        raise _Interrupted

    def interrupt_once_running():  # not on a fixed timer: a slow start-up must not meet the interrupt
        deadline = time.monotonic() + 60
        while len(multiprocessing.active_children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # `launch` is waiting on its workers by now
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    assert not multiprocessing.active_children()  # none left by an earlier test
    handler = signal.signal(signal.SIGUSR1, interrupted)
    timer = threading.Thread(target=interrupt_once_running, daemon=True)
    timer.start()
    try:
        tic = time.monotonic()
        with pytest.raises(_Interrupted):
            distributed.launch(_sleep, 2, device_type="cpu", timeout_s=60)
        assert not multiprocessing.active_children() and time.monotonic() - tic < 60
    finally:
        timer.join(70)
        signal.signal(signal.SIGUSR1, handler)


def test_an_interrupt_while_the_workers_start_ends_those_started(monkeypatch):
    """The interrupt lands after the workers were started but before `launch` holds them (inside torch's
    start_processes): they are ended too, not left running their whole job."""
    import torch.multiprocessing as mp

    start = mp.start_processes

    def interrupted_after_starting(*args, **kwargs):
        start(*args, **kwargs)
        raise _Interrupted

    assert not multiprocessing.active_children()  # none left by an earlier test
    monkeypatch.setattr(mp, "start_processes", interrupted_after_starting)
    with pytest.raises(_Interrupted):
        distributed.launch(_sleep, 2, device_type="cpu", timeout_s=60)
    assert not multiprocessing.active_children()


# a PyAV encoder (x264 and swscale threads) left in a reference cycle, then CPU workers forked, whose collector runs
FORK_AFTER_ENCODER_GARBAGE = """
import gc, io
import av, numpy as np
from hyportrait.runtime import distributed

def worker(group):
    gc.collect()
    return group.rank

gc.disable()
container = av.open(io.BytesIO(), "w", format="mp4")
stream = container.add_stream("libx264", rate=25)
stream.width = stream.height = 256
stream.pix_fmt = "yuv420p"
for _ in range(3):
    for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((256, 256, 3), np.uint8), format="rgb24")):
        container.mux(packet)
container.close()
cycle = {"stream": stream}
cycle["self"] = cycle
del cycle, stream, container
print(distributed.launch(worker, 2, device_type="cpu", timeout_s=60))
"""


def test_forked_workers_do_not_free_the_parents_garbage():
    """Garbage of the parent (here a PyAV encoder in a reference cycle, as a failed write leaves one) is freed
    before the workers are forked: freed by a child's collector, the encoder waits for threads that only exist
    in the parent, and the run hung (the suite once did, on a fork after test_serve's failed writes)."""
    done = subprocess.run([sys.executable, "-c", FORK_AFTER_ENCODER_GARBAGE], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["0"], done.stderr[-2000:]


def test_animate_on_2_processes_writes_the_frames_of_one_process_on_rank_0_only(models, tmp_path):
    options = {**CONFIG, "max_frames": 4, "num_steps": 1}
    one = Animator(models, **options).animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "one")

    def worker(group):
        animator = ParallelAnimator(models, group=group, **options)
        # views keep the whole clip (segments would part the ranks) and the scheme's limits
        assert animator.with_options(mode="fast").config.segment == 0
        with pytest.raises(OptionError, match="segment runs on one GPU"):
            animator.with_options(segment=4)
        with pytest.raises(InputError, match="it needs at most 1 GPUs"):
            ParallelAnimator(models, group=group, scheme="guidance", **options).with_options(mode="fast")
        result = animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "two")
        return result.as_dict() if result is not None else None

    two = distributed.launch(worker, 2, device_type="cpu", timeout_s=60)
    assert [p.name for p in (tmp_path / "two").iterdir()] == [Path(two["cropped"]).parent.name]
    for name in ("cropped", "full_resolution"):
        expected = [np.asarray(f) for f in read_frames(getattr(one, name))]
        got = [np.asarray(f) for f in read_frames(Path(two[name]))]
        assert len(got) == len(expected) == 4
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_the_command_spreads_over_gpus_and_refuses_more_gpus_than_branches(tmp_path, capsys):
    code = cli_main(["animate", "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO), "--device", "cpu",
                     "--gpus", "2", "--parallel", "guidance", "--mode", "fast", "--quiet", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hyportrait: error [bad_input]: guidance-parallel sampling splits the 1 guidance")
    assert re.search(r"\(rank [01] of 2\)$", err) and not any(tmp_path.iterdir())


def test_the_multigpu_benchmark_dry_run(tmp_path):
    report = multigpu_gpu.main(["--size", "tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "multigpu.json").read_text())["speedup"] == report["speedup"]
    assert set(report["long"]) == {"quality/window/1", "quality/window/2", "quality/guidance/2", "fast/window/1",
                                   "fast/window/2"}
    assert set(report["speedup"]) == {"long/quality/window/2", "long/quality/guidance/2", "long/fast/window/2",
                                      "demo/quality/window/2", "demo/fast/window/2"}
    for key, run in report["long"].items():  # the window scheme gives one GPU's frames
        assert run["frames"] == 5 and run["fps"] > 0
        assert run["identical_to_1_gpu"] if "window" in key else run["psnr_vs_1_gpu_db"] > 40
    assert all(run["frames"] == 2 for run in report["demo"].values())
    try:
        import matplotlib  # noqa: F401 -- a benchmark dependency, not a runtime one
        assert report["plot"] == str(tmp_path / "multigpu_speedup.png") and Path(report["plot"]).stat().st_size
    except ImportError:
        assert report["plot"].startswith("skipped")
