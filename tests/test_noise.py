"""The integer DP samplers against their exact probability mass functions: chi-square fits
that a rounded continuous distribution fails, exact variances, and Mironov's attack (no
output tells a true 0 from a true 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedcart.aggregator import noise

N = 100_000
ALPHA = 1e-4  # significance of the fits: a correct sampler fails one in 10,000 runs


def gaussian_pmf(sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The discrete Gaussian's pmf, exp(-x^2 / 2 sigma^2) normalised over the integers
    (the mass beyond 14 sigma + 10, below e^-98, is left out)."""
    k = math.ceil(14 * sigma) + 10
    x = np.arange(-k, k + 1)
    w = np.exp(-(x.astype(float) ** 2) / (2 * sigma**2))
    return x, w / w.sum()


def laplace_pmf(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The discrete Laplace pmf in closed form: (1 - r) / (1 + r) r^|x|, r = e^(-1/b)."""
    k = math.ceil(60 * scale) + 10
    x = np.arange(-k, k + 1)
    r = math.exp(-1 / scale)
    return x, (1 - r) / (1 + r) * r ** np.abs(x).astype(float)


def chi_square_pvalue(samples: np.ndarray, x: np.ndarray, pmf: np.ndarray) -> float:
    """Chi-square fit of integer ``samples`` to ``pmf`` on ``x`` (symmetric around 0): one
    bin per value expected at least 5 times, the tails folded into the outermost bins."""
    n = samples.size
    m = int(np.max(np.abs(x[pmf * n >= 5])))
    p = np.array([pmf[x <= -m].sum(), *pmf[(x > -m) & (x < m)], pmf[x >= m].sum()])
    observed = np.bincount(np.clip(samples, -m, m) + m, minlength=2 * m + 1)
    return float(stats.chisquare(observed, p * n / p.sum()).pvalue)


def moments(x: np.ndarray, pmf: np.ndarray) -> tuple[float, float]:
    """Variance and fourth moment."""
    return float((pmf * x**2).sum()), float((pmf * x.astype(float) ** 4).sum())


@pytest.mark.parametrize("sigma", [0.7, 3.0, 20.0])
def test_discrete_gaussian_fits_its_pmf(sigma: float) -> None:
    draws = noise.discrete_gaussian(N, sigma)
    assert draws.dtype == np.int64 and draws.shape == (N,)
    x, pmf = gaussian_pmf(sigma)
    assert chi_square_pvalue(draws, x, pmf) > ALPHA
    variance, fourth = moments(x, pmf)
    se = math.sqrt((fourth - variance**2) / N)
    assert abs(draws.var() - variance) < 6 * se
    assert abs(draws.mean()) < 6 * math.sqrt(variance / N)


@pytest.mark.parametrize("scale", [0.7, 3.0, 20.0])
def test_discrete_laplace_fits_its_pmf(scale: float) -> None:
    draws = noise.discrete_laplace(N, scale)
    assert draws.dtype == np.int64 and draws.shape == (N,)
    x, pmf = laplace_pmf(scale)
    assert chi_square_pvalue(draws, x, pmf) > ALPHA
    r = math.exp(-1 / scale)
    variance, fourth = 2 * r / (1 - r) ** 2, moments(x, pmf)[1]  # closed-form variance
    assert variance == pytest.approx(moments(x, pmf)[0], rel=1e-9)
    se = math.sqrt((fourth - variance**2) / N)
    assert abs(draws.var() - variance) < 6 * se


def test_the_fit_tells_rounded_continuous_noise_apart() -> None:
    """The fits above have power: at small scales a rounded continuous draw has another
    pmf (at sigma 0.7, P[0] is 0.525 rounded against 0.570 discrete), and fails."""
    rng = np.random.default_rng(0)
    x, pmf = gaussian_pmf(0.7)
    assert chi_square_pvalue(np.rint(rng.normal(0, 0.7, N)).astype(np.int64), x, pmf) < 1e-20
    x, pmf = laplace_pmf(0.7)
    rounded = np.rint(rng.laplace(0, 0.7, N)).astype(np.int64)
    assert chi_square_pvalue(rounded, x, pmf) < 1e-20


def outputs_seen_from_both(from0: np.ndarray, from1: np.ndarray, pmf0: dict[int, float],
                           pmf1: dict[int, float]) -> bool:
    """Whether every output value expected at least 30 times from either input was seen
    from both: where one input gives it and the other never does, it reveals the input."""
    n = from0.size
    bulk = [y for y in set(pmf0) | set(pmf1) if max(pmf0.get(y, 0.0), pmf1.get(y, 0.0)) * n >= 30]
    seen0, seen1 = set(from0.tolist()), set(from1.tolist())
    return all((y in seen0) == (y in seen1) for y in bulk)


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_no_output_reveals_the_input(kind: str) -> None:
    """Mironov's attack, at his Laplace b = 5 (and a Gaussian sigma = 5): a true sum of 0
    against 1. Outputs are integers, every integer has positive probability from both inputs
    with a likelihood ratio within the mechanism's bound, and what is seen from one input is
    seen from the other: no output tells them apart with certainty."""
    n, scale = N, 5.0
    sample = noise.discrete_laplace if kind == "laplace" else noise.discrete_gaussian
    x, pmf = laplace_pmf(scale) if kind == "laplace" else gaussian_pmf(scale)
    from0, from1 = 0 + sample(n, scale), 1 + sample(n, scale)
    assert from0.dtype == from1.dtype == np.int64  # no low-order bits to read
    # the exact likelihood ratio of every output seen, from either input, is bounded
    y = np.union1d(from0, from1)
    if kind == "laplace":
        log_ratio = (np.abs(y - 1) - np.abs(y)) / scale
        assert np.abs(log_ratio).max() <= 1 / scale + 1e-12
    else:
        log_ratio = ((y - 1.0) ** 2 - y.astype(float) ** 2) / (2 * scale**2)
        assert np.isfinite(log_ratio).all()
    pmf0 = dict(zip(x.tolist(), pmf.tolist(), strict=True))
    pmf1 = {k + 1: p for k, p in pmf0.items()}
    assert outputs_seen_from_both(from0, from1, pmf0, pmf1)
    # no sublattice either (as a float grid would be): every residue mod 2..16 comes out
    for m in range(2, 17):
        assert np.unique(from0 % m).size == np.unique(from1 % m).size == m


def test_the_attack_check_has_power() -> None:
    """A sampler confined to even integers (a sublattice, as float noise is a grid) hands
    the input's parity to the attacker; the check above catches it."""
    x, pmf = laplace_pmf(2.5)
    pmf0 = {2 * k: p for k, p in zip(x.tolist(), pmf.tolist(), strict=True)}
    pmf1 = {k + 1: p for k, p in pmf0.items()}
    from0, from1 = 2 * noise.discrete_laplace(50_000, 2.5), 1 + 2 * noise.discrete_laplace(
        50_000, 2.5)
    assert not outputs_seen_from_both(from0, from1, pmf0, pmf1)


def test_every_chunk_is_sampled() -> None:
    """Vectors longer than a chunk are filled everywhere (no unset memory left over): at
    sigma 0.3 about 99% of draws are 0, in every chunk (the last one partial, but long
    enough that 5% nonzero is a 1-in-10^30 event), and none is large."""
    size = 2 * noise.CHUNK + 1000
    draws = noise.discrete_gaussian(size, 0.3)
    assert draws.shape == (size,) and np.abs(draws).max() <= 6
    for start in range(0, size, noise.CHUNK):
        assert (draws[start:start + noise.CHUNK] == 0).mean() > 0.95
    assert noise.discrete_laplace(0, 1.0).shape == (0,)


def test_draws_are_fresh() -> None:
    assert not np.array_equal(noise.discrete_gaussian(64, 1e6), noise.discrete_gaussian(64, 1e6))
    assert not np.array_equal(noise.discrete_laplace(64, 1e6), noise.discrete_laplace(64, 1e6))


@pytest.mark.parametrize("size, scale", [(-1, 1.0), (1.5, 1.0), (True, 1.0), (3, 0.0),
                                         (3, -1.0), (3, math.nan), (3, math.inf),
                                         (3, noise.MAX_SCALE * 2)])
def test_bad_arguments_are_refused(size: object, scale: float) -> None:
    for sample in (noise.discrete_gaussian, noise.discrete_laplace):
        with pytest.raises(ValueError):
            sample(size, scale)  # type: ignore[arg-type]
