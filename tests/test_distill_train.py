"""The trainer (distill/train.py): the LoRA it writes, kill and resume, and bad input, on toy data."""
import json
import multiprocessing
import os
import signal
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from hyportrait.benchmarks import distill_gpu
from hyportrait.distill import toy
from hyportrait.distill.train import TrainConfig, Trainer, train
from hyportrait.errors import DataError, RunError, WeightsError
from hyportrait.networks.lora import merge_lora
from hyportrait.networks.unet import UNetWithAdapters
from hyportrait.runtime import distributed

SIZE = replace(toy.SIZES["cpu"], train_clips=6, tokens=64, width=1024)  # data the tiny networks (the CLI's) take
QUICK = TrainConfig(mode="distill", steps=2, batch=2, lr=1e-2, rank=4, grid=13, checkpoint_every=1,
                    lora_targets="all-linear")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    task = toy.Task(SIZE)
    return task, toy.write_toy_data(task, tmp_path_factory.mktemp("toy") / "data", SIZE.train_clips, seed=3)


def _unet_inputs(task, batch=2):
    g = torch.Generator().manual_seed(5)
    f, s = SIZE.frames, SIZE.latent
    return (torch.randn(batch, f, 8, s, s, generator=g), torch.full((batch,), 0.3),
            torch.randn(batch, SIZE.tokens, SIZE.width, generator=g),
            torch.randn(batch, f, SIZE.tokens, SIZE.width, generator=g),
            task.pose_map, torch.tensor([[12.5, 0.0, 0.0]] * batch))


