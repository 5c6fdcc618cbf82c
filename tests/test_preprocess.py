"""Preprocessing: crop geometry, alignment, motion inputs, bucket ids, missing faces, and the real data."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hyportrait.errors import NoFaceError, VideoError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.face_detector import Face, FaceDetector, MTCNNDetector
from hyportrait.runtime.preprocess import (
    ARCFACE_TEMPLATE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DrivingPreprocessor,
    align_face,
    crop_resize,
    dino_input,
    estimate_similarity,
    expression_input,
    motion_bucket_ids,
    pose_input,
    preprocess_source,
    square_crop_box,
    square_crop_padded,
    vae_input,
    warp_bilinear,
)


class ScriptedDetector(FaceDetector):
    """Returns the given face lists image after image (the last one repeats); records the batch sizes."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0
        self.batches = []

    def detect(self, image):
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return list(answer)

    def detect_batch(self, images):
        self.batches.append(len(images))
        return super().detect_batch(images)


class OneFrameAtATime(FaceDetector):
    """A detector's per-image `detect` behind the base class's looping `detect_batch` (the batches' reference)."""

    def __init__(self, detector):
        self.detector = detector

    def detect(self, image):
        return self.detector.detect(image)


def make_face(box, landmarks=None, score=0.99):
    box = np.asarray(box, dtype=np.float64)
    if landmarks is None:  # a plausible layout inside the box
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        rel = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])
        landmarks = rel * [w, h] + [x1, y1]
    return Face(box, score, np.asarray(landmarks, dtype=np.float64))


@pytest.fixture(scope="module")
def mtcnn():
    torch.set_num_threads(1)
    return MTCNNDetector()


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Motion bucket ids


BASE_LANDMARKS = np.array([[20, 20], [80, 20], [50, 50], [30, 100], [70, 100]], dtype=np.float64)  # scale 100


def test_bucket_ids_closed_form():
    # nose-relative extent 60 x 80 -> scale 100
    shift = np.array([20.0, 0.0])
    assert motion_bucket_ids([BASE_LANDMARKS, BASE_LANDMARKS + shift]) == (int(10 / 100 * 256), 0)  # (25, 0)
    three = np.stack([BASE_LANDMARKS + [dx, 0] for dx in (0, 30, 60)])  # nose distances 30, 0, 30 -> mean 20
    assert motion_bucket_ids(three) == (51, 0)
    moved = BASE_LANDMARKS.copy()
    moved[3, 1] += 10  # one mouth corner: deviation 5 in both frames, mean over 2 x 5 landmarks = 1
    assert motion_bucket_ids(np.stack([BASE_LANDMARKS, moved])) == (0, int(1 / 100 * 1024))  # (0, 10)
    assert motion_bucket_ids(np.stack([BASE_LANDMARKS, BASE_LANDMARKS + 1000])) == (127, 0)
    assert motion_bucket_ids(BASE_LANDMARKS[None]) == (0, 0)
    # scale comes from the first frame only
    assert motion_bucket_ids([BASE_LANDMARKS * 2, BASE_LANDMARKS * 2 + shift]) == (int(10 / 200 * 256), 0)


# ---------------------------------------------------------------------------------------------------------
# Alignment


def similarity(scale, degrees, tx, ty):
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty], [0, 0, 1]])


def apply(matrix, points):
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def test_similarity_estimate():
    template = ARCFACE_TEMPLATE.astype(np.float64)
    np.testing.assert_allclose(estimate_similarity(template, template), np.eye(3), atol=1e-12)
    known = similarity(1.7, 20.0, 5.0, -3.0)
    src = np.random.default_rng(1).random((5, 2)) * 100
    np.testing.assert_allclose(estimate_similarity(src, apply(known, src)), known, atol=1e-10)
    # a mirrored target is fitted with a proper rotation, never a reflection
    mirrored = estimate_similarity(src, src * [-1, 1])
    assert np.linalg.det(mirrored[:2, :2]) > 0


