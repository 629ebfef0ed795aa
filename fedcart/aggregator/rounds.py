"""The aggregator's rounds: what the next one is, when it may start, whom it samples, its
terms and its SecAgg+ groups, and the state of one while it runs.

Each round has a task. With statistics enabled, the first two rounds sum the devices' basket
statistics (fedcart/protocol/statistics.py): a popularity round, whose noised sum names the head
items, then a co-occurrence round over them, from whose noised sum the item-item table is
derived (fedcart/aggregator/item_item.py) and published in a new model version. Every later round
trains, except the evaluation rounds: the model the statistics gave, and every
``evaluation.every``-th trained one, is scored on the devices' own baskets
(fedcart/protocol/evaluation.py) before training goes on. All of them are charged to the same
privacy ledger.

A round's cohort is split into groups of at most ``round.group_size`` devices
(``secagg.groups``), each its own SecAgg+ round with the degree and threshold its size and
the expected dropout call for (``secagg.params``); the groups run side by side and their
sums add up, so a group that fails costs its devices, not the round.

The service (``service.py``) drives the groups' sans-I/O ``ServerRound``s over its
connections; what is here does no I/O but logging why a round waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcart.aggregator.config import AggregatorConfig
from fedcart.aggregator.privacy import Mechanism
from fedcart.model_export.model import Weights
from fedcart.model_export.model import group_size as group_size_of
from fedcart.protocol import evaluation
from fedcart.protocol.statistics import COOCCURRENCE, POPULARITY, STATISTICS, triangle_size
from fedcart.protocol.terms import Norm, RoundTerms, Task, TrainingPlan
from fedcart.protocol.update import TRAIN, UpdateFormat
from fedcart.secagg.consistency import corrupt_count
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.params import SecAggParameters, choose, fixed
from fedcart.secagg.server import ServerRound, ServerState

__all__ = ["WAIT_LOG_INTERVAL", "Group", "Round", "Waits", "evaluation_due", "groups_for",
           "next_task", "planned_evaluations", "round_terms", "sample", "sampling_rate"]

log = logging.getLogger("fedcart.aggregator")  # the service's logger: one name in the logs
WAIT_LOG_INTERVAL = 60.0  # seconds between "round waits" messages while a wait lasts


@dataclass
class Group:
    """One group of a round: its own SecAgg+ round over some of the cohort."""

    index: int
    server: ServerRound
    params: SecAggParameters
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.server.state == ServerState.DONE and self.server.result is not None

    def summary(self) -> dict:
        return {"devices": self.params.n, "k": self.params.degree,
                "t": self.params.threshold, "failure_bound": self.params.failure,
                "survivors": len(self.server.survivors) if self.done else 0,
                "status": "completed" if self.done else "failed",
                "reason": self.server.failure}


@dataclass
class Round:
    """A round while it runs: its cohort, its groups, and what it measures."""

    round_id: int
    task: str
    cohort: dict[int, bytes]
    groups: list[Group]
    head: np.ndarray | None = None  # a co-occurrence round's head items
    bytes_up: int = 0
    late: int = 0  # messages that came after their group stopped waiting for them
    loop_stall: float = 0.0  # the event loop's longest stall during the round, seconds
    told_over: set[int] = field(default_factory=set)  # late devices told the round is over

    def __post_init__(self) -> None:
        self.group_of = {cid: g for g in self.groups for cid in g.server.participants}

    @property
    def survivors(self) -> int:
        return sum(len(g.server.survivors) for g in self.groups if g.done)

    def dropped(self) -> dict[int, str]:
        """Why each device of the round is not in its sum: dropped within a group that
        completed (a survivor that missed a later deadline is in the sum), or a member of
        a group that failed."""
        out: dict[int, str] = {}
        for g in self.groups:
            if g.done:
                survivors = set(g.server.survivors)
                out.update((c, why) for c, why in g.server.dropped.items()
                           if c not in survivors)
            else:
                out.update(dict.fromkeys(g.server.participants,
                                         f"group {g.index} failed"))
        return out

    def phase_seconds(self) -> dict[str, float]:
        """Each phase's longest time over the groups."""
        out: dict[str, float] = {}
        for g in self.groups:
            for phase, seconds in g.phase_seconds.items():
                out[phase] = max(out.get(phase, 0.0), seconds)
        return out


