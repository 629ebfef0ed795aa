"""The signed model bundle: what the aggregator publishes and a device runs.

A bundle is a directory, or a zip of one (its files at the zip's root or in one top-level
folder, stored or deflated), holding

    manifest.json      format version, model version, round, V, d, K, the vocabulary's
                       sha256, the history feature settings, sha256 of every other file
    manifest.sig       Ed25519 signature (64 raw bytes) of manifest.json's exact bytes
    vocabulary.json    the item keys in catalog order, with display names
    recommend.onnx     recommend.ort    train_step.onnx    train_step.ort   (no weights)
    weights.bin        e_in, e_out, bias, blend as little-endian float32, in that order
                       (with d = 0 the embeddings take no bytes: V + 4 values)
    neighbours.bin     the item-item table [V, K]: the rows that have neighbours (int32
                       ids, then float32 weights; model.Neighbours.to_bytes)

Only the manifest, its signature and weights.bin change from one model version to the next
(the table changes only when the aggregator derives it from a new statistic), so a device that
holds the other files (matched by sha256) is sent only those three: a new model costs 4 bytes
per parameter to download.

Verification checks the signature first, then parses the manifest, then every file's hash
and size; it keeps the verified bytes in memory so that what runs is what was checked.
Only json, hashlib, numpy and pynacl: a device imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import numpy as np

from fedcart.atomic_write import fsync_directory
from fedcart.model_export.model import Neighbours, Weights, n_parameters
from fedcart.secagg.crypto import signature_valid

__all__ = [
    "CONSTANT_FILES",
    "FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "Manifest",
    "pack_members",
    "read_bundle",
    "unpack_members",
    "verify_members",
    "vocabulary_digest",
    "write_bundle",
]

FORMAT_VERSION = 4  # 3: personal co-occurrence (hist_co); 4: the item-item table
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
VOCABULARY_FILE = "vocabulary.json"
GRAPH_FILES = ("recommend.onnx", "recommend.ort", "train_step.onnx", "train_step.ort")
WEIGHTS_FILE = "weights.bin"
NEIGHBOURS_FILE = "neighbours.bin"
# what does not change with every model version: a device that holds them is not sent them
CONSTANT_FILES = (VOCABULARY_FILE, *GRAPH_FILES, NEIGHBOURS_FILE)
PAYLOAD_FILES = (*CONSTANT_FILES, WEIGHTS_FILE)
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
    neighbours: int  # K of the item-item table
    vocabulary_sha256: str
    history_decay: float
    files: Mapping[str, str]

    def to_json(self) -> bytes:
        body = {
            "format": self.format, "model_version": self.model_version, "round": self.round,
            "n_items": self.n_items, "dim": self.dim, "neighbours": self.neighbours,
            "vocabulary_sha256": self.vocabulary_sha256,
            "history": {"decay": self.history_decay},
            "files": dict(sorted(self.files.items())),
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            body = json.loads(raw)
            manifest = cls(
                format=int(body["format"]), model_version=int(body["model_version"]),
                round=int(body["round"]), n_items=int(body["n_items"]), dim=int(body["dim"]),
                neighbours=int(body["neighbours"]),
                vocabulary_sha256=str(body["vocabulary_sha256"]),
                history_decay=float(body["history"]["decay"]),
                files={str(k): str(v) for k, v in body["files"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise BundleError(f"manifest.json is malformed: {exc!r}") from exc
        if manifest.format != FORMAT_VERSION:
            raise BundleError(f"bundle format {manifest.format} is not supported "
                              f"(this reader knows format {FORMAT_VERSION})")
        if set(manifest.files) != set(PAYLOAD_FILES):
            raise BundleError(f"manifest lists files {sorted(manifest.files)}, expected "
                              f"{sorted(PAYLOAD_FILES)}")
        return manifest


def _vocabulary_json(items: Sequence[str], names: Sequence[str]) -> bytes:
    body = {"items": [[k, n] for k, n in zip(items, names, strict=True)]}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=4)
def _parse_vocabulary(raw: bytes, n_items: int, vocabulary_sha256: str,
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Items and names of a vocabulary file whose hash the manifest vouches for. Cached:
    every model version of a catalog has the same file, and a process that verifies
    bundles for thousands of simulated devices would otherwise parse it each time."""
    try:
        pairs = json.loads(raw)["items"]
        items = tuple(str(k) for k, _ in pairs)
        names = tuple(str(n) for _, n in pairs)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{VOCABULARY_FILE} is malformed: {exc!r}") from exc
    if len(items) != n_items:
        raise BundleError(f"{VOCABULARY_FILE} lists {len(items)} items but the manifest says "
                          f"V = {n_items}")
    if vocabulary_digest(items) != vocabulary_sha256:
        raise BundleError(f"{VOCABULARY_FILE} does not match the manifest's vocabulary_sha256")
    return items, names


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest, signature, vocabulary and the exact bytes that were
    checked."""

    manifest: Manifest
    manifest_json: bytes  # the exact signed bytes
    signature: bytes
    items: tuple[str, ...]
    names: tuple[str, ...]
    files: Mapping[str, bytes]

    def members(self, without: Sequence[str] = ()) -> dict[str, bytes]:
        """Every file by name (manifest and signature included), less ``without``."""
        out = {MANIFEST: self.manifest_json, SIGNATURE: self.signature, **self.files}
        return {n: b for n, b in out.items() if n not in without}

    def weights(self) -> Weights:
        """The model's parameters (weights.bin), as float32 arrays."""
        flat = np.frombuffer(self.files[WEIGHTS_FILE], dtype="<f4").astype(np.float32)
        return Weights.from_flat(flat, self.manifest.n_items, self.manifest.dim)

    def neighbours(self) -> Neighbours:
        """The item-item table (neighbours.bin): each item's K neighbours and weights."""
        return Neighbours.from_bytes(self.files[NEIGHBOURS_FILE], self.manifest.n_items,
                                     self.manifest.neighbours)


