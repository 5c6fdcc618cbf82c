"""The export core (onnx_io, manifest, export_all, `hyportrait export`) and the VAE, pose-guider,
face-detector and ArcFace exporters, on CPU with tiny networks."""
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from hyportrait.cli import main
from hyportrait.errors import InputError, WeightsError
from hyportrait.export import export_all as export_all_module
from hyportrait.export.export_all import export_all
from hyportrait.export.export_arcface import copy_arcface
from hyportrait.export.export_face_detector import yoloface_spec
from hyportrait.export.export_pose_guider import POSE_CONSTANT_FILE, pose_guider_spec
from hyportrait.export.export_vae import vae_decoder_spec, vae_encoder_spec
from hyportrait.export.manifest import MANIFEST_FILE, read_manifest
from hyportrait.export.onnx_io import (
    FP32_TOLERANCE,
    ExportError,
    ExportSpec,
    export_onnx,
    fp16_module,
    relative_error,
    validate_onnx,
)
from hyportrait.networks.face_detector import PNet, PNetAnySize, YoloFaceDetector
from hyportrait.networks.init_weights import randomize_weights
from hyportrait.networks.vae import decode_latents, encode_image
from hyportrait.networks.weights import CHECKPOINTS, random_networks, save_networks
from hyportrait.runtime.api import Animator
from hyportrait.runtime.models import ModelOptions, load_models

