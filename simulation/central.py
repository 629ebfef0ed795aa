"""Central runs for data scientists: the baselines table and the central FedCart model,
each as named rows of the evaluation protocol's metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model_export import baselines
from model_export.evaluation import Metrics, Split, evaluate
from model_export.model import Neighbours, Weights
from model_export.train import TrainConfig, model_scorer, train_central

__all__ = ["EASE_LAMBDA", "MAX_EASE_ITEMS", "Row", "baseline_rows", "central_rows"]

# The regularization of the reference figures (DESIGN.md 6); 250 elsewhere.
EASE_LAMBDA = {"uci": 500.0, "instacart": 250.0}
DEFAULT_EASE_LAMBDA = 250.0
# EASE inverts a dense V x V matrix: 8 V^2 bytes. Past this it is skipped, and said so.
MAX_EASE_ITEMS = 30_000


@dataclass(frozen=True)
class Row:
    name: str
    metrics: Metrics

    def as_json(self) -> dict[str, float | str]:
        return self.metrics.as_row(self.name)


def baseline_rows(split: Split, ease_lambda: float | None = None,
                  on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Popularity, co-occurrence (cosine), EASE and the user's own history."""
    lam = ease_lambda if ease_lambda is not None else EASE_LAMBDA.get(split.name,
                                                                      DEFAULT_EASE_LAMBDA)
    scorers = [("popularity", lambda: baselines.popularity(split)),
               ("co-occurrence (cosine)", lambda: baselines.cooccurrence(split))]
    if split.n_items <= MAX_EASE_ITEMS:
        scorers.append((f"EASE (lambda {lam:g})", lambda: baselines.ease(split, lam)))
    scorers.append(("own history (device only)", lambda: baselines.own_history(split)))
    rows = []
    for name, make in scorers:
        row = Row(name, evaluate(make(), split))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def central_rows(split: Split, config: TrainConfig,
                 on_epoch: Callable[[int, float], None] | None = None,
                 ) -> tuple[Weights, Neighbours, list[Row]]:
    """Train centrally; evaluate with the history blend (what a device serves) and without
    (the global model alone)."""
    weights, neighbours = train_central(split, config, on_epoch)
    rows = [Row(name, evaluate(model_scorer(weights, neighbours, split, config.history_decay,
                                            use_history=history), split))
            for name, history in (("FedCart central + history", True),
                                  ("FedCart central, global only", False))]
    return weights, neighbours, rows
