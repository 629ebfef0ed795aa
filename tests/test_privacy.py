"""Privacy accounting against dp-accounting built independently, OpenDP's privacy maps, closed
forms and brute-force Renyi divergences of the discrete mechanisms; the server optimizers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from fractions import Fraction

import dp_accounting
import numpy as np
import opendp.prelude as dp
import pytest
from dp_accounting import pld, rdp
from scipy import integrate
from scipy.special import logsumexp

from fedcart.aggregator import privacy
from fedcart.aggregator.optimizer import FedAdam, FedAvg, make_optimizer
from fedcart.aggregator.privacy import (
    SMOOTHING,
    Budget,
    BudgetExceeded,
    Mechanism,
    RoundCharge,
    Stage,
    calibrate_noise_multiplier,
    calibrate_plan,
    check_accountable,
    check_budget,
    default_delta,
    discrete_gaussian_rho,
    effective_noise_multiplier,
    epsilon_spent,
    laplace_rdp,
)
from fedcart.protocol.terms import Norm
from fedcart.protocol.update import clip

GAUSSIAN, LAPLACE = Mechanism.GAUSSIAN, Mechanism.LAPLACE


def rdp_of(event: dp_accounting.DpEvent, orders: list[float]) -> np.ndarray:
    accountant = rdp.RdpAccountant(orders)
    accountant.compose(event)
    return accountant.rdp


def renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    """D_alpha(P || Q) from log-probabilities on a common support."""
    return float(logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1))


def log_discrete_gaussian(x: np.ndarray, mean: int, sigma: float) -> np.ndarray:
    k = np.arange(-int(40 * sigma) - 60, int(40 * sigma) + 61)  # the norm is shift-free
    return -((x - mean) ** 2) / (2 * sigma**2) - logsumexp(-(k**2) / (2 * sigma**2))


def log_discrete_laplace(x: np.ndarray, mean: int, scale: float) -> np.ndarray:
    r = math.exp(-1 / scale)
    return math.log((1 - r) / (1 + r)) - np.abs(x - mean) / scale


def sampled_divergences(log_base: np.ndarray, log_moved: np.ndarray, q: float,
                        alpha: float) -> tuple[float, float]:
    """Both directions of the Poisson-sampled pair: D(M || base) and D(base || M) for
    M = (1 - q) base + q moved."""
    log_m = np.logaddexp(math.log1p(-q) + log_base, math.log(q) + log_moved)
    return renyi(log_m, log_base, alpha), renyi(log_base, log_m, alpha)


# -- legacy (continuous) charges: the accountant is dp-accounting's --------------------------


def test_grouped_ledger_equals_round_by_round_composition() -> None:
    charges = [RoundCharge(i, 0.02, 1.1) for i in range(30)]
    charges += [RoundCharge(30 + i, 0.05, 0.8) for i in range(10)]
    reference = rdp.RdpAccountant()
    for c in charges:  # built here, not through the module's grouping
        reference.compose(dp_accounting.PoissonSampledDpEvent(
            c.sampling_rate, dp_accounting.GaussianDpEvent(c.noise_multiplier)))
    assert epsilon_spent(charges, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    tight = pld.PLDAccountant(value_discretization_interval=1e-3)
    for c in charges:
        tight.compose(dp_accounting.PoissonSampledDpEvent(
            c.sampling_rate, dp_accounting.GaussianDpEvent(c.noise_multiplier)))
    assert epsilon_spent(charges, 1e-5, "pld") == pytest.approx(tight.get_epsilon(1e-5),
                                                                rel=1e-6)


def test_unsampled_gaussian_matches_the_analytic_mechanism() -> None:
    # Balle & Wang's exact epsilon for one Gaussian release of sensitivity 1
    exact = dp_accounting.get_epsilon_gaussian(2.0, 1e-5)
    for charge in [RoundCharge(0, 1.0, 2.0), RoundCharge(0, 1.0, 2.0, GAUSSIAN, 4096)]:
        assert epsilon_spent([charge], 1e-5, "pld") == pytest.approx(exact, rel=0.01)
        assert epsilon_spent([charge], 1e-5, "rdp") >= exact  # RDP is an upper bound


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [epsilon_spent([RoundCharge(i, 0.1, 1.0, GAUSSIAN, 100)] * r, 1e-5) for i, r in
           enumerate([1, 10, 100])]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon_spent([RoundCharge(0, 0.1, 2.0, GAUSSIAN, 100)] * 10, 1e-5) < eps[1]
    assert epsilon_spent([], 1e-5) == 0.0


def test_calibration_is_tight() -> None:
    z = calibrate_noise_multiplier(4.0, 1e-5, 0.05, 50)
    assert epsilon_spent([RoundCharge(0, 0.05, z)] * 50, 1e-5) <= 4.0
    assert epsilon_spent([RoundCharge(0, 0.05, z * 0.98)] * 50, 1e-5) > 4.0
    # with the rounds' sensitivity the plan charges what the rounds will: z_eff < z
    discrete = calibrate_noise_multiplier(4.0, 1e-5, 0.05, 50, GAUSSIAN, sensitivity=20)
    assert discrete > z
    assert epsilon_spent([RoundCharge(0, 0.05, discrete, GAUSSIAN, 20)] * 50, 1e-5) <= 4.0


def test_budget_is_checked_before_the_round() -> None:
    z = calibrate_noise_multiplier(2.0, 1e-5, 0.1, 5)
    ledger = [RoundCharge(i, 0.1, z) for i in range(5)]
    assert epsilon_spent(ledger, 1e-5) <= 2.0
    with pytest.raises(BudgetExceeded, match=r"round 5 would bring epsilon from .* over the "
                                             r"budget of 2"):
        check_budget(ledger, RoundCharge(5, 0.1, z), Budget(2.0, 1e-5))
    assert check_budget(ledger[:4], ledger[4], Budget(2.0, 1e-5)) <= 2.0


def test_a_plan_spends_exactly_its_target_across_stages() -> None:
    stages = [Stage(1.0, 4.0), Stage(1.0, 1.0), Stage(0.05, 5.0, 20)]
    scale = calibrate_plan(8.0, 1e-4, stages)
    charges = [RoundCharge(1, 1.0, 4.0 * scale), RoundCharge(2, 1.0, scale),
               *(RoundCharge(3 + i, 0.05, 5.0 * scale) for i in range(20))]
    assert epsilon_spent(charges, 1e-4) == pytest.approx(8.0, rel=1e-3)
    assert epsilon_spent([replace(c, noise_multiplier=c.noise_multiplier * 0.99)
                          for c in charges], 1e-4) > 8.0
    # a single unsampled Gaussian release: the plan gives what the accountant does alone
    alone = calibrate_plan(8.0, 1e-4, [Stage(1.0, 1.0)])
    assert epsilon_spent([RoundCharge(1, 1.0, alone)], 1e-4) == pytest.approx(8.0, rel=1e-3)
    assert alone < scale  # the other stages took part of the budget
    with pytest.raises(ValueError, match="stage"):
        calibrate_plan(8.0, 1e-4, [])


# -- the discrete Gaussian ---------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.8, 2.5, 6.0])
def test_discrete_gaussian_rho_is_its_renyi_curve(sigma: float) -> None:
    """CKS Theorem 14, checked by brute force: for an integer shift v with ||v||_2 = Delta,
    D_alpha of the product discrete Gaussians is alpha rho at integer orders and at most
    that in between, whatever the dimension; rho does not grow with d."""
    v = [3, 4]  # Delta = 5, in two dimensions
    rho = discrete_gaussian_rho(5, sigma)
    assert rho == 25 / (2 * sigma**2)
    x = np.arange(-int(40 * sigma) - 60, int(40 * sigma) + 60)
    for alpha in [1.5, 2, 2.5, 3, 7]:
        d = sum(renyi(log_discrete_gaussian(x, vj, sigma), log_discrete_gaussian(x, 0, sigma),
                      alpha) for vj in v)
        assert d <= alpha * rho * (1 + 1e-9)
        if float(alpha).is_integer():
            assert d == pytest.approx(alpha * rho, rel=1e-9)


def test_rho_matches_opendps_privacy_map() -> None:
    """OpenDP's map for its integer-vector Gaussian (the sampler noise.py uses) is the same
    rho, and its vector Laplace map the same epsilon = Delta / b, independently derived."""
    for sigma, delta_l2 in [(2.0, 3), (1000.0, 4096), (0.5, 1)]:
        m = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T="i64")),
                               dp.l2_distance(T="i64"), scale=sigma)
        assert m.map(delta_l2) == pytest.approx(discrete_gaussian_rho(delta_l2, sigma),
                                                rel=1e-12)
    charge = RoundCharge(0, 1.0, 2.0, LAPLACE, 1000)
    m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"),
                          scale=charge.noise_scale)
    assert m.map(1000) == pytest.approx(1 / charge.noise_multiplier, rel=1e-12)


@pytest.mark.parametrize("z", [0.05, 0.7, 1.0, 3.3, 40.0])
@pytest.mark.parametrize("sensitivity", [4, 100, 65_536, 2**30])
def test_the_discrete_gaussian_is_never_charged_below_the_papers_bound(
        z: float, sensitivity: int) -> None:
    """z_eff <= z = 1 / sqrt(2 rho): the ledger never reports the discrete mechanism as more
    private than CKS allows; with a fixed-point Delta it gives up nothing measurable."""
    if z * sensitivity < 2 * SMOOTHING:
        with pytest.raises(ValueError, match="steps"):
            RoundCharge(0, 0.5, z, GAUSSIAN, sensitivity)
        return
    charge = RoundCharge(0, 0.5, z, GAUSSIAN, sensitivity)
    z_rho = 1 / math.sqrt(2 * discrete_gaussian_rho(sensitivity, charge.noise_scale))
    assert charge.effective_noise_multiplier <= z_rho <= z * (1 + 1e-15)
    if z * sensitivity >= 1000:  # rounded down to 16 significant bits
        assert charge.effective_noise_multiplier >= z * (1 - 2.0**-15 - 1e-5)
    assert charge.slack < 1e-20


def test_the_noise_scale_is_at_least_z_delta() -> None:
    for z, sensitivity in [(0.1, 3), (1 / 3, 98_304), (0.7, 2**40 // 7), (1e-3, 10**6)]:
        for mechanism in Mechanism:
            if z * sensitivity < 4 and mechanism is GAUSSIAN:
                continue
            scale = RoundCharge(0, 1.0, z, mechanism, sensitivity).noise_scale
            assert Fraction(scale) >= Fraction(z) * sensitivity
            assert Fraction(math.nextafter(scale, 0)) < Fraction(z) * sensitivity
    with pytest.raises(ValueError, match="legacy"):
        _ = RoundCharge(0, 1.0, 1.0).noise_scale


@pytest.mark.parametrize("s", [0.6, SMOOTHING])
def test_the_continuous_shadow_couples_to_the_discrete_gaussian(s: float) -> None:
    """The coupling behind the sampled accounting, by numerical integration: drawing
    N_Z(t, s^2) at a continuous t ~ N(mu, sigma^2 - s^2) gives N_Z(mu, sigma^2) up to a
    factor exp(+-gamma) at every integer (gamma is ~2e-3 at s = 0.6; at the s used it is
    below float precision)."""
    sigma, mu = 4.5, 3
    sigma1 = math.sqrt(sigma**2 - s**2)
    eta_s, eta_sigma = privacy._theta_excess(s), privacy._theta_excess(sigma)
    gamma = max(math.log1p(eta_s), -math.log1p(-eta_s) + math.log1p(eta_sigma))
    ks = np.arange(-200, 201)

    def kernel(t: float, y: int) -> float:  # P[K(t) = y]
        return math.exp(-((y - t) ** 2) / (2 * s**2)) / np.exp(-((ks - t) ** 2) / (2 * s**2)).sum()

    worst = 0.0
    for y in range(mu - 12, mu + 13):
        shadow, _ = integrate.quad(
            lambda t, y=y: math.exp(-((t - mu) ** 2) / (2 * sigma1**2)) * kernel(t, y)
            / (math.sqrt(2 * math.pi) * sigma1), mu - 14 * sigma1, mu + 14 * sigma1,
            limit=400, epsabs=0, epsrel=1e-12, points=[y])
        exact = math.exp(float(log_discrete_gaussian(np.array([y]), mu, sigma)[0]))
        worst = max(worst, abs(math.log(exact / shadow)))
    assert worst <= gamma + 1e-10


@pytest.mark.parametrize("q", [0.01, 0.3, 0.9])
def test_the_sampled_discrete_gaussian_is_within_its_charge(q: float) -> None:
    """Brute force, both directions (the device in, the device out), scalar shift Delta = 3
    at sigma = 4.5: the sampled discrete Gaussian's Renyi divergences lie below what the
    ledger charges, dp-accounting's sampled Gaussian at z_eff plus the slack."""
    charge = RoundCharge(0, q, 1.5, GAUSSIAN, 3)
    orders = [1.5, 2.0, 3.0, 8.0, 20.0]
    charged = rdp_of(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(
        charge.effective_noise_multiplier)), orders) + 12 * charge.slack
    x = np.arange(-300, 301)
    base, moved = log_discrete_gaussian(x, 0, 4.5), log_discrete_gaussian(x, 3, 4.5)
    for alpha, bound in zip(orders, charged, strict=True):
        out, into = sampled_divergences(base, moved, q, alpha)
        assert max(out, into) <= bound * (1 + 1e-9)


