"""Offline recommendation on the device: a verified bundle, item keys in, ranked items out.

The cached onnxruntime session runs the bundle's ``recommend.ort`` (ONNX Runtime Mobile's
format); the user's own history, when given, is blended in by the graph and never leaves
the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcart.model_export.bundle import Bundle
from fedcart.model_export.features import history_of
from fedcart.model_export.runtime import Recommender

__all__ = ["OfflineRecommender", "Recommendation", "UnknownItemError"]


class UnknownItemError(KeyError):
    """An item id that is not in the bundle's catalog."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Recommendation:
    item: str
    name: str
    score: float


class OfflineRecommender:
    """Recommendations from one verified bundle; cheap to call repeatedly."""

    def __init__(self, bundle: Bundle) -> None:
        self.manifest = bundle.manifest
        self.items, self.names = bundle.items, bundle.names
        self.index = {item: i for i, item in enumerate(self.items)}
        self._recommender = Recommender(bundle.files["recommend.ort"], bundle.weights(),
                                        bundle.neighbours())

    def indices(self, items: Sequence[str]) -> np.ndarray:
        unknown = [i for i in items if i not in self.index]
        if unknown:
            raise UnknownItemError(f"not in this model's catalog of {self.manifest.n_items} "
                                   f"items: {', '.join(map(repr, unknown))}")
        return np.array([self.index[i] for i in items], dtype=np.int64)

    def recommend(self, cart: Sequence[str], k: int = 10,
                  history: Sequence[Sequence[str]] = ()) -> list[Recommendation]:
        """Top-k items for ``cart``; ``history`` is the user's past baskets, oldest first."""
        ids = self.indices(cart)
        past = [self.indices(b) for b in history]
        features = history_of(past, self.manifest.history_decay, ids)
        top_ids, scores = self._recommender.top_k([ids], k, [features])
        return [Recommendation(self.items[i], self.names[i], float(s))
                for i, s in zip(top_ids[0], scores[0], strict=True) if np.isfinite(s)]
