"""User-level differential privacy of federated rounds, accounted with Google's dp-accounting.

One round's cost is a frozen :class:`RoundCharge`. Each enrolled user is Poisson-sampled with
rate q; a sampled user's contribution is an integer vector whose L2 norm (Gaussian) or L1
norm (Laplace) is at most the integer sensitivity Delta (the encoder,
fedcart/protocol/update.py, enforces it); the int64 sum of the contributions gets integer
noise from fedcart/aggregator/noise.py:
the discrete Gaussian with sigma = z Delta, or the discrete Laplace with scale b = z Delta,
z being the charge's noise multiplier (:attr:`RoundCharge.noise_scale` gives the float the
sampler must use). The ledger is the list of charges; epsilon is always recomputed from it
by :func:`epsilon_spent`, never kept as a running number that could drift. A charge is
tested against the budget by a dry run before it is committed.

What the accounting rests on
----------------------------
Discrete Gaussian, unsampled (q = 1), RDP. For integer vectors x, y with ||x - y||_2 <= Delta,
D_alpha(x + N_Z(0, sigma^2)^d || y + N_Z(0, sigma^2)^d) <= alpha Delta^2 / (2 sigma^2) for all
alpha >= 1, whatever the dimension d (Canonne, Kamath and Steinke 2020, Theorem 14: the
multivariate discrete Gaussian is rho-zCDP with rho = Delta^2 / (2 sigma^2),
:func:`discrete_gaussian_rho`. Per entry, completing the square leaves the Renyi sum a theta
function of the shift (1 - alpha) v_j, largest at integers: the bound is an equality at
integer orders; entries add up). That is the continuous Gaussian's Renyi curve at
z = 1 / sqrt(2 rho), so ``GaussianDpEvent(z)`` accounts the round exactly. (The extra tau d
term of Kairouz, Liu and Steinke 2021 belongs to a sum of several discrete Gaussians, noise
added by the devices; here the aggregator adds one.)

Discrete Gaussian, Poisson-sampled, and every PLD figure. dp-accounting's sampled-Gaussian
RDP and its PLDs are theorems about the continuous Gaussian, so they are applied to a
continuous mechanism the discrete one is, up to a negligible factor, a post-processing of.
Let K(t) draw from N_Z(t, s^2) (a discrete Gaussian centred at the real t), s = SMOOTHING.
For integer mu, K applied to N(mu, sigma^2 - s^2) has, at every integer, probability within
a factor exp(+-gamma) of N_Z(mu, sigma^2)'s, with gamma about 2 exp(-2 pi^2 s^2) = 1e-34
(Poisson summation: the theta functions of s and sigma are 1 up to that). Applied entry by
entry to a vector of at most noise.MAX_SIZE entries, and to any mixture of integer sums (as
Poisson sampling makes), every round's output law is within exp(+-beta), beta = MAX_SIZE
gamma < 1e-21, of a post-processing of the continuous Gaussian mechanism with noise
multiplier z_eff = sqrt(sigma^2 - s^2) / Delta <= z (:func:`effective_noise_multiplier`,
rounded down to 16 significant bits so that rounds whose Delta differ a little are one group).
Post-processing never increases a divergence, so the accountants at z_eff bound the discrete
mechanism once the slack is added: (2 alpha - 1) / (alpha - 1) beta <= 12 beta per round to
the RDP at the orders used (all >= 1.1), and (epsilon + 2B, e^B delta) for the PLD, B being
the ledger's total slack. For Delta in fixed-point steps (thousands) z_eff / z = 1 - O(1 /
(z Delta)^2): the rigour costs nothing measurable. It needs sigma >= 2 s = 4 steps; a charge
with less noise is refused. (Zhu and Wang 2019's bound for any Poisson-sampled mechanism,
fed the exact RDP curve, was the alternative: it nearly doubled the calibrated z at q >= 0.1.)

Discrete Laplace. The pmf ratio of x + noise to y + noise is at most exp(||x - y||_1 / b), so a
round is pure epsilon-DP with epsilon = Delta / b <= 1 / z, in any dimension. Every pair of
epsilon-DP output laws is a post-processing of randomized response RR_epsilon, P = (p, 1 - p)
against Q = (1 - p, p) with p = e^epsilon / (1 + e^epsilon) (Kairouz, Oh and Viswanath 2015);
with Poisson sampling, joint convexity and that post-processing bound the round by the pair
(1 - q) Q + q P against Q, in both directions (Zhu, Dong and Wang 2022 for the PLD). The
discrete Laplace of parameter epsilon and sensitivity 1 has exactly RR_epsilon's privacy
loss, so the PLD is dp-accounting's ``from_discrete_laplace_mechanism(1 / z, sensitivity=1,
sampling_prob=q)``, which takes both directions; the RDP is the two-point pair's, both
directions, in closed form (:func:`laplace_rdp`). This is tight for the worst epsilon-DP
mechanism; the scalar discrete Laplace's own PLD (parameter 1 / b, sensitivity Delta) is
exact only for d = 1 and gave at most 7% less epsilon in the cases tried.

Legacy charges (``sensitivity=None``) were noised in floating point before the discrete
samplers; they are accounted as the continuous mechanisms they claimed to be (no accounting
repairs what Mironov's attack could read from them).

Accountants: "rdp" (the default: the budget check and calibration) and "pld" (tighter,
reported next to it). Both are upper bounds under the statements above.

A run spends its budget over a plan of stages (:class:`Stage`): the statistics rounds, each
one release of a noised sum, and the training rounds. Their noise multipliers are fixed
ratios of one scale, which :func:`calibrate_plan` sets so the whole plan spends the target.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import NamedTuple

import dp_accounting
import numpy as np
from dp_accounting import rdp
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from fedcart.aggregator.noise import MAX_SCALE, MAX_SIZE

__all__ = [
    "ACCOUNTANTS",
    "SLACK",
    "SMOOTHING",
    "Budget",
    "BudgetExceeded",
    "Mechanism",
    "RoundCharge",
    "Stage",
    "calibrate_noise_multiplier",
    "calibrate_plan",
    "check_accountable",
    "check_budget",
    "default_delta",
    "discrete_gaussian_rho",
    "effective_noise_multiplier",
    "epsilon_spent",
    "laplace_rdp",
]

# The RDP accountant warns for every low order it cannot evaluate and then leaves it out,
# which is the documented behaviour; the warnings only drown the service's own log.
logging.getLogger("absl").setLevel(logging.ERROR)

ACCOUNTANTS = ("rdp", "pld")
ORDERS = tuple(DEFAULT_RDP_ORDERS)  # all >= 1.1, where the slack factor is at most 12
PLD_INTERVAL = 1e-3  # value discretization of the PLDs (pessimistic: an upper bound)
SMOOTHING = 2.0  # s: the discrete Gaussian's continuous shadow has variance sigma^2 - s^2
_SLACK_FACTOR = (2 * min(ORDERS) - 1) / (min(ORDERS) - 1)  # (2 alpha - 1) / (alpha - 1)


class Mechanism(StrEnum):
    """The noise added to a round's sum. String-valued so JSON and TOML configs and the
    ledger's text column hold the plain names."""

    GAUSSIAN = "gaussian"  # discrete Gaussian, L2 sensitivity
    LAPLACE = "laplace"  # discrete Laplace, L1 sensitivity


