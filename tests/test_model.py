"""The numpy reference model: its closed-form gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from fedcart.model_export.model import (
    Neighbours,
    Weights,
    group_size,
    history_features,
    init_weights,
    loss_and_grads,
    n_parameters,
    pick,
    place,
    scores,
    sgd_step,
    trained_groups,
)


def neighbours(rng: np.random.Generator, n_items: int, k: int = 3) -> Neighbours:
    """A random table; rows share neighbours, so a cart's entries for one item add up."""
    return Neighbours(rng.integers(0, n_items, (n_items, k)),
                      rng.normal(size=(n_items, k)).astype(np.float32))


def batch(rng: np.random.Generator, n_items: int) -> tuple[np.ndarray, ...]:
    ctx = np.array([[1, 2, 2, -1], [0, -1, -1, -1], [-1, -1, -1, -1], [3, 4, 5, 6]])
    hist_ids = np.array([[1, 7, -1], [2, -1, -1], [-1, -1, -1], [0, 3, 9]])
    hist_w = rng.uniform(0.1, 2.0, hist_ids.shape).astype(np.float64)
    hist_co = rng.uniform(0.0, 3.0, hist_ids.shape).astype(np.float64)
    targets = rng.integers(0, n_items, ctx.shape[0])
    return ctx, hist_ids, hist_w, hist_co, targets