def test_rounds_whose_sensitivity_varies_are_accounted_as_one_group() -> None:
    """Delta follows the group size, which follows the Poisson-sampled cohort: z_eff is
    rounded down so that such a ledger costs one composition, not one per round."""
    rng = np.random.default_rng(0)
    ledger = [RoundCharge(i, 0.05, 1.0, GAUSSIAN, int(d))
              for i, d in enumerate(rng.integers(2000, 2200, 300))]
    assert len(privacy._groups(ledger)) <= 2
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(
        effective_noise_multiplier(1.0, 2000))), 300)
    assert epsilon_spent(ledger, 1e-5) <= reference.get_epsilon(1e-5) * (1 + 1e-12)


def test_discrete_gaussian_ledgers_bound_dp_accountings_gaussian() -> None:
    """Charged epsilon >= dp-accounting's sampled Gaussian at z_eff (the continuous shadow),
    and at q = 1 equal to the Gaussian at z (CKS's rho, exact)."""
    for q, z, delta_steps in [(0.05, 1.0, 65_536), (0.5, 3.0, 1000), (0.01, 0.8, 40)]:
        charges = [RoundCharge(i, q, z, GAUSSIAN, delta_steps) for i in range(100)]
        z_eff = charges[0].effective_noise_multiplier
        assert z_eff < z
        reference = rdp.RdpAccountant()
        reference.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(z_eff)), 100)
        charged = epsilon_spent(charges, 1e-5)
        assert charged >= reference.get_epsilon(1e-5)
        assert charged == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    unsampled = rdp.RdpAccountant()
    unsampled.compose(dp_accounting.GaussianDpEvent(2.0), 3)
    assert epsilon_spent([RoundCharge(i, 1.0, 2.0, GAUSSIAN, 7) for i in range(3)], 1e-5) == \
        pytest.approx(unsampled.get_epsilon(1e-5), rel=1e-12)