class BudgetExceeded(RuntimeError):
    """Running the round would spend more than the privacy budget."""


def discrete_gaussian_rho(sensitivity: float, sigma: float) -> float:
    """rho = Delta^2 / (2 sigma^2): the discrete Gaussian N_Z(0, sigma^2)^d added to integer
    vectors at L2 distance <= Delta is rho-zCDP, in any dimension d (CKS 2020, Theorem 14)."""
    return sensitivity**2 / (2.0 * sigma**2)


def _theta_excess(s: float) -> float:
    """2 sum_{k >= 1} exp(-2 pi^2 s^2 k^2): by how much sum_k exp(-(k - t)^2 / 2 s^2) /
    (sqrt(2 pi) s) can differ from 1, over all real t."""
    return 2.0 * math.fsum(math.exp(-2.0 * math.pi**2 * s**2 * k**2) for k in range(1, 64))


def _shadow_slack() -> float:
    """beta: a round's output law is within exp(+-beta) of its continuous shadow's
    post-processing. Per entry the log-ratio lies in [log(1 - eta_s) - log(1 + eta_sigma),
    log(1 + eta_s)], and eta_sigma <= eta_s as sigma >= s; at most MAX_SIZE entries."""
    eta = _theta_excess(SMOOTHING)
    return MAX_SIZE * (math.log1p(eta) - math.log1p(-eta))


SLACK = _shadow_slack()  # about 2e-22


