"""The SecAgg+ neighbour graph (Bell et al. 2020): a random Harary-style regular graph.

Participants are shuffled by a Fisher-Yates permutation drawn from the round's graph seed
through the mask PRG (so every client and the server derive the same graph), then each is
joined to the k/2 nearest on either side of the shuffled ring. k is rounded up to even; k
>= n - 1 gives the complete graph (classic SecAgg). The pairwise mask sign is defined here,
once, for client and server alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from secagg.prg import keystream

__all__ = ["neighbours", "pairwise_sign"]


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds PRG(s_own,peer) to its input, -1 if it subtracts it: the lower id
    adds, so the two masks cancel in the sum."""
    return 1 if own < peer else -1


def _permutation(n: int, seed: bytes) -> np.ndarray:
    draws = np.frombuffer(keystream(seed, 8 * n), dtype="<u8")
    order = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(draws[i] % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def neighbours(participants: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset]:
    """Each participant's neighbours (not itself) for this round."""
    ids = sorted(participants)
    n = len(ids)
    if degree < 1:
        raise ValueError(f"degree must be at least 1, got {degree}")
    if degree >= n - 1:
        return {u: frozenset(ids) - {u} for u in ids}
    half = (degree + 1) // 2
    ring = [ids[i] for i in _permutation(n, seed)]
    out: dict[int, set[int]] = {u: set() for u in ids}
    for pos, u in enumerate(ring):
        for step in range(1, half + 1):
            v = ring[(pos + step) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: frozenset(vs) for u, vs in out.items()}
