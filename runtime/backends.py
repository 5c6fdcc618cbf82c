"""How a network is called: one small interface over PyTorch modules, onnxruntime sessions and TensorRT engines.

A `Session` takes named torch tensors and returns the model's single output as a torch tensor on the
runtime's device (`outputs` returns all of a model's outputs, for the face detectors). Each backend casts
inputs to the dtypes its model declares, so the loop in `pipeline.py` is the same for all of them. The five
networks of the loop, the face detector over the same backend and the pose map form `Models`:

    appearance   image (1,3,224,224), id_embedding (1,512)                    -> (1,64,1024)
    motion       face_images, pose_images (n,3,256,256), head_bucket, exp_bucket (1,) int32 -> (n,64,1024)
    vae_encoder  image (1,3,H,W) in [-1,1]                                     -> unscaled latent mean (1,4,h,w)
    vae_decoder  latents (n,4,h,w), scaled                                     -> frames (n,3,H,W) in [-1,1]
    unet         sample (B,F,8,h,w), timestep (1,), appearance_tokens (B,64,1024),
                 motion_tokens (B,F,64,1024), pose_map (C0,h,w), added_time_ids (B,3) -> (B,F,4,h,w)

These are the names and shapes of the exported ONNX models (`hyportrait.networks.contract`); the torch
backend wraps the PyTorch modules to the same contract.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from hyportrait.cuda_graphs import CudaGraphs
from hyportrait.errors import BackendError, InputError, OptionError, OutOfMemoryError
from hyportrait.networks.contract import LOOP_MODELS, dtype, numpy_dtype
from hyportrait.networks.face_detector import FaceDetector

BACKENDS = ("torch", "onnxruntime", "tensorrt")
MODEL_NAMES = LOOP_MODELS


class Session(Protocol):
    name: str

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def outputs(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


@dataclass
class Models:
    """The networks of the loop, each behind a Session, the face detector running on the same backend, plus
    the pose guider's constant map (C0, h, w)."""
    appearance: Session
    motion: Session
    vae_encoder: Session
    vae_decoder: Session
    unet: Session
    face_detector: FaceDetector
    pose_map: torch.Tensor
    backend: str
    device: torch.device
    dtype: torch.dtype  # the latents' dtype: fp16 unless the models are fp32
    window: int | None = None  # the frames per UNet call an exported UNet is fixed to (None: any)
    description: str = ""
    random_weights: bool = False  # exported from random networks (`export --tiny-random`): for trying things
    export_dir: Path | None = None  # the export the sessions come from (ArcFace is read from it), if any


def out_of_memory(what: str, exc: BaseException) -> OutOfMemoryError:
    return OutOfMemoryError(f"out of GPU memory while running {what} ({str(exc).splitlines()[0][:200]}); "
                            "try a smaller --decode-chunk, fast mode, or a GPU with more memory")


# --- torch --------------------------------------------------------------------------------------------------

