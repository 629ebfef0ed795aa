"""Federated evaluation: what a device sends in an evaluation round, and what the aggregator
concludes from the noised sum of many.

A device scores the model it holds on one query drawn from its own newest basket as the
evaluation protocol draws a test query (fedcart/data/evaluation.py): one item of the basket is
hidden, the rest is the cart, the earlier baskets are the history blended in, and the hidden
item's rank over the catalog (cart excluded, ties in its favour) gives its HitRate@10,
NDCG@10 and reciprocal rank. Which item is hidden follows from the basket alone (SHA-256 of
its catalog ids), so a central evaluation of the same baskets hides the same items: the
federated estimate and the central figure are of the same quantity.

The device's contribution is :data:`SLOTS`, eight values in [0, 1]: a count, each metric,
the squares that give the metrics' spread, and the repeat split (the hidden item bought
before). Its L2 norm is at most :data:`CLIP`, so clipping at :data:`CLIP` changes no honest
contribution and bounds a lying one. Summed under secure aggregation and noised, the totals
give each metric as a ratio of two noised sums, with a confidence interval for sampling
(Poisson at q, finite population) and for the noise (:func:`estimate`). Only numpy and the
standard library: a device imports this module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

import numpy as np

__all__ = ["CLIP", "CONFIDENCE", "SLOTS", "TOP_K", "Estimate", "Interval", "Query", "Slot",
           "contribution", "estimate", "metric_values", "query_of", "rank_of_hidden"]

TOP_K = 10
CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 0.975 quantile: a two-sided 95% interval


class Slot(IntEnum):
    """The entries of a device's contribution, in order."""

    COUNT = 0  # 1: the device had a query
    HIT = 1  # HitRate@10 (0 or 1; its square is itself)
    NDCG = 2
    NDCG_SQUARED = 3
    RR = 4  # reciprocal rank
    RR_SQUARED = 5
    REPEAT = 6  # 1: the hidden item was in the device's earlier baskets
    REPEAT_HIT = 7  # a hit on such a query


SLOTS = len(Slot)
CLIP = math.sqrt(SLOTS)  # the largest L2 norm of an honest contribution (every entry <= 1)


@dataclass(frozen=True)
class Query:
    """One user's evaluation query: the history (earlier baskets, oldest first), the cart
    and the hidden item, as catalog ids."""

    history: tuple[np.ndarray, ...]
    cart: np.ndarray
    hidden: int

    @property
    def repeat(self) -> bool:
        return any(self.hidden in basket for basket in self.history)


def query_of(baskets: Sequence[np.ndarray]) -> Query | None:
    """The query of a user whose baskets (catalog ids, oldest first) are ``baskets``: the
    newest basket with one item hidden, chosen by SHA-256 of the basket's distinct ids in
    ascending order; None when that basket has fewer than two items (the protocol skips
    it)."""
    if not baskets:
        return None
    newest = np.unique(np.asarray(baskets[-1], np.int64))
    if len(newest) < 2:
        return None
    digest = hashlib.sha256(b"fedcart evaluation query" + newest.astype("<i8").tobytes())
    hidden = int(newest[int.from_bytes(digest.digest()[:8], "little") % len(newest)])
    return Query(tuple(np.asarray(b, np.int64) for b in baskets[:-1]),
                 newest[newest != hidden], hidden)


def rank_of_hidden(scores: np.ndarray, cart: np.ndarray, hidden: int) -> float:
    """1-based rank of ``hidden`` among the items outside ``cart`` by ``scores`` (one per
    catalog item), ties in its favour; ``inf`` where it has no score (-inf: never
    recommended)."""
    target = float(scores[hidden])
    if target == -math.inf:
        return math.inf
    above = scores > target
    above[np.asarray(cart, np.int64)] = False
    return 1.0 + float(np.count_nonzero(above))


def metric_values(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HitRate@10, NDCG@10 and reciprocal rank of each of ``ranks`` (``inf``: a miss)."""
    ranks = np.asarray(ranks, np.float64)
    hit = ranks <= TOP_K
    return (hit.astype(np.float64), hit / np.log2(np.where(hit, ranks, 1.0) + 1.0),
            1.0 / ranks)


def contribution(rank: float, repeat: bool) -> np.ndarray:
    """A device's :data:`SLOTS` values for a query whose hidden item ranked ``rank``."""
    hit, ndcg, rr = (float(v[0]) for v in metric_values(np.array([rank])))
    values = np.zeros(SLOTS, np.float64)
    values[[Slot.COUNT, Slot.HIT, Slot.NDCG, Slot.NDCG_SQUARED, Slot.RR, Slot.RR_SQUARED,
            Slot.REPEAT, Slot.REPEAT_HIT]] = (1.0, hit, ndcg, ndcg * ndcg, rr, rr * rr,
                                              float(repeat), hit * float(repeat))
    return values


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence interval, clipped to [0, 1]."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Estimate:
    """What an evaluation round tells about one model version: its HitRate@10, NDCG@10 and
    MRR with their :data:`CONFIDENCE` intervals, HitRate@10 on repeat and explore queries,
    the (noised) number of queries, and the noise's standard deviation per sum."""

    model_version: int
    queries: float
    hr: Interval
    ndcg: Interval
    mrr: Interval
    repeat_hr: Interval
    explore_hr: Interval
    noise_std: float
    sampling_rate: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Estimate:
        intervals = {k: Interval(**raw[k])
                     for k in ("hr", "ndcg", "mrr", "repeat_hr", "explore_hr")}
        return cls(model_version=int(raw["model_version"]), queries=float(raw["queries"]),
                   noise_std=float(raw["noise_std"]),
                   sampling_rate=float(raw["sampling_rate"]), **intervals)


def _ratio(total: float, squares: float, count: float, noise_std: float,
           sampling_rate: float, rounding: float) -> Interval:
    """total / count with its interval. Its variance: sampling, (1 - q) s^2 / n with s^2 the
    values' spread from the sum of squares (a finite population: at q = 1 every device is
    in and only the noise varies), plus the noise's on the ratio by the delta method,
    sigma^2 (1 + p^2) / n^2. The sums' rounding, at most ``rounding`` each, moves the ratio
    by at most rounding (1 + p) / n: added to the half-width whole."""
    if count < 1:
        return Interval(math.nan, 0.0, 1.0)
    p = min(max(total / count, 0.0), 1.0)
    spread = min(max(squares / count - p * p, 0.0), p * (1.0 - p))
    variance = (1.0 - sampling_rate) * spread / count \
        + noise_std * noise_std * (1.0 + p * p) / (count * count)
    half = _Z * math.sqrt(variance) + rounding * (1.0 + p) / count
    return Interval(p, max(p - half, 0.0), min(p + half, 1.0))


def estimate(model_version: int, totals: np.ndarray, noise_std: float,
             sampling_rate: float, rounding: float = 0.0) -> Estimate:
    """The estimate from an evaluation round's noised sums (:data:`SLOTS` values, in the
    values' units), the noise's standard deviation in each, the round's q, and a bound on
    each sum's fixed-point rounding (the inputs' count over the scale), which widens the
    intervals by what it can move a ratio."""
    t = np.asarray(totals, np.float64)
    if t.shape != (SLOTS,):
        raise ValueError(f"an evaluation sum has {SLOTS} values, got shape {t.shape}")

    def ratio(total: Slot, squares: Slot, count: Slot) -> Interval:
        return _ratio(t[total], t[squares], t[count], noise_std, sampling_rate, rounding)

    count, repeats = float(t[Slot.COUNT]), float(t[Slot.REPEAT])
    explore_hits = float(t[Slot.HIT] - t[Slot.REPEAT_HIT])
    return Estimate(
        model_version, count,
        hr=ratio(Slot.HIT, Slot.HIT, Slot.COUNT),
        ndcg=ratio(Slot.NDCG, Slot.NDCG_SQUARED, Slot.COUNT),
        mrr=ratio(Slot.RR, Slot.RR_SQUARED, Slot.COUNT),
        repeat_hr=ratio(Slot.REPEAT_HIT, Slot.REPEAT_HIT, Slot.REPEAT),
        # the explore split's sums are differences of two noised sums: twice the variance
        explore_hr=_ratio(explore_hits, explore_hits, count - repeats,
                          noise_std * math.sqrt(2), sampling_rate, 2 * rounding),
        noise_std=noise_std, sampling_rate=sampling_rate)
