"""Hostile clients against a live aggregator on loopback: each is dropped (or never let in),
the round completes for the honest devices, nothing from the attacker is persisted, and the
service keeps answering its health check.

Attackers that need a valid session (enrolled, checked in, in the round) are honest devices
whose outgoing frames one rule rewrites: a message for another round, a message replayed
in the wrong phase, a masked vector of the wrong length, a truncated message."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.sockets import SocketLimit
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import Store
from fedcart.edge_client.device import Device
from fedcart.edge_client.session import Session
from fedcart.protocol import channel
from fedcart.protocol.channel import checkin_statement
from fedcart.protocol.control import Hello, Refusal
from fedcart.protocol.transport import PING_TIMEOUT
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.messages import _HEADER, MaskedInput, decode
from tests.conftest import SMALL_COHORTS
from tests.test_service import cli, config_for_all, make_world
from tests.wire import challenge, check_in, hello

pytestmark = pytest.mark.reliability


def rewrite_frames(monkeypatch, rules: dict[bytes, Callable[[bytes], list[bytes]]]) -> None:
    """Route the secagg frames of the devices named (by public key) through a rule that
    returns the frames to send instead."""
    original = Session.send

    async def send(self, frame: bytes) -> None:
        rule = rules.get(self.device.identity.public)
        if rule is None or frame[0] != channel.SECAGG:
            await original(self, frame)
            return
        for out in rule(frame):
            await original(self, out)

    monkeypatch.setattr(Session, "send", send)


def other_round(frame: bytes) -> list[bytes]:
    magic, version, kind, flags, round_id, sender, length = _HEADER.unpack_from(frame, 1)
    return [frame[:1] + _HEADER.pack(magic, version, kind, flags, round_id + 7, sender, length)
            + frame[1 + _HEADER.size:]]


def replayed(frame: bytes) -> list[bytes]:
    return [frame, frame]  # the second copy arrives in the next phase


def short_vector(frame: bytes) -> list[bytes]:
    message = decode(frame[1:])
    if isinstance(message, MaskedInput):
        message = MaskedInput(message.round_id, message.sender, message.vector[:-1])
    return [frame[:1] + message.encode()]


def truncated(frame: bytes) -> list[bytes]:
    return [frame[: len(frame) // 2]]


@pytest.mark.parametrize("rule", [other_round, replayed, short_vector, truncated])
def test_a_misbehaving_member_of_the_round_is_dropped_and_the_round_completes(
        tmp_path: Path, monkeypatch, rule: Callable[[bytes], list[bytes]]) -> None:
    state, devices = make_world(tmp_path, n_users=8)
    state.config.write_text(config_for_all(len(devices), statistics='false', timeout=10.0,
                                           rounds=1))
    attacker = devices[0]
    rewrite_frames(monkeypatch, {attacker.identity.public: rule})
    server = AggregatorProcess(state.root)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=60)
                                      for d in devices), return_exceptions=True)

    asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    (round_row,) = status["rounds"]
    assert round_row["status"] == "completed", server.log()
    assert round_row["survivors"] == len(devices) - 1
    attacker_id = Store(state.database).client_of(attacker.identity.public)
    assert str(attacker_id) in round_row["detail"]["dropped"]
    assert "misbehaved and was disconnected" in server.log()
    # nothing of the attacker's was kept: its input was never summed
    assert round_row["detail"]["phase_seconds"]["ADVERTISE"] < 10  # not held to a deadline


async def _checkin_frames(url: str, key: IdentityKey, server_key: bytes,
                          tamper: Callable[[bytes], Hello]) -> str:
    async with connect(url) as ws:
        nonce = (await challenge(ws)).nonce
        await ws.send(tamper(nonce).to_frame())
        _, reply = channel.parse(await ws.recv())
        return reply.reason if isinstance(reply, Refusal) else reply.TYPE


def test_strangers_replays_floods_and_slow_clients_do_not_get_in_or_stop_rounds(
        tmp_path: Path) -> None:
    state, devices = make_world(tmp_path, n_users=6)
    state.config.write_text(config_for_all(len(devices), statistics='false', timeout=10.0,
                                           rounds=0))
    server_key = bytes(state.signing_key().verify_key)
    enrolled = devices[0].identity
    stranger = IdentityKey.generate()
    server = AggregatorProcess(state.root)
    host, port = "127.0.0.1", server.port

    def replay(nonce: bytes) -> Hello:  # a signature captured for another nonce
        return hello(enrolled, bytes(32), server_key)

    def unenrolled(nonce: bytes) -> Hello:
        return hello(stranger, nonce, server_key)

    def forged(nonce: bytes) -> Hello:  # an enrolled key, signed by someone else
        return dataclasses.replace(hello(enrolled, nonce, server_key),
                                   signature=stranger.sign(checkin_statement(nonce,
                                                                             server_key)))

    async def oversize() -> str:
        ws = await connect(server.url, max_size=None)
        await ws.recv()
        try:
            await ws.send(b"\x00" * (64 << 20))  # far beyond the server's max_size
            await asyncio.wait_for(ws.recv(), 10)
        except Exception as exc:  # the server closing the connection is the point
            return type(exc).__name__
        finally:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        return "still open"

    def slowloris() -> float:
        """A TCP client that sends its HTTP upgrade one byte a second; the time until the
        server gives up on it."""
        started = time.monotonic()
        with socket.create_connection((host, port), timeout=30) as sock:
            request = b"GET /ws HTTP/1.1\r\nHost: x\r\n"
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    time.sleep(1.0)
                    if time.monotonic() - started > 25:
                        break
                sock.settimeout(5)
                sock.recv(1)
            except OSError:
                pass
        return time.monotonic() - started

    async def everything() -> tuple:
        refusals = [await _checkin_frames(server.url, enrolled, server_key, t)
                    for t in (replay, unenrolled, forged)]
        big = await oversize()
        idle = [await connect(server.url) for _ in range(300)]  # never check in
        slow = asyncio.create_task(asyncio.to_thread(slowloris))
        reports = await asyncio.gather(*(d.participate(server.url, rounds=2, timeout=120)
                                         for d in devices))
        health = server.http("/healthz")
        slow_seconds = await slow
        await asyncio.sleep(1.0)
        lingering = sum(1 for c in idle if c.state.name == "OPEN")
        for c in idle:
            with contextlib.suppress(Exception):
                await c.close()
        return refusals, big, lingering, slow_seconds, reports, health

    refusals, big, lingering, slow_seconds, reports, health = asyncio.run(everything())
    assert server.terminate() == 0, server.log()
    assert "check-in" in refusals[0] and "signature" in refusals[0]
    assert "not enrolled" in refusals[1]
    assert "signature" in refusals[2]
    assert big != "still open"  # the oversize frame closed that connection
    assert slow_seconds < 25  # the slow client was cut off by the handshake timeout
    assert lingering == 0  # connections that never checked in were closed by its timeout
    assert health.startswith("ok")
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    first_two = status["rounds"][:2]
    assert [r["status"] for r in first_two] == ["completed", "completed"]
    assert all(r["survivors"] == len(devices) for r in first_two)
    assert status["enrolled"] == len(devices)  # no stranger was enrolled
    assert all(len(r) == 2 for r in reports)


def test_sockets_beyond_the_limit_are_closed_as_they_are_accepted() -> None:
    """A flood of connections that never start their handshake: the server holds at most
    its limit of them (each an open file), closes the others at once, and once the flood
    has gone serves a websocket again (``aggregator.sockets``, which the service uses with
    its open-file limit less ``pacing.FILES_KEPT``)."""
    limit = SocketLimit(20)
    refused: list[int] = []
    limit.on_refused = lambda: refused.append(1)

    async def echo(ws) -> None:
        await ws.send(await ws.recv())

    async def flood() -> tuple[int, int, bytes]:
        async with serve(echo, "127.0.0.1", 0, open_timeout=60,
                         create_connection=limit.connection_class()) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
            await asyncio.sleep(0.5)
            held = limit.open
            closed = 0
            for sock in socks:  # the ones closed at accept read EOF (or a reset) at once
                sock.settimeout(0.05)
                try:
                    closed += sock.recv(1) == b""
                except TimeoutError:
                    pass  # held: waiting for its handshake
                except ConnectionResetError:
                    closed += 1
                sock.close()
            await asyncio.sleep(0.5)
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                await ws.send(b"after the flood")
                answer = await ws.recv()
            return held, closed, answer  # type: ignore[return-value]

    held, closed, answer = asyncio.run(flood())
    assert held == 20
    assert closed == 80 == len(refused)
    assert answer == b"after the flood"
    assert limit.open == 0  # every socket it counted was released


def test_a_device_that_stops_reading_its_bundle_is_cut_off_and_the_round_goes_on(
        tmp_path: Path) -> None:
    """A sampled device that stops reading its bundle (its socket no longer read) would hold
    one of the server's send slots, and the round's notices behind it, as long as it kept
    its connection alive: it is disconnected at its bundle's deadline, and the round
    completes with the others. The catalog makes a bundle (1.9 MB) larger than what a
    device's connection reads ahead (``transport.read_ahead``)."""
    items = [f"sku{i:05d}" for i in range(20_000)]
    state = init_state(tmp_path / "agg", items, items, dim=8, seed=0)
    rate = 200_000  # bytes a second: a deadline of SEND_GRACE + about 10 s for this bundle
    state.config.write_text(config_for_all(9, statistics='false', timeout=10.0, rounds=1)
                            + f"[server]\nmin_download_rate = {rate}\n")
    server_key = bytes(state.signing_key().verify_key)
    rng = random.Random(0)
    devices = []
    for u in range(8):
        device = Device(tmp_path / f"device{u}", server_key, policy=SMALL_COHORTS)
        for _ in range(3):
            device.add_basket(rng.sample(items, 5))
        devices.append(device)
    staller = IdentityKey.generate()
    store = Store(state.database)
    for public in [d.identity.public for d in devices] + [staller.public]:
        store.enroll(public)
    store.close()
    server = AggregatorProcess(state.root)

    async def everyone() -> None:
        async with connect(server.url, max_size=None) as ws:
            await check_in(ws, staller, server_key, follow_model=False)  # sent one if sampled
            ws.transport.pause_reading()  # reads nothing more: no pong
            await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=120)
                                   for d in devices))

    asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    assert "did not take in a message" in server.log()
    store = Store(state.database)
    (round_row,) = store.rounds()
    store.close()
    assert round_row.status == "completed" and round_row.survivors == len(devices)
    # cut off at its deadline, not after the pong's PING_TIMEOUT (which the round waited for
    # without a deadline)
    assert round_row.finished_at - round_row.started_at < PING_TIMEOUT - 5
