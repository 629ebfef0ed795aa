"""Ed25519 key files for signing bundles: a hex seed, readable by its owner only, with the
public half beside it (``.pub``) for devices to pin."""

from __future__ import annotations

from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing

from fedcart.atomic_write import write_atomically

__all__ = ["load_or_create_signing_key", "read_public_key"]


def load_or_create_signing_key(path: Path | str) -> nacl.signing.SigningKey:
    """Read the key at ``path``, or create it (mode 0600, written whole or not at all)."""
    path = Path(path)
    if path.exists():
        try:
            return nacl.signing.SigningKey(bytes.fromhex(path.read_text().strip()))
        except (ValueError, nacl.exceptions.CryptoError) as exc:
            raise ValueError(f"{path} is not an Ed25519 signing key (64 hex digits)") from exc
    key = nacl.signing.SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (bytes(key).hex() + "\n").encode(), mode=0o600)
    path.with_suffix(".pub").write_text(bytes(key.verify_key).hex() + "\n")
    return key


def read_public_key(spec: str) -> bytes:
    """A 32-byte Ed25519 public key from 64 hex digits or from a file holding them."""
    text = spec.strip()
    if len(text) != 64 and Path(text).is_file():
        text = Path(text).read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"{spec!r} is neither 64 hex digits nor a file holding them") from exc
    if len(raw) != nacl.bindings.crypto_sign_PUBLICKEYBYTES:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return raw
