"""DP noise from a cryptographic generator.

Uniforms come from the ChaCha20 keystream (secagg.prg) under a fresh 32-byte seed from the OS
CSPRNG, 53 bits each, mapped through the inverse normal CDF (scipy's ``ndtri``) or the Laplace
quantile function. The noise is unpredictable to anyone without the seed, which is used once
and discarded; numpy's generators are not used.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.special import ndtri

from secagg.prg import keystream

__all__ = ["gaussian", "laplace"]


def _uniform(size: int, seed: bytes | None) -> np.ndarray:
    """Uniforms in the open interval (0, 1)."""
    words = np.frombuffer(keystream(seed or os.urandom(32), 8 * size), dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def gaussian(size: int, std: float, seed: bytes | None = None) -> np.ndarray:
    """``size`` draws of N(0, std^2)."""
    return ndtri(_uniform(size, seed)) * std


def laplace(size: int, scale: float, seed: bytes | None = None) -> np.ndarray:
    """``size`` draws of Laplace(0, scale)."""
    u = _uniform(size, seed) - 0.5
    return -scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
