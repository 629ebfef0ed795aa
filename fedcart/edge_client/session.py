"""A device's rounds of federated training over a websocket: connect, check in, take part in
rounds, and check in again later when a full aggregator sends the device away.

The websocket code only moves bytes: control frames are handled here, secagg frames go to the
sans-I/O ``ClientRound``, and what it queues is sent back. What leaves the device: its public
key and check-in signature, protocol messages, and one masked vector per round. The device
(identity, store, model, terms, round input) is ``Device``'s; this module owns only the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import websockets
from websockets.asyncio.client import ClientConnection, connect

from fedcart.model_export.bundle import BundleError
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
from fedcart.protocol.terms import RoundTerms
from fedcart.protocol.transport import PING_INTERVAL, PING_TIMEOUT, QUEUED_FRAGMENTS, fragments
from fedcart.secagg.client import ClientRound
from fedcart.secagg.errors import (
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    RoundFailed,
)
from fedcart.secagg.messages import RoundConfig

if TYPE_CHECKING:
    from fedcart.edge_client.device import Device

__all__ = ["RoundReport", "Session", "SessionHooks", "participate"]

log = logging.getLogger("fedcart.device")
MAX_DOWNLOAD = 512 << 20  # largest frame a device accepts (a bundle)
_JITTER = secrets.SystemRandom()  # when in its window a device sent away comes back


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round a device was sampled for, and the bytes its connection
    moved in it."""

    round_id: int
    status: str  # "sent" (masked input delivered), or why it was not
    examples: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class SessionHooks:
    """What a simulation changes in a device's sessions; a phone uses the defaults, and
    ``Device.participate`` passes nothing else (fedcart/simulation/devices.py passes these to
    :func:`participate`).

    ``leave(round_id)``: how many protocol messages to send in that round before vanishing
    (None: stay), to simulate a device going offline. ``input_gate``: held from computing a
    round's input until its masked form is sent, and ``download_gate`` from a bundle's
    first fragment until it is installed, so that devices sharing one host (a simulation's
    worker) hold a bounded number of inputs and of bundles at once; a phone holds only its
    own."""

    leave: Callable[[int], int | None] | None = None
    input_gate: asyncio.Semaphore | None = None
    download_gate: asyncio.Semaphore | None = None


NO_HOOKS = SessionHooks()  # a phone's sessions


async def participate(device: Device, url: str, rounds: int | None = 1,
                      token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                      timeout: float | None = 600.0, follow_model: bool = True,
                      hooks: SessionHooks = NO_HOOKS) -> list[RoundReport]:
    """``Device.participate`` (which documents the arguments), with a simulation's
    ``hooks``: connect, and check in again as often as a full aggregator sends the device
    away (``ComeBack``) and the timeout allows."""
    if ssl_context is None and url.startswith("wss://"):
        ssl_context = ssl.create_default_context()
    reports: list[RoundReport] = []
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = None if deadline is None else max(deadline - loop.time(), 0.0)
        async with connect(url, max_size=MAX_DOWNLOAD, ssl=ssl_context, open_timeout=30,
                           compression=None,  # masked vectors do not compress
                           max_queue=QUEUED_FRAGMENTS,
                           ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT) as ws:
            session = Session(device, ws, rounds, reports, follow_model, hooks)
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


async def _assembled(first: bytes, rest: AsyncIterator[bytes]) -> bytearray:
    """A message from its first fragment and the others, gathered in one buffer, not an
    object a fragment (a hostile server's tiny fragments would cost a list entry each). Its
    size is bounded by the connection's ``max_size``, which websockets checks as the
    fragments arrive."""
    buffer = bytearray(first)
    async for fragment in rest:
        buffer += fragment
    return buffer


def _no_round_offered(url: str, seconds: float, rounds_ended: int) -> str:
    """Why a session that stayed connected until its timeout ended early: not that the
    aggregator was out of reach, but that it offered no (further) round."""
    offered = "no round was offered" if rounds_ended == 0 else \
        f"{rounds_ended} round(s) ended, then no further round was offered"
    return (f"connected to {url} for {seconds:g} s, {offered}: the aggregator waits for more "
            "devices to check in, or did not sample this one (see its log)")


class Session:
    """One connection's state: check-in, then rounds, each appending its RoundReport to
    ``reports``."""

    def __init__(self, device: Device, ws: ClientConnection,
                 rounds: int | None, reports: list[RoundReport], follow_model: bool,
                 hooks: SessionHooks) -> None:
        self.device, self.ws, self.rounds_wanted, self.reports = device, ws, rounds, reports
        self.follow_model, self.hooks = follow_model, hooks
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
        """Send one message, a large one (a masked input) in fragments: the server's frame
        parser keeps the last frame it parsed until the connection's next one arrives, so a
        whole-vector frame would stay pinned on every connection for a phase (server memory
        O(n d)); a fragment bounds that to O(n)."""
        self.bytes_up += len(frame)
        await self.ws.send(fragments(frame))

    async def run(self, token: str | None) -> None:
        """Handle the connection's messages until it closes or the session is over; a round
        still open then is reported interrupted. A bundle holds the hooks' ``download_gate``
        from its first fragment until it is installed: until then its other fragments stay
        in the network and the server, held back by the connection's flow control."""
        try:
            while True:
                # a text frame comes as bytes too: channel.parse refuses it
                stream = self.ws.recv_streaming(decode=False)
                first = await anext(stream)
                bundle = first[:1] == bytes([channel.BUNDLE])
                gate = self.hooks.download_gate if bundle else None
                async with gate or contextlib.nullcontext():
                    frame = await _assembled(first, stream)
                    self.bytes_down += len(frame)
                    kind, payload = channel.parse(frame)
                    del frame  # a bundle's payload is a copy: keep one of them
                    if kind == channel.CONTROL:
                        if await self.on_control(payload, token):  # type: ignore[arg-type]
                            return
                    elif kind == channel.SECAGG:
                        await self.on_secagg(payload)  # type: ignore[arg-type]
                    else:
                        await self.on_bundle(payload)  # type: ignore[arg-type]
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
        leave = self.hooks.leave
        self.messages_left = None if leave is None else leave(self.round_id)
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
        round; holds the hooks' ``input_gate`` from before computing until the masked input
        is sent."""
        done = self.input_done
        async with self.hooks.input_gate or contextlib.nullcontext():
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
        """Give one secagg frame to the round, save its id once its config is in, start
        computing the input once its terms are accepted, and send what the round queued."""
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
        """Send what the round queued, vanishing when the hooks' ``leave`` count runs out;
        once the masked input is out, release ``provide_input``."""
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

    async def on_bundle(self, data: bytes) -> None:
        """Install a model the server sent; a bundle that does not verify is refused and the
        current one keeps serving. Verifying and storing it takes a worker thread, not the
        event loop: the connection's keepalives, and in a simulation's worker the other
        devices' sessions, go on meanwhile. The next frame waits for it (a round's terms
        are checked against the installed model)."""
        try:
            await asyncio.to_thread(self.device.install, data)
        except BundleError as exc:
            log.warning("refused a bundle: %s", exc)

    def finish(self, status: str) -> None:
        """End the current round with ``status``: report it with the bytes moved in it."""
        self.reports.append(RoundReport(self.round_id, status, self.examples,
                                        self.bytes_up, self.bytes_down))
        self.input_done.set()
        self.round = None
        self.bytes_up = self.bytes_down = 0
