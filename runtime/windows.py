"""Window plans for long clips and the motion ramps of the pad frames."""
from __future__ import annotations

from collections.abc import Iterable, Iterator


def window_indices(num_frames: int, window: int = 25, overlap: int = 3, shift: int = 0) -> list[list[int]]:
    """Frame indices of each window of one step.

    Windows start every `window - overlap` frames, moved back by `shift`, and wrap around the clip
    (index modulo num_frames), so a clip shorter than a window repeats frames inside it.
    """
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap={overlap} window={window}")
    stride = window - overlap
    return [[(start - shift + k) % num_frames for k in range(window)] for start in range(0, num_frames, stride)]


def segment_window_indices(num_frames: int, window: int = 25, overlap: int = 3, shift: int = 0) -> list[list[int]]:
    """Frame indices of each window of one step of one segment: no wrap-around from its end to its start.

    Windows start every `window - overlap` frames, moved back by `shift` as in `window_indices`, but a window
    that would cross the segment's start or end is moved inside it (the UNet's window is fixed, so every
    window is full); a window moved onto its neighbour is dropped. Segments shorter than a window have only
    the circular plan (frames repeat inside the one window).
    """
    if num_frames < window:
        return window_indices(num_frames, window, overlap, shift)
    if not 0 <= overlap < window:
        raise ValueError(f"overlap must be in [0, window), got overlap={overlap} window={window}")
    starts: list[int] = []
    start = -shift
    while not starts or starts[-1] + window < num_frames:
        clamped = min(max(start, 0), num_frames - window)
        if not starts or clamped != starts[-1]:
            starts.append(clamped)
        start += window - overlap
    return [list(range(s, s + window)) for s in starts]


def pad_weights(pad: int) -> tuple[list[float], list[float]]:
    """Motion-token weights of the leading and trailing pad frames.

    Leading pads fade the first frame's motion in from 0 (i/pad); trailing pads fade the last
    frame's motion out (1 - i/pad), as the official inference does.
    """
    lead = [i / pad for i in range(pad)]
    tail = [1 - i / pad for i in range(pad)]
    return lead, tail


def pad_motion_tokens(tokens, pad: int):
    """(N, ...) motion tokens -> (N + 2*pad, ...) with the faded pad frames around them."""
    import torch

    if pad == 0:
        return tokens
    return torch.cat([block for block, _ in padded_motion([tokens], pad)])


def padded_motion(chunks: Iterable, pad: int) -> Iterator:
    """The padded clip's motion tokens from a stream of (n, ...) token chunks: (block, real) pairs in order,
    `real` False for the leading pads (made when the first chunk arrives) and the trailing ones (made when the
    stream ends), so a source of unknown length is padded as the whole clip would be."""
    import torch

    lead, tail = pad_weights(pad)
    last = None
    for chunk in chunks:
        if last is None and pad:
            yield torch.cat([chunk[:1] * w for w in lead]), False
        yield chunk, True
        last = chunk[-1:]
    if last is not None and pad:
        yield torch.cat([last * w for w in tail]), False
