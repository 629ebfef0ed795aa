"""The process's open-file limit: every websocket connection is a file, on both ends."""

from __future__ import annotations

import contextlib
import resource

__all__ = ["raise_open_file_limit"]


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard one (as far as the kernel
    allows); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel caps lower
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft
