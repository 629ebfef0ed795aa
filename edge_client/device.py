"""A device: its identity, purchase history and model, offline recommendations, and rounds
of federated training over a websocket.

The websocket code only moves bytes: control frames are handled here, secagg frames go to the
sans-I/O ``ClientRound``, and what it queues is sent back. What leaves the device: its public
key and check-in signature, protocol messages, and one masked vector per round.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import websockets
from websockets.asyncio.client import connect

from edge_client.recommender import OfflineRecommender, Recommendation
from edge_client.store import DeviceStore
from model_export.bundle import Bundle, BundleError, read_bundle
from model_export.features import ExampleSet
from model_export.runtime import TrainStep
from model_export.update import UpdateFormat
from secagg import channel
from secagg.channel import checkin_statement
from secagg.client import ClientRound
from secagg.crypto import IdentityKey
from secagg.errors import RemoteProtocolError, RoundFailed

__all__ = ["Device", "RoundReport"]

log = logging.getLogger("fedcart.device")
MAX_DOWNLOAD = 512 << 20  # largest frame a device accepts (a bundle)
FRAGMENT = 64 << 10


@dataclass(frozen=True)
class RoundReport:
    round_id: int
    status: str  # "sent" (masked input delivered), or why it was not
    examples: int
    bytes_up: int
    bytes_down: int


class Device:
    """One shopper's device. ``server_key`` is the aggregator's pinned Ed25519 key: it
    signs bundles and round configs."""

    def __init__(self, state_dir: Path | str, server_key: bytes) -> None:
        self.store = DeviceStore(Path(state_dir))
        self.server_key = server_key
        seed = self.store.get("identity_seed")
        if seed is None:
            seed = os.urandom(32).hex()
            self.store.put("identity_seed", seed)
        self.identity = IdentityKey(bytes.fromhex(seed))
        self.bundle: Bundle | None = None
        self._recommender: OfflineRecommender | None = None
        current = self.store.current_bundle()
        if current is not None:
            self._use(read_bundle(current, server_key))

    # -- offline use ---------------------------------------------------------------------
    @property
    def model_version(self) -> int:
        return -1 if self.bundle is None else self.bundle.manifest.model_version

    def add_basket(self, items: Sequence[str]) -> None:
        self.store.add_basket(list(items))

    def recommend(self, cart: Sequence[str], k: int = 10) -> list[Recommendation]:
        """Top-k for ``cart``, blended with this device's own purchase history (offline)."""
        if self._recommender is None:
            raise RuntimeError("no model installed yet: take part in a round first")
        known = [[i for i in b if i in self._recommender.index] for b in self.store.baskets()]
        return self._recommender.recommend(cart, k, [b for b in known if b])

    def install(self, data: bytes) -> Bundle:
        """Verify bundle bytes (signature, hashes, vocabulary, no downgrade) and swap them in;
        on any failure the current bundle keeps serving."""
        tmp = self.store.dir / ".incoming.zip"
        tmp.write_bytes(data)
        try:
            pinned = self.store.get("vocabulary_sha256")
            bundle = read_bundle(tmp, self.server_key, vocabulary_sha256=pinned,
                                 min_model_version=self.model_version + 1)
        finally:
            tmp.unlink(missing_ok=True)
        digest = hashlib.sha256(data).hexdigest()
        self.store.install_bundle(data, bundle.manifest.model_version, digest)
        if pinned is None:
            self.store.put("vocabulary_sha256", bundle.manifest.vocabulary_sha256)
        self._use(bundle)
        return bundle

    def _use(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._recommender = OfflineRecommender(bundle)
        self._train_step: TrainStep | None = None

    # -- local training ------------------------------------------------------------------
    def local_update(self, epochs: int, learning_rates: Sequence[float], batch_size: int,
                     history: list[list[str]] | None = None,
                     seed: int | None = None) -> tuple[np.ndarray, int]:
        """(delta = local weights - global weights, number of examples) after ``epochs`` of
        SGD on this device's own baskets through train_step.ort. ``history`` (the stored
        baskets by default) lets a worker thread train without touching the database."""
        assert self.bundle is not None and self._recommender is not None
        index = self._recommender.index
        history = self.store.baskets() if history is None else history
        baskets = [np.array(sorted(index[i] for i in b if i in index), dtype=np.int64)
                   for b in history]
        baskets = [b for b in baskets if len(b)]
        m = self.bundle.manifest
        examples = ExampleSet([baskets], m.n_items, m.history_decay)
        start = self.bundle.weights()
        if len(examples) == 0:
            return np.zeros(start.flat().size, np.float64), 0
        if self._train_step is None:
            self._train_step = TrainStep(self.bundle.files["train_step.ort"])
        rng = np.random.default_rng(seed)
        weights = start
        for _ in range(epochs):
            for batch in examples.batches(batch_size, rng):
                _, weights = self._train_step(weights, batch, learning_rates)
        return weights.flat().astype(np.float64) - start.flat(), len(examples)

    # -- federated rounds ----------------------------------------------------------------
    async def participate(self, url: str, rounds: int = 1, token: str | None = None,
                          ssl_context: ssl.SSLContext | None = None,
                          timeout: float = 600.0) -> list[RoundReport]:
        """Connect, check in, and take part in ``rounds`` rounds (or until the server
        closes). Returns what happened in each round this device was sampled for."""
        reports: list[RoundReport] = []
        async with connect(url, max_size=MAX_DOWNLOAD, ssl=ssl_context, open_timeout=30,
                           compression=None) as ws:  # masked vectors do not compress
            session = _Session(self, ws, rounds, reports)
            await asyncio.wait_for(session.run(token), timeout)
        return reports


class _Session:
    """One connection's state: check-in, then rounds."""

    def __init__(self, device: Device, ws: websockets.asyncio.client.ClientConnection,
                 rounds: int, reports: list[RoundReport]) -> None:
        self.device, self.ws, self.rounds_wanted, self.reports = device, ws, rounds, reports
        self.round: ClientRound | None = None
        self.round_info: dict = {}
        self.bytes_up = self.bytes_down = 0

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
                    if await self.on_control(payload, token):
                        return
                elif kind == channel.SECAGG:
                    await self.on_secagg(payload)
                else:
                    self.on_bundle(payload)
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.round is not None:
                self.finish("interrupted")

    async def on_control(self, msg: dict, token: str | None) -> bool:
        """Handle one control message; True when the session is over."""
        kind = msg["type"]
        if kind == "challenge":
            nonce = bytes.fromhex(msg["nonce"])
            hello = {"public_key": self.device.identity.public.hex(),
                     "signature": self.device.identity.sign(
                         checkin_statement(nonce, self.device.server_key)).hex(),
                     "model_version": self.device.model_version,
                     "last_round": int(self.device.store.get("last_round") or 0)}
            if token:
                hello["token"] = token
            await self.send(channel.control("hello", **hello))
        elif kind == "round":
            await self.start_round(msg)
        elif kind == "error":
            log.warning("server refused: %s", msg.get("reason"))
            return True
        elif kind == "round_over":
            if self.round is not None:
                self.finish(msg.get("status", "over"))
            return len(self.reports) >= self.rounds_wanted and self.device.model_version >= \
                int(msg.get("model_version", -1))
        return False

    async def start_round(self, msg: dict) -> None:
        if self.device.bundle is None or msg["model_version"] != self.device.model_version:
            log.warning("round %s is for model %s, this device has %s", msg.get("round_id"),
                        msg.get("model_version"), self.device.model_version)
            return
        last = int(self.device.store.get("last_round") or 0)
        self.round = ClientRound(msg["client_id"], self.device.identity, self.device.server_key,
                                 last_round_id=last)
        self.round_info = msg
        self.bytes_up = self.bytes_down = 0
        training = msg["training"]
        delta, examples = await asyncio.to_thread(
            self.device.local_update, training["epochs"], training["learning_rates"],
            training["batch_size"], self.device.store.baskets())
        fmt = UpdateFormat(n_params=delta.size, clip_norm=msg["clip_norm"],
                           cohort_size=msg["cohort"], weight_cap=msg["weight_cap"],
                           norm=msg["norm"])
        self.round_info["examples"] = examples
        if self.round is not None:  # the round may have ended while training
            self.round.set_input(fmt.encode(delta, examples))
            await self.flush()

    async def on_secagg(self, data: bytes) -> None:
        if self.round is None:
            return
        try:
            self.round.receive(data)
        except (RemoteProtocolError, RoundFailed) as exc:
            log.warning("left round %s: %s", self.round_info.get("round_id"), exc)
            self.finish(f"refused: {exc}")
            return
        if self.round.config is not None:
            self.device.store.put("last_round", str(self.round.config.round_id))
        await self.flush()

    async def flush(self) -> None:
        assert self.round is not None
        for data in self.round.data_to_send():
            await self.send(bytes([channel.SECAGG]) + data)

    def on_bundle(self, data: bytes) -> None:
        try:
            self.device.install(data)
        except BundleError as exc:
            log.warning("refused a bundle: %s", exc)

    def finish(self, status: str) -> None:
        self.reports.append(RoundReport(int(self.round_info.get("round_id", 0)), status,
                                        int(self.round_info.get("examples", 0)),
                                        self.bytes_up, self.bytes_down))
        self.round = None
