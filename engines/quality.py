"""Image quality measures shared by the quantization reports and the runtime's comparisons."""
from __future__ import annotations

import math

import numpy as np


def psnr(test, reference, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of `test` against `reference` (same shape), computed in float64.

    data_range: the span of valid values: 2.0 for frames in [-1, 1] (what the VAE decoder emits), 255 for
    uint8 images. Identical inputs give +inf.
    """
    test = np.asarray(test, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if test.shape != reference.shape:
        raise ValueError(f"shape mismatch: {test.shape} vs {reference.shape}")
    mse = float(np.mean((test - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