# -- the discrete Laplace -----------------------------------------------------------------------


@pytest.mark.parametrize("q", [1.0, 0.2, 0.02])
def test_laplace_rdp_bounds_the_sampled_discrete_laplace(q: float) -> None:
    """Randomized response's sampled Renyi divergences bound the sampled discrete Laplace's,
    both directions, for a scalar shift and for a vector one at the same L1 norm."""
    z, delta_l1 = 1.5, 3
    scale = z * delta_l1
    orders = [1.5, 2.0, 4.0, 16.0, 64.0]
    bound = laplace_rdp(1 / z, q, orders)
    x = np.arange(-250, 251)
    scalar = (log_discrete_laplace(x, 0, scale), log_discrete_laplace(x, delta_l1, scale))
    gx, gy = np.meshgrid(np.arange(-120, 121), np.arange(-120, 121))
    vector = ((log_discrete_laplace(gx, 0, scale) + log_discrete_laplace(gy, 0, scale)).ravel(),
              (log_discrete_laplace(gx, 1, scale) + log_discrete_laplace(gy, 2, scale)).ravel())
    for alpha, b in zip(orders, bound, strict=True):
        for base, moved in [scalar, vector]:
            if q == 1.0:
                worst = max(renyi(moved, base, alpha), renyi(base, moved, alpha))
            else:
                worst = max(sampled_divergences(base, moved, q, alpha))
            assert worst <= b * (1 + 1e-9)
    # unsampled, it is randomized response's curve, which tends to epsilon
    assert laplace_rdp(1 / z, 1.0, [1e6])[0] == pytest.approx(1 / z, rel=1e-4)


