"""The face detectors for export: the three MTCNN nets, and the official YoloFace when its file is there.

mtcnn_pnet: image (1, 3, H, W) -> box_offsets (1, 4, h, w), face_prob (1, h, w); H and W dynamic (one call
    per pyramid level). Its Keras "same" max-pool pads by a size-dependent amount; the export module uses
    the equivalent ceil-mode pool, which works for every size in one graph.
mtcnn_rnet: patches (N, 3, 24, 24) -> box_offsets (N, 4), face_prob (N); N dynamic.
mtcnn_onet: patches (N, 3, 48, 48) -> box_offsets (N, 4), landmarks (N, 10), face_prob (N); N dynamic.
yoloface: image (1, 3, H, W) RGB in [0, 1] -> detections (1, A, 16); H and W dynamic (multiples of 32). The
    official TorchScript model takes the cell grids as inputs; the export module builds them from the input
    size inside the graph. Exported with the TorchScript exporter (the torch.export-based one cannot take
    a scripted model with a list input); when that fails the model is skipped with the reason recorded.
The decoding, pyramids and NMS stay on the host, as in `face_detector.py`. All fp32, as the reference.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from hyportrait.networks.contract import MODELS
from hyportrait.networks.face_detector import MTCNNDetector, PNetAnySize, YoloFaceWithGrids
from hyportrait.networks.weights import DETECTOR_FILE

from .onnx_io import ExportSpec

MTCNN_SOURCE = "mtcnn==1.0.0 package weights"


def mtcnn_specs(detector: MTCNNDetector | None = None, seed: int = 0) -> list[ExportSpec]:
    detector = detector or MTCNNDetector()
    gen = torch.Generator().manual_seed(seed)

    def images(n: int, height: int, width: int) -> torch.Tensor:
        return (torch.rand(n, 3, height, width, generator=gen) * 255 - 127.5) / 128  # the detector's scaling

    return [
        ExportSpec.of(MODELS["mtcnn_pnet"], PNetAnySize(detector.pnet).eval(), {"image": images(1, 64, 48)},
                      sources=(MTCNN_SOURCE,), extra_inputs=[{"image": images(1, 37, 51)}]),
        ExportSpec.of(MODELS["mtcnn_rnet"], detector.rnet.eval(), {"patches": images(4, 24, 24)},
                      sources=(MTCNN_SOURCE,), extra_inputs=[{"patches": images(1, 24, 24)}]),
        ExportSpec.of(MODELS["mtcnn_onet"], detector.onet.eval(), {"patches": images(4, 48, 48)},
                      sources=(MTCNN_SOURCE,), extra_inputs=[{"patches": images(1, 48, 48)}]),
    ]


def yoloface_spec(path: Path, seed: int = 0) -> ExportSpec:
    with warnings.catch_warnings():  # torch 2.13 deprecates the TorchScript loader
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(str(path), map_location="cpu").eval()
    gen = torch.Generator().manual_seed(seed)

    def image(height: int, width: int) -> torch.Tensor:
        return torch.rand(1, 3, height, width, generator=gen)

    # scripted: tracing cannot step into a loaded TorchScript model; the exporter takes a scripted graph
    return ExportSpec.of(MODELS["yoloface"], torch.jit.script(YoloFaceWithGrids(model).eval()),
                         {"image": image(416, 416)}, sources=(DETECTOR_FILE,),
                         extra_inputs=[{"image": image(416, 736)}])
