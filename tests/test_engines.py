"""hyportrait.engines without TensorRT: profiles from a real tiny export, engine manifests and cache keys,
the refusals of check_engine, build_all's reuse decisions, and `hyportrait build` when TensorRT is missing."""
import copy
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hyportrait.cli import main
from hyportrait.cuda_graphs import shape_key
from hyportrait.engines import build as build_module
from hyportrait.engines import engine as engine_module
from hyportrait.engines.build import BuildRequest, build_all, build_command
from hyportrait.engines.engine import TensorRTEngine, load_engines
from hyportrait.engines.engine_manifest import (
    BuildFlags,
    EngineManifest,
    cache_key,
    check_engine,
    engine_path,
    is_current,
    read_engine_manifest,
    rebuild_command,
    write_engine_manifest,
)
from hyportrait.engines.profiles import (
    ProfileError,
    ShapeRange,
    manifest_profiles,
    model_profile,
    runtime_sizes,
)
from hyportrait.engines.quality import psnr
from hyportrait.engines.tensorrt_module import TensorRT, TensorRTMissingError, import_tensorrt
from hyportrait.errors import EngineMismatchError, InputError
from hyportrait.export.manifest import read_manifest
from hyportrait.networks.contract import DETECTOR

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


@pytest.fixture(scope="module")
def manifest(tiny_export):
    return read_manifest(tiny_export)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Neither flavour importable, whatever this machine has installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)


# --------------------------------------------------------------------------------------------- profiles


def test_quality_profile_of_every_exported_model(manifest):
    sizes = runtime_sizes(manifest)
    assert (sizes.frames, sizes.latent_height, sizes.latent_width) == (4, 8, 8)  # the tiny UNet's window
    profiles = manifest_profiles(manifest, "quality")
    assert set(profiles) == set(manifest.models)
    unet = profiles["unet"]
    assert unet["sample"] == ShapeRange((1, 4, 8, 8, 8), (3, 4, 8, 8, 8), (3, 4, 8, 8, 8))
    assert unet["motion_tokens"].min == (1, 4, 64, 1024) and unet["motion_tokens"].max == (3, 4, 64, 1024)
    assert unet["timestep"].is_static and unet["pose_map"] == ShapeRange(*[(32, 8, 8)] * 3)
    assert profiles["vae_decoder"]["latents"] == ShapeRange((1, 4, 8, 8), (8, 4, 8, 8), (8, 4, 8, 8))
    assert profiles["vae_encoder"]["image"] == ShapeRange(*[(1, 3, 64, 64)] * 3)  # 8 x the latent
    assert profiles["motion"]["face_images"] == ShapeRange((1, 3, 256, 256), (25, 3, 256, 256), (25, 3, 256, 256))
    assert profiles["motion"]["head_bucket"].is_static
    assert all(r.is_static for r in profiles["appearance"].values())
    assert profiles["pose_guider"]["pose_images"] == ShapeRange(*[(4, 3, 64, 64)] * 3)
    pnet = profiles["mtcnn_pnet"]["image"]
    # the detector's pyramid: 12-pixel cells up to its first scale 12/20 of the largest image side
    assert pnet.min == (1, 3, 12, 12) and pnet.opt == (1, 3, 307, 307)
    side = int(DETECTOR.max_image_side * 0.6)
    assert pnet.max == (1, 3, side, side)
    assert profiles["mtcnn_onet"]["patches"].min == (1, 3, 48, 48)


def test_fast_and_all_profiles_differ_only_in_the_unet_batch(manifest):
    quality, fast, union = (manifest_profiles(manifest, p) for p in ("quality", "fast", "all"))
    assert fast["unet"]["sample"] == ShapeRange(*[(1, 4, 8, 8, 8)] * 3)
    assert union["unet"]["sample"] == ShapeRange((1, 4, 8, 8, 8), (3, 4, 8, 8, 8), (3, 4, 8, 8, 8))
    for name in manifest.models:
        if name != "unet":
            assert quality[name] == fast[name] == union[name]


def _with_unet_inputs(manifest, change):
    changed = copy.deepcopy(manifest)
    for tensor in changed.models["unet"].inputs:
        tensor.shape = change(tensor.shape)
    return changed


