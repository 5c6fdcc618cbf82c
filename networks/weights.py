"""The official weights folder: its manifest, checks, strict loading, and random stand-ins.

Layout read (as the official release ships it under `pretrained_weights/`):
    hyportrait/{unet,dino,image_proj,pose_guider,expression,headpose,motion_proj}.pth
    vae/diffusion_pytorch_model.fp16.safetensors, vae/config.json, unet/config.json
    yoloface_v5m.pt (optional: face detector), arcface.onnx (optional: identity embedding)
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from hyportrait.errors import WeightsError, describe

from .appearance import AppearanceConfig, DinoV2WithIDAdapters, ImageProjector
from .expression_encoder import ExpressionEncoder, ExpressionEncoderConfig
from .headpose_encoder import HeadPoseEncoder, HeadPoseEncoderConfig
from .init_weights import randomize_weights
from .motion_refiner import IntensityAwareMotionRefiner, MotionRefinerConfig
from .pose_guider import PoseGuider, PoseGuiderConfig
from .unet import UNetConfig, UNetWithAdapters
from .vae import VAEConfig, build_vae

Size = Literal["official", "tiny"]


# The UNet and VAE read the diffusers config.json of the weights folder when it has one.
def _unet(size: Size, root: Path | None) -> nn.Module:
    if size == "tiny":
        return UNetWithAdapters(UNetConfig.tiny())
    cfg_file = root / "unet" / "config.json" if root else None
    return UNetWithAdapters(UNetConfig.from_json(cfg_file) if cfg_file and cfg_file.is_file() else UNetConfig())


def _vae(size: Size, root: Path | None) -> nn.Module:
    if size == "tiny":
        return build_vae(VAEConfig.tiny())
    cfg_file = root / "vae" / "config.json" if root else None
    return build_vae(VAEConfig.from_json(cfg_file) if cfg_file and cfg_file.is_file() else VAEConfig())


def _plain(module_cls, config_cls) -> Callable[[Size, Path | None], nn.Module]:
    return lambda size, root: module_cls(config_cls.tiny() if size == "tiny" else config_cls())


@dataclass(frozen=True)
class CheckpointSpec:
    name: str  # attribute of `Networks`
    path: str  # inside the weights folder
    build: Callable[[Size, Path | None], nn.Module] = field(repr=False)
    config: str | None = None  # the diffusers config.json in the weights folder that `build` reads, if any


CHECKPOINTS: tuple[CheckpointSpec, ...] = (
    CheckpointSpec("unet", "hyportrait/unet.pth", _unet, "unet/config.json"),
    CheckpointSpec("dino", "hyportrait/dino.pth", _plain(DinoV2WithIDAdapters, AppearanceConfig)),
    CheckpointSpec("image_proj", "hyportrait/image_proj.pth", _plain(ImageProjector, AppearanceConfig)),
    CheckpointSpec("pose_guider", "hyportrait/pose_guider.pth", _plain(PoseGuider, PoseGuiderConfig)),
    CheckpointSpec("expression", "hyportrait/expression.pth", _plain(ExpressionEncoder, ExpressionEncoderConfig)),
    CheckpointSpec("headpose", "hyportrait/headpose.pth", _plain(HeadPoseEncoder, HeadPoseEncoderConfig)),
    CheckpointSpec("motion_refiner", "hyportrait/motion_proj.pth",
                   _plain(IntensityAwareMotionRefiner, MotionRefinerConfig)),
    CheckpointSpec("vae", "vae/diffusion_pytorch_model.fp16.safetensors", _vae, "vae/config.json"),
)
DETECTOR_FILE = "yoloface_v5m.pt"
ARCFACE_FILE = "arcface.onnx"
CONFIG_FILES = tuple(spec.config for spec in CHECKPOINTS if spec.config)


@dataclass
class Networks:
    """Every network of the official inference path, as PyTorch modules."""
    unet: nn.Module
    dino: nn.Module
    image_proj: nn.Module
    pose_guider: nn.Module
    expression: nn.Module
    headpose: nn.Module
    motion_refiner: nn.Module
    vae: nn.Module
    size: Size = "official"

    def modules(self) -> dict[str, nn.Module]:
        return {spec.name: getattr(self, spec.name) for spec in CHECKPOINTS}


def manifest_of(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def expected_manifest(size: Size = "official") -> dict[str, dict[str, list[int]]]:
    """Keys and shapes each checkpoint file must hold, read off our module definitions."""
    with torch.device("meta"):
        return {spec.path: manifest_of(spec.build(size, None).state_dict()) for spec in CHECKPOINTS}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth (tensors only: no code runs) or .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 -- any reader failure means the file is not a usable checkpoint
        raise WeightsError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {describe(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


@dataclass
class FileReport:
    path: str
    present: bool
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # key, expected, found
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.present and not (self.missing or self.unexpected or self.mismatched or self.error)


@dataclass
class WeightsReport:
    root: str
    files: list[FileReport]
    configs: dict[str, bool]  # diffusers config.json files (absent: the built-in SVD-xt defaults are used)
    detector: bool
    arcface: bool
    config_errors: dict[str, str] = field(default_factory=dict)  # config.json files no network builds from

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files) and not self.config_errors

    def summary(self) -> str:
        lines = [f"weights folder: {self.root}"]
        for f in self.files:
            if f.ok:
                lines.append(f"  ok       {f.path}")
                continue
            if not f.present:
                lines.append(f"  MISSING  {f.path}")
                continue
            lines.append(f"  BAD      {f.path}" + (f": {f.error}" if f.error else ""))
            for k in f.missing[:10]:
                lines.append(f"           missing key    {k}")
            for k in f.unexpected[:10]:
                lines.append(f"           unexpected key {k}")
            for k, exp, got in f.mismatched[:10]:
                lines.append(f"           shape mismatch {k}: expected {exp}, found {got}")
            hidden = len(f.missing) + len(f.unexpected) + len(f.mismatched) - \
                min(len(f.missing), 10) - min(len(f.unexpected), 10) - min(len(f.mismatched), 10)
            if hidden > 0:
                lines.append(f"           ... and {hidden} more")
        for name, present in self.configs.items():
            if name in self.config_errors:
                lines.append(f"  BAD      {name}: {self.config_errors[name]}")
                continue
            lines.append(f"  {'ok      ' if present else 'absent  '} {name}"
                         f"{'' if present else ' (the built-in SVD-xt config is used)'}")
        lines.append(f"  {'ok      ' if self.detector else 'absent  '} {DETECTOR_FILE} "
                     f"({'official YOLOv5-face' if self.detector else 'the built-in MTCNN detector is used'})")
        lines.append(f"  {'ok      ' if self.arcface else 'absent  '} {ARCFACE_FILE} "
                     f"({'identity embedding' if self.arcface else 'a zero identity embedding is used'})")
        lines.append("result: " + ("all checkpoints match" if self.ok else "weights folder does not match"))
        return "\n".join(lines)


def compare_manifest(path: str, expected: dict[str, list[int]], found: dict[str, list[int]]) -> FileReport:
    report = FileReport(path, True)
    report.missing = sorted(set(expected) - set(found))
    report.unexpected = sorted(set(found) - set(expected))
    report.mismatched = [(k, expected[k], found[k]) for k in sorted(set(expected) & set(found))
                         if expected[k] != found[k]]
    return report


def check_weights(root: str | Path, size: Size = "official") -> WeightsReport:
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"weights folder {root} does not exist or is not a folder")
    files, config_errors = [], {}
    for spec in CHECKPOINTS:
        # built as load_networks builds it, from the folder's config.json, so that a damaged config is reported
        # here and a checkpoint is compared with the network its config describes
        try:
            with torch.device("meta"):
                expected = manifest_of(spec.build(size, root).state_dict())
        except Exception as exc:  # truncated JSON, a list, a wrong-typed value: all unusable
            if spec.config is None:
                raise
            config_errors[spec.config] = f"not a usable {spec.name} config ({type(exc).__name__}: {describe(exc)})"
            expected = None
        file = root / spec.path
        if not file.is_file():
            files.append(FileReport(spec.path, False))
            continue
        if expected is None:  # nothing to compare it with
            files.append(FileReport(spec.path, True))
            continue
        try:
            found = manifest_of(read_checkpoint(file))
        except WeightsError as exc:
            files.append(FileReport(spec.path, True, error=str(exc)))
            continue
        files.append(compare_manifest(spec.path, expected, found))
    return WeightsReport(str(root), files, {name: (root / name).is_file() for name in CONFIG_FILES},
                         (root / DETECTOR_FILE).is_file(), (root / ARCFACE_FILE).is_file(), config_errors)


def load_networks(root: str | Path, size: Size = "official") -> Networks:
    """Build every network and load the checkpoints of a weights folder strictly.

    Every file is checked first, so a bad folder fails with one report naming every problem.
    """
    root = Path(root)
    report = check_weights(root, size)
    if not report.ok:
        raise WeightsError(report.summary())
    modules = {}
    for spec in CHECKPOINTS:
        module = spec.build(size, root)
        module.load_state_dict(read_checkpoint(root / spec.path), strict=True)
        modules[spec.name] = module.eval().requires_grad_(False)
    return Networks(**modules, size=size)


def random_networks(size: Size = "tiny", seed: int = 0) -> Networks:
    """Every network with random weights (no checkpoint needed), at the official or a tiny size."""
    modules = {}
    for i, spec in enumerate(CHECKPOINTS):
        modules[spec.name] = randomize_weights(spec.build(size, None), seed + i).eval().requires_grad_(False)
    return Networks(**modules, size=size)


def save_networks(networks: Networks, root: str | Path) -> Path:
    """Write networks in the official layout (used for round-trip tests and random-weight folders)."""
    from safetensors.torch import save_file

    root = Path(root)
    for spec in CHECKPOINTS:
        file = root / spec.path
        file.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in getattr(networks, spec.name).state_dict().items()}
        if file.suffix == ".safetensors":
            save_file(state, str(file))
        else:
            torch.save(state, file)
    if networks.size == "official":  # tiny folders are read with the built-in tiny configs
        for name in ("unet", "vae"):
            module = getattr(networks, name)
            config = {"_class_name": type(module).__name__, **dict(module.config)}
            (root / name).mkdir(exist_ok=True)
            (root / name / "config.json").write_text(json.dumps(config, indent=2, default=list))
    return root
