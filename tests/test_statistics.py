"""The devices' statistics and the item-item table derived from them, against definitions
written independently: Python sets for the pairs, numpy's inverse for EASE, the cosine by
hand; and the bound every contribution must keep for the DP noise to cover it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.aggregator.item_item import (
    StatisticsSettings,
    ease_weights,
    exact_statistics,
    head_items,
    neighbour_table,
    table_width,
    unpack_triangle,
)
from fedcart.protocol.statistics import (
    COOCCURRENCE,
    POPULARITY,
    check_head,
    contribution,
    pair_index,
    sum_contributions,
    triangle_size,
)
from fedcart.protocol.terms import Norm

baskets_strategy = st.lists(
    st.lists(st.integers(0, 19), min_size=1, max_size=8, unique=True).map(
        lambda b: np.array(sorted(b), np.int64)), min_size=0, max_size=6)


def test_pair_index_walks_the_upper_triangle_row_by_row() -> None:
    m = 7
    rows, cols = np.triu_indices(m)
    np.testing.assert_array_equal(pair_index(rows, cols, m), np.arange(triangle_size(m)))
    packed = np.arange(triangle_size(m), dtype=np.float64)
    full = unpack_triangle(packed, m)
    assert (full == full.T).all() and full[2, 5] == packed[pair_index(2, 5, m)]
    with pytest.raises(ValueError, match="triangle"):
        unpack_triangle(packed[:-1], m)


@settings(max_examples=200, deadline=None)
@given(baskets=baskets_strategy, clip=st.floats(0.1, 50.0), l1=st.booleans())
def test_contributions_are_the_users_pairs_clipped(baskets: list[np.ndarray], clip: float,
                                                   l1: bool) -> None:
    norm = Norm.L1 if l1 else Norm.L2
    head = np.array([3, 0, 7, 11, 19, 5], np.int64)  # positions: 3->0, 0->1, 7->2, ...
    where = {int(item): pos for pos, item in enumerate(head)}
    pairs = set()
    for basket in baskets:
        positions = [where[int(i)] for i in basket if int(i) in where]
        pairs |= {(a, b) for a in positions for b in positions if a <= b}
    bought = {int(i) for basket in baskets for i in basket}
    for part, expected, size in (
            (contribution(POPULARITY, baskets, 20, clip, norm), bought, 20),
            (contribution(COOCCURRENCE, baskets, 20, clip, norm, head),
             {pair_index(a, b, len(head)) for a, b in pairs}, triangle_size(len(head)))):
        assert part.size == size
        assert set(part.indices.tolist()) == {int(i) for i in expected}
        dense = part.dense()
        # one user moves the sum by at most C (the sensitivity the noise assumes) ...
        assert np.linalg.norm(dense, 1 if l1 else 2) <= clip * (1 + 1e-9)
        # ... and is scaled down only when over it: all entries equal, 1 or the clip's share
        if len(expected):
            full = np.linalg.norm(np.ones(len(expected)), 1 if l1 else 2)
            np.testing.assert_allclose(part.values, min(1.0, clip / full))


def test_sums_are_the_sum_of_each_users_dense_vector() -> None:
    rng = np.random.default_rng(0)
    users = [[np.sort(rng.choice(30, rng.integers(1, 6), replace=False)) for _ in range(3)]
             for _ in range(25)]
    head = head_items(sum_contributions(POPULARITY, users, 30, 2.0), 10)
    for kind, extra in ((POPULARITY, {}), (COOCCURRENCE, {"head": head})):
        want = sum(contribution(kind, u, 30, 2.0, **extra).dense() for u in users)
        np.testing.assert_allclose(sum_contributions(kind, users, 30, 2.0, **extra), want)


def test_head_items_are_the_most_popular_ties_to_the_lower_id() -> None:
    popularity = np.array([5.0, 9.0, 5.0, 1.0, 9.0, 5.0])
    np.testing.assert_array_equal(head_items(popularity, 4), [0, 1, 2, 4])
    np.testing.assert_array_equal(check_head([4, 0, 2], 6), [4, 0, 2])
    for bad in ([0], [0, 0], [0, 6], [-1, 2], [0, 1.5], "01", [True, 2]):
        with pytest.raises(ValueError):
            check_head(bad, 6)


def _expected_table(weights: np.ndarray, head: np.ndarray, n_items: int, k: int):
    """Each head item's k largest positive weights, scaled so row maxima average 1."""
    ids, values = np.zeros((n_items, k), np.int64), np.zeros((n_items, k))
    maxima = []
    for row, item in enumerate(head):
        order = np.argsort(-weights[row], kind="stable")[:k]
        kept = np.maximum(weights[row, order], 0.0)
        ids[item], values[item] = head[order], kept
        maxima.append(kept.max())
    scale = np.mean([m for m in maxima if m > 0])
    return ids, values / scale