def test_trained_lora_merges_as_peft_does(data, tmp_path):
    """The adapter a run writes is read by networks/lora.py (animate --lora, export --lora) and gives what peft's
    own merged forward gives."""
    from peft import PeftModel

    task, folder = data
    result = train(QUICK, folder, tmp_path / "run", toy.toy_unet(SIZE), task.pose_map)
    assert {p.name for p in result.output.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    inputs = _unet_inputs(task)
    peft_unet = PeftModel.from_pretrained(toy.toy_unet(SIZE).set_engine_rewrites(True), str(result.output))
    lora_b = [v for k, v in load_file(str(result.output / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert any(t.abs().max() > 0 for t in lora_b), "two steps at lr 1e-2 must move the adapter"
    with torch.no_grad():
        expected = peft_unet.merge_and_unload()(*inputs)
        merged = toy.toy_unet(SIZE).set_engine_rewrites(True)
        names = merge_lora(merged, result.output)
        # all-linear (the toy student's): every Linear of the UNet carries a pair
        assert len(names) == sum(isinstance(m, torch.nn.Linear) for m in merged.modules())
        assert torch.allclose(merged(*inputs), expected, atol=1e-5, rtol=1e-5)
    # a student started from that adapter; one of another rank or another base is refused
    again = train(replace(QUICK, lr=0.0, init_lora=str(result.output)), folder, tmp_path / "again",
                  toy.toy_unet(SIZE), task.pose_map)
    first, kept = (load_file(str(r.output / "adapter_model.safetensors")) for r in (result, again))
    assert first.keys() == kept.keys() and all(torch.equal(first[k], kept[k]) for k in first)
    with pytest.raises(WeightsError, match="rank 4, this run trains rank 8"):
        train(replace(QUICK, rank=8, init_lora=str(result.output)), folder, tmp_path / "r8", toy.toy_unet(SIZE),
              task.pose_map)
    other = UNetWithAdapters(replace(toy.toy_unet(SIZE).unet_config, block_out_channels=(64, 64)))
    with pytest.raises(WeightsError, match="another base"):
        train(replace(QUICK, init_lora=str(result.output)), folder, tmp_path / "base", other, task.pose_map)
    run = (tmp_path / "run" / "run.json").read_text()
    assert '"commit"' in run and '"shards_sha256"' in run


def test_the_distill_teacher_is_the_base_unet(data):
    """Inside `Trainer.teacher()` the student's model computes the base UNet (every adapter layer off), and after
    it the student again, its adapter still trainable."""
    task, _ = data
    trainer = Trainer(QUICK, toy.toy_unet(SIZE), task.pose_map, torch.device("cpu"), 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.trainable.items():
            if "lora_B" in name:  # peft starts B at zero, where student and teacher agree
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        inputs = _unet_inputs(task)
        base = toy.toy_unet(SIZE).set_engine_rewrites(True)(*inputs)
        student = trainer.model(*inputs)
        with trainer.teacher():
            assert torch.allclose(trainer.model(*inputs), base, atol=1e-6)
        assert torch.equal(trainer.model(*inputs), student) and not torch.allclose(student, base, atol=1e-3)
    assert all(p.requires_grad for p in trainer.trainable.values())


def _cli_in_child(*args):
    from hyportrait.cli import main

    os._exit(main(["distill", "train", *map(str, args)]))


def _main(capsys, *args) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    from hyportrait.cli import main

    code = main(["distill", "train", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.fixture
def one_thread():
    """The killed run (forked from this process, so it inherits this) and the runs it is compared with on one
    thread, or their float sums (and Adam's normalised updates of near-zero LoRA gradients) round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_run_resumes_from_its_checkpoint(data, tmp_path, capsys, one_thread):
    _, folder = data
    run = tmp_path / "run"
    args = ("--data", folder, "--out", run, "--steps", 5, "--batch", 1, "--rank", 4, "--grid", 13,
            "--checkpoint-every", 2, "--lr", 1e-2)
    # the run in a forked process (one thread, as this one), killed once it has saved a checkpoint; forked, it
    # does not import everything again (10 s)
    with distributed.parent_garbage_frozen():
        proc = multiprocessing.get_context("fork").Process(target=_cli_in_child, args=args)
        proc.start()
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").is_file() and proc.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert saved in (2, 4), "killed after its first checkpoint, before the end"
    rows = (run / "log.csv").read_text().splitlines()[1:]
    assert int(rows[-1].split(",")[0]) < saved + 2  # at most the steps since the checkpoint are lost
    assert _main(capsys, *args)[0] == 0
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5]  # rows after the checkpoint were redone once, not duplicated
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 5
    # the resumed run is the uninterrupted run: same draws, same data order, same optimizer state
    whole = tmp_path / "whole"
    assert _main(capsys, *args[:3], whole, *args[4:])[0] == 0
    a, b = (load_file(str(r / "lora" / "adapter_model.safetensors")) for r in (run, whole))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the same run with another config is refused, with a code
    code, err = _main(capsys, *args[:-1], 0.5)
    assert code == 2 and "error [bad_run]" in err and "lr" in err


def test_bad_input_is_one_coded_line(data, tmp_path, capsys):
    task, folder = data
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(("--data", empty, "--out", tmp_path / "r1"), "bad_data"),
             (("--data", tmp_path / "missing", "--out", tmp_path / "r2"), "bad_data"),
             (("--data", folder, "--weights", empty, "--out", tmp_path / "r3"), "bad_weights")]
    for args, code in cases:
        status, err = _main(capsys, *args)  # (bad_weights carries the per-file report on the lines after)
        assert status == 2 and err.startswith(f"hyportrait: error [{code}]") and "Traceback" not in err, err
    # a corrupt shard
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = broken / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match="corrupt shard"):
        train(QUICK, broken, tmp_path / "r4", toy.toy_unet(SIZE), task.pose_map)
    # tokens the UNet does not attend to
    narrow = UNetWithAdapters(replace(toy.toy_unet(SIZE).unet_config, cross_attention_dim=512))
    with pytest.raises(DataError, match="tokens of width 1024"):
        train(QUICK, folder, tmp_path / "r5", narrow, task.pose_map)
    assert RunError.code == "bad_run"


def test_gpu_script_dry_run(tmp_path, capsys):
    """benchmarks/distill_gpu.py dry-runs on the CPU: one process, then torchrun with 2 gloo ranks, 2 micro-batches
    a step (DDP's no_sync on the first). Both ranks end with the same trained adapter, which they only do when
    the gradients of their different examples were averaged."""
    distill_gpu.main(["--out", str(tmp_path), "--size", "tiny", "--parts", "one", "two", "--accumulate", "2"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["one_gpu"]["samples_per_s"] > 0 and report["one_gpu"]["ranks_agree"] is None
    two = report["two_gpus"]
    assert two["gpus"] == 2 and two["accumulate"] == 2 and two["ranks_agree"] is True
    assert "torchrun_one_gpu" not in report and "scaling" not in report  # the dry run's one torchrun
    assert two["adapter_moved"] and report["one_gpu"]["adapter_moved"]
    assert "adapters agree" in capsys.readouterr().out.splitlines()[-1]