def test_laplace_rounds_are_accounted() -> None:
    one = epsilon_spent([RoundCharge(0, 1.0, 2.0, LAPLACE)], 1e-5, "pld")
    assert one == pytest.approx(0.5, abs=0.01)  # pure epsilon = sensitivity / scale
    assert 0.5 <= epsilon_spent([RoundCharge(0, 1.0, 2.0, LAPLACE)], 1e-5) < 0.52
    for accountant in privacy.ACCOUNTANTS:
        sampled = epsilon_spent([RoundCharge(i, 0.1, 2.0, LAPLACE, 1000) for i in range(10)],
                                1e-5, accountant)
        assert 0 < sampled < 10 * one
    # PLD is the tighter of the two; both bound the scalar discrete Laplace's own PLD
    # (parameter 1 / b, sensitivity Delta: exact in one dimension), and not by much
    charges = [RoundCharge(i, 0.05, 2.0, LAPLACE, 1000) for i in range(100)]
    tight, loose = epsilon_spent(charges, 1e-5, "pld"), epsilon_spent(charges, 1e-5, "rdp")
    scalar = pld.privacy_loss_distribution.from_discrete_laplace_mechanism(
        1 / 2000, sensitivity=1000, value_discretization_interval=1e-3, sampling_prob=0.05)
    exact_1d = scalar.self_compose(100).get_epsilon_for_delta(1e-5)
    assert exact_1d <= tight < loose
    assert tight < 1.1 * exact_1d


