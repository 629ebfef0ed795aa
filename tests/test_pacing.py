"""Pace steering (fedcart.aggregator.pacing): devices sent away return at the paced rate,
the connections held never exceed the capacity, and connections that outstay their lease
make room while others wait."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from pathlib import Path

import pytest

from fedcart.aggregator.config import AggregatorConfig
from fedcart.aggregator.pacing import Pacer, Pacing, PacingError
from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.service import Aggregator
from fedcart.aggregator.statedir import init_state
from tests.test_service import CONFIG, make_world


def test_devices_sent_away_return_at_the_paced_rate() -> None:
    pacer = Pacer(Pacing(capacity=10, rate=50.0, min_delay=5.0, jitter=2.0))
    rng = random.Random(1)
    # a storm: 10,000 devices check in within one second, all beyond the capacity
    returns = sorted(t + pacer.send_away(t) + rng.uniform(0, 2.0)
                     for t in sorted(rng.uniform(0, 1) for _ in range(10_000)))
    assert returns[0] >= 5.0  # nobody is told to come back sooner than min_delay
    span = returns[-1] - returns[0]
    assert 10_000 / span == pytest.approx(50.0, rel=0.02)  # 200 s for 10,000 at 50/s
    # and no second holds much more than its share: the storm is spread out
    per_second: dict[int, int] = {}
    for t in returns:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) <= 2 * 50


def test_a_quiet_server_sends_a_device_away_for_min_delay_only() -> None:
    pacer = Pacer(Pacing(capacity=1, rate=1.0, min_delay=3.0))
    assert pacer.send_away(100.0) == 3.0
    assert pacer.send_away(100.5) == pytest.approx(3.5)  # the slot after the first one
    assert pacer.send_away(1000.0) == 3.0  # the schedule has emptied meanwhile


def test_the_capacity_bounds_who_stays() -> None:
    pacer = Pacer(Pacing(capacity=3, rate=1.0))
    assert [pacer.admits(n) for n in range(5)] == [True, True, True, False, False]


def test_connections_outstaying_their_lease_make_room_only_while_others_wait() -> None:
    pacer = Pacer(Pacing(capacity=2, rate=1.0, min_delay=10.0, lease=60.0))
    since = {1: 0.0, 2: 30.0, 3: 50.0}
    assert pacer.outstayed(since, now=100.0) == []  # nobody waits: everyone stays
    pacer.send_away(100.0)  # one device is sent away, its slot at 110 s
    assert pacer.outstayed(since, now=100.0) == [1, 2]  # oldest first, 3 is within lease
    assert pacer.outstayed(since, now=111.0) == []  # its slot has come: nobody waits


@pytest.mark.parametrize("bad", [dict(capacity=0, rate=1.0), dict(capacity=1, rate=0.0),
                                 dict(capacity=1, rate=1.0, lease=0.0),
                                 dict(capacity=1, rate=1.0, jitter=-1.0)])
def test_settings_out_of_range_are_refused(bad: dict) -> None:
    with pytest.raises(PacingError):
        Pacing(**bad)


# -- the service and the device ---------------------------------------------------------------
def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.reliability
def test_a_full_aggregator_sends_devices_away_and_they_come_back_in_turn(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Six unmodified devices, an aggregator that holds two connections: the others are
    sent away and come back when told, leases end so that the connected pair turns over,
    no check-in is refused, and the server never holds more than two."""
    state, devices = make_world(tmp_path, n_users=6)
    state.config.write_text(
        CONFIG.format(statistics="false", timeout=5.0, rounds=0).replace(
            "min_clients = 3", "min_clients = 20")  # no round: check-in alone
        + "[pacing]\ncapacity = 2\nrate = 20.0\nmin_delay = 0.5\njitter = 0.5\nlease = 1.0\n")
    server = AggregatorProcess(state.root)
    held: list[float] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.05):
            held.append(_metric(server.http("/metrics"), "fedcart_connected_devices"))

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=8.0)
                                      for d in devices))

    with caplog.at_level(logging.INFO, logger="fedcart.device"):
        reports = asyncio.run(everyone())
    watching.set()
    watcher.join()
    metrics = server.http("/metrics")
    assert server.terminate() == 0
    assert reports == [[] for _ in devices]  # no round ran: min_clients is 20
    kept = _metric(metrics, 'fedcart_check_ins_total{decision="kept"}')
    sent_away = _metric(metrics, 'fedcart_check_ins_total{decision="sent_away"}')
    assert _metric(metrics, 'fedcart_check_ins_total{decision="refused"}') == 0
    assert sent_away >= 4  # at least the four that found it full at first
    assert kept >= 6  # the pair turned over: every device was held in turn
    assert _metric(metrics, "fedcart_leases_ended_total") >= 4
    assert 0 < max(held) <= 2
    came_back = [r for r in caplog.records if "checking in again in" in r.getMessage()]
    assert len(came_back) >= 4  # the devices sent away waited and came back


@pytest.mark.reliability
def test_a_full_aggregator_counts_check_ins_under_way_and_sheds_before_the_challenge(
        tmp_path: Path) -> None:
    """Capacity two: one device held and one connection whose check-in is under way (it
    never answers its challenge) fill it, so a third connection is sent away at once, with
    no challenge to answer: a storm of unanswered check-ins on a full server held a file
    each and ran it out of them."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from fedcart.protocol import channel
    from fedcart.protocol.control import Challenge, ComeBack
    from tests.wire import check_in

    state, devices = make_world(tmp_path, n_users=1)
    state.config.write_text(
        CONFIG.format(statistics="false", timeout=5.0, rounds=0).replace(
            "min_clients = 3", "min_clients = 20")
        + "[pacing]\ncapacity = 2\nrate = 20.0\nmin_delay = 0.5\njitter = 0.5\n")
    server = AggregatorProcess(state.root)
    server_key = bytes(state.signing_key().verify_key)

    async def scenario() -> tuple[object, object, object]:
        async with connect(server.url) as held, connect(server.url) as silent:
            welcome = await check_in(held, devices[0].identity, server_key)
            _, first = channel.parse(await silent.recv())  # its challenge, left unanswered
            async with connect(server.url) as third:
                _, answer = channel.parse(await third.recv())
                # and closed at once: no close frame, no handshake to wait out (a file
                # held up to CLOSE_TIMEOUT for each connection sent away)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(third.recv(), 1.0)
                assert third.protocol.close_rcvd is None
            return welcome, first, answer

    welcome, first, answer = asyncio.run(scenario())
    metrics = server.http("/metrics")
    assert server.terminate() == 0
    assert type(welcome).__name__ == "Welcome" and isinstance(first, Challenge)
    assert isinstance(answer, ComeBack) and answer.after >= 0.5
    assert _metric(metrics, 'fedcart_check_ins_total{decision="sent_away"}') == 1


@pytest.mark.parametrize(("population", "capacity", "among"), [(1000, 50, 50), (30, 50, 30)])
def test_the_fixed_denominator_counts_no_more_devices_than_a_round_samples_among(
        tmp_path: Path, population: int, capacity: int, among: int) -> None:
    """Under DP a training step divides the noised sum by q*N. A round samples among the
    connections the aggregator holds, so N is the population but at most the capacity:
    with q*population, a population ten times the capacity shrank every step tenfold."""
    items = [f"sku{i}" for i in range(5)]
    state = init_state(tmp_path / "agg", items, items, dim=0, seed=0)
    config = AggregatorConfig(capacity=capacity, population=population, delta=1e-7)
    assert Aggregator(state, config)._sampled_among() == among
