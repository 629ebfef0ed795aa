"""What a device masks in a round: its input, computed from the round's accepted terms, the
installed bundle and the device's baskets.

A training round's input is the clipped, weighted update of the trained groups after local
SGD through the bundle's ``train_step.ort``; a statistics round's is the device's clipped
statistic (fedcart/protocol/statistics.py); an evaluation round's, the installed
model's score on a query from the device's newest basket (fedcart/protocol/evaluation.py).
These are functions of their arguments alone, touching no store and no connection: the
session runs them in a worker thread, on baskets it read beforehand, while it goes on
answering the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcart.model_export.bundle import Bundle
from fedcart.model_export.features import ExampleSet, history_of
from fedcart.model_export.model import TENSOR_NAMES, pick, trained_groups
from fedcart.model_export.runtime import Recommender, TrainStep
from fedcart.protocol import evaluation
from fedcart.protocol.statistics import contribution
from fedcart.protocol.terms import RoundTerms, Task
from fedcart.protocol.update import UpdateFormat

__all__ = ["catalog_baskets", "evaluation_input", "local_update", "round_input"]


def catalog_baskets(bundle: Bundle, history: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """``history`` (baskets of item ids, oldest first) as catalog ids of ``bundle``, oldest
    first, empty ones and items outside the catalog left out."""
    index = {item: i for i, item in enumerate(bundle.items)}
    baskets = [np.array(sorted(index[i] for i in b if i in index), dtype=np.int64)
               for b in history]
    return [b for b in baskets if len(b)]


def local_update(bundle: Bundle, history: Sequence[Sequence[str]], epochs: int,
                 learning_rates: Sequence[float], batch_size: int, seed: int | None = None,
                 examples: int | None = None) -> tuple[np.ndarray, int]:
    """(delta = local weights - global weights, examples per epoch) after ``epochs`` of SGD
    through ``bundle``'s train_step.ort on leave-one-out examples of the newest basket of
    ``history``, at most ``examples`` of them an epoch (features.py says why)."""
    m = bundle.manifest
    example_set = ExampleSet([catalog_baskets(bundle, history)], m.n_items, m.history_decay,
                             newest=1)
    start = bundle.weights()
    if len(example_set) == 0:
        return np.zeros(start.flat().size, np.float64), 0
    step = TrainStep(bundle.files["train_step.ort"], bundle.neighbours())
    rng = np.random.default_rng(seed)
    weights = start
    for _ in range(epochs):
        for batch in example_set.batches(batch_size, rng, per_user=examples):
            _, weights = step(weights, batch, learning_rates)
    used = len(example_set) if examples is None else min(examples, len(example_set))
    return weights.flat().astype(np.float64) - start.flat(), used


def evaluation_input(bundle: Bundle, baskets: Sequence[np.ndarray]) -> np.ndarray:
    """The evaluation values (protocol.evaluation.SLOTS) of ``bundle``'s model on the query
    drawn from ``baskets`` (catalog ids, oldest first), blended with the earlier baskets as
    a recommendation on the device is; all zero when the newest basket has no query."""
    query = evaluation.query_of(baskets)
    if query is None:
        return np.zeros(evaluation.SLOTS, np.float64)
    recommender = Recommender(bundle.files["recommend.ort"], bundle.weights(),
                              bundle.neighbours())
    features = history_of(query.history, bundle.manifest.history_decay, query.cart)
    scores = recommender.all_scores([query.cart], [features])[0]
    rank = evaluation.rank_of_hidden(scores, query.cart, query.hidden)
    return evaluation.contribution(rank, query.repeat)


def round_input(bundle: Bundle, terms: RoundTerms,
                history: Sequence[Sequence[str]]) -> tuple[np.ndarray, int]:
    """The encoded vector a device with ``bundle`` installed and baskets ``history`` masks in
    a round on ``terms`` (already accepted, Device.accept_terms), and its example count: for
    a training round its clipped, weighted update of the trained groups; for a statistics
    round its clipped statistic, with count 1 if it has any basket in the catalog; for an
    evaluation round its evaluation values, with count 1 if it had a query."""
    m = bundle.manifest
    fmt = UpdateFormat.of(terms)
    if terms.task is Task.EVALUATE:
        values = evaluation_input(bundle, catalog_baskets(bundle, history))
        return fmt.encode(values), int(values[evaluation.Slot.COUNT])
    if terms.task is not Task.TRAIN:
        head = np.asarray(terms.head, np.int64) if terms.head else None
        baskets = catalog_baskets(bundle, history)
        part = contribution(terms.task, baskets, m.n_items, terms.clip_norm, terms.norm, head)
        return fmt.encode(part.dense()), int(bool(baskets))
    plan = terms.training
    assert plan is not None
    groups = trained_groups(plan.groups)
    rates = [rate if name in groups else 0.0
             for name, rate in zip(TENSOR_NAMES, plan.learning_rates, strict=True)]
    delta, examples = local_update(bundle, history, plan.epochs, rates, plan.batch_size,
                                   examples=plan.examples)
    return fmt.encode(pick(delta, groups, m.n_items, m.dim), examples), examples