def test_sampled_laplace_never_breaks_the_budget_path() -> None:
    """dp-accounting's RDP accountant raises UnsupportedEventError for a Poisson-sampled
    Laplace event; the budget check accounts it (or raises BudgetExceeded)."""
    ledger = [RoundCharge(i, 0.3, 1.0, LAPLACE, 512) for i in range(20)]
    budget = Budget(epsilon_spent(ledger, 1e-6) + 1e-9, 1e-6)
    assert check_budget(ledger[:-1], ledger[-1], budget) <= budget.epsilon
    with pytest.raises(BudgetExceeded):
        check_budget(ledger, RoundCharge(20, 0.3, 1.0, LAPLACE, 512), budget)
    mixed = [*ledger, RoundCharge(20, 0.3, 1.0, GAUSSIAN, 512)]
    for accountant in privacy.ACCOUNTANTS:
        assert math.isfinite(epsilon_spent(mixed, 1e-6, accountant))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_a_laplace_plan_hits_its_target(accountant: str) -> None:
    stages = [Stage(1.0, 4.0), Stage(1.0, 1.0), Stage(0.1, 2.0, 30)]
    scale = calibrate_plan(3.0, 1e-5, stages, LAPLACE, accountant)
    charges = [RoundCharge(0, 1.0, 4 * scale, LAPLACE), RoundCharge(1, 1.0, scale, LAPLACE),
               *(RoundCharge(2 + i, 0.1, 2 * scale, LAPLACE) for i in range(30))]
    assert epsilon_spent(charges, 1e-5, accountant) == pytest.approx(3.0, rel=1e-3)
    assert epsilon_spent(charges, 1e-5, accountant) <= 3.0
    assert epsilon_spent([replace(c, noise_multiplier=c.noise_multiplier * 0.99)
                          for c in charges], 1e-5, accountant) > 3.0
    z = calibrate_noise_multiplier(1.0, 1e-5, 1.0, 1, "laplace")
    assert z == pytest.approx(1.0, rel=0.03)  # one unsampled round: epsilon = 1 / z


# -- configuration -----------------------------------------------------------------------------