def test_profiles_refuse_shapes_the_export_cannot_serve(manifest):
    static_batch = _with_unet_inputs(manifest, lambda shape: [3 if d == "batch" else d for d in shape])
    with pytest.raises(ProfileError, match=r"unet: profile 'fast' ranges over the axes batch, which the export made "
                                           r"static"):
        manifest_profiles(static_batch, "fast", ["unet"])
    extra_axis = _with_unet_inputs(manifest, lambda shape: ["channels" if d == 32 else d for d in shape])
    with pytest.raises(ProfileError, match="unet: input pose_map has the dynamic axis 'channels', for which "
                                           "profile 'quality' has no range"):
        model_profile(extra_axis.models["unet"], "quality", runtime_sizes(manifest))
    no_unet = copy.deepcopy(manifest)
    del no_unet.models["unet"]
    with pytest.raises(ProfileError, match="no unet model"):
        manifest_profiles(no_unet, "quality", ["vae_decoder"])
    with pytest.raises(ProfileError, match="no model yoloface"):
        manifest_profiles(manifest, "quality", ["yoloface"])
    with pytest.raises(ProfileError, match="unknown profile 'turbo'"):
        manifest_profiles(manifest, "turbo")


# ------------------------------------------------------------------------------- manifests and cache keys


def _key(**changes):
    fields = {"onnx_sha256": "a" * 64, "quantization": None, "precision": "fp16",
              "profile": {"x": ShapeRange((1, 2), (3, 2), (3, 2))}, "flags": BuildFlags(),
              "compute_capability": "9.0", "tensorrt_version": "10.3.0", "flavour": "tensorrt"}
    return cache_key(**{**fields, **changes})


def test_cache_key_changes_with_everything_an_engine_depends_on():
    assert _key() == _key()
    variants = [
        {"onnx_sha256": "b" * 64}, {"quantization": {"calibration_sha256": "c"}}, {"precision": "int8"},
        {"profile": {"x": ShapeRange((1, 2), (1, 2), (3, 2))}}, {"flags": BuildFlags(hardware_compatible=True)},
        {"flags": BuildFlags(optimization_level=5)}, {"compute_capability": "8.9"},
        {"tensorrt_version": "10.3.1"}, {"flavour": "tensorrt_rtx"},
    ]
    keys = {_key(**v) for v in variants} | {_key()}
    assert len(keys) == len(variants) + 1


def _manifest(tmp_path: Path, **changes) -> EngineManifest:
    request = BuildRequest(onnx_dir=tmp_path / "onnx", out_dir=tmp_path / "engines", precision="int8",
                           profile="fast")
    fields = {
        "model": "unet", "engine_file": "unet.engine", "onnx_dir": str(tmp_path / "onnx"),
        "onnx_file": "unet.int8.onnx", "onnx_sha256": "a" * 64, "precision": "int8", "profile_name": "fast",
        "profile": {"sample": ShapeRange(*[(1, 25, 8, 64, 64)] * 3), "timestep": ShapeRange(*[(1,)] * 3)},
        "flags": BuildFlags(), "tensorrt_flavour": "tensorrt", "tensorrt_version": "10.3.0.26",
        "gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "target_compute_capabilities": ["8.9"],
        "cache_key": _key(), "build_command": build_command(request, ["unet"]), "engine_bytes": 5,
    }
    return EngineManifest(**{**fields, **changes})


def test_engine_manifest_round_trip_and_currency(tmp_path):
    engine = tmp_path / "unet.engine"
    engine.write_bytes(b"plan!")
    manifest = _manifest(tmp_path)
    write_engine_manifest(manifest, engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.engine", "unet.engine.json"]
    assert read_engine_manifest(engine) == manifest
    assert is_current(engine, _key())
    assert not is_current(engine, _key(precision="fp8"))
    engine.write_bytes(b"a truncated or replaced plan")
    assert not is_current(engine, _key())
    assert not is_current(tmp_path / "vae_decoder.engine", _key())
    with pytest.raises(EngineMismatchError, match="has no manifest"):
        read_engine_manifest(tmp_path / "vae_decoder.engine")


# ------------------------------------------------------------------------------------------ check_engine


def test_engines_are_served_by_the_export_they_were_built_from(tmp_path):
    """The runtime reads the export's manifest, pose map and ArcFace from the folder the UNet engine's manifest
    names (`hyportrait build` leaves arcface.onnx there)."""
    from hyportrait.runtime.models import engine_export_folder

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "unet.engine").write_bytes(b"plan!")
    write_engine_manifest(_manifest(tmp_path), engines / "unet.engine")
    assert engine_export_folder(engines) == tmp_path / "onnx"
    with pytest.raises(InputError, match="has no engine for unet"):
        engine_export_folder(tmp_path)