def effective_noise_multiplier(noise_multiplier: float, sensitivity: int) -> float:
    """z_eff: sqrt(sigma^2 - s^2) / Delta at sigma = z Delta, the noise multiplier of the
    continuous Gaussian that the discrete one with sigma is (up to exp(+-beta)) a
    post-processing of. Rounded down to 16 significant bits, so rounds whose Delta differ a
    little (it follows the group size) are accounted as one group."""
    sigma = noise_multiplier * sensitivity
    if not sigma >= 2 * SMOOTHING:
        raise ValueError(f"a discrete Gaussian needs sigma = z * Delta >= {2 * SMOOTHING:g} "
                         f"steps to be accounted, got {noise_multiplier:g} * {sensitivity} "
                         f"= {sigma:.4g}: raise the noise multiplier or the fixed-point scale")
    exact = math.sqrt(noise_multiplier**2 - (SMOOTHING / sensitivity) ** 2)
    mantissa, exponent = math.frexp(exact * (1.0 - 2.0**-40))  # below the float error above
    return math.ldexp(math.floor(mantissa * 2.0**16) / 2.0**16, exponent)


@dataclass(frozen=True)
class RoundCharge:
    """The privacy cost of one round.

    ``sampling_rate`` q: each enrolled user takes part independently with probability q.
    ``noise_multiplier`` z: the noise's sigma (Gaussian) or scale b (Laplace) divided by the
    sensitivity. ``sensitivity`` Delta: the integer bound on one user's contribution (L2 norm
    for the Gaussian, L1 for the Laplace), in the steps the noise is sampled in; None for a
    legacy charge, noised in floating point, accounted as the continuous mechanism.
    """

    round_id: int
    sampling_rate: float
    noise_multiplier: float
    mechanism: Mechanism = Mechanism.GAUSSIAN
    sensitivity: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError(f"sampling rate must lie in (0, 1], got {self.sampling_rate}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0.0):
            raise ValueError(f"noise multiplier must be positive, got {self.noise_multiplier}")
        try:
            object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        except ValueError:
            raise ValueError(f"mechanism must be one of {[m.value for m in Mechanism]}, got "
                             f"{self.mechanism!r}") from None
        if self.sensitivity is None:
            return
        if isinstance(self.sensitivity, bool) or not isinstance(self.sensitivity, int) or \
                self.sensitivity < 1:
            raise ValueError(f"sensitivity must be a positive integer, got {self.sensitivity!r}")
        if self.noise_scale > MAX_SCALE:
            raise ValueError(f"noise scale z * Delta = {self.noise_scale:.4g} exceeds the "
                             f"samplers' limit {MAX_SCALE:g}")
        if self.mechanism is Mechanism.GAUSSIAN:
            effective_noise_multiplier(self.noise_multiplier, self.sensitivity)  # checks sigma

    @property
    def noise_scale(self) -> float:
        """The sigma or b to sample with: the least float >= z * Delta."""
        if self.sensitivity is None:
            raise ValueError("a legacy charge (no sensitivity) has no integer noise scale")
        scale = self.noise_multiplier * self.sensitivity
        if Fraction(scale) < Fraction(self.noise_multiplier) * self.sensitivity:
            scale = math.nextafter(scale, math.inf)
        return scale

    @property
    def effective_noise_multiplier(self) -> float:
        """z_eff <= z: the continuous Gaussian noise multiplier the accountants charge
        (Poisson-sampled rounds, PLD); z itself for a legacy or a Laplace charge."""
        if self.sensitivity is None or self.mechanism is Mechanism.LAPLACE:
            return self.noise_multiplier
        return effective_noise_multiplier(self.noise_multiplier, self.sensitivity)

    @property
    def slack(self) -> float:
        """beta: the discrete Gaussian round's output law is within exp(+-beta) of its
        continuous shadow's post-processing (0 where no shadow is used)."""
        if self.sensitivity is None or self.mechanism is Mechanism.LAPLACE:
            return 0.0
        return SLACK


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 <= self.delta < 1:
            raise ValueError(f"a budget needs epsilon > 0 and 0 <= delta < 1, got {self}")


def laplace_rdp(epsilon: float, sampling_rate: float,
                orders: Sequence[float] = ORDERS) -> np.ndarray:
    """The Renyi divergences, at ``orders``, of randomized response RR_epsilon
    Poisson-sampled at rate q: the larger of D(M || Q) and D(Q || M), M = (1 - q) Q + q P,
    P = (p, 1 - p), Q = (1 - p, p), p = e^eps / (1 + e^eps). An upper bound for any
    Poisson-sampled epsilon-DP mechanism, the discrete Laplace included."""
    log_p = -math.log1p(math.exp(-epsilon))  # log(e^eps / (1 + e^eps))
    log_1p = -epsilon + log_p  # log(1 / (1 + e^eps))
    log_q = np.array([log_1p, log_p])  # Q; P is its reverse
    if sampling_rate == 1.0:
        log_m = log_q[::-1]
    else:
        log_m = np.logaddexp(math.log1p(-sampling_rate) + log_q,
                             math.log(sampling_rate) + log_q[::-1])
    a = np.asarray(orders, dtype=np.float64)[:, None]

    def divergence(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
        terms = a * log_x[None, :] + (1 - a) * log_y[None, :]
        return np.logaddexp(terms[:, 0], terms[:, 1]) / (a[:, 0] - 1)

    return np.maximum(np.maximum(divergence(log_m, log_q), divergence(log_q, log_m)), 0.0)


class _Term(NamedTuple):
    """What the accountants need of a charge: mechanism, q, z, the z_eff charged for the
    continuous shadow, and the shadow's slack."""

    mechanism: Mechanism
    sampling_rate: float
    noise_multiplier: float
    effective: float
    slack: float


def _groups(charges: Iterable[RoundCharge]) -> list[tuple[_Term, int]]:
    """The charges' terms, counted: the accountants compose a group in one step, not one
    per round."""
    counts = Counter(_Term(c.mechanism, c.sampling_rate, c.noise_multiplier,
                           c.effective_noise_multiplier, c.slack) for c in charges)
    return sorted(counts.items(), key=str)


def _rdp_epsilon(groups: list[tuple[_Term, int]], delta: float) -> float:
    gaussian = rdp.RdpAccountant(ORDERS)
    total = np.zeros(len(ORDERS))
    for term, count in groups:
        q = term.sampling_rate
        if term.mechanism is Mechanism.LAPLACE:
            total += count * laplace_rdp(1.0 / term.noise_multiplier, q)
        elif q == 1.0:  # CKS: exactly the continuous Gaussian's curve at z = 1 / sqrt(2 rho)
            gaussian.compose(dp_accounting.GaussianDpEvent(term.noise_multiplier), count)
        else:
            gaussian.compose(dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(term.effective)), count)
            total += count * _SLACK_FACTOR * term.slack
    return float(compute_epsilon(ORDERS, gaussian.rdp + total, delta)[0])


def _pld_epsilon(groups: list[tuple[_Term, int]], delta: float) -> float:
    composed = pld_lib.identity(value_discretization_interval=PLD_INTERVAL)
    slack = 0.0
    for term, count in groups:
        q = term.sampling_rate
        if term.mechanism is Mechanism.LAPLACE:
            part = pld_lib.from_discrete_laplace_mechanism(
                1.0 / term.noise_multiplier, sensitivity=1,
                value_discretization_interval=PLD_INTERVAL, sampling_prob=q).self_compose(count)
        elif q == 1.0:  # count unsampled Gaussians are one of noise multiplier z / sqrt(count)
            part = pld_lib.from_gaussian_mechanism(
                term.effective / math.sqrt(count),
                value_discretization_interval=PLD_INTERVAL)
        else:
            part = pld_lib.from_gaussian_mechanism(
                term.effective, value_discretization_interval=PLD_INTERVAL,
                sampling_prob=q).self_compose(count)
        composed = composed.compose(part)
        slack += count * term.slack
    return float(composed.get_epsilon_for_delta(delta * math.exp(-slack))) + 2.0 * slack


def epsilon_spent(charges: Iterable[RoundCharge], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``charges`` composed (0 for none): by Renyi DP ("rdp",
    which the budget is checked with) or privacy loss distributions ("pld", tighter)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    groups = _groups(charges)
    if not groups:
        return 0.0
    return (_rdp_epsilon if accountant == "rdp" else _pld_epsilon)(groups, delta)


def check_budget(ledger: Sequence[RoundCharge], charge: RoundCharge, budget: Budget,
                 accountant: str = "rdp") -> float:
    """Epsilon after ``charge``, by a dry run; raises BudgetExceeded if over ``budget``."""
    after = epsilon_spent([*ledger, charge], budget.delta, accountant)
    if after > budget.epsilon:
        spent = epsilon_spent(ledger, budget.delta, accountant)
        raise BudgetExceeded(
            f"round {charge.round_id} would bring epsilon from {spent:.4g} to {after:.4g} at "
            f"delta {budget.delta:g}, over the budget of {budget.epsilon:g}; no further "
            "round can run under this budget")
    return after


def check_accountable(mechanism: Mechanism | str, sampling_rate: float, target_epsilon: float,
                      delta: float, *, noise_multiplier: float | None = None,
                      sensitivity: int | None = None) -> None:
    """Raise ValueError, saying why, unless rounds of ``mechanism`` at ``sampling_rate`` can
    be accounted at ``delta`` and calibrated to ``target_epsilon`` (0: no calibration).
    Cheap (no accounting is run): for configuration time. With ``noise_multiplier`` and
    ``sensitivity`` it also checks that such a round's charge can be made (a discrete
    Gaussian needs z * Delta >= 4 steps)."""
    try:
        mechanism = Mechanism(mechanism)
    except ValueError:
        raise ValueError(f"mechanism must be one of {[m.value for m in Mechanism]}, got "
                         f"{mechanism!r}") from None
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"the sampling rate must lie in (0, 1], got {sampling_rate}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}: both accountants give "
                         "epsilon at a positive delta")
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0.0):
        raise ValueError(f"the target epsilon must be finite and >= 0, got {target_epsilon}")
    if noise_multiplier is not None and sensitivity is not None:
        RoundCharge(0, sampling_rate, noise_multiplier, mechanism, sensitivity)


