"""The evaluation protocol: metric arithmetic, and the reference figures of DESIGN.md 6
from an independent implementation, reproduced exactly (to the 4 decimals published)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedcart.data import baselines
from fedcart.data.evaluation import (
    HiddenItem,
    Query,
    Split,
    evaluate,
    make_split,
    ranks_of_hidden,
    validation_data,
)
from tests.conftest import synthetic_data


def test_rank_counts_ties_for_the_hidden_item_and_excludes_the_cart() -> None:
    scores = np.array([[5.0, 3.0, 3.0, 9.0, 1.0]])
    query = Query(user=0, cart=np.array([3]), hidden=2)
    # item 3 (the best) is in the cart; item 1 ties with the hidden item 2.
    assert ranks_of_hidden(scores, [query]).tolist() == [2.0]


def test_unscored_hidden_item_is_a_miss() -> None:
    scores = np.array([[-np.inf, -np.inf, 1.0]])
    ranks = ranks_of_hidden(scores, [Query(user=0, cart=np.array([2]), hidden=0)])
    assert ranks.tolist() == [np.inf]


def test_metrics_from_known_ranks() -> None:
    split = make_split(synthetic_data())
    queries = split.queries[:3]
    split = dataclasses.replace(split, queries=queries)
    wanted = {q.hidden: r for q, r in zip(queries, (1, 3, 20), strict=True)}

    def scorer(qs: list[Query]) -> np.ndarray:
        out = np.zeros((len(qs), split.n_items))
        for row, q in zip(out, qs, strict=True):
            others = [i for i in range(split.n_items) if i != q.hidden and i not in q.cart]
            row[others[: wanted[q.hidden] - 1]] = 2.0
            row[q.hidden] = 1.0
        return out

    m = evaluate(scorer, split)
    assert m.hr == pytest.approx(2 / 3)
    assert m.ndcg == pytest.approx((1 + 1 / np.log2(4)) / 3)
    assert m.mrr == pytest.approx((1 + 1 / 3 + 1 / 20) / 3)


def test_hitrate_by_hidden_item_repeat_explore_head_tail() -> None:
    """A hand-built split: item 0 is bought in 2 of 4 training purchases, so it alone makes
    up half of them (the head); user 0 hid a tail item it bought before, user 1 the head
    item, new to it."""
    train = ((np.array([0, 1]), np.array([0])), (np.array([2]),))
    queries = (Query(0, np.array([2]), 1), Query(1, np.array([1]), 0))
    split = Split("toy", ("a", "b", "c"), ("A", "B", "C"), ("u0", "u1"), train, queries)
    assert split.head_mask().tolist() == [True, False, False]

    def first_query_hits(qs: list[Query]) -> np.ndarray:  # ranks user 0's item first only
        out = np.zeros((len(qs), 3))
        out[:, 2] = 1.0
        for row, q in zip(out, qs, strict=True):
            row[q.hidden] = 2.0 if q.user == 0 else -np.inf
        return out

    m = evaluate(first_query_hits, split)
    assert m.hr == 0.5
    got = {c: (s.hr, s.queries) for c, s in m.by_hidden.items()}
    assert got == {HiddenItem.REPEAT: (1.0, 1), HiddenItem.EXPLORE: (0.0, 1),
                   HiddenItem.HEAD: (0.0, 1), HiddenItem.TAIL: (1.0, 1)}


def test_split_keeps_last_basket_out_of_training() -> None:
    data = synthetic_data()
    split = make_split(data)
    for u, (user, baskets) in enumerate(data.users.items()):
        assert split.users[u] == user
        assert len(split.train[u]) == len(baskets) - 1
    for q in split.queries:
        last = {split.catalog.index(i) for i in data.users[split.users[q.user]][-1]}
        assert q.hidden in last and set(q.cart.tolist()) == last - {q.hidden}


def test_validation_split_holds_out_the_second_to_last_basket_and_never_the_last() -> None:
    data = synthetic_data()
    split = make_split(validation_data(data))
    assert split.users == tuple(data.users)
    for u, baskets in enumerate(data.users.values()):
        assert len(split.train[u]) == max(len(baskets) - 2, 1)
    assert split.queries
    for q in split.queries:
        baskets = data.users[split.users[q.user]]
        held = {split.catalog.index(i) for i in baskets[-2] if i in split.catalog}
        assert q.hidden in held and set(q.cart.tolist()) == held - {q.hidden}


REFERENCE = {  # DESIGN.md section 6: queries, catalog, EASE lambda, HitRate@10 per row
    "uci": (2592, 3644, 500.0, {"popularity": 0.0424, "cooccurrence": 0.3056,
                                "ease": 0.3407, "own history": 0.2010}),
    "instacart": (560, 13880, 250.0, {"popularity": 0.0696, "cooccurrence": 0.2429,
                                      "ease": 0.2554, "own history": 0.3911}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_figures(name: str, request) -> None:
    split = request.getfixturevalue(f"{name}_split")
    queries, catalog, lam, expected = REFERENCE[name]
    assert (len(split.queries), split.n_items) == (queries, catalog)
    figures = {
        "popularity": evaluate(baselines.popularity(split), split).hr,
        "cooccurrence": evaluate(baselines.cooccurrence(split), split).hr,
        "ease": evaluate(baselines.ease(split, lam), split).hr,
        "own history": evaluate(baselines.own_history(split), split).hr,
    }
    assert {k: round(v, 4) for k, v in figures.items()} == expected


def test_ease_matches_a_direct_numpy_solution(small_split) -> None:
    split = small_split
    x = np.zeros((sum(len(b) for b in split.train), split.n_items))
    for row, basket in zip(x, split.training_baskets(), strict=True):
        row[basket] = 1.0
    p = np.linalg.inv(x.T @ x + 3.0 * np.eye(split.n_items))
    b = np.eye(split.n_items) - p / np.diag(p)
    q = list(split.queries)
    expected = np.vstack([b[query.cart].sum(axis=0) for query in q])
    np.testing.assert_allclose(baselines.ease(split, 3.0)(q), expected, atol=1e-10)
