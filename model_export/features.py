"""On-device features and training examples, shared by the device and central training.

History: the user's own earlier baskets as item ids with recency-weighted counts (a basket
``a`` baskets older than the newest weighs ``decay**a``), capped at the ``max_items``
heaviest items. Examples: leave-one-out inside each basket (target t, context = basket
minus t), each with the history of the baskets before it. Only numpy: a device imports it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from model_export.model import PAD

__all__ = ["Batch", "ExampleSet", "history_of", "pad_rows"]

MAX_HISTORY = 512
MAX_CONTEXT = 64


def history_of(baskets: Sequence[np.ndarray], n_items: int, decay: float,
               max_items: int = MAX_HISTORY) -> tuple[np.ndarray, np.ndarray]:
    """Recency-weighted counts of the items in ``baskets`` (oldest first): (ids, weights),
    ids ascending among the ``max_items`` heaviest."""
    counts = np.zeros(n_items, dtype=np.float64)
    for basket in baskets:
        counts *= decay
        counts[basket] += 1.0
    return _sparse_top(counts, max_items)


def _sparse_top(counts: np.ndarray, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.flatnonzero(counts)
    if len(ids) > max_items:
        keep = np.argsort(-counts[ids], kind="stable")[:max_items]
        ids = np.sort(ids[keep])
    return ids.astype(np.int64), counts[ids].astype(np.float32)


def pad_rows(rows: Sequence[np.ndarray], dtype: type, fill: float | int) -> np.ndarray:
    """Stack ragged rows into [len(rows), max(1, longest)] padded with ``fill``."""
    width = max(1, max((len(r) for r in rows), default=0))
    out: np.ndarray = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


@dataclass(frozen=True)
class Batch:
    ctx: np.ndarray
    hist_ids: np.ndarray
    hist_w: np.ndarray
    targets: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return {"ctx": self.ctx, "hist_ids": self.hist_ids, "hist_w": self.hist_w,
                "targets": self.targets}


class ExampleSet:
    """All leave-one-out examples of some users' baskets (catalog indices)."""

    def __init__(self, users_baskets: Sequence[Sequence[np.ndarray]], n_items: int,
                 decay: float, use_history: bool = True) -> None:
        self.baskets: list[np.ndarray] = []
        self.histories: list[tuple[np.ndarray, np.ndarray]] = []
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        for baskets in users_baskets:
            counts = np.zeros(n_items, dtype=np.float64)
            for basket in baskets:
                self.histories.append(_sparse_top(counts, MAX_HISTORY) if use_history
                                      else empty)
                self.baskets.append(np.asarray(basket, dtype=np.int64))
                counts *= decay
                counts[basket] += 1.0
        sizes = np.array([len(b) for b in self.baskets], dtype=np.int64)
        usable = sizes >= 2
        self.example_basket = np.repeat(np.flatnonzero(usable), sizes[usable])
        starts = np.cumsum(sizes[usable]) - sizes[usable]
        self.example_pos = np.arange(int(sizes[usable].sum())) - np.repeat(starts,
                                                                            sizes[usable])

    def __len__(self) -> int:
        return len(self.example_basket)

    def batches(self, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """One shuffled pass; contexts longer than MAX_CONTEXT are subsampled."""
        order = rng.permutation(len(self))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size], rng)

    def batch(self, examples: np.ndarray, rng: np.random.Generator) -> Batch:
        ctx, hist_ids, hist_w, targets = [], [], [], []
        for e in examples:
            basket = self.baskets[self.example_basket[e]]
            pos = self.example_pos[e]
            rest = np.delete(basket, pos)
            if len(rest) > MAX_CONTEXT:
                rest = rng.choice(rest, MAX_CONTEXT, replace=False)
            ctx.append(rest)
            ids, weights = self.histories[self.example_basket[e]]
            hist_ids.append(ids)
            hist_w.append(weights)
            targets.append(basket[pos])
        return Batch(ctx=pad_rows(ctx, np.int64, PAD), hist_ids=pad_rows(hist_ids, np.int64, PAD),
                     hist_w=pad_rows(hist_w, np.float32, 0.0),
                     targets=np.array(targets, dtype=np.int64))