def test_warp_bilinear_shifts():
    image = np.random.default_rng(2).random((10, 12, 3))
    shifted = warp_bilinear(image, similarity(1.0, 0.0, 3.0, 2.0), (10, 12))  # output(x, y) = input(x-3, y-2)
    np.testing.assert_array_equal(shifted[2:, 3:], image[:-2, :-3])
    assert not shifted[:2].any() and not shifted[:, :3].any()
    half = warp_bilinear(image, similarity(1.0, 0.0, -0.5, 0.0), (10, 12))
    np.testing.assert_allclose(half[:, :11], (image[:, :11] + image[:, 1:]) / 2, atol=1e-12)
    np.testing.assert_allclose(half[:, 11], image[:, 11] / 2, atol=1e-12)  # right neighbour is outside: 0


def test_align_face_identity_and_known_transform():
    image = random_image(112, 112, seed=3)
    aligned = align_face(image, ARCFACE_TEMPLATE)
    assert aligned.shape == (3, 112, 112) and aligned.dtype == np.float32
    # identity up to the float32 template's precision in the estimate
    np.testing.assert_allclose(aligned, image.transpose(2, 0, 1) / 255, atol=1e-5)
    # a (smooth) face placed by a known similarity is brought back onto the template
    ys, xs = np.mgrid[0:112, 0:112]
    smooth = (127 + 100 * np.sin(xs / 7)[..., None] * np.cos(ys / 9)[..., None] * [1, 0.5, -1]).astype(np.uint8)
    known = similarity(2.0, 15.0, 80.0, 10.0)
    big = (warp_bilinear(smooth / 255, known, (300, 300)) * 255).round().astype(np.uint8)
    back = align_face(big, apply(known, ARCFACE_TEMPLATE.astype(np.float64)))
    np.testing.assert_allclose(back[:, 2:-2, 2:-2], smooth.transpose(2, 0, 1)[:, 2:-2, 2:-2] / 255, atol=0.02)


# ---------------------------------------------------------------------------------------------------------
# Crop geometry


@pytest.mark.parametrize("face, expected", [
    ((400, 300, 500, 420), (300, 210, 600, 510)),  # room on all sides
    ((10, 300, 110, 420), (0, 255, 210, 465)),  # clamped at the left border
    ((400, 20, 500, 140), (320, 0, 580, 260)),  # clamped at the top
    ((10, 20, 110, 140), (0, 0, 210, 210)),  # tall clamped box: square moves 25 px toward the face
    ((100, 10, 300, 60), (145, 0, 255, 110)),  # wide clamped box: square moves 50 px toward the face
])
def test_square_crop_box_closed_form(face, expected):
    assert square_crop_box(face, 800, 1000) == expected


def test_square_crop_box_is_square_and_inside():
    rng = np.random.default_rng(4)
    for _ in range(300):
        h, w = rng.integers(50, 1500, 2)
        x1, y1 = rng.random() * w * 0.9, rng.random() * h * 0.9
        box = (x1, y1, x1 + rng.random() * (w - x1) + 1, y1 + rng.random() * (h - y1) + 1)
        bx1, by1, bx2, by2 = square_crop_box(box, h, w)
        assert abs((bx2 - bx1) - (by2 - by1)) <= 1
        assert 0 <= bx1 < bx2 <= w and 0 <= by1 < by2 <= h


def test_square_crop_padded_pads_black():
    image = random_image(100, 100, seed=5)
    crop = square_crop_padded(image, (80.0, 80.0, 120.0, 120.0))
    assert crop.shape == (40, 40, 3)
    np.testing.assert_array_equal(crop[:20, :20], image[80:, 80:])
    assert not crop[20:].any() and not crop[:, 20:].any()


def test_expression_input_crop_rule():
    frame = random_image(120, 100, seed=6)
    landmarks = np.array([[40, 40], [60, 40], [50, 55], [42, 70], [58, 70]], dtype=np.float64)
    # extent x 40..60, y 40..70 grown 45 % toward the box (20, 20, 80, 100): x 31..69, y 31..83.5
    # -> centre (50, 57), half side int(52.5) // 2 = 26
    expected = Image.fromarray(frame[31:83, 24:76]).resize((256, 256), Image.Resampling.BILINEAR)
    out = expression_input(frame, landmarks, (20.0, 20.0, 80.0, 100.0))
    assert out.shape == (3, 256, 256) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(expected).transpose(2, 0, 1).astype(np.float32) / 255)


