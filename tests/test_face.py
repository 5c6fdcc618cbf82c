"""Face detectors (YoloFace wrapper, MTCNN port) and the ArcFace wrapper."""
import io
import logging
import os
import pickle
import warnings
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
import torch

from hyportrait.errors import InputError, WeightsError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.arcface import ArcFace, load_arcface, zero_identity_embedding
from hyportrait.networks.face_detector import (
    MTCNNDetector,
    YoloFaceDetector,
    crop_and_resize,
    load_face_detector,
    load_keras_weight_list,
    mtcnn_nms,
    mtcnn_weights_dir,
    nms,
)


@pytest.fixture(scope="module")
def mtcnn():
    torch.set_num_threads(1)
    return MTCNNDetector()


def driving_frames(indices):
    import av

    with av.open(str(SAMPLE_VIDEO)) as container:
        return [f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in indices]


def assert_same_faces(batched, single, atol=0.0):
    """Face lists agree: same count, boxes and landmarks to `atol` px, scores to float32 rounding."""
    assert [len(faces) for faces in batched] == [len(faces) for faces in single]
    for faces_a, faces_b in zip(batched, single):
        for a, b in zip(faces_a, faces_b):
            np.testing.assert_allclose(a.box, b.box, rtol=0, atol=atol)
            np.testing.assert_allclose(a.landmarks, b.landmarks, rtol=0, atol=atol)
            assert a.score == pytest.approx(b.score, abs=max(atol, 1e-6))


def assert_plausible_face(face, image_shape):
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= image_shape[1] and 0 <= y1 < y2 <= image_shape[0]
    lm = face.landmarks
    assert lm.shape == (5, 2)
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
    left_eye, right_eye, nose, left_mouth, right_mouth = lm
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])
    assert left_eye[0] < nose[0] < right_eye[0]


# ---------------------------------------------------------------------------------------------------------
# NMS