@pytest.mark.parametrize("dim", [5, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_finite_differences(seed: int, dim: int) -> None:
    rng = np.random.default_rng(seed)
    w = init_weights(12, dim, rng, scale=0.5, popularity=rng.integers(0, 9, 12)).astype(
        np.float64)
    w.e_out[:] = rng.normal(scale=0.5, size=w.e_out.shape)
    w.blend[:] = rng.normal(size=4)
    nbrs = neighbours(rng, 12)
    ctx, hist_ids, hist_w, hist_co, targets = batch(rng, 12)
    _, grads = loss_and_grads(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    assert grads.e_in.shape == grads.e_out.shape == (12, dim)
    eps = 1e-6
    for name, tensor in w.tensors().items():
        flat = tensor.reshape(-1)
        for index in rng.choice(flat.size, min(flat.size, 12), replace=False):
            saved = flat[index]
            flat[index] = saved + eps
            up, _ = loss_and_grads(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
            flat[index] = saved - eps
            down, _ = loss_and_grads(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
            flat[index] = saved
            numeric = (up - down) / (2 * eps)
            analytic = grads.tensors()[name].reshape(-1)[index]
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, index)


def test_padding_and_empty_cart() -> None:
    rng = np.random.default_rng(0)
    w = init_weights(6, 3, rng)
    w.blend[:] = [0.0, 0.0, 0.0, 2.0]
    nbrs = neighbours(rng, 6)
    no_history = (np.full((1, 1), -1), np.zeros((1, 1)), np.zeros((1, 1)))
    padded = scores(w, nbrs, np.array([[2, 4, -1, -1]]), *no_history)
    tight = scores(w, nbrs, np.array([[4, 2]]), *no_history)
    np.testing.assert_allclose(padded, tight, rtol=1e-6)
    empty = scores(w, nbrs, np.array([[-1]]), *no_history)
    np.testing.assert_allclose(empty[0], w.bias)


def test_item_item_term_sums_the_cart_rows_of_the_table() -> None:
    table = Neighbours(np.array([[1, 2], [0, 2], [1, 1], [0, 0]]),
                       np.array([[0.5, 0.25], [1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], np.float32))
    got = table.scores(np.array([[0, 2, -1], [3, -1, -1]]))
    # item 0 gives 1 -> 0.5 and 2 -> 0.25; item 2 gives 1 -> 3 + 4; item 3 gives nothing
    np.testing.assert_allclose(got, [[0.0, 7.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # stored: the three rows with a neighbour (row 3's weights are all 0)
    raw = table.to_bytes()
    assert len(raw) == 4 + 4 * 3 + 8 * 3 * 2
    back = Neighbours.from_bytes(raw, 4, 2)
    np.testing.assert_array_equal(back.weights, table.weights)
    np.testing.assert_array_equal(back.ids[:3], table.ids[:3])
    np.testing.assert_array_equal(back.scores(np.array([[0, 2, 3]])),
                                  table.scores(np.array([[0, 2, 3]])))
    with pytest.raises(ValueError, match="lie in"):
        Neighbours(np.array([[4]]), np.array([[1.0]], np.float32))
    with pytest.raises(ValueError, match="bytes"):
        Neighbours.from_bytes(raw[:-1], 4, 2)
    unordered = bytearray(raw)
    unordered[4:8], unordered[8:12] = raw[8:12], raw[4:8]  # rows 1, 0, 2
    with pytest.raises(ValueError, match="ascending"):
        Neighbours.from_bytes(bytes(unordered), 4, 2)


def test_history_features_ignore_padding() -> None:
    f_log, f_any, f_co = history_features(np.array([[2, 0, -1]]), np.array([[1.5, 0.25, 9.0]]),
                                          np.array([[0.5, 0.0, 7.0]]), 4)
    np.testing.assert_allclose(f_log, [[np.log(1.25), 0.0, np.log(2.5), 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(f_any, [[1, 0, 1, 0]])
    np.testing.assert_allclose(f_co, [[0.0, 0.0, np.log(1.5), 0.0]], rtol=1e-6)


@pytest.mark.parametrize("dim", [4, 0])
def test_flat_round_trip_and_sgd_moves_against_gradient(dim: int) -> None:
    rng = np.random.default_rng(3)
    w = init_weights(10, dim, rng)
    assert w.flat().shape == (n_parameters(10, dim),)
    back = Weights.from_flat(w.flat(), 10, dim)
    assert back.dim == dim
    for a, b in zip(w.tensors().values(), back.tensors().values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        Weights.from_flat(w.flat()[:-1], 10, dim)
    ctx, hist_ids, hist_w, hist_co, targets = batch(rng, 10)
    nbrs = neighbours(rng, 10)
    loss, _ = loss_and_grads(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    _, lower = sgd_step(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets, np.full(4, 0.05))
    after, _ = loss_and_grads(lower, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    assert after < loss


def test_picking_trained_groups_round_trips() -> None:
    w = init_weights(7, 3, np.random.default_rng(4))
    w.e_out[:] = 2.0
    flat = w.flat()
    blend = pick(flat, ["blend"], 7, 3)
    np.testing.assert_array_equal(blend, w.blend)
    both = pick(flat, ["blend", "e_out"], 7, 3)  # any order: the layout's order is used
    np.testing.assert_array_equal(both, np.concatenate([w.e_out.ravel(), w.blend]))
    back = place(both, ["e_out", "blend"], 7, 3)
    np.testing.assert_array_equal(back, np.concatenate([np.zeros(21), w.e_out.ravel(),
                                                        np.zeros(7), w.blend]))
    with pytest.raises(ValueError, match="values"):
        place(both[:-1], ["e_out", "blend"], 7, 3)
    with pytest.raises(ValueError, match="subset"):
        trained_groups(["e_in", "gamma"])
    with pytest.raises(ValueError, match="subset"):
        trained_groups([])


def test_a_model_without_embeddings_scores_as_one_whose_e_out_is_zero() -> None:
    """d = 0 is the default federated model (embeddings never trained, e_out zero) less
    the embeddings: the same scores, loss and bias and blend gradients."""
    rng = np.random.default_rng(5)
    full = init_weights(12, 4, rng, popularity=rng.integers(0, 9, 12)).astype(np.float64)
    full.blend[:] = rng.normal(size=4)
    none = Weights(np.zeros((12, 0)), np.zeros((12, 0)), full.bias.copy(), full.blend.copy())
    nbrs = neighbours(rng, 12)
    ctx, hist_ids, hist_w, hist_co, targets = batch(rng, 12)
    np.testing.assert_allclose(scores(none, nbrs, ctx, hist_ids, hist_w, hist_co),
                               scores(full, nbrs, ctx, hist_ids, hist_w, hist_co))
    loss_full, g_full = loss_and_grads(full, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    loss_none, g_none = loss_and_grads(none, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    assert loss_none == pytest.approx(loss_full)
    np.testing.assert_allclose(g_none.bias, g_full.bias)
    np.testing.assert_allclose(g_none.blend, g_full.blend)
    assert np.any(g_full.e_out != 0)  # what d = 0 gives up: e_out's gradient is not zero


def test_a_model_without_embeddings_refuses_to_train_them() -> None:
    w = init_weights(7, 0, np.random.default_rng(6))
    flat = w.flat()
    assert group_size(["bias", "blend"], 7, 0) == flat.size == 7 + 4
    picked = pick(flat, ["blend", "bias"], 7, 0)
    np.testing.assert_array_equal(place(picked, ["bias", "blend"], 7, 0), flat)
    assert trained_groups(["blend", "bias"], dim=0) == ("bias", "blend")
    for groups in (["e_in"], ["e_out", "blend"], ["e_in", "e_out", "bias", "blend"]):
        with pytest.raises(ValueError, match="d = 0 has no e_"):
            trained_groups(groups, dim=0)
        with pytest.raises(ValueError, match="d = 0 has no e_"):
            group_size(groups, 7, 0)
        with pytest.raises(ValueError, match="d = 0 has no e_"):
            pick(flat, groups, 7, 0)
    assert trained_groups(["e_in", "e_out"], dim=3) == ("e_in", "e_out")
    with pytest.raises(ValueError, match="at least 0"):
        trained_groups(["bias"], dim=-1)
