"""The item-item table, derived from a (noised) co-occurrence statistic; and EASE.

The aggregator learns the sum over users of their clipped co-occurrence over the head items
(statistics.py), plus Gaussian or Laplace noise of standard deviation ``noise_std`` per entry.
From that M x M Gram matrix G it derives each head item's K neighbours:

- exact statistic (no DP): EASE (Steck 2019), B = I - P diag(1/diag P), P = (G + lambda I)^-1,
  lambda = ``ease_lambda`` times the mean of diag G. On UCI's validation split the table
  alone, blended with the device's own history, reaches HitRate@10 0.338 (K = 100,
  M = 2000); training the bias and blend lifts that to about 0.37.
- noised statistic: the cosine of soft-thresholded counts: off the diagonal,
  max(G_ab - ``threshold`` * noise_std, 0), divided by sqrt(G_aa G_bb). Pairs below the
  threshold are dropped (with M^2 / 2 noised entries, most would be noise), and the survivors
  are shrunk by it. EASE's inverse amplifies the noise: at epsilon 8 on UCI's validation
  split (4,335 users, M = 1000) the table alone scores 0.273 this way, 0.254 with EASE. With
  the same counts and a tenth of the noise (what ten times the population would allow),
  EASE over M = 2000 (clip 32) scores 0.341 and the cosine at most 0.317: past some
  population EASE is the better choice under DP too.

Each item keeps its K largest positive weights, scaled so that the rows' largest weights
average 1: the item-item blend weight then starts on the same footing in every model. The
bundle's table adds the item names' neighbours to these (:func:`item_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg.lapack as lapack
from threadpoolctl import threadpool_limits

from fedcart.aggregator.name_neighbours import with_names
from fedcart.model_export.model import Neighbours, largest_per_row, mean_row_max
from fedcart.protocol.statistics import (
    COOCCURRENCE,
    POPULARITY,
    popularity_bias,
    sum_contributions,
    triangle_size,
)

__all__ = ["EASE_COPIES", "StatisticsSettings", "cosine_weights", "ease_weights",
           "exact_statistics", "head_items", "item_table", "neighbour_table", "table_width",
           "unpack_triangle"]

# dense M x M float64 arrays alive at once in an EASE computation: the Gram matrix and
# ease_weights' working copy (which becomes B)
EASE_COPIES = 2


@dataclass(frozen=True)
class StatisticsSettings:
    """The statistics rounds and the table derived from them. Defaults: tuned on UCI's
    validation split (fedcart/aggregator/item_item.py's module doc gives the figures).
    ``sampling_rate`` and ``popularity_noise_ratio`` concern the federated rounds only:
    central training computes the statistics exactly."""

    sampling_rate: float = 1.0  # q of the two statistics rounds
    head_items: int = 2000  # M: co-occurrence over the M most popular items
    popularity_clip: float = 5.0  # C of a user's popularity vector
    cooccurrence_clip: float = 32.0  # C of a user's co-occurrence vector
    neighbours: int = 100  # K per item in the bundle
    ease_lambda: float = 0.5  # EASE's ridge, times the mean of the Gram diagonal
    threshold: float = 2.5  # noised counts below threshold * noise std are dropped
    # the bias is this times log(1 + popularity): at 1 (the likelihood's optimum for an empty
    # cart) popular items outrank the cart's neighbours (UCI validation HitRate@10 0.27
    # against 0.37); a small weight only breaks ties among items without other evidence
    popularity_weight: float = 0.01
    popularity_noise_ratio: float = 4.0  # its noise multiplier / the co-occurrence round's
    name_weight: float = 0.3  # of the item names' table (name_neighbours.py); 0: none

    def __post_init__(self) -> None:
        if not 0 < self.sampling_rate <= 1 or self.popularity_noise_ratio <= 0:
            raise ValueError("sampling_rate must lie in (0, 1], popularity_noise_ratio > 0")
        if self.head_items < 2 or self.neighbours < 1:
            raise ValueError("head_items must be at least 2 and neighbours at least 1")
        if min(self.popularity_clip, self.cooccurrence_clip, self.ease_lambda) <= 0 or \
                min(self.threshold, self.popularity_weight) < 0:
            raise ValueError("clips and ease_lambda must be positive, threshold and "
                             "popularity_weight not negative")


def table_width(k: int, m: int) -> int:
    """K for a head of ``m`` items: at most ``k``, and at most a quarter of the head. On a
    small catalog K = 100 made the cart's neighbour entries outnumber the logits (the train
    step's scatter was 36% of it at V = 169), while K = 20, 42 and 100 scored alike on
    Groceries' validation split (169 items: HitRate@10 0.345, 0.343, 0.343)."""
    return max(1, min(k, m // 4))


def head_items(popularity: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` most popular catalog ids (ties to the lower id), ascending."""
    order = np.argsort(-np.asarray(popularity, np.float64), kind="stable")
    return np.sort(order[:m]).astype(np.int64)


def unpack_triangle(packed: np.ndarray, m: int) -> np.ndarray:
    """The symmetric m x m matrix of a packed upper triangle (statistics.pair_index)."""
    if packed.shape != (triangle_size(m),):
        raise ValueError(f"a packed {m} x {m} triangle has {triangle_size(m)} values, "
                         f"got {packed.shape}")
    out = np.zeros((m, m), np.float64)
    rows, cols = np.triu_indices(m)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


SINGLE_THREAD_FROM = 8192  # items; see ease_weights


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE's B for Gram matrix ``gram`` (float64, symmetric) and ridge ``lam``, diagonal 0.
    The inverse goes through a Cholesky factorization, half the work of a general one, and
    every step works in one copy of ``gram``: EASE_COPIES dense M x M arrays at the peak.
    From SINGLE_THREAD_FROM items on, LAPACK runs on one thread: OpenBLAS's threaded dpotrf
    (scipy's wheels, 2 cores) died with a segmentation fault at 16,000 items, and ran
    single-threaded at 16,384."""
    # LAPACK works in place on a Fortran-ordered array: the transpose of a C-ordered copy,
    # which is the same matrix since the Gram matrix is symmetric
    work = np.array(gram, dtype=np.float64, copy=True)
    work[np.diag_indices_from(work)] += lam
    threads = 1 if len(work) >= SINGLE_THREAD_FROM else None
    with threadpool_limits(limits=threads, user_api="blas"):
        chol, info = lapack.dpotrf(work.T, lower=False, overwrite_a=True)
        if info != 0:
            raise np.linalg.LinAlgError(
                f"EASE Gram matrix not positive definite (info={info})")
        p, info = lapack.dpotri(chol, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE inverse failed (info={info})")
    _mirror_upper(p)
    # B = -P / diag(P) column-wise; P is p, symmetric, and p.T the C-ordered result
    diagonal = np.diag(p).copy()
    p /= -diagonal[:, None]
    weights: np.ndarray = p.T
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def _mirror_upper(a: np.ndarray, block: int = 512) -> None:
    """Copy ``a``'s upper triangle onto its lower one in place, a block of rows at a time
    (no temporary as large as ``a``)."""
    for start in range(0, len(a), block):
        stop = min(start + block, len(a))
        a[start:stop, :start] = a[:start, start:stop].T
        part = a[start:stop, start:stop]
        lower = np.tril_indices(stop - start, -1)
        part[lower] = part.T[lower]


def _ease_with_enough_ridge(gram: np.ndarray, lam: float) -> np.ndarray:
    """EASE with ridge ``lam``, doubled until G + lambda I is positive definite: a sum of
    users' clipped pair indicators is not a Gram matrix X^T X, so it need not be positive
    semi-definite (Instacart's 593 users: not at lambda = half the mean diagonal)."""
    for _ in range(60):
        try:
            return ease_weights(gram, lam)
        except np.linalg.LinAlgError:
            lam *= 2
    raise np.linalg.LinAlgError("no ridge makes the co-occurrence matrix positive definite")


def cosine_weights(gram: np.ndarray, threshold: float) -> np.ndarray:
    """Cosine of ``gram``'s off-diagonal counts soft-thresholded at ``threshold``, diagonal
    0 (a count below one is read as one)."""
    counts = np.maximum(gram - threshold, 0.0)
    norms = np.sqrt(np.maximum(np.diag(gram), 1.0))
    weights: np.ndarray = counts / norms[:, None] / norms[None, :]
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def neighbour_table(total: np.ndarray, head: np.ndarray, n_items: int, *, noise_std: float,
                    k: int, ease_lambda: float, threshold: float) -> Neighbours:
    """The [V, K] table from a packed co-occurrence sum over ``head`` (see module doc);
    items outside the head get no neighbours."""
    m = len(head)
    gram = unpack_triangle(np.asarray(total, np.float64), m)
    if noise_std > 0:
        weights = cosine_weights(gram, threshold * noise_std)
    else:
        weights = _ease_with_enough_ridge(gram, ease_lambda * max(float(np.mean(np.diag(gram))),
                                                                  1e-9))
    k = table_width(k, m)
    top, kept = largest_per_row(weights, k)
    ids = np.zeros((n_items, k), np.int64)
    values = np.zeros((n_items, k), np.float32)
    ids[head] = head[top]
    values[head] = kept / mean_row_max(kept)
    return Neighbours(ids, values)


def item_table(total: np.ndarray, head: np.ndarray, names: Sequence[str],
               settings: StatisticsSettings, noise_std: float) -> Neighbours:
    """The bundle's table: the co-occurrence sum's neighbours (:func:`neighbour_table`)
    blended with the item names' (name_neighbours.py) at ``settings.name_weight``."""
    return with_names(neighbour_table(total, head, len(names), noise_std=noise_std,
                                      k=settings.neighbours, ease_lambda=settings.ease_lambda,
                                      threshold=settings.threshold),
                      names, settings.name_weight)


def exact_statistics(users: Sequence[Sequence[np.ndarray]], names: Sequence[str],
                     settings: StatisticsSettings) -> tuple[np.ndarray, Neighbours]:
    """(bias, table) from the exact statistics of ``users`` (their baskets as catalog ids)
    and the catalog's ``names``: what the federated statistics rounds give without noise
    (central training)."""
    n_items = len(names)
    popularity = sum_contributions(POPULARITY, users, n_items, settings.popularity_clip)
    head = head_items(popularity, min(settings.head_items, n_items))
    total = sum_contributions(COOCCURRENCE, users, n_items, settings.cooccurrence_clip,
                              head=head)
    return (settings.popularity_weight * popularity_bias(popularity),
            item_table(total, head, names, settings, noise_std=0.0))
