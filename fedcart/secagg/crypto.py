"""Typed wrappers over libsodium (PyNaCl) and OpenSSL (cryptography) for the round:
X25519 agreement bound to the round by HKDF, Ed25519 signatures, authenticated share boxes.

No primitive is implemented here; each function fixes how one is used.
"""

from __future__ import annotations

import hmac
import struct

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcart.secagg.errors import ProtocolViolation

__all__ = [
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "EphemeralKey",
    "IdentityKey",
    "mask_seed",
    "open_share",
    "seal_share",
    "signature_valid",
    "verify",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_KDF_SALT = b"fedcart/secagg/v1/pairwise-mask"


class IdentityKey:
    """A client's (or the server's) long-term Ed25519 key."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise ValueError(f"an Ed25519 seed has {KEY_BYTES} bytes, got {len(seed)}")
        self._key = nacl.signing.SigningKey(seed)
        self.public = bytes(self._key.verify_key)

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message).signature


def signature_valid(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message`` (False for a
    malformed key or signature too)."""
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError):
        return False
    return True


def verify(public: bytes, message: bytes, signature: bytes, what: str) -> None:
    """Raise ProtocolViolation naming ``what`` unless ``signature`` verifies."""
    if not signature_valid(public, message, signature):
        raise ProtocolViolation(f"bad signature on {what}")


class EphemeralKey:
    """A fresh X25519 key pair for one round (one for masks, one for share boxes)."""

    def __init__(self, secret: bytes) -> None:
        self._private = nacl.public.PrivateKey(secret)
        self.secret = secret
        self.public = bytes(self._private.public_key)

    @classmethod
    def generate(cls) -> EphemeralKey:
        return cls(bytes(nacl.public.PrivateKey.generate()))

    def box(self, peer_public: bytes) -> nacl.public.Box:
        try:
            return nacl.public.Box(self._private, nacl.public.PublicKey(peer_public))
        except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError) as exc:
            raise ProtocolViolation("peer's share-encryption key is invalid") from exc


def mask_seed(secret: bytes, peer_public: bytes, round_id: int, a: int, b: int) -> bytes:
    """The pairwise mask seed of clients a and b: HKDF-SHA256 of their X25519 agreement,
    bound to the round and to both ids (in ascending order, so both ends agree)."""
    try:
        shared = nacl.bindings.crypto_scalarmult(secret, peer_public)
    except nacl.exceptions.RuntimeError as exc:  # all-zero output: a low-order point
        raise ProtocolViolation("peer's masking key is a low-order point") from exc
    lo, hi = sorted((a, b))
    info = struct.pack("<QII", round_id, lo, hi)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_KDF_SALT, info=info).derive(shared)


def _share_header(round_id: int, sender: int, recipient: int) -> bytes:
    return struct.pack("<QII", round_id, sender, recipient)


def seal_share(box: nacl.public.Box, round_id: int, sender: int, recipient: int,
               payload: bytes) -> bytes:
    """Encrypt shares to one neighbour; the plaintext names the round and both ends, so
    a server cannot replay or redirect a ciphertext."""
    return bytes(box.encrypt(_share_header(round_id, sender, recipient) + payload))


def open_share(box: nacl.public.Box, round_id: int, sender: int, recipient: int,
               ciphertext: bytes) -> bytes:
    try:
        plain = box.decrypt(ciphertext)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError) as exc:
        raise ProtocolViolation(f"shares from client {sender} do not decrypt") from exc
    header = _share_header(round_id, sender, recipient)
    if not hmac.compare_digest(plain[:len(header)], header):
        raise ProtocolViolation(f"shares from client {sender} name another round or "
                                "recipient")
    return plain[len(header):]
