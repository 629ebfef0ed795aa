"""recommend and train: the ONNX graphs against a plain numpy implementation of the same
model, and recommend against the bandwidth bound of reading e_out and the bias from
wherever a device keeps them between calls (the cache level their size fits in). The model
carries an item-item table of K = 100 neighbours per item (a quarter of the catalog below 400
items: item_item.table_width), as the statistics rounds give. Each grid has models of d = 0
(no embeddings, no V x d product) beside ones with embeddings at the same V, and recommend
reports each model's signed bundle size: the whole bundle and what a new model version
costs a device (manifest, signature, weights.bin)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nacl.signing
import numpy as np

from bench.common import Row, seconds_per_call
from fedcart.aggregator.item_item import table_width
from fedcart.model_export.bundle import CONSTANT_FILES
from fedcart.model_export.export import export_bundle
from fedcart.model_export.features import ExampleSet
from fedcart.model_export.graphs import recommend_graph, train_step_graph
from fedcart.model_export.model import ITEM_ITEM, Neighbours, Weights, init_weights, sgd_step
from fedcart.model_export.runtime import Recommender, TrainStep

GRID = [(169, 32), (4000, 32), (4000, 64), (50_000, 0), (50_000, 32), (50_000, 64)]
QUICK_GRID = [(169, 32), (4000, 0), (4000, 64)]
CART = np.array([3, 17, 42, 101, 150], np.int64)
LEARNING_RATES = np.array([5.0, 5.0, 1.0, 0.05], np.float32)
NEIGHBOURS = 100


def model(n_items: int, dim: int, rng: np.random.Generator) -> tuple[Weights, Neighbours]:
    """Random weights (e_out too: zero would make the product trivial) and a random table."""
    w = init_weights(n_items, dim, rng, popularity=np.arange(n_items))
    w.e_out[:] = rng.standard_normal(w.e_out.shape) * 0.1
    k = table_width(NEIGHBOURS, n_items)  # what the statistics rounds give such a catalog
    return w, Neighbours(rng.integers(0, n_items, (n_items, k)),
                         rng.random((n_items, k)).astype(np.float32))


def read_bandwidth(n_bytes: int) -> float:
    """Single-core read bandwidth, bytes/s, for a working set of ``n_bytes`` read again and
    again, as recommend reads ``e_out``: a SIMD max-reduction over a buffer of that size,
    so it is served from whichever cache level holds it (DRAM above the last level). The
    max is cheaper than the load, and numpy runs it on one thread."""
    data = np.ones(max(n_bytes // 4, 1024), dtype=np.float32)
    seconds = seconds_per_call(lambda: data.max(), min_time=0.2, repeats=3)
    return data.nbytes / seconds


def numpy_top10(w: Weights, nbrs: Neighbours, cart: np.ndarray) -> np.ndarray:
    """The top 10 for one cart; with d = 0 from the bias, with no product."""
    scores = w.bias.copy()
    if w.dim:
        scores += w.e_out @ (w.e_in[cart].sum(axis=0) / np.sqrt(len(cart)))
    scores += w.blend[ITEM_ITEM] * np.bincount(nbrs.ids[cart].ravel(), nbrs.weights[cart].ravel(),
                                               minlength=len(scores))
    scores[cart] = -np.inf
    top = np.argpartition(-scores, 10)[:10]
    return top[np.argsort(-scores[top])]


def bundle_bytes(w: Weights, nbrs: Neighbours) -> tuple[int, int]:
    """(whole bundle, one model version's download) in bytes of the model exported as a
    signed bundle, with item keys and names of 8 characters."""
    keys = [f"sku{i:05d}" for i in range(w.n_items)]
    with tempfile.TemporaryDirectory(prefix="fedcart-bench-") as tmp:
        out = Path(tmp) / "bundle"
        export_bundle(out, w, keys, keys, nacl.signing.SigningKey.generate(), neighbours=nbrs)
        sizes = {f.name: f.stat().st_size for f in out.iterdir()}
    return sum(sizes.values()), sum(s for n, s in sizes.items() if n not in CONSTANT_FILES)


def bench_recommend(quick: bool) -> list[Row]:
    rows = []
    for n_items, dim in QUICK_GRID if quick else GRID:
        w, nbrs = model(n_items, dim, np.random.default_rng(0))
        rec = Recommender(recommend_graph(n_items, w.dim).SerializeToString(), w, nbrs)
        ids, _ = rec.top_k([CART], 10)
        assert np.array_equal(ids[0], numpy_top10(w, nbrs, CART))
        onnx_s = seconds_per_call(lambda rec=rec: rec.top_k([CART], 10))
        numpy_s = seconds_per_call(lambda w=w, n=nbrs: numpy_top10(w, n, CART))
        read_bytes = w.e_out.nbytes + w.bias.nbytes
        bound_s = read_bytes / read_bandwidth(read_bytes)
        params = {"V": n_items, "d": dim, "K": nbrs.k}
        rows.append(Row("recommend", params, "top-10 latency", onnx_s * 1e6, "us",
                        "numpy", numpy_s * 1e6, numpy_s / onnx_s))
        rows.append(Row("recommend", params, "top-10 latency", onnx_s * 1e6, "us",
                        "read-bandwidth bound (same bytes, hot)", bound_s * 1e6, bound_s / onnx_s))
        torch_top10 = _torch("recommender", w, nbrs)
        if torch_top10 is not None:
            assert np.array_equal(torch_top10(CART), ids[0]), "PyTorch ranks differently"
            torch_s = seconds_per_call(lambda f=torch_top10: f(CART))
            rows.append(Row("recommend", params, "top-10 latency", onnx_s * 1e6, "us",
                            "PyTorch eager", torch_s * 1e6, torch_s / onnx_s))
        whole, version = bundle_bytes(w, nbrs)
        rows.append(Row("recommend", params, "model version download", version / 1e3, "kB",
                        "whole bundle (first install)", whole / 1e3, whole / version))
    return rows


def _torch(name: str, *args):  # type: ignore[no-untyped-def]
    """A PyTorch baseline from bench/torch_baseline.py, or None without torch installed."""
    try:
        from bench import torch_baseline
    except ImportError:
        print("(torch not installed: pip install -e '.[bench]' for the PyTorch baseline)")
        return None
    return getattr(torch_baseline, name)(*args)


def bench_train(quick: bool) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for n_items, dim in QUICK_GRID if quick else GRID:
        users = [[rng.choice(n_items, rng.integers(2, 15), replace=False) for _ in range(4)]
                 for _ in range(64)]
        batch = ExampleSet(users, n_items, decay=0.9).batch(np.arange(64), rng)
        w, nbrs = model(n_items, dim, rng)
        step = TrainStep(train_step_graph(n_items, dim).SerializeToString(), nbrs)
        onnx_s = seconds_per_call(
            lambda w=w, step=step, b=batch: step(w, b, LEARNING_RATES))
        numpy_s = seconds_per_call(lambda w=w, n=nbrs, b=batch: sgd_step(
            w, n, b.ctx, b.hist_ids, b.hist_w, b.hist_co, b.targets, LEARNING_RATES), repeats=3)
        size = len(batch.targets)
        params = {"V": n_items, "d": dim, "K": nbrs.k, "batch": size}
        rows.append(Row("train", params, "examples/s", size / onnx_s, "ex/s", "numpy",
                        size / numpy_s, numpy_s / onnx_s))
        made = _torch("trainer", w, nbrs, LEARNING_RATES)
        if made is not None:
            torch_step, torch_weights = made
            _, after = step(w, batch, LEARNING_RATES)
            torch_step(batch)
            for name, value in torch_weights().items():
                assert np.allclose(value, after.tensors()[name], atol=1e-4), name
            torch_s = seconds_per_call(lambda f=torch_step, b=batch: f(b))
            rows.append(Row("train", params, "examples/s", size / onnx_s, "ex/s",
                            "PyTorch eager", size / torch_s, torch_s / onnx_s))
    return rows

