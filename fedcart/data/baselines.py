"""Central baselines for the evaluation protocol: popularity, item-item co-occurrence
(cosine), EASE, and the user's own history.

These see every training basket at once (except the history baseline, which is what a
device can compute alone); they are the yardstick the federated model is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from fedcart.aggregator.item_item import EASE_COPIES, ease_weights, head_items
from fedcart.data.evaluation import Query, Scorer, Split
from fedcart.data.memory import central_budget, gigabytes
from fedcart.model_export.features import history_of

__all__ = [
    "Head", "basket_counts", "cooccurrence", "cooccurrence_head", "ease", "ease_head",
    "own_history", "popularity",
]

# a stored pair of the co-occurrence matrix: float64 value and int32 column index, plus the
# float64 row factor its scaling expands (cooccurrence)
PAIR_BYTES = 20
GRAM_BLOCK = 1024  # rows of EASE's Gram matrix computed at once (sparse, then dense)


@dataclass(frozen=True)
class Head:
    """The catalog items an O(V^2) baseline runs over: the whole catalog when
    ``memory.central_budget`` holds what that needs, else the most popular that fit."""

    items: np.ndarray  # catalog ids, ascending
    n_items: int  # V
    needed: int  # bytes over the whole catalog
    budget: int

    @property
    def whole(self) -> bool:
        return len(self.items) == self.n_items

    def label(self, name: str) -> str:
        """``name``, with the head's size when it is not the whole catalog."""
        return name if self.whole else f"{name}, top {len(self.items):,} items"

    def note(self, name: str) -> str | None:
        """What a user reads when the catalog was cut, else None."""
        if self.whole:
            return None
        return (f"{name} over the {len(self.items):,} most popular items: the full catalog "
                f"({self.n_items:,}) needs {gigabytes(self.needed)}, the budget is "
                f"{gigabytes(self.budget)}")


def _basket_matrix(split: Split) -> sp.csr_matrix:
    indptr, indices = split.basket_item_matrix()
    data = np.ones(len(indices), dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, split.n_items))


def basket_counts(split: Split) -> np.ndarray:
    """How many training baskets hold each item (float64, length V)."""
    return np.bincount(split.basket_item_matrix()[1], minlength=split.n_items).astype(float)