@dataclass(frozen=True)
class Stage:
    """``rounds`` rounds at sampling rate q whose noise multiplier is ``ratio`` times the
    plan's scale; ``sensitivity``: the least Delta (in steps) these rounds will have, if
    known, so calibration charges what they will (a larger Delta only costs less)."""

    sampling_rate: float
    ratio: float
    rounds: int = 1
    sensitivity: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or not self.ratio > 0:
            raise ValueError(f"a stage needs rounds >= 1 and ratio > 0, got {self}")


def calibrate_plan(target_epsilon: float, delta: float, stages: Sequence[Stage],
                   mechanism: Mechanism | str = Mechanism.GAUSSIAN,
                   accountant: str = "rdp") -> float:
    """The smallest scale s (to a relative 1e-5, rounded up) for which the stages, stage i
    at noise multiplier ``ratio_i * s``, together spend at most ``target_epsilon`` at
    ``delta``, as :func:`epsilon_spent` with ``accountant`` counts it."""
    if not stages:
        raise ValueError("a plan needs at least one stage")
    check_accountable(mechanism, min(s.sampling_rate for s in stages), target_epsilon, delta)
    if target_epsilon <= 0:
        raise ValueError(f"the target epsilon must be positive, got {target_epsilon}")
    mechanism = Mechanism(mechanism)

    @functools.cache
    def spent(scale: float) -> float:
        charges = [(RoundCharge(0, s.sampling_rate, s.ratio * scale, mechanism,
                                s.sensitivity), s.rounds) for s in stages]
        return epsilon_spent([c for c, n in charges for _ in range(n)], delta, accountant)

    # below this a discrete Gaussian stage has sigma < 4 steps, which cannot be charged
    floor = max([1e-3] + [2.0 * SMOOTHING / (s.ratio * s.sensitivity) * (1 + 1e-12)
                          for s in stages
                          if s.sensitivity is not None and mechanism is Mechanism.GAUSSIAN])
    # bracket: spent(low) > target >= spent(high), starting from 1 and doubling or halving
    high = max(floor, 1.0)
    if spent(high) <= target_epsilon:
        low = high
        while spent(low) <= target_epsilon:
            if low == floor:
                return floor
            high, low = low, max(low / 2.0, floor)
    else:
        low = high
        while spent(high) > target_epsilon:
            low, high = high, 2.0 * high
            if high > 1e9:
                raise ValueError(f"no noise scale up to 1e9 spends at most {target_epsilon:g}")
    while high - low > 1e-5 * high:  # spent(low) > target >= spent(high)
        middle = (low + high) / 2.0
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               rounds: int, mechanism: Mechanism | str = Mechanism.GAUSSIAN,
                               sensitivity: int | None = None) -> float:
    """The smallest noise multiplier z for which ``rounds`` rounds at sampling rate q spend
    at most ``target_epsilon`` at ``delta`` (RDP accountant)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    return calibrate_plan(target_epsilon, delta,
                          [Stage(sampling_rate, 1.0, rounds, sensitivity)], mechanism)


def default_delta(n_users: int) -> float:
    """delta for a population of N users: (the float just under) 1 / (100 N).

    A user's (epsilon, delta) guarantee may fail outright with probability delta, so by the
    union bound the chance that it fails for some user is at most N delta: here 1%, the cap
    the aggregator's configuration puts on N delta. The common 1 / N^1.1 leaves N delta =
    N^-0.1, still 0.4 at N = 10,000. Going lower costs epsilon: each factor of ten in delta
    adds about 8-15% to a Gaussian plan's epsilon at the settings FedCart runs.
    """
    if n_users < 1:
        raise ValueError(f"the population must be at least 1, got {n_users}")
    delta = 1.0 / (100.0 * n_users)
    while delta * n_users > 0.01:
        delta = math.nextafter(delta, 0.0)
    return delta
