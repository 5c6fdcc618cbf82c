"""The appearance model for export: ImageProjector(DINOv2 with ID adapters), rewritten for engines.

`AppearanceEncoder` computes what the reference pipeline computes (`appearance_tokens`) for the fixed
224x224 input, with two rewrites that change no result beyond rounding:
- the position table is resampled from the trained grid (37x37) to the input grid (16x16) once, here, and kept
  as a constant: the graph has no bicubic Resize (which engines implement with differing edge rules);
- the ID adapters run pruned (`prune_dead_branches`): their conv branches and attention queries cannot
  change the output, since the cross-attention has a single key.
It is a plain torch module, so the torch backend can run the same rewritten model.
"""
import torch
import torch.nn.functional as F

from hyportrait.networks.appearance import AppearanceEncoder
from hyportrait.networks.contract import MODELS
from hyportrait.networks.weights import CHECKPOINTS, Networks

from .onnx_io import ExportSpec


def appearance_spec(nets: Networks) -> ExportSpec:
    """The "appearance" model: fixed shapes, a batch of one, as the pipeline calls it once per video."""
    encoder = AppearanceEncoder(nets.dino, nets.image_proj).eval()
    config = nets.dino.config
    gen = torch.Generator().manual_seed(0)
    size = encoder.input_size

    # ImageNet-normalised pixels are roughly in [-2, 2.6]; the runtime's ArcFace embedding has unit norm
    inputs = {"image": torch.randn(1, 3, size, size, generator=gen),
              "id_embedding": F.normalize(torch.randn(1, config.id_dim, generator=gen), dim=-1)}
    paths = {spec.name: spec.path for spec in CHECKPOINTS}
    return ExportSpec.of(MODELS["appearance"], encoder, inputs, sources=(paths["dino"], paths["image_proj"]))
