"""The evaluation protocol of DESIGN.md section 6, exactly, so figures compare across
implementations.

Per user (ascending id), baskets in time order: the last basket of every user with at least
two baskets is that user's test basket, every other basket is training data (it stays on the
device in a federated run). The catalog is the set of items seen in training baskets, indexed
in the order of the item keys sorted as strings. For each test basket, items outside the
catalog are dropped, a basket with fewer than two items left is skipped, and one item is
hidden, drawn with a single ``numpy.random.default_rng(0)`` by ``.choice`` over the basket's
catalog indices in ascending order; the rest is the cart. A scorer ranks the whole catalog,
cart items excluded, and ties count in the hidden item's favour. A scorer gives -inf to an
item it has no evidence for (co-occurrence: no shared basket with the cart); such an item is
never recommended, so a hidden item scored -inf is a miss, not a tie with the other unscored
items. (Both rules reproduce the reference figures of DESIGN.md section 6 exactly.)

Beside the totals, HitRate@10 is split by the hidden item (:class:`HiddenItem`): one the user
bought before (repeat) or not (explore), and one of the head, the most popular items that
together make up half of the training purchases, or of the tail: a model can be strong on
repeats and popular items and still fail the long tail a large catalog is mostly made of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fedcart.data.datasets import BasketData
from fedcart.protocol.evaluation import metric_values, rank_of_hidden

__all__ = ["HiddenItem", "Metrics", "Query", "Slice", "Split", "batch_size", "evaluate",
           "make_split", "ranks_of_hidden"]

SPLIT_SEED = 0
# queries scored at once: at most MAX_BATCH, and at most what keeps one [B, V] float64 score
# matrix within SCORES_BUDGET (a scorer and the ranking hold a few of them): 256 up to
# V = 32,768, then fewer (167 at V = 50,000)
MAX_BATCH = 256
SCORES_BUDGET = 64 << 20


@dataclass(frozen=True)
class Query:
    """One test case: a user's cart and the item hidden from it (catalog indices)."""

    user: int
    cart: np.ndarray
    hidden: int


