"""DP noise sampled exactly in the integers.

The aggregator adds noise to the int64 sum of the devices' fixed-point integers before it
decodes them, so noise is an integer vector too: the discrete Gaussian N_Z(0, sigma^2), with
P[x] proportional to exp(-x^2 / (2 sigma^2)), or the discrete Laplace with scale b, with
P[x] proportional to exp(-|x| / b), each over all integers x (Canonne, Kamath and Steinke,
"The Discrete Gaussian for Differential Privacy", NeurIPS 2020).

Why integers: noise sampled in floating point (an inverse CDF applied to a 53-bit uniform,
added to a float sum) leaks the input through which doubles can and cannot come out; Mironov
("On Significance of the Least Significant Bits for Differential Privacy", CCS 2012) tells
a true sum of 0 from 1 with certainty on most outputs. Here every integer is a possible
output from every input, with the probability ratio the accountant assumes.

The samplers are OpenDP's (``make_gaussian`` and ``make_laplace`` over an i64 vector domain):
CKS's rejection samplers in exact rational arithmetic, driven by a cryptographic generator,
never by floats or numpy's generators. A sample costs about 12 microseconds on one core;
vectors are cut into chunks sampled on a thread pool (OpenDP's FFI call releases the GIL),
so 500,000 entries take about 5.6 s on one core and 3 s on two.

``sigma`` and ``scale`` are floats taken at their exact binary value. They are capped at
MAX_SCALE = 2^40 so that a draw never comes near the int64 range, where OpenDP would
saturate instead of sampling (at that scale P[|x| >= 2^62] < exp(-2^22)).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import opendp.prelude as dp

__all__ = ["MAX_SCALE", "MAX_SIZE", "discrete_gaussian", "discrete_laplace",
           "gaussian_norm_bound", "laplace_norm_bound"]

# make_gaussian and make_laplace are in OpenDP's "contrib" set: each comes with a proof
# (linked from its documentation) that OpenDP's committee has not yet vetted.
dp.enable_features("contrib")

MAX_SCALE = 2.0**40
MAX_SIZE = 2**40  # entries per call; the accountant's bound for the discrete Gaussian uses it
CHUNK = 1 << 16  # entries per OpenDP call: one thread's share of work between handoffs

_GAUSSIAN_SPACE = (dp.vector_domain(dp.atom_domain(T="i64")), dp.l2_distance(T="i64"))
_LAPLACE_SPACE = (dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"))


def discrete_gaussian(size: int, sigma: float) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian N_Z(0, sigma^2), as int64."""
    return _sample(size, sigma, "sigma", _GAUSSIAN_SPACE, dp.m.make_gaussian)


def discrete_laplace(size: int, scale: float) -> np.ndarray:
    """``size`` independent draws of the discrete Laplace distribution of scale b
    (P[x] proportional to exp(-|x| / b)), as int64."""
    return _sample(size, scale, "scale", _LAPLACE_SPACE, dp.m.make_laplace)


def gaussian_norm_bound(size: int, sigma: float) -> float:
    """An L2 norm that ``size`` draws of N_Z(0, sigma^2) exceed with probability below
    exp(-32): sigma (sqrt(size) + 8) (the norm of a sub-Gaussian vector concentrates around
    sigma sqrt(size), with tail exp(-t^2 / 2) at sigma t above it)."""
    return sigma * (math.sqrt(size) + 8.0)


def laplace_norm_bound(size: int, scale: float) -> float:
    """An L1 norm that ``size`` discrete Laplace draws of scale b exceed with probability
    below exp(-16): b (size + 8 sqrt(size) + 64) (each |x| has mean at most b and is
    sub-exponential; Bernstein's inequality)."""
    return scale * (size + 8.0 * math.sqrt(size) + 64.0)


def _sample(size: int, scale: float, name: str, space: tuple, make) -> np.ndarray:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not \
            0 <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer in [0, {MAX_SIZE}], got {size!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and 0.0 < scale <= MAX_SCALE):
        raise ValueError(f"{name} must lie in (0, 2^40], got {scale!r}")
    size = int(size)
    out = np.empty(size, dtype=np.int64)
    if size == 0:
        return out
    measurement = make(*space, scale=scale)

    def fill(start: int) -> None:
        n = min(CHUNK, size - start)
        out[start:start + n] = np.asarray(measurement(np.zeros(n, dtype=np.int64)),
                                          dtype=np.int64)

    starts = range(0, size, CHUNK)
    workers = min(len(starts), os.cpu_count() or 1)
    if workers == 1:
        for start in starts:
            fill(start)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="dp-noise") as pool:
            for done in [pool.submit(fill, start) for start in starts]:
                done.result()  # re-raises a sampler's error
    return out