def test_network_inputs_of_a_constant_crop():
    crop = np.full((512, 512, 3), 200, np.uint8)
    np.testing.assert_allclose(dino_input(crop), ((200 / 255 - IMAGENET_MEAN) / IMAGENET_STD)[:, None, None]
                               * np.ones((3, 224, 224)), atol=1e-5)
    assert vae_input(np.zeros((4, 4, 3), np.uint8)).min() == -1 and vae_input(np.full((4, 4, 3), 255, np.uint8)).max() == 1
    pose = pose_input(np.full((300, 400, 3), 51, np.uint8), (50, 0, 350, 300))
    assert pose.shape == (3, 256, 256)
    np.testing.assert_allclose(pose, 51 / 255, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Source and driving flows with stand-in detectors


def test_preprocess_source_outputs():
    image = random_image(400, 600, seed=7)
    face = make_face((250, 150, 330, 250))
    detector = ScriptedDetector([make_face((0, 0, 5, 5)), face], [face])  # the largest face is used
    source = preprocess_source(image, detector)
    assert source.crop_box == square_crop_box(face.box, 400, 600)
    np.testing.assert_array_equal(source.crop, crop_resize(image, source.crop_box))
    assert source.crop.shape == (512, 512, 3) and source.original_image is image
    assert source.ref_image.shape == (3, 512, 512) and -1 <= source.ref_image.min() < source.ref_image.max() <= 1
    assert source.dino_image.shape == (3, 224, 224)
    np.testing.assert_array_equal(source.arcface_image, align_face(source.crop, face.landmarks))
    assert detector.calls == 2


def test_no_face_errors(mtcnn):
    image = random_image(64, 64)
    with pytest.raises(NoFaceError, match="source image") as err:
        preprocess_source(image, ScriptedDetector([]))
    assert err.value.code == "no_face"
    with pytest.raises(NoFaceError, match="crop"):
        preprocess_source(image, ScriptedDetector([make_face((20, 20, 40, 40))], []))
    with pytest.raises(NoFaceError, match="frame 0"):
        DrivingPreprocessor(ScriptedDetector([])).process(image)
    with pytest.raises(NoFaceError, match="source image"):
        preprocess_source(np.full((200, 200, 3), 128, np.uint8), mtcnn)


def test_missing_faces_reuse_landmarks_and_are_counted():
    frames = [random_image(200, 160, seed=10 + i) for i in range(6)]
    faces = [make_face((40 + i, 50, 120 + i, 150)) for i in range(6)]
    detector = ScriptedDetector([faces[0]], [faces[1]], [], [], [faces[4]], [])
    driving = DrivingPreprocessor(detector)
    chunks = list(driving.chunks(frames, chunk_frames=4))
    assert [c.start for c in chunks] == [0, 4] and [len(c.landmarks) for c in chunks] == [4, 2]
    assert chunks[0].missing_face_frames == (2, 3) and chunks[1].missing_face_frames == (5,)
    assert driving.missing_face_frames == [2, 3, 5]
    np.testing.assert_array_equal(chunks[0].landmarks[3], faces[1].landmarks)
    np.testing.assert_array_equal(chunks[1].landmarks[1], faces[4].landmarks)
    # expression crops use each frame's (or the reused) landmarks with frame 0's face box
    np.testing.assert_array_equal(chunks[0].expression_images[2],
                                  expression_input(frames[2], faces[1].landmarks, faces[0].box))
    assert driving.crop_box == square_crop_box(faces[0].box, 200, 160)
    np.testing.assert_array_equal(chunks[1].pose_images[0], pose_input(frames[4], driving.crop_box))
    assert (chunks[0].head_bucket, chunks[0].exp_bucket) == motion_bucket_ids(chunks[0].landmarks)


def test_driving_frames_are_streamed():
    pulled = []

    def frames():
        for i in range(7):
            pulled.append(i)
            yield random_image(64, 64, seed=i)

    detector = ScriptedDetector([make_face((10, 10, 50, 50))])
    chunks = DrivingPreprocessor(detector).chunks(frames(), chunk_frames=3)
    first = next(chunks)
    assert len(pulled) == 3 and first.expression_images.shape == (3, 3, 256, 256)
    assert [len(c.landmarks) for c in chunks] == [3, 1]
    assert detector.batches == [3, 3, 1]  # one detection batch per chunk


def test_driving_video_errors():
    detector = ScriptedDetector([make_face((10, 10, 50, 50))])
    with pytest.raises(VideoError, match="no frames"):
        list(DrivingPreprocessor(detector).chunks([]))
    driving = DrivingPreprocessor(detector)
    driving.process(random_image(64, 64))
    with pytest.raises(VideoError, match="frame 1"):
        driving.process(random_image(64, 80))
    # within a chunk: the size change is found before any detection
    detector = ScriptedDetector([make_face((10, 10, 50, 50))])
    frames = [random_image(64, 64), random_image(64, 64), random_image(80, 64), random_image(64, 64)]
    with pytest.raises(VideoError, match="frame 2 is 64x80, frame 0 was 64x64"):
        list(DrivingPreprocessor(detector).chunks(frames, chunk_frames=4))
    assert detector.calls == 0
    with pytest.raises(NoFaceError, match="frame 0"):
        list(DrivingPreprocessor(ScriptedDetector([], [make_face((10, 10, 50, 50))])).chunks(frames[:2]))


# ---------------------------------------------------------------------------------------------------------
# Real data with the bundled MTCNN detector


def test_real_source_image(mtcnn):
    image = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    source = preprocess_source(image, mtcnn)
    x1, y1, x2, y2 = source.crop_box
    assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0] and x2 - x1 == y2 - y1
    # the aligned face has its landmarks where the ArcFace template puts them
    aligned = (source.arcface_image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    faces = mtcnn.detect(aligned)
    assert len(faces) == 1
    deviation = np.abs(faces[0].landmarks - ARCFACE_TEMPLATE)
    assert deviation[:2].max() < 4 and deviation.max() < 8  # MTCNN's nose estimate is the loosest


def test_real_driving_frames(mtcnn):
    import itertools

    import av

    with av.open(str(SAMPLE_VIDEO)) as container:
        frames = (f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), 6))
        driving = DrivingPreprocessor(mtcnn)
        chunks = list(driving.chunks(frames, chunk_frames=3))
    assert len(chunks) == 2 and driving.missing_face_frames == []
    x1, y1, x2, y2 = driving.crop_box
    assert x2 - x1 == y2 - y1
    for chunk in chunks:
        assert chunk.expression_images.shape == chunk.pose_images.shape == (3, 3, 256, 256)
        assert 0 <= chunk.expression_images.min() and chunk.expression_images.max() <= 1
        assert 0 <= chunk.head_bucket <= 127 and 0 <= chunk.exp_bucket <= 127


