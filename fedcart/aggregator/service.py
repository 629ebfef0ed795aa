"""The aggregator service: devices check in over websockets, rounds of secure aggregation
run among a Poisson sample of them, and each round's noised mean update becomes a new signed
model bundle.

The service is the coordinator: it holds the connections and runs the round loop. What a
round is (its task, cohort, terms and groups) is in ``rounds.py``, what it releases (the
sum, the noise, the optimizer step, the item-item table) in ``release.py``, how a model
version is written and served in ``publishing.py``, which version goes to every device in
``serving.py``, what is measured in ``metrics.py``.

The websocket code only moves bytes into and out of the sans-I/O ``ServerRound``s; a device
whose bytes break the protocol is dropped from the round and disconnected, and the round
goes on. A slow device is not a bad one: a message for a round that has ended, or from a
device its group stopped waiting for, is counted and ignored, and the device stays
connected for the next round. The CPU-bound end of a group (unmasking) runs in a worker
thread, so check-ins and keepalives are served meanwhile. HTTP GET /healthz and /metrics
(Prometheus) are served on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus

import numpy as np
from prometheus_client.exposition import choose_encoder
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from fedcart.aggregator import release, rounds
from fedcart.aggregator.config import AggregatorConfig, Publish
from fedcart.aggregator.item_item import head_items
from fedcart.aggregator.metrics import Metrics, peak_resident_mb
from fedcart.aggregator.pacing import FILES_KEPT, Pacer
from fedcart.aggregator.privacy import (
    Budget,
    BudgetExceeded,
    Mechanism,
    RoundCharge,
    Stage,
    calibrate_plan,
    check_budget,
    epsilon_spent,
)
from fedcart.aggregator.publishing import Model, Publisher
from fedcart.aggregator.rounds import Group, Round
from fedcart.aggregator.serving import decide
from fedcart.aggregator.sockets import SocketLimit
from fedcart.aggregator.statedir import StateDir
from fedcart.aggregator.store import Statistic, Store
from fedcart.model_export.bundle import BundleError
from fedcart.model_export.model import Neighbours, Weights, trained_groups
from fedcart.open_files import raise_open_file_limit
from fedcart.protocol import channel, evaluation
from fedcart.protocol.channel import checkin_statement
from fedcart.protocol.control import (
    Challenge,
    ComeBack,
    Hello,
    Leave,
    Outcome,
    Refusal,
    RoundNotice,
    RoundOver,
    Welcome,
    expect,
)
from fedcart.protocol.statistics import COOCCURRENCE, POPULARITY, triangle_size
from fedcart.protocol.terms import Task
from fedcart.protocol.transport import PING_INTERVAL, PING_TIMEOUT, fragments, read_ahead
from fedcart.protocol.update import TRAIN, UpdateFormat
from fedcart.secagg.client import PROTOCOL_MESSAGES
from fedcart.secagg.crypto import IdentityKey, verify
from fedcart.secagg.errors import LateMessage, ProtocolViolation, RemoteProtocolError, RoundFailed
from fedcart.secagg.groups import split_cohort
from fedcart.secagg.messages import envelope
from fedcart.secagg.server import ServerState

__all__ = ["Aggregator"]

log = logging.getLogger("fedcart.aggregator")
CHECKIN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0  # seconds a closing connection waits for the device's close frame
BUNDLE_SENDS = 32  # bundles on their way to devices at once (_send_model)
SEND_GRACE = 10.0  # seconds a message may take to reach a device beyond its size at the rate
LAG_PROBE = 0.1  # seconds between probes of the event loop's responsiveness


class CannotCharge(RuntimeError):
    """A round whose privacy cost cannot be accounted (its noise is too small for the
    format's sensitivity): the service stops, saying why, rather than run it."""


@dataclass
class _Connection:
    client_id: int
    public_key: bytes
    ws: ServerConnection
    model_version: int
    held_files: frozenset[str]  # sha256 of bundle files the device says it holds
    follow_model: bool  # send it every new version, not only when it is sampled
    since: float = field(default_factory=time.monotonic)  # when it checked in
    late: dict[int, int] = field(default_factory=dict)  # late messages of its latest round
    downloading: asyncio.Lock = field(default_factory=asyncio.Lock)  # one bundle at a time


class Aggregator:
    """The service over one state directory (see ``fedcart-aggregator init``)."""

    def __init__(self, state: StateDir, config: AggregatorConfig) -> None:
        self.state = state
        self.config = config
        self.store = Store(state.database)
        signing_key = state.signing_key()
        self.identity = IdentityKey(bytes(signing_key))
        self.publisher = Publisher(state, signing_key, self.identity.public)
        self.connections: dict[int, _Connection] = {}
        self._checking_in = 0  # connections opened whose check-in is under way (_handle)
        self.round: Round | None = None
        self.metrics = Metrics()
        self.stopping = asyncio.Event()
        self._bundle_sends = asyncio.Semaphore(BUNDLE_SENDS)
        self.rounds_done = 0
        # why the service stopped itself, when the privacy accounting refused a round
        self.stop_reason: BudgetExceeded | CannotCharge | None = None
        open_files = raise_open_file_limit()
        self.pacer = Pacer(config.pacing(open_files))
        self.sockets = SocketLimit(max(open_files - FILES_KEPT, 1),
                                   self.metrics.sockets_refused.inc)
        self.waits = rounds.Waits(config, self.pacer.pacing.capacity)
        log.info("holding at most %d connections; devices beyond them come back at %g "
                 "check-ins per second", self.pacer.pacing.capacity, self.pacer.pacing.rate)
        self.groups = trained_groups(config.train_groups)
        self.noise_multipliers = self._noise_multipliers()
        self._recover()

    def _noise_multipliers(self) -> dict[str, float]:
        """Each task's noise multiplier: a fixed ratio of one scale, the configured
        noise_multiplier or, with a target epsilon, the scale at which the whole plan
        (statistics rounds and planned_rounds training rounds) spends it."""
        cfg, stats = self.config, self.config.statistics
        ratios = {TRAIN: cfg.training_noise_ratio}
        stages = [Stage(cfg.sampling_rate, cfg.training_noise_ratio, cfg.planned_rounds)]
        if cfg.evaluate_every:
            ratios[Task.EVALUATE] = cfg.evaluation_noise_ratio
            stages.append(Stage(cfg.evaluation_q, cfg.evaluation_noise_ratio,
                                rounds.planned_evaluations(cfg)))
        if stats is not None:
            ratios |= {POPULARITY: stats.popularity_noise_ratio, COOCCURRENCE: 1.0}
            stages += [Stage(stats.sampling_rate, stats.popularity_noise_ratio),
                       Stage(stats.sampling_rate, 1.0)]
        scale = cfg.noise_multiplier
        if cfg.target_epsilon > 0 and cfg.mechanism != "none":
            scale = calibrate_plan(cfg.target_epsilon, cfg.delta, stages, cfg.mechanism)
        multipliers: dict[str, float] = {task: ratio * scale for task, ratio in ratios.items()}
        if cfg.mechanism != "none":
            log.info("noise multipliers %s%s", ", ".join(
                f"{t} z = {z:.4f}" for t, z in multipliers.items()),
                f" (epsilon {cfg.target_epsilon:g} over the plan)" if cfg.target_epsilon else "")
        return multipliers

    # -- start-up ------------------------------------------------------------------------
    def _recover(self) -> None:
        """Resume after a crash: interrupted rounds stay charged, unpublished bundles go."""
        for round_id in self.store.abandon_running_rounds():
            log.warning("round %d was interrupted by a restart; its ledger entry (if any) "
                        "stands", round_id)
        self.publisher.remove_unpublished(self.store.models())
        latest = self.store.latest_model()
        if latest is None:
            raise RuntimeError(f"{self.state.root} has no model: run fedcart-aggregator init")
        self._use(self.publisher.load(latest), latest.version)
        self.trained = self.store.trained_rounds()
        serving = self.store.serving_version()
        if serving is None or serving == latest.version or \
                self.config.publish is Publish.ALWAYS:
            self._serve(self.latest, latest.version)
        else:
            row = next(m for m in self.store.models() if m.version == serving)
            try:
                self._serve(self.publisher.load(row), serving)
            except (OSError, BundleError) as exc:
                log.warning("serving version %d cannot be read (%s): version %d is served "
                            "instead", serving, exc, latest.version)
                self._serve(self.latest, latest.version)
        for estimate in self.store.estimates():
            self.metrics.show_estimate(estimate)
        self.metrics.epsilon.set(epsilon_spent(self.store.ledger(), self.config.delta))

    def _use(self, model: Model, version: int) -> None:
        """Make ``model`` the latest version: the one rounds train and evaluate."""
        self.latest, self.bundle = model, model.bundle
        self.weights, self.neighbours = model.bundle.weights(), model.bundle.neighbours()
        self.model_version = version
        self.metrics.model_version.set(version)

    def _serve(self, model: Model, version: int) -> None:
        """Make ``model`` the version every device that follows the model gets."""
        self.serving, self.serving_version = model, version
        self.store.serve(version)
        self.metrics.serving_version.set(version)

    # -- serving -------------------------------------------------------------------------
    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Run until ``stop()`` (SIGTERM), max_rounds, or the privacy budget is spent."""
        cfg = self.config
        tls = None
        if cfg.tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        stats = cfg.statistics
        largest = max(self.weights.flat().size, self.weights.n_items,
                      triangle_size(stats.head_items) if stats is not None else 0)
        vector_bytes = 4 * (largest + 1)
        # no permessage-deflate: masked vectors are uniformly random and never compress;
        # deflating them cost CPU on both ends and held decompression buffers per connection
        # leaving the block closes every connection at once (1001), each waiting at most
        # CLOSE_TIMEOUT for the device's answer: a stop takes seconds, not one close
        # timeout per device in turn
        async with serve(self._handle, cfg.host, cfg.port, max_size=vector_bytes + (1 << 20),
                         process_request=self._http, ssl=tls, ping_interval=PING_INTERVAL,
                         ping_timeout=PING_TIMEOUT, close_timeout=CLOSE_TIMEOUT,
                         compression=None,
                         create_connection=self.sockets.connection_class()) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            log.info("serving on %s://%s:%d (model version %d)", "wss" if tls else "ws",
                     cfg.host, self.port, self.model_version)
            if ready is not None:
                ready.set()
            round_loop = asyncio.create_task(self._round_loop())
            probe = asyncio.create_task(self._probe_loop())
            stopped = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([round_loop, stopped], return_when=asyncio.FIRST_COMPLETED)
            if self.round is not None:  # an unmasking thread gives up at its next secret
                for group in self.round.groups:
                    group.server.abort()
            round_loop.cancel()
            stopped.cancel()
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await round_loop
            log.info("closing %d connections", len(self.connections))
        self.store.close()
        log.info("stopped; peak resident memory %.1f MB", peak_resident_mb())

    def stop(self) -> None:
        self.stopping.set()

    async def _probe_loop(self) -> None:
        """Measure how late the event loop wakes a sleeper: the time a check-in, a ping or
        a message waits behind work on the loop. A round records its longest stall."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(LAG_PROBE)
            stall = time.monotonic() - started - LAG_PROBE
            if self.round is not None:
                self.round.loop_stall = max(self.round.loop_stall, stall)

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, f"ok model_version={self.model_version}\n")
        if request.path == "/metrics":
            self.metrics.connected.set(len(self.connections))
            # the exposition format the scraper asks for (OpenMetrics or Prometheus text),
            # with its Content-Type in place of respond()'s plain text one: one header
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            response = connection.respond(HTTPStatus.OK,
                                          encoder(self.metrics.registry).decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = content_type
            return response
        if request.path != "/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        if len(self.connections) + self._checking_in >= self.pacer.pacing.capacity:
            # full, counting the check-ins under way: each holds an open file until its
            # device answers (up to CHECKIN_TIMEOUT), and a storm of them on a full server
            # ran it out of files. Sent away before the challenge: nothing to verify.
            await self._send_away(ws)
            return
        self._checking_in += 1
        try:
            conn = await self._check_in(ws)
        except ConnectionClosed as exc:  # gone before its check-in: routine too, one line
            log.info("a connection closed before its check-in: %s", exc)
            return
        finally:
            self._checking_in -= 1
        if conn is None:
            return
        try:
            async for frame in ws:
                await self._on_frame(conn, frame)
                # the loop variable would pin this device's last message (a masked input
                # is d-sized) until its next one: O(n d) across connections
                del frame
        except RemoteProtocolError as exc:
            log.info("device %d misbehaved and was disconnected: %s", conn.client_id, exc)
            with contextlib.suppress(Exception):
                await ws.send(Refusal(str(exc)).to_frame())
            await ws.close(1008, "protocol violation")
        except ConnectionClosed as exc:  # a phone going away is routine: one line
            log.info("device %d disconnected: %s", conn.client_id, exc)
        except Exception:
            log.exception("connection of device %d failed", conn.client_id)
        finally:
            if self.connections.get(conn.client_id) is conn:
                del self.connections[conn.client_id]
            self._drop_from_round(conn.client_id, "disconnected")

    async def _on_frame(self, conn: _Connection, frame: bytes | str) -> None:
        if isinstance(frame, str):
            raise ProtocolViolation("text frames are not part of the protocol")
        self.metrics.bytes_up.inc(len(frame))
        kind, payload = channel.parse(frame)
        if isinstance(payload, Leave):
            # a device that refuses the round (say, a server message it could not verify)
            # says so, instead of leaving the phase to wait for its deadline
            log.info("device %d left round: %s", conn.client_id, payload.reason[:200])
            self._drop_from_round(conn.client_id, "left")
            return
        if kind != channel.SECAGG:
            raise ProtocolViolation("devices send only check-in, leave and secagg frames")
        assert isinstance(payload, memoryview)  # what channel.parse gives for SECAGG
        await self._secagg_from(conn, payload)

    async def _check_in(self, ws: ServerConnection) -> _Connection | None:
        nonce = os.urandom(32)
        await ws.send(Challenge(nonce, self.identity.public).to_frame())
        try:
            frame = await asyncio.wait_for(ws.recv(), CHECKIN_TIMEOUT)
            hello = expect(channel.parse(frame)[1], Hello)  # type: ignore[arg-type]
            verify(hello.public_key, checkin_statement(nonce, self.identity.public),
                   hello.signature, "the check-in")
            client_id = self.store.client_of(hello.public_key)
            if client_id is None and hello.token is not None:
                client_id = self.store.redeem_token(hello.token, hello.public_key)
            if client_id is None:
                raise ProtocolViolation("this device is not enrolled")
        except (TimeoutError, RemoteProtocolError) as exc:
            reason = str(exc) or type(exc).__name__
            log.info("check-in refused: %s", reason)
            self.metrics.check_ins.labels("refused").inc()
            with contextlib.suppress(Exception):
                await ws.send(Refusal(f"check-in refused: {reason}").to_frame())
                await ws.close(1008, "check-in refused")
            return None
        if client_id not in self.connections and not self.pacer.admits(len(self.connections)):
            await self._send_away(ws)
            return None
        self.metrics.check_ins.labels("kept").inc()
        old = self.connections.get(client_id)
        if old is not None:
            await old.ws.close(1000, "replaced by a newer connection")
        conn = _Connection(client_id, hello.public_key, ws, hello.model_version,
                           hello.held_files, hello.follow_model)
        self.connections[client_id] = conn
        try:
            await ws.send(Welcome(client_id, self.model_version).to_frame())
        except ConnectionClosed:  # gone meanwhile: it must not count as checked in
            if self.connections.get(client_id) is conn:
                del self.connections[client_id]
            raise
        if hello.follow_model:
            await self._send_model(conn, self.serving)
        return conn

    async def _send_away(self, ws: ServerConnection) -> None:
        """Tell a device to come back at its slot of the pace (``pacing.Pacer``), and close
        the connection at once: the ComeBack is flushed, but no close handshake is awaited,
        since on a full server each connection waiting out its handshake held a file (up to
        CLOSE_TIMEOUT) while more arrived."""
        after = self.pacer.send_away(time.monotonic())
        self.metrics.check_ins.labels("sent_away").inc()
        with contextlib.suppress(Exception):
            await ws.send(ComeBack(after, self.pacer.pacing.jitter).to_frame())
        ws.transport.close()

    async def _end_leases(self) -> None:
        """Between rounds, while devices wait to check in: send away the connections that
        have outstayed their lease, so that every device is in time among those sampled."""
        now = time.monotonic()
        if not self.pacer.waiting(now):
            return
        since = {cid: conn.since for cid, conn in self.connections.items()}
        for cid in self.pacer.outstayed(since, now):
            conn = self.connections.pop(cid, None)
            if conn is not None:
                self.metrics.released.inc()
                await self._send_away(conn.ws)

    async def _send_model(self, conn: _Connection, model: Model) -> None:
        """Send ``model``'s bundle if the device is behind it: without the files it already
        holds, in fragments. The semaphore bounds the bundles on their way at once (the
        sends share the one frame: fragments are views of it).

        A bundle larger than what the device's connection reads ahead of its application
        (``transport.read_ahead``) holds its slot until the pong of a ping sent after it,
        which the device sends only once it has read the whole bundle: a device that takes
        one in slowly (a simulation's worker installing others) holds its slot, and the
        rest of its bundle waits here, by flow control, not in the kernel's buffers with
        its keepalives stuck behind it. A smaller bundle is read ahead whatever the device
        does, and its pong would only add a round trip to each download.

        The send and the pong have the message's deadline (``_deadline``); a device that
        misses it is cut off (``_cut_off``): reading just fast enough for its keepalives,
        it would otherwise hold a slot, and a round's notices (``_notify``), as long as it
        liked.

        A connection takes one bundle at a time, and whether the device is behind is asked
        once the one before is through, so that it is never sent one version twice, or an
        older after a newer."""
        version, files = model.bundle.manifest.model_version, model.constant_files
        async with conn.downloading:
            if conn.model_version >= version or conn.ws.state is not State.OPEN:
                return
            frame = model.update_frame if files <= conn.held_files else model.bundle_frame
            with contextlib.suppress(Exception):
                async with self._bundle_sends:
                    try:
                        async with asyncio.timeout(self._deadline(len(frame))):
                            await conn.ws.send(fragments(frame))
                            if not read_ahead(frame):
                                await asyncio.wait_for(await conn.ws.ping(), PING_TIMEOUT)
                    except TimeoutError:
                        self._cut_off(conn, len(frame))
                        return
                conn.model_version, conn.held_files = version, files
                self.metrics.bytes_down.inc(len(frame))

    def _deadline(self, size: int) -> float | None:
        """Seconds a device has to take in a message of ``size`` bytes: SEND_GRACE plus the
        size at ``min_download_rate`` (None, no limit, when the rate is 0)."""
        rate = self.config.min_download_rate
        return SEND_GRACE + size / rate if rate else None

    def _cut_off(self, conn: _Connection, size: int) -> None:
        """Close the connection of a device that did not take in ``size`` bytes by their
        deadline (or a large bundle's pong within PING_TIMEOUT): a message cut short cannot
        go on, so the connection cannot either."""
        self.metrics.downloads_cut.inc()
        log.info("device %d did not take in a message of %d bytes in time (min_download_rate "
                 "%g bytes a second; a large bundle's pong within %g s): disconnected",
                 conn.client_id, size, self.config.min_download_rate, PING_TIMEOUT)
        conn.ws.transport.abort()

    # -- rounds --------------------------------------------------------------------------
    async def _round_loop(self) -> None:
        cfg = self.config
        while not self.stopping.is_set():
            try:
                outcome = await self._run_round()
            except (BudgetExceeded, CannotCharge) as exc:
                log.error("%s", exc)
                self.stop_reason = exc
                self.stop()
                return
            await self._end_leases()
            if outcome == "completed":  # a training round (the others do not count)
                self.rounds_done += 1
                self.trained += 1
            # after the last training round, the evaluation due then (once: a failed one
            # is not retried)
            if outcome != "skipped" and self._max_rounds_done() and \
                    (outcome == "failed" or not self._evaluation_due()):
                log.info("completed %d rounds: stopping", self.rounds_done)
                self.stop()
                return
            await asyncio.sleep(cfg.round_interval if outcome != "skipped" else 0.2)

    def _max_rounds_done(self) -> bool:
        return bool(self.config.max_rounds) and self.rounds_done >= self.config.max_rounds

    def _evaluation_due(self) -> bool:
        """Whether the latest version is to be evaluated before training goes on (or,
        after the last training round, before the service stops)."""
        return rounds.evaluation_due(self.config, self.trained,
                                     self.store.estimate(self.model_version) is not None,
                                     self._max_rounds_done())

    async def _run_round(self) -> str:
        cfg = self.config
        task = rounds.next_task(cfg, self.store.released, self._evaluation_due())
        sampling_rate = rounds.sampling_rate(cfg, task)
        if not self.waits.population_ready(task, sampling_rate, len(self.connections),
                                           self.store.enrolled):
            return "skipped"
        cohort = rounds.sample({cid: c.public_key for cid, c in self.connections.items()},
                               sampling_rate)
        if not self.waits.cohort_ready(len(cohort), sampling_rate, len(self.connections)):
            return "skipped"
        round_id = self.store.next_round_id()
        head = self._head() if task == COOCCURRENCE else None
        members = split_cohort(list(cohort), cfg.group_size)
        # every group encodes for the largest group's size: one format for the round
        terms = rounds.round_terms(cfg, task, max(len(m) for m in members), head,
                                   self.bundle.manifest.vocabulary_sha256, self.weights,
                                   self.groups, self.model_version)
        fmt = UpdateFormat.of(terms)
        charge = None
        if cfg.mechanism != "none":
            try:
                charge = RoundCharge(round_id, sampling_rate, self.noise_multipliers[task],
                                     Mechanism(cfg.mechanism), fmt.sensitivity)
            except ValueError as exc:
                raise CannotCharge(f"round {round_id} ({task}) cannot be accounted: {exc}; "
                                   "no round runs") from exc
            check_budget(self.store.ledger(), charge, Budget(cfg.budget_epsilon, cfg.delta))
        groups = rounds.groups_for(cfg, round_id, cohort, members, fmt.vector_len, terms,
                                   self.identity)
        current = Round(round_id, task, cohort, groups, head)
        self.round = current
        started = time.monotonic()
        self.store.start_round(round_id, self.model_version, len(cohort))
        log.info("round %d (%s): %d devices sampled in %d group(s): %s", round_id, task,
                 len(cohort), len(groups), "; ".join(
                     f"{g.params.n} devices {g.params.describe()}" for g in groups))
        try:
            await self._notify(current)
            await asyncio.gather(*(self._drive(current, g) for g in groups))
        finally:
            self.round = None
        dropped = current.dropped()
        detail = {"task": task, "values": fmt.vector_len,
                  "dropped": {str(k): v for k, v in dropped.items()},
                  "phase_seconds": current.phase_seconds(), "bytes_up": current.bytes_up,
                  "late_messages": current.late,
                  "loop_stall_seconds": round(current.loop_stall, 4),
                  "groups": [g.summary() for g in groups]}
        self.metrics.dropouts.inc(len(dropped))
        self.metrics.loop_stall.set(current.loop_stall)
        for g in groups:
            self.metrics.groups.labels("completed" if g.done else "failed").inc()
        done = [g for g in groups if g.done]
        if not done:
            reasons = "; ".join(f"group {g.index}: {g.server.failure}" for g in groups)
            self.store.finish_round(round_id, "failed", None, {**detail, "reason": reasons})
            self.metrics.rounds.labels("failed").inc()
            log.warning("round %d failed: %s", round_id, reasons)
            await self._announce(current, Outcome.FAILED)
            self.metrics.round_seconds.labels(task, "failed").observe(
                time.monotonic() - started)
            return "failed"
        for g in groups:
            if not g.done:
                log.warning("round %d: group %d (%d devices) failed and drops out: %s",
                            round_id, g.index, g.params.n, g.server.failure)
        sums = self._sum(groups, fmt, detail)
        if task == TRAIN:
            await self._apply(current, fmt, sums, charge, detail)
        elif task == Task.EVALUATE:
            await self._apply_evaluation(current, fmt, sums, charge, detail)
        else:
            await self._apply_statistic(current, fmt, sums, charge, detail)
        await self._announce(current, Outcome.COMPLETED)
        self.metrics.round_seconds.labels(task, "completed").observe(time.monotonic() - started)
        if task == TRAIN:
            return "completed"
        return "evaluated" if task == Task.EVALUATE else "statistic"

    async def _notify(self, current: Round) -> None:
        """Send a training or evaluation round's cohort the latest model if they are behind,
        then every member its round notice: the round's id and the device's id in it (the
        terms come signed, in the round config)."""
        if current.task in (TRAIN, Task.EVALUATE):
            await asyncio.gather(*(self._send_model(self.connections[cid], self.latest)
                                   for cid in current.cohort if cid in self.connections))
        await asyncio.gather(*(self._send(cid, RoundNotice(current.round_id, cid).to_frame())
                               for cid in current.cohort))

    def _sum(self, groups: list[Group], fmt: UpdateFormat, detail: dict) -> np.ndarray:
        """The completed groups' integer sums added up, each first clamped to what its
        devices could honestly have sent (``release.add_up``). Under DP how many entries
        were outside that range is neither stored nor logged: it depends on honest inputs,
        without noise. Without DP, ``detail`` records the count."""
        dp = self.config.mechanism != "none"
        done = [g for g in groups if g.done]
        results = []
        for g in done:
            assert g.server.result is not None
            results.append((g.server.result, len(g.server.survivors)))
        total, outside = release.add_up(fmt, results, dp)
        for g, count in zip(done, outside, strict=True):
            if count and not dp:
                detail["clamped_entries"] = detail.get("clamped_entries", 0) + count
                log.warning("round %d: group %d's sum had %d entries outside what its "
                            "devices can honestly send: clamped", g.server.round_id,
                            g.index, count)
        return total

    def _head(self) -> np.ndarray:
        """The co-occurrence round's items: the most popular by the released popularity."""
        popularity = self.store.statistic(POPULARITY)
        assert popularity is not None and self.config.statistics is not None
        return head_items(popularity.total, min(self.config.statistics.head_items,
                                                self.weights.n_items))

    async def _drive(self, current: Round, group: Group) -> None:
        """Run one group to its end: wait for each phase to end (every expected answer in,
        or dropped) or time out, send what the group queued (a disconnect can end a phase
        as well as a message), and unmask in a worker thread."""
        server = group.server
        with contextlib.suppress(RoundFailed):  # every member gone before it started
            server.start()
        await self._flush(group)
        while server.state not in (ServerState.DONE, ServerState.FAILED):
            phase, started = server.state, time.monotonic()
            if phase == ServerState.RECONSTRUCT:
                with contextlib.suppress(RoundFailed):
                    await asyncio.to_thread(server.finish)
            else:
                deadline = started + self.config.phase_timeout
                while server.state == phase and (remaining := deadline - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(group.changed.wait(), remaining)
                    group.changed.clear()
                    await self._flush(group)
                if server.state == phase:
                    with contextlib.suppress(RoundFailed):
                        server.deadline()
                    await self._flush(group)
            group.phase_seconds[phase.name] = round(time.monotonic() - started, 4)

    async def _secagg_from(self, conn: _Connection, data: bytes | memoryview) -> None:
        """Route a device's secagg message to its group. One for a round that has ended,
        or that its group no longer waits for, is late: counted, ignored, and the device is
        told that its round is over; it keeps its connection."""
        round_id, _ = envelope(data)
        current = self.round
        group = None if current is None else current.group_of.get(conn.client_id)
        if current is None or group is None or round_id != current.round_id:
            ended = current.round_id if current is not None else self.store.next_round_id()
            if round_id < ended:  # a round that is over
                self._late(conn, round_id)
                return
            raise ProtocolViolation(f"secagg message for round {round_id}, which this "
                                    "device is not in")
        current.bytes_up += len(data)
        try:
            group.server.receive(conn.client_id, data)
        except LateMessage:
            self._late(conn, round_id)
            # a survivor that missed a later deadline is in the sum: the round's end tells it
            if conn.client_id not in current.told_over and \
                    conn.client_id not in group.server.survivors:
                current.told_over.add(conn.client_id)
                outcome = Outcome.FAILED if group.server.state == ServerState.FAILED \
                    else Outcome.DROPPED
                await self._send(conn.client_id, self._round_over(round_id, outcome))
            return
        except RoundFailed:
            pass  # the round loop sees FAILED and records the reason
        finally:
            group.changed.set()
        await self._flush(group)

    def _late(self, conn: _Connection, round_id: int) -> None:
        """Count and ignore a late message; log the first of a device's round. More late
        messages than a round has (a device sends PROTOCOL_MESSAGES) is abuse, not
        slowness: a violation."""
        self.metrics.late.inc()
        if self.round is not None and self.round.round_id == round_id:
            self.round.late += 1
        count = conn.late.get(round_id, 0) + 1
        conn.late = {round_id: count}  # only the latest round's count is kept
        if count > PROTOCOL_MESSAGES:
            raise ProtocolViolation(f"{count} late messages for round {round_id}: a round "
                                    f"has {PROTOCOL_MESSAGES}")
        if count == 1:
            log.info("late message from device %d for round %d, ignored", conn.client_id,
                     round_id)

    def _drop_from_round(self, client_id: int, reason: str) -> None:
        current = self.round
        group = None if current is None else current.group_of.get(client_id)
        if group is not None and group.server.state not in (
                ServerState.RECONSTRUCT, ServerState.DONE, ServerState.FAILED):
            with contextlib.suppress(RoundFailed):
                group.server.drop(client_id, reason)
            group.changed.set()

    async def _flush(self, group: Group) -> None:
        """Send what the group queued, to every device at once: one device whose buffer is
        full must not hold up the others' messages."""
        await asyncio.gather(*(self._send(cid, bytes([channel.SECAGG]) + data)
                               for cid, data in group.server.data_to_send()))

    async def _send(self, client_id: int, frame: bytes) -> None:
        """Send a round's message to a member, which drops out of the round if it is gone
        or, cut off, does not take the message in by its deadline."""
        conn = self.connections.get(client_id)
        if conn is None:
            self._drop_from_round(client_id, "not connected")
            return
        try:
            async with asyncio.timeout(self._deadline(len(frame))):
                await conn.ws.send(frame)
        except TimeoutError:
            self._cut_off(conn, len(frame))
            self._drop_from_round(client_id, "too slow")
        except Exception:
            self._drop_from_round(client_id, "send failed")
        else:
            self.metrics.bytes_down.inc(len(frame))

    def _round_over(self, round_id: int, outcome: Outcome) -> bytes:
        return RoundOver(round_id, outcome, self.model_version).to_frame()

    async def _announce(self, current: Round, status: Outcome) -> None:
        """Tell every member how the round ended for it: ``status`` if its input is in the
        sum, else dropped (its group went on without it) or failed (its group failed)."""

        def outcome(group: Group, cid: int) -> Outcome:
            if group.done and cid in group.server.survivors:
                return status
            return Outcome.DROPPED if group.done else Outcome.FAILED

        await asyncio.gather(*(
            self._send(cid, self._round_over(current.round_id, outcome(g, cid)))
            for g in current.groups for cid in g.server.participants))

    async def _noised(self, current: Round, sums: np.ndarray, fmt: UpdateFormat,
                      charge: RoundCharge | None, detail: dict) -> tuple[np.ndarray, float]:
        """The integer ``sums`` plus the round's DP noise (none without DP), sampled
        exactly in the integers (in a worker thread: seconds for a large vector), in the
        values' units and brought within the norm honest inputs and the noise can reach;
        and the noise's standard deviation in those units. The charge is committed first,
        before the noised sum exists."""
        if charge is None:
            noised = release.Noised(sums, 0.0, 0.0)
        else:
            # committed before the noise is drawn (a privacy invariant: no noised sum exists
            # that the ledger does not account for, whatever crashes after the draw)
            self.store.charge(charge)
            noised = await asyncio.to_thread(release.add_noise, sums, charge)
        values, std, limited = release.in_units(fmt, noised, self._inputs_bound(current))
        if limited:
            detail["norm_limited"] = True
            log.warning("round %d: the sum's norm exceeded what honest devices and the noise "
                        "reach: scaled down", current.round_id)
        return values, std

    def _inputs_bound(self, current: Round) -> int:
        """How many inputs the released sum's norm is bounded for. Without DP, the round's
        survivors. Under DP a number that depends on no one's participation
        (``release.inputs_bound``)."""
        if self.config.mechanism == "none":
            return current.survivors
        expected = rounds.sampling_rate(self.config, current.task) * self._sampled_among()
        return release.inputs_bound(expected)

    def _sampled_among(self) -> int:
        """N of the fixed denominator q*N: the population (``privacy.population``, else the
        enrolled count), but no more than the connections a round samples among (pacing
        capacity): beyond it, q*N would overstate the expected cohort by N / capacity and
        shrink every step. Neither depends on anyone's participation."""
        population = self.config.population or self.store.enrolled()
        return min(population, self.pacer.pacing.capacity)

    async def _apply(self, current: Round, fmt: UpdateFormat, sums: np.ndarray,
                     charge: RoundCharge | None, detail: dict) -> None:
        """A training round: charge the ledger, noise the sum, step the optimizer on the
        trained groups with the mean over a denominator the server fixes (no device's
        input sets it), sign and publish."""
        cfg = self.config
        noised, _ = await self._noised(current, sums, fmt, charge, detail)
        denominator = (cfg.sampling_rate * self._sampled_among()
                       if charge is not None else current.survivors)
        new, optimizer_state = release.training_step(
            self.weights, noised, denominator, self.groups, cfg.optimizer, cfg.optimizer_lr,
            self.store.optimizer_state(self.model_version))
        await self._publish(current, new, self.neighbours, optimizer_state, detail)

    async def _apply_statistic(self, current: Round, fmt: UpdateFormat, sums: np.ndarray,
                               charge: RoundCharge | None, detail: dict) -> None:
        """A statistics round: charge, noise, store. The popularity sum names the next
        round's head items; the co-occurrence sum becomes the item-item table and, with the
        popularity, the bias of a new model version."""
        stats = self.config.statistics
        assert stats is not None
        total, noise_std = await self._noised(current, sums, fmt, charge, detail)
        head = current.head if current.head is not None else np.arange(self.weights.n_items)
        released = Statistic(current.task, current.round_id, head, total, noise_std)
        survivors = current.survivors
        if current.task == POPULARITY:
            detail["epsilon"] = epsilon_spent(self.store.ledger(), self.config.delta)
            self.store.record_statistic(released, survivors, detail)
            self.metrics.rounds.labels("completed").inc()
            log.info("round %d: popularity of %d items from %d survivors", current.round_id,
                     total.size, survivors)
            return
        popularity = self.store.statistic(POPULARITY)
        assert popularity is not None
        # seconds of numpy for a large catalog (the names' table, EASE's inverse): off the
        # event loop, so check-ins and pings are served meanwhile
        new, table = await asyncio.to_thread(release.cooccurrence_model, self.weights, total,
                                             head, self.bundle.names, stats, noise_std,
                                             popularity.total)
        log.info("round %d: item-item table over %d head items from %d survivors (noise "
                 "std %.3g)", current.round_id, len(head), survivors, noise_std)
        await self._publish(current, new, table, {}, detail, released)

    async def _apply_evaluation(self, current: Round, fmt: UpdateFormat, sums: np.ndarray,
                                charge: RoundCharge | None, detail: dict) -> None:
        """An evaluation round: charge, noise, and keep the latest version's estimate with
        its interval; under the publishing policy ``not_worse``, send the version to every
        device that follows the model if the estimate is not worse than the serving one's."""
        cfg = self.config
        totals, noise_std = await self._noised(current, sums, fmt, charge, detail)
        # each input's values were rounded to the format's steps, each by less than one
        # (under DP, for the bound on the inputs that depends on no one's participation)
        estimate = evaluation.estimate(self.model_version, totals, noise_std,
                                       rounds.sampling_rate(cfg, Task.EVALUATE),
                                       rounding=self._inputs_bound(current) / fmt.scale)
        decision = decide(estimate, self.store.estimate(self.serving_version),
                          self.serving_version, cfg.publish, cfg.publish_tolerance)
        detail["estimate"] = estimate.to_json()
        detail["epsilon"] = epsilon_spent(self.store.ledger(), cfg.delta)
        if decision is not None:
            detail["publish"] = {"sent": decision.publish, "reason": decision.reason}
        self.store.record_estimate(estimate, current.round_id, current.survivors, detail)
        self.metrics.rounds.labels("completed").inc()
        self.metrics.epsilon.set(detail["epsilon"])
        self.metrics.show_estimate(estimate)
        log.info("round %d: model version %d scores HitRate@10 %s, NDCG@10 %s, MRR %s on "
                 "%.0f queries (%d%% intervals)", current.round_id, self.model_version,
                 estimate.hr, estimate.ndcg, estimate.mrr, estimate.queries,
                 round(100 * evaluation.CONFIDENCE))
        if decision is not None:
            log.info("%s", decision.reason)
            if decision.publish:
                await self._serve_followers(self.latest, self.model_version)

    async def _serve_followers(self, model: Model, version: int) -> None:
        """Make ``model`` the serving version and send it to the devices that follow, side
        by side (the send slots bound how many take it in at once). The round's end waits
        for them, so that its members have the version before its RoundOver: a device that
        reads slowly holds it up to its deadline, not one after another's."""
        self._serve(model, version)
        await asyncio.gather(*(self._send_model(conn, model)
                               for conn in list(self.connections.values())
                               if conn.follow_model))

    async def _publish(self, current: Round, weights: Weights, neighbours: Neighbours,
                       optimizer_state: dict[str, np.ndarray], detail: dict,
                       statistic: Statistic | None = None) -> None:
        """Sign and publish a new model version (with the statistic it was derived from, in
        the same transaction), then send it to the devices that follow every version."""
        cfg = self.config
        survivors = current.survivors
        version = self.model_version + 1
        row, model = await self.publisher.write(self.bundle, weights, neighbours, version,
                                                current.round_id)
        detail["epsilon"] = epsilon_spent(self.store.ledger(), cfg.delta)
        self.store.publish(row, optimizer_state, current.round_id, survivors, detail,
                           statistic)
        self._use(model, version)
        self.metrics.rounds.labels("completed").inc()
        self.metrics.survivors.set(survivors)
        self.metrics.epsilon.set(detail["epsilon"])
        log.info("round %d: %d survivors, model version %d, epsilon %.4g", current.round_id,
                 survivors, version, detail["epsilon"])
        if cfg.publish is Publish.ALWAYS:
            await self._serve_followers(model, version)
        await self.publisher.prune(self.store.models(), cfg.keep_bundles,
                                   self.serving_version)
