"""SecAgg+ degree and threshold chosen for a fleet, with the bounds that justify them.

The neighbour graph (``secagg.graph``) joins each of n clients to its k nearest on a random
ring. A round goes wrong in three ways, each bounded here as Bell et al. (CCS 2020, section
3) do, by a union bound over the n clients, for clients that drop out independently with
probability ``dropout`` and are corrupt (colluding with the server) with probability
``corrupt``:

- **failure**: some client's secret cannot be rebuilt because fewer than t of its k
  neighbours answer the unmask request: ``n * P[Bin(k, 1 - dropout) < t]``;
- **disclosure by shares**: a malicious server that shows different survivor sets to
  different neighbours of an honest client u gets t shares of u's self-mask seed and t of
  its masking key, and so u's input, when the c corrupt neighbours (who give both) and the
  honest ones split as ``2 (t - c) <= k - c``; it cannot when ``c < 2t - k``:
  ``n * P[Bin(k, corrupt) >= 2t - k]``;
- **disclosure by the graph**: the ring falls apart, and the server learns the sums of its
  pieces, only where k/2 consecutive clients all drop or are corrupt:
  ``n * (dropout + corrupt) ** (k/2)``.

``choose`` returns the smallest even k, and for it the smallest t, that keeps the failure
bound below ``failure_bound`` and both disclosure bounds below ``disclosure_bound`` (2^-40
by default). Past n - 1 the graph is complete (classic SecAgg) and the bounds are what they
are: ``choose`` reports them rather than promise what it cannot.

The tails are summed exactly in log space (``math.lgamma``): no scipy on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedcart.secagg.graph import effective_degree

__all__ = ["DISCLOSURE_BOUND", "SecAggParameters", "binomial_cdf", "choose", "fixed",
           "groups_for", "minimum_group"]

DISCLOSURE_BOUND = 2.0 ** -40


def binomial_cdf(x: int, n: int, p: float) -> float:
    """P[Bin(n, p) <= x], summed in log space so that tails far below 1e-300 stay exact
    enough to compare against 2^-40."""
    if x < 0:
        return 0.0
    if x >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             + i * log_p + (n - i) * log_q for i in range(x + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in terms))


def _tail(x: int, n: int, p: float) -> float:
    """P[Bin(n, p) >= x]."""
    return 1.0 - binomial_cdf(x - 1, n, p) if x <= n * p else binomial_cdf(n - x, n, 1 - p)


@dataclass(frozen=True)
class SecAggParameters:
    """One group's SecAgg+ parameters and the probabilities they were chosen to bound."""

    n: int  # clients in the group
    degree: int  # k: neighbours per client (n - 1: the complete graph)
    threshold: int  # t: shares that rebuild a secret
    failure: float  # bound on P[the group fails] at the expected dropout
    disclosure: float  # bound on P[an honest client's input is exposed]

    @property
    def complete(self) -> bool:
        return self.degree >= self.n - 1

    def describe(self) -> str:
        return (f"k={self.degree}, t={self.threshold} (failure <= {self.failure:.1e}, "
                f"disclosure <= {self.disclosure:.1e})")


def _failure(n: int, k: int, t: int, dropout: float) -> float:
    return min(1.0, n * binomial_cdf(t - 1, k, 1.0 - dropout))


def _disclosure(n: int, k: int, t: int, dropout: float, corrupt: float) -> float:
    by_shares = n * _tail(2 * t - k, k, corrupt) if corrupt > 0 else 0.0
    by_graph = 0.0 if k >= n - 1 else n * (dropout + corrupt) ** (k // 2)
    return min(1.0, by_shares + by_graph)


def _safe_threshold(n: int, k: int, dropout: float, corrupt: float, bound: float) -> int | None:
    """The smallest t in (k/2, k] whose disclosure bound is within ``bound`` (it falls as t
    grows, and the failure bound rises: the smallest such t is the best), or None."""
    lo, hi = k // 2 + 1, k
    if _disclosure(n, k, hi, dropout, corrupt) > bound:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _disclosure(n, k, mid, dropout, corrupt) <= bound:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fixed(n: int, degree: int) -> SecAggParameters:
    """A group of n at a requested degree: k rounded up to even and at most n - 1
    (``graph.effective_degree``), t = k/2 + 1, the smallest threshold above k/2; the bounds
    are not computed (nan)."""
    k = effective_degree(n, degree)
    return SecAggParameters(n, k, k // 2 + 1, float("nan"), float("nan"))


def choose(n: int, dropout: float, corrupt: float = 0.0, failure_bound: float = 1e-6,
           disclosure_bound: float = DISCLOSURE_BOUND, max_degree: int | None = None,
           ) -> SecAggParameters:
    """The smallest even k (at most ``max_degree``, and n - 1 for the complete graph) and
    for it the smallest t with k/2 < t <= k meeting both bounds. If no k does, the largest
    k allowed, with the smallest t meeting the disclosure bound (or t = k if none does):
    the bounds it reports then say what the group risks."""
    if n < 2:
        raise ValueError(f"a group needs at least two clients, got {n}")
    if not (0 <= dropout < 1 and 0 <= corrupt < 1 and dropout + corrupt < 1):
        raise ValueError(f"need 0 <= dropout, corrupt and dropout + corrupt < 1, got "
                         f"{dropout}, {corrupt}")
    largest = n - 1 if max_degree is None else min(n - 1, max(2, max_degree))
    k = 2
    while True:
        k = min(k, largest)
        t = _safe_threshold(n, k, dropout, corrupt, disclosure_bound)
        if t is not None and _failure(n, k, t, dropout) <= failure_bound:
            break
        if k == largest:
            t = k if t is None else t
            break
        k += 2
    return SecAggParameters(n, k, t, _failure(n, k, t, dropout),
                            _disclosure(n, k, t, dropout, corrupt))


def groups_for(n: int, group_size: int) -> int:
    """How many groups a cohort of n splits into so that none exceeds ``group_size``; the
    groups then differ in size by at most one, so each holds more than group_size / 2."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    return max(1, -(-n // group_size))


def minimum_group(anonymity: int, dropout: float, corrupt: float = 0.0,
                  disclosure_bound: float = DISCLOSURE_BOUND) -> int:
    """The smallest group in which, but with probability ``disclosure_bound``, at least
    ``anonymity`` honest clients survive to the sum: the server learns each group's sum,
    so this is the group size a device policy of "my input is summed with at least
    ``anonymity - 1`` honest others" requires."""
    if anonymity < 1:
        raise ValueError(f"anonymity must be at least 1, got {anonymity}")
    honest = 1.0 - dropout - corrupt
    if not 0 < honest <= 1:
        raise ValueError("dropout + corrupt must be below 1")
    g = anonymity
    while binomial_cdf(anonymity - 1, g, honest) > disclosure_bound:
        g += 1
    return g
