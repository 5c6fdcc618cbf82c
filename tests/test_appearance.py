import io
import json
from pathlib import Path

import pytest
import torch

from hyportrait.networks.appearance import AppearanceConfig, DinoV2WithIDAdapters, ImageProjector
from hyportrait.networks.init_weights import randomize_weights

DATA = Path(__file__).resolve().parent / "data"
TINY = AppearanceConfig.tiny()


def checkpoint_manifest(name: str) -> dict:
    return json.loads((DATA / "official_checkpoint_keys.json").read_text())["files"][name]


def shapes(module: torch.nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def tiny_model(seed: int = 0) -> DinoV2WithIDAdapters:
    return randomize_weights(DinoV2WithIDAdapters(TINY), seed).eval()


def tiny_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, TINY.input_size, TINY.input_size, generator=gen)
    id_embedding = torch.randn(1, TINY.id_dim, generator=gen)
    return image, id_embedding


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_dino_keys_match_official_checkpoint():
    with torch.device("meta"):
        model = DinoV2WithIDAdapters(AppearanceConfig())
    assert shapes(model) == checkpoint_manifest("hyportrait/dino.pth")


def test_image_projector_keys_match_official_checkpoint():
    with torch.device("meta"):
        projector = ImageProjector(AppearanceConfig())
    assert shapes(projector) == checkpoint_manifest("hyportrait/image_proj.pth")


def test_official_token_counts():
    config = AppearanceConfig()
    assert config.num_tokens == 261
    assert (config.img_size // config.patch_size) ** 2 + 1 == 1370  # pos_embed positions


@torch.no_grad()
def test_tiny_forward_shapes():
    image, id_embedding = tiny_inputs()
    tokens = tiny_model()(image, id_embedding)
    assert tokens.shape == (1, TINY.num_tokens, TINY.dim)
    assert torch.isfinite(tokens).all()
    queries = randomize_weights(ImageProjector(TINY), 2)(tokens)
    assert queries.shape == (1, TINY.num_queries, TINY.dim)


@torch.no_grad()
def test_image_projector_mixes_tokens_not_channels():
    projector = randomize_weights(ImageProjector(TINY), 2)
    tokens = torch.randn(2, TINY.num_tokens, TINY.dim)
    expected = torch.einsum("qt,btc->bqc", projector.weight, tokens) + projector.bias[None, :, None]
    torch.testing.assert_close(projector(tokens), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_id_embedding_changes_output_only_through_adapters():
    model = tiny_model()
    image, id_embedding = tiny_inputs()
    out = model(image, id_embedding)
    assert relative_error(model(image, -id_embedding), out) > 1e-3
    for block in model.blocks:
        block.adapter = None
    assert torch.equal(model(image, id_embedding), model(image, -id_embedding))


@torch.no_grad()
def test_every_adapter_layer_has_an_adapter():
    model = DinoV2WithIDAdapters(TINY)
    with_adapter = [i for i, block in enumerate(model.blocks) if block.adapter is not None]
    assert with_adapter == list(TINY.adapter_layers)


@torch.no_grad()
def test_pruned_adapters_match_full_adapters():
    model = tiny_model()
    image, id_embedding = tiny_inputs()
    full = model(image, id_embedding)
    pruned = model(image, id_embedding, prune_dead_branches=True)
    assert relative_error(pruned, full) < 1e-5


@torch.no_grad()
def test_position_table_is_resampled_to_the_input_grid():
    model = tiny_model()
    side = TINY.img_size // TINY.patch_size
    grid = TINY.grid_size
    assert grid != side
    table = model.position_embedding(grid, grid, torch.float32)
    assert table.shape == (1, 1 + grid * grid, TINY.dim)
    torch.testing.assert_close(table[:, 0], model.pos_embed[:, 0])
    # at the trained grid DINOv2 uses the table as is (resampling with the offset would not be the identity)
    assert model.position_embedding(side, side, torch.float32) is model.pos_embed


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError):
        tiny_model()(torch.zeros(1, 3, TINY.input_size + 1, TINY.input_size), torch.zeros(1, TINY.id_dim))


@torch.no_grad()
def test_saved_state_dict_round_trip():
    source = tiny_model(seed=5)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = DinoV2WithIDAdapters(TINY)
    target.load_state_dict(torch.load(buffer), strict=True)
    target.eval()
    image, id_embedding = tiny_inputs()
    assert torch.equal(target(image, id_embedding), source(image, id_embedding))
    running_mean = f"blocks.{TINY.adapter_layers[0]}.adapter.branch2.1.bn.running_mean"
    assert torch.equal(target.state_dict()[running_mean], source.state_dict()[running_mean])
