"""The UNet export: engine rewrites against the official computation, the spec, and the ONNX graph."""
import copy

import numpy as np
import onnx
import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from onnx import numpy_helper

from hyportrait.export.export_unet import unet_spec
from hyportrait.export.manifest import read_manifest
from hyportrait.export.onnx_io import EXTERNAL_DATA_THRESHOLD, validate_onnx
from hyportrait.networks.unet import SharedContextIPAttnProcessor, UNetConfig
from hyportrait.networks.weights import CHECKPOINTS, Networks, random_networks

CONFIG = UNetConfig.tiny()
FRAMES, SIZE, BATCH = CONFIG.num_frames, 8, 3
NAMES = ["sample", "timestep", "appearance_tokens", "motion_tokens", "pose_map", "added_time_ids"]


@pytest.fixture(scope="module")
def nets() -> Networks:
    return random_networks("tiny")


@pytest.fixture(scope="module")
def exported(nets, tiny_export):
    """(spec, manifest record, model path) of the UNet in the session's tiny export: `nets` exported by
    `hyportrait export --tiny-random` (the external-data path of the >2 GB official UNet is taken by the
    onnxruntime-attention export below)."""
    record = read_manifest(tiny_export).models["unet"]
    return unet_spec(nets), record, tiny_export / record.file


