"""Running the bundle's graphs with plain onnxruntime: recommendation and the train step.

The device and central training both go through these two classes, so the model a data
scientist evaluates is the model a phone runs. Only onnxruntime and numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from fedcart.lru import Lru
from fedcart.model_export.features import Batch, History, history_feeds, pad_histories, pad_rows
from fedcart.model_export.model import PAD, Neighbours, Weights, model_tensors

__all__ = ["Recommender", "TrainStep", "make_session", "shared_session"]

SESSION_CACHE = 8
_sessions: Lru[tuple[str, int], ort.InferenceSession] = Lru(SESSION_CACHE)


def make_session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; one intra-op thread by default (a phone's budget, and what the
    benchmarks compare)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=options,
                                providers=["CPUExecutionProvider"])


def shared_session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    """One session per distinct graph in this process (least recently used of
    SESSION_CACHE kept). The graphs hold no weights, so every model version, and in a
    simulation every device of a worker, runs on the same session: ``run`` is thread-safe."""
    return _sessions.get_or_make((hashlib.sha256(model).hexdigest(), threads),
                                 lambda: make_session(model, threads))


def _model_feeds(weights: Weights, neighbours: Neighbours) -> dict[str, np.ndarray]:
    """The weights a graph of the model's (V, d) takes (model_tensors: no embeddings with
    d = 0) and the item-item table, as its inputs."""
    if neighbours.n_items != weights.n_items:
        raise ValueError(f"the neighbour table has {neighbours.n_items} rows, the model "
                         f"{weights.n_items} items")
    tensors = weights.tensors()
    return {**{n: np.ascontiguousarray(tensors[n], np.float32)
               for n in model_tensors(weights.dim)},
            **neighbours.tensors()}


class Recommender:
    """Top-k items for carts, blended with each user's history, via recommend.onnx/.ort
    with ``weights`` and the item-item table fed as inputs (numpy arrays are passed without
    a copy)."""

    def __init__(self, model: bytes, weights: Weights, neighbours: Neighbours,
                 threads: int = 1) -> None:
        self.session = shared_session(model, threads)
        self.n_items = weights.n_items
        self.weights = _model_feeds(weights, neighbours)

    def top_k(self, carts: Sequence[Sequence[int] | np.ndarray], k: int,
              histories: Sequence[History] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, k'], scores [B, k']) with k' = min(k, V); cart items come last with
        score -inf. ``histories``: per cart, the user's history features for that cart."""
        ids, scores = self.session.run(["top_ids", "top_scores"],
                                       self._feeds(carts, k, histories))
        return ids, scores

    def all_scores(self, carts: Sequence[Sequence[int] | np.ndarray],
                   histories: Sequence[History] | None = None) -> np.ndarray:
        """Every item's score [B, V] (cart items -inf): the graph's ``scores`` output, with
        k = 1 so that the top-k it computes on the way costs nothing (onnxruntime runs every
        node, fetched or not: a full top-V took 25 times as long at V = 50,000)."""
        (scores,) = self.session.run(["scores"], self._feeds(carts, 1, histories))
        return scores

    def _feeds(self, carts: Sequence[Sequence[int] | np.ndarray], k: int,
               histories: Sequence[History] | None) -> dict[str, np.ndarray]:
        """The graph's inputs for padded ``carts`` and their ``histories``, checked."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        cart = (np.asarray(carts[0], np.int64).reshape(1, -1) if len(carts) == 1
                else pad_rows([np.asarray(c, np.int64) for c in carts], np.int64, PAD))
        if cart.shape[1] == 0:
            cart = np.full((len(carts), 1), PAD, np.int64)
        if cart.max() >= self.n_items or cart.min() < PAD:
            raise ValueError(f"cart ids must lie in [0, {self.n_items})")
        if histories is None:
            history = self._no_history(len(carts))
        else:
            if any(len(np.unique(h.ids)) != len(h.ids) for h in histories):
                raise ValueError("history item ids must be distinct within a user's history")
            history = history_feeds(*pad_histories(histories))
        return {**self.weights, "cart": cart, **history, "k": np.array([k], np.int64)}

    @staticmethod
    @functools.cache
    def _no_history(rows: int) -> dict[str, np.ndarray]:
        ids = np.full((rows, 1), PAD, np.int64)
        weights = np.zeros((rows, 1), np.float32)
        ids.flags.writeable = weights.flags.writeable = False
        return history_feeds(ids, weights, weights)


class TrainStep:
    """One SGD step of train_step.onnx on a batch, with a fixed item-item table."""

    def __init__(self, model: bytes, neighbours: Neighbours, threads: int = 1) -> None:
        self.session = shared_session(model, threads)
        self.neighbours = neighbours

    def __call__(self, weights: Weights, batch: Batch,
                 lr: Sequence[float]) -> tuple[float, Weights]:
        """``lr``: one learning rate per group of TENSOR_NAMES (with d = 0 the embeddings'
        are unused, and their empty tensors come back as they went in)."""
        feeds = {**_model_feeds(weights, self.neighbours), **batch.feeds(),
                 "lr": np.asarray(lr, np.float32)}
        trained = model_tensors(weights.dim)
        loss, *tensors = self.session.run(["loss", *(f"{n}_out" for n in trained)], feeds)
        return float(loss), dataclasses.replace(weights, **dict(zip(trained, tensors,
                                                                    strict=True)))
