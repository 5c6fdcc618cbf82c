"""Optimization profiles: the min/opt/max shape of every engine input, derived from the export manifest.

Pure functions of the export's model records (input names, shapes with symbolic dynamic axes) and a profile
name. Each model has a rule giving a range per symbolic axis name; static axes keep the exported size. The
sizes the runtime will use come from the export itself: the UNet's record fixes the window's frame count and
the latent size (h x w), and every pixel size is 8 x the latent size.

Profiles (what the runtime's sampling modes call; see runtime/pipeline.py):
    quality  UNet guidance batch 1..3, opt 3: the official sampler batches its three guidance branches; 1 and
             2 stay valid so `guidance_branches` can be lowered without a rebuild.
    fast     UNet batch 1..1: the LCM sampler of fast mode runs one branch (no guidance), so the engine is
             tuned for exactly that shape.
    all      the union of quality and fast for every input (opt from quality): one engine for both modes.
The other models do not depend on the mode:
    vae_decoder  frames 1..8 (the decode chunk; opt 8) at the UNet's latent size
    vae_encoder  one image at 8 x the latent size
    motion       frames 1..25 (one chunk of driving frames; opt 25)
    appearance   fixed (exported static)
    pose_guider  fixed: one window of pose frames at 8 x the latent size
    mtcnn_pnet   one pyramid level: each side from the detector's 12-pixel cell to its first scale (12/20) of
                 the largest image side the engine serves (contract.DETECTOR); opt the 512 crop's level
    mtcnn_rnet, mtcnn_onet  a batch of 1..max_face_crops candidate crops (the detector chunks larger batches)
    yoloface     short side 416, long side up to 416 x yolo_max_aspect_ratio, multiples of 32 (the official resize)
The sizes and limits themselves are the contract's (hyportrait.networks.contract).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from hyportrait.errors import ProfileError
from hyportrait.export.manifest import Manifest
from hyportrait.export.onnx_io import ModelRecord
from hyportrait.networks.contract import (
    CROP_SIZE,
    DECODE_FRAMES,
    DETECTOR,
    LATENT_FACTOR,
    MOTION_FRAMES,
    UNET_BATCH,
    AxisRange,
)

PROFILES = ("quality", "fast", "all")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes: every `min` axis <= `opt` <= `max`; static inputs have min == opt == max."""
    min: Shape
    opt: Shape
    max: Shape

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max))

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: dict) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class RuntimeSizes:
    """The sizes every profile is built around, read off the export's UNet record."""
    frames: int  # the UNet window
    latent_height: int
    latent_width: int

    @property
    def pixel_height(self) -> int:
        return self.latent_height * LATENT_FACTOR

    @property
    def pixel_width(self) -> int:
        return self.latent_width * LATENT_FACTOR


def runtime_sizes(manifest: Manifest) -> RuntimeSizes:
    unet = manifest.models.get("unet")
    if unet is None:
        raise ProfileError("the export has no unet model: its record fixes the frame count and latent size that "
                           "every engine profile is built around")
    sample = next((t for t in unet.inputs if t.name == "sample"), None)
    if sample is None or len(sample.shape) != 5 or not all(isinstance(d, int) for d in sample.shape[1:]):
        shape = None if sample is None else sample.shape
        raise ProfileError(f"the unet's input sample must be (batch, frames, channels, h, w) with fixed frames "
                           f"and latent size, the export has {shape}")
    _, frames, _, height, width = sample.shape
    return RuntimeSizes(frames, height, width)


_fixed = AxisRange.fixed


def _pnet_side_range() -> AxisRange:
    """P-Net input sides over the detector's pyramid (its default minimum face size)."""
    first_scale = DETECTOR.mtcnn_cell / DETECTOR.mtcnn_min_face
    crop_level = int(CROP_SIZE * first_scale)  # the source crop is re-detected at 512 x 512
    return AxisRange(DETECTOR.mtcnn_cell, crop_level, int(DETECTOR.max_image_side * first_scale))