class TorchSession:
    """A PyTorch module called with the loop's named inputs, cast to the dtypes it computes in.

    cuda_graph: capture one CUDA graph per input-shape key and replay it (`hyportrait.cuda_graphs`). Only
    for modules whose computation depends on input shapes alone.
    """

    def __init__(self, name: str, module: nn.Module, dtypes: dict[str, torch.dtype], *, cuda_graph: bool = False):
        self.name = name
        self.module = module
        self.dtypes = dtypes
        self.cuda_graph = cuda_graph
        self._graphs = CudaGraphs(lambda inputs: self.module(**inputs)) if cuda_graph else None

    def _cast(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dtypes[k]) if k in self.dtypes else v for k, v in inputs.items()}

    def outputs(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self(**inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = self._cast(inputs)
        try:
            return self._graphs(inputs) if self._graphs else self.module(**inputs)
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory(self.name, exc) from None


# --- onnxruntime --------------------------------------------------------------------------------------------

def _torch_dtype(onnxruntime_type: str) -> torch.dtype:
    return dtype(onnxruntime=onnxruntime_type).torch


def _is_out_of_memory(exc: Exception) -> bool:
    """onnxruntime reports an allocation failure only in its message."""
    message = str(exc)
    return "Failed to allocate" in message or "out of memory" in message.lower()


def onnxruntime_providers(device: torch.device, cuda_graph: bool = False) -> list:
    """CUDA (on the torch device's GPU) then CPU, or CPU alone."""
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError("onnxruntime has no CUDA provider here (install onnxruntime-gpu for a GPU run, "
                           "or use --device cpu)")
    # kSameAsRequested: the UNet's activations are GBs; the default arena doubles each extension
    options = {"device_id": str(device.index or 0), "arena_extend_strategy": "kSameAsRequested"}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


class OnnxRuntimeSession:
    """An onnxruntime InferenceSession fed torch tensors.

    On a GPU the inputs and the output stay in device memory: they are bound by pointer (I/O binding); the
    output is a torch tensor allocated once per input-shape key (its shape is learnt from the first run).
    On the CPU plain numpy in and out.

    cuda_graph (GPU): onnxruntime captures one CUDA graph per input-shape key (`gpu_graph_id`) and replays it;
    inputs are copied into static buffers bound once, the output is cloned out of its static buffer. The
    model must run wholly on the CUDA provider (session creation fails otherwise).
    """

    def __init__(self, name: str, path: Path, device: torch.device, cuda_graph: bool = False):
        import onnxruntime as ort

        self.name = name
        self.device = device
        self.cuda_graph = cuda_graph and device.type == "cuda"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=onnxruntime_providers(device, self.cuda_graph))
        except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own types; the message is what matters
            if _is_out_of_memory(exc):
                raise out_of_memory(f"loading {path.name}", exc) from None
            raise BackendError(f"onnxruntime cannot load {path}: {str(exc)[:500]}") from None
        self.input_dtypes = {i.name: _torch_dtype(i.type) for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0]
        self._shapes: dict[tuple, tuple[int, ...]] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._replaying = threading.Lock()  # a graph's static buffers hold one call's inputs at a time

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = {k: v.to(self.input_dtypes[k]).contiguous() for k, v in inputs.items() if k in self.input_dtypes}
        try:
            if self.device.type != "cuda":
                feed = {k: v.numpy() for k, v in inputs.items()}
                return torch.from_numpy(self.session.run([self.output.name], feed)[0])
            return self._replay(inputs) if self.cuda_graph else self._run_bound(inputs)
        except Exception as exc:  # onnxruntime's exception types are not importable by name
            if _is_out_of_memory(exc):
                raise out_of_memory(self.name, exc) from None
            raise

    def outputs(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every output, through host memory (for the small detector models, whose inputs come from the host)."""
        feed = {k: v.to(self.input_dtypes[k]).cpu().numpy() for k, v in inputs.items() if k in self.input_dtypes}
        try:
            return tuple(torch.from_numpy(o).to(self.device) for o in self.session.run(None, feed))
        except Exception as exc:  # onnxruntime's exception types are not importable by name
            if _is_out_of_memory(exc):
                raise out_of_memory(self.name, exc) from None
            raise

    def _bind(self, inputs: dict[str, torch.Tensor], out: torch.Tensor | None):
        """An I/O binding of torch tensors; without `out` onnxruntime allocates the output."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        for k, v in inputs.items():
            binding.bind_input(k, "cuda", index, numpy_dtype(v.dtype), list(v.shape), v.data_ptr())
        if out is None:
            binding.bind_output(self.output.name, "cuda", index)
        else:
            binding.bind_output(self.output.name, "cuda", index, numpy_dtype(out.dtype), list(out.shape),
                                out.data_ptr())
        return binding

    def _output_shape(self, key: tuple, inputs: dict[str, torch.Tensor], run_options=None) -> torch.Tensor | None:
        """Learn the output shape of `key` with one run whose output onnxruntime allocates; returns that
        run's output the first time, None when the shape was known."""
        if key in self._shapes:
            return None
        binding = self._bind(inputs, None)
        self.session.run_with_iobinding(binding, run_options)
        value = binding.get_outputs()[0]
        self._shapes[key] = tuple(value.shape())
        return torch.from_numpy(value.numpy()).to(self.device)

    def _empty_output(self, key: tuple) -> torch.Tensor:
        return torch.empty(self._shapes[key], dtype=_torch_dtype(self.output.type), device=self.device)

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        first = self._output_shape(key, inputs)
        if first is not None:
            return first
        out = self._empty_output(key)
        self.session.run_with_iobinding(self._bind(inputs, out))  # synchronises its stream before returning
        return out

    def _replay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._replaying:
            return self._replay_alone(inputs)

    def _replay_alone(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        import onnxruntime as ort

        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        torch.cuda.current_stream(self.device).synchronize()
        if key not in self._graphs:
            no_graph = ort.RunOptions()
            no_graph.add_run_config_entry("gpu_graph_id", "-1")  # -1: run without capturing
            self._output_shape(key, inputs, no_graph)
            static = {k: v.clone() for k, v in inputs.items()}
            out = self._empty_output(key)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(len(self._graphs)))
            self._graphs[key] = (self._bind(static, out), options, static, out)
        binding, options, static, out = self._graphs[key]
        for k, v in inputs.items():
            static[k].copy_(v)
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding, options)
        result = out.clone()
        torch.cuda.current_stream(self.device).synchronize()  # cloned before the next call may fill `out`
        return result


# --- TensorRT -----------------------------------------------------------------------------------------------

class TensorRTSession:
    """A TensorRT engine (hyportrait.engines) behind the Session interface."""

    def __init__(self, name: str, engine):
        self.name = name
        self.engine = engine

    def outputs(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        try:
            return tuple(self.engine.run(inputs).values())  # in the engine's output order
        except torch.cuda.OutOfMemoryError as exc:
            raise out_of_memory(self.name, exc) from None

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.outputs(**inputs)[0]


def resolve_device(device: str | None, backend: str) -> torch.device:
    """The torch device the runtime works on; refuses a GPU backend or device that this machine lacks."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    asked = device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise OptionError("device", f"must be cpu, cuda or cuda:N (N the GPU's index), got {str(asked)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device} was asked for, but torch sees no CUDA GPU on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BackendError(f"device {device} was asked for, but this machine has {torch.cuda.device_count()} "
                           "CUDA GPU(s), numbered from 0")
    if backend == "tensorrt" and device.type != "cuda":
        raise BackendError("the tensorrt backend needs a CUDA GPU; use --backend onnxruntime or torch on a CPU")
    return device

