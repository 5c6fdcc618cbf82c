"""Make the bundled demo inputs from a public-domain portrait.

The portrait is NASA's photo of astronaut Eileen Collins (public domain), as shipped in scikit-image's
data folder (skimage/data/astronaut.png). The driving video moves that face with a smooth synthetic
head motion (turn, nod, sway, zoom) and carries a short tone as its audio track, so the demo has a face
in every frame and an audio stream to keep. Usage:

    python tools/make_sample.py path/to/astronaut.png hyportrait/assets
"""
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

FPS, SECONDS, SIZE = 24, 1.5, 256
SAMPLE_RATE = 24000


def driving_frames(portrait: np.ndarray):
    h, w = portrait.shape[:2]
    center = (w * 0.5, h * 0.32)  # about the middle of the face
    for i in range(int(FPS * SECONDS)):
        t = i / FPS
        angle = 6 * np.sin(2 * np.pi * 0.7 * t)
        scale = 1.0 + 0.05 * np.sin(2 * np.pi * 0.4 * t)
        m = cv2.getRotationMatrix2D(center, angle, scale)
        m[:, 2] += (12 * np.sin(2 * np.pi * 0.5 * t), 6 * np.sin(2 * np.pi * 0.9 * t))
        moved = cv2.warpAffine(portrait, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        x0, y0 = int(center[0] - 160), int(center[1] - 150)
        yield cv2.resize(moved[y0:y0 + 320, x0:x0 + 320], (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def main(src: Path, out: Path) -> None:
    portrait = np.asarray(Image.open(src).convert("RGB"))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(portrait).save(out / "sample_portrait.jpg", quality=88)
    with av.open(str(out / "sample_driving.mp4"), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "23"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        for frame in driving_frames(portrait):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        t = np.arange(int(SAMPLE_RATE * SECONDS)) / SAMPLE_RATE
        tone = (0.2 * np.sin(2 * np.pi * 440 * t) * np.minimum(1, 10 * (SECONDS - t))).astype(np.float32)
        for start in range(0, len(tone), 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
            chunk.sample_rate = SAMPLE_RATE
            chunk.pts = start
            chunk.time_base = Fraction(1, SAMPLE_RATE)
            container.mux(audio.encode(chunk))
        container.mux(video.encode())
        container.mux(audio.encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
