"""Window plans for long clips and the motion ramps of the pad frames."""
from __future__ import annotations


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
    lead, tail = pad_weights(pad)
    first, last = tokens[:1], tokens[-1:]
    return torch.cat([first * w for w in lead] + [tokens] + [last * w for w in tail])
