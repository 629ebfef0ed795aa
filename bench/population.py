"""population: whole-population SecAgg+ rounds with devices dropping at random phases, the
previous single-round code against rounds split into groups, on the same drop schedules.

n = 4,335 devices (the UCI population; quick: 200) each hold d = 64 random uint32 words
(what is measured is how dropouts break rounds, not bandwidth). Per round and dropout rate
(10%, 20%), ``round(dropout * n)`` devices chosen at random vanish, each at a phase drawn
uniformly from ``secagg.local.PHASES``, and the same schedule is run two ways:

- previous: one round of all n with k = min(20, n - 1) rounded up to even, t = k/2 + 1
  (k = 20, t = 11), the code before groups: one device short of shares fails everyone;
- grouped: ``split_cohort(ids, 1000)`` (quick: 100), each group its own round with
  ``choose(len(group), dropout)``; a failed group drops out and the others complete.

A round completes if at least one of its groups is DONE (previous: its one group). A
device's contribution lands if it is among the survivors of a DONE group. Every DONE
group's result is checked to equal its survivors' inputs summed mod 2^32.

Drop schedules and the split into groups come from ``random.Random(seed)``, so they are
reproducible and the two variants see the same ones; the neighbour graphs and keys are
drawn by the round itself from the OS CSPRNG, so which rounds fail varies between runs.

Rows: the grouped variant against the previous one as baseline; values are the raw
measurements, ratios above 1 favour the grouped variant and stay finite when a baseline
never completes. Times: baseline/value. Rounds completed: the ratio of the Laplace
estimates (completed + 1) / (rounds + 2). Devices landed: the ratio of devices lost
(baseline/value, each count + 1), as a device that vanishes before sending its input is
lost either way. Groups failed: baseline/value, each count + 1.
The round count is cut (to no fewer than 2) when the first round shows that the full grid
would take more than ``BUDGET_S``.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bench.common import Row
from fedcart.secagg.groups import split_cohort
from fedcart.secagg.local import PHASES, run_local_round
from fedcart.secagg.params import SecAggParameters, binomial_cdf, choose, fixed
from fedcart.secagg.server import ServerState

DIM = 64
DROPOUTS = (0.1, 0.2)
BUDGET_S = 540.0  # the full grid's target: first round's time x rounds stays below this
# phases at which a vanishing device has not yet sent its masked input: it cannot be summed
_BEFORE_INPUT = frozenset(PHASES[:PHASES.index(ServerState.MASKED) + 1])


@dataclass(frozen=True)
class Config:
    n: int
    group_size: int
    rounds: int
    budget_s: float | None


FULL = Config(n=4335, group_size=1000, rounds=5, budget_s=BUDGET_S)
QUICK = Config(n=200, group_size=100, rounds=2, budget_s=None)


@dataclass
class Tally:
    """One (variant, dropout)'s rounds."""

    rounds: int = 0
    completed: int = 0  # rounds with at least one DONE group
    landed: int = 0  # devices summed in a DONE group, over all rounds
    groups: int = 0
    groups_failed: int = 0
    server_s: float = 0.0  # summed over groups and rounds
    client_s: list[float] = field(default_factory=list)  # each round's mean over devices
    failures: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.rounds += 1
        self.completed += outcome.done > 0
        self.landed += outcome.landed
        self.groups += outcome.groups
        self.groups_failed += outcome.groups - outcome.done
        self.server_s += outcome.server_s
        self.client_s.append(outcome.client_s)
        self.failures += outcome.failures


@dataclass
class Outcome:
    """One round of one variant: its groups' results taken together."""

    groups: int
    done: int
    landed: int
    server_s: float
    client_s: float  # mean over the cohort's devices
    failures: list[str]


def previous_parameters(n: int) -> tuple[int, int]:
    """k and t as the code before groups chose them for a round of n."""
    params = fixed(n, 20)
    return params.degree, params.threshold


def failure_bound(n: int, k: int, t: int, dropout: float) -> float:
    """Bell et al.'s union bound on P[a round of n fails] (as ``secagg.params`` computes)."""
    return min(1.0, n * binomial_cdf(t - 1, k, 1.0 - dropout))


def drop_schedule(n: int, dropout: float, rng: random.Random) -> dict[int, ServerState]:
    """``round(dropout * n)`` devices, each vanishing at a phase drawn uniformly."""
    return {i: rng.choice(PHASES) for i in rng.sample(range(n), round(dropout * n))}


