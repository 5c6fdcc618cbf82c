"""Which TensorRT is installed: NVIDIA TensorRT (`tensorrt`) or TensorRT for RTX (`tensorrt_rtx`).

Both expose nearly the same Python API; the differences this package minds: TensorRT-RTX builds only strongly
typed networks, has no timing cache (its ahead-of-time build does no autotuning, and the deprecated API would
force a GPU query), compiles kernels just in time when an execution context is created, and by default
targets the RTX compute capabilities rather than the build GPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from hyportrait.errors import TensorRTMissingError

# flavour -> its module names, flavours in preference order. PyPI's standalone TensorRT-RTX wheels
# (tensorrt-rtx-cu13-bindings) install the module as tensorrt_rtx_bindings.
FLAVOUR_MODULES = {"tensorrt": ("tensorrt",), "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


@dataclass(frozen=True)
class TensorRT:
    module: ModuleType  # use as `trt`
    flavour: str  # "tensorrt" or "tensorrt_rtx"
    version: str


def import_tensorrt(flavour: str | None = None) -> TensorRT:
    """TensorRT if importable, else TensorRT-RTX (or only the flavour asked for)."""
    flavours = [flavour] if flavour else list(FLAVOUR_MODULES)
    failures = []
    for name in flavours:
        for module_name in FLAVOUR_MODULES[name]:
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:  # also a wheel whose native libraries fail to load
                failures.append(f"{module_name}: {exc}")
                continue
            return TensorRT(module, name, str(module.__version__))
    raise TensorRTMissingError(
        "TensorRT is not installed: engines need NVIDIA TensorRT or TensorRT-RTX in this environment "
        "(on a GPU server: `pip install tensorrt`; for RTX GPUs: the TensorRT-RTX wheel, imported as "
        f"tensorrt_rtx). Import errors: {'; '.join(failures)}")


def current_gpu() -> tuple[str | None, str | None]:
    """(name, compute capability "major.minor") of the current CUDA device, or (None, None) without one."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"
