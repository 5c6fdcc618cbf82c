"""`manifest.json` of an export folder: what each model is, where it came from, and how it was checked.

Engine builders and the ONNX runtime read it to find files, input names, dtypes and dynamic axes; the
source hashes tie every model to the exact weights-folder files it was exported from.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hyportrait
from hyportrait.errors import InputError
from hyportrait.files import write_json

from .onnx_io import OPSET, ModelRecord, TensorRecord

MANIFEST_FILE = "manifest.json"
EXPORTER = "torch.onnx.export (TorchScript-based, dynamo=False)"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


@dataclass
class Manifest:
    precision: str  # as asked; each model's record says what it was exported in
    weights: str  # the weights folder, or "random:<size>" for random test networks
    exporter_version: str = hyportrait.__version__
    exporter: str = EXPORTER
    opset: int = OPSET
    versions: dict[str, str] = field(default_factory=_versions)
    lora: str | None = None
    unet_attention: str = "plain"  # "onnxruntime": com.microsoft.MultiHeadAttention (onnxruntime only)
    sources: dict[str, str] = field(default_factory=dict)  # weights-folder file (or LoRA) -> sha256
    models: dict[str, ModelRecord] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # other artifacts (the pose map, ArcFace, ...)
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it was not exported

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        models = {}
        for name, record in data.get("models", {}).items():
            record = dict(record)
            record["inputs"] = [TensorRecord(**t) for t in record["inputs"]]
            record["outputs"] = [TensorRecord(**t) for t in record["outputs"]]
            # JSON object keys are strings: the axes come back as ints
            record["dynamic_axes"] = {k: {int(a): n for a, n in v.items()} for k, v in record["dynamic_axes"].items()}
            models[name] = ModelRecord(**record)
        return cls(**{**data, "models": models})


def write_manifest(manifest: Manifest, out_dir: Path) -> Path:
    """Write `out_dir/manifest.json` atomically."""
    path = Path(out_dir) / MANIFEST_FILE
    write_json(path, manifest.to_json())
    return path


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of the export folder `out_dir`; an input error when it is not a finished export."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InputError(f"{out_dir} is not a finished export: no {MANIFEST_FILE} "
                         "(run `hyportrait export --weights DIR --out FOLDER`)")
    return Manifest.from_json(json.loads(path.read_text()))
