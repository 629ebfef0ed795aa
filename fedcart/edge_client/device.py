"""A device: its identity, purchase history and model, offline recommendations, and rounds
of federated training over a websocket.

The websocket code only moves bytes: control frames are handled here, secagg frames go to the
sans-I/O ``ClientRound``, and what it queues is sent back. What leaves the device: its public
key and check-in signature, protocol messages, and one masked vector per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection, connect

from fedcart.edge_client.recommender import OfflineRecommender, Recommendation
from fedcart.edge_client.store import DeviceStore
from fedcart.model_export.bundle import (
    CONSTANT_FILES,
    MANIFEST,
    SIGNATURE,
    Bundle,
    BundleError,
    Manifest,
    unpack_members,
    verify_members,
)
from fedcart.model_export.features import ExampleSet
from fedcart.model_export.model import TENSOR_NAMES, pick, trained_groups
from fedcart.model_export.runtime import TrainStep
from fedcart.model_export.statistics import contribution
from fedcart.model_export.update import UpdateFormat
from fedcart.protocol import channel
from fedcart.protocol.channel import checkin_statement
from fedcart.protocol.control import (
    Challenge,
    ComeBack,
    ControlMessage,
    Hello,
    Leave,
    Refusal,
    RoundNotice,
    RoundOver,
    Welcome,
)
from fedcart.protocol.policy import DevicePolicy
from fedcart.protocol.terms import RoundTerms, Task, TermsError
from fedcart.secagg.client import ClientRound
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.errors import (
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    RoundFailed,
)
from fedcart.secagg.messages import RoundConfig

__all__ = ["Device", "RoundReport"]

log = logging.getLogger("fedcart.device")
MAX_DOWNLOAD = 512 << 20  # largest frame a device accepts (a bundle)
_JITTER = secrets.SystemRandom()  # when in its window a device sent away comes back
FRAGMENT = 64 << 10


@dataclass(frozen=True)
class RoundReport:
    round_id: int
    status: str  # "sent" (masked input delivered), or why it was not
    examples: int
    bytes_up: int
    bytes_down: int


# Bundles verified in this process, by (server key, manifest sha256): the devices a
# simulation worker holds all run the same model version, and each would otherwise read and
# hash the same files again. Only verified bytes go in, so what runs is what was checked.
VERIFIED_CACHE = 2
_verified: OrderedDict[tuple[bytes, str], Bundle] = OrderedDict()
_verified_lock = threading.Lock()


def _verified_bundle(server_key: bytes, manifest_sha256: str) -> Bundle | None:
    with _verified_lock:
        bundle = _verified.get((server_key, manifest_sha256))
        if bundle is not None:
            _verified.move_to_end((server_key, manifest_sha256))
        return bundle


def _remember(server_key: bytes, bundle: Bundle) -> None:
    key = (server_key, hashlib.sha256(bundle.manifest_json).hexdigest())
    with _verified_lock:
        _verified[key] = bundle
        _verified.move_to_end(key)
        while len(_verified) > VERIFIED_CACHE:
            _verified.popitem(last=False)


class Device:
    """One shopper's device. ``server_key`` is the aggregator's pinned Ed25519 key: it
    signs bundles and round configs. ``policy``: the rounds it agrees to join, pinned here
    like the key (protocol.policy). ``blob_dir``: a bundle file store shared with other
    profiles on this host (see DeviceStore); the device's own by default.

    Only the current bundle's manifest stays in memory: the files are read back and verified
    when they are used, so a process can hold thousands of idle devices."""

    def __init__(self, state_dir: Path | str, server_key: bytes,
                 blob_dir: Path | None = None, policy: DevicePolicy | None = None) -> None:
        self.store = DeviceStore(Path(state_dir), blob_dir)
        self.server_key = server_key
        self.policy = policy or DevicePolicy()
        with self.store.opened():  # one connection (and one checkpoint) for the identity
            seed = self.store.get("identity_seed")
            if seed is None:
                seed = os.urandom(32).hex()
                self.store.put("identity_seed", seed)
        self.identity = IdentityKey(bytes.fromhex(seed))
        self._recommender: OfflineRecommender | None = None
        current = self.current_bundle()
        self.manifest: Manifest | None = None if current is None else current.manifest

    # -- offline use ---------------------------------------------------------------------
    @property
    def model_version(self) -> int:
        return -1 if self.manifest is None else self.manifest.model_version

    def current_bundle(self) -> Bundle | None:
        """The installed bundle, verified again as it is read (or as verified earlier in this
        process: the bytes kept then are what runs); None if there is none or it no longer
        verifies (then the next round's download replaces it)."""
        files = self.store.current_files()
        if not files:
            return None
        cached = _verified_bundle(self.server_key, files.get(MANIFEST, ""))
        if cached is not None:
            return cached
        members = {n: data for n in (MANIFEST, SIGNATURE)
                   if (data := self.store.blob(files.get(n, ""))) is not None}
        try:
            bundle = verify_members(members, self.server_key, lookup=self.store.blob,
                                    origin=f"{self.store.dir}: installed bundle")
        except BundleError as exc:
            log.warning("%s", exc)
            return None
        _remember(self.server_key, bundle)
        return bundle

    def held_files(self) -> list[str]:
        """sha256 of the current bundle's files that do not change between model versions:
        the server leaves them out of the next download."""
        return [d for n, d in sorted(self.store.current_files().items())
                if n in CONSTANT_FILES and self.store.has_blob(d)]

    def add_basket(self, items: Sequence[str]) -> None:
        self.store.add_basket(list(items))

    def recommend(self, cart: Sequence[str], k: int = 10) -> list[Recommendation]:
        """Top-k for ``cart``, blended with this device's own purchase history (offline)."""
        if self._recommender is None:
            bundle = self.current_bundle()
            if bundle is None:
                raise RuntimeError("no model installed yet: take part in a round first")
            self._recommender = OfflineRecommender(bundle)
        known = [[i for i in b if i in self._recommender.index] for b in self.store.baskets()]
        return self._recommender.recommend(cart, k, [b for b in known if b])

    def install(self, data: bytes) -> Bundle:
        """Verify received bundle bytes (signature, hashes, vocabulary, no downgrade), taking
        the files left out of them from this device's store, and swap them in; on any
        failure the current bundle keeps serving."""
        return self.install_members(unpack_members(data), "received bundle")

    def install_members(self, members: Mapping[str, bytes], origin: str) -> Bundle:
        """:meth:`install` for a bundle's files by name: also the bundle an app ships with
        (``fedcart-device init --bundle``), so a device can take part in the statistics
        rounds, which need its catalog but no newer model, before any download."""
        pinned = self.store.get("vocabulary_sha256")
        bundle = verify_members(members, self.server_key, lookup=self.store.blob,
                                origin=origin, vocabulary_sha256=pinned,
                                min_model_version=self.model_version + 1)
        self.store.install_bundle(bundle.members(), known=bundle.manifest.files)
        _remember(self.server_key, bundle)
        if pinned is None:
            self.store.put("vocabulary_sha256", bundle.manifest.vocabulary_sha256)
        self.manifest, self._recommender = bundle.manifest, None
        return bundle

    # -- local training and statistics -----------------------------------------------------
    def _installed(self) -> Bundle:
        bundle = self.current_bundle()
        if bundle is None:
            raise RuntimeError("no model installed: nothing to train")
        return bundle

    def _catalog_baskets(self, bundle: Bundle,
                         history: list[list[str]] | None) -> list[np.ndarray]:
        """The stored baskets (or ``history``) as catalog ids, oldest first, empty ones and
        items outside the catalog left out."""
        index = {item: i for i, item in enumerate(bundle.items)}
        history = self.store.baskets() if history is None else history
        baskets = [np.array(sorted(index[i] for i in b if i in index), dtype=np.int64)
                   for b in history]
        return [b for b in baskets if len(b)]

    def local_update(self, epochs: int, learning_rates: Sequence[float], batch_size: int,
                     history: list[list[str]] | None = None, seed: int | None = None,
                     examples: int | None = None) -> tuple[np.ndarray, int]:
        """(delta = local weights - global weights, examples per epoch) after ``epochs`` of
        SGD through train_step.ort on leave-one-out examples of this device's newest basket,
        at most ``examples`` of them an epoch (features.py says why). ``history`` (the stored
        baskets by default) lets a worker thread train without touching the database."""
        bundle = self._installed()
        m = bundle.manifest
        example_set = ExampleSet([self._catalog_baskets(bundle, history)], m.n_items,
                                 m.history_decay, newest=1)
        start = bundle.weights()
        if len(example_set) == 0:
            return np.zeros(start.flat().size, np.float64), 0
        step = TrainStep(bundle.files["train_step.ort"], bundle.neighbours())
        rng = np.random.default_rng(seed)
        weights = start
        for _ in range(epochs):
            for batch in example_set.batches(batch_size, rng, per_user=examples):
                _, weights = step(weights, batch, learning_rates)
        used = len(example_set) if examples is None else min(examples, len(example_set))
        return weights.flat().astype(np.float64) - start.flat(), used

    def accept_terms(self, data: bytes, participants: int = 1,
                     vector_len: int | None = None) -> RoundTerms:
        """A round's signed terms, decoded and checked against this device's policy and
        installed model, and against the signed config they came in (its ``participants``
        and ``vector_len``); raises TermsError for terms it will not follow."""
        if self.manifest is None:
            raise TermsError("no model installed")
        terms = RoundTerms.from_bytes(data)
        self.policy.check(terms, self.manifest)
        try:
            fmt = UpdateFormat.of(terms)
        except ValueError as exc:
            raise TermsError(f"the terms name no valid format: {exc}") from None
        if terms.group_size < participants:
            raise TermsError(f"the terms encode for groups of {terms.group_size}, the round "
                             f"has {participants} participants: sums could overflow")
        if vector_len is not None and vector_len != fmt.vector_len:
            raise TermsError(f"the round aggregates {vector_len} words, the terms "
                             f"{fmt.vector_len}")
        return terms

    def round_input(self, terms: RoundTerms, history: list[list[str]] | None = None,
                    ) -> tuple[np.ndarray, int]:
        """The encoded vector this device masks in a round on ``terms`` (already accepted),
        and its example count: for a training round its clipped, weighted update of the
        trained groups; for a statistics round its clipped statistic
        (fedcart/model_export/statistics.py)."""
        bundle = self._installed()
        m = bundle.manifest
        fmt = UpdateFormat.of(terms)
        if terms.task is not Task.TRAIN:
            head = np.asarray(terms.head, np.int64) if terms.head else None
            baskets = self._catalog_baskets(bundle, history)
            part = contribution(terms.task, baskets, m.n_items, terms.clip_norm, terms.norm,
                                head)
            return fmt.encode(part.dense()), int(bool(baskets))
        plan = terms.training
        assert plan is not None
        groups = trained_groups(plan.groups)
        rates = [rate if name in groups else 0.0
                 for name, rate in zip(TENSOR_NAMES, plan.learning_rates, strict=True)]
        delta, examples = self.local_update(plan.epochs, rates, plan.batch_size, history,
                                            examples=plan.examples)
        return fmt.encode(pick(delta, groups, m.n_items, m.dim), examples), examples

    # -- federated rounds ----------------------------------------------------------------
    async def participate(self, url: str, rounds: int | None = 1, token: str | None = None,
                          ssl_context: ssl.SSLContext | None = None,
                          timeout: float | None = 600.0, follow_model: bool = True,
                          leave: Callable[[int], int | None] | None = None,
                          input_gate: asyncio.Semaphore | None = None,
                          ) -> list[RoundReport]:
        """Connect, check in, and take part in ``rounds`` rounds (None: until the server
        closes). Returns what happened in each round this device was sampled for.

        ``follow_model``: receive every new model version while connected (an app that
        recommends); otherwise the server sends the model only when the device is sampled
        for a round and is behind. ``leave(round_id)``: how many protocol messages to send in
        that round before vanishing (None: stay), to simulate a device going offline.
        ``input_gate``: held from computing a round's input until its masked form is sent,
        so that devices sharing one host (a simulation's worker) hold a bounded number of
        inputs at once; a phone holds only its own.

        ``timeout``: seconds the whole call lasts at most. A session that is still waiting
        for its rounds then ends with the rounds done so far, and a warning that says it was
        connected all along (the aggregator offered no round: it waits for more devices,
        say); failing to connect raises OSError or TimeoutError. An aggregator that is full
        sends the device away (``ComeBack``): it closes, waits the time it was told within
        the window given, and checks in again, as long as the timeout allows.

        ``ssl_context``: for a ``wss://`` URL, the system's CAs when not given."""
        if ssl_context is None and url.startswith("wss://"):
            ssl_context = ssl.create_default_context()
        reports: list[RoundReport] = []
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            async with connect(url, max_size=MAX_DOWNLOAD, ssl=ssl_context, open_timeout=30,
                               compression=None) as ws:  # masked vectors do not compress
                session = _Session(self, ws, rounds, reports, follow_model, leave, input_gate)
                try:
                    await asyncio.wait_for(session.run(token), left)
                except TimeoutError:
                    if left is None:  # not the session's own timeout
                        raise
                    log.warning("%s", _no_round_offered(url, timeout or 0.0, len(reports)))
                    return reports
            if session.come_back is None:
                return reports
            wait = session.come_back.after + _JITTER.uniform(0, session.come_back.window)
            if deadline is not None and loop.time() + wait > deadline:
                log.warning("the aggregator at %s is full and asked this device to come back "
                            "in %.0f s, after this call's timeout", url, wait)
                return reports
            log.info("the aggregator is full: checking in again in %.0f s", wait)
            await asyncio.sleep(wait)


def _no_round_offered(url: str, seconds: float, rounds_ended: int) -> str:
    """Why a session that stayed connected until its timeout ended early: not that the
    aggregator was out of reach, but that it offered no (further) round."""
    offered = "no round was offered" if rounds_ended == 0 else \
        f"{rounds_ended} round(s) ended, then no further round was offered"
    return (f"connected to {url} for {seconds:g} s, {offered}: the aggregator waits for more "
            "devices to check in, or did not sample this one (see its log)")


class _Session:
    """One connection's state: check-in, then rounds."""

    def __init__(self, device: Device, ws: ClientConnection,
                 rounds: int | None, reports: list[RoundReport], follow_model: bool,
                 leave: Callable[[int], int | None] | None,
                 input_gate: asyncio.Semaphore | None) -> None:
        self.device, self.ws, self.rounds_wanted, self.reports = device, ws, rounds, reports
        self.follow_model, self.leave = follow_model, leave
        self.input_gate = input_gate
        self.input_done = asyncio.Event()  # the round's masked input is out, or it is over
        self.input_task: asyncio.Task[None] | None = None
        self.round: ClientRound | None = None
        self.round_id = self.examples = 0
        self.terms: RoundTerms | None = None  # the current round's, once accepted
        self.saved_round = 0  # the last round id this session wrote to the store
        self.come_back: ComeBack | None = None  # the server sent this device away
        self.bytes_up = self.bytes_down = 0
        self.messages_left: int | None = None
        # the round's cryptography (signatures, key agreements, shares, masks) runs in a
        # worker thread, so that this connection's keepalive pings are answered meanwhile;
        # the lock keeps one thread at a time on the round (ClientRound is not thread-safe)
        self.round_lock = asyncio.Lock()

    async def in_round(self, step: Callable[..., object], *args: object) -> None:
        """Run one step of the round (``receive``, ``set_input``) off the event loop."""
        async with self.round_lock:
            await asyncio.to_thread(step, *args)

    async def send(self, frame: bytes) -> None:
        """Send one message; a large one (a masked input) as websocket fragments of at most
        FRAGMENT bytes: the server's frame parser keeps the last frame it parsed until the
        connection's next one arrives, so a whole-vector frame would stay pinned on every
        connection for a phase (server memory O(n d)); a fragment bounds that to O(n)."""
        self.bytes_up += len(frame)
        if len(frame) <= FRAGMENT:
            await self.ws.send(frame)
        else:
            view = memoryview(frame)
            await self.ws.send([view[i:i + FRAGMENT] for i in range(0, len(frame), FRAGMENT)])

    async def run(self, token: str | None) -> None:
        try:
            async for frame in self.ws:
                assert isinstance(frame, bytes)
                self.bytes_down += len(frame)
                kind, payload = channel.parse(frame)
                if kind == channel.CONTROL:
                    if await self.on_control(payload, token):  # type: ignore[arg-type]
                        return
                elif kind == channel.SECAGG:
                    await self.on_secagg(payload)  # type: ignore[arg-type]
                else:
                    self.on_bundle(payload)  # type: ignore[arg-type]
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.round is not None:
                self.finish("interrupted")
            if self.input_task is not None:
                self.input_task.cancel()

    async def on_control(self, msg: ControlMessage, token: str | None) -> bool:
        """Handle one control message; True when the session is over."""
        match msg:
            case Challenge(nonce=nonce):
                await self.send(Hello(
                    self.device.identity.public,
                    self.device.identity.sign(checkin_statement(nonce, self.device.server_key)),
                    self.device.model_version, frozenset(self.device.held_files()),
                    self.follow_model, int(self.device.store.get("last_round") or 0),
                    token or None).to_frame())
            case Welcome():
                pass
            case RoundNotice():
                await self.start_round(msg)
            case Refusal(reason=reason):
                log.warning("server refused: %s", reason)
                return True
            case ComeBack():
                self.come_back = msg
                return True
            case RoundOver():
                # a round_over for an earlier round (this device's late message drew it)
                # must not end the round it is in now
                if self.round is not None and msg.round_id == self.round_id:
                    self.finish(msg.outcome.value)
                if self.rounds_wanted is None or len(self.reports) < self.rounds_wanted:
                    return False
                return not self.follow_model or self.device.model_version >= msg.model_version
            case _:
                raise MalformedMessage(f"a server does not send {msg.TYPE}")
        return False

    async def start_round(self, msg: RoundNotice) -> None:
        """A round notice names the round and this device's id in it; the round's terms
        come signed, in its config (``check_terms``), and the input is computed once they
        are accepted."""
        self.round_id, self.examples, self.terms = msg.round_id, 0, None
        last = int(self.device.store.get("last_round") or 0)
        self.round = ClientRound(msg.client_id, self.device.identity,
                                 self.device.server_key, last_round_id=last,
                                 policy=self.device.policy.secagg,
                                 check_terms=self.check_terms)
        self.messages_left = None if self.leave is None else self.leave(self.round_id)
        self.input_done = asyncio.Event()
        self.input_task = None
        if self.messages_left == 0:
            await self.vanish()

    def check_terms(self, config: RoundConfig) -> None:
        """ClientRound's hook, run when the signed config arrives: keep the terms if this
        device accepts them (TermsError, a ValueError, refuses the round)."""
        self.terms = self.device.accept_terms(config.terms, len(config.participants),
                                              config.vector_len)

    async def provide_input(self, current: ClientRound, terms: RoundTerms) -> None:
        """Compute the round's input (local training, or a statistic) and give it to the
        round; holds ``input_gate`` from before computing until the masked input is sent."""
        done = self.input_done
        async with self.input_gate or contextlib.nullcontext():
            try:
                vector, examples = await asyncio.to_thread(self.device.round_input, terms,
                                                           self.device.store.baskets())
            except ValueError as exc:
                if self.round is current:
                    await self.refuse(f"cannot compute the round's input: {exc}")
                return
            if self.round is not current:  # the round ended while this device computed
                return
            self.examples = examples
            try:
                await self.in_round(current.set_input, vector)
            except LocalProtocolError as exc:
                if self.round is current:  # not ended meanwhile: the input does not fit
                    await self.refuse(f"cannot give the round its input: {exc}")
                return
            await self.flush()
            await done.wait()

    async def on_secagg(self, data: bytes | memoryview) -> None:
        current = self.round
        if current is None:
            return
        try:
            await self.in_round(current.receive, data)
        except (RemoteProtocolError, RoundFailed) as exc:
            if self.round is current:
                await self.refuse(str(exc))
            return
        if self.round is not current:  # it ended (refused, say) while the step ran
            return
        if current.config is not None:
            if self.saved_round != current.config.round_id:
                # on disk before this device answers the config, so that a replay of it is
                # refused after a restart too; once a round, in a thread: a write syncs
                self.saved_round = current.config.round_id
                await asyncio.to_thread(self.device.store.put, "last_round",
                                        str(current.config.round_id))
            if self.input_task is None and self.terms is not None:
                # computed beside the session, which goes on answering the protocol
                self.input_task = asyncio.create_task(self.provide_input(current, self.terms))
        await self.flush()

    async def refuse(self, reason: str) -> None:
        """Leave the round, saying why (the server drops this device at once)."""
        log.warning("left round %s: %s", self.round_id, reason)
        self.finish(f"refused: {reason}")
        await self.send(Leave(reason[:200]).to_frame())

    async def flush(self) -> None:
        async with self.round_lock:
            current = self.round
            if current is None:  # the round ended while a step ran
                return
            masked = current.masked_sent
            queued = current.data_to_send()
        for data in queued:
            await self.send(bytes([channel.SECAGG]) + data)
            if self.messages_left is not None:
                self.messages_left -= 1
                if self.messages_left <= 0:
                    await self.vanish()
                    return
        if masked:
            self.input_done.set()

    async def vanish(self) -> None:
        """Go offline mid-round, as a phone does: the connection just closes."""
        self.finish("left")
        await self.ws.close(1001, "going offline")

    def on_bundle(self, data: bytes) -> None:
        try:
            self.device.install(data)
        except BundleError as exc:
            log.warning("refused a bundle: %s", exc)

    def finish(self, status: str) -> None:
        self.reports.append(RoundReport(self.round_id, status, self.examples,
                                        self.bytes_up, self.bytes_down))
        self.input_done.set()
        self.round = None
        self.bytes_up = self.bytes_down = 0
