"""Central training of the FedCart model through train_step.onnx: the no-privacy reference
row, and the scorer that evaluates any FedCart model through recommend.onnx.

Central training builds the model the federation builds, from the same statistics without
their noise: the bias from the popularity sum and the item-item table from the co-occurrence
sum (item_item.exact_statistics), then SGD over every example."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedcart.aggregator.item_item import StatisticsSettings, exact_statistics
from fedcart.data.evaluation import Query, Scorer, Split
from fedcart.model_export.features import ExampleSet, History, history_of
from fedcart.model_export.graphs import recommend_graph, train_step_graph
from fedcart.model_export.model import (
    HISTORY_DECAY,
    Neighbours,
    Weights,
    init_weights,
    learning_rates,
)
from fedcart.model_export.runtime import Recommender, TrainStep

__all__ = ["TrainConfig", "model_scorer", "train_central"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of central training (and the starting point of federated runs)."""

    dim: int = 128
    epochs: int = 3
    examples_per_user: int = 8  # per epoch, from each user's newest basket (features.py)
    lr_embeddings: float = 5.0
    lr_bias: float = 1.0
    lr_blend: float = 0.05
    batch_size: int = 256
    init_scale: float = 0.1
    history_decay: float = HISTORY_DECAY
    use_history: bool = True
    # None: no item-item term
    statistics: StatisticsSettings | None = field(default_factory=StatisticsSettings)
    seed: int = 0

    @property
    def learning_rates(self) -> tuple[float, float, float, float]:
        return learning_rates(self.lr_embeddings, self.lr_bias, self.lr_blend)


def initial_model(split: Split, config: TrainConfig) -> tuple[Weights, Neighbours]:
    """Small random embeddings (none with ``dim`` 0: then SGD trains the bias and blend
    only), and the bias and table from the exact statistics (without statistics: no table,
    bias 0)."""
    weights = init_weights(split.n_items, config.dim, np.random.default_rng(config.seed),
                           scale=config.init_scale)
    if config.statistics is None:
        return weights, Neighbours.empty(split.n_items)
    bias, neighbours = exact_statistics([b for b in split.train if b], split.names,
                                        config.statistics)
    weights.bias[:] = bias
    return weights, neighbours


def train_central(split: Split, config: TrainConfig,
                  on_epoch: Callable[[int, float], None] | None = None,
                  ) -> tuple[Weights, Neighbours]:
    """SGD over leave-one-out examples of each user's newest training basket, a few per
    user and epoch, drawn as devices draw them."""
    rng = np.random.default_rng(config.seed)
    weights, neighbours = initial_model(split, config)
    examples = ExampleSet(split.train, split.n_items, config.history_decay,
                          use_history=config.use_history, newest=1)
    step = TrainStep(train_step_graph(split.n_items, config.dim).SerializeToString(),
                     neighbours)
    for epoch in range(config.epochs):
        losses = []
        for batch in examples.batches(config.batch_size, rng, config.examples_per_user):
            loss, weights = step(weights, batch, config.learning_rates)
            losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses)))
    return weights, neighbours


def model_scorer(weights: Weights, neighbours: Neighbours, split: Split, history_decay: float,
                 use_history: bool = True) -> Scorer:
    """Score queries with recommend.onnx, each user's history built as a device would."""
    recommender = Recommender(
        recommend_graph(split.n_items, weights.dim).SerializeToString(), weights, neighbours)

    def score(queries: list[Query]) -> np.ndarray:
        histories = [history_of(split.train[q.user], history_decay, q.cart)
                     if use_history else History.empty() for q in queries]
        return recommender.all_scores([q.cart for q in queries], histories)

    return score
