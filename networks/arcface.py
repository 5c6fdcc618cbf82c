"""ArcFace identity embedding: the official `arcface.onnx` run with onnxruntime, as `inference.py` does.

Input: the aligned source face, (3, 112, 112) float RGB in [0, 1] (no mean/std), fed as `data` (1, 3, 112, 112).
Output: (1, 512) float32 divided by its L2 norm. Without the file the official code's `use_arcface: false`
path applies: a zero embedding (`zero_identity_embedding`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hyportrait.errors import InputError, WeightsError

log = logging.getLogger(__name__)

ARCFACE_FILENAME = "arcface.onnx"
EMBEDDING_DIM = 512
INPUT_NAME = "data"
INPUT_SIZE = 112


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class ArcFace:
    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=providers or default_providers())
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise WeightsError(f"cannot load the ArcFace model {path}: {e}") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs or len(inputs) != 1:
            raise WeightsError(f"{path}: expected one input named {INPUT_NAME!r}, got {sorted(inputs)}")
        output = self.session.get_outputs()[0]
        width = output.shape[-1] if output.shape else None  # an int, or a symbolic name / None when dynamic
        if isinstance(width, int) and width != EMBEDDING_DIM:
            raise WeightsError(f"{path}: expected a {EMBEDDING_DIM}-d embedding, output shape is {output.shape}")
        self.output_name = output.name

    def embed(self, aligned_face: np.ndarray) -> np.ndarray:
        """(3, 112, 112) float RGB in [0, 1] -> (1, 512) float32 with unit L2 norm."""
        if aligned_face.shape != (3, INPUT_SIZE, INPUT_SIZE):
            raise InputError(f"ArcFace expects a (3, {INPUT_SIZE}, {INPUT_SIZE}) face, got {aligned_face.shape}")
        x = aligned_face.astype(np.float32)[None]
        embedding = self.session.run([self.output_name], {INPUT_NAME: x})[0]
        if embedding.shape != (1, EMBEDDING_DIM):
            raise WeightsError(f"ArcFace returned shape {embedding.shape}, expected (1, {EMBEDDING_DIM})")
        return (embedding / np.linalg.norm(embedding)).astype(np.float32)


def zero_identity_embedding() -> np.ndarray:
    """The embedding the official code uses when ArcFace is off: (1, 512) zeros."""
    return np.zeros((1, EMBEDDING_DIM), dtype=np.float32)


def load_arcface(weights_dir: Path | None, providers: list[str] | None = None) -> ArcFace | None:
    """ArcFace from `weights_dir/arcface.onnx`, or None (with a warning) when the file is absent."""
    path = Path(weights_dir) / ARCFACE_FILENAME if weights_dir is not None else None
    if path is None or not path.is_file():
        log.warning("no %s found%s: the identity embedding will be zeros (as the official use_arcface=false), "
                    "so identity preservation is weaker", ARCFACE_FILENAME, f" in {weights_dir}" if weights_dir else "")
        return None
    return ArcFace(path, providers)