def ease_head(split: Split, budget: int | None = None) -> Head:
    """EASE's items: the K most popular (by training baskets), K the largest whose
    EASE_COPIES dense K x K float64 matrices fit in ``budget`` (default
    memory.central_budget). Memory grows as K^2 and time as K^3."""
    budget = central_budget() if budget is None else budget
    v = split.n_items
    k = min(v, max(1, math.isqrt(budget // (8 * EASE_COPIES))))
    return Head(head_items(basket_counts(split), k), v, 8 * EASE_COPIES * v * v, budget)


def cooccurrence_head(split: Split, budget: int | None = None) -> Head:
    """The co-occurrence baseline's items: the K most popular, K the largest whose pairs
    fit in ``budget`` (default memory.central_budget) at PAIR_BYTES each. The pairs of K
    items are bounded by the sum over training baskets of (basket items among them)^2,
    and by K^2: the sparse matrix never holds more."""
    budget = central_budget() if budget is None else budget
    v, counts = split.n_items, basket_counts(split)
    indptr, indices = split.basket_item_matrix()
    rank = np.empty(v, np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(v)  # head_items' order
    item_rank = rank[indices]
    baskets = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))

    def needed(k: int) -> int:
        inside = np.bincount(baskets[item_rank < k], minlength=len(indptr) - 1)
        return PAIR_BYTES * min(int(np.sum(inside.astype(np.int64) ** 2)), k * k)

    lo, hi = 0, v  # the largest k whose pairs fit lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if needed(mid) <= budget else (lo, mid - 1)
    return Head(head_items(counts, max(lo, 1)), v, needed(v), budget)


def popularity(split: Split) -> Scorer:
    """Items ranked by the number of training baskets that hold them."""
    counts = basket_counts(split)

    def score(queries: list[Query]) -> np.ndarray:
        return np.broadcast_to(counts, (len(queries), split.n_items))

    return score


def cooccurrence(split: Split, head: Head | None = None) -> Scorer:
    """Sum over cart items i of cos(i, j) = C_ij / sqrt(pop_i pop_j), C the number of
    training baskets holding both; -inf for an item that shares no basket with the cart.
    Over ``head`` only (default :func:`cooccurrence_head`): other items score -inf, and
    cart items outside it add nothing."""
    head = cooccurrence_head(split) if head is None else head
    x = _basket_matrix(split)[:, head.items]
    pop = np.asarray(x.sum(axis=0)).ravel()
    inv = np.divide(1.0, np.sqrt(pop), out=np.zeros_like(pop), where=pop > 0)
    cos = x.T.tocsr() @ x
    # diag(inv) C diag(inv), in place: (inv_i C_ij) inv_j
    cos.data *= np.repeat(inv, np.diff(cos.indptr))
    cos.data *= inv[cos.indices]
    cos.setdiag(0.0)
    at = _positions(head)

    def score(queries: list[Query]) -> np.ndarray:
        scores = _scatter(head, [np.asarray(cos[_inside(q.cart, at)].sum(axis=0)).ravel()
                                 for q in queries])
        scores[scores <= 0.0] = -np.inf
        return scores

    return score


def ease(split: Split, lam: float, head: Head | None = None) -> Scorer:
    """EASE (Steck 2019) on the binary training basket x item matrix X: B from X^T X
    (item_item.ease_weights); scores = x_cart B. Over ``head`` only (default
    :func:`ease_head`): other items score -inf, and cart items outside it add nothing."""
    head = ease_head(split) if head is None else head
    weights = ease_weights(_dense_gram(_basket_matrix(split)[:, head.items]), lam)
    at = _positions(head)

    def score(queries: list[Query]) -> np.ndarray:
        return _scatter(head, [weights[_inside(q.cart, at)].sum(axis=0) for q in queries])

    return score


def _dense_gram(x: sp.csr_matrix) -> np.ndarray:
    """X^T X as a dense float64 array, a block of rows at a time: the sparse product of
    a whole dense-ish head would outweigh the dense result."""
    xt = x.T.tocsr()
    gram = np.empty((x.shape[1], x.shape[1]))
    for start in range(0, x.shape[1], GRAM_BLOCK):
        gram[start:start + GRAM_BLOCK] = (xt[start:start + GRAM_BLOCK] @ x).toarray()
    return gram


def _positions(head: Head) -> np.ndarray:
    """Each catalog item's position in ``head`` (-1 outside it)."""
    at = np.full(head.n_items, -1, np.int64)
    at[head.items] = np.arange(len(head.items))
    return at


def _inside(cart: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The head positions of the cart's items in the head (ascending, as the cart)."""
    positions = at[cart]
    return positions[positions >= 0]


def _scatter(head: Head, rows: list[np.ndarray]) -> np.ndarray:
    """[B, V] scores from per-query scores over the head; -inf outside it."""
    scores = np.full((len(rows), head.n_items), -np.inf)
    scores[:, head.items] = np.vstack(rows)
    return scores


def own_history(split: Split) -> Scorer:
    """The items this user bought before, by the number of their baskets that hold them;
    ties, and the items never bought, ranked by popularity. Exact in float64: the count
    is the leading key, popularity (< pop_max + 1) the second."""
    pop = basket_counts(split)
    lead = pop.max() + 1.0

    def score(queries: list[Query]) -> np.ndarray:
        rows = np.zeros((len(queries), split.n_items))
        for row, q in zip(rows, queries, strict=True):
            history = history_of(split.train[q.user], decay=1.0, cart=q.cart,
                                 max_items=split.n_items)
            row[history.ids] = history.counts
        return rows * lead + pop

    return score