_LIMITS = {MANIFEST: MAX_MANIFEST_BYTES, SIGNATURE: 64}
# A deflated member may inflate to at most this many times its compressed size (bundle files
# deflate 1.5-8x: floats barely, the vocabulary most), or to INFLATE_FLOOR bytes, whichever is
# larger; more is a zip bomb: a few kilobytes that would fill a phone's memory.
MAX_INFLATE_RATIO = 100
INFLATE_FLOOR = 1 << 20
_READABLE = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # pack_members', and `zip -r`'s
_IGNORED_FOLDERS = ("__MACOSX/",)  # resource forks macOS's Finder adds to an archive


def _zip_prefix(infos: Sequence[zipfile.ZipInfo]) -> str:
    """Where the bundle's files are in the zip: at its root (pack_members), or in its one
    top-level folder (``zip -r bundle.zip bundle/``, or a file manager's "compress")."""
    # not ZipInfo.is_dir: it fails on an empty name (found by fuzzing)
    names = [i.filename for i in infos if not i.filename.endswith("/")
             and not i.filename.startswith(_IGNORED_FOLDERS)]
    if MANIFEST in names:
        return ""
    folders = {name.partition("/")[0] for name in names if "/" in name}
    if len(folders) == 1 and all("/" in name for name in names):
        return f"{folders.pop()}/"
    return ""


def _inflate(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, origin: str) -> bytes:
    """One member's bytes, read with a cap: its file's size limit and, deflated, at most
    MAX_INFLATE_RATIO times its compressed size. The sizes the zip declares are checked
    first; the read does not trust them and stops one byte past the cap."""
    limit = _LIMITS.get(name, MAX_FILE_BYTES)
    if info.compress_type not in _READABLE:
        raise BundleError(f"{origin}: {name} is compressed with zip method "
                          f"{info.compress_type}; a bundle's files are stored or deflated")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        cap = min(limit, max(INFLATE_FLOOR, MAX_INFLATE_RATIO * info.compress_size))
    else:
        cap = limit
    if info.file_size > limit:
        raise BundleError(f"{origin}: {name} is larger than a bundle file may be")
    if info.file_size > cap:
        raise BundleError(f"{origin}: {name} would inflate from {info.compress_size} to "
                          f"{info.file_size} bytes, over {MAX_INFLATE_RATIO} times: refused "
                          "as a zip bomb")
    with zf.open(info) as member:
        data = member.read(cap + 1)
    if len(data) > cap:
        raise BundleError(f"{origin}: {name} inflates past {cap} bytes, more than its "
                          "header says: refused as a zip bomb")
    return data


