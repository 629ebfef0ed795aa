"""The central figure of what a federated evaluation round estimates, for the report to set
beside the estimate.

In the simulation each device holds its user's training baskets (``federated.population``)
and draws its query from them (``protocol.evaluation.query_of``). Here the same queries are
drawn from the same baskets, scored with the evaluated version's bundle as a device scores
its own (its recommend.ort, with the history blend at the bundle's decay), and averaged over
every user: what the round's noised sum over a sample of them estimates. Without noise and
at q = 1 the estimate is this figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcart.data.evaluation import Split, batch_size
from fedcart.edge_client.store import MAX_BASKETS
from fedcart.model_export.bundle import Bundle
from fedcart.model_export.features import history_of
from fedcart.model_export.runtime import Recommender
from fedcart.protocol.evaluation import Query, metric_values, query_of, rank_of_hidden

__all__ = ["central_estimate", "device_queries"]


def device_queries(split: Split) -> list[Query]:
    """The query of every user whose training baskets give one, drawn from the baskets as
    the user's device keeps them (the newest MAX_BASKETS, each basket's distinct items):
    the devices' queries."""
    return [q for baskets in split.train
            if (q := query_of([np.unique(b) for b in baskets[-MAX_BASKETS:]])) is not None]


def central_estimate(bundle: Bundle, queries: list[Query]) -> dict[str, Any]:
    """HitRate@10, NDCG@10 and MRR of ``bundle``'s model over ``queries``, HitRate@10 over
    those whose hidden item is a repeat purchase, and the query count (a figure over no
    query is None); scored :func:`batch_size` queries at a time."""
    weights = bundle.weights()
    recommender = Recommender(bundle.files["recommend.ort"], weights, bundle.neighbours())
    decay, step = bundle.manifest.history_decay, batch_size(weights.n_items)
    ranks: list[float] = []
    for start in range(0, len(queries), step):
        batch = queries[start:start + step]
        scores = recommender.all_scores(
            [q.cart for q in batch], [history_of(q.history, decay, q.cart) for q in batch])
        ranks += [rank_of_hidden(row, q.cart, q.hidden)
                  for row, q in zip(scores, batch, strict=True)]
    hit, ndcg, rr = metric_values(np.array(ranks))
    repeat = np.array([q.repeat for q in queries], bool)
    return {"hr": _mean(hit), "ndcg": _mean(ndcg), "mrr": _mean(rr),
            "repeat_hr": _mean(hit[repeat]), "queries": len(queries)}


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None
