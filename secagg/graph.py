"""The SecAgg+ neighbour graph (Bell et al. 2020): a random Harary-style regular graph.

Participants are put in a random ring order drawn from the round's graph seed through the
mask PRG (so every client and the server derive the same graph), then each is joined to the
k/2 nearest on either side of the ring. k is rounded up to even; k
>= n - 1 gives the complete graph (classic SecAgg). The pairwise mask sign is defined here,
once, for client and server alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from secagg.prg import keystream

__all__ = ["neighbours", "neighbours_of", "pairwise_sign", "shuffled"]


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds PRG(s_own,peer) to its input, -1 if it subtracts it: the lower id
    adds, so the two masks cancel in the sum."""
    return 1 if own < peer else -1


def shuffled(ids: Sequence[int], seed: bytes) -> list[int]:
    """``ids`` in a random order: sorted by 64-bit keys drawn from the seed."""
    keys = np.frombuffer(keystream(seed, 8 * len(ids)), dtype="<u8")
    return [ids[i] for i in np.argsort(keys, kind="stable")]


def _check(n: int, degree: int) -> None:
    if degree < 1:
        raise ValueError(f"degree must be at least 1, got {degree}")
    if n < 2:
        raise ValueError("a round needs at least two participants")


def neighbours_of(participants: Sequence[int], degree: int, seed: bytes,
                  node: int) -> frozenset[int]:
    """One participant's neighbours: what a client needs, in O(n log n) vectorized work
    rather than the whole graph's O(n k)."""
    ids = sorted(participants)
    _check(len(ids), degree)
    if degree >= len(ids) - 1:
        return frozenset(ids) - {node}
    ring = shuffled(ids, seed)
    pos, half, n = ring.index(node), (degree + 1) // 2, len(ids)
    return frozenset(ring[(pos + step) % n] for step in range(-half, half + 1) if step)


def neighbours(participants: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset]:
    """Every participant's neighbours (not itself): what the server needs."""
    ids = sorted(participants)
    _check(len(ids), degree)
    if degree >= len(ids) - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    ring = shuffled(ids, seed)
    half, n = (degree + 1) // 2, len(ids)
    return {u: frozenset(ring[(pos + step) % n] for step in range(-half, half + 1) if step)
            for pos, u in enumerate(ring)}
