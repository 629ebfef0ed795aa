"""Central training of the FedCart model through train_step.onnx: the no-privacy reference
row, and the scorer that evaluates any FedCart weights through recommend.onnx."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model_export.baselines import basket_counts
from model_export.evaluation import Query, Scorer, Split
from model_export.features import ExampleSet, History, history_of
from model_export.graphs import recommend_graph, train_step_graph
from model_export.model import Weights, init_weights
from model_export.runtime import Recommender, TrainStep

__all__ = ["TrainConfig", "model_scorer", "train_central"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of central training (and the starting point of federated runs)."""

    dim: int = 128
    epochs: int = 3
    lr_embeddings: float = 5.0
    lr_bias: float = 1.0
    lr_blend: float = 0.05
    batch_size: int = 256
    init_scale: float = 0.1
    history_decay: float = 0.9
    use_history: bool = True
    seed: int = 0

    @property
    def learning_rates(self) -> tuple[float, float, float, float]:
        return (self.lr_embeddings, self.lr_embeddings, self.lr_bias, self.lr_blend)


def initial_weights(split: Split, config: TrainConfig) -> Weights:
    return init_weights(split.n_items, config.dim, np.random.default_rng(config.seed),
                        scale=config.init_scale, popularity=basket_counts(split))


def train_central(split: Split, config: TrainConfig,
                  on_epoch: Callable[[int, float], None] | None = None) -> Weights:
    """SGD over every leave-one-out example of every user's training baskets."""
    rng = np.random.default_rng(config.seed)
    weights = initial_weights(split, config)
    examples = ExampleSet(split.train, split.n_items, config.history_decay,
                          use_history=config.use_history)
    step = TrainStep(train_step_graph(split.n_items, config.dim).SerializeToString())
    for epoch in range(config.epochs):
        losses = []
        for batch in examples.batches(config.batch_size, rng):
            loss, weights = step(weights, batch, config.learning_rates)
            losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses)))
    return weights


def model_scorer(weights: Weights, split: Split, history_decay: float,
                 use_history: bool = True) -> Scorer:
    """Score queries with recommend.onnx, each user's history built as a device would."""
    recommender = Recommender(
        recommend_graph(split.n_items, weights.dim).SerializeToString(), weights)

    def score(queries: list[Query]) -> np.ndarray:
        histories = [history_of(split.train[q.user], history_decay, q.cart)
                     if use_history else History.empty() for q in queries]
        return recommender.all_scores([q.cart for q in queries], histories)

    return score