def next_task(config: AggregatorConfig, released: Callable[[], set[str]],
              evaluation_due: bool = False) -> str:
    """The statistics rounds first (each until it completes: ``released`` names those
    that have), then training, with an evaluation round whenever one is due (until it
    completes)."""
    if config.statistics is not None:
        done = released()
        for kind in STATISTICS:
            if kind not in done:
                return kind
    return Task.EVALUATE if evaluation_due else TRAIN


def evaluation_due(config: AggregatorConfig, trained: int, evaluated: bool,
                   last: bool) -> bool:
    """Whether the current model, ``trained`` training rounds in, is to be evaluated: not
    yet ``evaluated``, evaluations on (``evaluation.every``), and it is every-th, or the
    ``last`` the service trains (max_rounds reached)."""
    every = config.evaluate_every
    return bool(every) and not evaluated and (trained % every == 0 or last)


def planned_evaluations(config: AggregatorConfig) -> int:
    """How many evaluation rounds a plan of ``planned_rounds`` training rounds has: one
    after the statistics, one every ``every``, and one after the last."""
    every, planned = config.evaluate_every, config.planned_rounds
    return planned // every + 1 + (planned % every > 0) if every else 0


def sampling_rate(config: AggregatorConfig, task: str) -> float:
    """q of a task's rounds: the statistics and evaluation rounds have their own."""
    stats = config.statistics
    if task == Task.EVALUATE:
        return config.evaluation_q
    return stats.sampling_rate if task in STATISTICS and stats else config.sampling_rate


def sample(connected: dict[int, bytes], rate: float) -> dict[int, bytes]:
    """Poisson sampling with the OS CSPRNG: each connected device (id: public key)
    independently with probability q (what the accountant assumes)."""
    threshold = round(rate * 2**53)
    return {cid: key for cid, key in sorted(connected.items())
            if secrets.randbits(53) < threshold}


class Waits:
    """Whether the next round may start, and saying why not, but not at every tick of the
    round loop."""

    def __init__(self, config: AggregatorConfig, capacity: int) -> None:
        self.config = config
        self.capacity = capacity  # connections the aggregator holds at once (pacing)
        self._waiting_since: float | None = None
        # when the last "round waits" for min_clients was logged (None: not waiting)
        self._short_logged: float | None = None

    def population_ready(self, task: str, sampling_rate: float, connected: int,
                         enrolled: Callable[[], int]) -> bool:
        """Whether the next round may start. It waits for ``min_connected`` check-ins, at
        most ``population_wait``: a device that stays away must not stop the service (it is
        then simply not sampled). A statistics round over the whole population (q = 1: its
        sums name the head items and build the table every device gets) also needs
        ``population_share`` of the ``enrolled`` devices checked in, and does not start
        without them, saying why once every ``population_wait``; when that share is more
        than the ``capacity`` of connections it holds, it says that the round never can.
        (A training round is one step of many: with q = 1 it still takes whoever is
        there.)"""
        cfg, now = self.config, time.monotonic()
        self._waiting_since = self._waiting_since or now
        waited = now - self._waiting_since
        if task in STATISTICS and sampling_rate >= 1.0:
            total = enrolled()
            need = math.ceil(cfg.population_share * total)
            if connected < need:
                if need > self.capacity:
                    if self._waiting_since == now or waited >= cfg.population_wait:
                        self._waiting_since = now
                        log.error("a statistics round over the whole population needs %d "
                                  "connections (round.population_share %g of %d enrolled), "
                                  "more than the %d this aggregator holds at once ([pacing] "
                                  "capacity): it cannot start; sample it ([statistics] "
                                  "sampling_rate below 1) or lower population_share",
                                  need, cfg.population_share, total, self.capacity)
                elif waited >= cfg.population_wait:
                    log.warning("round waits: %d of %d enrolled devices are checked in, a "
                                "round over the whole population needs %d "
                                "(round.population_share %g)", connected, total, need,
                                cfg.population_share)
                    self._waiting_since = now
                return False
        if connected < cfg.min_connected:
            if waited < cfg.population_wait:
                return False
            log.warning("%d of %d devices checked in after %.0f s: the round goes ahead",
                        connected, cfg.min_connected, cfg.population_wait)
        self._waiting_since = None
        return True

    def cohort_ready(self, sampled: int, sampling_rate: float, connected: int) -> bool:
        """Whether a round of ``sampled`` devices may run: at least ``min_clients``. A round
        that is skipped for want of devices says why when the wait begins (routine: a
        service that has just started has no devices yet) and, as a warning, every
        WAIT_LOG_INTERVAL while it lasts; not at every tick of the round loop. A deployment
        smaller than its min_clients would otherwise wait in silence."""
        cfg, now = self.config, time.monotonic()
        if sampled >= cfg.min_clients:
            self._short_logged = None
            return True
        if self._short_logged is None or now - self._short_logged >= WAIT_LOG_INTERVAL:
            of = f" ({sampled} sampled at q = {sampling_rate:g})" if sampling_rate < 1 else ""
            level = logging.INFO if self._short_logged is None else logging.WARNING
            log.log(level, "round waits: %d devices checked in%s, a round needs "
                    "min_clients = %d", connected, of, cfg.min_clients)
            self._short_logged = now
        return False


