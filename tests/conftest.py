"""Fixtures shared by the per-network export tests."""
import onnx
import pytest

from hyportrait.export.onnx_io import export_onnx


@pytest.fixture(scope="module")
def exported(spec, tmp_path_factory):
    """The test module's `spec` exported to ONNX (fp32): (model path, loaded model)."""
    out_dir = tmp_path_factory.mktemp(spec.name)
    record = export_onnx(spec, out_dir)
    return out_dir / record.file, onnx.load(out_dir / record.file)
