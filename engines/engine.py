"""Running a built engine with torch CUDA tensors as its inputs and outputs.

`TensorRTEngine` checks the engine's manifest against this GPU and TensorRT (`check_engine`) before it
deserializes anything, then runs it on the current torch CUDA stream: input shapes set per call, tensor
addresses bound to torch memory, outputs allocated by torch at the shapes TensorRT infers. Its activation
memory is a `DeviceMemory` block that several engines can share, since the runtime never runs two at once
(they follow each other on one stream); `load_engines` gives every engine of a folder one block sized for
the largest. With `cuda_graphs`, each input-shape key is captured once as a CUDA graph after a warm-up run
and replayed, the inputs copied into the graph's static buffers and the outputs cloned out of it.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from hyportrait.cuda_graphs import CudaGraphs
from hyportrait.errors import EngineMismatchError, EngineRunError, InputError
from hyportrait.networks.contract import DTYPES

from .engine_manifest import check_engine, engine_path, read_engine_manifest
from .tensorrt_module import TensorRT, current_gpu, import_tensorrt


def torch_dtype(trt, data_type) -> torch.dtype:
    for row in DTYPES:  # the torch dtype of the tensors bound to a TensorRT DataType
        if getattr(trt.DataType, row.tensorrt, None) == data_type:
            return row.torch
    raise EngineRunError(f"no torch dtype for TensorRT's {data_type}")


class DeviceMemory:
    """One activation-memory block for engines that never run at the same time (their calls are serialised on
    one CUDA stream: the runtime's threads share torch's default stream), as large as the largest."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self.block: torch.Tensor | None = None

    def reserve(self, nbytes: int) -> None:
        """Grow the block to at least `nbytes` (engines rebind a grown block before their next run)."""
        if self.block is None or self.block.numel() < nbytes:
            # torch's allocations are aligned to 512 bytes; TensorRT needs 256
            self.block = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)


class TensorRTEngine:
    """One engine file (with its manifest beside it), run on torch CUDA tensors.

    memory: a block shared with other engines (default: one of its own). cuda_graphs: capture and replay a
    CUDA graph per input-shape key (`hyportrait animate --cuda-graph`). A version-compatible engine runs
    the lean runtime its plan carries (the runtime allows the plan's host code for it).
    """

    def __init__(self, path: Path, *, device: torch.device | str = "cuda", memory: DeviceMemory | None = None,
                 cuda_graphs: bool = False, trt_info: TensorRT | None = None):
        path = Path(path)
        self.manifest = read_engine_manifest(path)
        trt_info = trt_info or import_tensorrt()
        gpu_name, capability = current_gpu()
        if capability is None:
            raise EngineMismatchError(f"engine {path.name} needs a CUDA GPU, and torch sees none")
        self._environment = {"gpu_name": gpu_name, "compute_capability": capability,
                             "trt_version": trt_info.version, "flavour": trt_info.flavour}
        check_engine(self.manifest, **self._environment)  # before TensorRT reads a byte of the plan
        trt = trt_info.module
        self.name = self.manifest.model
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        if self.manifest.flags.version_compatible:
            runtime.engine_host_code_allowed = True
        self._runtime = runtime  # the engine must not outlive its runtime
        self._engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {path} although its manifest matches; "
                                      f"rebuild it with: {self.manifest.build_command}")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self.device_memory_bytes = int(self._engine.device_memory_size_v2)
        self._context = _execution_context(trt, self._engine, eager_kernels=cuda_graphs)
        self.memory = memory or DeviceMemory(self.device)
        self.memory.reserve(self.device_memory_bytes)
        self._bound_block: int | None = None
        self.cuda_graphs = cuda_graphs
        # each capture's warm-up enqueue does the set-up work of a new shape, which a capture must not contain
        self._graphs = CudaGraphs(lambda inputs: self._enqueue(inputs, torch.cuda.current_stream(self.device)))
        # one execution context: a call sets its tensors' addresses, then enqueues; calls from several threads
        # (the service's overlapped stages) take turns
        self._lock = threading.Lock()

    def run(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name for inputs by name (cast to the engine's dtypes and moved to its device), on the
        current CUDA stream. Shapes outside the engine's profile raise EngineMismatchError."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise InputError(f"{self.name}: missing inputs {', '.join(missing)}")
        check_engine(self.manifest, **self._environment, shapes={k: tuple(v.shape) for k, v in feed.items()})
        inputs = {name: feed[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
                  for name in self.input_names}
        with self._lock, torch.no_grad():
            self._bind_memory()
            if self.cuda_graphs:
                return self._graphs(inputs)
            return self._enqueue(inputs, torch.cuda.current_stream(self.device))

    def _bind_memory(self) -> None:
        block = self.memory.block
        if block.data_ptr() != self._bound_block:
            self._context.set_device_memory(block.data_ptr(), block.numel())
            self._bound_block = block.data_ptr()
            self._graphs.clear()  # captured graphs hold the old block's address

    def _enqueue(self, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        context = self._context
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineRunError(f"{self.name}: TensorRT refused the shape {list(tensor.shape)} of input {name}")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                     device=self.device) for name in self.output_names}
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineRunError(f"{self.name}: TensorRT failed to enqueue the engine")
        return outputs


def _execution_context(trt, engine, *, eager_kernels: bool):
    """An execution context without memory of its own (it gets the shared block)."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if not hasattr(engine, "create_runtime_config"):
        return engine.create_execution_context(strategy)
    # TensorRT-RTX (and newer TensorRT) take context options through an IRuntimeConfig
    config = engine.create_runtime_config()
    config.set_execution_context_allocation_strategy(strategy)
    specialization = getattr(trt, "DynamicShapesKernelSpecializationStrategy", None)
    if eager_kernels and specialization is not None:
        # TensorRT-RTX first runs a new shape with a generic kernel and compiles a specialised one in the
        # background; a captured graph would keep the generic one
        config.dynamic_shapes_kernel_specialization_strategy = specialization.EAGER
    return engine.create_execution_context(config)


@dataclass
class LoadedEngines:
    engines: dict[str, TensorRTEngine]
    memory: DeviceMemory
    onnx_folder: str | None  # the export they were built from (its pose map and manifest)


def load_engines(folder: Path, names: Iterable[str], *, device: torch.device | str = "cuda",
                 cuda_graphs: Iterable[str] = (), trt_info: TensorRT | None = None) -> LoadedEngines:
    """The engines of `names` in `folder` (made by `hyportrait build`), each checked before it is loaded,
    sharing one activation-memory block. cuda_graphs: the models to run through captured CUDA graphs."""
    folder, names, graphs = Path(folder), list(names), set(cuda_graphs)
    missing = [name for name in names if not engine_path(folder, name).is_file()]
    if missing:
        raise InputError(f"{folder} has no engine for {', '.join(missing)}: build them with "
                         f"`hyportrait build --onnx EXPORT_FOLDER --out {folder}`")
    trt_info = trt_info or import_tensorrt()
    memory = DeviceMemory(device)
    engines = {name: TensorRTEngine(engine_path(folder, name), device=device, memory=memory,
                                    cuda_graphs=name in graphs, trt_info=trt_info) for name in names}
    onnx_folder = next((engine.manifest.onnx_dir for engine in engines.values()), None)
    return LoadedEngines(engines, memory, onnx_folder)
