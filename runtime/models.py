"""Where the loop's networks come from: PyTorch modules, an ONNX export folder, or a TensorRT engine folder.

- `load_models(backend, source, device, options)`: the one entry point (the CLI, the Animator API and the
  benchmarks go through it): a weights folder for torch (None: tiny random networks), an export folder for
  onnxruntime, an engine folder for tensorrt.
- `torch_networks(source, lora)`: the PyTorch networks of a weights folder (or random ones), a LoRA merged.
- `torch_models(nets, ...)`: the PyTorch modules. `faithful=True` calls them exactly as the official
  inference does (the reference: bit-identical); `faithful=False` runs the engine rewrites of the export
  (K/V of shared contexts projected once, DINO's constant position table and pruned adapters), the same up
  to float rounding and faster.
- `onnx_models(folder, device)`: the models of `hyportrait export` (manifest.json) with onnxruntime.
- `engine_models(folder, device)`: the engines of `hyportrait build` with TensorRT.

The face detector runs on the same backend as the other networks: the official YoloFace when the weights
folder (torch) or the export (onnxruntime, TensorRT) has it, else MTCNN; so one command makes the same
crops on every backend.

Only the torch backend imports the PyTorch network definitions (and with them diffusers): the onnxruntime
and TensorRT backends run without diffusers installed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hyportrait.errors import InputError, WeightsError, describe
from hyportrait.export.manifest import MANIFEST_FILE, Manifest, read_manifest
from hyportrait.export.onnx_io import ModelRecord
from hyportrait.networks import contract
from hyportrait.networks.contract import CROP_SIZE, MODELS, MTCNN_MODELS, PRECISIONS, YOLOFACE_MODEL
from hyportrait.networks.face_detector import (
    FaceDetector,
    MTCNNDetector,
    YoloFaceDetector,
    load_face_detector,
)

from .backends import (
    BACKENDS,
    MODEL_NAMES,
    Models,
    OnnxRuntimeSession,
    Session,
    TensorRTSession,
    TorchSession,
)
from .float8 import check_float8_device, float8_linears

POSE_CONSTANT_FILE = "pose_constant.npy"


class ReferenceUNet(nn.Module):
    """The UNet called from the engine contract exactly as the official pipeline calls it: appearance tokens
    and the pose map expanded to every frame, the timestep as a 0-dim tensor."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, appearance_tokens, motion_tokens, pose_map, added_time_ids):
        batch, frames = sample.shape[:2]
        appearance = appearance_tokens[:, None].expand(batch, frames, -1, -1)
        pose = pose_map[None, None].expand(batch, frames, -1, -1, -1)
        return self.unet(sample, timestep.reshape(()), appearance, motion_tokens, pose, added_time_ids)


class ReferenceAppearance(nn.Module):
    def __init__(self, dino: nn.Module, image_proj: nn.Module):
        super().__init__()
        self.dino = dino
        self.image_proj = image_proj

    def forward(self, image, id_embedding):
        return self.image_proj(self.dino(image, id_embedding))


def place_networks(nets, device, dtype: torch.dtype):
    """Device, dtypes and grad flags as in the reference; motion networks and VAE encoder stay fp32."""
    from hyportrait.networks.vae import place_vae

    for name, module in nets.modules().items():
        if name == "vae":
            place_vae(module, device, dtype)
        else:
            fp32 = name in ("expression", "headpose", "motion_refiner")
            module.to(device, torch.float32 if fp32 else dtype)
        # The reference leaves requires_grad on (but for the two motion encoders). The flag picks the
        # matmul path of a Linear on a strided input (one folded mm when the weight requires grad, else a
        # bmm), and in fp16 the two round differently. Inference runs under no_grad: no graph is recorded.
        module.requires_grad_(name not in ("expression", "headpose"))
    return nets


@dataclass(frozen=True)
class ModelOptions:
    """How `load_models` builds the networks. Options of one backend only are refused on the others."""
    precision: str = "fp32"  # torch: the compute precision (exports and engines fix their own)
    size: int = CROP_SIZE  # torch: the generated crop (the pose map is computed for it)
    lora: Path | None = None  # torch: a PEFT LoRA merged into the UNet (exports merge theirs at export)
    faithful: bool = True  # torch: the official module calls (False: the engine rewrites)
    cuda_graph: bool = False  # every backend on a GPU: the UNet and VAE decoder replayed as CUDA graphs
    compile: bool | str = False  # torch: torch.compile of the UNet and VAE decoder
    float8: bool = False  # torch: the UNet's transformer linears as fp8 GEMMs


