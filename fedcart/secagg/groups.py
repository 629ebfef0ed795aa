"""A whole-population round as groups: the cohort split at random into groups of bounded
size, each its own SecAgg+ round (``ServerRound``), whose sums add up.

One device short of shares fails the round it is in. In one round over every device that
is everyone's round; split into groups, it is one group's, and the round completes with the
others (the failed group's devices count as dropped, which a fixed denominator q N already
allows). A group is also the unit that aggregation sharded across processes distributes.

What the server learns is each surviving group's sum rather than the cohort's: a group's
sum is over at least t of its members (``ServerRound`` fails a group with fewer), so the
smallest group a device's privacy policy tolerates follows from the anonymity it asks for
(``secagg.params.minimum_group``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from fedcart.secagg.graph import shuffled
from fedcart.secagg.params import groups_for

__all__ = ["split_cohort"]


def split_cohort(ids: Sequence[int], group_size: int,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> list[tuple[int, ...]]:
    """``ids`` in a random order (from ``random_bytes``, the OS CSPRNG by default), cut into
    the fewest groups of at most ``group_size``; sizes differ by at most one. Each group is
    sorted."""
    if len(set(ids)) != len(ids):
        raise ValueError("client ids must be distinct")
    if not ids:
        return []
    order = shuffled(sorted(ids), random_bytes(32))
    parts = np.array_split(np.asarray(order, dtype=np.int64), groups_for(len(ids), group_size))
    return [tuple(sorted(int(i) for i in part)) for part in parts]
