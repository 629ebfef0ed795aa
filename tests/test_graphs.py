"""The ONNX graphs against the numpy reference, and their .ort forms against the .onnx."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fedcart.model_export.export import build_graphs
from fedcart.model_export.features import ExampleSet
from fedcart.model_export.graphs import OPSET, recommend_graph, train_step_graph
from fedcart.model_export.model import (
    EMBEDDINGS,
    TENSOR_NAMES,
    Neighbours,
    Weights,
    init_weights,
    model_tensors,
    scores,
    sgd_step,
)
from fedcart.model_export.runtime import Recommender, TrainStep, make_session

V, D = 40, 8
LR = np.array([3.0, 2.0, 0.5, 0.1], np.float32)


@pytest.fixture(scope="module", params=[D, 0], ids=lambda d: f"d{d}")
def weights(request):
    """A model with embeddings, and one of d = 0 (the graphs then skip the product)."""
    rng = np.random.default_rng(7)
    w = init_weights(V, request.param, rng, scale=0.3, popularity=rng.integers(0, 50, V))
    w.e_out[:] = rng.normal(scale=0.3, size=w.e_out.shape)
    w.blend[:] = [0.7, 1.3, 0.4, 0.9]
    return w


@pytest.fixture(scope="module")
def nbrs():
    rng = np.random.default_rng(8)
    return Neighbours(rng.integers(0, V, (V, 5)), rng.normal(size=(V, 5)).astype(np.float32))


@pytest.fixture(scope="module")
def graphs(weights):
    return build_graphs(weights.n_items, weights.dim)


def weight_feeds(w: Weights) -> dict[str, np.ndarray]:
    """The weight inputs a graph of the model's (V, d) has."""
    return {name: w.tensors()[name] for name in model_tensors(w.dim)}


def inputs(rng: np.random.Generator):
    ctx = np.array([[3, 5, 5, -1, -1], [0, -1, -1, -1, -1], [-1, -1, -1, -1, -1],
                    [1, 2, 3, 4, 39]], np.int64)
    hist_ids = np.array([[5, 6, 7], [9, -1, -1], [-1, -1, -1], [0, 11, 39]], np.int64)
    hist_w = rng.uniform(0.1, 3.0, hist_ids.shape).astype(np.float32)
    hist_co = rng.uniform(0.0, 2.0, hist_ids.shape).astype(np.float32)
    return ctx, hist_ids, hist_w, hist_co


def test_graphs_pass_the_checker_at_the_declared_opset(weights) -> None:
    for model in (recommend_graph(V, weights.dim), train_step_graph(V, weights.dim)):
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == OPSET >= 17


