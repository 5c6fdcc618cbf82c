"""The motion model for export: expression encoder + intensity-aware refiner + head pose + token assembly.

`MotionEncoder` computes exactly what the reference pipeline's `motion_tokens` computes for one chunk of
driving frames, as one graph: the head-pose input scaling (`* 2 + 1`) and the zeroed translation are inside.
The frame count is dynamic (1 .. 25, one chunk); the two intensity bucket ids are int32 inputs of shape (1,).
The graph has no control flow: the refiner's bucket-id range check runs only in eager mode, and the ids are
clamped to [0, 127] by the caller (the official bucket computation). It is a plain torch module, so the torch
backend can run the same model.
"""
import torch

from hyportrait.networks.contract import MODELS, MOTION_SIZE, WINDOW
from hyportrait.networks.motion import MotionEncoder
from hyportrait.networks.weights import CHECKPOINTS, Networks

from .onnx_io import ExportSpec


def motion_spec(nets: Networks) -> ExportSpec:
    """The "motion" model, exported at a full chunk of 25 frames and validated again at 7."""
    encoder = MotionEncoder(nets.expression, nets.headpose, nets.motion_refiner).eval()
    num_buckets = nets.motion_refiner.config.num_buckets
    gen = torch.Generator().manual_seed(0)

    def inputs(frames: int) -> dict[str, torch.Tensor]:
        return {
            "face_images": torch.rand(frames, 3, MOTION_SIZE, MOTION_SIZE, generator=gen),
            "pose_images": torch.rand(frames, 3, MOTION_SIZE, MOTION_SIZE, generator=gen),
            "head_bucket": torch.randint(num_buckets, (1,), generator=gen, dtype=torch.int32),
            "exp_bucket": torch.randint(num_buckets, (1,), generator=gen, dtype=torch.int32),
        }

    paths = {spec.name: spec.path for spec in CHECKPOINTS}
    return ExportSpec.of(MODELS["motion"], encoder, inputs(WINDOW), extra_inputs=[inputs(7)],
                         sources=(paths["expression"], paths["headpose"], paths["motion_refiner"]))