def test_nms_is_greedy_like_torchvision():
    # A overlaps B (IoU 0.82), B overlaps C (IoU 0.82), A and C barely overlap: B is suppressed by A, so C stays
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.45).tolist() == [3, 0]
    assert nms(boxes, scores, 0.9).tolist() == [3, 0, 1, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_mtcnn_nms_suppressed_boxes_still_suppress():
    # the mtcnn package's rule differs from greedy NMS: C is dropped because B (itself dropped) overlaps it
    boxes = np.array([[0, 0, 10, 10, 0.9], [4, 0, 14, 10, 0.8], [8, 0, 18, 10, 0.7]], dtype=np.float64)
    assert mtcnn_nms(boxes, 0.4).tolist() == [0]
    assert mtcnn_nms(boxes, 0.4, block=1).tolist() == [0]
    # "min": intersection over the smaller box; a box inside a bigger one is always dropped
    nested = np.array([[0, 0, 100, 100, 0.9], [10, 10, 30, 30, 0.8]], dtype=np.float64)
    assert mtcnn_nms(nested, 0.7, method="union").tolist() == [0, 1]
    assert mtcnn_nms(nested, 0.7, method="min").tolist() == [0]


# ---------------------------------------------------------------------------------------------------------
# YoloFace wrapper with a scripted stand-in model


class KnownAnchors(torch.nn.Module):
    """Emits fixed rows in network-input pixels for each image of the batch; one row's position comes from the
    stride-32 grid (checks its x, y order) and its objectness is the mean of the image's first (red) input
    channel (checks RGB and /255, and that each image gets its own rows)."""

    def __init__(self):
        super().__init__()
        lm_a = [170.0, 280.0, 230.0, 280.0, 200.0, 310.0, 180.0, 340.0, 220.0, 340.0]
        self.register_buffer("rows", torch.tensor([
            [200.0, 300.0, 100.0, 120.0, 0.9] + lm_a + [1.0],  # A: kept
            [205.0, 305.0, 100.0, 120.0, 0.8] + lm_a + [1.0],  # B: IoU with A > 0.45, suppressed
            [0.0, 0.0, 40.0, 40.0, 0.0] + [70.0, 75.0, 90.0, 75.0, 80.0, 80.0, 72.0, 90.0, 88.0, 90.0] + [1.0],  # C
            [300.0, 500.0, 60.0, 60.0, 0.4] + lm_a + [1.0],  # objectness under 0.5: dropped
            [300.0, 100.0, 60.0, 60.0, 0.9] + lm_a + [0.5],  # 0.9 * 0.5 = 0.45 under 0.5: dropped
        ]))

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        strides = [8, 16, 32]
        for i in range(3):
            assert grids[i].shape[2] == img.shape[2] // strides[i]
            assert grids[i].shape[3] == img.shape[3] // strides[i]
        rows = self.rows.repeat(img.shape[0], 1, 1)
        rows[:, 2, 0] = grids[2][0, 0, 0, 2, 0] * 32 + 16  # column 2 -> x 80
        rows[:, 2, 1] = grids[2][0, 0, 2, 0, 1] * 32 + 16  # row 2 -> y 80
        rows[:, 2, 4] = img[:, 0].mean(dim=(1, 2))
        return rows


class MergesBatch(torch.nn.Module):
    """A model exported with batch size 1 fixed in its final reshape: a batch comes back as one row set."""

    def __init__(self):
        super().__init__()
        self.model = KnownAnchors()

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return self.model(img, grids).reshape(1, -1, 16)


class FailsOnBatch(torch.nn.Module):
    """A model exported with batch size 1 fixed in an inner reshape: a batch fails."""

    def __init__(self):
        super().__init__()
        self.model = KnownAnchors()

    def forward(self, img: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return self.model(img.reshape(1, 3, img.shape[2], img.shape[3]), grids)


def save_scripted(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but it is the official file's format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(path))
    return path


@pytest.fixture
def yolo_dir(tmp_path):
    save_scripted(KnownAnchors(), tmp_path / "yoloface_v5m.pt")
    return tmp_path


def colour_images(*shapes_and_reds):
    """Images of the given (height, width) whose red channel is the given value (the stand-in's objectness)."""
    images = []
    for (height, width), red in shapes_and_reds:
        image = np.full((height, width, 3), 10, np.uint8)
        image[..., 0] = red
        images.append(image)
    return images


def test_yoloface_input_size():
    assert YoloFaceDetector.input_size(512, 512) == (416, 416)
    assert YoloFaceDetector.input_size(1080, 1920) == (416, 768)
    assert YoloFaceDetector.input_size(300, 200) == (640, 416)


def test_yoloface_pre_and_post_processing(yolo_dir):
    detector = load_face_detector(yolo_dir)
    assert isinstance(detector, YoloFaceDetector)
    image = np.empty((300, 200, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 204, 10, 30  # red mean 0.8; blue (BGR mix-up) would be < 0.5
    faces = detector.detect(image)
    assert len(faces) == 2
    sx, sy = 200 / 416, 300 / 640  # network input is 640 x 416
    a, c = faces  # largest first
    np.testing.assert_allclose(a.box, [150 * sx, 240 * sy, 250 * sx, 360 * sy], rtol=1e-6)
    assert a.score == pytest.approx(0.9)
    np.testing.assert_allclose(a.landmarks, np.array([[170, 280], [230, 280], [200, 310], [180, 340], [220, 340]])
                               * [sx, sy], rtol=1e-6)
    np.testing.assert_allclose(c.box, [60 * sx, 60 * sy, 100 * sx, 100 * sy], rtol=1e-6)
    assert c.score == pytest.approx(204 / 255, rel=1e-6)
    assert c.landmarks[0] == pytest.approx([70 * sx, 75 * sy])


def test_yoloface_detect_batch_matches_detect(yolo_dir):
    detector = YoloFaceDetector(yolo_dir / "yoloface_v5m.pt")
    # (300, 200) and (600, 400) share the network input 640 x 416 and run as one batch; (200, 300) runs alone.
    # Red 100 puts row C under the threshold (a face fewer), so each image must get its own rows.
    images = colour_images(((300, 200), 204), ((600, 400), 100), ((200, 300), 230), ((300, 200), 150))
    batched = detector.detect_batch(images)
    assert_same_faces(batched, [detector.detect(image) for image in images])
    assert [len(faces) for faces in batched] == [2, 1, 2, 2]
    assert detector.takes_batches


@pytest.mark.parametrize("model", [MergesBatch, FailsOnBatch])
def test_yoloface_without_batches_runs_one_image_at_a_time(tmp_path, model, caplog):
    detector = YoloFaceDetector(save_scripted(model(), tmp_path / "yoloface_v5m.pt"))
    images = colour_images(((300, 200), 204), ((300, 200), 100), ((300, 200), 230))
    with caplog.at_level(logging.WARNING):
        batched = detector.detect_batch(images)
    assert not detector.takes_batches and "does not take batches" in caplog.text
    assert [len(faces) for faces in batched] == [2, 1, 2]
    assert_same_faces(batched, [detector.detect(image) for image in images])


def test_yoloface_rejects_unexpected_output(yolo_dir):
    detector = YoloFaceDetector(yolo_dir / "yoloface_v5m.pt")
    with pytest.raises(WeightsError):
        detector.decode(torch.zeros(1, 10, 17), (100, 100), (416, 416))
    with pytest.raises(InputError):
        detector.detect(np.zeros((10, 10), np.uint8))


def test_load_face_detector_falls_back_to_mtcnn(tmp_path):
    assert isinstance(load_face_detector(None), MTCNNDetector)
    assert isinstance(load_face_detector(tmp_path), MTCNNDetector)


# ---------------------------------------------------------------------------------------------------------
# MTCNN


def test_mtcnn_weights_load_into_our_networks():
    arrays = load_keras_weight_list(mtcnn_weights_dir() / "onet.lz4")
    assert [a.shape for a in arrays[:3]] == [(3, 3, 3, 32), (32,), (1, 1, 32)]
    detector = MTCNNDetector()
    # conv kernels HWIO -> OIHW, dense (in, out) -> (out, in)
    np.testing.assert_array_equal(detector.onet.conv1.weight.numpy(), arrays[0].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(detector.onet.fc5.weight.numpy(), arrays[12].T)
    np.testing.assert_array_equal(detector.onet.prelu1.weight.numpy(), arrays[2].reshape(-1))
    # fixed-size nets end in the expected flatten widths (RNet 3*3*64, ONet 3*3*128)
    offsets, prob = detector.rnet(torch.zeros(2, 3, 24, 24))
    assert offsets.shape == (2, 4) and prob.shape == (2,)
    offsets, landmarks, prob = detector.onet(torch.zeros(1, 3, 48, 48))
    assert landmarks.shape == (1, 10)


def test_weight_unpickler_refuses_anything_but_arrays(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    path = tmp_path / "evil.lz4"
    path.write_bytes(lz4.frame.compress(pickle.dumps([np.zeros(3, np.float32), RunsCode()])))
    with pytest.raises(WeightsError, match="posix.getcwd|os.getcwd"):
        load_keras_weight_list(path)
    # plain numpy pickles (not joblib's wrapper) are arrays too and load
    path.write_bytes(lz4.frame.compress(pickle.dumps([np.arange(4, dtype=np.float32)])))
    assert load_keras_weight_list(path)[0].tolist() == [0, 1, 2, 3]


def test_crop_and_resize_cuts_each_box_from_its_image():
    images = torch.stack([torch.full((20, 30, 3), 1.0), torch.full((20, 30, 3), 2.0)])
    images[1, :, 15:] = 3.0  # right half of image 1
    boxes = torch.tensor([[0.0, 0.0, 29.0, 19.0], [-10.0, 0.0, 19.0, 19.0]], dtype=torch.float64)
    patches = crop_and_resize(images, boxes, torch.tensor([1, 0]), 4)
    assert patches.shape == (2, 3, 4, 4) and patches.dtype == torch.float32
    # box 0 on image 1: sample columns x = 0, 9.33, 18.67, 28 -> 2, 2, 3, 3
    np.testing.assert_array_equal(patches[0, :, 0].numpy(), np.tile([2.0, 2.0, 3.0, 3.0], (3, 1)))
    # box 1 on image 0: columns x = -9.67, -0.33 lie outside and read 0
    np.testing.assert_array_equal(patches[1, :, 0].numpy(), np.tile([0.0, 0.0, 1.0, 1.0], (3, 1)))


def test_mtcnn_nets_convolve_in_full_fp32(mtcnn):
    allowed = []
    hook = mtcnn.pnet.register_forward_pre_hook(lambda net, args: allowed.append(torch.backends.cudnn.allow_tf32))
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        mtcnn.detect(np.full((64, 64, 3), 128, np.uint8))
        assert allowed and not any(allowed)
        assert torch.backends.cudnn.allow_tf32  # restored
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32 = saved


def test_mtcnn_finds_no_face_in_a_plain_image(mtcnn):
    assert mtcnn.detect(np.full((240, 320, 3), 128, np.uint8)) == []
    assert mtcnn.detect(np.full((8, 8, 3), 128, np.uint8)) == []  # smaller than one 12 px cell


def test_mtcnn_on_the_source_image(mtcnn):
    from PIL import Image

    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    faces = mtcnn.detect(image)
    assert len(faces) == 1 and faces[0].score > 0.95
    assert_plausible_face(faces[0], image.shape)


def test_mtcnn_on_driving_frames(mtcnn):
    frames = driving_frames({0, 17, 35})
    assert len(frames) == 3
    for frame in frames:
        faces = mtcnn.detect(frame)
        assert len(faces) == 1
        assert_plausible_face(faces[0], frame.shape)


# Batched MTCNN: one call per net for all frames; the batched convolutions may round differently from
# one-image calls, which moves boxes and landmarks by ~1e-3 px at most on the sample video
BATCH_ATOL = 5e-3


def test_mtcnn_detect_batch_matches_detect_on_driving_frames(mtcnn):
    frames = driving_frames({0, 7, 14, 21, 28, 35})
    frames.insert(2, np.full_like(frames[0], 128))  # no face, between frames with faces
    batched = mtcnn.detect_batch(frames)
    assert [len(faces) for faces in batched] == [1, 1, 0, 1, 1, 1, 1]
    assert_same_faces(batched, [mtcnn.detect(frame) for frame in frames], atol=BATCH_ATOL)


def test_mtcnn_detect_batch_groups_sizes(mtcnn):
    rng = np.random.default_rng(0)
    images = [np.full((240, 320, 3), 128, np.uint8), rng.integers(0, 256, (240, 320, 3), np.uint8),
              np.full((8, 8, 3), 128, np.uint8), rng.integers(0, 256, (400, 400, 3), np.uint8)]
    # faces at two sizes, two of them in one batch
    frame = driving_frames({0})[0]
    images += [frame, np.ascontiguousarray(frame[16:240, 16:240]), frame[:, ::-1].copy()]
    images = [images[i] for i in rng.permutation(len(images))]  # sizes interleaved
    batched = mtcnn.detect_batch(images)
    assert_same_faces(batched, [mtcnn.detect(image) for image in images], atol=BATCH_ATOL)
    assert sum(map(len, batched)) == 3
    assert mtcnn.detect_batch([]) == []


def test_mtcnn_splits_large_batches_over_calls(mtcnn, monkeypatch):
    frames = driving_frames({0, 1, 2})
    monkeypatch.setattr(mtcnn, "max_pixels_per_call", 2**30)
    whole = mtcnn.detect_batch(frames)
    monkeypatch.setattr(mtcnn, "max_pixels_per_call", 7 * 24 * 24)  # 1 image, 7 R-Net and 1 O-Net crop a call
    assert_same_faces(mtcnn.detect_batch(frames), whole, atol=BATCH_ATOL)


# ---------------------------------------------------------------------------------------------------------
# ArcFace with a tiny hand-encoded ONNX model (the `onnx` package is not a dependency)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: ints as varints, str/bytes length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _value_info(name: str, shape) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)  # TensorShapeProto.dim{dim_value}
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, dims)))  # float tensor type


def _initializer(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_field(1, d) for d in array.shape)
    return dims + _field(2, 1) + _field(8, name) + _field(9, array.astype("<f4").tobytes())


def _node(op: str, inputs, outputs) -> bytes:
    return b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in outputs) + _field(4, op)


def write_tiny_arcface(path: Path, w1: np.ndarray, w2: np.ndarray, input_name: str = "data") -> None:
    """data (1,3,112,112) -> Flatten -> @ w1 -> @ w2 -> embedding (1, 512)."""
    graph = (_field(1, _node("Flatten", [input_name], ["flat"]))
             + _field(1, _node("MatMul", ["flat", "w1"], ["hidden"]))
             + _field(1, _node("MatMul", ["hidden", "w2"], ["embedding"]))
             + _field(2, "tiny_arcface")
             + _field(5, _initializer("w1", w1)) + _field(5, _initializer("w2", w2))
             + _field(11, _value_info(input_name, (1, 3, 112, 112)))
             + _field(12, _value_info("embedding", (1, 512))))
    path.write_bytes(_field(1, 8) + _field(7, graph) + _field(8, _field(2, 13)))  # IR 8, opset 13


def test_arcface_embeds_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((3 * 112 * 112, 4)).astype(np.float32) * 0.01
    w2 = rng.standard_normal((4, 512)).astype(np.float32)
    write_tiny_arcface(tmp_path / "arcface.onnx", w1, w2)
    arcface = load_arcface(tmp_path, providers=["CPUExecutionProvider"])
    assert isinstance(arcface, ArcFace)
    face = rng.random((3, 112, 112)).astype(np.float32)
    embedding = arcface.embed(face)
    expected = face.reshape(1, -1).astype(np.float64) @ w1 @ w2
    expected /= np.linalg.norm(expected)
    assert embedding.shape == (1, 512) and embedding.dtype == np.float32
    np.testing.assert_allclose(embedding, expected, atol=1e-5)
    assert np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError):
        arcface.embed(face.transpose(1, 2, 0))


def test_arcface_checks_the_model_and_is_optional(tmp_path, caplog):
    write_tiny_arcface(tmp_path / "arcface.onnx", np.zeros((3 * 112 * 112, 4), np.float32),
                       np.zeros((4, 512), np.float32), input_name="input")
    with pytest.raises(WeightsError, match="data"):
        ArcFace(tmp_path / "arcface.onnx", providers=["CPUExecutionProvider"])
    (tmp_path / "arcface.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError):
        ArcFace(tmp_path / "arcface.onnx", providers=["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING):
        assert load_arcface(tmp_path / "missing") is None
        assert load_arcface(None) is None
    assert "zeros" in caplog.text
    assert not zero_identity_embedding().any() and zero_identity_embedding().shape == (1, 512)


def test_hand_encoded_onnx_is_well_formed(tmp_path):
    # guards the encoder above: onnxruntime must read the declared IO back
    write_tiny_arcface(tmp_path / "m.onnx", np.zeros((3 * 112 * 112, 4), np.float32), np.zeros((4, 512), np.float32))
    import onnxruntime as ort

    session = ort.InferenceSession(io.BytesIO((tmp_path / "m.onnx").read_bytes()).getvalue(),
                                   providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("data", [1, 3, 112, 112])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("embedding", [1, 512])]
