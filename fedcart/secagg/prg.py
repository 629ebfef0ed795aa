"""The mask PRG: libsodium's ``randombytes_buf_deterministic``, computed by OpenSSL.

Keystream of ChaCha20-IETF with the 32-byte seed as key, the 12-byte nonce "LibsodiumDRG"
and block counter 0: byte for byte what PyNaCl's ``randombytes_deterministic`` returns
(tested), at OpenSSL's speed. Masks are that keystream read as little-endian uint32 and added
to (or subtracted from) the vector modulo 2^32 in place, one reused scratch buffer per call
instead of a new array per neighbour.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["SEED_BYTES", "add_mask", "keystream"]

SEED_BYTES = 32
# cryptography's ChaCha20 nonce is the 32-bit little-endian block counter then the 96-bit
# IETF nonce.
_NONCE = (0).to_bytes(4, "little") + b"LibsodiumDRG"
_CHUNK = 1 << 16  # bytes of keystream per OpenSSL call: the keystream and the vector's
# slice stay in L1/L2 while numpy adds them (1 MiB chunks ran at 0.44x raw OpenSSL, 64 KiB
# at 0.76x)


def _encryptor(seed: bytes):  # type: ignore[no-untyped-def]
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()


def keystream(seed: bytes, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of the deterministic stream for ``seed``."""
    return _encryptor(seed).update(bytes(n_bytes))


def add_mask(vector: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """vector += sign * PRG(seed) (mod 2^32), in place; ``vector`` is a uint32 array."""
    if vector.dtype != np.uint32 or not vector.flags.c_contiguous:
        raise TypeError("masks apply to a contiguous uint32 vector")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    enc = _encryptor(seed)
    chunk_words = _CHUNK // 4
    zeros = bytes(min(_CHUNK, vector.nbytes))
    scratch = bytearray(len(zeros) + 63)
    op = np.add if sign == 1 else np.subtract
    for start in range(0, vector.size, chunk_words):
        part = vector[start:start + chunk_words]
        n = enc.update_into(memoryview(zeros)[:part.nbytes], scratch)
        op(part, np.frombuffer(scratch, dtype="<u4", count=n // 4), out=part)