def torch_networks(source, lora: Path | None = None):
    """The torch backend's `Networks`: the official weights folder `source` loaded (None: tiny random networks;
    `Networks` already built are taken as they are), with the PEFT LoRA `lora` merged into the UNet."""
    from hyportrait.networks.lora import merge_lora
    from hyportrait.networks.weights import load_networks, random_networks

    if lora is not None and not Path(lora).exists():  # before the networks are built
        raise InputError(f"LoRA {lora} does not exist")
    if isinstance(source, (str, os.PathLike)):
        nets = load_networks(Path(source))
    else:
        nets = source if source is not None else random_networks("tiny")
    if lora is not None:
        merge_lora(nets.unet, lora)
    return nets


def check_folder(weights: str | Path) -> None:
    """WeightsError unless `weights` is a folder (one named for built networks would otherwise be ignored)."""
    if not Path(weights).is_dir():
        raise WeightsError(f"weights folder {weights} does not exist or is not a folder")


def load_models(backend: str, source, device: torch.device | str, options: ModelOptions = ModelOptions(), *,
                weights: str | Path | None = None) -> Models:
    """The networks of `backend` from `source`: the official weights folder (torch; None: tiny random
    networks; or `Networks` already built, e.g. the benchmarks' random official-size ones or a folder's networks
    that several `Models` share, `weights` then naming the folder they came from, for its face detector), a
    `hyportrait export` folder (onnxruntime) or a `hyportrait build` folder (tensorrt)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if weights is not None:
        if backend != "torch" or isinstance(source, (str, os.PathLike)):
            raise InputError("`weights` names the folder of networks already built (torch backend), not a second "
                             "source")
        check_folder(weights)
    if backend == "torch":
        folder = Path(source) if isinstance(source, (str, os.PathLike)) else weights
        nets = torch_networks(source, options.lora)
        try:
            return torch_models(nets, device=device, dtype=PRECISIONS[options.precision],
                                size=options.size, faithful=options.faithful, cuda_graph=options.cuda_graph,
                                compile=options.compile, float8=options.float8,
                                face_detector=load_face_detector(folder, device))
        except ValueError as exc:  # float8 on a GPU without fp8 GEMMs
            raise InputError(str(exc)) from None
    if options.lora is not None:
        raise InputError("a LoRA is merged at export time (`hyportrait export --lora`), not at run time")
    for option in ("compile", "float8"):
        if getattr(options, option):
            raise InputError(f"{option} applies to the torch backend; the {backend} backend runs its models as "
                             "exported or built")
    if source is None:
        raise InputError(f"the {backend} backend needs `models`: a folder made by "
                         + ("`hyportrait export`" if backend == "onnxruntime" else "`hyportrait build`"))
    if backend == "onnxruntime":
        return onnx_models(Path(source), device, cuda_graph=options.cuda_graph)
    return engine_models(Path(source), device, cuda_graph=options.cuda_graph)


def torch_models(nets, *, device, dtype: torch.dtype, size: int, faithful: bool = True,
                 cuda_graph: bool = False, compile: bool | str = False, float8: bool = False,
                 face_detector: FaceDetector | None = None) -> Models:
    """The networks as torch Sessions (they are moved to `device` and `dtype` in place).

    size: the generated crop (px); the pose map is computed for it. cuda_graph: replay the UNet and the
    VAE decoder as CUDA graphs (GPU only). compile: compile the UNet and the VAE decoder with
    `torch.compile`, True for inductor or the name of a torch.compile backend (one specialisation per input
    shape: with inductor the first call of each shape takes minutes at full size). float8: the UNet's transformer
    linears as fp8 GEMMs (runtime/float8.py; GPUs of compute capability 8.9+, best compiled), on a copy of
    the UNet that shares the fp16 weights. nets: `hyportrait.networks.weights.Networks`. face_detector:
    the PyTorch detector (default MTCNN, as without the official YoloFace file).
    """
    from hyportrait.networks.appearance import AppearanceEncoder
    from hyportrait.networks.motion import MotionEncoder
    from hyportrait.networks.unet import UNetWithPoseMap, weight_sharing_copy
    from hyportrait.networks.vae import VAEClipDecoder, VAEImageEncoder

    device = torch.device(device)
    if float8:
        check_float8_device(device)
    place_networks(nets, device, dtype)
    f32 = torch.float32
    vae_dtype = next(nets.vae.encoder.parameters()).dtype
    if faithful:
        unet, appearance = ReferenceUNet(nets.unet), ReferenceAppearance(nets.dino, nets.image_proj)
    else:
        unet = UNetWithPoseMap(weight_sharing_copy(nets.unet).set_engine_rewrites(True))
        appearance = AppearanceEncoder(nets.dino, nets.image_proj)
    if float8:
        unet = weight_sharing_copy(unet)
        float8_linears(unet)
    graphs = cuda_graph and device.type == "cuda"
    vae_decoder = VAEClipDecoder(nets.vae).eval()
    if compile:
        # static shapes: the loop calls each network with a handful of shapes; our own CUDA graphs capture
        # the compiled kernels, so inductor's cudagraph mode stays off
        backend = "inductor" if compile is True else compile
        unet, vae_decoder = (torch.compile(module.eval(), backend=backend, dynamic=False)
                             for module in (unet, vae_decoder))
    unet_dtypes = {"sample": dtype, "timestep": f32, "appearance_tokens": dtype, "motion_tokens": dtype,
                   "pose_map": dtype, "added_time_ids": dtype}
    with torch.no_grad():
        pose_map = nets.pose_guider.constant_features(size, size).to(dtype)
    return Models(
        appearance=TorchSession("appearance", appearance.eval(), {"image": dtype, "id_embedding": dtype}),
        motion=TorchSession("motion", MotionEncoder(nets.expression, nets.headpose, nets.motion_refiner).eval(),
                            {"face_images": f32, "pose_images": f32}),
        vae_encoder=TorchSession("vae_encoder", VAEImageEncoder(nets.vae).eval(), {"image": vae_dtype}),
        vae_decoder=TorchSession("vae_decoder", vae_decoder, {"latents": dtype}, cuda_graph=graphs),
        unet=TorchSession("unet", unet.eval(), unet_dtypes, cuda_graph=graphs),
        face_detector=face_detector or MTCNNDetector(device=device),
        pose_map=pose_map, backend="torch", device=device, dtype=dtype,
        description=f"torch {'faithful' if faithful else 'rewritten'} {str(dtype).removeprefix('torch.')}"
                    + (" float8-linears" if float8 else "") + (f" compiled ({backend})" if compile else "")
                    + (" cuda-graphs" if graphs else ""),
    )


def _read_export_manifest(folder: Path) -> Manifest:
    manifest = read_manifest(folder)
    missing = [name for name in MODEL_NAMES if name not in manifest.models]
    if missing:
        raise InputError(f"export {folder} lacks the models {', '.join(missing)}")
    return manifest


def _input(record: ModelRecord, name: str):
    tensor = next((t for t in record.inputs if t.name == name), None)
    if tensor is None:
        raise InputError(f"the export's manifest.json lists no input {name!r} for {record.name}: the folder was "
                         "edited or is not a `hyportrait export`")
    return tensor


def _pose_map(folder: Path, device, unet: ModelRecord) -> torch.Tensor:
    path = Path(folder) / POSE_CONSTANT_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing (it is written by `hyportrait export`)")
    try:
        pose = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is damaged ({describe(exc)}); export the folder again") from None
    expected = _input(unet, "pose_map").shape
    if list(pose.shape) != expected:
        raise InputError(f"{path} holds a {list(pose.shape)} map, the UNet takes {expected}: the folder mixes "
                         "files of different exports; export it again")
    return torch.from_numpy(pose).to(device)


def _unet_sample(unet: ModelRecord) -> tuple[torch.dtype, int]:
    """The latents' dtype and the frame window of an exported UNet (its `sample` input is (B, F, 8, h, w))."""
    sample = _input(unet, "sample")
    try:
        return contract.dtype(name=sample.dtype).torch, int(sample.shape[1])
    except KeyError:
        raise InputError(f"the export's manifest.json gives the UNet's sample the unknown dtype {sample.dtype!r}: "
                         "the folder was edited; export it again") from None


