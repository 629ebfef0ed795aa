"""User-level differential privacy of federated rounds, accounted with Google's dp-accounting.

One round's cost is a frozen :class:`RoundCharge`: each enrolled user is Poisson-sampled with
rate q, and the sum of the sampled users' clipped updates (L2 norm <= C) gets Gaussian noise
N(0, (z C)^2), i.e. ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; or, for pure epsilon-DP,
updates clipped in L1 norm get Laplace noise of scale z C, ``LaplaceDpEvent(z)``. The ledger is
the list of charges; epsilon is always recomputed from it by composition (RDP for the budget
check, PLD for the tight reported figure), never kept as a running number that could drift.
A charge is tested against the budget by a dry run before it is committed.

A run spends its budget over a plan of stages (:class:`Stage`): the statistics rounds, each
one release of a Gaussian sum, and the training rounds. Their noise multipliers are fixed
ratios of one scale, which :func:`calibrate_plan` sets so the whole plan spends the target.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

__all__ = [
    "Budget",
    "BudgetExceeded",
    "RoundCharge",
    "Stage",
    "calibrate_noise_multiplier",
    "calibrate_plan",
    "check_budget",
    "composed_event",
    "epsilon_spent",
]

# The RDP accountant warns for every low order it cannot evaluate and then leaves it out,
# which is the documented behaviour; the warnings only drown the service's own log.
logging.getLogger("absl").setLevel(logging.ERROR)

GAUSSIAN = "gaussian"
LAPLACE = "laplace"
MECHANISMS = (GAUSSIAN, LAPLACE)


class BudgetExceeded(RuntimeError):
    """Running the round would spend more than the privacy budget."""


@dataclass(frozen=True)
class RoundCharge:
    """The privacy cost of one round.

    ``sampling_rate`` q: each enrolled user takes part independently with probability q.
    ``noise_multiplier`` z: noise standard deviation (Gaussian) or scale (Laplace) divided by
    the sensitivity C of one user's contribution.
    """

    round_id: int
    sampling_rate: float
    noise_multiplier: float
    mechanism: str = GAUSSIAN

    def __post_init__(self) -> None:
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling rate must lie in (0, 1], got {self.sampling_rate}")
        if not self.noise_multiplier > 0.0:
            raise ValueError(f"noise multiplier must be positive, got {self.noise_multiplier}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")

    def event(self) -> dp_accounting.DpEvent:
        inner: dp_accounting.DpEvent
        if self.mechanism == GAUSSIAN:
            inner = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        else:
            inner = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        if self.sampling_rate == 1.0:
            return inner
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, inner)


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 <= self.delta < 1:
            raise ValueError(f"a budget needs epsilon > 0 and 0 <= delta < 1, got {self}")


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=1e-3)
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {kind!r}")


def composed_event(charges: Iterable[RoundCharge]) -> dp_accounting.DpEvent:
    """All charges as one event; rounds with the same mechanism, q and z are grouped into
    one self-composition (the accountants compute that in one step, not one per round)."""
    counts = Counter((c.sampling_rate, c.noise_multiplier, c.mechanism) for c in charges)
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(RoundCharge(0, q, z, m).event(), count)
        for (q, z, m), count in sorted(counts.items())])


def epsilon_spent(charges: Iterable[RoundCharge], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``charges`` composed (0 for none)."""
    charges = list(charges)
    if not charges:
        return 0.0
    acc = _accountant(accountant)
    acc.compose(composed_event(charges))
    return float(acc.get_epsilon(delta))


def check_budget(ledger: Sequence[RoundCharge], charge: RoundCharge, budget: Budget) -> float:
    """Epsilon after ``charge``, by a dry run; raises BudgetExceeded if over ``budget``."""
    after = epsilon_spent([*ledger, charge], budget.delta)
    if after > budget.epsilon:
        spent = epsilon_spent(ledger, budget.delta)
        raise BudgetExceeded(
            f"round {charge.round_id} would bring epsilon from {spent:.4g} to {after:.4g} at "
            f"delta {budget.delta:g}, over the budget of {budget.epsilon:g}; no further "
            "round can run under this budget")
    return after


@dataclass(frozen=True)
class Stage:
    """``rounds`` Gaussian rounds at sampling rate q whose noise multiplier is ``ratio``
    times the plan's scale."""

    sampling_rate: float
    ratio: float
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.ratio > 0:
            raise ValueError(f"a stage needs rounds >= 1 and ratio > 0, got {self}")


def calibrate_plan(target_epsilon: float, delta: float, stages: Sequence[Stage]) -> float:
    """The smallest scale s for which the stages, stage i at noise multiplier
    ``ratio_i * s``, together spend at most ``target_epsilon`` at ``delta`` (RDP)."""
    if not stages:
        raise ValueError("a plan needs at least one stage")

    def event(scale: float) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
            RoundCharge(0, stage.sampling_rate, stage.ratio * scale).event(), stage.rounds)
            for stage in stages])

    scale = dp_accounting.calibrate_dp_mechanism(
        rdp.RdpAccountant, event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    return float(math.nextafter(scale, math.inf))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               rounds: int) -> float:
    """The smallest Gaussian noise multiplier z for which ``rounds`` rounds at sampling
    rate q spend at most ``target_epsilon`` at ``delta`` (RDP accountant)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    return calibrate_plan(target_epsilon, delta, [Stage(sampling_rate, 1.0, rounds)])
