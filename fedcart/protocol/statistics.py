"""What a device contributes to the aggregator's statistics rounds: summaries of its own
baskets that are summed under secure aggregation and noised before anyone sees them.

- ``popularity``: for each catalog item, 1 if the user ever bought it (length V).
- ``cooccurrence``: over the round's ``head`` (M catalog items, the most popular by the noised
  popularity statistic), for each pair of head positions a <= b, 1 if the user bought both in
  one basket (a == b: bought a). The packed upper triangle, row by row: M (M + 1) / 2 values.

Counting users rather than baskets gives every user the same voice (a wholesale customer's
hundred invoices count once), and each contribution is clipped on the device (L2, or L1 for
the Laplace mechanism) so one user moves the sum by at most C: the sensitivity the DP noise is
calibrated to. Contributions are sparse: a device densifies its own only to mask it, and
central computations sum them sparsely. Only numpy: a device imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcart.protocol.terms import Norm, Task
from fedcart.protocol.update import clip

__all__ = ["COOCCURRENCE", "MAX_HEAD", "POPULARITY", "STATISTICS", "Contribution",
           "check_head", "contribution", "cooccurrence", "pair_index", "popularity",
           "popularity_bias", "sum_contributions", "triangle_size"]

POPULARITY = Task.POPULARITY
COOCCURRENCE = Task.COOCCURRENCE
STATISTICS = (POPULARITY, COOCCURRENCE)
MAX_HEAD = 4096  # M (M + 1) / 2 = 8.4 M values (34 MB masked): the most a device will send


def triangle_size(m: int) -> int:
    return m * (m + 1) // 2


def check_head(head: object, n_items: int) -> np.ndarray:
    """A round's head items as sent by the server, checked: 2 to MAX_HEAD distinct catalog
    ids. A device refuses a round whose head is anything else (ValueError)."""
    if not isinstance(head, list) or not 2 <= len(head) <= MAX_HEAD or \
            not all(isinstance(i, int) and not isinstance(i, bool) for i in head):
        raise ValueError(f"a co-occurrence round names 2 to {MAX_HEAD} head item ids")
    ids = np.asarray(head, np.int64)
    if ids.min() < 0 or ids.max() >= n_items or len(np.unique(ids)) != len(ids):
        raise ValueError(f"head item ids must be distinct and lie in [0, {n_items})")
    return ids


def pair_index(a: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    """Position of pair (a, b), a <= b < m, in the packed upper triangle."""
    a = np.asarray(a, np.int64)
    return a * m - a * (a - 1) // 2 + (np.asarray(b, np.int64) - a)


@dataclass(frozen=True)
class Contribution:
    """A sparse vector of length ``size``: distinct ascending ``indices`` and their values."""

    indices: np.ndarray
    values: np.ndarray
    size: int

    def dense(self) -> np.ndarray:
        out = np.zeros(self.size, np.float64)
        out[self.indices] = self.values
        return out


def _clipped(indices: np.ndarray, size: int, clip_norm: float, norm: Norm) -> Contribution:
    values, _ = clip(np.ones(len(indices)), clip_norm, norm)
    return Contribution(indices, values, size)


def popularity(baskets: Sequence[np.ndarray], n_items: int, clip_norm: float,
               norm: Norm = Norm.L2) -> Contribution:
    """The items this user ever bought (catalog ids), clipped."""
    bought = (np.unique(np.concatenate(baskets)).astype(np.int64) if len(baskets)
              else np.zeros(0, np.int64))
    return _clipped(bought, n_items, clip_norm, norm)


def cooccurrence(baskets: Sequence[np.ndarray], head: np.ndarray, n_items: int,
                 clip_norm: float, norm: Norm = Norm.L2) -> Contribution:
    """The pairs of ``head`` items this user bought together in some basket, clipped."""
    m = len(head)
    position = np.full(n_items, -1, np.int64)
    position[head] = np.arange(m)
    pairs = []
    for basket in baskets:
        at = position[basket]
        at = np.sort(at[at >= 0])
        first, second = np.triu_indices(len(at))
        pairs.append(pair_index(at[first], at[second], m))
    indices = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, np.int64)
    return _clipped(indices, triangle_size(m), clip_norm, norm)


def contribution(statistic: str, baskets: Sequence[np.ndarray], n_items: int,
                 clip_norm: float, norm: Norm = Norm.L2,
                 head: np.ndarray | None = None) -> Contribution:
    """One user's contribution to ``statistic`` (a round's task)."""
    if statistic == POPULARITY:
        return popularity(baskets, n_items, clip_norm, norm)
    if statistic == COOCCURRENCE:
        if head is None:
            raise ValueError("a co-occurrence statistic needs its head items")
        return cooccurrence(baskets, head, n_items, clip_norm, norm)
    raise ValueError(f"unknown statistic {statistic!r}; expected one of {STATISTICS}")


def sum_contributions(statistic: str, users: Sequence[Sequence[np.ndarray]], n_items: int,
                      clip_norm: float, norm: Norm = Norm.L2,
                      head: np.ndarray | None = None) -> np.ndarray:
    """The exact sum of ``users``' contributions: what secure aggregation reveals before any
    noise (central training and the tests' oracle)."""
    total: np.ndarray | None = None
    for baskets in users:
        part = contribution(statistic, baskets, n_items, clip_norm, norm, head)
        if total is None:
            total = np.zeros(part.size, np.float64)
        total[part.indices] += part.values
    if total is None:
        raise ValueError("no users to sum")
    return total


def popularity_bias(total: np.ndarray) -> np.ndarray:
    """The model's bias from a (noised) popularity sum: log(1 + count), the softmax's
    optimum for an empty cart up to a constant."""
    return np.log1p(np.maximum(np.asarray(total, np.float64), 0.0)).astype(np.float32)