def test_check_engine_accepts_a_matching_engine(tmp_path):
    check_engine(_manifest(tmp_path), gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9",
                 trt_version="10.3.0.26", flavour="tensorrt", shapes={"sample": (1, 25, 8, 64, 64)})


def test_check_engine_refuses_another_gpu_and_says_how_to_rebuild(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(EngineMismatchError) as refused:
        check_engine(manifest, **H100, trt_version="10.3.0.26", flavour="tensorrt")
    message = refused.value.message
    assert refused.value.code == "engine_mismatch"
    assert "runs on compute capability 8.9 (built on NVIDIA GeForce RTX 4090" in message
    assert "this GPU (NVIDIA H100 80GB HBM3) has compute capability 9.0" in message
    assert message.endswith(f"Rebuild it on this machine with: {manifest.build_command}")
    assert "hyportrait build --onnx" in message and "--precision int8 --profile fast" in message
    assert "--models unet" in message


def test_hardware_compatible_engines_run_on_ampere_and_newer(tmp_path):
    manifest = _manifest(tmp_path, flags=BuildFlags(hardware_compatible=True), target_compute_capabilities=["8.0+"])
    check_engine(manifest, **H100, trt_version="10.3.0.26", flavour="tensorrt")
    with pytest.raises(EngineMismatchError, match="hardware-compatible with Ampere and newer.*compute capability 7.5"):
        check_engine(manifest, gpu_name="Tesla T4", compute_capability="7.5", trt_version="10.3.0.26",
                     flavour="tensorrt")


def test_check_engine_refuses_another_tensorrt(tmp_path):
    manifest = _manifest(tmp_path)
    gpu = {"gpu_name": "RTX 4090", "compute_capability": "8.9"}
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0.26, this runtime is 10.3.1.1"):
        check_engine(manifest, **gpu, trt_version="10.3.1.1", flavour="tensorrt")
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0.26, this runtime is TensorRT-RTX 1.7"):
        check_engine(manifest, **gpu, trt_version="1.7.0.1", flavour="tensorrt_rtx")
    compatible = _manifest(tmp_path, flags=BuildFlags(version_compatible=True))
    check_engine(compatible, **gpu, trt_version="10.8.0.1", flavour="tensorrt")  # later, same major
    for version in ("10.2.0.5", "11.0.0.1"):  # older, or another major version
        with pytest.raises(EngineMismatchError, match="version-compatible from TensorRT 10.3.0.26 within major "
                                                      f"version 10, this runtime is {version}"):
            check_engine(compatible, **gpu, trt_version=version, flavour="tensorrt")


def test_check_engine_refuses_shapes_outside_the_profile_and_names_them_all(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(EngineMismatchError) as refused:
        check_engine(manifest, **H100, trt_version="10.4.0.1", flavour="tensorrt",
                     shapes={"sample": (3, 25, 8, 64, 64), "timestep": [1], "pose": (1,)})
    message = refused.value.message
    assert "compute capability 9.0" in message and "this runtime is 10.4.0.1" in message
    assert "input sample of shape [3, 25, 8, 64, 64] is outside the engine's profile (min [1, 25, 8, 64, 64], " \
           "max [1, 25, 8, 64, 64])" in message
    assert "the engine has no input 'pose' (it has sample, timestep)" in message
    assert "input timestep" not in message  # inside its profile
    # a profile that covers the batch is suggested in the rebuild command
    assert message.endswith(rebuild_command(manifest, profile="all"))
    assert "--profile all" in message


def test_tensorrt_engine_checks_before_deserializing(tmp_path, monkeypatch):
    engine = tmp_path / "unet.engine"
    engine.write_bytes(b"plan!")
    write_engine_manifest(_manifest(tmp_path), engine)
    monkeypatch.setattr(engine_module, "current_gpu", lambda: (H100["gpu_name"], H100["compute_capability"]))

    def runtime(*args):
        raise AssertionError("the plan must not reach TensorRT")

    fake = TensorRT(SimpleNamespace(Runtime=runtime, Logger=runtime), "tensorrt", "10.3.0.26")
    with pytest.raises(EngineMismatchError, match="runs on compute capability 8.9.*compute capability 9.0"):
        TensorRTEngine(engine, trt_info=fake)
    with pytest.raises(InputError, match="has no engine for vae_decoder, motion"):
        load_engines(tmp_path, ["unet", "vae_decoder", "motion"], trt_info=fake)


def test_shape_key_is_the_inputs_names_shapes_and_dtypes():
    a = {"x": torch.zeros(2, 3), "t": torch.zeros(1)}
    assert shape_key(a) == shape_key({"t": torch.ones(1), "x": torch.ones(2, 3)})
    assert shape_key(a) != shape_key({"x": torch.zeros(3, 2), "t": torch.zeros(1)})
    assert shape_key(a) != shape_key({"t": torch.ones(1), "x": torch.ones(2, 3, dtype=torch.float16)})


# ----------------------------------------------------------------------------------- build_all and the CLI


class _UnusableTensorRT:
    """A TensorRT module whose first use fails, recording that a build was attempted."""

    def __init__(self, calls: list):
        self.calls = calls

    def __getattr__(self, name):
        self.calls.append(name)
        raise RuntimeError("no GPU in this test")


def _fake_tensorrt(calls: list) -> TensorRT:
    return TensorRT(_UnusableTensorRT(calls), "tensorrt_rtx", "1.7.0.1")


def test_build_all_reuses_current_engines_and_rebuilds_stale_ones(tiny_export, manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "current_gpu", lambda: (None, None))
    request = BuildRequest(onnx_dir=tiny_export, out_dir=tmp_path, precision="fp32", profile="quality",
                           models=("vae_decoder", "motion"))
    profiles = manifest_profiles(manifest, "quality")
    for name in request.models:  # engines as an earlier build would have left them
        engine = engine_path(tmp_path, name)
        engine.write_bytes(b"plan")
        record = manifest.models[name]
        key = cache_key(onnx_sha256=record.sha256, quantization=None, precision="fp32", profile=profiles[name],
                        flags=BuildFlags(), compute_capability=None, tensorrt_version="1.7.0.1",
                        flavour="tensorrt_rtx")
        write_engine_manifest(_manifest(tmp_path, model=name, cache_key=key, engine_bytes=4), engine)
    calls = []
    results = build_all(request, trt_info=_fake_tensorrt(calls), keep_going=True)
    assert [(r.model, r.status) for r in results] == [("vae_decoder", "current"), ("motion", "current")]
    assert calls == []
    # other build flags make both stale: each is rebuilt, and a failure does not stop the next
    stale = dataclasses.replace(request, flags=BuildFlags(version_compatible=True))
    results = build_all(stale, trt_info=_fake_tensorrt(calls), keep_going=True)
    assert [(r.model, r.status) for r in results] == [("vae_decoder", "failed"), ("motion", "failed")]
    assert len(calls) == 2 and "no GPU in this test" in results[0].error
    with pytest.raises(build_module.EngineBuildError, match="vae_decoder: RuntimeError: no GPU in this test"):
        build_all(stale, trt_info=_fake_tensorrt(calls))


def test_cli_build_without_tensorrt(tiny_export, tmp_path, capsys, no_tensorrt):
    with pytest.raises(TensorRTMissingError):
        import_tensorrt()
    assert main(["build", "--onnx", str(tiny_export), "--out", str(tmp_path / "engines"), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "error [tensorrt_missing]: TensorRT is not installed" in err
    assert "pip install tensorrt" in err and "TensorRT-RTX" in err


def test_cli_build_refuses_bad_requests_before_any_work(tiny_export, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out)]) == 2  # fp16 from an fp32 export
    assert "error [bad_input]: engines are strongly typed" in capsys.readouterr().err
    assert main(["build", "--onnx", str(tmp_path), "--out", str(out)]) == 2
    assert "is not a finished export: no manifest.json" in capsys.readouterr().err
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out), "--precision", "int8",
                 "--calibration", str(tmp_path / "missing.npz")]) == 2
    assert "calibration file" in capsys.readouterr().err
    assert main(["build", "--onnx", str(tiny_export), "--out", str(out), "--precision", "fp32",
                 "--models", "yoloface"]) == 2
    assert "error [bad_profile]: the export has no model yoloface" in capsys.readouterr().err
    assert not out.exists()


