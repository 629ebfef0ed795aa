"""The signed model bundle: what the aggregator publishes and a device runs.

A bundle is a directory (or a zip of one) holding

    manifest.json      format version, model version, round, V, d, the item vocabulary with
                       names, its sha256, the history feature settings, sha256 of every file
    manifest.sig       Ed25519 signature (64 raw bytes) of manifest.json's exact bytes
    recommend.onnx     recommend.ort    train_step.onnx    train_step.ort
    weights.bin        e_in, e_out, bias, blend as little-endian float32, in that order

Verification checks the signature first, then parses the manifest, then every file's hash
and size; it keeps the verified bytes in memory so that what runs is what was checked.
Only json, hashlib, numpy and pynacl: a device imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing
import numpy as np

from model_export.model import Weights

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "Manifest",
    "read_bundle",
    "vocabulary_digest",
    "write_bundle",
    "zip_bundle",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
GRAPH_FILES = ("recommend.onnx", "recommend.ort", "train_step.onnx", "train_step.ort")
WEIGHTS_FILE = "weights.bin"
PAYLOAD_FILES = (*GRAPH_FILES, WEIGHTS_FILE)
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 2 << 30


class BundleError(Exception):
    """The bundle is unsigned, tampered, truncated, signed by another key, for another
    vocabulary, older than required, or not a bundle at all."""


def vocabulary_digest(items: Sequence[str]) -> str:
    """sha256 of the item keys in catalog order, one per line: a device pins it."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    format: int
    model_version: int
    round: int
    n_items: int
    dim: int
    items: tuple[str, ...]
    names: tuple[str, ...]
    vocabulary_sha256: str
    history_decay: float
    files: Mapping[str, str]

    def to_json(self) -> bytes:
        body = {
            "format": self.format, "model_version": self.model_version, "round": self.round,
            "n_items": self.n_items, "dim": self.dim,
            "vocabulary_sha256": self.vocabulary_sha256,
            "history": {"decay": self.history_decay},
            "files": dict(sorted(self.files.items())),
            "items": [[k, n] for k, n in zip(self.items, self.names, strict=True)],
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            body = json.loads(raw)
            items = body["items"]
            manifest = cls(
                format=int(body["format"]), model_version=int(body["model_version"]),
                round=int(body["round"]), n_items=int(body["n_items"]), dim=int(body["dim"]),
                items=tuple(str(k) for k, _ in items), names=tuple(str(n) for _, n in items),
                vocabulary_sha256=str(body["vocabulary_sha256"]),
                history_decay=float(body["history"]["decay"]),
                files={str(k): str(v) for k, v in body["files"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc!r}") from exc
        if manifest.format != FORMAT_VERSION:
            raise BundleError(f"bundle format {manifest.format} is not supported "
                              f"(this reader knows format {FORMAT_VERSION})")
        if len(manifest.items) != manifest.n_items:
            raise BundleError(f"manifest lists {len(manifest.items)} items but says V = "
                              f"{manifest.n_items}")
        if vocabulary_digest(manifest.items) != manifest.vocabulary_sha256:
            raise BundleError("manifest's vocabulary does not match its vocabulary_sha256")
        if set(manifest.files) != set(PAYLOAD_FILES):
            raise BundleError(f"manifest lists files {sorted(manifest.files)}, expected "
                              f"{sorted(PAYLOAD_FILES)}")
        return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest and the exact bytes that were checked."""

    manifest: Manifest
    files: Mapping[str, bytes]

    def weights(self) -> Weights:
        flat = np.frombuffer(self.files[WEIGHTS_FILE], dtype="<f4").astype(np.float32)
        return Weights.from_flat(flat, self.manifest.n_items, self.manifest.dim)


def _read_members(path: Path) -> dict[str, bytes]:
    """The bundle's files by name, from a directory or a zip, each size-bounded."""
    wanted = (MANIFEST, SIGNATURE, *PAYLOAD_FILES)
    limits = {MANIFEST: MAX_MANIFEST_BYTES, SIGNATURE: 64}
    out: dict[str, bytes] = {}
    try:
        if path.is_dir():
            for name in wanted:
                member = path / name
                if member.is_file():
                    if member.stat().st_size > limits.get(name, MAX_FILE_BYTES):
                        raise BundleError(f"{name} is larger than a bundle file may be")
                    out[name] = member.read_bytes()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename in wanted:
                        if info.file_size > limits.get(info.filename, MAX_FILE_BYTES):
                            raise BundleError(f"{info.filename} is larger than a bundle "
                                              "file may be")
                        out[info.filename] = zf.read(info)
        else:
            raise BundleError(f"{path} is neither a bundle directory nor a zip")
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise BundleError(f"{path}: cannot read the bundle ({exc})") from exc
    return out


def read_bundle(path: Path | str, verify_key: bytes, *,
                vocabulary_sha256: str | None = None,
                min_model_version: int | None = None) -> Bundle:
    """Verify and load a bundle, or raise :class:`BundleError` saying why not.

    ``verify_key`` is the aggregator's Ed25519 public key (32 bytes), pinned by the device.
    ``vocabulary_sha256`` pins the catalog a device's stored carts refer to;
    ``min_model_version`` refuses a downgrade.
    """
    path = Path(path)
    members = _read_members(path)
    if MANIFEST not in members:
        raise BundleError(f"{path}: no {MANIFEST}: not a bundle")
    if SIGNATURE not in members:
        raise BundleError(f"{path}: unsigned bundle ({SIGNATURE} is missing)")
    try:
        nacl.signing.VerifyKey(verify_key).verify(members[MANIFEST], members[SIGNATURE])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError) as exc:
        raise BundleError(f"{path}: the signature does not verify with the pinned key "
                          "(tampered manifest, or signed by another key)") from exc
    manifest = Manifest.from_json(members[MANIFEST])
    for name, expected in manifest.files.items():
        if name not in members:
            raise BundleError(f"{path}: {name} is missing (truncated bundle)")
        actual = hashlib.sha256(members[name]).hexdigest()
        if actual != expected:
            raise BundleError(f"{path}: {name} is tampered or truncated (sha256 {actual[:16]}…"
                              f", manifest says {expected[:16]}…)")
    n_params = 2 * manifest.n_items * manifest.dim + manifest.n_items + 2
    if len(members[WEIGHTS_FILE]) != 4 * n_params:
        raise BundleError(f"{path}: weights.bin holds {len(members[WEIGHTS_FILE])} bytes, "
                          f"V = {manifest.n_items}, d = {manifest.dim} needs {4 * n_params}")
    if vocabulary_sha256 is not None and manifest.vocabulary_sha256 != vocabulary_sha256:
        raise BundleError(f"{path}: the bundle is for another item vocabulary "
                          f"({manifest.vocabulary_sha256[:16]}…, expected "
                          f"{vocabulary_sha256[:16]}…)")
    if min_model_version is not None and manifest.model_version < min_model_version:
        raise BundleError(f"{path}: model version {manifest.model_version} is older than "
                          f"the {min_model_version} already installed (downgrade refused)")
    payload = {name: members[name] for name in PAYLOAD_FILES}
    return Bundle(manifest=manifest, files=payload)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(out_dir: Path | str, *, weights: Weights, items: Sequence[str],
                 names: Sequence[str], graphs: Mapping[str, bytes], model_version: int,
                 round_id: int, history_decay: float,
                 signing_key: nacl.signing.SigningKey) -> Manifest:
    """Write a signed bundle atomically: into a temporary sibling directory, fsync'd, then
    renamed to ``out_dir``, which must not exist yet (bundles are immutable; a reader that
    switches between them renames a pointer). A crash leaves no partial ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: a bundle is never overwritten in place")
    if set(graphs) != set(GRAPH_FILES):
        raise ValueError(f"graphs must be exactly {GRAPH_FILES}, got {sorted(graphs)}")
    if weights.n_items != len(items) or len(names) != len(items):
        raise ValueError("weights, items and names disagree on the catalog size")
    payload = {**graphs, WEIGHTS_FILE: weights.flat().astype("<f4").tobytes()}
    manifest = Manifest(
        format=FORMAT_VERSION, model_version=model_version, round=round_id,
        n_items=weights.n_items, dim=weights.dim, items=tuple(items), names=tuple(names),
        vocabulary_sha256=vocabulary_digest(items), history_decay=history_decay,
        files={n: hashlib.sha256(b).hexdigest() for n, b in payload.items()},
    )
    raw = manifest.to_json()
    payload[MANIFEST] = raw
    payload[SIGNATURE] = signing_key.sign(raw).signature

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in payload.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def zip_bundle(bundle_dir: Path | str, zip_path: Path | str) -> Path:
    """Pack a bundle directory into one zip file (stored, not compressed: ORT files and
    weights barely compress), written whole or not at all."""
    bundle_dir, zip_path = Path(bundle_dir), Path(zip_path)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with open(tmp, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in (MANIFEST, SIGNATURE, *PAYLOAD_FILES):
                zf.write(bundle_dir / name, arcname=name)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, zip_path)
    _fsync_dir(zip_path.parent)
    return zip_path
