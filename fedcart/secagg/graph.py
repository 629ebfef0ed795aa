"""The SecAgg+ neighbour graph (Bell et al. 2020): a random Harary-style regular graph over
the clients that advertised keys, from a seed no one party picks.

Participants are put in a random ring order drawn from the graph seed through the mask PRG
(so every client and the server derive the same graph), then each is joined to the k/2
nearest on either side of the ring. k is rounded up to even; k >= n - 1 gives the complete
graph (classic SecAgg). The pairwise mask sign is defined here, once, for client and server
alike.

The seed. The graph is not known when the round is configured: :func:`graph_seed` hashes
(SHA-256, domain-separated) the server-signed round config and every advertisement of the
ADVERTISE phase (sorted by sender: id, share key, mask key, signature), and the graph is
drawn over the advertisers. The server sends every advertiser all the advertisements, so
each recomputes the seed; a client refuses a list in which its own advertisement is missing
or altered, or that names a non-participant, and checks the signature of every neighbour it
gets (it needs their keys). The seed is part of the survivor-set statement the clients sign
(``messages.consistency_statement``), so the clients that reveal shares have all computed
the same seed: a server that shows different lists to different clients gets shares only
from those that saw the one list a consistency quorum signed.

What is left: grinding. The server still chooses among seeds, by trying. A server that
controls corrupt participants can draw their ephemeral keys again (and have them signed),
leave honest advertisers out of the list (they then count as dropped), or put a made-up
advertisement in it for a client that is not the target's neighbour (only that client's
neighbours check its signature), and hash again. Each try costs one SHA-256 over the list
(n x 132 bytes, or only its tail after a precomputed midstate) and 8n bytes of ChaCha20
keystream to see where the target lands in the ring: microseconds on one core, far less on
dedicated hardware. Each gives an independent, uniformly random ring over the
advertisers. Per try, with a fraction p of the participants corrupt, the chance that a
given honest target's k neighbours are all corrupt (it is isolated) is about p^k, and that
at least 2t - k of them are (its input is exposed through shares) about
P[Bin(k, p) >= 2t - k]; the graph term of ``secagg.params`` (k/2 consecutive ring neighbours
all corrupt or dropped) is likewise per ring drawn. So the disclosure bound
``secagg.params.choose`` meets must be read per try: a server that makes T tries between
the last honest advertisement and the next phase's deadline succeeds with probability up to
T times the bound (2^-40 per try against 2^30 tries is 2^-10). Against a grinding server
only per-try bounds far below one over the tries it can afford mean anything. With no
corrupt participant no try helps: an honest neighbour holds its shares faithfully wherever
the ring puts it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

import numpy as np

from fedcart.secagg.messages import AdvertiseKeys, RoundConfig
from fedcart.secagg.prg import keystream

__all__ = ["effective_degree", "graph_seed", "neighbours", "neighbours_of", "pairwise_sign",
           "shuffled"]

_SEED_DOMAIN = b"fedcart/secagg/v2/graph-seed"


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds PRG(s_own,peer) to its input, -1 if it subtracts it: the lower id
    adds, so the two masks cancel in the sum."""
    return 1 if own < peer else -1


def effective_degree(n: int, degree: int) -> int:
    """How many neighbours each of n clients has for a requested ``degree``: rounded up to
    even, at most n - 1 (the complete graph)."""
    return min(n - 1, degree + degree % 2)


def graph_seed(config: RoundConfig, adverts: Iterable[AdvertiseKeys]) -> bytes:
    """SHA-256 over the domain, the signed part of ``config`` (length-prefixed) and the
    advertisements sorted by sender, each as sender u32, share key, mask key, signature.
    Computed the same way by the server and every client; no party picks it alone."""
    h = hashlib.sha256(_SEED_DOMAIN)
    signed = config.signed_part()
    h.update(struct.pack("<I", len(signed)))
    h.update(signed)
    ordered = sorted(adverts, key=lambda a: a.sender)
    h.update(struct.pack("<I", len(ordered)))
    for a in ordered:
        h.update(struct.pack("<I", a.sender) + a.share_key + a.mask_key + a.signature)
    return h.digest()


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
