"""scale: how many check-ins per second a real aggregator sustains, and a population far
larger than the sockets it may hold checking in, paced, without a refused check-in.

N devices are enrolled (their Ed25519 keys derived from their index, so the client
processes need no key files); the aggregator runs in its own process with
``[pacing] capacity`` below N. Client processes play the devices with the protocol's own
types (``fedcart.protocol.control``): each connects, answers the challenge, and either stays
(a Welcome: it holds its connection until the server sends it away) or is sent away (a
ComeBack) and returns when told, within the window. A server full with held connections
and check-ins under way sends a connection away before its challenge (shed); the device
returns when told and has not checked in yet. The run ends when every device has checked
in once. Reported: check-ins served per second, those shed, refused check-ins (must be 0),
the most connections the server held, and the server's peak resident memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey
from websockets.asyncio.client import connect

from bench.common import Row
from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import Store
from fedcart.open_files import raise_open_file_limit
from fedcart.protocol import channel
from fedcart.protocol.control import Challenge, ComeBack, Hello, Refusal, Welcome, expect

CONFIG = """
[round]
min_clients = 1000000   # no round runs: the benchmark measures check-in alone
group_size = 2000000
[statistics]
enabled = false
[pacing]
capacity = {capacity}
rate = {rate}
min_delay = 5.0
jitter = 2.0
lease = 5.0
"""
CLIENT_PROCESSES = 2
CONCURRENT_HANDSHAKES = 64  # per client process: devices coming online, not all at once


def device_key(index: int) -> SigningKey:
    """Device ``index``'s key: the benchmark's devices are reproducible."""
    return SigningKey(hashlib.sha256(b"fedcart-bench-scale/%d" % index).digest())


@dataclass
class Tally:
    """What one client process saw."""

    check_ins: int = 0
    stayed: int = 0
    sent_away: int = 0
    shed: int = 0  # sent away before the challenge: the server was full
    refused: int = 0
    first_seen: int = 0  # devices that have checked in at least once
    errors: tuple[str, ...] = ()


async def _device(index: int, url: str, tally: Tally, gate: asyncio.Semaphore,
                  everyone: asyncio.Event, need: int) -> None:
    key, seen, delay = device_key(index), False, 0.0
    errors: list[str] = []
    while not everyone.is_set():
        if delay:
            try:  # a device sent away waits, unless the run is over meanwhile
                await asyncio.wait_for(everyone.wait(), delay)
                return
            except TimeoutError:
                pass
        async with gate:
            try:
                ws = await connect(url, open_timeout=60, compression=None, max_size=1 << 16)
                _, first = channel.parse(await ws.recv())
                if isinstance(first, ComeBack):  # full: sent away before its challenge
                    tally.shed += 1
                    await ws.close()
                    delay = first.after + random.uniform(0, first.window)
                    continue
                challenge = expect(first, Challenge)  # type: ignore[arg-type]
                statement = channel.checkin_statement(challenge.nonce, challenge.server_key)
                await ws.send(Hello(bytes(key.verify_key), key.sign(statement).signature,
                                    -1, follow_model=False).to_frame())
                _, reply = channel.parse(await ws.recv())
            except Exception as exc:  # a refused or failed check-in: counted, tried again
                tally.refused += 1
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                tally.errors = tuple(errors[-3:])
                delay = 5.0
                continue
        tally.check_ins += 1
        if isinstance(reply, Refusal):
            tally.refused += 1
            tally.errors = (reply.reason,)
            delay = 5.0
            await ws.close()
            continue
        if not seen:
            seen = True
            tally.first_seen += 1
            if tally.first_seen == need:
                everyone.set()
        if isinstance(reply, Welcome):
            tally.stayed += 1
            reply = await _held(ws, everyone)
            if reply is None:
                return
        else:
            tally.sent_away += 1
        await ws.close()
        come_back = expect(reply, ComeBack)  # type: ignore[arg-type]
        delay = come_back.after + random.uniform(0, come_back.window)


async def _held(ws, everyone: asyncio.Event) -> ComeBack | None:  # type: ignore[no-untyped-def]
    """Hold a connection the server kept until it sends the device away (its ComeBack) or
    the run ends (None)."""
    done = asyncio.ensure_future(everyone.wait())
    try:
        while True:
            recv = asyncio.ensure_future(ws.recv())
            await asyncio.wait([recv, done], return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():
                recv.cancel()
                await ws.close()
                return None
            _, message = channel.parse(recv.result())
            if isinstance(message, ComeBack):
                return message
    finally:
        done.cancel()


def _client(url: str, indices: range) -> dict:
    """One client process: its share of the devices, until each has checked in once."""
    raise_open_file_limit()
    tally = Tally()

    async def run() -> None:
        gate, everyone = asyncio.Semaphore(CONCURRENT_HANDSHAKES), asyncio.Event()
        await asyncio.gather(*(_device(i, url, tally, gate, everyone, len(indices))
                               for i in indices))

    asyncio.run(run())
    return tally.__dict__


def run_scale(n: int, capacity: int, rate: float, workdir: Path) -> dict:
    """Enroll ``n`` devices, serve them with ``capacity`` connections paced at ``rate``
    returns per second, and measure until every device has checked in once."""
    items = [f"sku{i:03d}" for i in range(50)]
    state = init_state(workdir / "agg", items, items, dim=8, seed=0)
    state.config.write_text(CONFIG.format(capacity=capacity, rate=rate))
    store = Store(state.database)
    store.enroll_many([bytes(device_key(i).verify_key) for i in range(n)])
    store.close()
    server = AggregatorProcess(state.root)
    held, finished = [0], threading.Event()

    def watch() -> None:  # the most connections the server held, from its /metrics
        while not finished.wait(1.0):
            found = re.search(r"^fedcart_connected_devices (\S+)$", server.http("/metrics"),
                              re.MULTILINE)
            held[0] = max(held[0], int(float(found.group(1)))) if found else held[0]

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    watcher.start()
    shares = [range(p, n, CLIENT_PROCESSES) for p in range(CLIENT_PROCESSES)]
    with ProcessPoolExecutor(CLIENT_PROCESSES,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        tallies = list(pool.map(_client, [server.url] * CLIENT_PROCESSES, shares))
    elapsed = time.monotonic() - started
    finished.set()
    watcher.join()
    server.terminate()
    peak = server.peak_memory_mb()
    total = {k: sum(t[k] for t in tallies) for k in ("check_ins", "stayed", "sent_away",
                                                      "shed", "refused", "first_seen")}
    return {**total, "seconds": elapsed, "check_ins_per_second": total["check_ins"] / elapsed,
            "most_connected": held[0], "peak_rss_mb": peak,
            "errors": [e for t in tallies for e in t["errors"]][:5]}


def bench_scale(quick: bool) -> list[Row]:
    rows: list[Row] = []
    grid = [(2_000, 500, 200.0)] if quick else [(10_000, 2_000, 200.0),
                                               (100_000, 10_000, 200.0)]
    for n, capacity, rate in grid:
        with tempfile.TemporaryDirectory(prefix="fedcart-bench-scale-") as tmp:
            m = run_scale(n, capacity, rate, Path(tmp))
        print(f"  n={n}: {json.dumps(m)}", file=sys.stderr)
        params = {"n": n, "capacity": capacity, "paced rate": rate}
        rows.append(Row("scale", params, "check-ins served", m["check_ins_per_second"], "/s",
                        "the paced return rate", rate, m["check_ins_per_second"] / rate))
        rows.append(Row("scale", params, "devices checked in", m["first_seen"], "",
                        "the population", n, m["first_seen"] / n))
        rows.append(Row("scale", params, "shed before the challenge", m["shed"], "",
                        "check-ins", m["check_ins"], m["shed"] / max(m["check_ins"], 1)))
        rows.append(Row("scale", params, "refused check-ins", m["refused"], "",
                        "check-ins", m["check_ins"], m["refused"] / max(m["check_ins"], 1)))
        rows.append(Row("scale", params, "most connections held", m["most_connected"], "",
                        "capacity", capacity, m["most_connected"] / capacity))
        rows.append(Row("scale", params, "time until all checked in", m["seconds"], "s",
                        "n at the served rate", n / m["check_ins_per_second"],
                        n / m["check_ins_per_second"] / m["seconds"]))
    return rows
