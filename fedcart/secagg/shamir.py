"""Shamir secret sharing over GF(p), p = 2^31 - 1, vectorized with numpy.

A 32-byte secret is cut into 16 little-endian 16-bit words, each shared with its own random
polynomial of degree t-1; many secrets are shared (and reconstructed) in one array operation.
Every product of two field elements fits in int64 (< 2^62), so numpy does the arithmetic
exactly. Randomness is passed in (a callable returning bytes, ``os.urandom`` by default): it
comes from the OS CSPRNG, never from numpy's generators.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["PRIME", "WORDS", "ShamirError", "reconstruct", "split"]

PRIME = (1 << 31) - 1
WORDS = 16  # 16-bit words per 32-byte secret
SECRET_BYTES = 2 * WORDS


class ShamirError(ValueError):
    """Too few shares, duplicate or invalid share points, or a bad secret."""


def _random_field(shape: tuple[int, ...], random_bytes: Callable[[int], bytes]) -> np.ndarray:
    """Uniform elements of GF(p) by rejection sampling 31-bit words (p = 2^31 - 1 is
    rejected, so the draw is exactly uniform)."""
    count = int(np.prod(shape))
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        raw = np.frombuffer(random_bytes(4 * (count - out.size + 8)), dtype="<u4")
        words = (raw & PRIME).astype(np.int64)
        out = np.concatenate([out, words[words < PRIME]])
    return out[:count].reshape(shape)


def split(secrets: Sequence[bytes], points: Sequence[int], t: int,
          random_bytes: Callable[[int], bytes] = os.urandom) -> np.ndarray:
    """Shares of every secret at the given points: int64 array [len(points), len(secrets),
    WORDS]. Share ``i`` (x = points[i]) of secret ``s`` is ``out[i, s]``; any t of them
    reconstruct it."""
    n = len(points)
    if not 1 <= t <= n:
        raise ShamirError(f"need 1 <= t <= number of points, got t={t}, {n} points")
    if len(set(points)) != n or min(points) < 1 or max(points) >= PRIME:
        raise ShamirError("share points must be distinct and in [1, p)")
    if any(len(s) != SECRET_BYTES for s in secrets):
        raise ShamirError(f"every secret must have {SECRET_BYTES} bytes")
    words = np.frombuffer(b"".join(secrets), dtype="<u2").astype(np.int64)
    words = words.reshape(len(secrets), WORDS)
    coeffs = _random_field((t - 1, len(secrets), WORDS), random_bytes)
    xs = np.asarray(points, dtype=np.int64)[:, None, None]
    acc = np.zeros((n, len(secrets), WORDS), dtype=np.int64)
    for c in coeffs[::-1]:  # Horner, highest degree first
        acc = (acc + c) * xs % PRIME
    return (acc + words) % PRIME


def _lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """Lagrange basis values at 0 for distinct points ``xs`` (int64, mod p)."""
    out = np.empty(len(xs), dtype=np.int64)
    for i, xi in enumerate(xs.tolist()):
        num, den = 1, 1
        for j, xj in enumerate(xs.tolist()):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out[i] = num * pow(den, PRIME - 2, PRIME) % PRIME
    return out


def reconstruct(points: Sequence[int], shares: np.ndarray, t: int) -> list[bytes]:
    """The secrets from shares at ``points`` (x values): ``shares`` is [len(points),
    n_secrets, WORDS]; the first t points are used."""
    if len(points) < t:
        raise ShamirError(f"{len(points)} shares cannot reconstruct a threshold-{t} secret")
    xs = np.asarray(points[:t], dtype=np.int64)
    if len(set(xs.tolist())) != t or xs.min() < 1 or xs.max() >= PRIME:
        raise ShamirError(f"share points must be distinct and in [1, p): {xs.tolist()}")
    ys = np.asarray(shares[:t], dtype=np.int64)
    if ys.ndim != 3 or ys.shape[2] != WORDS or ys.min() < 0 or ys.max() >= PRIME:
        raise ShamirError("shares must be field elements of shape [t, secrets, 16]")
    lam = _lagrange_at_zero(xs)
    acc = np.zeros(ys.shape[1:], dtype=np.int64)
    for li, yi in zip(lam, ys, strict=True):
        acc = (acc + li * yi) % PRIME
    if acc.max(initial=0) >= 1 << 16:
        raise ShamirError("shares are inconsistent: the reconstructed words exceed 16 bits")
    return [row.astype("<u2").tobytes() for row in acc]