@pytest.mark.parametrize("build", [recommend_graph, train_step_graph])
def test_only_a_model_with_embeddings_takes_them_and_forms_the_product(build) -> None:
    for dim in (D, 0):
        graph = build(V, dim).graph
        names = {v.name for v in (*graph.input, *graph.output)}
        has_embeddings = {f"{n}{suffix}" for n in EMBEDDINGS for suffix in ("", "_out")
                          if build is train_step_graph or not suffix}
        products = [n.op_type for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        if dim:
            assert has_embeddings <= names and products
        else:
            assert not has_embeddings & names and not products
            assert {"bias", "blend"} <= names


@pytest.mark.parametrize("graph", ["recommend.onnx", "recommend.ort"])
def test_recommend_matches_reference_and_excludes_cart(weights, nbrs, graphs, graph) -> None:
    rng = np.random.default_rng(0)
    ctx, hist_ids, hist_w, hist_co = inputs(rng)
    ref = scores(weights.astype(np.float64), nbrs, ctx, hist_ids, hist_w.astype(np.float64),
                 hist_co.astype(np.float64))
    for row, cart in zip(ref, ctx, strict=True):
        row[cart[cart >= 0]] = -np.inf
    session = make_session(graphs[graph])
    ids, got, every = session.run(None, {
        **weight_feeds(weights), **nbrs.tensors(), "cart": ctx, "hist_ids": hist_ids,
        "hist_w": hist_w, "hist_co": hist_co, "k": np.array([10])})
    assert ids.shape == (4, 10)
    # every item's score, the cart's -inf, as the reference gives them
    np.testing.assert_allclose(every, ref, rtol=1e-5, atol=1e-5)
    expected = np.sort(ref, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(ref, ids, 1), got, rtol=1e-5, atol=1e-5)
    for row, cart in zip(ids, ctx, strict=True):
        assert not set(row.tolist()) & set(cart[cart >= 0].tolist())


def test_k_larger_than_catalog_is_clamped(weights, nbrs, graphs) -> None:
    rec = Recommender(graphs["recommend.onnx"], weights, nbrs)
    ids, got = rec.top_k([[1, 2]], k=10 * V)
    assert ids.shape == (1, V)
    assert np.isneginf(got[0, -2:]).all() and np.isfinite(got[0, :-2]).all()
    with pytest.raises(ValueError, match="cart ids"):
        rec.top_k([[V]], k=3)
    # all_scores reads the graph's scores output: the same as a full top-V, in item order
    full = np.empty(V, np.float32)
    full[ids[0]] = got[0]
    np.testing.assert_array_equal(rec.all_scores([[1, 2]])[0], full)


@pytest.mark.parametrize("graph", ["train_step.onnx", "train_step.ort"])
def test_train_step_matches_reference(weights, nbrs, graphs, graph) -> None:
    rng = np.random.default_rng(1)
    ctx, hist_ids, hist_w, hist_co = inputs(rng)
    targets = np.array([4, 5, 0, 39], np.int64)
    session = make_session(graphs[graph])
    loss, *tensors = session.run(None, {**weight_feeds(weights), **nbrs.tensors(), "ctx": ctx,
                                        "hist_ids": hist_ids, "hist_w": hist_w,
                                        "hist_co": hist_co, "targets": targets, "lr": LR})
    ref_loss, ref = sgd_step(weights.astype(np.float64), nbrs, ctx, hist_ids,
                             hist_w.astype(np.float64), hist_co.astype(np.float64), targets,
                             LR.astype(np.float64))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, got in zip(model_tensors(weights.dim), tensors, strict=True):
        np.testing.assert_allclose(got, ref.tensors()[name], rtol=1e-5, atol=1e-5)
    # the bias and blend moved; with d = 0 the embeddings are not among the outputs
    assert len(tensors) == (len(TENSOR_NAMES) if weights.dim else 2)
    assert not np.allclose(tensors[-1], weights.blend)


@pytest.mark.parametrize("dim", [D, 0])
def test_train_step_runtime_keeps_the_models_shape(nbrs, dim) -> None:
    w = init_weights(V, dim, np.random.default_rng(2))
    step = TrainStep(train_step_graph(V, dim).SerializeToString(), nbrs)
    rng = np.random.default_rng(3)
    examples = ExampleSet([[rng.choice(V, 6, replace=False) for _ in range(3)]
                           for _ in range(8)], V, decay=0.9)
    _, after = step(w, examples.batch(np.arange(8), rng), LR)
    assert after.dim == dim and after.flat().shape == w.flat().shape
    assert not np.array_equal(after.bias, w.bias)


# d = 0 learns only the popularity (bias) and the blend, so less in the same steps
@pytest.mark.parametrize(("dim", "drop"), [(16, 0.3), (0, 0.15)])
def test_train_step_loss_decreases_on_real_data(uci_split, dim: int, drop: float) -> None:
    users = uci_split.train[:300]
    examples = ExampleSet(users, uci_split.n_items, decay=0.9)
    rng = np.random.default_rng(0)
    w = init_weights(uci_split.n_items, dim, rng)
    step = TrainStep(train_step_graph(uci_split.n_items, dim).SerializeToString(),
                     Neighbours.empty(uci_split.n_items))
    fixed = examples.batch(rng.choice(len(examples), 256, replace=False), rng)
    before, _ = step(w, fixed, np.zeros(4))
    for _ in range(2):
        for batch in examples.batches(128, rng):
            _, w = step(w, batch, [30.0, 30.0, 0.5, 0.05])
    after, _ = step(w, fixed, np.zeros(4))
    assert after < before - drop
