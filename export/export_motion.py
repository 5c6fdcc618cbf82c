"""The motion model for export: expression encoder + intensity-aware refiner + head pose + token assembly.

`MotionEncoder` computes exactly what the reference pipeline's `motion_tokens` computes for one chunk of
driving frames, as one graph: the head-pose input scaling (`* 2 + 1`) and the zeroed translation are inside.
The frame count is dynamic (1 .. 25, one chunk); the two intensity bucket ids are int32 inputs of shape (1,).
The graph has no control flow: the refiner's bucket-id range check runs only in eager mode, and the ids are
clamped to [0, 127] by the caller (the official bucket computation). It is a plain torch module, so the torch
backend can run the same model.
"""
import torch
from torch import nn

from .expression_encoder import ExpressionEncoder
from .headpose_encoder import HeadPoseEncoder
from .motion_refiner import IntensityAwareMotionRefiner, assemble_motion_tokens
from .onnx_io import ExportSpec
from .weights import CHECKPOINTS, Networks

MOTION_SIZE = 256  # driving crops are resized to 256x256 for both encoders
MAX_FRAMES = 25  # one chunk: the bucket ids are computed per 25-frame window


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

    frames_axis = {0: "frames"}
    paths = {spec.name: spec.path for spec in CHECKPOINTS}
    return ExportSpec(
        name="motion",
        module=encoder,
        inputs=inputs(MAX_FRAMES),
        outputs=["motion_tokens"],
        dynamic_axes={"face_images": frames_axis, "pose_images": frames_axis, "motion_tokens": frames_axis},
        sources=(paths["expression"], paths["headpose"], paths["motion_refiner"]),
        extra_inputs=[inputs(7)],
        allow_fp16=False,  # the reference runs the motion networks in fp32 whatever the precision
    )
