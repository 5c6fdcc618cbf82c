"""`hyportrait distill prepare`: clips of the bundled sample -> shards equal to what the runtime computes.

One tiny random-weight Animator (64 px crops) and one prepared folder are shared by the module; clips are 10
frames, examples 4 frames every 3.
"""
import hashlib
import json
import shutil

import pytest
import torch

from hyportrait.cli import main
from hyportrait.distill.data import MANIFEST, TrainingData
from hyportrait.distill.prepare import REPORT, PrepareConfig, make_animator, prepare_data
from hyportrait.errors import DataError
from hyportrait.files import SAMPLE_VIDEO
from hyportrait.networks.arcface import zero_identity_embedding
from hyportrait.runtime.pipeline import VAE_SCALE, build_conditioning, motion_tokens, vae_images
from hyportrait.runtime.preprocess import DrivingPreprocessor, crop_resize, preprocess_source, vae_input
from hyportrait.runtime.video import VideoWriter, read_frames

CONFIG = PrepareConfig(frames=4, stride=3, per_shard=2)
CLIPS = {"a.mp4": (0, 10), "sub/b.mp4": (10, 20), "short.mp4": (20, 23)}  # first and last frame + 1


@pytest.fixture(scope="module")
def animator():
    return make_animator(device="cpu", size=64)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    frames = list(read_frames(SAMPLE_VIDEO, limit=23))
    for name, (start, stop) in CLIPS.items():
        with VideoWriter(folder / name, 24, preset="ultrafast") as writer:
            for frame in frames[start:stop]:
                writer.write(frame)
    (folder / "broken.mp4").write_bytes(b"not a video" * 100)
    (folder / "notes.txt").write_text("clips for the test")
    return folder


@pytest.fixture(scope="module")
def data(videos, animator, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "data"
    return out, prepare_data(videos, out, config=CONFIG, animator=animator)


def test_prepare_writes_the_clips_and_reports_the_bad_ones(videos, data):
    out, report = data
    assert report["added"] == ["a.mp4", "sub/b.mp4"]
    assert {name: entry["code"] for name, entry in report["skipped"].items()} == {
        "broken.mp4": "bad_video", "short.mp4": "too_few_frames"}
    assert report["ignored"] == ["notes.txt"]
    assert json.loads((out / REPORT).read_text()) == report
    dataset = TrainingData(out)
    assert len(dataset) == report["examples"] == 6  # windows at 0, 3, 6 of each 10-frame clip
    manifest = dataset.manifest
    assert [shard["sources"] for shard in manifest["shards"]] == [["a.mp4"], ["sub/b.mp4"]]
    for name in report["added"]:
        source = manifest["sources"][name]
        assert source["sha256"] == hashlib.sha256((videos / name).read_bytes()).hexdigest()
        assert source["frames"] == 10 and source["examples"] == 3 and 0 <= source["reference_frame"] < 10
    assert manifest["config"]["frames"] == 4 and manifest["config"]["size"] == 64
    assert manifest["config"]["weights"] == {"random": "tiny"}
    assert dataset.fields["latents"][0] == [4, 4, 8, 8] and dataset.fields["motion"][0] == [4, 64, 1024]


@torch.no_grad()
def test_examples_are_what_the_runtime_computes(videos, data, animator):
    out, _ = data
    dataset = TrainingData(out)
    models, config = animator.models, animator.config
    frames = list(read_frames(videos / "a.mp4"))
    reference = dataset.manifest["sources"]["a.mp4"]["reference_frame"]
    source = preprocess_source(frames[reference], animator.detector)
    driving = DrivingPreprocessor(animator.detector)
    tokens = torch.cat([motion_tokens(models, torch.from_numpy(c.expression_images), torch.from_numpy(c.pose_images),
                                      c.head_bucket, c.exp_bucket) for c in driving.chunks(frames)])
    cond = build_conditioning(models, config, ref_image=torch.from_numpy(source.ref_image),
                              dino_image=torch.from_numpy(source.dino_image),
                              id_embedding=torch.from_numpy(zero_identity_embedding()), motion=tokens,
                              generator=torch.Generator().manual_seed(0))
    latents = torch.cat([
        models.vae_encoder(image=vae_images(torch.from_numpy(vae_input(crop_resize(f, source.crop_box)))[None],
                                            config.size, "cpu")) * VAE_SCALE for f in frames])
    for k, start in enumerate((0, 3, 6)):
        example = dataset[k]
        assert torch.equal(example["motion"], tokens[start:start + 4])
        assert torch.equal(example["appearance"], cond.appearance)
        assert torch.equal(example["image_latent"], cond.image_latent)
        torch.testing.assert_close(example["latents"], latents[start:start + 4], rtol=1e-5, atol=1e-5)
    # the source image is a frame of the clip: its latent is the image latent, scaled
    torch.testing.assert_close(latents[reference], cond.image_latent * VAE_SCALE, rtol=1e-5, atol=1e-5)


def test_a_rerun_resumes_without_duplicating(videos, data, animator, tmp_path):
    out, _ = data
    again = prepare_data(videos, out, config=CONFIG, animator=animator)
    assert again["added"] == [] and again["in_data_before"] == 2 and again["examples"] == 6
    assert set(again["skipped"]) == {"broken.mp4", "short.mp4"}
    # a writer killed while filling its second shard leaves the manifest of the first: the rerun redoes b only
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    manifest = json.loads((killed / MANIFEST).read_text())
    (killed / manifest["shards"][1]["file"]).unlink()
    manifest.update(shards=manifest["shards"][:1], examples=3, sources={"a.mp4": manifest["sources"]["a.mp4"]})
    (killed / MANIFEST).write_text(json.dumps(manifest))
    resumed = prepare_data(videos, killed, config=CONFIG, animator=animator)
    assert resumed["added"] == ["sub/b.mp4"] and resumed["examples"] == 6
    assert json.loads((killed / MANIFEST).read_text()) == json.loads((out / MANIFEST).read_text())


def test_bad_input_is_a_coded_one_line_error(videos, data, animator, tmp_path, capsys):
    def error(*args) -> str:
        assert main(["distill", "prepare", *map(str, args)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert error("--videos", tmp_path / "missing", "--out", tmp_path / "d").startswith(
        "hyportrait: error [bad_input]: videos folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no video here")
    assert "holds no video files" in error("--videos", tmp_path / "empty", "--out", tmp_path / "d")
    (tmp_path / "file").write_text("")
    assert "is not writable" in error("--videos", videos, "--out", tmp_path / "file" / "data")
    assert "--frames must be between 1 and 1000, got 0" in error("--videos", videos, "--out", tmp_path / "d", "--frames", "0")
    with pytest.raises(DataError, match="another config"):
        prepare_data(videos, data[0], config=PrepareConfig(frames=5), animator=animator)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(videos / "broken.mp4", bad)
    shutil.copy(videos / "short.mp4", bad)
    with pytest.raises(DataError, match="no clip .* gave an example"):
        prepare_data(bad, tmp_path / "none", config=CONFIG, animator=animator)
