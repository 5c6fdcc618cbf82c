"""Face boxes and 5-point landmarks for preprocessing.

Two detectors share one interface, `FaceDetector.detect(rgb_uint8_image) -> list[Face]`, largest face first, and
`detect_batch(images)` for many images at once (driving frames: one network call per stage for a whole chunk).
Each runs its networks as PyTorch modules by default, or as any callables with the exported models' contract
(`networks/contract.py`: the runtime passes onnxruntime sessions or TensorRT engines), the pre- and
post-processing staying the same:
- `YoloFaceDetector`: the official `yoloface_v5m.pt` TorchScript model, with the official wrapper's pre- and
  post-processing (short side 416, sides rounded up to a multiple of 32, conf 0.5, NMS IoU 0.45).
- `MTCNNDetector`: the out-of-the-box fallback: our PyTorch P/R/O-Nets holding the weights that ship inside
  the `mtcnn==1.0.0` PyPI package. That package's own code imports TensorFlow, so none of it is imported:
  the weight files are located with `importlib.util.find_spec` and unpickled with an array-only allowlist.

Landmarks are in ArcFace order: left eye, right eye, nose, left mouth corner, right mouth corner, where
"left" means smaller image x (both detectors emit this order).
"""
from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyportrait.errors import InputError, WeightsError, describe

from .contract import DETECTOR, MODELS, MTCNN_MODELS

log = logging.getLogger(__name__)

YOLOFACE_FILENAME = "yoloface_v5m.pt"
HOST_THREADS = min(8, os.cpu_count() or 1)  # per-image host work in parallel (cv2, PIL and numpy release the GIL)


@dataclass(frozen=True)
class Face:
    box: np.ndarray  # (4,) float64: x1, y1, x2, y2 in image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float64 (x, y) in ArcFace order

    @property
    def area(self) -> float:
        return float((self.box[2] - self.box[0]) * (self.box[3] - self.box[1]))


def sort_by_area(faces: list[Face]) -> list[Face]:
    """Largest box first. The sort is stable, so among equal areas the detector's (score) order is kept, as
    the official `np.argmax` over areas picks the first one."""
    return sorted(faces, key=lambda face: -face.area)


def check_rgb_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise InputError(f"expected an HxWx3 uint8 RGB image, got shape {shape} dtype {dtype}")


