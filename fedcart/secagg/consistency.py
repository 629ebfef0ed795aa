"""The consistency check (Bonawitz et al., CCS 2017, section 6): a survivor set is accepted
only with valid signatures over that exact set from a quorum of the round's participants.

The quorum is more than (n + c) / 2 distinct participants, where n is the number of
participants in the signed round config and c the number of corrupt ones the round
tolerates (``RoundConfig.corrupt``). An honest client signs one survivor set per round, so
two different sets S and S' each signed by a quorum share more than (n + c) / 2 * 2 - n = c
signers, at least one of them honest: impossible. A server therefore cannot show one
neighbour of a target "the target survived" (and collect shares of its self-mask seed)
while showing others "the target's neighbours dropped" (and collect shares of their masking
keys): only the one set a quorum signed ever unlocks shares.

The argument counts identities: it holds if the identity keys in the signed config belong
to n distinct devices of which at most c are corrupt. The server supplies those keys, and a
device can check only its own; a server that invents identities (sybils) beyond c defeats
it, and no check inside a round can tell. That needs the keys vouched for outside the round
(a registry or transparency log the devices trust).

With only t signatures required (wire version 1 of this package; Flower's SecAgg+ has no
consistency step at all) each of several sets can be vouched for by its own t clients:
the attack this check stops. The price is a larger unmask request (a
quorum of 64-byte signatures) and about n / 2 Ed25519 verifications per client, and a round
needs more than (n + c) / 2 survivors that sign.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedcart.secagg.crypto import verify
from fedcart.secagg.errors import ProtocolViolation

__all__ = ["check_quorum", "corrupt_count", "quorum"]


def quorum(n: int, corrupt: int) -> int:
    """The fewest signers of a survivor set that prove it: the smallest integer greater
    than (n + corrupt) / 2."""
    if n < 1 or not 0 <= corrupt < n:
        raise ValueError(f"need n >= 1 and 0 <= corrupt < n, got n={n}, corrupt={corrupt}")
    return (n + corrupt) // 2 + 1


def corrupt_count(n: int, fraction: float) -> int:
    """c for a corrupt ``fraction`` of n participants: ceil(fraction * n), forgiving float
    error (0.07 * 100 is 7.000000000000001 in binary floating point, and must give 7). The
    server's ``corrupt`` and a device's ``min_corrupt_fraction`` both count this way."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a corrupt fraction lies in [0, 1), got {fraction}")
    return max(0, math.ceil(fraction * n - 1e-9))


def check_quorum(identity_of: Mapping[int, bytes], statement: bytes,
                 survivors: frozenset[int] | set[int], signers: Sequence[int],
                 signatures: Sequence[bytes], need: int) -> None:
    """Raise ProtocolViolation unless at least ``need`` distinct survivors signed
    ``statement``: the first ``need`` signatures are verified (valid ones from distinct
    survivors prove the set; the rest, if any, are not looked at)."""
    if len(signers) != len(signatures):
        raise ProtocolViolation("signers and signatures differ in number")
    if len(set(signers)) < need or not set(signers) <= survivors:
        raise ProtocolViolation(f"{len(set(signers))} survivors vouch for the survivor set, "
                                f"the consistency quorum is {need}; or a signer is not a "
                                "survivor")
    seen: set[int] = set()
    for signer, signature in zip(signers, signatures, strict=True):
        if len(seen) == need:
            break
        if signer in seen:
            continue
        verify(identity_of[signer], statement, signature,
               f"client {signer}'s survivor-set signature")
        seen.add(signer)
