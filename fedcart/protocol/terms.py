"""A round's terms: every parameter of a round that bears on what a device computes and
sends, as one typed value that travels inside the server-signed round config
(``secagg.messages.RoundConfig.terms``).

The aggregator builds a :class:`RoundTerms`; the device receives its bytes only inside a
config whose signature it checked against its pinned server key, decodes them here, checks
them against its own policy (``protocol.policy``) and computes its input from them alone.
Nothing privacy-relevant arrives outside the signature: a server that wants a device to clip
at a larger norm must sign that term, and the device's policy refuses it.

Bytes: canonical JSON (sorted keys, no spaces, no NaN), decoded strictly: a missing,
unknown or mistyped field is a :class:`TermsError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["MAX_TERMS", "Norm", "RoundTerms", "Task", "TermsError", "TrainingPlan"]

MAX_TERMS = 64 << 10  # the longest terms a device decodes (a head of 4,096 ids fits)


class Task(StrEnum):
    """What a round computes: a training step, one of the statistics rounds, or the
    current model's quality on the devices' own baskets."""

    TRAIN = "train"
    POPULARITY = "popularity"
    COOCCURRENCE = "cooccurrence"
    EVALUATE = "evaluate"


class Norm(StrEnum):
    """The norm a contribution is clipped in: L2 for the Gaussian mechanism, L1 for
    Laplace."""

    L2 = "l2"
    L1 = "l1"

    @property
    def order(self) -> int:
        return 2 if self is Norm.L2 else 1


class TermsError(ValueError):
    """Round terms that are malformed, or that a device's policy refuses."""


@dataclass(frozen=True)
class TrainingPlan:
    """What a training round's devices do locally."""

    epochs: int
    batch_size: int
    learning_rates: tuple[float, ...]  # one per tensor of model.TENSOR_NAMES
    examples: int  # leave-one-out examples of its newest basket a device trains on
    groups: tuple[str, ...]  # the tensors trained and uploaded


@dataclass(frozen=True)
class RoundTerms:
    """One round's terms. ``group_size``: the largest group's device count, which fixes the
    fixed-point scale; ``head``: a co-occurrence round's item ids; ``training``: a training
    round's plan; ``model_version``: the model a training round updates or an evaluation round
    scores."""

    task: Task
    vocabulary_sha256: str
    n_params: int
    clip_norm: float
    norm: Norm
    packed: bool
    group_size: int
    weight_cap: float = 1.0
    model_version: int = 0
    head: tuple[int, ...] = ()
    training: TrainingPlan | None = None

    def __post_init__(self) -> None:
        if not (self.n_params >= 1 and self.group_size >= 1 and self.model_version >= 0):
            raise TermsError("n_params and group_size must be positive, model_version >= 0")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0
                and math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise TermsError("clip_norm and weight_cap must be positive and finite")
        if (self.task is Task.TRAIN) != (self.training is not None):
            raise TermsError("a training round, and only one, carries a training plan")
        if (self.task is Task.COOCCURRENCE) != bool(self.head):
            raise TermsError("a co-occurrence round, and only one, names head items")
        if self.training is not None and (
                min(self.training.epochs, self.training.batch_size, self.training.examples) < 1
                or not all(math.isfinite(r) and r >= 0 for r in self.training.learning_rates)):
            raise TermsError("a training plan needs positive epochs, batch size and "
                             "examples, and finite non-negative learning rates")

    def to_bytes(self) -> bytes:
        fields: dict[str, Any] = {
            "task": self.task.value, "vocabulary_sha256": self.vocabulary_sha256,
            "n_params": self.n_params, "clip_norm": self.clip_norm, "norm": self.norm.value,
            "packed": self.packed, "group_size": self.group_size,
            "weight_cap": self.weight_cap, "model_version": self.model_version,
            "head": list(self.head), "training": None}
        if self.training is not None:
            t = self.training
            fields["training"] = {"epochs": t.epochs, "batch_size": t.batch_size,
                                  "learning_rates": list(t.learning_rates),
                                  "examples": t.examples, "groups": list(t.groups)}
        data = json.dumps(fields, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()
        if len(data) > MAX_TERMS:
            raise TermsError(f"the terms take {len(data)} bytes, more than {MAX_TERMS}")
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTerms:
        """Decode and check; any defect is a TermsError."""
        if len(data) > MAX_TERMS:
            raise TermsError(f"the terms take {len(data)} bytes, more than {MAX_TERMS}")
        try:
            raw = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise TermsError(f"the terms are not JSON: {exc}") from None
        f = _Fields(raw, "terms")
        training = None
        f.seen.add("training")
        if raw.get("training") is not None:
            t = _Fields(raw["training"], "training")
            training = TrainingPlan(
                epochs=t.integer("epochs"), batch_size=t.integer("batch_size"),
                learning_rates=tuple(t.numbers("learning_rates")),
                examples=t.integer("examples"), groups=tuple(t.texts("groups")))
            t.done()
        try:
            task, norm = Task(f.text("task")), Norm(f.text("norm"))
        except ValueError as exc:
            raise TermsError(str(exc)) from None
        terms = cls(task=task, vocabulary_sha256=f.text("vocabulary_sha256"),
                    n_params=f.integer("n_params"), clip_norm=f.number("clip_norm"), norm=norm,
                    packed=f.flag("packed"), group_size=f.integer("group_size"),
                    weight_cap=f.number("weight_cap"), model_version=f.integer("model_version"),
                    head=tuple(f.integers("head")), training=training)
        f.done()
        return terms


def _finite(value: float, what: str) -> float:
    """``value`` as a float; an integer too large for one is a TermsError."""
    try:
        return float(value)
    except OverflowError:
        raise TermsError(f"{what} is too large") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


class _Fields:
    """Typed reads from one decoded JSON object; ``done`` refuses fields never read."""

    def __init__(self, raw: object, what: str) -> None:
        if not isinstance(raw, dict):
            raise TermsError(f"{what} must be a JSON object")
        self.raw, self.what, self.seen = raw, what, set[str]()

    def _get(self, key: str, kinds: tuple[type, ...]) -> Any:
        if key not in self.raw:
            raise TermsError(f"{self.what} lack {key!r}")
        value = self.raw[key]
        self.seen.add(key)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise TermsError(f"{self.what}: {key!r} has the wrong type")
        return value

    def integer(self, key: str) -> int:
        return int(self._get(key, (int,)))

    def number(self, key: str) -> float:
        return _finite(self._get(key, (int, float)), f"{self.what}: {key!r}")

    def text(self, key: str) -> str:
        return str(self._get(key, (str,)))

    def flag(self, key: str) -> bool:
        return bool(self._get(key, (bool,)))

    def _list(self, key: str, kinds: tuple[type, ...]) -> list[Any]:
        values = self._get(key, (list,))
        if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
            raise TermsError(f"{self.what}: {key!r} has an entry of the wrong type")
        return values

    def integers(self, key: str) -> list[int]:
        return self._list(key, (int,))

    def numbers(self, key: str) -> list[float]:
        return [_finite(v, f"{self.what}: {key!r}") for v in self._list(key, (int, float))]

    def texts(self, key: str) -> list[str]:
        return self._list(key, (str,))

    def done(self) -> None:
        extra = set(self.raw) - self.seen
        if extra:
            raise TermsError(f"{self.what} carry unknown fields {sorted(extra)}")