class FaceDetector(ABC):
    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an HxWx3 uint8 RGB image, largest box first; empty when there is none."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """`detect` of each image. Detectors that can batch their networks override this."""
        return [self.detect(image) for image in images]


def detect_in_size_groups(images: Sequence[np.ndarray], size_of: Callable[[np.ndarray], Hashable],
                          detect_group: Callable[[list[np.ndarray]], list[list[Face]]]) -> list[list[Face]]:
    """`detect_group` on each group of images whose `size_of` is equal (a batch needs one tensor size); the
    face lists come back in the order of `images`."""
    for image in images:
        check_rgb_image(image)
    groups: dict[Hashable, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(size_of(image), []).append(index)
    faces: list[list[Face]] = [[] for _ in images]
    for indices in groups.values():
        for index, found in zip(indices, detect_group([images[i] for i in indices])):
            faces[index] = found
    return faces


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression with `torchvision.ops.nms` semantics (x1, y1, x2, y2 boxes, a box is
    dropped when its IoU with a kept higher-scored box is > threshold). Returns kept indices, best first."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        top_left = torch.maximum(boxes[i, :2], boxes[i + 1:, :2])
        bottom_right = torch.minimum(boxes[i, 2:], boxes[i + 1:, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
        iou = inter / (areas[i] + areas[i + 1:] - inter)
        suppressed[i + 1:] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


# ---------------------------------------------------------------------------------------------------------
# YoloFace (official detector)


class YoloFaceDetector(FaceDetector):
    """The official `yoloface_v5m.pt` (yolov5-face, TorchScript). The model takes (N, 3, h1, w1) RGB in [0, 1]
    plus one (1, 1, h1/s, w1/s, 2) cell grid per stride s, and returns (N, A, 16) rows of
    (cx, cy, w, h, objectness, 5 landmark (x, y), face class score) in input pixels. The official wrapper only
    ever passes N = 1, so batches are tried once and given up when the model turns out not to take them."""

    input_short_side = DETECTOR.yolo_short_side
    strides = (8, 16, 32)

    def __init__(self, path: str | Path | None = None, conf_threshold: float = 0.5, iou_threshold: float = 0.45,
                 device: str | torch.device = "cpu", *,
                 exported: Callable[[torch.Tensor], Sequence[torch.Tensor]] | None = None):
        """path: the official TorchScript file; or exported: the exported model (`yoloface` of the contract:
        image (1, 3, h1, w1) -> (detections,), its grids built inside) run by a backend."""
        self.device = torch.device(device)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self._grids: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.exported = exported
        if exported is not None:
            self.model = lambda image, grids: exported(image)[0]
            self.takes_batches = not MODELS["yoloface"].batch_one
            return
        try:
            with warnings.catch_warnings():  # the official file is TorchScript; torch 2.13 deprecates the loader
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as e:
            raise WeightsError(f"cannot load the YoloFace TorchScript model {path}: {e}") from e
        self.takes_batches = True  # until a batched call shows otherwise

    @classmethod
    def input_size(cls, height: int, width: int) -> tuple[int, int]:
        """Network input (h1, w1): short side scaled to 416, each side then rounded up to a multiple of 32."""
        r = cls.input_short_side / min(height, width)
        stride = DETECTOR.yolo_stride
        return int(height * r + stride - 1) // stride * stride, int(width * r + stride - 1) // stride * stride

    def _grids_for(self, h1: int, w1: int) -> list[torch.Tensor]:
        if (h1, w1) not in self._grids:
            grids = []
            for stride in self.strides:
                ys, xs = torch.meshgrid(torch.arange(h1 // stride), torch.arange(w1 // stride), indexing="ij")
                grid = torch.stack((xs, ys), dim=2).view(1, 1, h1 // stride, w1 // stride, 2).float()
                grids.append(grid.to(self.device))
            self._grids[(h1, w1)] = grids
        return self._grids[(h1, w1)]

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]

    @torch.no_grad()
    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return detect_in_size_groups(images, lambda image: self.input_size(*image.shape[:2]),
                                     self._detect_same_input_size)

    def _detect_same_input_size(self, images: list[np.ndarray]) -> list[list[Face]]:
        h1, w1 = self.input_size(*images[0].shape[:2])
        resized = np.stack([cv2.resize(image, (w1, h1), interpolation=cv2.INTER_LINEAR) for image in images])
        x = torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2).float() / 255
        pred = self._forward(x, self._grids_for(h1, w1)).float().cpu()
        return [self.decode(pred[i:i + 1], image.shape[:2], (h1, w1)) for i, image in enumerate(images)]

    def _forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        if len(x) > 1 and self.takes_batches:
            pred = self._batched_forward(x, grids)
            if pred is not None:
                return pred
        return torch.cat([self.model(image[None], grids) for image in x])

    def _batched_forward(self, x: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor | None:
        """One call for the batch; None, and no batches from then on, when the model cannot take them (a batch
        size of 1 fixed at export fails a reshape or merges the images' rows into one set)."""
        try:
            pred = self.model(x, grids)
            if pred.shape[0] == len(x):
                return pred
            reason = f"it returned {tuple(pred.shape)} for {len(x)} images"
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0]
        log.warning("the YoloFace model does not take batches (%s); running it one image at a time", reason)
        self.takes_batches = False
        return None

    def decode(self, pred: torch.Tensor, image_size: tuple[int, int], input_size: tuple[int, int]) -> list[Face]:
        """Official `non_max_suppression_face` (single class) + rescaling to the image's pixels."""
        if pred.ndim != 3 or pred.shape[0] != 1 or pred.shape[2] != 16:
            raise WeightsError(f"YoloFace output must be (1, anchors, 16) for one face class, got {tuple(pred.shape)}")
        rows = pred[0]
        rows = rows[rows[:, 4] > self.conf_threshold]
        score = rows[:, 15] * rows[:, 4]  # class score x objectness
        rows, score = rows[score > self.conf_threshold], score[score > self.conf_threshold]
        cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)
        keep = nms(boxes, score, self.iou_threshold)
        (h0, w0), (h1, w1) = image_size, input_size
        # float32 arithmetic as in the official wrapper (`det * w0 / w1` on float32 numpy)
        boxes = boxes[keep].numpy() * np.array([w0, h0, w0, h0], np.float32) / np.array([w1, h1, w1, h1], np.float32)
        landmarks = rows[keep, 5:15].numpy().astype(np.float64).reshape(-1, 5, 2) * np.array([w0 / w1, h0 / h1])
        faces = [Face(box.astype(np.float64), float(s), lm) for box, s, lm in zip(boxes, score[keep].tolist(), landmarks)]
        return sort_by_area(faces)


