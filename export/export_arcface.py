"""ArcFace for export: the official release ships it as ONNX already, so it is checked and copied."""
from __future__ import annotations

import shutil
from pathlib import Path

from hyportrait.files import atomic_path, sha256_file
from hyportrait.networks.arcface import ARCFACE_FILENAME, ArcFace


def copy_arcface(weights_dir: Path, out_dir: Path) -> dict:
    """Copy `weights_dir/arcface.onnx` into `out_dir` after checking that onnxruntime loads it with the
    expected input and output (a WeightsError names the problem); returns its manifest entry."""
    source = Path(weights_dir) / ARCFACE_FILENAME
    session = ArcFace(source, providers=["CPUExecutionProvider"]).session
    target = Path(out_dir) / ARCFACE_FILENAME
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)

    def describe(values) -> list[dict]:
        return [{"name": v.name, "dtype": v.type, "shape": v.shape} for v in values]

    return {"file": ARCFACE_FILENAME, "copied_from": ARCFACE_FILENAME, "sha256": sha256_file(target),
            "inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs()),
            "sources": [ARCFACE_FILENAME]}
