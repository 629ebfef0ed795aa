"""The update a device sends, and what the aggregator may conclude from the sum of many:
one definition for both sides.

A device clips its vector to norm C (L2, or L1 for the Laplace mechanism), weights a training
update by ``w = min(n_examples / weight_cap, 1)`` (so ``w`` never exceeds 1), and rounds
``w * clip(v) * scale`` to integers whose norm is at most :attr:`UpdateFormat.sensitivity`
(``secagg.fixedpoint.bounded_round``). That integer bound, not C, is what the noise is
calibrated to and what the accountant charges: rounding cannot raise a device's norm past it.

No weight travels: the mean's denominator is fixed by the server (McMahan et al. 2018), so no
device sets the scale of the update. What an honest group's sum can be is known from the
format alone, and a sum is brought back into that range (:meth:`UpdateFormat.clamp` before
the noise, :meth:`UpdateFormat.limit_norm` after it): that bounds, though it does not
remove, what a lying device can add (docs/security.md says how much).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcart.protocol.terms import Norm, RoundTerms, Task
from fedcart.secagg.fixedpoint import (
    LANE,
    MIN_PACKED_SCALE,
    WORD,
    bounded_round,
    fold,
    pack,
    packed_scale_for,
    scale_for,
    to_words,
    unpack,
    words_to_ints,
)

__all__ = ["SLACK", "TRAIN", "UpdateFormat", "clip"]

TRAIN = Task.TRAIN  # a training round's task; statistics rounds: model_export.statistics
# the integer bound's margin over C * scale: room for stochastic rounding's variance, so that
# a device's contribution rarely has to shrink to fit (docs/security.md)
SLACK = 1 / 32


def clip(delta: np.ndarray, clip_norm: float, norm: Norm = Norm.L2) -> tuple[np.ndarray, bool]:
    """Scale ``delta`` down to norm ``clip_norm``; returns it (float64) and whether it was
    clipped."""
    delta = np.asarray(delta, dtype=np.float64)
    size = float(np.linalg.norm(delta, ord=Norm(norm).order))
    if not np.isfinite(size):
        raise ValueError("the update has NaN or infinite entries")
    if size <= clip_norm:
        return delta, False
    return delta * (clip_norm / size), True


@dataclass(frozen=True)
class UpdateFormat:
    """How vectors of ``n_params`` values are clipped, weighted and encoded when at most
    ``group_size`` of them are summed under one secure aggregation."""

    n_params: int
    clip_norm: float
    group_size: int
    weight_cap: float = 1.0
    norm: Norm = Norm.L2
    # two values per word (secagg.fixedpoint): for inputs whose every value lies in [0, 1],
    # as a statistic's do; a training update's signed deltas never are
    packed: bool = False
    # every value lies in [0, 1] (checked on encoding): a statistic's, packed or not
    unit: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", Norm(self.norm))
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0 and self.weight_cap > 0
                and self.group_size >= 1 and self.n_params >= 1):
            raise ValueError("clip norm and weight cap must be positive, group size and "
                             "n_params at least 1")
        if self.packed and not self.unit:
            raise ValueError("only values in [0, 1] (unit) can be packed")
        if self.packed and not self.can_pack(self.group_size):
            raise ValueError(f"a group of {self.group_size} is too large to pack")
        if self.sensitivity < 1:
            raise ValueError(f"clip norm {self.clip_norm} is below one step of the scale")

    @classmethod
    def of(cls, terms: RoundTerms) -> UpdateFormat:
        """The format a round's terms set."""
        return cls(terms.n_params, terms.clip_norm, terms.group_size, terms.weight_cap,
                   terms.norm, terms.packed, unit=terms.task is not Task.TRAIN)

    @staticmethod
    def can_pack(group_size: int) -> bool:
        """Whether a group this large still gets MIN_PACKED_SCALE steps per unit."""
        return packed_scale_for(group_size) >= MIN_PACKED_SCALE

    @property
    def vector_len(self) -> int:
        return (self.n_params + 1) // 2 if self.packed else self.n_params

    @property
    def scale(self) -> float:
        """Steps per unit: packed, the most whose lanes cannot carry; else the most whose
        group sum of integers within :attr:`sensitivity` stays within int32."""
        if self.packed:
            return float(packed_scale_for(self.group_size))
        return scale_for(self.clip_norm * (1 + SLACK), self.group_size)

    @property
    def sensitivity(self) -> int:
        """The most one device's integer vector can weigh, in the format's norm: what the
        noise is calibrated to, in steps."""
        return math.ceil(self.clip_norm * self.scale * (1 + SLACK))

    @property
    def entry_range(self) -> tuple[int, int]:
        """The least and greatest integer one honest device sends in one entry."""
        if self.unit:
            return 0, min(math.ceil(self.scale), self.sensitivity)
        return -self.sensitivity, self.sensitivity

    def weight(self, n_examples: int) -> float:
        return min(n_examples / self.weight_cap, 1.0)

    def integers(self, values: np.ndarray, n_examples: int = 1) -> np.ndarray:
        """A device's integer vector: ``values`` clipped, weighted, scaled, and rounded
        within the sensitivity."""
        if values.shape != (self.n_params,):
            raise ValueError(f"update has shape {values.shape}, expected ({self.n_params},)")
        # only the nonzero entries (NaN among them) are clipped and rounded: a zero stays
        # zero either way, and a statistic has a few hundred nonzeros in 500,000 values
        support = np.flatnonzero(values)
        clipped, _ = clip(values[support], self.clip_norm, self.norm)
        if self.unit and clipped.size and (clipped.min() < 0 or clipped.max() > 1):
            raise ValueError("a statistic's values must lie in [0, 1]")
        x = self.weight(n_examples) * clipped * self.scale
        out = np.zeros(self.n_params, np.int64)
        # clipping's float product can land an ulp above C * scale; the bound has SLACK
        out[support] = bounded_round(x, self.sensitivity, self.norm.order)
        return out

    def encode(self, values: np.ndarray, n_examples: int = 1) -> np.ndarray:
        """The uint32 vector a device masks and sends."""
        r = self.integers(values, n_examples)
        return pack(r) if self.packed else to_words(r)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The int64 sums, one per value, from a group's modular sum of encodings."""
        if total.shape != (self.vector_len,):
            raise ValueError(f"sum has shape {total.shape}, expected ({self.vector_len},)")
        return unpack(total, self.n_params) if self.packed else words_to_ints(total)

    def clamp(self, sums: np.ndarray, n_inputs: int) -> tuple[np.ndarray, int]:
        """``sums`` (a group's, decoded) brought into n times an entry's honest range, read
        modulo the word or lane (``secagg.fixedpoint.fold``), and how many entries were
        outside it. Honest sums are never changed, and the fold never moves two sums further
        apart, so one honest device still moves the result by at most the sensitivity
        whatever a lying device sent: the DP guarantee holds. (Refusing such a sum would
        not: whether a round is refused would then depend on an honest device's input.)
        ``n_inputs`` at most the group size (the scale's headroom is for that many)."""
        if not 1 <= n_inputs <= self.group_size:
            raise ValueError(f"a group of this format has 1 to {self.group_size} inputs")
        low, high = self.entry_range
        folded = fold(sums, n_inputs * low, n_inputs * high, LANE if self.packed else WORD)
        return folded, int(np.count_nonzero(folded != sums))

    def limit_norm(self, values: np.ndarray, n_inputs: int,
                   noise_norm: float = 0.0) -> tuple[np.ndarray, bool]:
        """``values`` (a noised sum of ``n_inputs`` devices, in the values' units) scaled
        down into the ball honest inputs can reach, n sensitivities plus ``noise_norm``
        (a bound, in steps, that the noise's norm exceeds with negligible probability); and
        whether it had to be. Applied after the noise, so it is post-processing: it costs
        no privacy and depends on no input without noise."""
        radius = (n_inputs * self.sensitivity + noise_norm) / self.scale
        size = float(np.linalg.norm(values, ord=self.norm.order))
        if size <= radius:
            return values, False
        return values * (radius / size), True

    def values(self, sums: np.ndarray) -> np.ndarray:
        """Integer sums (noised or not) back in the values' units."""
        return np.asarray(sums, dtype=np.float64) / self.scale

