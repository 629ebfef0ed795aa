"""A federated run on real data, end to end: the real aggregator service in its own process,
one edge client per user (in worker processes), loopback websockets, secure aggregation and
DP exactly as in production; each published model is evaluated with the protocol of
DESIGN.md section 6 as it appears.

Only the baskets before each user's last one go to the devices; the test baskets stay with
the evaluator. The evaluator reads the aggregator's published bundles and round records from
its state directory, as an operator's dashboard would. The aggregator's own evaluation
rounds score a version on the devices' training baskets; beside each estimate goes the
central figure of the same quantity (federated_evaluation.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from fedcart.aggregator.config import AggregatorConfig, Preset, Tuning
from fedcart.aggregator.item_item import StatisticsSettings
from fedcart.aggregator.privacy import default_delta
from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import RoundRow, Store
from fedcart.data.evaluation import Split, evaluate
from fedcart.model_export.bundle import read_bundle
from fedcart.model_export.model import HISTORY_DECAY
from fedcart.protocol.evaluation import Query
from fedcart.protocol.terms import Task
from fedcart.protocol.update import TRAIN
from fedcart.simulation.central_training import model_scorer
from fedcart.simulation.derived import connections, derive
from fedcart.simulation.devices import Shard, worker_main
from fedcart.simulation.federated_evaluation import central_estimate, device_queries

__all__ = ["FederatedSettings", "RoundRecord", "RunResult", "run_federated"]

POLL_SECONDS = 0.2
PUBLISHING_TASKS = frozenset({Task.COOCCURRENCE, Task.TRAIN})  # a completed one publishes


@dataclass(frozen=True)
class FederatedSettings:
    """What ``fedcart-sim run`` sets; the defaults are the demo's no-DP run (UCI, about 5
    minutes on 2 cores). They mirror AggregatorConfig where they feed it (aggregator_config).
    A field left None takes the value of the run's privacy regime's :class:`Preset`
    (``resolved``), the values ``fedcart-aggregator init`` writes, or one derived from the
    data (derived.py: the statistics and evaluation rounds' q, the head)."""

    rounds: int = 40  # training rounds (the two statistics rounds come first)
    clients_per_round: float | None = 200.0  # expected cohort M; q = M / min(N, C)
    sampling_rate: float | None = None  # or q directly
    dropout: float = 0.1
    mechanism: str = "none"  # "none", "gaussian" or "laplace"
    epsilon: float | None = None  # Gaussian: calibrate z to spend this over the whole plan
    delta: float | None = None  # default aggregator.privacy.default_delta(N)
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    secagg_k: int = 0  # 0: k and t chosen per group (secagg.params)
    group_size: int = 250
    local_epochs: int = 1
    examples_per_round: int = 8
    batch_size: int = 64
    lr_embeddings: float = 5.0
    lr_bias: float = 1.0
    lr_blend: float | None = None
    weight_cap: float | None = None  # default examples_per_round: every device weighs 1
    train_groups: tuple[str, ...] | None = None
    statistics: bool = True
    head_items: int | None = None
    cooccurrence_clip: float | None = None
    training_noise_ratio: float | None = None
    statistics_sampling_rate: float | None = None  # q of the statistics rounds
    evaluation_sampling_rate: float | None = None  # q of the evaluation rounds
    popularity_noise_ratio: float = StatisticsSettings.popularity_noise_ratio
    optimizer: str = Tuning.optimizer
    optimizer_lr: float = Tuning.optimizer_lr
    dim: int = Tuning.dim
    workers: int = 2
    eval_every: int = 5
    # a dropout ends its wait at once; this is for stragglers. Two worker processes mask
    # 4,335 inputs of 4 MB one after another (about 5 minutes at k = 38): a device still
    # in that queue is no straggler, and a shorter deadline would drop the last ones
    phase_timeout: float = 600.0
    seed: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        if self.mechanism not in ("none", "gaussian", "laplace"):
            raise ValueError("mechanism must be none, gaussian or laplace")
        if self.mechanism == "none" and (self.epsilon or self.noise_multiplier):
            raise ValueError("--epsilon and --noise-multiplier need DP (not --no-dp)")
        if self.mechanism != "none" and not (self.epsilon or self.noise_multiplier):
            raise ValueError("DP needs --epsilon or --noise-multiplier")
        if (self.clients_per_round is None) == (self.sampling_rate is None):
            raise ValueError("give exactly one of --clients-per-round and --q")
        if not 0 <= self.dropout < 1:
            raise ValueError("--dropout must lie in [0, 1)")
        if self.secagg_k == 1 or self.group_size < 6:
            raise ValueError("--secagg-k must be 0 (chosen per group) or at least 2, and "
                             "--group-size at least 6 (twice the 3 devices a round needs)")
        if self.rounds < 1 or self.workers < 1 or self.eval_every < 1:
            raise ValueError("--rounds, --workers and --eval-every must be at least 1")

    def resolved(self) -> FederatedSettings:
        """These settings with every None replaced by the regime's preset value."""
        tuned = Preset.of(self.mechanism).value
        filled: dict[str, Any] = {
            f.name: getattr(tuned, f.name) for f in dataclasses.fields(tuned)
            if getattr(self, f.name) is None}
        if self.weight_cap is None:
            filled["weight_cap"] = float(self.examples_per_round)
        return dataclasses.replace(self, **filled)

    def training_q(self, connected: int) -> float:
        """q of the training rounds sampling among ``connected`` devices (derived.connections:
        a population larger than the aggregator holds is sampled among those it holds)."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        return min(1.0, float(self.clients_per_round or 0) / connected)

    def name(self) -> str:
        if self.label:
            return self.label
        if self.mechanism == "none":
            return "federated, SecAgg, no DP"
        if self.epsilon:
            return f"federated, SecAgg, DP eps={self.epsilon:g}"
        return f"federated, SecAgg, DP z={self.noise_multiplier:g} ({self.mechanism})"


@dataclass
class RoundRecord:
    """One round as the report shows it."""

    round: int
    task: str  # a protocol.terms.Task: "popularity", "cooccurrence", "train" or "evaluate"
    status: str
    model_version: int
    sampled: int
    survivors: int | None
    dropped: int
    seconds: float
    phase_seconds: dict[str, float]
    epsilon: float
    elapsed: float  # since the first round started
    hr: float | None = None  # quality of the model this round published (with history)
    ndcg: float | None = None
    mrr: float | None = None
    hr_global: float | None = None  # the same model without the on-device history blend
    ndcg_global: float | None = None
    mrr_global: float | None = None
    # HitRate@10 (with history) by the class of the hidden item (evaluation.HiddenItem)
    by_hidden: dict[str, dict[str, float | int]] | None = None
    bytes_up: float | None = None  # mean per device that completed the round
    bytes_down: float | None = None
    values: int | None = None  # the length of the round's masked vector
    groups: str = "-"  # its SecAgg+ groups, k, t and failure bound (RoundRow.secagg)
    # an evaluation round's: its estimate (protocol.evaluation.Estimate as JSON), and the
    # central figure of the same quantity on the same version (federated_evaluation)
    estimate: dict[str, Any] | None = None
    central_estimate: dict[str, Any] | None = None


@dataclass
class RunResult:
    settings: FederatedSettings
    config: dict[str, Any]
    devices: int
    delta: float
    noise_multiplier: float | None  # the training rounds' z
    noise_multipliers: dict[str, float] = field(default_factory=dict)  # each task's z
    rounds: list[RoundRecord] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    setup_seconds: float = 0.0
    server_peak_mb: float | None = None
    worker_peak_mb: list[float] = field(default_factory=list)  # each worker's, as it ended
    derived: list[dict[str, Any]] = field(default_factory=list)  # derived.Choice's fields

    def final(self) -> RoundRecord | None:
        evaluated = [r for r in self.rounds if r.hr is not None]
        return evaluated[-1] if evaluated else None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.settings.name(), "settings": dataclasses.asdict(self.settings),
                "aggregator_config": self.config, "devices": self.devices,
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "noise_multipliers": self.noise_multipliers,
                "interrupted": self.interrupted, "seconds": self.seconds,
                "setup_seconds": self.setup_seconds, "server_peak_mb": self.server_peak_mb,
                "worker_peak_mb": self.worker_peak_mb,
                "derived": self.derived,
                "rounds": [dataclasses.asdict(r) for r in self.rounds]}


def population(split: Split) -> list[tuple[str, tuple[tuple[str, ...], ...]]]:
    """(user id, training baskets as item keys) for every user with a training basket."""
    return [(user, tuple(tuple(split.catalog[i] for i in basket) for basket in baskets))
            for user, baskets in zip(split.users, split.train, strict=True) if baskets]


def aggregator_config(settings: FederatedSettings, n_devices: int,
                      delta: float) -> AggregatorConfig:
    """The aggregator's config for a run of ``settings`` (derived: derived.derive) over
    ``n_devices``."""
    q = settings.training_q(connections(n_devices))
    dp = settings.mechanism != "none"
    assert settings.head_items and settings.cooccurrence_clip and settings.train_groups
    assert settings.statistics_sampling_rate and settings.evaluation_sampling_rate
    statistics = (StatisticsSettings(head_items=settings.head_items,
                                     cooccurrence_clip=settings.cooccurrence_clip,
                                     sampling_rate=settings.statistics_sampling_rate,
                                     popularity_noise_ratio=settings.popularity_noise_ratio)
                  if settings.statistics else None)
    return AggregatorConfig(
        host="127.0.0.1", sampling_rate=q, min_clients=3,
        # a population beyond the connections the aggregator holds takes turns (pacing)
        min_connected=connections(n_devices), capacity=connections(n_devices),
        keep_bundles=0,  # the simulation evaluates published versions after the fact
        # a worker's devices wait their turn to take in a bundle (its download gate): the
        # waits are the simulation's, not slow networks
        min_download_rate=0.0,
        evaluate_every=settings.eval_every,
        evaluation_sampling_rate=settings.evaluation_sampling_rate,
        secagg_degree=settings.secagg_k, group_size=settings.group_size,
        # a device can drop out even where the simulation removes none (a phase deadline
        # under load): k and t are chosen for at least 5%
        expected_dropout=max(settings.dropout, 0.05),
        phase_timeout=settings.phase_timeout, population_wait=60.0, round_interval=0.0,
        max_rounds=settings.rounds,
        local_epochs=settings.local_epochs, examples_per_round=settings.examples_per_round,
        lr_embeddings=settings.lr_embeddings, lr_bias=settings.lr_bias,
        lr_blend=settings.lr_blend or 0.0, batch_size=settings.batch_size,
        train_groups=settings.train_groups, statistics=statistics,
        mechanism=settings.mechanism, clip_norm=settings.clip_norm or 0.0,
        noise_multiplier=settings.noise_multiplier or 1.0,
        target_epsilon=(settings.epsilon or 0.0) if dp else 0.0,
        planned_rounds=settings.rounds, delta=delta,
        budget_epsilon=(settings.epsilon * 1.001 if settings.epsilon else 1e9),
        weight_cap=settings.weight_cap or 0.0, population=n_devices,
        training_noise_ratio=settings.training_noise_ratio or 1.0,
        optimizer=settings.optimizer, optimizer_lr=settings.optimizer_lr)


class _Workers:
    """The worker processes and their pipes."""

    def __init__(self, shards: list[Shard]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs = []
        for shard in shards:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(shard, child), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.reports: list[tuple[int, str, int, int]] = []
        self.done = [False] * len(shards)
        self.peak_mb: list[float] = []  # each finished worker's peak resident memory

    def keys(self) -> list[bytes]:
        """Every device's public key, once its worker has created it. No fixed timeout:
        creating devices takes time in proportion to them (and to the machine's load), so
        the wait ends when a worker answers or dies."""
        keys: list[bytes] = []
        for pipe, proc in zip(self.pipes, self.procs, strict=True):
            while not pipe.poll(POLL_SECONDS * 5) and proc.is_alive():
                pass
            try:
                kind, payload = pipe.recv()
            except EOFError:  # it died: its pipe closed with nothing in it
                proc.join(5)
                raise RuntimeError(f"worker {proc.pid} died creating its devices (exit code "
                                   f"{proc.exitcode}; its error is above)") from None
            assert kind == "keys"
            keys.extend(payload)
        return keys

    def send(self, command: str, arg: str | None) -> None:
        for pipe in self.pipes:
            pipe.send((command, arg))

    def stop(self) -> None:
        """Tell every worker to stop: one that has not begun skips its run, one running
        stops its devices at once; one that has ended already (its devices found the server
        gone) needs nothing, and its pipe may be closed."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # BrokenPipeError: it has ended
                pipe.send(("stop", None))

    def drain(self) -> None:
        for i, pipe in enumerate(self.pipes):
            while not self.done[i] and pipe.poll():
                try:
                    kind, payload = pipe.recv()
                except EOFError:
                    self.done[i] = True
                    break
                if kind == "report":
                    self.reports.append(payload)
                elif kind == "done":
                    self.done[i] = True
                    self.peak_mb.append(payload)

    def finish(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.done) and time.monotonic() < deadline:
            self.drain()
            if not all(self.done):
                time.sleep(POLL_SECONDS)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()


def _shards(root: Path, server_key: bytes, settings: FederatedSettings,
            users: list[tuple[str, tuple[tuple[str, ...], ...]]],
            initial_bundle: Path) -> list[Shard]:
    n = min(settings.workers, len(users))
    return [Shard(worker=w, root=root, server_key=server_key, users=tuple(users[w::n]),
                  dropout=settings.dropout, seed=settings.seed, initial_bundle=initial_bundle,
                  connections=connections(len(users)), workers=n)
            for w in range(n)]


def run_federated(split: Split, names: dict[str, str], settings: FederatedSettings,
                  workdir: Path, on_round: Callable[[RoundRecord], None] | None = None,
                  on_status: Callable[[str], None] | None = None,
                  stop: threading.Event | None = None,
                  keep_model: Path | None = None) -> RunResult:
    """Run ``settings.rounds`` rounds (or until ``stop`` is set); evaluate each published
    model. Returns whatever was done, also when stopped early. ``keep_model``: copy the
    last published bundle there (``bundle/`` and the aggregator's ``signing.pub``)."""
    status = on_status or (lambda _: None)
    started = time.monotonic()
    users = population(split)
    derived = derive(settings, len(users), split.n_items)
    settings = derived.settings
    if len(users) < 3:
        raise ValueError(f"{split.name}: only {len(users)} users have training baskets; a "
                         "federated round needs at least 3 devices")
    delta = settings.delta or default_delta(len(users))
    config = aggregator_config(settings, len(users), delta)
    state = init_state(workdir / "aggregator", list(split.catalog),
                       [names.get(i, i) for i in split.catalog], dim=settings.dim,
                       seed=settings.seed, config=config)
    server_key = bytes(state.signing_key().verify_key)
    result = RunResult(settings, dataclasses.asdict(config), len(users), delta, None,
                       derived=[dataclasses.asdict(c) for c in derived.choices])

    status(f"creating {len(users):,} devices in {settings.workers} worker processes")
    store = Store(state.database)
    shipped = store.latest_model()  # version 0: what the app ships with
    assert shipped is not None
    workers = _Workers(_shards(workdir, server_key, settings, users,
                               state.root / shipped.bundle_dir))
    server: AggregatorProcess | None = None
    try:
        keys = workers.keys()
        store.enroll_many(keys)
        status("starting the aggregator")
        server = AggregatorProcess(state.root, log_file=workdir / "aggregator.log")
        workers.send("go", server.url)
        result.setup_seconds = time.monotonic() - started
        status(f"devices checking in to {server.url}")
        _follow(store, state.root, server_key, split, settings, result, workers, server,
                on_round, stop)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        if server is not None:
            if server.proc.poll() is None:
                result.interrupted = True
            try:
                server.terminate(timeout=30)
            except RuntimeError as exc:  # it was killed: the rounds done still count
                status(str(exc))
            result.server_peak_mb = server.peak_memory_mb()
        # a device sent away for minutes would otherwise notice only when it came back
        workers.stop()
        workers.finish(timeout=120)
    result.worker_peak_mb = workers.peak_mb
    _add_bytes(result, workers.reports)
    ledger = store.ledger()
    task_of = {r.round: r.task for r in result.rounds}
    result.noise_multipliers = {task_of.get(c.round_id, TRAIN): c.noise_multiplier
                                for c in ledger}
    result.noise_multiplier = result.noise_multipliers.get(TRAIN)
    latest = store.latest_model()
    store.close()
    if keep_model is not None:
        assert latest is not None
        keep_model.mkdir(parents=True, exist_ok=True)
        shutil.copytree(state.root / latest.bundle_dir, keep_model / "bundle",
                        dirs_exist_ok=True)
        shutil.copyfile(state.root / "signing.pub", keep_model / "signing.pub")
    result.seconds = time.monotonic() - started
    return result


def _follow(store: Store, root: Path, server_key: bytes, split: Split,
            settings: FederatedSettings,
            result: RunResult, workers: _Workers, server: AggregatorProcess,
            on_round: Callable[[RoundRecord], None] | None,
            stop: threading.Event | None) -> None:
    """Record rounds as the aggregator finishes them, until it stops."""
    queries = device_queries(split)
    seen: set[int] = set()
    first_start: float | None = None
    while True:
        workers.drain()
        exited = server.proc.poll() is not None
        rows = [r for r in store.rounds() if r.finished_at is not None and
                r.round_id not in seen]
        for row in rows:
            seen.add(row.round_id)
            first_start = first_start if first_start is not None else row.started_at
            record = _record(row, first_start)
            trained = sum(1 for r in result.rounds if r.status == "completed" and
                          r.task == TRAIN) + (record.status == "completed" and
                                              record.task == TRAIN)
            published = record.status == "completed" and record.model_version > row.model_version
            # evaluate the model the statistics gave, every eval_every-th trained one, the last
            if published and (record.task != TRAIN or trained >= settings.rounds
                              or trained % settings.eval_every == 0):
                _evaluate(record, root, server_key, store, row, split)
            if record.estimate is not None:
                record.central_estimate = _central_estimate(
                    int(record.estimate["model_version"]), root, server_key, store, queries)
            result.rounds.append(record)
            if on_round is not None:
                on_round(record)
        if exited:
            return
        if stop is not None and stop.is_set():
            result.interrupted = True
            return
        time.sleep(POLL_SECONDS)


def _record(row: RoundRow, first_start: float) -> RoundRecord:
    detail = row.detail
    task = str(detail.get("task", TRAIN))
    publishes = row.status == "completed" and task in PUBLISHING_TASKS
    return RoundRecord(
        round=row.round_id, task=task, status=row.status,
        model_version=row.model_version + 1 if publishes else row.model_version,
        sampled=row.sampled,
        survivors=row.survivors, dropped=len(detail.get("dropped", {})),
        seconds=float((row.finished_at or row.started_at) - row.started_at),
        phase_seconds=dict(detail.get("phase_seconds", {})),
        epsilon=float(detail.get("epsilon", 0.0)), values=detail.get("values"),
        groups=row.secagg(), estimate=detail.get("estimate"),
        elapsed=float((row.finished_at or row.started_at) - first_start))


def _evaluate(record: RoundRecord, root: Path, server_key: bytes, store: Store,
              row: RoundRow, split: Split) -> None:
    model = next(m for m in store.models() if m.round_id == row.round_id)
    bundle = read_bundle(root / model.bundle_dir, server_key)
    weights, neighbours = bundle.weights(), bundle.neighbours()
    with_history = evaluate(model_scorer(weights, neighbours, split, HISTORY_DECAY, True), split)
    global_only = evaluate(model_scorer(weights, neighbours, split, HISTORY_DECAY, False),
                           split)
    record.hr, record.ndcg, record.mrr = with_history.hr, with_history.ndcg, with_history.mrr
    record.by_hidden = with_history.hidden_json()
    record.hr_global, record.ndcg_global, record.mrr_global = (
        global_only.hr, global_only.ndcg, global_only.mrr)


def _central_estimate(version: int, root: Path, server_key: bytes, store: Store,
                      queries: list[Query]) -> dict[str, Any]:
    """The central figure of what an evaluation round of ``version`` estimated."""
    model = next(m for m in store.models() if m.version == version)
    return central_estimate(read_bundle(root / model.bundle_dir, server_key), queries)


def _add_bytes(result: RunResult, reports: list[tuple[int, str, int, int]]) -> None:
    """Mean bytes up and down per device that saw its round through."""
    up: dict[int, list[int]] = defaultdict(list)
    down: dict[int, list[int]] = defaultdict(list)
    for round_id, status, bytes_up, bytes_down in reports:
        if status == "completed":
            up[round_id].append(bytes_up)
            down[round_id].append(bytes_down)
    for record in result.rounds:
        if up.get(record.round):
            record.bytes_up = float(np.mean(up[record.round]))
            record.bytes_down = float(np.mean(down[record.round]))
