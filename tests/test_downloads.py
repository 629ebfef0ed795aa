"""Devices that share a host (a simulation's worker) receive bundles a few at a time: a
device waiting for its worker's download gate leaves the rest of a bundle in the network
and the server (the server sends it in fragments; the connection's flow control holds
them back), not in the worker's memory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State

from fedcart.aggregator.config import load_config
from fedcart.aggregator.service import Aggregator, _Connection
from fedcart.aggregator.statedir import init_state
from fedcart.edge_client.device import Device
from fedcart.edge_client.session import SessionHooks, participate
from fedcart.protocol import channel
from fedcart.protocol.transport import FRAGMENT, QUEUED_FRAGMENTS, fragments, read_ahead
from fedcart.secagg.crypto import IdentityKey

pytestmark = pytest.mark.reliability

# larger than what loopback's socket buffers and the client's frame queue take in (a few
# MB): the server's send can only complete once the device reads it
BUNDLE = 32 << 20
WAIT = 1.5  # seconds the device is kept waiting for the gate


async def _send_a_bundle_while_the_gate_is(held: bool, device: Device) -> tuple[bool, bool]:
    """Serve one (unverifiable) bundle to ``device`` whose session has a download gate of
    one, held by someone else for WAIT seconds if ``held``. Returns whether the server's send
    had completed by then, and whether it had once the gate was free."""
    sent = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.send(fragments(bytes([channel.BUNDLE]) + os.urandom(BUNDLE)))
        sent.set()  # then the connection closes, and the device's session ends

    gate = asyncio.Semaphore(1)
    if held:
        await gate.acquire()
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        session = asyncio.create_task(participate(
            device, f"ws://127.0.0.1:{port}", rounds=1, timeout=30,
            hooks=SessionHooks(download_gate=gate)))
        await asyncio.sleep(WAIT)
        sent_while_held = sent.is_set()
        if held:
            gate.release()
        assert await asyncio.wait_for(session, 30) == []  # no round was offered
    return sent_while_held, sent.is_set()


def test_a_bundle_waits_in_the_network_while_the_download_gate_is_held(
        tmp_path: Path, caplog) -> None:
    device = Device(tmp_path / "device", IdentityKey.generate().public)
    while_held, after = asyncio.run(_send_a_bundle_while_the_gate_is(True, device))
    assert not while_held, "the device took in the bundle before it could install it"
    assert after
    assert "refused a bundle" in caplog.text  # received whole, then verified (and refused)


def test_without_a_wait_the_same_bundle_is_taken_at_once(tmp_path: Path) -> None:
    device = Device(tmp_path / "device", IdentityKey.generate().public)
    while_held, _ = asyncio.run(_send_a_bundle_while_the_gate_is(False, device))
    assert while_held  # the first test's pending send is the gate's doing, not the network's


def test_a_bundle_read_ahead_is_taken_in_while_the_device_reads_nothing() -> None:
    """The aggregator waits for no pong after a bundle that ``read_ahead`` says a device's
    connection takes in by itself: the largest such, then a round's first two messages,
    and a ping after them is answered while the device's application reads nothing."""
    largest = (QUEUED_FRAGMENTS // 2 - 1) * FRAGMENT
    assert read_ahead(bytes(largest)) and not read_ahead(bytes(largest + 1))

    async def ponged() -> bool:
        answered = asyncio.get_running_loop().create_future()

        async def handler(ws: ServerConnection) -> None:
            await ws.send(fragments(bytes([channel.BUNDLE]) + bytes(largest - 1)))
            for message in (b"round notice", b"secagg"):
                await ws.send(message)
            try:
                await asyncio.wait_for(await ws.ping(), 5)
                answered.set_result(True)
            except TimeoutError:
                answered.set_result(False)

        async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", max_size=None,
                               max_queue=QUEUED_FRAGMENTS):
                return await answered  # the client's application reads nothing

    assert asyncio.run(ponged())


class _SlowReader:
    """A server connection to a device that takes ``READ`` seconds to read a message (the
    send completes then, by flow control): the messages sent to it, by length."""

    READ = 0.2
    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[int] = []

    async def send(self, message) -> None:
        self.sent.append(sum(len(fragment) for fragment in message))
        await asyncio.sleep(self.READ)


def test_a_device_is_sent_a_version_once_while_it_reads_it(tmp_path: Path) -> None:
    """The check-in sends a device the serving model and a round's notice the latest, here
    the same version: the second send waits for the first, then finds the device up to date
    and sends nothing (two sends that both found it behind sent the bundle twice, and
    devices then refused a version 0 that came after version 1)."""
    state = init_state(tmp_path / "agg", ["a", "b", "c"], ["a", "b", "c"], dim=4, seed=0)

    async def two_sends() -> tuple[list[int], int]:
        aggregator = Aggregator(state, load_config(state.config))
        ws = _SlowReader()
        conn = _Connection(1, b"", ws, -1, frozenset(), follow_model=True)  # type: ignore
        await asyncio.gather(aggregator._send_model(conn, aggregator.serving),
                             aggregator._send_model(conn, aggregator.latest))
        aggregator.store.close()
        assert conn.model_version == aggregator.latest.bundle.manifest.model_version
        return ws.sent, len(aggregator.latest.bundle_frame)

    sent, bundle = asyncio.run(two_sends())
    assert sent == [bundle]