def run_groups(groups: Sequence[Sequence[int]], params: Mapping[int, tuple[int, int]],
               inputs: Mapping[int, np.ndarray], drop_at: Mapping[int, ServerState],
               ) -> Outcome:
    """Each group its own in-memory round (``params``: group size -> (k, t)); check each
    DONE group's sum exactly."""
    done = landed = 0
    server_s = client_s = 0.0
    failures = []
    for group in groups:
        k, t = params[len(group)]
        run = run_local_round({i: inputs[i] for i in group}, k, t,
                              drop_at={i: drop_at[i] for i in group if i in drop_at})
        server_s += run.server_seconds
        client_s += sum(run.client_seconds.values())
        if run.server.state == ServerState.DONE:
            survivors = run.server.survivors
            assert not {i for i in survivors if drop_at.get(i) in _BEFORE_INPUT}, \
                "a device that vanished before sending its input is among the survivors"
            expected = np.sum([inputs[i] for i in survivors], axis=0, dtype=np.uint32)
            assert run.server.result is not None
            assert np.array_equal(run.server.result, expected), "a group's sum is wrong"
            done += 1
            landed += len(survivors)
        else:
            assert run.server.state == ServerState.FAILED, run.server.state
            failures.append(str(run.server.failure))
        del run
    n = sum(len(g) for g in groups)
    return Outcome(len(groups), done, landed, server_s, client_s / n, failures)


def _laplace(count: int, trials: int) -> float:
    return (count + 1) / (trials + 2)


def _describe(sizes: Mapping[int, int], params: Mapping[int, SecAggParameters]) -> str:
    return "; ".join(f"{count}x{size} k={params[size].degree} t={params[size].threshold} "
                     f"failure<={params[size].failure:.1e}"
                     for size, count in sorted(sizes.items()))


def bench_population(quick: bool) -> list[Row]:
    config = QUICK if quick else FULL
    n = config.n
    ids = list(range(n))
    inputs_rng = np.random.default_rng(0)
    inputs = {i: inputs_rng.integers(0, 2**32, DIM, dtype=np.uint64).astype(np.uint32)
              for i in ids}
    k_prev, t_prev = previous_parameters(n)
    tallies = {(variant, p): Tally() for variant in ("previous", "grouped") for p in DROPOUTS}
    described: dict[float, str] = {}
    rounds = config.rounds
    started = time.monotonic()
    r = 0
    while r < rounds:
        for p in DROPOUTS:
            rng = random.Random(f"population {n} {p} {r}")
            drop_at = drop_schedule(n, p, rng)
            groups = split_cohort(ids, config.group_size, random_bytes=rng.randbytes)
            sizes: dict[int, int] = {}
            for g in groups:
                sizes[len(g)] = sizes.get(len(g), 0) + 1
            chosen = {size: choose(size, p) for size in sizes}
            described[p] = _describe(sizes, chosen)
            prev = run_groups([ids], {n: (k_prev, t_prev)}, inputs, drop_at)
            grouped = run_groups(groups, {s: (c.degree, c.threshold) for s, c in chosen.items()},
                                 inputs, drop_at)
            tallies["previous", p].add(prev)
            tallies["grouped", p].add(grouped)
            print(f"  round {r + 1} dropout {p}: previous {'done' if prev.done else 'FAILED'}"
                  f" ({prev.landed}/{n} landed, {prev.server_s:.1f} s server); grouped "
                  f"{grouped.done}/{grouped.groups} groups done ({grouped.landed}/{n} landed, "
                  f"{grouped.server_s:.1f} s server)"
                  + "".join(f"\n    failed: {f}" for f in prev.failures + grouped.failures),
                  file=sys.stderr, flush=True)
        r += 1
        if r == 1 and config.budget_s is not None:
            per_round = time.monotonic() - started
            fits = int(config.budget_s // per_round)
            if fits < rounds:
                rounds = max(2, fits)
                print(f"  one round of the grid took {per_round:.0f} s: {rounds} rounds "
                      f"to stay within {config.budget_s:.0f} s", file=sys.stderr)
    rows: list[Row] = []
    for p in DROPOUTS:
        base, ours = tallies["previous", p], tallies["grouped", p]
        params = {"n": n, "d": DIM, "dropout": p, "rounds": rounds, "groups": described[p]}
        baseline = (f"previous: 1x{n} k={k_prev} t={t_prev} "
                    f"failure<={failure_bound(n, k_prev, t_prev, p):.1e}")
        rows.append(Row("population", params, "rounds completed share",
                        ours.completed / ours.rounds, "", baseline,
                        base.completed / base.rounds,
                        _laplace(ours.completed, ours.rounds)
                        / _laplace(base.completed, base.rounds)))
        trials = n * rounds
        rows.append(Row("population", params, "devices landed share",
                        ours.landed / trials, "", baseline, base.landed / trials,
                        (trials - base.landed + 1) / (trials - ours.landed + 1)))
        rows.append(Row("population", params, "groups failed/round",
                        ours.groups_failed / ours.rounds, "", baseline,
                        base.groups_failed / base.rounds,
                        (base.groups_failed + 1) / (ours.groups_failed + 1)))
        rows.append(Row("population", params, "server s/round", ours.server_s / rounds,
                        "s", baseline, base.server_s / rounds, base.server_s / ours.server_s))
        client, client_prev = float(np.mean(ours.client_s)), float(np.mean(base.client_s))
        rows.append(Row("population", params, "client s/round (mean device)", client, "s",
                        baseline, client_prev, client_prev / client))
    return rows
