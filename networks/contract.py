"""Shapes and limits of each model, in one place: read by the networks, exporters, engine profiles, backends
and benchmarks instead of constants imported across folders.

Each exported model is a `ModelContract`: its input and output tensors in order, each with its dims (an int
is a size every export has; a name is a size the doc below fixes, and it is dynamic when listed in
`dynamic`), and its dtype ("float": the export's precision, "float32": fp32 at any precision, "int32").

    appearance   image (1,3,224,224), id_embedding (1,512)                    -> appearance_tokens (1,64,1024)
    motion       face_images, pose_images (n,3,256,256), head_bucket, exp_bucket (1,) int32
                                                                              -> motion_tokens (n,64,1024)
    vae_encoder  image (1,3,H,W) in [-1,1]                                     -> latent_mean (1,4,h,w), unscaled
    vae_decoder  latents (n,4,h,w), scaled                                     -> frames (n,3,H,W) in [-1,1]
    unet         sample (B,F,8,h,w), timestep (1,), appearance_tokens (B,64,1024),
                 motion_tokens (B,F,64,1024), pose_map (C0,h,w), added_time_ids (B,3) -> v_prediction (B,F,4,h,w)
    pose_guider  pose_images (n,3,H,W)                                         -> pose_features (n,C0,h,w)
    mtcnn_pnet   image (1,3,H,W)                       -> box_offsets (1,4,h',w'), face_prob (1,h',w')
    mtcnn_rnet   patches (n,3,24,24)                   -> box_offsets (n,4), face_prob (n)
    mtcnn_onet   patches (n,3,48,48)                   -> box_offsets (n,4), landmarks (n,10), face_prob (n)
    yoloface     image (1,3,H,W) RGB in [0,1]          -> detections (1,A,16)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CROP_SIZE = 512  # source and driving crops, and the generated crop (the official `image_size`)
MOTION_SIZE = 256  # driving crops are resized to 256x256 for both motion encoders
DINO_SIZE = 224  # the appearance encoder's input
ARCFACE_SIZE = 112  # the aligned face ArcFace embeds
WINDOW = 25  # frames per UNet window: also the chunk of the motion encoders and their bucket ids
# An exported UNet's frame count is fixed (its window, `unet` below): a first segment shorter than the window
# (AnimateConfig.first_segment), which runs the UNet at fewer frames, runs on the torch backend only.
LATENT_FACTOR = 8  # the VAE's downsampling: latent h, w = pixel H, W / 8
TOKENS = 64  # appearance and motion tokens per frame
DECODE_CHUNK = 8  # frames per VAE decoder call (the official decode chunk; the exported example's size)
# latent size of the 512x512 crops; the tiny UNet's smallest (three downsamplings)
LATENT_SIZE = {"official": 64, "tiny": 8}


@dataclass(frozen=True)
class DType:
    """One element type under each library's name: the one table the exporters, backends and engines use."""
    name: str  # numpy's and the export manifest's ("float32")
    torch: torch.dtype
    onnxruntime: str  # onnxruntime's type string
    tensorrt: str  # the TensorRT DataType member


DTYPES = tuple(DType(*row) for row in (
    ("float32", torch.float32, "tensor(float)", "FLOAT"),
    ("float16", torch.float16, "tensor(float16)", "HALF"),
    ("bfloat16", torch.bfloat16, "tensor(bfloat16)", "BF16"),
    ("float64", torch.float64, "tensor(double)", "DOUBLE"),
    ("int8", torch.int8, "tensor(int8)", "INT8"),
    ("int32", torch.int32, "tensor(int32)", "INT32"),
    ("int64", torch.int64, "tensor(int64)", "INT64"),
    ("uint8", torch.uint8, "tensor(uint8)", "UINT8"),
    ("bool", torch.bool, "tensor(bool)", "BOOL"),
    ("float8_e4m3fn", torch.float8_e4m3fn, "tensor(float8e4m3fn)", "FP8"),
))
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}  # the precision options' compute dtypes


def dtype(**key) -> DType:
    """The row whose field `key` names has the value given, e.g. dtype(onnxruntime="tensor(float)")."""
    (field, value), = key.items()
    for row in DTYPES:
        if getattr(row, field) == value:
            return row
    raise KeyError(f"no dtype with {field} {value!r}")


def numpy_dtype(torch_dtype: torch.dtype) -> np.dtype:
    return np.dtype(dtype(torch=torch_dtype).name)


@dataclass(frozen=True)
class AxisRange:
    """The sizes one axis takes: min <= opt (the size tuned for) <= max."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def fixed(cls, value: int) -> AxisRange:
        return cls(value, value, value)


# UNet calls per window batch the guidance branches: the official sampler's three, or one (fast mode)
UNET_BATCH = {"quality": AxisRange(1, 3, 3), "fast": AxisRange(1, 1, 1)}
MOTION_FRAMES = AxisRange(1, WINDOW, WINDOW)  # one chunk of driving frames per motion call
DECODE_FRAMES = AxisRange(1, DECODE_CHUNK, DECODE_CHUNK)


@dataclass(frozen=True)
class DetectorLimits:
    """The face detectors' sizes: the runtime keeps its calls inside them, engine profiles cover them."""
    max_image_side: int = 2048  # larger images are downscaled before detection
    max_face_crops: int = 256  # R-Net / O-Net candidates per call
    mtcnn_cell: int = 12  # P-Net's window
    mtcnn_min_face: int = 20  # the mtcnn package's default minimum face size (px)
    yolo_short_side: int = 416  # YoloFace inputs: short side scaled to this ...
    yolo_stride: int = 32  # ... each side rounded up to a multiple of this
    yolo_max_aspect_ratio: float = 2.5  # long side / short side an engine serves


