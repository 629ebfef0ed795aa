"""How much memory this machine offers, and the budget the central O(V^2) steps (the EASE
and co-occurrence baselines) size themselves by.

A central step gets at most CENTRAL_CAP, and at most half of what is available when it
starts: the other half is left to the rest of the process (the split, the evaluation's
score matrices) and to whatever else runs. ``FEDCART_MEMORY_AVAILABLE`` (bytes) overrides
what is read from the system: the tests and a user who shares the machine set it.
"""

from __future__ import annotations

import os

__all__ = ["AVAILABLE_ENV", "CENTRAL_CAP", "available_bytes", "central_budget", "gigabytes"]

AVAILABLE_ENV = "FEDCART_MEMORY_AVAILABLE"
# 4 GiB: EASE over 16,384 items (two dense float64 copies), so the bundled catalogs (UCI
# 3,644 items, Instacart 13,880) keep their full-catalog baselines
CENTRAL_CAP = 4 << 30
CENTRAL_SHARE = 0.5


def available_bytes() -> int:
    """Memory available to a new allocation: ``FEDCART_MEMORY_AVAILABLE`` if set, else
    MemAvailable of /proc/meminfo (free memory plus what the kernel can reclaim), else the
    free physical pages."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError as exc:
            raise ValueError(f"{AVAILABLE_ENV}={override!r} is not a number of bytes") from exc
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def central_budget() -> int:
    """Bytes one central O(V^2) step may hold at once (see module doc)."""
    return min(CENTRAL_CAP, int(available_bytes() * CENTRAL_SHARE))


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"
