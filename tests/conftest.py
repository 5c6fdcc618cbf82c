"""Fixtures shared across test files: one tiny export and one set of tiny torch models per session, and the
per-network export of a module's spec."""
import os
from pathlib import Path

import onnx
import pytest

from hyportrait.export.onnx_io import export_onnx


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`hyportrait export --tiny-random`, made once per session (half a minute of CPU) for every test that runs
    or inspects an export folder; tests only read it. Under pytest-xdist (`make test`) the workers share it:
    the first to need it makes it in the run's common temporary folder, the others wait for it."""
    from filelock import FileLock

    from hyportrait.cli import main

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's folder is one level below the run's
    out = root / "tiny_export"
    with FileLock(f"{out}.lock"):
        if not (out / "manifest.json").is_file():  # the export writes its manifest last
            assert main(["export", "--tiny-random", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny random-weight networks (seed 0, the ones `tiny_export` holds) as fp32 torch sessions on the CPU
    at 64 px crops, built once per session for every test that samples with them; tests only read them. With
    the engine rewrites (as exported): at this size a UNet call of the faithful modules takes 20 times longer
    (they project the 1024-wide motion tokens once per latent pixel), and test_runtime.py checks the two agree."""
    import torch

    from hyportrait.networks.weights import random_networks
    from hyportrait.runtime.models import torch_models

    return torch_models(random_networks("tiny"), device="cpu", dtype=torch.float32, size=64, faithful=False)


@pytest.fixture(scope="module")
def exported(spec, tmp_path_factory):
    """The test module's `spec` exported to ONNX (fp32): (model path, loaded model)."""
    out_dir = tmp_path_factory.mktemp(spec.name)
    record = export_onnx(spec, out_dir)
    return out_dir / record.file, onnx.load(out_dir / record.file)


# The longest files first: `make test` hands whole files to two xdist workers in collection order
# (--no-loadscope-reorder), and a long file started last would run alone at the end. The worker that starts
# the toy proof (about 190 s of one core: its student; the teacher is bundled) is also handed the third file at
# once (xdist gives each worker two files to begin with), which waits for the proof: a short one, so that this
# worker then takes files from the queue as the other does and the two end together. Measured CPU seconds of
# each file's own work (2026-11-28,
# the shared tiny export and the interpreter start aside): quantizers about 125, test_runtime 130,
# test_distill_train 75 to 100, test_serve 65, test_cpp_example 50, the others 45 down to 15; the files not
# named here take under 15 each.
LONGEST_FIRST = ("test_distill_toy.py", "test_engines_quantize.py", "test_preprocess.py", "test_runtime.py",
                 "test_distill_train.py", "test_serve.py", "test_cpp_example.py", "test_serve_ray.py",
                 "test_distributed.py", "test_modelopt_quant.py", "test_stream.py", "test_bad_input.py",
                 "test_stream_gpu.py", "test_export_unet.py", "test_cli.py", "test_unet.py", "test_structure.py",
                 "test_lora.py", "test_export.py", "test_engines.py", "test_export_appearance.py",
                 "test_export_motion.py", "test_distill_prepare.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
