"""The exported appearance model: the engine-friendly rewrite against the faithful modules, and its ONNX graph."""
import types

import pytest
import torch

from hyportrait.export.export_appearance import appearance_spec
from hyportrait.export.onnx_io import validate_onnx
from hyportrait.networks.appearance import (
    AppearanceConfig,
    AppearanceEncoder,
    DinoV2WithIDAdapters,
    ImageProjector,
)
from hyportrait.networks.init_weights import randomize_weights

TINY = AppearanceConfig.tiny()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def nets():
    # the spec reads only these two networks
    dino = randomize_weights(DinoV2WithIDAdapters(TINY), 0).eval().requires_grad_(False)
    image_proj = randomize_weights(ImageProjector(TINY), 1).eval().requires_grad_(False)
    return types.SimpleNamespace(dino=dino, image_proj=image_proj)


@pytest.fixture(scope="module")
def spec(nets):
    return appearance_spec(nets)


@torch.no_grad()
def test_encoder_matches_faithful_modules(nets, spec):
    assert spec.inputs["image"].shape == (1, 3, 224, 224) and spec.inputs["id_embedding"].shape == (1, 512)
    faithful = nets.image_proj(nets.dino(spec.inputs["image"], spec.inputs["id_embedding"]))
    tokens = spec.module(**spec.inputs)
    assert tokens.shape == (1, TINY.num_queries, TINY.dim)
    assert relative_error(tokens, faithful) <= 1e-5


@torch.no_grad()
def test_position_table_is_resampled_once(nets, spec, monkeypatch):
    grid = TINY.grid_size
    assert grid != TINY.img_size // TINY.patch_size  # the tiny table is trained for another grid: a real resample
    table = spec.module.position_table
    assert table.shape == (1, 1 + grid * grid, TINY.dim)
    torch.testing.assert_close(table, nets.dino.position_embedding(grid, grid, torch.float32), rtol=0, atol=0)
    expected = spec.module(**spec.inputs)

    def no_resampling(*args):
        raise AssertionError("the encoder resampled the position table during a call")

    monkeypatch.setattr(nets.dino, "position_embedding", no_resampling)
    assert torch.equal(spec.module(**spec.inputs), expected)


def test_state_dict_is_the_checkpoints_own(nets, spec):
    assert isinstance(spec.module, AppearanceEncoder) and spec.module.dino is nets.dino  # shared, not copied
    # the table is derived, not stored: the wrapper loads the official dino.pth and image_proj.pth unchanged
    keys = set(spec.module.state_dict())
    assert keys == {f"dino.{k}" for k in nets.dino.state_dict()} | {f"image_proj.{k}" for k in
                                                                     nets.image_proj.state_dict()}
    assert spec.sources == ("hyportrait/dino.pth", "hyportrait/image_proj.pth")


def test_other_input_sizes_are_refused(spec):
    with pytest.raises(ValueError, match="position table"):
        spec.module(torch.zeros(1, 3, 238, 238), torch.zeros(1, 512))


def test_onnx_matches_torch(spec, exported):
    path, _ = exported
    errors = validate_onnx(spec, path, providers=["CPUExecutionProvider"])
    assert len(errors) == 2  # the example the graph was traced with, then fresh random inputs
    assert max(errors) <= 1e-4


def test_onnx_graph_is_engine_friendly(exported):
    _, model = exported
    ops = {node.op_type for node in model.graph.node}
    assert "Resize" not in ops  # the position table is a constant
    assert not model.functions and not ops & {"If", "Loop", "Scan"}  # subgraphs live only in these
    # the patch embedding is the only conv left: the adapters' conv branches were dropped
    assert sum(node.op_type == "Conv" for node in model.graph.node) == 1
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs == {"image": [1, 3, 224, 224], "id_embedding": [1, 512]}
    assert [o.name for o in model.graph.output] == ["appearance_tokens"]
