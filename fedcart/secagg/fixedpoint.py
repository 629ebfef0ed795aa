"""Fixed-point encoding of real vectors as integers in Z_2^32, with a norm that rounding
cannot raise above the bound the privacy accountant charges.

A device's vector x, already clipped to norm C and multiplied by the scale s, is rounded to
an integer vector r by *conditional randomized rounding* (Kairouz, Liu, Steinke, ICML 2021):
each coordinate rounds up with probability equal to its fraction (from the OS CSPRNG), and a
rounding whose norm exceeds the integer bound ``limit`` is drawn again. Stochastic rounding
adds variance, so a clipped vector spread over many small coordinates rounds to a larger
norm; after a few draws the vector is shrunk to fit, and as a last resort rounded towards
zero, which never raises any coordinate's magnitude. So ``norm(r) <= limit`` always holds:
the sensitivity the noise is calibrated to is ``limit`` itself, not C s.

Words: a signed integer goes in one uint32 word (two's complement). Packed: non-negative
integers below 2^16 go two to a word, as 16-bit lanes; masks mod 2^32 cancel as before.
Half the bytes, half the masks to expand: what makes a co-occurrence round over 2 million
pairs affordable. The scales leave half the modulus as headroom: n honest inputs span at most
2^31 (a word) or 2^15 (a lane), so the honest range of a sum covers at most half the circle,
and ``fold`` can bring any modular sum back into it without ever moving two sums further
apart (what a lying device's word cannot then undo).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

__all__ = ["LANE", "MIN_PACKED_SCALE", "WORD", "WORD_LIMIT", "bounded_round", "fold", "pack",
           "packed_scale_for", "scale_for", "stochastic_round", "to_words", "unpack",
           "words_to_ints"]

WORD = 1 << 32
WORD_LIMIT = (1 << 31) - 1
LANE = 1 << 16
_WORD_SPAN = 1 << 30  # n inputs' integers of magnitude <= bound * scale + 1 stay below this
_LANE_SPAN = 1 << 15  # n lanes of at most scale sum to at most this
MIN_PACKED_SCALE = 4  # below this many steps per unit, a cohort sends unpacked values
REDRAWS = 4  # conditional rounding: draws at one size before shrinking
SHRINKS = 6  # shrinkings before rounding towards zero


def scale_for(bound: float, n_inputs: int) -> float:
    """Largest power of two s with n_inputs * (bound * s + 1) < 2^30: the sums of n_inputs
    integers of magnitude at most bound * s + 1 span less than half the word (powers of two
    keep the scaling exact in float arithmetic)."""
    if bound <= 0 or n_inputs < 1:
        raise ValueError(f"need bound > 0 and n_inputs >= 1, got {bound}, {n_inputs}")
    exponent = int(np.floor(np.log2((_WORD_SPAN / n_inputs - 1) / bound)))
    scale = 2.0 ** exponent
    while n_inputs * (bound * scale + 1) >= _WORD_SPAN:
        scale /= 2
    return scale


def packed_scale_for(n_inputs: int) -> int:
    """Largest power of two s with n_inputs * s <= 2^15: n_inputs lanes of at most s span
    at most half a lane (0 if none)."""
    if n_inputs < 1:
        raise ValueError(f"need n_inputs >= 1, got {n_inputs}")
    scale = 1 << 15
    while scale and n_inputs * scale > _LANE_SPAN:
        scale >>= 1
    return scale


def stochastic_round(x: np.ndarray,
                     random_bytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """``x`` rounded to int64, each entry up with probability equal to its fraction (16-bit
    resolution), so the rounding is unbiased to 2^-16. Only nonzero entries draw randomness
    (a zero rounds to zero whatever the draw): a statistic is sparse."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(x.shape, dtype=np.int64)
    nonzero = np.flatnonzero(x)
    present = x.flat[nonzero]
    draws = np.frombuffer(random_bytes(2 * present.size), dtype="<u2") / float(LANE)
    out.flat[nonzero] = np.floor(present + draws).astype(np.int64)
    return out


def _norm(r: np.ndarray, order: int) -> float:
    return float(np.linalg.norm(r.astype(np.float64), ord=order))


def bounded_round(x: np.ndarray, limit: int, order: int,
                  random_bytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """An integer vector near ``x`` whose ``order``-norm (1 or 2) is at most ``limit``,
    which ``x``'s own norm must not exceed: conditional randomized rounding, shrinking
    ``x`` when REDRAWS draws in a row exceed ``limit``, and rounding towards zero after
    SHRINKS shrinkings (which never raises a magnitude)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("cannot round NaN or infinite values")
    if _norm(x, order) > limit:
        raise ValueError(f"the vector's norm exceeds the bound {limit}: clip before rounding")
    for attempt in range(SHRINKS * REDRAWS):
        r = stochastic_round(x, random_bytes)
        size = _norm(r, order)
        if size <= limit:
            return r
        if attempt % REDRAWS == REDRAWS - 1:
            # entries below one step round to 0 or 1, so a rounding's squared L2 norm is
            # about their sum: it shrinks with the square of the factor, not the factor
            x = x * (limit / size) ** order
    return np.trunc(x).astype(np.int64)


def fold(sums: np.ndarray, low: int, high: int, modulus: int) -> np.ndarray:
    """Modular ``sums`` (any integers, read mod ``modulus``) brought into [low, high], with
    2 (high - low) <= modulus: the identity on [low, high], a reflection back down from
    high over the next high - low, and low beyond. The map is 1-Lipschitz on the circle, so
    two sums that differ by one honest input (at most its norm, entry by entry, mod the
    modulus) come out no further apart, wherever a lying input put them."""
    width = high - low
    if width < 0 or 2 * width > modulus:
        raise ValueError(f"the range [{low}, {high}] needs 2 (high - low) <= {modulus}")
    u = np.mod(np.asarray(sums, dtype=np.int64) - low, modulus)
    return np.where(u <= width, low + u, np.where(u <= 2 * width, high - (u - width), low))


def to_words(r: np.ndarray) -> np.ndarray:
    """Signed integers (int32 range, checked) as uint32 words, two's complement."""
    r = np.asarray(r, dtype=np.int64)
    if r.size and (r.min() < -WORD_LIMIT or r.max() > WORD_LIMIT):
        raise ValueError("an integer exceeds int32")
    return r.astype(np.uint32)


def words_to_ints(total: np.ndarray) -> np.ndarray:
    """The signed int64 sum from the modular sum of words."""
    return np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.int64)


def pack(r: np.ndarray) -> np.ndarray:
    """Integers in [0, 2^16) (checked), two per uint32 word: entry 2i in the low lane of
    word i."""
    r = np.asarray(r, dtype=np.int64)
    if r.size and (r.min() < 0 or r.max() >= LANE):
        raise ValueError(f"packed integers must lie in [0, {LANE})")
    lanes = np.zeros(r.size + r.size % 2, dtype=np.uint32)
    lanes[:r.size] = r
    return lanes[0::2] | (lanes[1::2] << np.uint32(16))


def unpack(total: np.ndarray, n_values: int) -> np.ndarray:
    """The ``n_values`` lane sums (int64) from the modular sum of packed words."""
    total = np.asarray(total, dtype=np.uint32)
    lanes = np.empty(2 * total.size, dtype=np.int64)
    lanes[0::2] = total & np.uint32(0xFFFF)
    lanes[1::2] = total >> np.uint32(16)
    return lanes[:n_values]
