import json
from pathlib import Path

import pytest
import torch

from hyportrait.cli import main
from hyportrait.errors import WeightsError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.weights import (
    CHECKPOINTS,
    check_weights,
    expected_manifest,
    load_networks,
    random_networks,
    read_checkpoint,
    save_networks,
)

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    nets = random_networks("tiny", seed=3)
    return nets, save_networks(nets, tmp_path_factory.mktemp("weights"))


def test_manifest_equals_the_official_checkpoints():
    official = json.loads((DATA / "official_checkpoint_keys.json").read_text())["files"]
    ours = expected_manifest()
    assert sorted(ours) == sorted(official)  # the 8 files
    for path in official:
        assert ours[path] == official[path], path


def test_round_trip_of_a_saved_random_checkpoint(tiny_folder):
    nets, root = tiny_folder
    assert check_weights(root, "tiny").ok
    loaded = load_networks(root, "tiny")
    for spec in CHECKPOINTS:
        a, b = getattr(nets, spec.name).state_dict(), getattr(loaded, spec.name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), spec.name


def test_a_wrong_key_is_reported_per_file(tiny_folder, tmp_path):
    _, root = tiny_folder
    bad = tmp_path / "bad"
    for spec in CHECKPOINTS:
        (bad / spec.path).parent.mkdir(parents=True, exist_ok=True)
        (bad / spec.path).write_bytes((root / spec.path).read_bytes())
    state = {k: v.clone() for k, v in read_checkpoint(bad / "hyportrait/pose_guider.pth").items()}  # unmap
    state["conv_in.weight_renamed"] = state.pop("conv_in.weight")
    state["conv_out.bias"] = torch.zeros(7)
    torch.save(state, bad / "hyportrait/pose_guider.pth")
    (bad / "hyportrait/headpose.pth").unlink()

    report = check_weights(bad, "tiny")
    by_path = {f.path: f for f in report.files}
    assert not report.ok
    pose = by_path["hyportrait/pose_guider.pth"]
    assert pose.missing == ["conv_in.weight"] and pose.unexpected == ["conv_in.weight_renamed"]
    assert pose.mismatched[0][0] == "conv_out.bias" and pose.mismatched[0][2] == [7]
    assert not by_path["hyportrait/headpose.pth"].present
    assert by_path["hyportrait/unet.pth"].ok
    summary = report.summary()
    assert "missing key    conv_in.weight" in summary and "MISSING  hyportrait/headpose.pth" in summary
    with pytest.raises(WeightsError, match="conv_in.weight_renamed"):
        load_networks(bad, "tiny")


def test_unreadable_checkpoint_and_missing_folder(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        read_checkpoint(junk)
    with pytest.raises(WeightsError, match="does not exist"):
        check_weights(tmp_path / "nowhere")


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(WeightsError):
        read_checkpoint(path)


def test_cli_weights_check_and_expected(tiny_folder, tmp_path, capsys):
    assert main(["weights", "check", str(tmp_path)]) == 1  # empty folder: every file missing
    out = capsys.readouterr().out
    assert out.count("MISSING") == len(CHECKPOINTS) and "built-in MTCNN" in out
    assert "absent   unet/config.json (the built-in SVD-xt config is used)" in out
    assert main(["weights", "expected"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["hyportrait/image_proj.pth"] == {"weight": [64, 261], "bias": [64]}
    assert main(["weights", "check", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_damaged_config_is_reported_naming_its_file(tmp_path, capsys):
    """A truncated, non-object or wrong-typed config.json is a bad_weights report line, not a traceback when
    the network is built from it."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 64, "in_chan')
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": 5}')
    report = check_weights(tmp_path)
    assert sorted(report.config_errors) == ["unet/config.json", "vae/config.json"] and not report.ok
    assert "not a usable unet config (JSONDecodeError" in report.config_errors["unet/config.json"]
    assert "BAD      vae/config.json: not a usable vae config (TypeError" in report.summary()
    (tmp_path / "unet" / "config.json").write_text("[1, 2]")
    assert "(AttributeError" in check_weights(tmp_path).config_errors["unet/config.json"]
    assert main(["animate", "--weights", str(tmp_path), "--image", str(SAMPLE_IMAGE), "--video",
                 str(SAMPLE_VIDEO), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hyportrait: error [bad_weights]: ") and "Traceback" not in err
    assert "BAD      unet/config.json: not a usable unet config" in err
