"""Rounds that finish: a slow device is not punished, a failed group costs only its devices,
and a stop is prompt whatever the round is doing. Real `fedcart-aggregator serve` processes
on loopback, driven by unmodified device code (or, for the thousand-device stop, by bare
SecAgg+ clients that never send their masked input)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.store import Store
from fedcart.edge_client.session import Session
from fedcart.model_export.bundle import read_bundle
from fedcart.protocol import channel
from fedcart.protocol.control import Refusal, RoundNotice, Welcome
from fedcart.protocol.statistics import POPULARITY, sum_contributions
from fedcart.secagg.client import ClientRound, ClientState
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.fixedpoint import packed_scale_for
from fedcart.secagg.policy import PERMISSIVE
from tests.test_service import cli, config_for_all, make_world
from tests.wire import check_in

pytestmark = pytest.mark.reliability


def delay_schedule(monkeypatch, rules: dict[tuple[bytes, int], tuple[ClientState, float]]) -> None:
    """Make a device hold a message for some seconds when its round reaches a state (then
    send it after all): a slow phone, not a vanished one."""
    original = Session.flush

    async def flush(self) -> None:
        rule = rules.get((self.device.identity.public, self.round_id))
        if rule is not None and self.round is not None and self.round.state == rule[0]:
            await asyncio.sleep(rule[1])
        await original(self)

    monkeypatch.setattr(Session, "flush", flush)


def test_a_late_device_stays_connected_and_takes_the_next_round(tmp_path: Path,
                                                                monkeypatch) -> None:
    """Device 0 sends its masked input after the MASKED deadline: its group goes on without
    it, its message is counted as late and ignored, it is told the round is over for it,
    keeps its connection and completes round 2. Device 1 sends its unmask answer after the
    UNMASK deadline, when round 2 has begun: ignored too, and it completes round 2."""
    state, devices = make_world(tmp_path, n_users=8)
    state.config.write_text(config_for_all(len(devices), statistics="false", timeout=2.0,
                                           rounds=2))
    slow, slower = devices[0].identity.public, devices[1].identity.public
    unsure = devices[2].identity.public  # signs the survivor set late: still a survivor
    delay_schedule(monkeypatch, {(slow, 1): (ClientState.WAIT_SURVIVORS, 4.0),
                                 (slower, 1): (ClientState.DONE, 3.0),
                                 (unsure, 1): (ClientState.WAIT_UNMASK, 3.0)})
    server = AggregatorProcess(state.root)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=2, timeout=120)
                                      for d in devices))

    reports = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    first, second = status["rounds"]
    assert first["status"] == second["status"] == "completed"
    store = Store(state.database)
    slow_id, slower_id = store.client_of(slow), store.client_of(slower)
    store.close()
    assert first["detail"]["dropped"][str(slow_id)] == "no answer in MASKED"
    assert first["survivors"] == len(devices) - 1 and second["survivors"] == len(devices)
    # neither was disconnected: each took round 2 on the connection it began with
    assert [r.status for r in reports[0]] == ["dropped", "completed"]
    assert [r.status for r in reports[1]] == ["completed", "completed"]
    # a survivor that missed the CONSISTENCY deadline: its input is in the sum, and it is
    # told so, not that it was dropped
    assert [r.status for r in reports[2]] == ["completed", "completed"]
    store = Store(state.database)
    unsure_id = store.client_of(unsure)
    store.close()
    assert str(unsure_id) not in first["detail"]["dropped"]
    assert "misbehaved" not in server.log()
    assert f"late message from device {slow_id} for round 1, ignored" in server.log()
    assert f"late message from device {slower_id} for round 1, ignored" in server.log()


def test_a_failed_group_costs_its_devices_and_the_others_sum_stands(tmp_path: Path,
                                                                    monkeypatch) -> None:
    """Twelve devices in two groups of six: every member of device 0's group vanishes
    before signing the survivor set, so that group fails. The popularity round still
    completes, and its released sum (no DP noise) is the other group's exact sum: within
    the packed encoding's rounding of it, and not of the sum over all twelve."""
    state, devices = make_world(tmp_path, n_users=12)
    state.config.write_text(config_for_all(
        len(devices), statistics="true\nhead_items = 12\nneighbours = 4\n"
                                 "popularity_clip = 2.0", timeout=10.0, rounds=1).replace(
        'mechanism = "gaussian"', 'mechanism = "none"').replace(
        # after round 1 the failed group's devices are gone: later rounds go ahead without
        # them after population_wait, the co-occurrence round with half the population
        "min_clients = 3", "min_clients = 3\ngroup_size = 6\npopulation_wait = 5.0\n"
                           "population_share = 0.5"))
    store = Store(state.database)
    marked = store.client_of(devices[0].identity.public)
    store.close()
    groups: dict[bytes, tuple[int, ...]] = {}
    original = Session.flush

    async def flush(self) -> None:
        if self.round is not None and self.round.config is not None:
            groups[self.device.identity.public] = self.round.config.participants
            if (self.round_id == 1 and marked in self.round.config.participants
                    and self.round.state == ClientState.WAIT_UNMASK):
                await self.ws.close()
                return
        await original(self)

    monkeypatch.setattr(Session, "flush", flush)
    server = AggregatorProcess(state.root)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=3, timeout=120)
                                      for d in devices))

    asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    first = status["rounds"][0]
    assert (first["status"], first["detail"]["task"]) == ("completed", "popularity")
    outcomes = sorted((g["status"], g["devices"]) for g in first["detail"]["groups"])
    assert outcomes == [("completed", 6), ("failed", 6)]
    assert first["survivors"] == 6
    failed_members = {d for d in devices if marked in groups[d.identity.public]}
    assert len(failed_members) == 6
    assert all(str(i) in first["detail"]["dropped"] for i in groups[devices[0].identity.public])

    server_key = bytes(state.signing_key().verify_key)
    v0 = read_bundle(state.bundles / "v00000000", server_key)
    index = {item: i for i, item in enumerate(v0.items)}

    def contributions(members: list) -> np.ndarray:
        users = [[np.array(sorted(index[i] for i in b if i in index), np.int64)
                  for b in d.store.baskets()] for d in members]
        return sum_contributions(POPULARITY, users, v0.manifest.n_items, 2.0)

    store = Store(state.database)
    popularity = store.statistic(POPULARITY)
    store.close()
    assert popularity is not None
    step = 1 / packed_scale_for(6)
    others = [d for d in devices if d not in failed_members]
    np.testing.assert_allclose(popularity.total, contributions(others), atol=6 * step)
    assert np.abs(popularity.total - contributions(devices)).max() > 6 * step


