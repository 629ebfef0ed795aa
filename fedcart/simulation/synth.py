"""Synthetic basket data for scale tests and benchmarks only: how the code behaves with a
given number of users and items. Its figures are never a quality claim; the baskets have
the coarse shape of a real set and none of its structure (no item goes with another).

Each user draws a number of baskets and each basket a size, both lognormal; a basket's
first item slots are fresh draws from a Zipf-like popularity over the catalog, and each
slot of a later basket is, with the profile's repeat probability, an item from the user's
earlier baskets instead (drawn in proportion to how often the user bought it). A basket
drops its duplicates. Every item is bought at least once when the fresh draws outnumber
the catalog: the first fresh draws go through a shuffled catalog.

Rows are streamed to a gzipped CSV a chunk of users at a time, so memory does not grow
with the number of users. Columns: user_id, order_number (the basket's number in the
user's history, 1 first) and item_id; read it back with ``--data FILE --user-col user_id
--item-col item_id --time-col order_number``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd

from fedcart.edge_client.store import MAX_BASKETS

__all__ = ["COLUMNS", "Profile", "Shape", "Synthesized", "generate"]

COLUMNS = ("user_id", "order_number", "item_id")
USERS_PER_CHUNK = 5_000
COMPRESSION = 3  # gzip level: a large file compresses about as well as at 6, much faster


@dataclass(frozen=True)
class Shape:
    """The distributions of a profile, fitted to a bundled set (all its baskets): the mean
    and standard deviation of log(basket size) and of log(baskets per user), the share of
    a basket's items already in the user's earlier baskets (over every basket but a user's
    first), and the exponent s of popularity ~ rank^-s (least squares on log-log, ranks 10
    to half the catalog)."""

    basket_log_mean: float
    basket_log_sd: float
    baskets_log_mean: float
    baskets_log_sd: float
    repeat_rate: float
    zipf: float
    mean_basket: float  # the set's mean basket size, for comparison


class Profile(Enum):
    """Whose shape the synthetic baskets take."""

    # UCI Online Retail as loaded (4,335 customers, 18,405 invoices): 21 items a basket,
    # 4.3 baskets a customer, 45.5% of a later basket already bought
    UCI = Shape(2.518, 1.135, 0.939, 0.900, 0.455, 0.741, 20.99)
    # the Instacart sample (593 users, 15,183 orders): 9.9 items an order, 25.6 orders a
    # user, 67.9% of a later order already bought
    INSTACART = Shape(1.996, 0.828, 3.044, 0.598, 0.679, 0.989, 9.88)


@dataclass(frozen=True)
class Synthesized:
    """What :func:`generate` wrote."""

    users: int
    items: int  # distinct items bought
    baskets: int
    rows: int


class _Catalog:
    """Fresh draws: Zipf-like popularity over ``items``, the first ``items`` of them a
    shuffled catalog (so that every item is bought when there are enough draws)."""

    def __init__(self, items: int, zipf: float, rng: np.random.Generator) -> None:
        weights = np.arange(1, items + 1, dtype=np.float64) ** -zipf
        self.cdf = np.cumsum(weights) / weights.sum()
        self.ids = rng.permutation(items)  # popularity rank -> item id
        self.unseen = rng.permutation(items)
        self.used = 0

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.cdf) - 1)
        out = self.ids[ranks]
        first = min(n, len(self.unseen) - self.used)
        out[:first] = self.unseen[self.used:self.used + first]
        self.used += first
        return out


def _chunk(n_users: int, first_user: int, shape: Shape, catalog: _Catalog,
           rng: np.random.Generator) -> pd.DataFrame:
    """The rows of ``n_users`` users numbered from ``first_user``."""
    n_items = len(catalog.cdf)
    counts = np.clip(np.rint(rng.lognormal(shape.baskets_log_mean, shape.baskets_log_sd,
                                           n_users)), 1, MAX_BASKETS).astype(np.int64)
    basket_user = np.repeat(np.arange(n_users), counts)
    user_start = np.cumsum(counts) - counts
    order = np.arange(len(basket_user)) - user_start[basket_user]  # 0: the user's first
    sizes = np.clip(np.rint(rng.lognormal(shape.basket_log_mean, shape.basket_log_sd,
                                          len(basket_user))), 1, n_items).astype(np.int64)
    slot_basket = np.repeat(np.arange(len(basket_user)), sizes)
    slot_user = basket_user[slot_basket]
    repeat = (order[slot_basket] > 0) & (rng.random(len(slot_basket)) < shape.repeat_rate)
    fresh = ~repeat
    items = np.empty(len(slot_basket), np.int64)
    items[fresh] = catalog.draw(int(fresh.sum()), rng)
    # a repeat copies one of the user's fresh slots in earlier baskets: they are the
    # fresh slots numbered [user's first, basket's first) in slot order
    fresh_before: np.ndarray = np.cumsum(fresh) - fresh
    basket_first_slot = np.cumsum(sizes) - sizes
    user_first: np.ndarray = fresh_before[basket_first_slot[user_start]][slot_user[repeat]]
    earlier: np.ndarray = fresh_before[basket_first_slot[slot_basket[repeat]]] - user_first
    pick = user_first + (rng.random(len(earlier)) * earlier).astype(np.int64)
    items[repeat] = items[np.flatnonzero(fresh)[pick]]
    _, keep = np.unique(slot_basket * n_items + items, return_index=True)
    return pd.DataFrame({COLUMNS[0]: first_user + slot_user[keep],
                         COLUMNS[1]: order[slot_basket[keep]] + 1, COLUMNS[2]: items[keep]})


def generate(users: int, items: int, seed: int, out: Path,
             profile: Profile = Profile.UCI) -> Synthesized:
    """Write ``users`` users' baskets over ``items`` items, shaped like ``profile``, to the
    gzipped CSV ``out`` (see module doc). For scale tests and benchmarks only."""
    if users < 1 or items < 2:
        raise ValueError("synthetic data needs at least 1 user and 2 items")
    rng = np.random.default_rng(seed)
    catalog = _Catalog(items, profile.value.zipf, rng)
    bought = np.zeros(items, bool)
    baskets = rows = 0
    with gzip.open(out, "wt", compresslevel=COMPRESSION, newline="") as fh:
        for first in range(0, users, USERS_PER_CHUNK):
            frame = _chunk(min(USERS_PER_CHUNK, users - first), first, profile.value,
                           catalog, rng)
            frame.to_csv(fh, header=first == 0, index=False)
            bought[frame[COLUMNS[2]].to_numpy()] = True
            baskets += len(frame.drop_duplicates(list(COLUMNS[:2])))
            rows += len(frame)
    return Synthesized(users=users, items=int(bought.sum()), baskets=baskets, rows=rows)
