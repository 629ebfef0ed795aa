"""The update a device sends: its clipped, weighted model delta and its weight, encoded in
Z_2^32 for secure aggregation. Device and aggregator share this one definition.

Vector layout: ``[w * clip(delta), w]`` with ``w = min(n_examples / weight_cap, 1)``. Every
coordinate then lies in [-max(C, 1), max(C, 1)], so the fixed-point scale chosen for the
cohort size keeps the cohort's sum from wrapping, and one user's contribution to the first
part has norm <= C: the sensitivity the DP noise is calibrated to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from secagg.fixedpoint import (
    MIN_PACKED_SCALE,
    decode_packed_sum,
    decode_sum,
    encode,
    encode_packed,
    packed_scale_for,
    scale_for,
)

__all__ = ["TRAIN", "UpdateFormat", "clip"]

L2, L1 = "l2", "l1"
TRAIN = "train"  # a training round's task; statistics rounds: model_export.statistics


def clip(delta: np.ndarray, clip_norm: float, norm: str = L2) -> tuple[np.ndarray, bool]:
    """Scale ``delta`` down to norm ``clip_norm`` (L2, or L1 for the Laplace mechanism);
    returns it (float64) and whether it was clipped."""
    delta = np.asarray(delta, dtype=np.float64)
    size = float(np.linalg.norm(delta, ord=2 if norm == L2 else 1))
    if not np.isfinite(size):
        raise ValueError("the update has NaN or infinite entries")
    if size <= clip_norm:
        return delta, False
    return delta * (clip_norm / size), True


@dataclass(frozen=True)
class UpdateFormat:
    """How updates of ``n_params`` parameters are clipped, weighted and encoded for a cohort
    of at most ``cohort_size`` devices."""

    n_params: int
    clip_norm: float
    cohort_size: int
    weight_cap: float = 1.0
    norm: str = L2
    # two values per word (secagg.fixedpoint): for inputs whose every value lies in [0, 1],
    # as a statistic's do; a training update's signed deltas never are
    packed: bool = False

    def __post_init__(self) -> None:
        if self.norm not in (L1, L2):
            raise ValueError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if self.clip_norm <= 0 or self.weight_cap <= 0 or self.cohort_size < 1:
            raise ValueError("clip norm and weight cap must be positive, cohort size >= 1")
        if self.packed and not self.can_pack(self.cohort_size):
            raise ValueError(f"a cohort of {self.cohort_size} is too large to pack")

    @staticmethod
    def can_pack(cohort_size: int) -> bool:
        """Whether a cohort this large still gets MIN_PACKED_SCALE steps per unit."""
        return packed_scale_for(cohort_size) >= MIN_PACKED_SCALE

    @property
    def vector_len(self) -> int:
        return (self.n_params + 2) // 2 if self.packed else self.n_params + 1

    @property
    def bound(self) -> float:
        return max(self.clip_norm, 1.0)

    @property
    def scale(self) -> float:
        return scale_for(self.bound, self.cohort_size)

    def weight(self, n_examples: int) -> float:
        return min(n_examples / self.weight_cap, 1.0)

    def encode(self, delta: np.ndarray, n_examples: int) -> np.ndarray:
        """The uint32 vector a device masks and sends."""
        if delta.shape != (self.n_params,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.n_params},)")
        clipped, _ = clip(delta, self.clip_norm, self.norm)
        w = self.weight(n_examples)
        if self.packed:
            return encode_packed(np.append(w * clipped, w), packed_scale_for(self.cohort_size))
        return encode(np.append(w * clipped, w), self.scale, self.bound)

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """(sum of weighted deltas, sum of weights) from the cohort's modular sum."""
        if total.shape != (self.vector_len,):
            raise ValueError(f"sum has shape {total.shape}, expected ({self.vector_len},)")
        values = (decode_packed_sum(total, packed_scale_for(self.cohort_size),
                                    self.n_params + 1) if self.packed
                  else decode_sum(total, self.scale))
        return values[:-1], float(values[-1])
