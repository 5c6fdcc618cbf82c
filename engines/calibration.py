"""A real calibration set for the quantized UNet: its inputs recorded while the runtime animates a sample.

    hyportrait calibrate --models ONNX_DIR --image face.png --video driving.mp4 --out calibration.npz
    hyportrait build --onnx ONNX_DIR --out engines-int8 --precision int8 --calibration calibration.npz

The UNet's inputs at `sets` steps spread over the sigma schedule (the first window of each chosen step) are
kept: the activation ranges then cover the high-noise start, the low-noise end and the real conditioning
(appearance and motion tokens of a real face, the guidance branches). Any backend whose models match the
export being quantized can record them; the onnxruntime backend on that export is the natural one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hyportrait.errors import InputError

from .quantize import save_calibration_npz


class UNetRecorder:
    """A UNet session that passes calls through and keeps the inputs of the first call of chosen steps."""

    def __init__(self, session, steps: set[int]):
        self.session = session
        self.name = session.name
        self.steps = steps
        self.feeds: list[dict[str, np.ndarray]] = []
        self._timesteps: list[float] = []  # one per step seen (the timestep identifies the step)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        timestep = float(inputs["timestep"].reshape(-1)[0])
        if timestep not in self._timesteps:
            self._timesteps.append(timestep)
            if len(self._timesteps) - 1 in self.steps:
                self.feeds.append({k: v.detach().cpu().numpy() for k, v in inputs.items()})
        return self.session(**inputs)


def chosen_steps(num_steps: int, sets: int) -> set[int]:
    """`sets` step indices spread evenly over [0, num_steps), first and last included."""
    if sets < 1:
        raise InputError(f"a calibration set needs at least 1 input set, got {sets}")
    return set(np.rint(np.linspace(0, num_steps - 1, min(sets, num_steps))).astype(int).tolist())


def record_calibration(animator, image, video, out: Path, sets: int = 8) -> Path:
    """Animate `image` with `video` (no output videos are written) and save the UNet inputs of `sets` steps
    to `out` in the `--calibration` format."""
    recorder = UNetRecorder(animator.models.unet, chosen_steps(animator.config.num_steps, sets))
    animator.models.unet = recorder
    try:
        for _ in animator.frames(image, video):
            pass
    finally:
        animator.models.unet = recorder.session
    return save_calibration_npz(out, recorder.feeds)
