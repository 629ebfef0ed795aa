"""SecAgg+ parameters for a fleet (secagg.params) against scipy's binomial distribution and
against dropouts drawn on the real neighbour graph; the cohort split (secagg.groups); and
late messages in the server core."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import binom

from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.errors import LateMessage, ProtocolViolation
from fedcart.secagg.graph import neighbours
from fedcart.secagg.groups import split_cohort
from fedcart.secagg.local import run_local_round
from fedcart.secagg.messages import AdvertiseKeys
from fedcart.secagg.params import binomial_cdf, choose, minimum_group
from fedcart.secagg.server import ServerRound, ServerState
from tests.test_secagg_round import Setup


@pytest.mark.parametrize(("n", "p"), [(20, 0.9), (40, 0.1), (90, 0.8), (200, 0.05), (7, 0.5)])
def test_binomial_cdf_matches_scipy_down_to_tiny_tails(n: int, p: float) -> None:
    for x in range(-1, n + 1):
        expected = binom.cdf(x, n, p)
        assert binomial_cdf(x, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def _scipy_bounds(n: int, k: int, t: int, dropout: float, corrupt: float) -> tuple[float, float]:
    failure = n * binom.cdf(t - 1, k, 1 - dropout)
    shares = n * binom.sf(2 * t - k - 1, k, corrupt) if corrupt else 0.0
    graph = 0.0 if k >= n - 1 else n * (dropout + corrupt) ** (k // 2)
    return failure, shares + graph


@pytest.mark.parametrize(("n", "dropout", "corrupt"),
                         [(200, 0.1, 0.0), (1000, 0.2, 0.0), (4335, 0.1, 0.0),
                          (1000, 0.1, 0.05), (867, 0.2, 0.02)])
def test_choose_meets_both_bounds_with_the_smallest_even_degree(n: int, dropout: float,
                                                                corrupt: float) -> None:
    p = choose(n, dropout, corrupt, failure_bound=1e-6)
    assert p.degree % 2 == 0 and p.degree // 2 < p.threshold <= p.degree
    failure, disclosure = _scipy_bounds(n, p.degree, p.threshold, dropout, corrupt)
    assert failure <= 1e-6 and disclosure <= 2.0 ** -40
    assert p.failure == pytest.approx(failure, rel=1e-6)
    smaller = p.degree - 2  # no threshold works for the next smaller degree
    assert not any(max(_scipy_bounds(n, smaller, t, dropout, corrupt)[0] / 1e-6,
                       _scipy_bounds(n, smaller, t, dropout, corrupt)[1] / 2.0 ** -40) <= 1
                   for t in range(smaller // 2 + 1, smaller + 1))


def test_choose_reports_what_a_small_group_risks_instead_of_promising() -> None:
    p = choose(12, 0.1, 0.05)
    assert p.complete and p.disclosure <= 2.0 ** -40 and p.failure > 1e-6
    assert "failure <=" in p.describe()


def _failed_trials(n: int, k: int, t: int, dropout: float, trials: int) -> int:
    """Rounds, over random dropouts on the real graph, in which some client (survivor or
    not) has fewer than t surviving neighbours: its secret could not be rebuilt."""
    graph = neighbours(range(n), k, bytes(32))
    adjacency = np.array([sorted(graph[u]) for u in range(n)])
    rng = np.random.default_rng(1)  # draws dropouts for the test, not for any secret
    failed = 0
    for _ in range(trials):
        alive = rng.random(n) >= dropout
        failed += int((alive[adjacency].sum(axis=1) < t).any())
    return failed


def test_chosen_parameters_survive_dropouts_that_sink_the_old_ones() -> None:
    """4,335 devices, 20% of them dropping: the old k = 20, t = 11 fails almost every round,
    k and t chosen for 20% fail none of 200."""
    n = 4335
    assert _failed_trials(n, 20, 11, 0.2, 200) >= 190
    p = choose(n, 0.2)
    assert _failed_trials(n, p.degree, p.threshold, 0.2, 200) == 0


def test_minimum_group_keeps_enough_honest_survivors() -> None:
    for anonymity, dropout, corrupt in [(20, 0.1, 0.0), (100, 0.2, 0.05), (5, 0.3, 0.1)]:
        g = minimum_group(anonymity, dropout, corrupt)
        honest = 1 - dropout - corrupt
        assert binom.cdf(anonymity - 1, g, honest) <= 2.0 ** -40
        assert binom.cdf(anonymity - 1, g - 1, honest) > 2.0 ** -40


def test_split_cohort_partitions_into_balanced_random_groups() -> None:
    ids = list(range(3, 4338))
    groups = split_cohort(ids, 1000)
    assert len(groups) == 5
    assert sorted(i for g in groups for i in g) == ids
    assert {len(g) for g in groups} == {867}
    assert split_cohort(ids, 1000) != groups  # drawn from the OS CSPRNG each time
    fixed = random.Random(7)
    again = random.Random(7)
    assert (split_cohort(ids, 300, fixed.randbytes) == split_cohort(ids, 300, again.randbytes))
    assert max(len(g) for g in split_cohort(ids[:1001], 500)) - min(
        len(g) for g in split_cohort(ids[:1001], 500)) <= 1
    assert split_cohort([1, 2, 3], 1000) == [(1, 2, 3)]
    with pytest.raises(ValueError, match="distinct"):
        split_cohort([1, 1, 2], 10)


def test_a_client_dropped_for_lateness_is_late_not_malicious() -> None:
    s = Setup()
    replies = s.step()  # advertise
    s.deliver(replies)
    shares = s.step()  # everyone's encrypted shares, held back
    slow = next(iter(shares))
    s.deliver({c: m for c, m in shares.items() if c != slow})
    s.server.deadline()  # the slow client is dropped as absent
    assert s.server.state == ServerState.MASKED and slow in s.server.dropped
    dropped_before = dict(s.server.dropped)
    with pytest.raises(LateMessage):
        s.server.receive(slow, shares[slow][0])
    assert s.server.dropped == dropped_before and s.server.state == ServerState.MASKED
    # a client still in the round that replays an earlier message is a violation, dropped
    s.deliver(s.step())
    other = next(c for c in s.clients if c != slow)
    with pytest.raises(ProtocolViolation, match="out of phase"):
        s.server.receive(other, shares[other][0])
    assert other in s.server.dropped


def test_a_message_after_the_round_is_late() -> None:
    inputs = {i: np.arange(5, dtype=np.uint32) for i in range(6)}
    run = run_local_round(inputs, 4, 3)
    assert run.server.state == ServerState.DONE
    client = run.clients[0]
    signature = client.identity.sign(AdvertiseKeys.signed_part(1, 0, bytes(32), bytes(32)))
    with pytest.raises(LateMessage):
        run.server.receive(0, AdvertiseKeys(1, 0, bytes(32), bytes(32), signature).encode())
    assert run.server.state == ServerState.DONE


def test_a_client_dropped_before_the_round_starts_is_left_out() -> None:
    keys = {i: IdentityKey.generate() for i in range(5)}
    server = ServerRound(1, {i: k.public for i, k in keys.items()}, 4, 3, 4,
                         IdentityKey.generate())
    server.drop(0, "left")  # its leave came while the round notices went out
    server.start()
    assert server.dropped == {0: "left"}
    assert {cid for cid, _ in server.data_to_send()} == {1, 2, 3, 4}