def _dense_by_item(ids: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    out = np.zeros((n_items, n_items))
    for i in range(n_items):
        out[i, ids[i]] += values[i]
    return out


def test_exact_statistics_give_eases_neighbours() -> None:
    rng = np.random.default_rng(3)
    n_items, m, k = 14, 8, 2
    users = [[np.sort(rng.choice(n_items, rng.integers(2, 6), replace=False))
              for _ in range(int(rng.integers(1, 4)))] for _ in range(60)]
    head = head_items(sum_contributions(POPULARITY, users, n_items, 3.0), m)
    total = sum_contributions(COOCCURRENCE, users, n_items, 3.0, head=head)
    table = neighbour_table(total, head, n_items, noise_std=0.0, k=k, ease_lambda=0.5,
                            threshold=2.5)
    gram = unpack_triangle(total, m)
    p = np.linalg.inv(gram + 0.5 * np.mean(np.diag(gram)) * np.eye(m))
    ease = -p / np.diag(p)
    np.fill_diagonal(ease, 0.0)
    ids, values = _expected_table(ease, head, n_items, k)
    # compare as item x item maps: the order of equal weights within a row is free
    np.testing.assert_allclose(_dense_by_item(table.ids, table.weights, n_items),
                               _dense_by_item(ids, values, n_items), atol=1e-5)
    outside = np.setdiff1d(np.arange(n_items), head)
    assert (table.weights[outside] == 0).all()
    # the central path computes the same table from the same users; ids as names share no
    # word, so the names' table adds nothing
    bias, central = exact_statistics(users, [f"sku {i}" for i in range(n_items)],
                                     StatisticsSettings(head_items=m, popularity_clip=3.0,
                                                        cooccurrence_clip=3.0, neighbours=k))
    np.testing.assert_allclose(_dense_by_item(central.ids, central.weights, n_items),
                               _dense_by_item(table.ids, table.weights, n_items), atol=1e-6)
    assert bias.shape == (n_items,) and (bias >= 0).all()


def test_noised_statistics_give_the_thresholded_cosine() -> None:
    rng = np.random.default_rng(4)
    m, n_items, k, sigma = 8, 10, 2, 1.5
    head = np.array([0, 1, 2, 4, 5, 7, 8, 9])
    gram = rng.uniform(0, 20, (m, m))
    gram = np.triu(gram) + np.triu(gram, 1).T
    rows, cols = np.triu_indices(m)
    table = neighbour_table(gram[rows, cols], head, n_items, noise_std=sigma, k=k,
                            ease_lambda=0.5, threshold=2.0)
    cosine = np.zeros((m, m))
    for a, b in itertools.product(range(m), range(m)):
        if a != b:
            cosine[a, b] = max(gram[a, b] - 2.0 * sigma, 0.0) / np.sqrt(
                max(gram[a, a], 1.0) * max(gram[b, b], 1.0))
    ids, values = _expected_table(cosine, head, n_items, k)
    np.testing.assert_allclose(_dense_by_item(table.ids, table.weights, n_items),
                               _dense_by_item(ids, values, n_items), atol=1e-6)


def test_the_table_is_at_most_a_quarter_of_the_head_wide() -> None:
    assert [table_width(100, m) for m in (2, 8, 169, 400, 2000)] == [1, 2, 42, 100, 100]


def test_a_matrix_that_is_not_a_gram_matrix_gets_enough_ridge() -> None:
    """Clipped pair indicators summed over few users need not be positive semi-definite:
    pairs (a, b) and (b, c) without (a, c) have a negative eigenvalue."""
    gram = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    assert np.linalg.eigvalsh(gram).min() < -0.4
    with pytest.raises(np.linalg.LinAlgError):
        ease_weights(gram, 0.01)
    rows, cols = np.triu_indices(3)
    table = neighbour_table(gram[rows, cols], np.arange(3), 3, noise_std=0.0, k=2,
                            ease_lambda=0.01, threshold=2.5)
    row_max = table.weights.max(axis=1)
    assert np.isfinite(table.weights).all() and (row_max > 0).any()
    assert row_max[row_max > 0].mean() == pytest.approx(1.0)


def test_a_large_ease_runs_lapack_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """From SINGLE_THREAD_FROM items on, the Cholesky runs with BLAS on one thread (OpenBLAS's
    threaded dpotrf died with a segmentation fault at 16,000 items), and B is still EASE's:
    -P / diag(P) off the diagonal, P the inverse of gram + lambda I (numpy's reference)."""
    from threadpoolctl import threadpool_info

    from fedcart.aggregator import item_item

    threads_seen: list[int] = []
    real = item_item.lapack.dpotrf

    def recording(*args: object, **kwargs: object) -> object:
        threads_seen.extend(p["num_threads"] for p in threadpool_info()
                            if p["user_api"] == "blas")
        return real(*args, **kwargs)

    monkeypatch.setattr(item_item.lapack, "dpotrf", recording)
    x = np.random.default_rng(4).random((40, 12))
    gram = x.T @ x
    monkeypatch.setattr(item_item, "SINGLE_THREAD_FROM", 12)
    weights = ease_weights(gram, 0.5)
    assert threads_seen and set(threads_seen) == {1}
    p = np.linalg.inv(gram + 0.5 * np.eye(12))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(weights, expected, rtol=1e-8, atol=1e-10)
