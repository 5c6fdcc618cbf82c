"""A real calibration for the quantized UNet, recorded while the runtime animates a sample.

    hyportrait calibrate --models ONNX_DIR --image face.png --video driving.mp4 --out calibration.npz
    hyportrait calibrate --models ONNX_DIR --weights DIR --image face.png --video driving.mp4 --out ranges.json
    hyportrait build --onnx ONNX_DIR --out engines-int8 --precision int8 --calibration calibration.npz|ranges.json

Only the UNet calls of `sets` steps spread over the sigma schedule are recorded: the activation ranges then
cover the high-noise start, the low-noise end and the real conditioning (appearance and motion tokens of a
real face, the guidance branches). Two forms:
- input sets (.npz): the UNet's inputs at the first window of each chosen step, recorded with any backend
  whose models match the export (onnxruntime on that export is the natural one); the build calibrates them
  with onnxruntime, which cannot run the official-size UNet of the TensorRT form.
- activation ranges (.json): the amax of every quantized activation over every call (all windows and
  guidance branches) of the chosen steps, recorded by hooks on the PyTorch UNet with the engine rewrites
  (the module the export traces) and keyed by the export's tensor names (`torch_quant.RangeRecorder`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from hyportrait.errors import InputError

from .quantize import save_calibration_npz, save_ranges_json
from .torch_quant import RangeRecorder


class UNetRecorder:
    """A UNet session that passes calls through, keeps the inputs of the first call of the chosen steps and,
    given a RangeRecorder on the session's module, lets it record exactly the calls of those steps."""

    def __init__(self, session, steps: set[int], ranges: RangeRecorder | None = None):
        self.session = session
        self.name = session.name
        self.steps = steps
        self.ranges = ranges  # enabled by each call: only the chosen steps' calls are recorded
        self.feeds: list[dict[str, np.ndarray]] = []
        self.recorded_calls = 0
        self._timesteps: list[float] = []  # one per step seen (the timestep identifies the step)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        timestep = float(inputs["timestep"].reshape(-1)[0])
        first = timestep not in self._timesteps
        if first:
            self._timesteps.append(timestep)
        chosen = self._timesteps.index(timestep) in self.steps
        if chosen and first:
            self.feeds.append({k: v.detach().cpu().numpy() for k, v in inputs.items()})
        self.recorded_calls += chosen
        if self.ranges is not None:
            self.ranges.enabled = chosen
        return self.session(**inputs)


def chosen_steps(num_steps: int, sets: int) -> set[int]:
    """`sets` step indices spread evenly over [0, num_steps), first and last included."""
    if sets < 1:
        raise InputError(f"a calibration set needs at least 1 input set, got {sets}")
    return set(np.rint(np.linspace(0, num_steps - 1, min(sets, num_steps))).astype(int).tolist())


@dataclass
class Recording:
    """What one animation recorded: the input sets, the activation amax (when asked for), the decoded frames."""
    feeds: list[dict[str, np.ndarray]]
    amax: dict[str, float] | None
    frames: np.ndarray  # (N, size, size, 3) uint8
    origin: str  # the sample, the UNet calls and steps recorded, the networks


def _name(source) -> str:
    return Path(source).name if isinstance(source, (str, os.PathLike)) else f"a {type(source).__name__} input"


def record(animator, image, video, sets: int = 8, unet_onnx: Path | None = None) -> Recording:
    """Animate `image` with `video` (no output videos are written), recording the UNet calls of `sets` steps:
    their input sets and, given the export `unet_onnx` of the animator's torch UNet, the amax of the export's
    quantized activations."""
    ranges = None
    if unet_onnx is not None:
        if animator.models.backend != "torch":
            raise InputError("activation ranges are recorded on the PyTorch networks: use the torch backend")
        ranges = RangeRecorder(animator.models.unet.module, onnx.load(str(unet_onnx), load_external_data=False))
    recorder = UNetRecorder(animator.models.unet, chosen_steps(animator.config.num_steps, sets), ranges)
    animator.models.unet = recorder
    try:
        frames = np.stack(list(animator.frames(image, video)))
    finally:
        animator.models.unet = recorder.session
        if ranges is not None:
            ranges.remove()
    origin = (f"{_name(image)} driven by {_name(video)}: {recorder.recorded_calls} UNet calls at steps "
              f"{sorted(recorder.steps)} of {animator.config.num_steps}, {animator.models.description}")
    return Recording(recorder.feeds, ranges.tensor_amax() if ranges else None, frames, origin)


def record_calibration(animator, image, video, out: Path, sets: int = 8, unet_onnx: Path | None = None) -> Path:
    """`record` and save the `--calibration` file `out`: the input sets (.npz), or the activation ranges of
    the export `unet_onnx` (.json)."""
    out = Path(out)
    if (out.suffix == ".json") != (unet_onnx is not None):
        raise InputError(f"{out}: activation ranges go to a .json file and need the export's UNet, input sets "
                         "to an .npz file")
    recording = record(animator, image, video, sets, unet_onnx)
    if unet_onnx is None:
        return save_calibration_npz(out, recording.feeds)
    return save_ranges_json(out, recording.amax, origin=recording.origin)
