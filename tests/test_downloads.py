"""Devices that share a host (a simulation's worker) receive bundles a few at a time: a
device waiting for its worker's download gate leaves the rest of a bundle in the network
and the server (the server sends it in fragments; the connection's flow control holds
them back), not in the worker's memory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from fedcart.aggregator.config import load_config
from fedcart.aggregator.service import Aggregator, _Connection
from fedcart.aggregator.statedir import init_state
from fedcart.edge_client.device import Device
from fedcart.edge_client.session import SessionHooks, participate
from fedcart.protocol import channel
from fedcart.protocol.transport import fragments
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


class _SlowReader:
    """A server connection to a device that takes ``READ`` seconds to read a bundle (the
    send completes then, by flow control, and its pong comes): the bundles sent to it, by
    length."""

    READ = 0.2

    def __init__(self) -> None:
        self.sent: list[int] = []

    async def send(self, message) -> None:
        self.sent.append(sum(len(fragment) for fragment in message))
        await asyncio.sleep(self.READ)

    async def ping(self) -> asyncio.Future:
        pong = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self.READ, pong.set_result, None)
        return pong


def test_a_device_is_sent_a_version_once_while_it_reads_it(tmp_path: Path) -> None:
    """The check-in sends a device the serving model and a round's notice the latest: when
    both are the same version and the first is still on its way, the second finds the
    device behind too. It used to send the bundle again (seen as devices refusing a
    version 0 after version 1); now it waits for the first and sends nothing."""
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