def detector_models(manifest: Manifest) -> tuple[str, ...]:
    """The face-detector models of an export: YoloFace when it was exported, else the three MTCNN nets."""
    names = (YOLOFACE_MODEL,) if YOLOFACE_MODEL in manifest.models else MTCNN_MODELS
    missing = [name for name in names if name not in manifest.models]
    if missing:
        raise InputError(f"the export lacks the face-detector models {', '.join(missing)} (re-export it)")
    return names


@dataclass(frozen=True)
class ExportedNet:
    """A detector model run by a backend's session: its one input tensor -> its outputs in contract order."""
    session: Session

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (input_name,) = MODELS[self.session.name].input_names
        return self.session.outputs(**{input_name: x})


def exported_face_detector(sessions: dict[str, Session], device: torch.device) -> FaceDetector:
    """The face detector of an export's sessions (any backend): YoloFace when they hold it, else MTCNN, with
    the same pre- and post-processing as the PyTorch detectors."""
    if YOLOFACE_MODEL in sessions:
        return YoloFaceDetector(device=device, exported=ExportedNet(sessions[YOLOFACE_MODEL]))
    return MTCNNDetector(device=device, exported={name: ExportedNet(sessions[name]) for name in MTCNN_MODELS})


def _check_session(session: OnnxRuntimeSession, record: ModelRecord, folder: Path) -> None:
    """The model file takes what manifest.json says it takes (the runtime sizes every call from the manifest):
    an edited manifest or a swapped model file is refused here, not by onnxruntime in the middle of a run."""
    actual = {i.name: ([d if isinstance(d, int) else "?" for d in i.shape], i.type)
              for i in session.session.get_inputs()}
    for tensor in record.inputs:
        shape, kind = actual.get(tensor.name, (None, None))
        stated = [d if isinstance(d, int) else "?" for d in tensor.shape]
        if shape != stated or kind != next((t.onnxruntime for t in contract.DTYPES if t.name == tensor.dtype), None):
            raise InputError(f"{folder / MANIFEST_FILE} says {record.name} takes {tensor.name} {tensor.dtype} "
                             f"{tensor.shape}, but {record.file} takes "
                             + (f"{kind} {shape}" if shape else "no such input")
                             + ": the folder was edited; export it again")
    if set(actual) != {t.name for t in record.inputs}:
        raise InputError(f"{record.file} takes the inputs {sorted(actual)}, {folder / MANIFEST_FILE} lists "
                         f"{[t.name for t in record.inputs]}: the folder was edited; export it again")


