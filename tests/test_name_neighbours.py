"""The item names' table against a dense TF-IDF cosine written out with Python sets and
numpy, and its blend into the co-occurrence table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcart.aggregator import name_neighbours
from fedcart.aggregator.name_neighbours import name_neighbours as names_table
from fedcart.aggregator.name_neighbours import with_names
from fedcart.model_export.model import Neighbours

NAMES = ["Jumbo Bag Red Retrospot", "JUMBO BAG pink polkadot", "red retrospot cup",
         "Pink Polkadot Cup", "pear", "Pear, conference", "Café crème", "café", "12345",
         "Jumbo Bag_Vintage"]


def _reference_cosine(names: list[str]) -> np.ndarray:
    """TF-IDF cosine by definition: word sets, idf = log(n / df), unit rows, dot products."""
    words = [{w for w in "".join(c if c.isalnum() else " " for c in name.lower()).split()}
             for name in names]
    vocabulary = sorted(set().union(*words))
    n = len(names)
    df = {w: sum(w in s for s in words) for w in vocabulary}
    x = np.array([[math.log(n / df[w]) if w in s else 0.0 for w in vocabulary]
                  for s in words])
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    cosine = x @ x.T
    np.fill_diagonal(cosine, 0.0)
    return cosine


def _by_item(table: Neighbours) -> np.ndarray:
    """Row i: item i's weight for every item (a cart of item i alone)."""
    return table.scores(np.arange(table.n_items)[:, None], np.float64)


def test_the_names_table_keeps_each_items_k_most_similar_names() -> None:
    reference = _reference_cosine(NAMES)
    k = 3
    table = names_table(NAMES, k)
    assert table.ids.shape == (len(NAMES), k)
    got = _by_item(table)
    for i in range(len(NAMES)):
        kth = np.sort(reference[i])[-k]
        kept = reference[i] > kth + 1e-6  # every item above the k-th weight is kept
        np.testing.assert_allclose(got[i][kept], reference[i][kept], rtol=1e-5)
        nonzero = got[i] > 0
        np.testing.assert_allclose(got[i][nonzero], reference[i][nonzero], rtol=1e-5)
    # "12345" shares no word; "pear" and "Pear, conference" share theirs
    assert got[NAMES.index("12345")].max() == 0
    assert got[NAMES.index("pear"), NAMES.index("Pear, conference")] > 0
    # accents are letters: "café" matches "Café crème"
    assert got[NAMES.index("café"), NAMES.index("Café crème")] > 0


def test_row_blocks_give_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = names_table(NAMES, 4)
    monkeypatch.setattr(name_neighbours, "_BLOCK_VALUES", len(NAMES))  # one row per block
    np.testing.assert_allclose(_by_item(names_table(NAMES, 4)), _by_item(whole), rtol=1e-6)


def _scaled(weights: np.ndarray) -> np.ndarray:
    row_max = weights.max(axis=1)
    return weights / row_max[row_max > 0].mean()


def test_the_blend_adds_the_names_table_to_the_co_occurrence_table() -> None:
    n, k = len(NAMES), 3
    rng = np.random.default_rng(0)
    # a co-occurrence table over a head of the first four items only
    ids = np.zeros((n, k), np.int64)
    weights = np.zeros((n, k), np.float32)
    for i in range(4):
        ids[i] = rng.permutation([j for j in range(4) if j != i])[:k]
        weights[i] = rng.uniform(0.1, 1.0, k)
    table = Neighbours(ids, weights)
    blended = with_names(table, NAMES, 0.5)

    expected = _scaled(_by_item(table)) + 0.5 * _scaled(_by_item(names_table(NAMES, k)))
    for i in range(n):  # each row keeps its k largest sums
        cut = np.sort(expected[i])[-k]
        expected[i][expected[i] < cut] = 0.0
    np.testing.assert_allclose(_by_item(blended), _scaled(expected), rtol=1e-5, atol=1e-7)
    # items outside the head now have neighbours, "12345" still none
    assert blended.weights[NAMES.index("pear")].max() > 0
    assert blended.weights[NAMES.index("12345")].max() == 0


def test_weight_zero_keeps_the_table_and_a_wrong_catalog_is_refused() -> None:
    table = names_table(NAMES, 2)
    assert with_names(table, NAMES, 0.0) is table
    with pytest.raises(ValueError, match="9 names for a table of 10 items"):
        with_names(table, NAMES[:-1], 0.3)
