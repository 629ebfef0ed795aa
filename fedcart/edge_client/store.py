"""The device's local state: its identity, its purchase history (bounded), and the current
model bundle, swapped atomically. Nothing here ever leaves the device except through the
secure-aggregation client.

Layout of the state directory:
    device.db        SQLite: baskets (newest MAX_BASKETS kept), settings
    blobs/           bundle files named by their sha256 (written whole: temp, fsync, rename)
    current          JSON {file name: sha256} of the bundle in use, replaced by rename, so
                     it names the old bundle or the new one, never a mix

No file stays open between uses: each call opens the database and closes it, so a process
can hold any number of idle stores (a simulation's worker held three descriptors a device,
device.db and its -wal and -shm, and ran out at 6,662 devices). The database stays in WAL
mode with synchronous=FULL: a write is on disk when its call returns. The price: a read
opens a connection (0.2-0.3 ms, against 10 us on a held one), and a write, closing the last
connection, checkpoints and removes the WAL (5 syncs instead of 1). A round's session makes
about 8 calls, one of them a write (``put`` writes only a changed value); ``opened()``
shares one connection across a block of calls, as setting a device up does.

Blobs are content-addressed, so one blob directory may serve several device profiles on a
host (the simulation's devices share one per worker: each model version is stored once). A
private blob directory keeps only the current bundle's files; a shared one is never pruned
by a device. Whatever is read back is verified again against the signed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from fedcart.atomic_write import write_atomically

__all__ = ["MAX_BASKETS", "DeviceStore"]

MAX_BASKETS = 500
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SCHEMA = """
    CREATE TABLE IF NOT EXISTS baskets (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, items TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class DeviceStore:
    """A device's state directory; the database is opened for each use (see above)."""

    def __init__(self, state_dir: Path, blob_dir: Path | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shared_blobs = blob_dir is not None
        self.blobs = Path(blob_dir) if blob_dir is not None else self.dir / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._path = self.dir / "device.db"
        self._ready = False  # the schema is made by the first use (see _db)
        # (thread, connection) of the open ``opened()`` block, if any
        self._held: tuple[int, sqlite3.Connection] | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        """Hold one connection for the block: the calls made in it from this thread share
        it (one open, and one checkpoint at the end, instead of one each); a nested block
        shares the outer one, and other threads open their own per call."""
        if self._held is not None:
            yield
            return
        with self._db() as db:
            self._held = (threading.get_ident(), db)
            try:
                yield
            finally:
                self._held = None

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection of this thread's ``opened()`` block, or one for this use alone
        (autocommit: each statement outside BEGIN is its own durable transaction)."""
        held = self._held
        if held is not None and held[0] == threading.get_ident():
            yield held[1]
            return
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")  # per connection: each commit is on disk
            if not self._ready:
                db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
                db.executescript(_SCHEMA)
                self._ready = True
            yield db
        finally:
            db.close()

    # -- settings ------------------------------------------------------------------------
    def get(self, key: str) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, value: str) -> None:
        """Set ``key``; writes (and syncs) only if its value changes: a session puts the
        round's id at each of the round's messages."""
        with self._db() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) "
                       "DO UPDATE SET value = excluded.value WHERE value <> excluded.value",
                       (key, value))

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
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO baskets (at, items) VALUES (?, ?)",
                               [(t, json.dumps(row))
                                for t, row in zip(times, rows, strict=True)])
                db.execute("DELETE FROM baskets WHERE id NOT IN (SELECT id FROM baskets "
                           "ORDER BY at DESC, id DESC LIMIT ?)", (MAX_BASKETS,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def baskets(self) -> list[list[str]]:
        """Purchase history, oldest first."""
        with self._db() as db:
            rows = db.execute("SELECT items FROM baskets ORDER BY at, id").fetchall()
        return [json.loads(r[0]) for r in rows]

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
                write_atomically(self.blobs / digest, files[name])
        write_atomically(self.dir / "current", json.dumps(digests, sort_keys=True).encode())
        if not self.shared_blobs:
            keep = set(digests.values())
            for old in self.blobs.iterdir():
                if old.name not in keep and not old.name.startswith("."):
                    old.unlink(missing_ok=True)