MY_MODELS = ("vae_encoder", "vae_decoder", "pose_guider", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")


class Small(nn.Module):
    """Conv + GroupNorm + an integer input and two outputs: enough to exercise names, dtypes and axes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.GroupNorm(4, 32)

    def forward(self, image, scale, offset):
        y = self.norm(self.conv(image)) * scale[:, None, None, None] + offset[:, None, None, None]
        return y, y.mean(dim=(1, 2, 3))


def small_spec(name="small") -> ExportSpec:
    torch.manual_seed(0)
    batch = {0: "batch"}

    def inputs(b):
        return {"image": torch.randn(b, 3, 16, 16), "scale": torch.rand(b) + 0.5,
                "offset": torch.randint(0, 4, (b,))}

    return ExportSpec(name, randomize_weights(Small(), 1).eval(), inputs(3), ["features", "mean"],
                      {"image": batch, "scale": batch, "offset": batch, "features": batch, "mean": batch},
                      extra_inputs=[inputs(1)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------- onnx_io


def test_round_trip_with_a_dynamic_axis(tmp_path):
    spec = small_spec()
    record = export_onnx(spec, tmp_path)
    assert leftovers(tmp_path) == ["small.onnx"]
    assert record.data_file is None and record.opset == 18 and record.precision == "fp32"
    assert [(t.name, t.dtype, t.shape) for t in record.inputs] == [
        ("image", "float32", ["batch", 3, 16, 16]), ("scale", "float32", ["batch"]), ("offset", "int64", ["batch"])]
    assert [(t.name, t.shape) for t in record.outputs] == [("features", ["batch", 32, 16, 16]), ("mean", ["batch"])]
    errors = validate_onnx(spec, tmp_path / "small.onnx")
    assert len(errors) == 4 and max(errors) <= FP32_TOLERANCE  # batch 3, batch 1, and a random set of each
    # the check can fail: a module with other weights is far off
    other = ExportSpec(**{**spec.__dict__, "module": randomize_weights(Small(), 2).eval()})
    assert min(validate_onnx(other, tmp_path / "small.onnx")) > 0.1


def test_external_data_is_one_file_next_to_the_model(tmp_path):
    spec = small_spec()
    record = export_onnx(spec, tmp_path / "a", external_data_threshold=0)
    assert record.data_file == "small.onnx.data"
    assert leftovers(tmp_path / "a") == ["small.onnx", "small.onnx.data"]
    assert record.size_bytes == sum((tmp_path / "a" / f).stat().st_size for f in leftovers(tmp_path / "a"))
    assert (tmp_path / "a" / "small.onnx").stat().st_size < 4096  # the weights are not inside
    (tmp_path / "a").rename(tmp_path / "moved")  # the data location is relative to the model
    model = onnx.load(str(tmp_path / "moved" / "small.onnx"))
    assert sum(t.ByteSize() for t in model.graph.initializer) > 3456  # the conv weight is back in
    assert max(validate_onnx(spec, tmp_path / "moved" / "small.onnx")) <= FP32_TOLERANCE
    # exported again without external data: the stale data file goes
    export_onnx(spec, tmp_path / "moved")
    assert leftovers(tmp_path / "moved") == ["small.onnx"]


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    spec = ExportSpec("broken", Exploding(), {"x": torch.zeros(1)}, ["y"], {})
    with pytest.raises(ExportError, match="broken.*boom"):
        export_onnx(spec, tmp_path)
    assert leftovers(tmp_path) == []
    # a failure after the graph was written (here in the checker) keeps the previous model intact
    good = small_spec()
    export_onnx(good, tmp_path, external_data_threshold=0)
    before = {f: (tmp_path / f).read_bytes() for f in leftovers(tmp_path)}

    def fail(*args, **kwargs):
        raise onnx.checker.ValidationError("checker failed")

    monkeypatch.setattr(onnx.checker, "check_model", fail)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(good, tmp_path, external_data_threshold=0)
    assert {f: (tmp_path / f).read_bytes() for f in leftovers(tmp_path)} == before


def test_fp16_export_keeps_norms_in_fp32(tmp_path):
    spec = small_spec()
    record = export_onnx(spec, tmp_path, "fp16")
    assert [t.dtype for t in record.inputs] == ["float16", "float16", "int64"]
    assert [t.dtype for t in record.outputs] == ["float16", "float16"]
    graph = onnx.load(str(tmp_path / "small.onnx")).graph
    norm = next(n for n in graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization"))
    producers = {out: n for n in graph.node for out in n.output}
    upstream = producers[norm.input[0]]
    while upstream.op_type == "Reshape":
        upstream = producers[upstream.input[0]]
    assert upstream.op_type == "Cast" and upstream.attribute[0].i == onnx.TensorProto.FLOAT
    errors = validate_onnx(spec, tmp_path / "small.onnx")  # against the fp32 module
    assert max(errors) < 1e-2 and min(errors) > 1e-6  # really computed in fp16
    # the helper leaves the original module alone and keeps the norm's parameters fp16
    half = fp16_module(spec.module)
    assert spec.module.norm.weight.dtype == torch.float32 and half.norm.weight.dtype == torch.float16
    # inputs named in fp32_inputs stay fp32 (and, as in torch, promote what they multiply)
    spec.fp32_inputs = ("scale",)
    record = export_onnx(spec, tmp_path, "fp16")
    assert [t.dtype for t in record.inputs] == ["float16", "float32", "int64"]
    assert max(validate_onnx(spec, tmp_path / "small.onnx")) < 1e-2


def test_relative_error():
    assert relative_error([3.0, 4.0], [3.0, 4.0]) == 0
    assert relative_error([3.0, 4.0], [0.0, 4.0]) == pytest.approx(0.75)
    assert relative_error([0.0, 1e-3], [0.0, 0.0]) == pytest.approx(1e-3)  # all-zero reference: absolute
    with pytest.raises(ValueError):
        relative_error(np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------------- the network exporters


@pytest.fixture(scope="module")
def nets():
    return random_networks("tiny")


def test_vae_modules_compute_what_the_reference_computes(nets):
    encoder, decoder = vae_encoder_spec(nets), vae_decoder_spec(nets)
    image = encoder.inputs["image"]
    assert relative_error(encoder.module(image).detach(), encode_image(nets.vae, image)) == 0
    latents = decoder.inputs["latents"]
    with torch.no_grad():
        assert relative_error(decoder.module(latents), next(decode_latents(nets.vae, latents))) == 0


def test_pnet_any_size_pool_matches_the_keras_pool():
    pnet = randomize_weights(PNet(), 3).eval()
    with torch.no_grad():
        for height, width in ((12, 12), (13, 17), (37, 51), (64, 48)):
            image = torch.randn(1, 3, height, width)
            for ours, reference in zip(PNetAnySize(pnet)(image), pnet(image)):
                assert torch.equal(ours, reference)


class ToyYolo(nn.Module):
    """The official detector's interface: (image, [grid per stride]) -> (1, anchors, 16)."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList([nn.Conv2d(3, 16, s, stride=s) for s in (8, 16, 32)])

    def forward(self, x, grids: list[torch.Tensor]):
        rows = []
        for i, head in enumerate(self.heads):
            f = head(x).permute(0, 2, 3, 1)[:, None]
            rows.append(torch.cat([f[..., :2] + grids[i], f[..., 2:]], dim=-1).reshape(1, -1, 16))
        return torch.cat(rows, 1)


def make_arcface(path: Path) -> None:
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 512)

        def forward(self, data):
            return self.fc(data.mean(dim=(2, 3)))

    torch.onnx.export(Embed().eval(), (torch.rand(1, 3, 112, 112),), str(path), input_names=["data"],
                      output_names=["embedding"], dynamo=False)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, nets):
    root = save_networks(nets, tmp_path_factory.mktemp("weights"))
    torch.jit.save(torch.jit.script(ToyYolo().eval()), str(root / "yoloface_v5m.pt"))
    make_arcface(root / "arcface.onnx")
    return root