async def _bare_client(url: str, key: IdentityKey, server_key: bytes,
                       sharing_done: asyncio.Event, count: list[int], everyone: int) -> None:
    """Checks in and follows the SecAgg+ protocol up to its masked input, which it never
    sends: it holds its round in the MASKED phase."""
    async with connect(url, max_size=None, open_timeout=120, close_timeout=2) as ws:
        assert isinstance(await check_in(ws, key, server_key, model_version=10**6,
                                         follow_model=False), Welcome)
        client: ClientRound | None = None
        async for frame in ws:
            kind, body = channel.parse(frame)
            if isinstance(body, RoundNotice):
                client = ClientRound(body.client_id, key, server_key, policy=PERMISSIVE)
            elif kind == channel.SECAGG and client is not None:
                client.receive(body)  # type: ignore[arg-type]
                for data in client.data_to_send():
                    await ws.send(bytes([channel.SECAGG]) + data)
                if client.state == ClientState.WAIT_SURVIVORS:
                    count[0] += 1
                    if count[0] >= everyone:
                        sharing_done.set()


def test_sigterm_during_a_thousand_device_masked_phase_stops_within_seconds(
        tmp_path: Path) -> None:
    state, _ = make_world(tmp_path, n_users=4)
    n = 1000
    keys = [IdentityKey.generate() for _ in range(n)]
    store = Store(state.database)
    store.enroll_many([k.public for k in keys])
    store.close()
    state.config.write_text(config_for_all(n, statistics="false", timeout=600.0, rounds=1)
                            .replace('mechanism = "gaussian"', 'mechanism = "none"'))
    server = AggregatorProcess(state.root)
    server_key = bytes(state.signing_key().verify_key)

    async def run() -> float:
        sharing_done, count = asyncio.Event(), [0]
        clients = [asyncio.create_task(_bare_client(server.url, k, server_key, sharing_done,
                                                    count, n)) for k in keys]
        await asyncio.wait_for(sharing_done.wait(), 300)
        started = time.monotonic()
        server.proc.terminate()
        await asyncio.to_thread(server.proc.wait, 30)
        stopped = time.monotonic() - started
        for task in clients:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*clients, return_exceptions=True)
        return stopped

    stopped = asyncio.run(run())
    assert server.wait() == 0, server.log()[-2000:]
    assert stopped < 10, f"SIGTERM took {stopped:.1f} s"
    assert f"closing {n} connections" in server.log()
    assert "round 1 (train): 1000 devices sampled in 4 group(s)" in server.log()


def test_a_flood_of_late_messages_is_a_violation(tmp_path: Path) -> None:
    """Late is forgiven up to what a round has: a member that the round dropped for silence
    and then repeats its keys more often than a round has messages is disconnected, and
    the rounds complete for the others."""
    state, devices = make_world(tmp_path, n_users=6)
    key = IdentityKey.generate()
    store = Store(state.database)
    store.enroll(key.public)
    store.close()
    state.config.write_text(config_for_all(len(devices) + 1, statistics="false", timeout=2.0,
                                           rounds=2).replace('mechanism = "gaussian"',
                                                             'mechanism = "none"'))
    server = AggregatorProcess(state.root)
    server_key = bytes(state.signing_key().verify_key)

    async def flooder() -> str:
        async with connect(server.url, max_size=None) as ws:
            assert isinstance(await check_in(ws, key, server_key, model_version=10**6,
                                             follow_model=False), Welcome)
            client: ClientRound | None = None
            keys: bytes = b""
            async for frame in ws:
                kind, body = channel.parse(frame)
                if isinstance(body, RoundNotice):
                    client = ClientRound(body.client_id, key, server_key, policy=PERMISSIVE)
                elif isinstance(body, Refusal):
                    return body.reason
                elif kind == channel.SECAGG and client is not None and not keys:
                    client.receive(body)  # type: ignore[arg-type]
                    keys = bytes([channel.SECAGG]) + client.data_to_send()[0]
                    await ws.send(keys)  # then silence: dropped at the SHARE deadline
                    await asyncio.sleep(3.0)
                    for _ in range(6):
                        await ws.send(keys)
            return "closed without an error"

    async def everyone() -> tuple:
        return await asyncio.gather(flooder(), *(d.participate(server.url, rounds=2,
                                                               timeout=120)
                                                 for d in devices))

    reason, *reports = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    assert "6 late messages for round 1" in reason
    assert all([r.status for r in rs] == ["completed"] * 2 for rs in reports)
    assert server.log().count("late message from device") == 1  # logged once, not 6 times
