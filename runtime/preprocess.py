"""Network inputs from the source image and the driving frames, as the official `src/dataset/test_preprocess.py`.

Pure functions over decoded HxWx3 uint8 RGB arrays (the caller decodes files). The resampling matches the
official code operation for operation: PIL bicubic for the 512 crops (`Image.resize` default), PIL bilinear
for the 256 motion inputs (torchvision `Resize` on a PIL image), torch antialiased bilinear for the 224 DINO
input (torchvision `RandomResizedCrop` on a tensor, which with scale = ratio = 1 takes the whole image), and
skimage-style bilinear warping for the ArcFace alignment (reimplemented here in numpy).

Driving frames are processed as a stream, in chunks of 25 frames (the official inference chunk); each chunk's
faces are detected in one batch and its motion inputs are cut on a few threads (PIL and numpy release the GIL).
The official `area` setting (1.05) only sizes a white box in a pose image that the official code never returns,
so it has no effect on any output and has no counterpart here.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyportrait.errors import InputError, NoFaceError, VideoError
from hyportrait.networks.contract import ARCFACE_SIZE, CROP_SIZE, DINO_SIZE, MOTION_SIZE, WINDOW
from hyportrait.networks.face_detector import HOST_THREADS, Face, FaceDetector, check_rgb_image, sort_by_area

CROP_EXPAND = 1.0  # the face box grows by 100 % of its size on each side before squaring
EXPRESSION_EXPAND = 0.45  # the landmark extent grows 45 % of the way toward the frame-0 face box

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Standard 5-point ArcFace template for 112x112 (left eye, right eye, nose, left/right mouth corner), moved
# 8 px right as in the official `align_face`. float32 like the official array: the estimate sees the same values.
ARCFACE_TEMPLATE = np.array([
    [30.2946, 51.6963],
    [65.5318, 51.5014],
    [48.0252, 71.7366],
    [33.5493, 92.3655],
    [62.7299, 92.2041],
], dtype=np.float32)
ARCFACE_TEMPLATE[:, 0] += 8.0


# ---------------------------------------------------------------------------------------------------------
# Geometry


def square_crop_box(face_box, height: int, width: int, expand: float = CROP_EXPAND) -> tuple[int, int, int, int]:
    """Official `process_bbox`: grow the face box by `expand` x its size on each side, clamp to the image,
    then take a square of the clamped box's shorter side, centred in it and shifted toward the face centre
    by at most the slack. Returns integer (x1, y1, x2, y2), rounded half to even like Python's `round`."""
    x1, y1, x2, y2 = (float(v) for v in face_box[:4])
    bw, bh = x2 - x1, y2 - y1
    ex1, ey1 = max(x1 - expand * bw, 0), max(y1 - expand * bh, 0)
    ex2, ey2 = min(x2 + expand * bw, width), min(y2 + expand * bh, height)
    h, w = ey2 - ey1, ex2 - ex1
    cy, cx = (ey1 + ey2) / 2, (ex1 + ex2) / 2
    face_cy, face_cx = (y1 + y2) / 2, (x1 + x2) / 2
    slack = abs((h - w) / 2)
    if w < h:
        shift = min(slack, abs(face_cy - cy))
        cy += shift if face_cy > cy else -shift
    else:
        shift = min(slack, abs(face_cx - cx))
        cx += shift if face_cx > cx else -shift
    half = min(h, w) / 2
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int = CROP_SIZE) -> np.ndarray:
    """Official `crop_resize_img`: PIL crop (outside the image reads black) resized with PIL bicubic."""
    return np.asarray(Image.fromarray(image).crop(tuple(box)).resize((size, size), Image.Resampling.BICUBIC))


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking points `src` onto `dst`
    (Umeyama 1991, as skimage's SimilarityTransform). Returns the 3x3 homogeneous matrix."""
    src, dst = np.asarray(src), np.asarray(dst)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    src_variance = src_centred.var(axis=0).sum()
    if not src_variance > 0:
        raise InputError("cannot align a face: its landmarks all coincide")
    covariance = dst_centred.T @ src_centred / n
    u, s, vt = np.linalg.svd(covariance)
    # a reflection is never wanted: flip the weakest axis when the best orthogonal fit would mirror
    d = np.ones(dim)
    rank_deficient = np.linalg.matrix_rank(covariance) < dim
    if np.linalg.det(covariance) < 0 or (rank_deficient and np.linalg.det(u) * np.linalg.det(vt) < 0):
        d[-1] = -1
    matrix = np.eye(dim + 1)
    matrix[:dim, :dim] = u @ np.diag(d) @ vt
    scale = 1.0 / src_variance * (s @ d)
    matrix[:dim, dim] = dst_mean - scale * (matrix[:dim, :dim] @ src_mean.T)
    matrix[:dim, :dim] *= scale
    return matrix


def warp_bilinear(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """skimage `warp(image, inverse_map=inv(matrix), order=1, mode="constant", cval=0)`: output pixel (x, y)
    samples the input at inv(matrix) @ (x, y, 1); integer coordinates are pixel centres; neighbours outside
    the image read 0; the result is clipped to the input range. `image` is HxWxC float."""
    inverse = np.linalg.inv(matrix)
    rows, cols = image.shape[:2]
    ys, xs = np.mgrid[0:size[0], 0:size[1]].astype(np.float64)
    c = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    r = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    r0, c0 = np.floor(r), np.floor(c)
    dr, dc = (r - r0)[..., None], (c - c0)[..., None]
    r1, c1 = np.ceil(r), np.ceil(c)

    def pixel(rr, cc):
        inside = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        values = image[np.clip(rr, 0, rows - 1).astype(np.int64), np.clip(cc, 0, cols - 1).astype(np.int64)]
        return np.where(inside[..., None], values, 0.0)

    top = (1 - dc) * pixel(r0, c0) + dc * pixel(r0, c1)
    bottom = (1 - dc) * pixel(r1, c0) + dc * pixel(r1, c1)
    out = (1 - dr) * top + dr * bottom
    return np.clip(out, min(image.min(), 0.0), max(image.max(), 0.0))


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Official `align_face`: similarity-align 5 landmarks onto the ArcFace template -> (3, 112, 112) float32
    RGB in [0, 1] (the ArcFace input)."""
    as_float = np.multiply(image, 1.0 / 255, dtype=np.float64)  # skimage img_as_float
    matrix = estimate_similarity(np.asarray(landmarks, dtype=np.float64), ARCFACE_TEMPLATE)
    aligned = warp_bilinear(as_float, matrix, (ARCFACE_SIZE, ARCFACE_SIZE))
    return np.ascontiguousarray(aligned.transpose(2, 0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Network inputs from crops


def _to_unit_chw(image: np.ndarray) -> np.ndarray:
    """torchvision ToTensor: uint8 HWC -> float32 CHW in [0, 1]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


def dino_input(crop: np.ndarray) -> np.ndarray:
    """The 512 crop -> (3, 224, 224) float32: antialiased bilinear resize, ImageNet mean/std."""
    x = torch.from_numpy(_to_unit_chw(crop))[None]
    x = F.interpolate(x, size=(DINO_SIZE, DINO_SIZE), mode="bilinear", align_corners=False, antialias=True)[0]
    x = (x - torch.from_numpy(IMAGENET_MEAN)[:, None, None]) / torch.from_numpy(IMAGENET_STD)[:, None, None]
    return x.numpy()


def vae_input(crop: np.ndarray) -> np.ndarray:
    """The 512 crop -> (3, 512, 512) float32 in [-1, 1] (reference image for the VAE)."""
    return (_to_unit_chw(crop) - np.float32(0.5)) / np.float32(0.5)


def _resize_to_motion_input(square: np.ndarray) -> np.ndarray:
    """torchvision Resize(256) of a square PIL image (PIL bilinear) + ToTensor -> (3, 256, 256) in [0, 1]."""
    resized = Image.fromarray(square).resize((MOTION_SIZE, MOTION_SIZE), Image.Resampling.BILINEAR)
    return _to_unit_chw(np.asarray(resized))


def square_crop_padded(image: np.ndarray, box) -> np.ndarray:
    """Official `center_crop`: a square of side 2 * (int(longer side) // 2) on the box centre (coordinates
    truncated toward zero), parts outside the image padded black."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box[:4]
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    half = int(max(x1 - x0, y1 - y0)) // 2
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    pad_left, pad_top = max(-left, 0), max(-top, 0)
    pad_right, pad_bottom = max(right - width, 0), max(bottom - height, 0)
    inner = image[max(top, 0):min(bottom, height), max(left, 0):min(right, width)]
    return np.pad(inner, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))


def expression_input(frame: np.ndarray, landmarks: np.ndarray, face_box, expand: float = EXPRESSION_EXPAND) -> np.ndarray:
    """Official `crop_face_motion`: the landmarks' extent grown `expand` of the way toward the (frame-0) face
    box on each side, squared with black padding -> (3, 256, 256) float32 in [0, 1] (HeadExpression input)."""
    landmarks = np.asarray(landmarks)
    lx0, lx1 = landmarks[:, 0].min(), landmarks[:, 0].max()
    ly0, ly1 = landmarks[:, 1].min(), landmarks[:, 1].max()
    bx0, by0, bx1, by1 = face_box[:4]
    box = (lx0 - (lx0 - bx0) * expand, ly0 - (ly0 - by0) * expand,
           lx1 + (bx1 - lx1) * expand, ly1 + (by1 - ly1) * expand)
    return _resize_to_motion_input(square_crop_padded(frame, box))


def pose_input(frame: np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """The 512 driving crop resized to (3, 256, 256) float32 in [0, 1]. HeadPose is fed `x * 2 + 1` of this
    (as the official inference does)."""
    return _resize_to_motion_input(crop_resize(frame, crop_box, CROP_SIZE))


def motion_bucket_ids(landmarks, nose_index: int = 2, max_value: int = 127) -> tuple[int, int]:
    """Official `get_head_exp_motion_bucketid` for one chunk of (n, 5, 2) landmarks -> (head_id, exp_id):
    mean distance of the nose from its mean position (head) and of the nose-relative landmarks from their
    mean (expression), over the first frame's nose-relative landmark extent, x256 / x1024, clamped to
    [0, max_value]."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    relative = landmarks - landmarks[:, nose_index:nose_index + 1]
    first = relative[0]
    scale = np.sqrt(((first.max(axis=0) - first.min(axis=0)) ** 2).sum())
    exp_var = np.sqrt(((relative - relative.mean(axis=0)) ** 2).sum(axis=2)).mean()
    exp_id = min(max(int(exp_var / scale * 1024), 0), max_value)
    nose = landmarks[:, nose_index]
    head_var = np.sqrt(((nose - nose.mean(axis=0)) ** 2).sum(axis=1)).mean()
    head_id = min(max(int(head_var / scale * 256), 0), max_value)
    return head_id, exp_id


# ---------------------------------------------------------------------------------------------------------
# Source image


@dataclass(frozen=True)
class SourceInputs:
    original_image: np.ndarray  # the source as given (H, W, 3) uint8: the paste-back background
    crop_box: tuple[int, int, int, int]  # x1, y1, x2, y2 of the crop in source pixels (paste-back target)
    crop: np.ndarray  # (512, 512, 3) uint8
    landmarks: np.ndarray  # (5, 2) on the crop, ArcFace order
    ref_image: np.ndarray  # (3, 512, 512) float32 in [-1, 1]: VAE input
    dino_image: np.ndarray  # (3, 224, 224) float32 ImageNet-normalised: DINOv2 input
    arcface_image: np.ndarray  # (3, 112, 112) float32 RGB in [0, 1]: ArcFace input


def preprocess_source(image: np.ndarray, detector: FaceDetector) -> SourceInputs:
    """Largest face -> square crop (3x the face box, clamped) at 512 -> landmarks re-detected on the crop ->
    ArcFace alignment, DINO and VAE inputs."""
    check_rgb_image(image)
    faces = detector.detect(image)
    if not faces:
        raise NoFaceError("no face found in the source image")
    crop_box = square_crop_box(sort_by_area(faces)[0].box, image.shape[0], image.shape[1])
    crop = crop_resize(image, crop_box, CROP_SIZE)
    crop_faces = detector.detect(crop)
    if not crop_faces:
        raise NoFaceError(f"a face was found in the source image but not again in its {CROP_SIZE}x{CROP_SIZE} "
                          f"crop {crop_box}")
    landmarks = sort_by_area(crop_faces)[0].landmarks
    return SourceInputs(
        original_image=image,
        crop_box=crop_box,
        crop=crop,
        landmarks=landmarks,
        ref_image=vae_input(crop),
        dino_image=dino_input(crop),
        arcface_image=align_face(crop, landmarks),
    )


# ---------------------------------------------------------------------------------------------------------
# Driving frames


@dataclass(frozen=True)
class DrivingFrame:
    expression_image: np.ndarray  # (3, 256, 256) float32 in [0, 1]
    pose_image: np.ndarray  # (3, 256, 256) float32 in [0, 1]
    landmarks: np.ndarray  # (5, 2) in frame pixels
    face_found: bool  # False: no face in this frame, the previous frame's landmarks were reused


@dataclass(frozen=True)
class DrivingChunk:
    start: int  # index of the chunk's first frame in the video
    expression_images: np.ndarray  # (n, 3, 256, 256) float32
    pose_images: np.ndarray  # (n, 3, 256, 256) float32
    landmarks: np.ndarray  # (n, 5, 2)
    head_bucket: int
    exp_bucket: int
    missing_face_frames: tuple[int, ...]  # video frame indices in this chunk that reused earlier landmarks


class DrivingPreprocessor:
    """The official per-frame driving loop, with the face detection batched over the frames of a chunk. Frame 0
    fixes the face box (which anchors every expression crop) and the square crop box (the head-pose crop of
    every frame). A later frame without a face reuses the last landmarks and is recorded in
    `missing_face_frames`; frame 0 must show a face."""

    def __init__(self, detector: FaceDetector):
        self.detector = detector
        self.face_box: np.ndarray | None = None
        self.crop_box: tuple[int, int, int, int] | None = None
        self.frame_shape: tuple[int, ...] | None = None
        self.frames_done = 0
        self.missing_face_frames: list[int] = []
        self._landmarks: np.ndarray | None = None

    def process(self, frame: np.ndarray) -> DrivingFrame:
        """The video's next frame."""
        return self.process_batch([frame])[0]

    def process_batch(self, frames: Sequence[np.ndarray]) -> list[DrivingFrame]:
        """The video's next frames, their faces detected in one batch."""
        self._check_frames(frames)
        landmarks, face_found = [], []
        for frame, faces in zip(frames, self.detector.detect_batch(frames)):
            self._track(frame.shape, sort_by_area(faces))
            landmarks.append(self._landmarks)
            face_found.append(bool(faces))
        with ThreadPoolExecutor(min(HOST_THREADS, max(len(frames), 1))) as pool:
            return list(pool.map(self._driving_frame, frames, landmarks, face_found))

    def _check_frames(self, frames: Sequence[np.ndarray]) -> None:
        first_shape = self.frame_shape
        for offset, frame in enumerate(frames):
            check_rgb_image(frame)
            first_shape = first_shape or frame.shape  # while no frame is done, the batch's first is frame 0
            if frame.shape != first_shape:
                index = self.frames_done + offset
                raise VideoError(f"driving frame {index} is {frame.shape[1]}x{frame.shape[0]}, frame 0 was "
                                 f"{first_shape[1]}x{first_shape[0]}")

    def _track(self, frame_shape: tuple[int, ...], faces: list[Face]) -> None:
        """Advance by one frame with these faces (largest first): new landmarks, or the last ones kept."""
        index = self.frames_done
        if faces:
            self._landmarks = faces[0].landmarks
        elif index == 0:
            raise NoFaceError("no face found in driving frame 0 (the first frame fixes the crop, so it must show "
                              "a face)")
        else:
            self.missing_face_frames.append(index)
        if index == 0:
            self.frame_shape = frame_shape
            self.face_box = faces[0].box
            self.crop_box = square_crop_box(self.face_box, frame_shape[0], frame_shape[1])
        self.frames_done += 1

    def _driving_frame(self, frame: np.ndarray, landmarks: np.ndarray, face_found: bool) -> DrivingFrame:
        return DrivingFrame(
            expression_image=expression_input(frame, landmarks, self.face_box),
            pose_image=pose_input(frame, self.crop_box),
            landmarks=landmarks,
            face_found=face_found,
        )

    def chunks(self, frames: Iterable[np.ndarray], chunk_frames: int = WINDOW,
               first: int | None = None) -> Iterator[DrivingChunk]:
        """Process a frame stream into chunks of `chunk_frames` (the last may be shorter), the first of `first`
        frames when given. Frames are pulled lazily, one chunk at a time, and each chunk holds only its own
        frames' arrays."""
        stream = iter(frames)
        size = first or chunk_frames
        while batch := list(itertools.islice(stream, size)):
            size = chunk_frames
            start = self.frames_done
            yield self._chunk(start, self.process_batch(batch))
        if self.frames_done == 0:
            raise VideoError("the driving video has no frames")

    @staticmethod
    def _chunk(start: int, frames: list[DrivingFrame]) -> DrivingChunk:
        landmarks = np.stack([f.landmarks for f in frames])
        head_bucket, exp_bucket = motion_bucket_ids(landmarks)
        return DrivingChunk(
            start=start,
            expression_images=np.stack([f.expression_image for f in frames]),
            pose_images=np.stack([f.pose_image for f in frames]),
            landmarks=landmarks,
            head_bucket=head_bucket,
            exp_bucket=exp_bucket,
            missing_face_frames=tuple(start + i for i, f in enumerate(frames) if not f.face_found),
        )