@dataclass(frozen=True)
class Split:
    """Training baskets per user and the test queries, all as catalog indices.

    ``train[u]`` lists user ``u``'s training baskets in time order (int64 arrays), where
    ``u`` indexes ``users``. Every user appears, also those with no training basket left.
    """

    name: str
    catalog: tuple[str, ...]
    names: tuple[str, ...]  # display names in catalog order (the key where the data has none)
    users: tuple[str, ...]
    train: tuple[tuple[np.ndarray, ...], ...]
    queries: tuple[Query, ...]

    @property
    def n_items(self) -> int:
        return len(self.catalog)

    def training_baskets(self) -> Iterator[np.ndarray]:
        for baskets in self.train:
            yield from baskets

    def head_mask(self) -> np.ndarray:
        """Which catalog items are in the head: the most bought (in training baskets) that
        together make up half of all training purchases, ties broken by catalog index."""
        counts = np.zeros(self.n_items, np.int64)
        for basket in self.training_baskets():
            counts[basket] += 1
        order = np.argsort(-counts, kind="stable")
        covered = np.cumsum(counts[order])
        size = int(np.searchsorted(covered, covered[-1] / 2)) + 1 if covered.size else 0
        head = np.zeros(self.n_items, bool)
        head[order[:size]] = True
        return head

    def basket_item_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR pieces (indptr, indices) of the binary training basket x item matrix."""
        lengths = [len(b) for b in self.training_baskets()]
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = (np.concatenate(list(self.training_baskets())) if lengths
                   else np.zeros(0, np.int64))
        return indptr, indices


def validation_data(data: BasketData) -> BasketData:
    """``data`` without each user's last basket, so that :func:`make_split` holds out the
    second-to-last: settings tuned on it never see a test basket. Users with one basket
    keep it (they have no query either way)."""
    return dataclasses.replace(data, name=f"{data.name} (validation)", users={
        user: baskets[:-1] if len(baskets) >= 2 else baskets
        for user, baskets in data.users.items()})


def make_split(data: BasketData) -> Split:
    """Apply the protocol to ``data`` (whose users and baskets are already in order)."""
    train_items: set[str] = set()
    for baskets in data.users.values():
        for basket in baskets[:-1] if len(baskets) >= 2 else baskets:
            train_items.update(basket)
    catalog = tuple(sorted(train_items))
    index = {item: i for i, item in enumerate(catalog)}

    rng = np.random.default_rng(SPLIT_SEED)
    train: list[tuple[np.ndarray, ...]] = []
    queries: list[Query] = []
    for u, baskets in enumerate(data.users.values()):
        held_out = len(baskets) >= 2
        training = baskets[:-1] if held_out else baskets
        train.append(tuple(np.array(sorted(index[i] for i in b), dtype=np.int64)
                           for b in training))
        if not held_out:
            continue
        in_catalog = np.array(sorted(index[i] for i in baskets[-1] if i in index),
                              dtype=np.int64)
        if len(in_catalog) < 2:
            continue
        hidden = int(rng.choice(in_catalog))
        queries.append(Query(user=u, cart=in_catalog[in_catalog != hidden], hidden=hidden))
    return Split(name=data.name, catalog=catalog,
                 names=tuple(data.name_of(item) for item in catalog), users=tuple(data.users),
                 train=tuple(train), queries=tuple(queries))


class HiddenItem(StrEnum):
    """A class of hidden items the HitRate is split by."""

    REPEAT = "repeat"  # in the user's training baskets
    EXPLORE = "explore"  # new to the user
    HEAD = "head"  # among the items making up half of the training purchases
    TAIL = "tail"  # the rest of the catalog


@dataclass(frozen=True)
class Slice:
    """HitRate@10 over the queries whose hidden item is of one class."""

    hr: float
    queries: int


@dataclass(frozen=True)
class Metrics:
    hr: float
    ndcg: float
    mrr: float
    queries: int
    by_hidden: dict[HiddenItem, Slice] = dataclasses.field(default_factory=dict)

    def as_row(self, name: str) -> dict[str, object]:
        return {"name": name, "hr@10": self.hr, "ndcg@10": self.ndcg, "mrr": self.mrr,
                "by_hidden": self.hidden_json()}

    def hidden_json(self) -> dict[str, dict[str, float | int]]:
        return {c.value: {"hr": s.hr, "queries": s.queries} for c, s in self.by_hidden.items()}


def _slices(split: Split, queries: list[Query], hit: np.ndarray) -> dict[HiddenItem, Slice]:
    """HitRate@10 by the class of the hidden item (:class:`HiddenItem`)."""
    head = split.head_mask()
    hidden = np.array([q.hidden for q in queries], np.int64)
    repeat = np.array([any(q.hidden in b for b in split.train[q.user]) for q in queries],
                      bool)
    masks = {HiddenItem.REPEAT: repeat, HiddenItem.EXPLORE: ~repeat,
             HiddenItem.HEAD: head[hidden], HiddenItem.TAIL: ~head[hidden]}
    return {c: Slice(float(hit[m].mean()) if m.any() else 0.0, int(m.sum()))
            for c, m in masks.items()}


def ranks_of_hidden(scores: np.ndarray, queries: list[Query] | tuple[Query, ...]) -> np.ndarray:
    """1-based rank of each hidden item among the non-cart items, ties in its favour;
    ``inf`` where the scorer gave the hidden item no score (-inf): the rule a device
    applies to its own query (protocol.evaluation.rank_of_hidden)."""
    return np.array([rank_of_hidden(scores[row], q.cart, q.hidden)
                     for row, q in enumerate(queries)], np.float64)


Scorer = Callable[[list[Query]], np.ndarray]


def batch_size(n_items: int) -> int:
    """Queries per scorer call for a catalog of ``n_items`` (MAX_BATCH, SCORES_BUDGET)."""
    return max(1, min(MAX_BATCH, SCORES_BUDGET // (8 * n_items)))


def evaluate(scorer: Scorer, split: Split, batch: int | None = None) -> Metrics:
    """Rank the catalog for every query with ``scorer`` (queries -> scores [B, V]),
    ``batch`` queries at a time (default :func:`batch_size`)."""
    batch = batch_size(split.n_items) if batch is None else batch
    queries = list(split.queries)
    if not queries:
        raise ValueError(f"{split.name}: the split has no test queries")
    ranks = np.concatenate([
        ranks_of_hidden(scorer(queries[i:i + batch]), queries[i:i + batch])
        for i in range(0, len(queries), batch)
    ])
    hit, ndcg, rr = metric_values(ranks)
    return Metrics(hr=float(hit.mean()), ndcg=float(ndcg.mean()), mrr=float(rr.mean()),
                   queries=len(queries), by_hidden=_slices(split, queries, hit.astype(bool)))