DETECTOR = DetectorLimits()


@dataclass(frozen=True)
class TensorContract:
    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float"  # "float" (the export's precision), "float32" (always), "int32"
    dynamic: tuple[str, ...] = ()  # the named dims that vary between calls of one export

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.dims) if dim in self.dynamic}


@dataclass(frozen=True)
class ModelContract:
    name: str
    inputs: tuple[TensorContract, ...]
    outputs: tuple[TensorContract, ...]
    batch_one: bool = False  # its leading axis is fixed at 1: callers feed one image per call

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input and output name, {axis: symbolic name} of its dynamic axes (the ONNX exporter's form)."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    @property
    def fp32_inputs(self) -> tuple[str, ...]:
        """Floating inputs that stay fp32 in an fp16 export (none when the whole model stays fp32)."""
        return tuple(t.name for t in self.inputs if t.dtype == "float32") if self.allow_fp16 else ()

    @property
    def allow_fp16(self) -> bool:
        """False: the reference runs the whole model in fp32, so an fp16 export keeps it fp32."""
        return any(t.dtype == "float" for t in self.inputs + self.outputs)


def _t(name: str, *dims: int | str, dtype: str = "float", dynamic: tuple[str, ...] = ()) -> TensorContract:
    return TensorContract(name, dims, dtype, dynamic)


_FRAMES, _PIXELS, _LATENT = ("frames",), ("height", "width"), ("latent_height", "latent_width")
_BOXES = ("boxes",)

MODELS: dict[str, ModelContract] = {c.name: c for c in (
    ModelContract("appearance", (_t("image", 1, 3, DINO_SIZE, DINO_SIZE), _t("id_embedding", 1, 512)),
                  (_t("appearance_tokens", 1, TOKENS, "width"),)),
    ModelContract("motion", (_t("face_images", "frames", 3, MOTION_SIZE, MOTION_SIZE, dtype="float32",
                                dynamic=_FRAMES),
                             _t("pose_images", "frames", 3, MOTION_SIZE, MOTION_SIZE, dtype="float32",
                                dynamic=_FRAMES),
                             _t("head_bucket", 1, dtype="int32"), _t("exp_bucket", 1, dtype="int32")),
                  (_t("motion_tokens", "frames", TOKENS, "width", dtype="float32", dynamic=_FRAMES),)),
    ModelContract("vae_encoder", (_t("image", "batch", 3, "height", "width", dtype="float32",
                                     dynamic=("batch",) + _PIXELS),),
                  (_t("latent_mean", "batch", 4, "latent_height", "latent_width", dtype="float32",
                      dynamic=("batch",) + _LATENT),)),
    ModelContract("vae_decoder", (_t("latents", "frames", 4, "latent_height", "latent_width",
                                     dynamic=_FRAMES + _LATENT),),
                  (_t("frames", "frames", 3, "height", "width", dynamic=_FRAMES + _PIXELS),)),
    ModelContract("unet", (_t("sample", "batch", "window", 8, "latent_height", "latent_width", dynamic=("batch",)),
                           _t("timestep", 1, dtype="float32"),
                           _t("appearance_tokens", "batch", TOKENS, "width", dynamic=("batch",)),
                           _t("motion_tokens", "batch", "window", TOKENS, "width", dynamic=("batch",)),
                           _t("pose_map", "pose_channels", "latent_height", "latent_width"),
                           _t("added_time_ids", "batch", 3, dtype="float32", dynamic=("batch",))),
                  (_t("v_prediction", "batch", "window", 4, "latent_height", "latent_width", dynamic=("batch",)),)),
    ModelContract("pose_guider", (_t("pose_images", "frames", 3, "height", "width", dynamic=_FRAMES + _PIXELS),),
                  (_t("pose_features", "frames", "pose_channels", "feature_height", "feature_width",
                      dynamic=_FRAMES + ("feature_height", "feature_width")),)),
    ModelContract("mtcnn_pnet", (_t("image", 1, 3, "height", "width", dtype="float32", dynamic=_PIXELS),),
                  (_t("box_offsets", 1, 4, "cells_y", "cells_x", dtype="float32", dynamic=("cells_y", "cells_x")),
                   _t("face_prob", 1, "cells_y", "cells_x", dtype="float32", dynamic=("cells_y", "cells_x"))),
                  batch_one=True),
    ModelContract("mtcnn_rnet", (_t("patches", "boxes", 3, 24, 24, dtype="float32", dynamic=_BOXES),),
                  (_t("box_offsets", "boxes", 4, dtype="float32", dynamic=_BOXES),
                   _t("face_prob", "boxes", dtype="float32", dynamic=_BOXES))),
    ModelContract("mtcnn_onet", (_t("patches", "boxes", 3, 48, 48, dtype="float32", dynamic=_BOXES),),
                  (_t("box_offsets", "boxes", 4, dtype="float32", dynamic=_BOXES),
                   _t("landmarks", "boxes", 10, dtype="float32", dynamic=_BOXES),
                   _t("face_prob", "boxes", dtype="float32", dynamic=_BOXES))),
    ModelContract("yoloface", (_t("image", 1, 3, "height", "width", dtype="float32", dynamic=_PIXELS),),
                  (_t("detections", 1, "anchors", 16, dtype="float32", dynamic=("anchors",)),),
                  batch_one=True),
)}

# the loop's networks (every backend has them) and the face detectors (an export has MTCNN, and YoloFace
# when the weights folder had it)
LOOP_MODELS = ("appearance", "motion", "vae_encoder", "vae_decoder", "unet")
MTCNN_MODELS = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")
YOLOFACE_MODEL = "yoloface"