def test_build_command_records_every_option(tmp_path):
    request = BuildRequest(onnx_dir=tmp_path / "onnx", out_dir=tmp_path / "out", precision="fp8", profile="all",
                           calibration=tmp_path / "c.npz",
                           flags=BuildFlags(optimization_level=5, workspace_bytes=6 * 2**30,
                                            hardware_compatible=True, version_compatible=True))
    command = build_command(request, ["unet"])
    assert command == (f"hyportrait build --onnx {tmp_path}/onnx --out {tmp_path}/out --precision fp8 --profile all "
                       f"--opt-level 5 --calibration {tmp_path}/c.npz --workspace-gb 6 "
                       "--hardware-compatible --version-compatible --models unet")


# ---------------------------------------------------------------------------------------------- quality


def test_psnr():
    reference = np.zeros((2, 3, 8, 8))
    assert psnr(reference + 0.1, reference) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(np.full((4,), 255.0), np.full((4,), 250.0), data_range=255) == pytest.approx(
        10 * math.log10(255**2 / 25))
    assert psnr(reference, reference) == math.inf
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(reference, reference[0])


def test_manifest_json_is_plain_data(tmp_path):
    path = write_engine_manifest(_manifest(tmp_path), tmp_path / "unet.engine")
    data = json.loads(path.read_text())
    assert data["profile"]["sample"] == {"min": [1, 25, 8, 64, 64], "opt": [1, 25, 8, 64, 64],
                                         "max": [1, 25, 8, 64, 64]}
    assert data["flags"]["strongly_typed"] is True and data["tensorrt_flavour"] == "tensorrt"


