"""The motion model: expression encoder + intensity-aware refiner + head pose + token assembly, as one module.

`MotionEncoder` computes exactly what the reference pipeline's `motion_tokens` computes for one chunk of
driving frames: the head-pose input scaling (`* 2 + 1`) and the zeroed translation are inside. It has no
control flow in traced graphs: the refiner's bucket-id range check runs only in eager mode, and the ids are
clamped to [0, 127] by the caller (the official bucket computation).
"""
import torch
from torch import nn

from .expression_encoder import ExpressionEncoder
from .headpose_encoder import HeadPoseEncoder
from .motion_refiner import IntensityAwareMotionRefiner, assemble_motion_tokens


class MotionEncoder(nn.Module):
    """face_images, pose_images (n, 3, 256, 256) in [0, 1]; head_bucket, exp_bucket (1,) integer ids
    -> motion tokens (n, 64, 1024)."""

    def __init__(self, expression: ExpressionEncoder, headpose: HeadPoseEncoder,
                 motion_refiner: IntensityAwareMotionRefiner):
        super().__init__()
        self.expression = expression
        self.headpose = headpose
        self.motion_refiner = motion_refiner

    def forward(self, face_images: torch.Tensor, pose_images: torch.Tensor, head_bucket: torch.Tensor,
                exp_bucket: torch.Tensor) -> torch.Tensor:
        # in eager a mismatch could broadcast a single pose frame; exported graphs share one frame axis
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not tracing and face_images.shape[0] != pose_images.shape[0]:
            raise ValueError(f"{face_images.shape[0]} face images but {pose_images.shape[0]} pose images")
        refined = self.motion_refiner(self.expression(face_images), head_bucket, exp_bucket)
        rotation, _ = self.headpose(pose_images * 2 + 1)  # the official input scaling: values in [1, 3]
        return assemble_motion_tokens(refined, rotation)