def test_charges_validate() -> None:
    for bad in [(0.0, 1.0), (1.5, 1.0), (0.1, 0.0), (0.1, math.inf)]:
        with pytest.raises(ValueError):
            RoundCharge(0, *bad)
    with pytest.raises(ValueError, match="mechanism"):
        RoundCharge(0, 0.1, 1.0, "exponential")  # type: ignore[arg-type]
    for sensitivity in [0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="sensitivity"):
            RoundCharge(0, 0.1, 1.0, GAUSSIAN, sensitivity)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        RoundCharge(0, 0.1, 2.0, LAPLACE, 2**40)
    with pytest.raises(ValueError, match="steps"):
        RoundCharge(0, 0.1, 1.0, GAUSSIAN, 3)
    assert RoundCharge(0, 0.1, 1.0, LAPLACE, 3).noise_scale == 3.0  # no such floor for it


def test_mechanism_is_a_string_enum() -> None:
    assert RoundCharge(0, 1.0, 1.0, "laplace").mechanism is LAPLACE  # type: ignore[arg-type]
    assert Mechanism("gaussian") is GAUSSIAN and GAUSSIAN == "gaussian"
    assert json.dumps({"mechanism": LAPLACE}) == '{"mechanism": "laplace"}'
    assert f"{GAUSSIAN}" == str(GAUSSIAN) == "gaussian"
    with pytest.raises(ValueError):
        Mechanism("none")


def test_check_accountable() -> None:
    for mechanism in [*Mechanism, "gaussian", "laplace"]:
        for q in [1e-4, 0.5, 1.0]:
            check_accountable(mechanism, q, 0.0, 1e-6)
            check_accountable(mechanism, q, 4.0, 1e-6, noise_multiplier=1.0, sensitivity=64)
    for args, message in [(("none", 0.5, 1.0, 1e-5), "mechanism"),
                          (("laplace", 0.0, 1.0, 1e-5), "sampling rate"),
                          (("gaussian", 1.5, 1.0, 1e-5), "sampling rate"),
                          (("gaussian", 0.5, 1.0, 0.0), "delta"),
                          (("laplace", 0.5, 1.0, 1.0), "delta"),
                          (("gaussian", 0.5, math.nan, 1e-5), "target epsilon"),
                          (("gaussian", 0.5, -1.0, 1e-5), "target epsilon")]:
        with pytest.raises(ValueError, match=message):
            check_accountable(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        check_accountable("gaussian", 0.5, 1.0, 1e-5, noise_multiplier=0.01, sensitivity=64)


@pytest.mark.parametrize("n", [1, 3, 7, 60, 1000, 49_999, 10**9])
def test_default_delta_keeps_n_delta_at_one_percent(n: int) -> None:
    delta = default_delta(n)
    assert delta * n <= 0.01
    assert delta * n == pytest.approx(0.01, rel=1e-12)
    with pytest.raises(ValueError):
        default_delta(0)


def test_effective_noise_multiplier_refuses_too_little_noise() -> None:
    z_eff = effective_noise_multiplier(1.0, 4)  # sigma = 4 steps, the least accepted
    assert math.sqrt(1 - 0.25) * (1 - 2.0**-15) <= z_eff <= math.sqrt(1 - 0.25)
    with pytest.raises(ValueError, match="steps"):
        effective_noise_multiplier(0.9, 4)


# -- not privacy: the clip the sensitivity rests on, and the server optimizers ---------------


def test_clip_bounds_the_norm() -> None:
    big = np.full(100, 1.0)
    clipped, was = clip(big, 2.0)
    assert was and np.linalg.norm(clipped) == pytest.approx(2.0)
    small, was = clip(big * 0.01, 2.0)
    assert not was and np.array_equal(small, big * 0.01)
    l1, _ = clip(big, 5.0, Norm.L1)
    assert np.abs(l1).sum() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="NaN"):
        clip(np.array([np.nan]), 1.0)


def test_server_optimizers() -> None:
    w = np.zeros(3)
    delta = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(FedAvg(0.5).step(w, delta), 0.5 * delta)
    adam = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    out = adam.step(w, delta)
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = 0.1 * (m / 0.1) / (np.sqrt(v / 0.01) + 1e-3)
    np.testing.assert_allclose(out, expected)
    restored = FedAdam(lr=0.1)
    restored.load(adam.state())
    np.testing.assert_allclose(restored.step(out, delta), adam.step(out, delta))
    with pytest.raises(ValueError):
        make_optimizer("sgd", 1.0)
