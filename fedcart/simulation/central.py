"""Central runs for data scientists: the baselines table and the central FedCart model,
each as named rows of the evaluation protocol's metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedcart.data import baselines
from fedcart.data.evaluation import Metrics, Split, evaluate
from fedcart.model_export.model import Neighbours, Weights
from fedcart.simulation.central_training import TrainConfig, model_scorer, train_central

__all__ = ["EASE_LAMBDA", "Row", "baseline_notes", "baseline_rows", "central_rows"]

# The regularization of the reference figures (DESIGN.md 6); 250 elsewhere.
EASE_LAMBDA = {"uci": 500.0, "instacart": 250.0}
DEFAULT_EASE_LAMBDA = 250.0


@dataclass(frozen=True)
class Row:
    name: str
    metrics: Metrics

    def as_json(self) -> dict[str, object]:
        return self.metrics.as_row(self.name)


def baseline_notes(split: Split) -> list[str]:
    """What the O(V^2) baselines leave out of a catalog this large (baselines.Head), if
    anything: a line each."""
    notes = (baselines.cooccurrence_head(split).note("co-occurrence (cosine)"),
             baselines.ease_head(split).note("EASE"))
    return [note for note in notes if note is not None]


def baseline_rows(split: Split, ease_lambda: float | None = None,
                  on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Popularity, co-occurrence (cosine), EASE and the user's own history. The O(V^2)
    ones run over the most popular items that fit in memory (baselines.Head), and their
    names say so when that is not the whole catalog."""
    lam = ease_lambda if ease_lambda is not None else EASE_LAMBDA.get(split.name,
                                                                      DEFAULT_EASE_LAMBDA)
    co_head, ease_head = baselines.cooccurrence_head(split), baselines.ease_head(split)
    scorers = [("popularity", lambda: baselines.popularity(split)),
               (f"co-occurrence ({co_head.label('cosine')})",
                lambda: baselines.cooccurrence(split, co_head)),
               (f"EASE ({ease_head.label(f'lambda {lam:g}')})",
                lambda: baselines.ease(split, lam, ease_head)),
               ("own history (device only)", lambda: baselines.own_history(split))]
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
