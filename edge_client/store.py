"""The device's local state: its identity, its purchase history (bounded), and the current
model bundle, swapped atomically. Nothing here ever leaves the device except through the
secure-aggregation client.

Layout of the state directory:
    device.db        SQLite: baskets (newest MAX_BASKETS kept), settings
    blobs/           bundle files named by their sha256 (written whole: temp, fsync, rename)
    current          JSON {file name: sha256} of the bundle in use, replaced by rename, so
                     it names the old bundle or the new one, never a mix

Blobs are content-addressed, so one blob directory may serve several device profiles on a
host (the simulation's devices share one per worker: each model version is stored once). A
private blob directory keeps only the current bundle's files; a shared one is never pruned
by a device. Whatever is read back is verified again against the signed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MAX_BASKETS", "DeviceStore"]

MAX_BASKETS = 500
_DIGEST = re.compile(r"[0-9a-f]{64}")


class DeviceStore:
    def __init__(self, state_dir: Path, blob_dir: Path | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shared_blobs = blob_dir is not None
        self.blobs = Path(blob_dir) if blob_dir is not None else self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / "device.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS baskets (
                id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, items TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """)

    def close(self) -> None:
        self.db.close()

    # -- settings ------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) "
                        "DO UPDATE SET value = excluded.value", (key, value))

    # -- purchase history ----------------------------------------------------------------
    def add_basket(self, items: list[str], at: float | None = None) -> None:
        """Record a purchased basket (distinct item ids); the oldest beyond MAX_BASKETS go."""
        self.add_baskets([items], None if at is None else [at])

    def add_baskets(self, baskets: list[list[str]], at: list[float] | None = None) -> None:
        """Record several baskets, oldest first, in one transaction (an app importing its
        order history)."""
        rows = [sorted(set(items)) for items in baskets]
        if any(not row for row in rows):
            raise ValueError("a basket needs at least one item")
        now = time.time()
        times = at if at is not None else [now] * len(rows)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO baskets (at, items) VALUES (?, ?)",
                            [(t, json.dumps(row)) for t, row in zip(times, rows, strict=True)])
        self.db.execute("DELETE FROM baskets WHERE id NOT IN (SELECT id FROM baskets "
                        "ORDER BY at DESC, id DESC LIMIT ?)", (MAX_BASKETS,))
        self.db.execute("COMMIT")

    def baskets(self) -> list[list[str]]:
        """Purchase history, oldest first."""
        return [json.loads(r[0]) for r in
                self.db.execute("SELECT items FROM baskets ORDER BY at, id")]

    # -- bundles -------------------------------------------------------------------------
    def blob(self, digest: str) -> bytes | None:
        """A stored file by sha256 (hex), or None."""
        if not _DIGEST.fullmatch(digest):
            return None
        try:
            return (self.blobs / digest).read_bytes()
        except OSError:
            return None

    def has_blob(self, digest: str) -> bool:
        return bool(_DIGEST.fullmatch(digest)) and (self.blobs / digest).is_file()

    def current_files(self) -> dict[str, str]:
        """{file name: sha256} of the bundle in use; empty when there is none."""
        try:
            pointer = json.loads((self.dir / "current").read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(pointer, dict):
            return {}
        return {str(k): str(v) for k, v in pointer.items()}

    def install_bundle(self, files: Mapping[str, bytes],
                       known: Mapping[str, str] | None = None) -> None:
        """Store verified bundle files and switch to them: each blob whole (temp, fsync,
        rename), then the pointer the same way. A crash leaves the old bundle or the new one
        in use. ``known``: sha256 of files already hashed during verification."""
        known = known or {}
        digests = {name: known.get(name) or hashlib.sha256(data).hexdigest()
                   for name, data in files.items()}
        for name, digest in digests.items():
            if not (self.blobs / digest).is_file():
                _write_atomically(self.blobs / digest, files[name])
        _write_atomically(self.dir / "current", json.dumps(digests, sort_keys=True).encode())
        if not self.shared_blobs:
            keep = set(digests.values())
            for old in self.blobs.iterdir():
                if old.name not in keep and not old.name.startswith("."):
                    old.unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file (a unique name: another process may write the same blob), fsync, rename,
    fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
