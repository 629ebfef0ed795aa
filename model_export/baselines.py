"""Central baselines for the evaluation protocol: popularity, item-item co-occurrence
(cosine), EASE, and the user's own history.

These see every training basket at once (except the history baseline, which is what a
device can compute alone); they are the yardstick the federated model is measured against.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from model_export.evaluation import Query, Scorer, Split
from model_export.features import history_of
from model_export.item_item import ease_weights

__all__ = [
    "basket_counts", "cooccurrence", "ease", "own_history", "popularity",
]


def _basket_matrix(split: Split) -> sp.csr_matrix:
    indptr, indices = split.basket_item_matrix()
    data = np.ones(len(indices), dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, split.n_items))


def basket_counts(split: Split) -> np.ndarray:
    """How many training baskets hold each item (float64, length V)."""
    return np.bincount(split.basket_item_matrix()[1], minlength=split.n_items).astype(float)


def popularity(split: Split) -> Scorer:
    """Items ranked by the number of training baskets that hold them."""
    counts = basket_counts(split)

    def score(queries: list[Query]) -> np.ndarray:
        return np.broadcast_to(counts, (len(queries), split.n_items))

    return score


def cooccurrence(split: Split) -> Scorer:
    """Sum over cart items i of cos(i, j) = C_ij / sqrt(pop_i pop_j), C the number of
    training baskets holding both; -inf for an item that shares no basket with the cart."""
    x = _basket_matrix(split)
    pop = np.asarray(x.sum(axis=0)).ravel()
    inv = np.divide(1.0, np.sqrt(pop), out=np.zeros_like(pop), where=pop > 0)
    cos = sp.diags(inv) @ (x.T @ x).tocsr() @ sp.diags(inv)
    cos.setdiag(0.0)
    cos = cos.tocsr()

    def score(queries: list[Query]) -> np.ndarray:
        scores = np.vstack([np.asarray(cos[q.cart].sum(axis=0)).ravel() for q in queries])
        scores[scores <= 0.0] = -np.inf
        return scores

    return score


def ease(split: Split, lam: float) -> Scorer:
    """EASE (Steck 2019) on the binary training basket x item matrix X: B from X^T X
    (item_item.ease_weights); scores = x_cart B."""
    x = _basket_matrix(split)
    weights = ease_weights((x.T @ x).toarray(), lam)

    def score(queries: list[Query]) -> np.ndarray:
        return np.vstack([weights[q.cart].sum(axis=0) for q in queries])

    return score


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
