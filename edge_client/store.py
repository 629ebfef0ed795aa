"""The device's local state: its identity, its purchase history (bounded), and the current
model bundle, swapped atomically. Nothing here ever leaves the device except through the
secure-aggregation client.

Layout of the state directory:
    device.db        SQLite: baskets (newest MAX_BASKETS kept), settings
    bundles/         verified bundle zips, named by version and manifest hash
    current          the name of the bundle in use (replaced by rename: never half-written)
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

__all__ = ["MAX_BASKETS", "DeviceStore"]

MAX_BASKETS = 500


class DeviceStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        (self.dir / "bundles").mkdir(parents=True, exist_ok=True)
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
        distinct = sorted(set(items))
        if not distinct:
            raise ValueError("a basket needs at least one item")
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO baskets (at, items) VALUES (?, ?)",
                        (time.time() if at is None else at, json.dumps(distinct)))
        self.db.execute("DELETE FROM baskets WHERE id NOT IN (SELECT id FROM baskets "
                        "ORDER BY at DESC, id DESC LIMIT ?)", (MAX_BASKETS,))
        self.db.execute("COMMIT")

    def baskets(self) -> list[list[str]]:
        """Purchase history, oldest first."""
        return [json.loads(r[0]) for r in
                self.db.execute("SELECT items FROM baskets ORDER BY at, id")]

    # -- bundles -------------------------------------------------------------------------
    def current_bundle(self) -> Path | None:
        pointer = self.dir / "current"
        if not pointer.exists():
            return None
        path = self.dir / "bundles" / pointer.read_text().strip()
        return path if path.is_file() else None

    def install_bundle(self, data: bytes, version: int, digest: str) -> Path:
        """Write verified bundle bytes and switch to them: temp file, fsync, rename, then the
        pointer the same way. A crash leaves the old bundle or the new one in use."""
        name = f"v{version:08d}-{digest[:16]}.zip"
        target = self.dir / "bundles" / name
        _write_atomically(target, data)
        _write_atomically(self.dir / "current", name.encode())
        for old in (self.dir / "bundles").iterdir():
            if old.name != name and not old.name.startswith("."):
                old.unlink()
        return target


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