# ---------------------------------------------------------------------------------------------------------
# MTCNN (fallback detector): networks


def _keras_same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Keras MaxPooling2D(padding="same"): output ceil(n / stride); the padding is split with the odd
    element after, and padded cells never win."""
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad order: width first
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), kernel, stride)


def _flatten_like_keras(x: torch.Tensor) -> torch.Tensor:
    """The Keras nets permute NHWC to (N, W, H, C) before Flatten (a leftover of Caffe's transposed
    images); the dense weights expect that element order."""
    return x.permute(0, 3, 2, 1).flatten(1)


class _KerasNet(nn.Module):
    def keras_layers(self) -> list[nn.Module]:
        """Layers that own weights, in the order of the Keras weight list."""
        raise NotImplementedError

    @torch.no_grad()
    def load_keras_arrays(self, arrays: list[np.ndarray]) -> None:
        """Copy a Keras `get_weights()` list in: conv kernels are HWIO, dense kernels (in, out), PReLU alphas
        (1, 1, C) or (C,)."""
        targets = []  # (parameter, how the Keras array maps onto it)
        for layer in self.keras_layers():
            if isinstance(layer, nn.Conv2d):
                targets += [(layer.weight, "hwio"), (layer.bias, "same")]
            elif isinstance(layer, nn.Linear):
                targets += [(layer.weight, "in_out"), (layer.bias, "same")]
            else:  # PReLU
                targets.append((layer.weight, "flat"))
        if len(arrays) != len(targets):
            raise WeightsError(f"{type(self).__name__}: expected {len(targets)} weight arrays, got {len(arrays)}")
        for (param, layout), array in zip(targets, arrays):
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            if layout == "hwio" and tensor.ndim == 4:
                tensor = tensor.permute(3, 2, 0, 1)
            elif layout == "in_out" and tensor.ndim == 2:
                tensor = tensor.T
            elif layout == "flat":
                tensor = tensor.reshape(-1)
            if tensor.shape != param.shape:
                raise WeightsError(f"{type(self).__name__}: weight of shape {tuple(array.shape)} does not fit "
                                   f"a parameter of shape {tuple(param.shape)}")
            param.copy_(tensor)


class PNet(_KerasNet):
    """Proposal net, fully convolutional: 12x12 windows at stride 2."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.box_offsets = nn.Conv2d(32, 4, 1)
        self.face_logits = nn.Conv2d(32, 2, 1)

    def keras_layers(self):
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3,
                self.box_offsets, self.face_logits]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _keras_same_max_pool(self.prelu1(self.conv1(x)), 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.box_offsets(x), self.face_logits(x).softmax(dim=1)[:, 1]


class RNet(_KerasNet):
    """Refinement net on 24x24 patches."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.box_offsets = nn.Linear(128, 4)
        self.face_logits = nn.Linear(128, 2)

    def keras_layers(self):
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3, self.fc4, self.prelu4,
                self.box_offsets, self.face_logits]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _keras_same_max_pool(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.fc4(_flatten_like_keras(x)))
        return self.box_offsets(x), self.face_logits(x).softmax(dim=1)[:, 1]


class ONet(_KerasNet):
    """Output net on 48x48 patches: box offsets, 5 landmarks (x1..x5, y1..y5 relative to the box), score."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.box_offsets = nn.Linear(256, 4)
        self.landmarks = nn.Linear(256, 10)
        self.face_logits = nn.Linear(256, 2)

    def keras_layers(self):
        return [self.conv1, self.prelu1, self.conv2, self.prelu2, self.conv3, self.prelu3, self.conv4, self.prelu4,
                self.fc5, self.prelu5, self.box_offsets, self.landmarks, self.face_logits]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _keras_same_max_pool(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)
        x = _keras_same_max_pool(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.fc5(_flatten_like_keras(x)))
        return self.box_offsets(x), self.landmarks(x), self.face_logits(x).softmax(dim=1)[:, 1]


# ---------------------------------------------------------------------------------------------------------
# MTCNN: weights shipped in the `mtcnn` package


def _array_only_unpickler_class():
    from joblib.numpy_pickle import NumpyUnpickler

    allowed = {
        ("joblib.numpy_pickle", "NumpyArrayWrapper"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    class ArrayOnlyUnpickler(NumpyUnpickler):
        """joblib's unpickler restricted to building numpy arrays: any other global is refused, so a
        tampered file cannot run code."""

        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise WeightsError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
            return super().find_class(module, name)

    return ArrayOnlyUnpickler


def mtcnn_weights_dir() -> Path:
    spec = importlib.util.find_spec("mtcnn")  # finds the package without running its TensorFlow imports
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the MTCNN face detector needs the `mtcnn==1.0.0` package for its weights")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def load_keras_weight_list(path: Path) -> list[np.ndarray]:
    """A joblib + lz4 pickle of a list of float arrays, loaded without executing pickled code."""
    import lz4.frame

    try:
        data = lz4.frame.decompress(Path(path).read_bytes())
    except (OSError, RuntimeError) as e:
        raise WeightsError(f"cannot read MTCNN weights {path}: {describe(e)}") from e
    unpickler_class = _array_only_unpickler_class()
    # joblib >= 1.5 takes the byte-order flag; 1.4 always reads arrays in native order
    takes_flag = "ensure_native_byte_order" in inspect.signature(unpickler_class.__init__).parameters
    flag = {"ensure_native_byte_order": True} if takes_flag else {}
    unpickler = unpickler_class(str(path), io.BytesIO(data), **flag)
    arrays = unpickler.load()
    if not (isinstance(arrays, list) and all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in arrays)):
        raise WeightsError(f"{path} does not hold a list of float arrays")
    return arrays


# ---------------------------------------------------------------------------------------------------------
# MTCNN: detection stages (the mtcnn 1.0.0 package's algorithm and defaults)


def mtcnn_nms(boxes: np.ndarray, threshold: float, method: str = "union", block: int = 512) -> np.ndarray:
    """The mtcnn package's suppression for boxes sorted best first: box j is kept iff no better box i < j
    (kept or not) overlaps it by more than `threshold`; overlap = intersection over union or over the
    smaller area. Computed in column blocks so memory stays O(n * block). Returns kept indices."""
    n = len(boxes)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, block):
        stop = min(start + block, n)
        cols = slice(start, stop)
        w = np.maximum(0, np.minimum(x2[:stop, None], x2[None, cols]) - np.maximum(x1[:stop, None], x1[None, cols]))
        h = np.maximum(0, np.minimum(y2[:stop, None], y2[None, cols]) - np.maximum(y1[:stop, None], y1[None, cols]))
        inter = w * h
        if method == "union":
            denominator = areas[:stop, None] + areas[None, cols] - inter
        else:
            denominator = np.minimum(areas[:stop, None], areas[None, cols])
        with np.errstate(divide="ignore", invalid="ignore"):
            overlap = inter / denominator
        better = np.arange(stop)[:, None] < np.arange(start, stop)[None, :]
        keep[cols] = ~((overlap > threshold) & better).any(axis=0)
    return np.nonzero(keep)[0]


@contextmanager
def fp32_convolutions():
    """cuDNN convolutions in full fp32 inside. PyTorch lets cuDNN round their inputs to TF32 by default, and
    MTCNN's box regressions amplify that to pixels (up to ~8 px on the sample video against fp32, and
    differently for a batch than for one image). Matrix products are left alone: TF32 is off for them by
    default."""
    cudnn = torch.backends.cudnn
    allow_tf32 = cudnn.allow_tf32
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = allow_tf32


def _normalize(pixels):
    """float32 pixel values (a numpy array or a tensor) to the nets' input range; exact in float32."""
    return (pixels - 127.5) / 128


def _sort_by_score(boxes: np.ndarray, score_column: int = 4) -> np.ndarray:
    return boxes[np.argsort(-boxes[:, score_column], kind="stable")]


def _to_square(boxes: np.ndarray) -> np.ndarray:
    boxes = boxes.copy()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _apply_offsets(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    boxes = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] += offsets * np.stack([w, h, w, h], axis=1)
    return boxes


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, image_of_box: torch.Tensor,
                    size: int) -> torch.Tensor:
    """`tf.image.crop_and_resize` (bilinear, extrapolation value 0) of (N, H, W, C) float images, box k
    (pixel x1, y1, x2, y2, normalised by H and W as the mtcnn package does) cut from image `image_of_box[k]`.
    float64 arithmetic, as the package's numpy. Returns (n, C, size, size) float32 on the images' device."""
    height, width = images.shape[1:3]
    steps = torch.arange(size, dtype=torch.float64, device=images.device) / (size - 1)
    ys = (boxes[:, 1, None] / height + steps * (boxes[:, 3, None] - boxes[:, 1, None]) / height) * (height - 1)
    xs = (boxes[:, 0, None] / width + steps * (boxes[:, 2, None] - boxes[:, 0, None]) / width) * (width - 1)
    inside = ((ys >= 0) & (ys <= height - 1))[:, :, None] & ((xs >= 0) & (xs <= width - 1))[:, None, :]
    y0, x0 = ys.floor(), xs.floor()
    wy, wx = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    y0, y1 = y0.clamp(0, height - 1).long(), ys.ceil().clamp(0, height - 1).long()
    x0, x1 = x0.clamp(0, width - 1).long(), xs.ceil().clamp(0, width - 1).long()
    image = image_of_box[:, None, None]

    def pixels(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return images[image, rows[:, :, None], cols[:, None, :]]

    top_left, top_right = pixels(y0, x0), pixels(y0, x1)
    bottom_left, bottom_right = pixels(y1, x0), pixels(y1, x1)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    patches = torch.where(inside[..., None], top + (bottom - top) * wy, 0.0)
    return patches.permute(0, 3, 1, 2).float().contiguous()


class MTCNNDetector(FaceDetector):
    """MTCNN with the `mtcnn==1.0.0` package's weights, stages and defaults: scale pyramid (min face 20 px,
    factor 0.709), P-Net threshold 0.6 with IoU NMS 0.5 per scale then 0.7, R-Net 0.7 / NMS 0.7, O-Net 0.8 /
    NMS 0.7 over the smaller area; boxes clipped to the image, landmarks not.

    Images of one size are detected together: each net runs once per stage for all of them (their pyramid
    levels stacked, their R-/O-Net crops concatenated), and thresholds and NMS run per image. A batch's
    convolutions may round differently from one image's: boxes and landmarks move by ~1e-3 px at most."""

    cell_size = DETECTOR.mtcnn_cell
    cell_stride = 2

    def __init__(self, min_face_size: int = DETECTOR.mtcnn_min_face, scale_factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8), device: str | torch.device = "cpu",
                 *, exported: dict[str, Callable[[torch.Tensor], Sequence[torch.Tensor]]] | None = None):
        """exported: the exported nets (`mtcnn_pnet`, `mtcnn_rnet`, `mtcnn_onet` of the contract, each a
        callable from its input tensor to its outputs in the contract's order) run by a backend, instead of
        the PyTorch modules; their calls keep to the contract's batch limits."""
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.thresholds = thresholds
        self.device = torch.device(device)
        # input pixels per network call: a CPU is fastest on calls that stay in its caches, a GPU on few calls
        # (its time goes to kernel launches); the bound also caps memory when a batch has many candidates
        self.max_pixels_per_call = 2**17 if self.device.type == "cpu" else 2**23
        self.max_rows: dict[str, int] = {}  # rows per call of an exported net (none: any)
        if exported is not None:
            self.pnet, self.rnet, self.onet = (exported[name] for name in MTCNN_MODELS)
            self.max_rows = {name: 1 if MODELS[name].batch_one else DETECTOR.max_face_crops for name in MTCNN_MODELS}
            return
        weights = mtcnn_weights_dir()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_keras_arrays(load_keras_weight_list(weights / f"{name}.lz4"))
            net.to(self.device).eval().requires_grad_(False)

    def pyramid_scales(self, height: int, width: int) -> np.ndarray:
        """The package's pyramid: its level count ignores the first 12/min_face_size factor, so levels whose
        image would be under 12 px are dropped here (the package fails on them and reports no face)."""
        count = round(-((np.log(min(height, width) / self.cell_size) / np.log(self.scale_factor)) + 1))
        scales = self.cell_size / self.min_face_size * self.scale_factor ** np.arange(max(count, 0))
        return scales[np.minimum(height * scales, width * scales) >= self.cell_size]

    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_batch([image])[0]

    @torch.no_grad()
    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        return detect_in_size_groups(images, lambda image: image.shape[:2], self._detect_same_size)

    def _detect_same_size(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Each stage's net runs once for all images; the thresholds and NMS run per image."""
        height, width = images[0].shape[:2]
        boxes = self._propose(images)
        normalized = _normalize(torch.from_numpy(np.stack(images)).to(self.device).float())
        boxes = self._next_stage("mtcnn_rnet", 24, self._refine, normalized, boxes)
        rows = self._next_stage("mtcnn_onet", 48, self._output, normalized, boxes)
        return [self._faces(image_rows, height, width) for image_rows in rows]

    def _run(self, stage: str, count: int, inputs: Callable[[slice], torch.Tensor],
             pixels_each: int) -> list[np.ndarray]:
        """Net `stage` ("mtcnn_pnet", ...) on `inputs(rows)` for consecutive slices of `count` rows of
        `pixels_each` pixels, at most `max_pixels_per_call` pixels (and an exported net's rows) a call; the
        outputs joined as float64 arrays."""
        net = {"mtcnn_pnet": self.pnet, "mtcnn_rnet": self.rnet, "mtcnn_onet": self.onet}[stage]
        step = min(max(self.max_pixels_per_call // pixels_each, 1), self.max_rows.get(stage, count) or 1)
        with fp32_convolutions():
            calls = [[o.float().cpu().numpy() for o in net(inputs(slice(start, start + step)))]
                     for start in range(0, count, step)]
        return [np.concatenate(parts).astype(np.float64) for parts in zip(*calls)]

    def _propose(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """P-Net on each pyramid level of all the (same-size) images -> per image, candidate squares
        (x1, y1, x2, y2, score)."""
        scales = self.pyramid_scales(*images[0].shape[:2])
        # the images' pyramids in parallel: cv2 runs a resize this small on one core
        with ThreadPoolExecutor(min(HOST_THREADS, len(images))) as pool:
            pyramids = list(pool.map(lambda image: self._pyramid(image, scales), images))
        levels = [self._pnet(np.stack(level)) for level in zip(*pyramids)]
        return [self._candidates([(offsets[i], prob[i]) for offsets, prob in levels], scales)
                for i in range(len(images))]

    @staticmethod
    def _pyramid(image: np.ndarray, scales: np.ndarray) -> list[np.ndarray]:
        normalized = _normalize(image.astype(np.float32))
        height, width = image.shape[:2]
        return [cv2.resize(normalized, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_AREA)
                for scale in scales]

    def _pnet(self, level: np.ndarray) -> list[np.ndarray]:
        """P-Net on one pyramid level of all images, (N, h, w, 3) -> box offsets (N, 4, h', w'), face
        probabilities (N, h', w')."""
        x = torch.from_numpy(level).to(self.device).permute(0, 3, 1, 2).contiguous()
        return self._run("mtcnn_pnet", len(x), lambda rows: x[rows], x.shape[2] * x.shape[3])

    def _candidates(self, levels: list[tuple[np.ndarray, np.ndarray]], scales: np.ndarray) -> np.ndarray:
        """One image's P-Net outputs at each level -> candidate squares after NMS per level, then over all."""
        if not levels:  # an image too small for any level
            return np.empty((0, 5))
        boxes = np.concatenate([self._level_candidates(offsets, prob, scale)
                                for (offsets, prob), scale in zip(levels, scales)])
        boxes = _sort_by_score(boxes)
        return _to_square(boxes[mtcnn_nms(boxes, 0.7)])

    def _level_candidates(self, offsets: np.ndarray, prob: np.ndarray, scale: float) -> np.ndarray:
        """One image's P-Net cells over the threshold at one pyramid level, as image boxes after NMS."""
        ys, xs = np.nonzero(prob > self.thresholds[0])
        span = self.cell_size - 1
        left, top = xs * self.cell_stride + 1.0, ys * self.cell_stride + 1.0
        dx1, dy1, dx2, dy2 = offsets[:, ys, xs]
        boxes = np.stack([left + dx1 * span, top + dy1 * span, left + span + dx2 * span, top + span + dy2 * span],
                         axis=1) / scale
        boxes = _sort_by_score(np.concatenate([boxes, prob[ys, xs, None]], axis=1))
        return boxes[mtcnn_nms(boxes, 0.5)]

    def _next_stage(self, stage: str, size: int, finish: Callable[..., np.ndarray], images: torch.Tensor,
                    boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Net `stage` on the size x size crops of all images' boxes (in as few calls as `max_pixels_per_call`
        allows), then `finish(image_boxes, *net_outputs)` thresholds and suppresses per image."""
        counts = [len(image_boxes) for image_boxes in boxes]
        if not sum(counts):
            return boxes
        all_boxes = torch.from_numpy(np.concatenate(boxes)[:, :4]).to(self.device)
        image_of_box = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(self.device)
        def crops(rows: slice) -> torch.Tensor:
            return crop_and_resize(images, all_boxes[rows], image_of_box[rows], size)

        outputs = self._run(stage, len(all_boxes), crops, size * size)
        per_image = [np.split(output, np.cumsum(counts)[:-1]) for output in outputs]
        return [finish(image_boxes, *image_outputs) for image_boxes, *image_outputs in zip(boxes, *per_image)]

    def _refine(self, boxes: np.ndarray, offsets: np.ndarray, prob: np.ndarray) -> np.ndarray:
        boxes = _apply_offsets(np.concatenate([boxes[:, :4], prob[:, None]], axis=1), offsets)
        boxes = _sort_by_score(boxes[prob > self.thresholds[1]])
        return _to_square(boxes[mtcnn_nms(boxes, 0.7)])

    def _output(self, boxes: np.ndarray, offsets: np.ndarray, landmarks: np.ndarray,
                prob: np.ndarray) -> np.ndarray:
        """Rows of x1, y1, x2, y2, score, 5 landmark x, 5 landmark y."""
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        landmark_x = w * landmarks[:, :5] + boxes[:, 0:1] - 1
        landmark_y = h * landmarks[:, 5:] + boxes[:, 1:2] - 1
        boxes = _apply_offsets(np.concatenate([boxes[:, :4], prob[:, None]], axis=1), offsets)
        rows = np.concatenate([boxes, landmark_x, landmark_y], axis=1)
        rows = _sort_by_score(rows[prob > self.thresholds[2]])
        return rows[mtcnn_nms(rows, 0.7, method="min")]

    @staticmethod
    def _faces(rows: np.ndarray, height: int, width: int) -> list[Face]:
        faces = []
        for row in rows:
            box = np.clip(row[:4], 0, [width - 1, height - 1, width - 1, height - 1])
            faces.append(Face(box, float(row[4]), np.stack([row[5:10], row[10:15]], axis=1)))
        return sort_by_area(faces)


def load_face_detector(weights_dir: Path | None, device: str | torch.device = "cpu") -> FaceDetector:
    """The official YoloFace when `weights_dir/yoloface_v5m.pt` exists, else the bundled MTCNN."""
    if weights_dir is not None and (Path(weights_dir) / YOLOFACE_FILENAME).is_file():
        return YoloFaceDetector(Path(weights_dir) / YOLOFACE_FILENAME, device=device)
    log.info("no %s found; using the MTCNN face detector (landmarks differ slightly from YoloFace)",
             YOLOFACE_FILENAME)
    return MTCNNDetector(device=device)


class PNetAnySize(nn.Module):
    """P-Net with its first pool as ceil-mode max-pool: the same windows as the Keras "same" pool (2x2,
    stride 2: output ceil(n/2), the odd last window covering one real cell) without size-dependent padding."""

    def __init__(self, pnet: PNet):
        super().__init__()
        self.pnet = pnet

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pnet
        x = F.max_pool2d(p.prelu1(p.conv1(image)), 2, 2, ceil_mode=True)
        x = p.prelu3(p.conv3(p.prelu2(p.conv2(x))))
        return p.box_offsets(x), p.face_logits(x).softmax(dim=1)[:, 1]


class YoloFaceWithGrids(nn.Module):
    """The official detector with its per-stride cell grids built from the input size."""

    def __init__(self, model: nn.Module, strides: tuple[int, ...] = YoloFaceDetector.strides):
        super().__init__()
        self.model = model
        self.strides = list(strides)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[2], image.shape[3]
        grids: list[torch.Tensor] = []
        for stride in self.strides:
            ys = torch.arange(height // stride, device=image.device).float()
            xs = torch.arange(width // stride, device=image.device).float()
            # (1, 1, rows, cols, 2) of (x, y), as YoloFaceDetector builds them
            grid = torch.stack((xs[None, :].expand(ys.shape[0], -1), ys[:, None].expand(-1, xs.shape[0])), dim=2)
            grids.append(grid[None, None])
        return self.model(image, grids)
