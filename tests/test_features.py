"""On-device history features against their definition, written out with Python sets."""

from __future__ import annotations

import numpy as np
import pytest

from fedcart.model_export.features import ExampleSet, history_of


def reference(baskets: list[list[int]], cart: list[int], decay: float) -> dict[int, tuple]:
    """item -> (recency-weighted count, personal co-occurrence with cart)."""
    out: dict[int, list[float]] = {}
    newest = len(baskets) - 1
    for s, basket in enumerate(baskets):
        weight = decay ** (newest - s)
        shared = len(set(basket) & set(cart)) / len(set(basket))
        for item in set(basket):
            entry = out.setdefault(item, [0.0, 0.0])
            entry[0] += weight
            entry[1] += weight * shared
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(5))
def test_history_features_match_the_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    baskets = [sorted(rng.choice(30, rng.integers(1, 8), replace=False).tolist())
               for _ in range(rng.integers(1, 12))]
    cart = rng.choice(40, rng.integers(0, 6), replace=False).tolist()  # some never bought
    got = history_of([np.array(b) for b in baskets], 0.8, np.array(cart, np.int64))
    want = reference(baskets, cart, 0.8)
    assert got.ids.tolist() == sorted(want)
    np.testing.assert_allclose(got.counts, [want[i][0] for i in got.ids], rtol=1e-6)
    np.testing.assert_allclose(got.co, [want[i][1] for i in got.ids], rtol=1e-6, atol=1e-7)


def test_history_keeps_the_heaviest_items() -> None:
    baskets = [np.array([0, 1, 2]), np.array([1, 2]), np.array([2])]
    got = history_of(baskets, 1.0, np.array([1]), max_items=2)
    assert got.ids.tolist() == [1, 2]
    np.testing.assert_allclose(got.counts, [2.0, 3.0])
    np.testing.assert_allclose(got.co, [1 / 3 + 1 / 2, 1 / 3 + 1 / 2])


def test_examples_carry_the_features_of_earlier_baskets_for_their_own_cart() -> None:
    rng = np.random.default_rng(0)
    users = [[np.sort(rng.choice(25, rng.integers(2, 7), replace=False)) for _ in range(6)]
             for _ in range(3)]
    examples = ExampleSet(users, 25, decay=0.9)
    batch = examples.batch(np.arange(len(examples)), rng)
    for row, e in enumerate(range(len(examples))):
        k = examples.example_basket[e]
        user = k // 6
        t = k % 6
        ctx = batch.ctx[row][batch.ctx[row] >= 0]
        want = history_of(users[user][:t], 0.9, ctx)
        n = len(want.ids)
        assert batch.hist_ids[row][:n].tolist() == want.ids.tolist()
        assert (batch.hist_ids[row][n:] == -1).all()
        np.testing.assert_allclose(batch.hist_w[row][:n], want.counts, rtol=1e-6)
        np.testing.assert_allclose(batch.hist_co[row][:n], want.co, rtol=1e-6)


def test_newest_basket_examples_drawn_a_few_per_user() -> None:
    rng = np.random.default_rng(1)
    users = [[np.sort(rng.choice(30, rng.integers(2, 9), replace=False))
              for _ in range(int(rng.integers(1, 5)))] for _ in range(20)]
    examples = ExampleSet(users, 30, decay=0.9, newest=1)
    # every example is a leave-one-out of its user's last basket, each of its items once
    assert len(examples) == sum(len(baskets[-1]) for baskets in users)
    for e in range(len(examples)):
        user, t = examples.owners[examples.example_basket[e]]
        assert t == len(user) - 1
    draws = [examples.draw(rng, per_user=3) for _ in range(2)]
    for drawn in draws:
        counts = np.bincount(examples.example_user[drawn], minlength=len(users))
        want = np.minimum([len(b[-1]) for b in users], 3)
        np.testing.assert_array_equal(counts, want)
        assert len(set(drawn.tolist())) == len(drawn)
    assert not np.array_equal(np.sort(draws[0]), np.sort(draws[1]))  # drawn afresh
    np.testing.assert_array_equal(np.sort(examples.draw(rng)), np.arange(len(examples)))