def test_batched_driving_chunks_equal_per_frame_detection(mtcnn):
    import itertools

    import av

    with av.open(str(SAMPLE_VIDEO)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), 0, 36, 4)]
    frames[3] = np.full_like(frames[3], 128)  # a frame without a face inside a chunk
    batched_driving, reference_driving = DrivingPreprocessor(mtcnn), DrivingPreprocessor(OneFrameAtATime(mtcnn))
    batched = list(batched_driving.chunks(frames, chunk_frames=4))
    reference = list(reference_driving.chunks(frames, chunk_frames=4))
    assert batched_driving.missing_face_frames == reference_driving.missing_face_frames == [3]
    assert batched_driving.crop_box == reference_driving.crop_box
    assert len(batched) == len(reference) == 3
    for chunk, expected in zip(batched, reference):
        assert chunk.start == expected.start and chunk.missing_face_frames == expected.missing_face_frames
        # batched convolutions round differently: landmarks move by ~1e-3 px, the integer crops stay the same
        np.testing.assert_allclose(chunk.landmarks, expected.landmarks, rtol=0, atol=5e-3)
        np.testing.assert_array_equal(chunk.expression_images, expected.expression_images)
        np.testing.assert_array_equal(chunk.pose_images, expected.pose_images)
        assert (chunk.head_bucket, chunk.exp_bucket) == (expected.head_bucket, expected.exp_bucket)
