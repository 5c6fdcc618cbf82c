"""`manifest.json` of an export folder: what each model is, where it came from, and how it was checked.

Engine builders and the ONNX runtime read it to find files, input names, dtypes and dynamic axes; the
source hashes tie every model to the exact weights-folder files it was exported from.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hyportrait
from hyportrait.errors import InputError, describe
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
    try:
        manifest = Manifest.from_json(json.loads(path.read_text()))
        for record in manifest.models.values():
            _check_record(record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSON syntax, missing or mistyped fields
        raise InputError(f"{path} is damaged or was edited ({type(exc).__name__}: {str(exc)[:200]}); export "
                         "the folder again with `hyportrait export`") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {describe(exc)}") from None
    return manifest


def _check_record(record: ModelRecord) -> None:
    """The fields the runtime and the builders compute with have the types `export_onnx` writes."""
    for name in (record.file, record.data_file):
        if name is not None and (not isinstance(name, str) or Path(name).name != name):
            raise ValueError(f"model {record.name!r}: its files must be names inside the folder, got {name!r}")
    for tensor in (*record.inputs, *record.outputs):
        if not (isinstance(tensor.name, str) and isinstance(tensor.dtype, str) and isinstance(tensor.shape, list)
                and all(isinstance(d, str) or (isinstance(d, int) and d > 0) for d in tensor.shape)):
            raise ValueError(f"model {record.name!r}: tensor {tensor.name!r} must have a name, a dtype and a "
                             f"shape of positive sizes or axis names, got {tensor}")