def _yoloface_side_range() -> AxisRange:
    short, stride = DETECTOR.yolo_short_side, DETECTOR.yolo_stride
    return AxisRange(short, short, math.ceil(short * DETECTOR.yolo_max_aspect_ratio / stride) * stride)


def axis_rules(model: str, profile: str, sizes: RuntimeSizes) -> dict[str, AxisRange]:
    """The range of each symbolic axis of `model`'s inputs under `profile`."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    if model == "unet":
        if profile == "all":
            ranges = UNET_BATCH.values()
            return {"batch": AxisRange(min(r.min for r in ranges), UNET_BATCH["quality"].opt,
                                       max(r.max for r in ranges))}
        return {"batch": UNET_BATCH[profile]}
    crops = DETECTOR.max_face_crops
    rules = {
        "vae_decoder": {"frames": DECODE_FRAMES,
                        "latent_height": _fixed(sizes.latent_height), "latent_width": _fixed(sizes.latent_width)},
        "vae_encoder": {"batch": _fixed(1), "height": _fixed(sizes.pixel_height),
                        "width": _fixed(sizes.pixel_width)},
        "motion": {"frames": MOTION_FRAMES},
        "appearance": {},
        "pose_guider": {"frames": _fixed(sizes.frames), "height": _fixed(sizes.pixel_height),
                        "width": _fixed(sizes.pixel_width)},
        "mtcnn_pnet": {"height": _pnet_side_range(), "width": _pnet_side_range()},
        # opt: typical candidate counts after P-Net and after R-Net on a portrait
        "mtcnn_rnet": {"boxes": AxisRange(1, 32, crops)},
        "mtcnn_onet": {"boxes": AxisRange(1, 8, crops)},
        "yoloface": {"height": _yoloface_side_range(), "width": _yoloface_side_range()},
    }
    if model not in rules:
        raise ProfileError(f"no engine profile is known for model {model!r}")
    return rules[model]


def model_profile(record: ModelRecord, profile: str, sizes: RuntimeSizes) -> dict[str, ShapeRange]:
    """min/opt/max shapes of every input of one exported model. Raises ProfileError when the export's shapes
    cannot serve the profile: an axis the rule ranges over is not dynamic in the export, or a dynamic axis
    has no range."""
    rules = axis_rules(record.name, profile, sizes)
    dynamic = {d for t in record.inputs for d in t.shape if isinstance(d, str)}
    fixed_by_export = sorted(set(rules) - dynamic)
    if fixed_by_export:
        raise ProfileError(f"{record.name}: profile {profile!r} ranges over the axes {', '.join(fixed_by_export)}, "
                           f"which the export made static (its inputs: {_describe(record)}); re-export the model")
    shapes = {}
    for tensor in record.inputs:
        axes = []
        for dim in tensor.shape:
            if isinstance(dim, int):
                axes.append(_fixed(dim))
            elif dim in rules:
                axes.append(rules[dim])
            else:
                raise ProfileError(f"{record.name}: input {tensor.name} has the dynamic axis {dim!r}, for which "
                                   f"profile {profile!r} has no range")
        shapes[tensor.name] = ShapeRange(tuple(a.min for a in axes), tuple(a.opt for a in axes),
                                         tuple(a.max for a in axes))
    return shapes


def manifest_profiles(manifest: Manifest, profile: str,
                      models: Iterable[str] | None = None) -> dict[str, dict[str, ShapeRange]]:
    """Profiles of the named models (default: every model of the export), by model name."""
    names = list(manifest.models) if models is None else list(models)
    missing = [name for name in names if name not in manifest.models]
    if missing:
        raise ProfileError(f"the export has no model {', '.join(missing)} (it has {', '.join(manifest.models)})")
    sizes = runtime_sizes(manifest)
    return {name: model_profile(manifest.models[name], profile, sizes) for name in names}


def _describe(record: ModelRecord) -> str:
    return ", ".join(f"{t.name} {t.shape}" for t in record.inputs)