def test_yoloface_exports_with_dynamic_height_and_width(tiny_weights, tmp_path):
    spec = yoloface_spec(tiny_weights / "yoloface_v5m.pt")
    record = export_onnx(spec, tmp_path)
    assert record.inputs[0].shape == [1, 3, "height", "width"]
    errors = validate_onnx(spec, tmp_path / "yoloface.onnx")  # 416x416 and 416x736
    assert max(errors) <= FP32_TOLERANCE


def test_arcface_is_checked_and_copied(tiny_weights, tmp_path):
    entry = copy_arcface(tiny_weights, tmp_path)
    assert (tmp_path / "arcface.onnx").read_bytes() == (tiny_weights / "arcface.onnx").read_bytes()
    assert entry["inputs"][0]["name"] == "data" and entry["outputs"][0]["shape"] == [1, 512]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "arcface.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="ArcFace"):
        copy_arcface(tmp_path / "bad", tmp_path / "out")


def test_exported_and_engine_models_take_arcface_from_their_export(tiny_weights, tmp_path, monkeypatch):
    """onnxruntime and TensorRT models name the export they come from (for engines: the one they were built
    from); the Animator reads arcface.onnx there, not in the folder it was given."""
    from dataclasses import replace

    from hyportrait.runtime import api

    export = tmp_path / "export"
    export.mkdir()
    copy_arcface(tiny_weights, export)
    models = load_models("torch", random_networks("tiny"), "cpu", ModelOptions(size=64))
    monkeypatch.setattr(api, "load_models", lambda *args: replace(models, backend="onnxruntime", export_dir=export))
    assert Animator(tmp_path / "engines", backend="onnxruntime", device="cpu").arcface is not None
    monkeypatch.setattr(api, "load_models", lambda *args: replace(models, backend="onnxruntime"))
    assert Animator(export, backend="onnxruntime", device="cpu").arcface is None  # no export named


def test_networks_already_built_take_their_folders_detector_and_arcface(tiny_weights):
    """Networks built once (a benchmark shares them between several Models) with the face detector and ArcFace
    of the weights folder they came from."""
    models = load_models("torch", random_networks("tiny"), "cpu", ModelOptions(size=64), weights=tiny_weights)
    assert isinstance(models.face_detector, YoloFaceDetector)
    assert Animator(models, weights=tiny_weights).arcface is not None and Animator(models).arcface is None
    missing = tiny_weights / "missing"
    with pytest.raises(WeightsError, match="missing does not exist"):
        Animator(models, weights=missing)
    with pytest.raises(WeightsError, match="missing does not exist"):
        load_models("torch", random_networks("tiny"), "cpu", ModelOptions(size=64), weights=missing)
    with pytest.raises(InputError, match="not a second source"):
        load_models("torch", tiny_weights, "cpu", ModelOptions(size=64), weights=tiny_weights)


def test_export_all_from_a_weights_folder(tiny_weights, tmp_path, monkeypatch, nets):
    # the expensive networks are covered by the CLI run below: here only the weights-folder path
    monkeypatch.setattr(export_all_module, "network_specs", lambda n, *_, **__: [pose_guider_spec(n), vae_encoder_spec(n)])
    monkeypatch.setattr(export_all_module, "mtcnn_specs", list)
    manifest = export_all(tiny_weights, tmp_path, "fp16", size="tiny")
    assert set(manifest.models) == {"pose_guider", "vae_encoder", "yoloface"}
    assert manifest.skipped == {}
    assert manifest.models["pose_guider"].precision == "fp16"
    assert manifest.models["pose_guider"].validation["max_relative_error"] <= 1e-2
    assert manifest.models["vae_encoder"].precision == "fp32"  # the reference runs the encoder in fp32
    assert manifest.models["yoloface"].precision == "fp32"
    paths = {spec.name: spec.path for spec in CHECKPOINTS}
    assert set(manifest.sources) == {paths["pose_guider"], paths["vae"], "yoloface_v5m.pt", "arcface.onnx"}
    assert manifest.sources["arcface.onnx"] == manifest.files["arcface"]["sha256"]
    assert (tmp_path / "arcface.onnx").is_file()
    assert read_manifest(tmp_path) == manifest


