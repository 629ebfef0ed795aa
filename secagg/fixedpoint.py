"""Fixed-point encoding of float vectors into Z_2^32, with a scale that cannot wrap.

Each coordinate of every input lies in [-bound, bound] (the device clips before encoding);
with n inputs the sum lies in [-n bound, n bound], so the scale is the largest that keeps
n * bound * scale below 2^31: the modular sum then decodes as a signed int32, exactly.
Rounding is to nearest; its error per coordinate is at most 1/(2 scale) per input.

Packed: values in [0, 1] (a device's statistics) go two to a word, as 16-bit lanes. Masks
mod 2^32 cancel as before, and the lanes never carry into each other as long as each lane's
sum over the cohort stays below 2^16: the scale is the largest power of two with
n * scale < 2^16 (8 for 4,335 devices). Rounding is stochastic (up with probability equal to
the fraction, from the OS CSPRNG), so the decoded sum is unbiased. Half the bytes, half the
masks to expand: what makes a co-occurrence round over 2 million pairs affordable.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["MIN_PACKED_SCALE", "decode_packed_sum", "decode_sum", "encode", "encode_packed",
           "packed_scale_for", "scale_for"]

_LIMIT = (1 << 31) - 1
_LANE = 1 << 16
MIN_PACKED_SCALE = 4  # below this many steps per unit, a cohort sends unpacked values


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


def packed_scale_for(n_inputs: int) -> int:
    """Largest power of two s with n_inputs * s < 2^16: no lane can carry (0 if none)."""
    if n_inputs < 1:
        raise ValueError(f"need n_inputs >= 1, got {n_inputs}")
    scale = 1 << 16
    while scale and n_inputs * scale >= _LANE:
        scale >>= 1
    return scale


def encode_packed(values: np.ndarray, scale: int) -> np.ndarray:
    """``values`` (in [0, 1], checked) rounded stochastically to multiples of 1/scale, two
    per uint32 word (value 2i in the low lane of word i). Only the nonzero values draw
    randomness (a zero rounds to zero whatever the draw): a statistic is sparse."""
    values = np.asarray(values, dtype=np.float64)
    if not 0 < scale < _LANE:
        raise ValueError(f"a lane's scale must lie in (0, 2^16), got {scale}")
    nonzero = np.flatnonzero(values)  # NaN is nonzero, so it is checked below
    present = values[nonzero]
    if present.size and (not np.isfinite(present).all() or present.min() < 0
                         or present.max() > 1):
        raise ValueError("packed values must lie in [0, 1]")
    steps = np.zeros(values.size + values.size % 2, dtype=np.uint32)
    noise = np.frombuffer(os.urandom(2 * present.size), dtype="<u2") / float(_LANE)
    steps[nonzero] = np.floor(present * scale + noise).astype(np.uint32)
    return steps[0::2] | (steps[1::2] << np.uint32(16))


def decode_packed_sum(total: np.ndarray, scale: int, n_values: int) -> np.ndarray:
    """The float sums of ``n_values`` packed values from the modular sum of their words."""
    total = total.astype(np.uint32)
    lanes = np.empty(2 * total.size, dtype=np.float64)
    lanes[0::2] = total & np.uint32(0xFFFF)
    lanes[1::2] = total >> np.uint32(16)
    return lanes[:n_values] / scale
