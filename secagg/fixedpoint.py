"""Fixed-point encoding of float vectors into Z_2^32, with a scale that cannot wrap.

Each coordinate of every input lies in [-bound, bound] (the device clips before encoding);
with n inputs the sum lies in [-n bound, n bound], so the scale is the largest that keeps
n * bound * scale below 2^31: the modular sum then decodes as a signed int32, exactly.
Rounding is to nearest; its error per coordinate is at most 1/(2 scale) per input.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decode_sum", "encode", "scale_for"]

_LIMIT = (1 << 31) - 1


def scale_for(bound: float, n_inputs: int) -> float:
    """Largest power of two s with n_inputs * (bound * s + 1/2) < 2^31 (powers of two keep
    the scaling exact in float arithmetic)."""
    if bound <= 0 or n_inputs < 1:
        raise ValueError(f"need bound > 0 and n_inputs >= 1, got {bound}, {n_inputs}")
    exponent = int(np.floor(np.log2((_LIMIT / n_inputs - 0.5) / bound)))
    scale = 2.0 ** exponent
    while n_inputs * (bound * scale + 0.5) >= _LIMIT:
        scale /= 2
    return scale


def encode(values: np.ndarray, scale: float, bound: float) -> np.ndarray:
    """Round ``values`` (|v| <= bound, checked) to int32 at ``scale``, as uint32 words."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("cannot encode NaN or infinite values")
    if values.size and np.abs(values).max() > bound:
        raise ValueError(f"a value exceeds the bound {bound}: clip before encoding")
    return np.rint(values * scale).astype(np.int64).astype(np.uint32)


def decode_sum(total: np.ndarray, scale: float) -> np.ndarray:
    """The float sum from the modular sum of encodings (uint32)."""
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / scale