def onnx_models(folder: Path, device, cuda_graph: bool = False) -> Models:
    """The exported models of `folder` as onnxruntime sessions (CUDA provider on a GPU device).

    cuda_graph: the UNet and the VAE decoder replayed as CUDA graphs (GPU only)."""
    folder, device = Path(folder), torch.device(device)
    manifest = _read_export_manifest(folder)
    records = manifest.models
    latent_dtype, window = _unet_sample(records["unet"])
    pose_map = _pose_map(folder, device, records["unet"])  # the cheap checks before any session is made
    sessions = {}
    for name in MODEL_NAMES + detector_models(manifest):
        sessions[name] = OnnxRuntimeSession(name, folder / records[name].file, device,
                                            cuda_graph=cuda_graph and name in ("unet", "vae_decoder"))
        _check_session(sessions[name], records[name], folder)
    return Models(**{name: sessions[name] for name in MODEL_NAMES},
                  face_detector=exported_face_detector(sessions, device), pose_map=pose_map,
                  backend="onnxruntime", device=device, dtype=latent_dtype, window=window, export_dir=folder,
                  random_weights=manifest.weights.startswith("random:"),
                  description=f"onnxruntime {manifest.precision} {folder}"
                  + (" cuda-graphs" if cuda_graph and device.type == "cuda" else ""))


def engine_export_folder(folder: Path) -> Path:
    """The export folder the engines of `folder` were built from: its manifest, pose map and ArcFace serve them."""
    from hyportrait.engines.engine_manifest import engine_path, read_engine_manifest

    unet_engine = engine_path(folder, "unet")
    if not unet_engine.is_file():
        raise InputError(f"{folder} has no engine for unet: build them with "
                         f"`hyportrait build --onnx EXPORT_FOLDER --out {folder}`")
    return Path(read_engine_manifest(unet_engine).onnx_dir or folder)


def engine_models(folder: Path, device, cuda_graph: bool = False) -> Models:
    """The TensorRT engines of `folder` (made by `hyportrait build`), each checked against this GPU and
    TensorRT before it is loaded. cuda_graph: the UNet and the VAE decoder replayed as CUDA graphs."""
    # TensorRT is imported only for this backend
    from hyportrait.engines.engine import load_engines

    folder, device = Path(folder), torch.device(device)
    onnx_folder = engine_export_folder(folder)
    manifest = _read_export_manifest(onnx_folder)
    graphs = ("unet", "vae_decoder") if cuda_graph else ()
    engines = load_engines(folder, MODEL_NAMES + detector_models(manifest), device=device, cuda_graphs=graphs)
    sessions = {name: TensorRTSession(name, engine) for name, engine in engines.engines.items()}
    unet = manifest.models["unet"]
    latent_dtype, window = _unet_sample(unet)
    return Models(**{name: sessions[name] for name in MODEL_NAMES},
                  face_detector=exported_face_detector(sessions, device),
                  pose_map=_pose_map(onnx_folder, device, unet), backend="tensorrt", device=device,
                  dtype=latent_dtype, window=window, export_dir=onnx_folder,
                  random_weights=manifest.weights.startswith("random:"), description=f"tensorrt {folder}"
                  + (" cuda-graphs" if cuda_graph else ""))