def round_terms(config: AggregatorConfig, task: str, group_size: int, head: np.ndarray | None,
                vocabulary_sha256: str, weights: Weights, trained: Sequence[str],
                model_version: int) -> RoundTerms:
    """A round's terms: how its inputs are clipped and encoded (a training round's is
    the update of the ``trained`` groups, weighted; a statistics round's one clipped vector
    per device; an evaluation round's the scores of ``model_version``), and what a training
    round's devices do."""
    cfg, stats = config, config.statistics
    dp = cfg.mechanism != "none"
    # a packed lane's carry moves the lane above it: a lying device could make one
    # honest input move the sum by twice its sensitivity, so DP rounds are not packed.
    # Under DP the scale is for the configured group size, a constant (see release.add_up).
    # An evaluation round's eight values are not packed: packing halves nothing worth
    # halving, and its coarse scale would round each device's NDCG and reciprocal rank.
    packed = not dp and task in STATISTICS and UpdateFormat.can_pack(group_size)
    group_size = cfg.group_size if dp else group_size
    terms = RoundTerms(
        Task.POPULARITY, vocabulary_sha256,
        n_params=weights.n_items, clip_norm=stats.popularity_clip if stats else 1.0,
        norm=Norm.L1 if cfg.mechanism == Mechanism.LAPLACE else Norm.L2, packed=packed,
        group_size=group_size)
    if task == POPULARITY:
        return terms
    if task == COOCCURRENCE:
        assert head is not None and stats is not None
        return dataclasses.replace(terms, task=Task.COOCCURRENCE,
                                   n_params=triangle_size(len(head)),
                                   clip_norm=stats.cooccurrence_clip,
                                   head=tuple(int(i) for i in head))
    if task == Task.EVALUATE:
        return dataclasses.replace(terms, task=Task.EVALUATE, n_params=evaluation.SLOTS,
                                   clip_norm=evaluation.CLIP, model_version=model_version)
    plan = TrainingPlan(cfg.local_epochs, cfg.batch_size, tuple(cfg.learning_rates),
                        cfg.examples_per_round, tuple(trained))
    return dataclasses.replace(
        terms, task=Task.TRAIN, n_params=group_size_of(trained, weights.n_items, weights.dim),
        clip_norm=cfg.clip_norm, weight_cap=cfg.weight_cap,
        model_version=model_version, training=plan)


def _parameters(config: AggregatorConfig, n: int) -> SecAggParameters:
    """A group of n's SecAgg+ parameters: k and t chosen for its size (or the configured
    k, rounded up to even, with t = k/2 + 1)."""
    if config.secagg_degree:
        return fixed(n, config.secagg_degree)
    return choose(n, config.expected_dropout, config.corrupt_fraction, config.failure_bound)


def groups_for(config: AggregatorConfig, round_id: int, cohort: dict[int, bytes],
               members: Sequence[Sequence[int]], vector_len: int, terms: RoundTerms,
               identity: IdentityKey) -> list[Group]:
    """The round's groups, one SecAgg+ round over each of ``members``. The parameters are
    computed once per group size (the groups' sizes differ by at most one)."""
    sizes = {len(ids) for ids in members}
    params = {n: _parameters(config, n) for n in sizes}
    corrupt = {n: corrupt_count(n, config.corrupt_fraction) for n in sizes}
    encoded = terms.to_bytes()
    return [Group(i, ServerRound(round_id, {cid: cohort[cid] for cid in ids},
                                 params[len(ids)].degree, params[len(ids)].threshold,
                                 vector_len, identity, terms=encoded,
                                 corrupt=corrupt[len(ids)]), params[len(ids)])
            for i, ids in enumerate(members)]
