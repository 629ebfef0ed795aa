"""Privacy accounting against dp-accounting built independently and closed forms; DP noise
against scipy's distributions; the update codec against numpy; the server optimizers."""

from __future__ import annotations

from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import stats

from aggregator import noise
from aggregator.optimizer import FedAdam, FedAvg, make_optimizer
from aggregator.privacy import (
    Budget,
    BudgetExceeded,
    RoundCharge,
    Stage,
    calibrate_noise_multiplier,
    calibrate_plan,
    check_budget,
    epsilon_spent,
)
from model_export.update import UpdateFormat, clip


def test_grouped_ledger_equals_round_by_round_composition() -> None:
    charges = [RoundCharge(i, 0.02, 1.1) for i in range(30)]
    charges += [RoundCharge(30 + i, 0.05, 0.8) for i in range(10)]
    reference = rdp.RdpAccountant()
    for c in charges:  # built here, not through RoundCharge.event()
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
    assert epsilon_spent([RoundCharge(0, 1.0, 2.0)], 1e-5, "pld") == pytest.approx(exact,
                                                                                   rel=0.01)
    assert epsilon_spent([RoundCharge(0, 1.0, 2.0)], 1e-5, "rdp") >= exact  # RDP is an upper bound


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [epsilon_spent([RoundCharge(i, 0.1, 1.0)] * r, 1e-5) for i, r in
           enumerate([1, 10, 100])]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon_spent([RoundCharge(0, 0.1, 2.0)] * 10, 1e-5) < eps[1]
    assert epsilon_spent([], 1e-5) == 0.0


def test_calibration_is_tight() -> None:
    z = calibrate_noise_multiplier(4.0, 1e-5, 0.05, 50)
    assert epsilon_spent([RoundCharge(0, 0.05, z)] * 50, 1e-5) <= 4.0
    assert epsilon_spent([RoundCharge(0, 0.05, z * 0.98)] * 50, 1e-5) > 4.0


def test_budget_is_checked_before_the_round() -> None:
    z = calibrate_noise_multiplier(2.0, 1e-5, 0.1, 5)
    ledger = [RoundCharge(i, 0.1, z) for i in range(5)]
    assert epsilon_spent(ledger, 1e-5) <= 2.0
    with pytest.raises(BudgetExceeded, match=r"round 5 would bring epsilon from .* over the "
                                             r"budget of 2"):
        check_budget(ledger, RoundCharge(5, 0.1, z), Budget(2.0, 1e-5))
    assert check_budget(ledger[:4], ledger[4], Budget(2.0, 1e-5)) <= 2.0


def test_laplace_rounds_are_accounted() -> None:
    one = epsilon_spent([RoundCharge(0, 1.0, 2.0, "laplace")], 1e-5, "pld")
    assert one == pytest.approx(0.5, abs=0.02)  # pure epsilon = sensitivity / scale
    sampled = epsilon_spent([RoundCharge(0, 0.1, 2.0, "laplace")] * 10, 1e-5, "pld")
    assert 0 < sampled < 10 * one


def test_charges_validate() -> None:
    for bad in [(0.0, 1.0), (1.5, 1.0), (0.1, 0.0)]:
        with pytest.raises(ValueError):
            RoundCharge(0, *bad)
    with pytest.raises(ValueError, match="mechanism"):
        RoundCharge(0, 0.1, 1.0, "exponential")


def test_gaussian_and_laplace_noise_have_the_right_law() -> None:
    g = noise.gaussian(50_000, 3.0)
    assert stats.kstest(g / 3.0, "norm").pvalue > 1e-4
    lap = noise.laplace(50_000, 0.5)
    assert stats.kstest(lap, "laplace", args=(0, 0.5)).pvalue > 1e-4
    seed = bytes(32)
    np.testing.assert_array_equal(noise.gaussian(10, 1.0, seed), noise.gaussian(10, 1.0, seed))
    assert not np.array_equal(noise.gaussian(10, 1.0), noise.gaussian(10, 1.0))


def test_update_codec_sums_like_numpy() -> None:
    rng = np.random.default_rng(0)
    fmt = UpdateFormat(n_params=500, clip_norm=2.0, cohort_size=50, weight_cap=100.0)
    deltas = [rng.normal(0, 0.05, 500) for _ in range(50)]
    examples = rng.integers(1, 300, 50)
    total = np.zeros(fmt.vector_len, dtype=np.uint32)
    for d, n in zip(deltas, examples, strict=True):
        total += fmt.encode(d, int(n))
    summed, weight_sum = fmt.decode(total)
    weights = np.minimum(examples / 100.0, 1.0)
    clipped = [clip(d, 2.0)[0] for d in deltas]
    np.testing.assert_allclose(summed, sum(w * c for w, c in zip(weights, clipped,
                                                                   strict=True)),
                               atol=50 / fmt.scale)
    assert weight_sum == pytest.approx(weights.sum(), abs=50 / fmt.scale)
    with pytest.raises(ValueError, match="shape"):
        fmt.encode(np.zeros(3), 1)


def test_packed_statistics_sum_like_numpy() -> None:
    """A statistics round's packed format: half the words, the same sums (to rounding)."""
    rng = np.random.default_rng(1)
    fmt = UpdateFormat(n_params=501, clip_norm=3.0, cohort_size=200, weight_cap=1.0,
                       packed=True)
    plain = UpdateFormat(n_params=501, clip_norm=3.0, cohort_size=200, weight_cap=1.0)
    assert fmt.vector_len == 251 and plain.vector_len == 502
    vectors = [(rng.random(501) < 0.05).astype(float) for _ in range(200)]
    total = np.zeros(fmt.vector_len, dtype=np.uint32)
    for v in vectors:
        total += fmt.encode(v, 1)
    summed, devices = fmt.decode(total)
    assert devices == 200.0  # the weight word of 1 per device is exact
    want = sum(clip(v, 3.0)[0] for v in vectors)
    # stochastic rounding: at most one step per device, on average none
    assert np.abs(summed - want).max() <= 200 / 64
    assert abs((summed - want).mean()) < 0.05
    with pytest.raises(ValueError, match="too large to pack"):
        UpdateFormat(n_params=5, clip_norm=1.0, cohort_size=20_000, packed=True)
    with pytest.raises(ValueError, match="lie in"):
        fmt.encode(-vectors[0], 1)  # a signed update is never packed


def test_clip_bounds_the_norm() -> None:
    big = np.full(100, 1.0)
    clipped, was = clip(big, 2.0)
    assert was and np.linalg.norm(clipped) == pytest.approx(2.0)
    small, was = clip(big * 0.01, 2.0)
    assert not was and np.array_equal(small, big * 0.01)
    l1, _ = clip(big, 5.0, "l1")
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
