"""Files written whole or not at all: a crash leaves the old file or the new one, never part
of one. Used for everything the project persists outside SQLite: keys, bundle files, packed
bundles, reports."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_directory", "write_atomically"]


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path``: into a uniquely named temporary sibling (another process
    may be writing the same path), fsync'd, renamed over ``path``, then the directory
    fsync'd so that the rename itself survives a power loss. ``mode``: the file's
    permissions (0o600 for a private key)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (a file renamed into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