def _read_zip(source: Path | io.BytesIO, origin: str) -> dict[str, bytes]:
    """The bundle's files in a zip, by name, each read with a size cap (:func:`_inflate`):
    stored or deflated, at the root or under one top-level folder; other members ignored."""
    out: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
            prefix = _zip_prefix(infos)
            for info in infos:
                name = info.filename.removeprefix(prefix)  # other folders keep their "/"
                if name in (MANIFEST, SIGNATURE, *PAYLOAD_FILES):
                    out[name] = _inflate(zf, info, name, origin)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError, RuntimeError, struct.error, zlib.error) as exc:
        # RuntimeError: zipfile's "encrypted, password required" (found by fuzzing)
        raise BundleError(f"{origin}: cannot read the bundle ({exc})") from exc
    return out


def _read_members(path: Path) -> dict[str, bytes]:
    """The bundle's files by name, from a directory or a zip, each size-bounded."""
    if path.is_dir():
        out: dict[str, bytes] = {}
        for name in (MANIFEST, SIGNATURE, *PAYLOAD_FILES):
            member = path / name
            try:
                if member.is_file():
                    if member.stat().st_size > _LIMITS.get(name, MAX_FILE_BYTES):
                        raise BundleError(f"{path}: {name} is larger than a bundle file may be")
                    out[name] = member.read_bytes()
            except OSError as exc:
                raise BundleError(f"{path}: cannot read the bundle ({exc})") from exc
        return out
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle directory nor a zip")
    return _read_zip(path, str(path))