# ------------------------------------------------------------------------ `hyportrait export` end to end


def test_cli_export_writes_every_model_and_the_manifest(tiny_export, nets):
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    assert manifest["opset"] == 18 and manifest["precision"] == "fp32" and manifest["weights"] == "random:tiny"
    assert manifest["exporter_version"] == __import__("hyportrait").__version__
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}
    assert set(MY_MODELS) <= set(manifest["models"])
    assert set(manifest["skipped"]) == {"yoloface", "arcface"}
    for name, record in manifest["models"].items():
        path = tiny_export / record["file"]
        assert path.is_file(), name
        assert record["validation"]["max_relative_error"] <= FP32_TOLERANCE, name
        # the example and a fresh random set at least; ours add a second size and its random set
        assert len(record["validation"]["relative_errors"]) >= (4 if name in MY_MODELS else 2), name
        graph = onnx.load(str(path), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t["name"] for t in record["inputs"]], name
    decoder = manifest["models"]["vae_decoder"]
    assert decoder["inputs"][0]["shape"] == ["frames", 4, "latent_height", "latent_width"]
    assert decoder["dynamic_axes"]["latents"] == {"0": "frames", "2": "latent_height", "3": "latent_width"}
    assert manifest["models"]["mtcnn_pnet"]["inputs"][0]["shape"] == [1, 3, "height", "width"]
    assert not [p for p in os.listdir(tiny_export) if p.startswith(".")]  # no temporary files left


def test_pose_constant_is_the_pose_guider_on_a_black_image(tiny_export, nets):
    constant = np.load(tiny_export / POSE_CONSTANT_FILE)
    assert constant.shape == (32, 8, 8)  # tiny pose guider at the tiny UNet's crop: 64x64 (latent 8x8)
    assert np.array_equal(constant, nets.pose_guider.constant_features(64, 64).numpy())
    session = ort.InferenceSession(str(tiny_export / "pose_guider.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"pose_images": np.zeros((2, 3, 64, 64), np.float32)})
    assert relative_error(features[1], constant) < 1e-5


# -------------------------------------------------------------------------------------------------- errors


def test_unknown_precision(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        export_all(None, tmp_path, "fp8")
    assert main(["export", "--tiny-random", "--out", str(tmp_path), "--precision", "bf16"]) == 2
    assert "unknown precision 'bf16'" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", "--tiny-random", "--out", str(blocker / "onnx")]) == 2
    assert "is not writable" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InputError, match="not writable"):
            export_all(None, locked)


def test_an_interrupted_export_leaves_no_unfinished_export(tmp_path, monkeypatch, nets):
    """SIGINT/SIGTERM (the CLI's Interrupted, a KeyboardInterrupt) while the third model is validated: that
    model and the two written before it go, and the folder the export created; a folder that existed keeps
    what it held before (the interrupted export left five models and no manifest)."""
    validate = export_all_module.validate_onnx
    calls = []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(export_all_module, "validate_onnx", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        export_all(None, tmp_path / "new", networks=nets)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        export_all(None, kept, networks=nets)
    assert leftovers(kept) == ["notes.txt"]


def test_missing_or_mismatched_weights_folder(tmp_path, tiny_weights, capsys):
    assert main(["export", "--weights", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--weights", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "MISSING  hyportrait/unet.pth" in capsys.readouterr().err
    # tiny checkpoints read as the official networks: every file is reported with its wrong shapes
    assert main(["export", "--weights", str(tiny_weights), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "shape mismatch" in err and "does not match" in err
    assert not (tmp_path / "o3").exists()  # the folder it created goes with the failed export
    with pytest.raises(InputError, match="LoRA"):
        export_all(None, tmp_path / "o4", lora=tmp_path / "no_lora.safetensors")