def _per_item_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """Faithful-interface inputs with different tokens, latents and time ids for every batch item."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(BATCH, FRAMES, 8, SIZE, SIZE, generator=gen),
        "timestep": torch.tensor([0.4]),
        "appearance_tokens": torch.randn(BATCH, FRAMES, 64, 1024, generator=gen),
        "motion_tokens": torch.randn(BATCH, FRAMES, 64, 1024, generator=gen),
        "pose_features": torch.randn(BATCH, FRAMES, CONFIG.block_out_channels[0], SIZE, SIZE, generator=gen),
        "added_time_ids": torch.tensor([[12.5, 0.0, 0.0], [7.0, 30.0, 0.02], [25.0, 127.0, 0.0]]),
    }


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_engine_rewrites_match_the_official_computation(nets):
    faithful = nets.unet
    engine = copy.deepcopy(faithful).set_engine_rewrites()
    inputs = _per_item_inputs()
    shared = inputs | {"appearance_tokens": inputs["appearance_tokens"][:, 0]}  # one token set for all frames

    projected = []  # batch size of every context that a cross-attention K projection sees
    for n, m in engine.named_modules():
        if n.endswith(("attn2.to_k", "attn2.processor.to_k_ip.0")):
            m.register_forward_hook(lambda m, args, out, name=n: projected.append((name, args[0].shape[0])))
    for case in (inputs, shared):
        reference = faithful(**case)
        projected.clear()
        assert _rel_err(engine(**case), reference) <= 1e-5
        for name, batch in projected:
            if ".temporal_transformer_blocks." in name:
                assert batch == BATCH, name  # one frame mean per batch item, not one per pixel
            elif name.endswith("to_k") and case is shared:
                assert batch == BATCH, name  # appearance K/V once per batch item, not per frame
            else:
                assert batch == BATCH * FRAMES, name


@torch.no_grad()
def test_engine_rewrites_switch_back_and_keep_every_parameter(nets):
    engine = copy.deepcopy(nets.unet)
    keys = {k: v.clone() for k, v in engine.state_dict().items()}
    engine.set_engine_rewrites()
    assert {k: v.shape for k, v in engine.state_dict().items()} == {k: v.shape for k, v in keys.items()}
    engine.set_engine_rewrites(False)
    inputs = {k: v if k == "timestep" else v[:1] for k, v in _per_item_inputs().items()}
    assert torch.equal(engine(**inputs), nets.unet(**inputs))
    for key, value in engine.state_dict().items():
        assert torch.equal(value, keys[key]), key


def test_spec_shares_weights_and_leaves_the_networks_unchanged(nets):
    spec = unet_spec(nets)
    assert list(spec.inputs) == NAMES and spec.outputs == ["v_prediction"]
    shapes = {k: tuple(v.shape) for k, v in spec.inputs.items()}
    assert shapes == {"sample": (BATCH, FRAMES, 8, SIZE, SIZE), "timestep": (1,),
                      "appearance_tokens": (BATCH, 64, 1024), "motion_tokens": (BATCH, FRAMES, 64, 1024),
                      "pose_map": (CONFIG.block_out_channels[0], SIZE, SIZE), "added_time_ids": (BATCH, 3)}
    assert [s["sample"].shape[0] for s in spec.extra_inputs] == [1]
    assert set(spec.dynamic_axes) == {"sample", "appearance_tokens", "motion_tokens", "added_time_ids",
                                      "v_prediction"}
    assert all(axes == {0: "batch"} for axes in spec.dynamic_axes.values())

    assert not nets.unet.engine_rewrites
    assert all(type(m.processor) is IPAdapterAttnProcessor2_0 for n, m in nets.unet.named_modules()
               if n.endswith("attn2"))
    assert all(type(m.processor) is SharedContextIPAttnProcessor for n, m in spec.module.named_modules()
               if n.endswith("attn2"))
    original = {k: v.data_ptr() for k, v in nets.unet.state_dict().items()}
    assert {k.removeprefix("unet."): v.data_ptr() for k, v in spec.module.state_dict().items()} == original

    per_frame = unet_spec(nets, pose_map=False, shared_appearance=False, batch=2)
    assert list(per_frame.inputs)[4] == "pose_features" and "pose_features" in per_frame.dynamic_axes
    assert per_frame.inputs["appearance_tokens"].shape == (2, FRAMES, 64, 1024)
    assert per_frame.inputs["pose_features"].shape == (2, FRAMES, CONFIG.block_out_channels[0], SIZE, SIZE)


def test_official_spec_builds_on_meta_and_needs_external_data():
    with torch.device("meta"):
        nets = Networks(**{spec.name: spec.build("official", None) for spec in CHECKPOINTS}, size="official")
    spec = unet_spec(nets)
    assert spec.inputs["sample"].shape == (3, 25, 8, 64, 64)
    assert spec.inputs["pose_map"].shape == (320, 64, 64)
    # diffusers creates the AlphaBlender mix factors with torch.Tensor([...]), which ignores the device context
    module = spec.module.to("meta")
    with torch.no_grad(), torch.device("meta"):
        out = module(*(v.to("meta") for v in spec.inputs.values()))
    assert out.shape == (3, 25, 4, 64, 64)
    parameters = sum(p.numel() for p in module.parameters())
    assert parameters * 2 > EXTERNAL_DATA_THRESHOLD  # even the fp16 export keeps its weights in a .data file


def test_onnx_model_matches_the_official_unet_at_two_batch_sizes(nets, exported):
    spec, record, path = exported
    assert [t.name for t in record.inputs] == NAMES and record.inputs[0].shape == ["batch", FRAMES, 8, SIZE, SIZE]
    faithful = unet_spec(nets, dedup=False)  # the official computation, same input names and example sets
    sets = [spec.inputs, *spec.extra_inputs]
    assert [s["sample"].shape[0] for s in sets] == [BATCH, 1]
    errors = validate_onnx(faithful, path, input_sets=sets)
    assert max(errors) <= 1e-4, errors


def _graph(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {t.name: t for t in graph.initializer}
    constants |= {n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"}
    return graph, producer, consumers, constants


def test_exported_attention_is_the_chain_tensorrt_fuses(exported):
    """Every attention: Q·scale -> MatMul(Kᵀ, one Transpose) -> Softmax(last axis) -> MatMul(V), nothing between."""
    graph, producer, consumers, constants = _graph(exported[2])
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 20 + 2 * 20  # 20 self-attentions, 20 cross-attentions with an IP branch each
    (head_dim,) = {c // h for c, h in zip(CONFIG.block_out_channels, CONFIG.num_attention_heads)}  # 16 throughout
    for softmax in softmaxes:
        assert [a.i for a in softmax.attribute if a.name == "axis"] == [-1]
        scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul"
        scaled_query, key_t = producer[scores.input[0]], producer[scores.input[1]]
        assert scaled_query.op_type == "Mul" and key_t.op_type == "Transpose"
        scale = [numpy_helper.to_array(constants[i]) for i in scaled_query.input if i in constants]
        assert len(scale) == 1 and scale[0].size == 1
        assert np.isclose(float(scale[0]), head_dim ** -0.5)
        assert [list(a.ints) for a in key_t.attribute if a.name == "perm"] == [[0, 2, 3, 1]]
        assert [c.op_type for c in consumers[softmax.output[0]]] == ["MatMul"]


def test_exported_token_projections_see_no_per_pixel_copies(exported):
    """Each K/V projection of the 1024-wide tokens reads an input or a frame mean, never a Tile/Expand copy."""
    graph, producer, _, constants = _graph(exported[2])
    inputs = {i.name for i in graph.input}
    projections = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants
                   and constants[n.input[1]].dims[0] == 1024]
    # per cross-attention: to_k, to_v, to_k_ip.0, to_v_ip.0
    assert len(projections) == 4 * 20
    for node in projections:
        source = node.input[0]
        while source in producer and producer[source].op_type in ("Reshape", "Flatten"):
            source = producer[source].input[0]
        assert source in inputs or producer[source].op_type == "ReduceMean", producer.get(source)


def test_onnxruntime_fused_attention_export(tmp_path):
    """The onnxruntime form: every attention one com.microsoft.MultiHeadAttention node, same results; exported
    through the external-data path the >2 GB official UNet takes."""
    import onnx

    from hyportrait.export.onnx_io import export_onnx, validate_onnx
    from hyportrait.networks.weights import random_networks

    spec = unet_spec(random_networks("tiny", seed=1), onnxruntime_attention=True)
    record = export_onnx(spec, tmp_path, external_data_threshold=0)
    assert record.data_file == "unet.onnx.data" and (tmp_path / record.data_file).is_file()
    ops = [n.op_type for n in onnx.load(tmp_path / record.file).graph.node]
    assert ops.count("MultiHeadAttention") == 60 and "Softmax" not in ops
    assert max(validate_onnx(spec, tmp_path / record.file)) <= 1e-4