def pack_members(members: Mapping[str, bytes]) -> bytes:
    """A bundle's files (all, or the part a device lacks) as one zip, stored: ORT files and
    weights barely compress."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def unpack_members(data: bytes) -> dict[str, bytes]:
    """The files of a zip made by :func:`pack_members`, size-bounded; not yet verified."""
    return _read_zip(io.BytesIO(data), "received bundle")


def read_bundle(path: Path | str, verify_key: bytes, *,
                vocabulary_sha256: str | None = None,
                min_model_version: int | None = None) -> Bundle:
    """Verify and load a bundle directory or zip, or raise :class:`BundleError` saying why
    not (see :func:`verify_members`)."""
    path = Path(path)
    return verify_members(_read_members(path), verify_key, origin=str(path),
                          vocabulary_sha256=vocabulary_sha256,
                          min_model_version=min_model_version)


def verify_members(members: Mapping[str, bytes], verify_key: bytes, *, origin: str = "bundle",
                   lookup: Callable[[str], bytes | None] | None = None,
                   vocabulary_sha256: str | None = None,
                   min_model_version: int | None = None) -> Bundle:
    """Verify a bundle's files given by name, or raise :class:`BundleError` saying why not.

    ``verify_key`` is the aggregator's Ed25519 public key (32 bytes), pinned by the device.
    ``lookup`` finds a file ``members`` lacks by the sha256 the signed manifest gives (a
    device's store of files from earlier versions). ``vocabulary_sha256`` pins the catalog a
    device's stored carts refer to; ``min_model_version`` refuses a downgrade. ``origin``
    names the source in errors.
    """
    if MANIFEST not in members:
        raise BundleError(f"{origin}: no {MANIFEST}: not a bundle")
    if SIGNATURE not in members:
        raise BundleError(f"{origin}: unsigned bundle ({SIGNATURE} is missing)")
    if not signature_valid(verify_key, members[MANIFEST], members[SIGNATURE]):
        raise BundleError(f"{origin}: the signature does not verify with the pinned key "
                          "(tampered manifest, or signed by another key)")
    manifest = Manifest.from_json(members[MANIFEST])
    files: dict[str, bytes] = {}
    for name, expected in manifest.files.items():
        data = members.get(name)
        if data is None and lookup is not None:
            data = lookup(expected)
        if data is None:
            raise BundleError(f"{origin}: {name} is missing (truncated bundle)")
        files[name] = data
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise BundleError(f"{origin}: {name} is tampered or truncated (sha256 "
                              f"{actual[:16]}…, manifest says {expected[:16]}…)")
    if manifest.dim < 0:
        raise BundleError(f"{origin}: the manifest's d must be at least 0")
    n_params = n_parameters(manifest.n_items, manifest.dim)
    if len(files[WEIGHTS_FILE]) != 4 * n_params:
        raise BundleError(f"{origin}: weights.bin holds {len(files[WEIGHTS_FILE])} bytes, "
                          f"V = {manifest.n_items}, d = {manifest.dim} needs {4 * n_params}")
    if manifest.neighbours < 1:
        raise BundleError(f"{origin}: the manifest's K must be at least 1")
    try:  # size, rows and ids: the table must fit the catalog even under a valid signature
        Neighbours.from_bytes(files[NEIGHBOURS_FILE], manifest.n_items, manifest.neighbours)
    except ValueError as exc:
        raise BundleError(f"{origin}: {NEIGHBOURS_FILE} is malformed: {exc}") from exc
    if vocabulary_sha256 is not None and manifest.vocabulary_sha256 != vocabulary_sha256:
        raise BundleError(f"{origin}: the bundle is for another item vocabulary "
                          f"({manifest.vocabulary_sha256[:16]}…, expected "
                          f"{vocabulary_sha256[:16]}…)")
    if min_model_version is not None and manifest.model_version < min_model_version:
        raise BundleError(f"{origin}: model version {manifest.model_version} is older than "
                          f"the {min_model_version} already installed (downgrade refused)")
    items, names = _parse_vocabulary(files[VOCABULARY_FILE], manifest.n_items,
                                     manifest.vocabulary_sha256)
    return Bundle(manifest=manifest, manifest_json=bytes(members[MANIFEST]),
                  signature=bytes(members[SIGNATURE]), items=items, names=names, files=files)


def write_bundle(out_dir: Path | str, *, weights: Weights, neighbours: Neighbours,
                 items: Sequence[str], names: Sequence[str], graphs: Mapping[str, bytes],
                 model_version: int, round_id: int, history_decay: float,
                 signing_key: nacl.signing.SigningKey) -> Manifest:
    """Write a signed bundle atomically: into a temporary sibling directory, fsync'd, then
    renamed to ``out_dir``, which must not exist yet (bundles are immutable; a reader that
    switches between them renames a pointer). A crash leaves no partial ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: a bundle is never overwritten in place")
    if set(graphs) != set(GRAPH_FILES):
        raise ValueError(f"graphs must be exactly {GRAPH_FILES}, got {sorted(graphs)}")
    if not weights.n_items == neighbours.n_items == len(items) == len(names):
        raise ValueError("weights, table, items and names disagree on the catalog size")
    payload = {**graphs, VOCABULARY_FILE: _vocabulary_json(items, names),
               WEIGHTS_FILE: weights.flat().astype("<f4").tobytes(),
               NEIGHBOURS_FILE: neighbours.to_bytes()}
    manifest = Manifest(
        format=FORMAT_VERSION, model_version=model_version, round=round_id,
        n_items=weights.n_items, dim=weights.dim, neighbours=neighbours.k,
        vocabulary_sha256=vocabulary_digest(items),
        history_decay=history_decay,
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
        fsync_directory(tmp)
        os.rename(tmp, out_dir)
        fsync_directory(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
