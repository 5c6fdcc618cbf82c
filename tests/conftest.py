"""Fixtures shared across test files: one tiny export per session, and the per-network export of a module's spec."""
from pathlib import Path

import onnx
import pytest

from hyportrait.export.onnx_io import export_onnx

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "hyportrait" / "assets"
SAMPLE_IMAGE, SAMPLE_VIDEO = ASSETS / "sample_portrait.jpg", ASSETS / "sample_driving.mp4"


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """`hyportrait export --tiny-random`, made once per session (half a minute of CPU) for every test that runs
    or inspects an export folder; tests only read it."""
    from hyportrait.cli import main

    out = tmp_path_factory.mktemp("tiny_export")
    assert main(["export", "--tiny-random", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(spec, tmp_path_factory):
    """The test module's `spec` exported to ONNX (fp32): (model path, loaded model)."""
    out_dir = tmp_path_factory.mktemp(spec.name)
    record = export_onnx(spec, out_dir)
    return out_dir / record.file, onnx.load(out_dir / record.file)