# ----------------------------------------------------------------------------------- hyportrait verify


def test_verify_compares_every_output_on_random_and_recorded_inputs(tiny_export, manifest, tmp_path):
    from hyportrait.engines.verify import verify

    unet = manifest.models["unet"]
    rng = np.random.default_rng(0)
    recorded = {f"step3/{t.name}": rng.standard_normal([1 if d == "batch" else d for d in t.shape]).astype(np.float32)
                for t in unet.inputs}
    np.savez(tmp_path / "unet_inputs.npz", **recorded)
    report = verify(tiny_export, tiny_export, models=["unet", "mtcnn_onet"], recorded=tmp_path / "unet_inputs.npz",
                    random=False)
    assert report.passed and report.rtol == 1e-3
    assert {(e.model, e.output, e.inputs) for e in report.errors} == {
        ("unet", "v_prediction", "recorded step3"),
        *(("mtcnn_onet", output, inputs) for output in ("box_offsets", "landmarks", "face_prob")
          for inputs in ("random opt", "random min"))}
    assert all(e.max_abs == 0 for e in report.errors)  # the same model on the same inputs


def test_verify_command_fails_on_a_perturbed_model(tiny_export, manifest, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    perturbed = tmp_path / "perturbed"
    perturbed.mkdir()
    for name in ("manifest.json", "mtcnn_onet.onnx", "mtcnn_rnet.onnx"):
        shutil.copy(tiny_export / name, perturbed / name)
    model = onnx.load(perturbed / "mtcnn_onet.onnx")
    weight = next(w for w in model.graph.initializer if numpy_helper.to_array(w).ndim == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.05, weight.name))
    onnx.save(model, perturbed / "mtcnn_onet.onnx")
    report = tmp_path / "verify.json"
    assert main(["verify", "--engines", str(perturbed), "--onnx", str(tiny_export), "--models", "mtcnn_rnet",
                 "mtcnn_onet", "--report", str(report)]) == 2
    out, err = capsys.readouterr()
    assert "error [verify_failed]:" in err and "mtcnn_onet.box_offsets" in err and "mtcnn_rnet" not in err
    assert "FAILED" in out
    result = json.loads(report.read_text())
    assert not result["passed"]
    assert {e["model"] for e in result["errors"] if not e["passed"]} == {"mtcnn_onet"}
    assert main(["verify", "--engines", str(tmp_path), "--onnx", str(tiny_export)]) == 2
    assert "neither an engine folder" in capsys.readouterr().err
