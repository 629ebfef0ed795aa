"""Simulated devices in worker processes: each worker holds a shard of the population, every
device with its own state directory (SQLite cart store, identity key) and only its own
baskets, and runs them as asyncio tasks against the aggregator over loopback websockets.
An idle device holds no file open (edge_client.store), only its connection while the
aggregator keeps it: a population beyond the connections the aggregator holds takes turns
(it sends the others away to come back later, pacing.py), so a worker's descriptors are a
socket per connected device, at most the aggregator's ``connections``, plus a margin
(``_raise_fd_limit`` checks that first). The devices first check in at CHECK_IN_RATE a
second in all, not at once: a storm of a whole population's check-ins is what pacing is
there to prevent.

This is the seam where a cluster backend (Ray, as DESIGN.md section 9 plans) would place the
shards on other machines: a worker needs only its shard, the server's public key and URL,
and sends back the device keys and per-round reports.

Worker protocol over a multiprocessing pipe (no pickle crosses the network: the pipe is
between a parent and its own children):
    worker -> parent   ("keys", [public key bytes, ...])  once its devices exist
    parent -> worker   ("go", url)   or   ("stop", None)
    worker -> parent   ("report", (round_id, status, bytes_up, bytes_down))  per device round
    worker -> parent   ("done", None)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import websockets
from threadpoolctl import threadpool_limits

from fedcart.aggregator.metrics import peak_resident_mb
from fedcart.edge_client.device import Device
from fedcart.edge_client.session import SessionHooks, participate
from fedcart.model_export.bundle import read_bundle
from fedcart.open_files import raise_open_file_limit
from fedcart.protocol.policy import DevicePolicy
from fedcart.secagg.client import PROTOCOL_MESSAGES
from fedcart.secagg.policy import ClientPolicy

__all__ = ["Shard", "worker_main"]

RECONNECT_DELAY = 0.1  # doubled after each session without a round, up to MAX_DELAY
MAX_DELAY = 5.0
GIVE_UP_SECONDS = 1200.0  # without a round for this long, the device gives up
# first check-ins a second, all workers together: under the check-ins an aggregator serves
# a second on these 2 cores while the devices' own processes run (bench scale: 681)
CHECK_IN_RATE = 200.0


# Devices of one worker that hold a round's input at once (SessionHooks.input_gate): a
# co-occurrence input is 4 MB at M = 2000 (packed), and 2,000 devices holding theirs took
# 24 GB.
INPUTS_AT_ONCE = 32
# Devices of one worker that receive and install a bundle at once (download_gate): the
# first version after the co-occurrence round carries the item-item table, 42 MB at
# V = 50,000, and an evaluation round sends it to each of the cohort's devices; installs
# run in the default executor's threads, so more at once only hold more bundles waiting.
DOWNLOADS_AT_ONCE = 4

# A simulated device's policy: a real device's default, except that it joins cohorts from
# 3 devices (the simulation's min_clients), so that small data sets can be simulated; a
# deployed device refuses cohorts under 20 (secagg.policy).
POLICY = DevicePolicy(secagg=ClientPolicy(min_participants=3))


@dataclass(frozen=True)
class Shard:
    """One worker's part of the population."""

    worker: int
    root: Path  # the run's directory: devices/ and blobs/ go under it
    server_key: bytes
    users: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]  # (user id, baskets)
    dropout: float
    seed: int
    initial_bundle: Path  # model version 0, which the app ships with
    connections: int  # that the aggregator holds at once, of all workers' devices
    workers: int  # how many share the population


# Descriptors a worker uses besides its devices' sockets, about 25: 9 at rest (stdio, its
# pipe, onnxruntime's own cache database), the event loop's 3, and those of the store uses in
# progress: 5 at most on the event loop (device.db, -wal, -shm, a blob being written and its
# directory) and a blob read in each default-executor thread.
FD_MARGIN = 64


def _raise_fd_limit(connected: int) -> None:
    """Raise the soft limit on open files to the hard one, then check that ``connected``
    sockets (the shard's devices the aggregator may hold at once: _live reconnects a device
    whenever its connection ends, and the server samples cohorts among the connected) fit
    with FD_MARGIN; raise RuntimeError saying so before any device is created if not."""
    soft = raise_open_file_limit()
    need = connected + FD_MARGIN
    if need > soft:
        raise RuntimeError(
            f"a worker of {connected:,} connected devices needs {need:,} open files (a "
            f"socket each, plus {FD_MARGIN}), and the limit is {soft:,}: use more workers "
            f"(at most {max(soft - FD_MARGIN, 0):,} devices each) or raise the hard limit "
            "(ulimit -Hn)")


def _make_devices(shard: Shard) -> list[Device]:
    """Each user's device with their baskets and the shipped model version 0 installed
    (verified once: the worker's devices share a bundle store). A device's setup shares
    one database connection, closed before the next device's."""
    blobs = shard.root / "blobs" / f"worker{shard.worker}"
    shipped = read_bundle(shard.initial_bundle, shard.server_key).members()
    devices = []
    for index, (_, baskets) in enumerate(shard.users):
        device = Device(shard.root / "devices" / f"w{shard.worker}-{index:06d}",
                        shard.server_key, blob_dir=blobs, policy=POLICY)
        with device.store.opened():
            if not device.store.baskets():
                device.store.add_baskets([list(b) for b in baskets],
                                         at=[float(t) for t in range(len(baskets))])
            if device.manifest is None:
                device.install_members(shipped, str(shard.initial_bundle))
        devices.append(device)
    return devices


async def _live(device: Device, url: str, rng: random.Random, dropout: float,
                pipe: Connection, shared: SessionHooks, start: float) -> None:
    """Keep the device checked in until the server goes away: it reconnects whenever its
    connection ends (it dropped out of a round, as a phone going offline does, or a busy
    server timed its check-in out or its handshake, after which it backs off), and stops
    when nothing listens on the server's port any more or it has had no round for
    GIVE_UP_SECONDS. ``shared`` holds the worker's gates; the device adds its dropout."""

    def leave(round_id: int) -> int | None:
        del round_id
        return rng.randrange(PROTOCOL_MESSAGES) if rng.random() < dropout else None

    hooks = replace(shared, leave=leave)
    await asyncio.sleep(start)
    delay, last_round = RECONNECT_DELAY, time.monotonic()
    while time.monotonic() - last_round < GIVE_UP_SECONDS:
        try:
            reports = await participate(device, url, rounds=None, timeout=None,
                                        follow_model=False, hooks=hooks)
        except ConnectionRefusedError:
            return  # nothing listens on the port: the server has stopped, the run is over
        except (OSError, TimeoutError, websockets.WebSocketException):
            # a busy server: a handshake that timed out, a reset. Ending here lost 59 of
            # 4,335 devices for good in a demo run, and every later round then waited
            # population_wait for them.
            reports = []
        for r in reports:
            pipe.send(("report", (r.round_id, r.status, r.bytes_up, r.bytes_down)))
        if reports:
            delay, last_round = RECONNECT_DELAY, time.monotonic()
        else:  # turned away (a busy server timed the check-in out): back off
            delay = min(2 * delay, MAX_DELAY)
        await asyncio.sleep(delay)


async def _run(devices: list[Device], url: str, shard: Shard, pipe: Connection) -> None:
    """Run the shard's devices until each has stopped (the server went away) or the parent
    says stop (anything on the pipe): then every device stops at once, sessions and
    come-back waits alike."""
    master = random.Random(shard.seed * 1_000_003 + shard.worker)
    shared = SessionHooks(input_gate=asyncio.Semaphore(INPUTS_AT_ONCE),
                          download_gate=asyncio.Semaphore(DOWNLOADS_AT_ONCE))
    interval = shard.workers / CHECK_IN_RATE
    everyone = asyncio.gather(*(_live(d, url, random.Random(master.getrandbits(64)),
                                      shard.dropout, pipe, shared, i * interval)
                                for i, d in enumerate(devices)))
    told = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pipe.fileno(), told.set)
    waiting: asyncio.Task[Any] = asyncio.ensure_future(told.wait())
    try:
        await asyncio.wait({everyone, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(pipe.fileno())
        for pending in (everyone, waiting):
            pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everyone


def worker_main(shard: Shard, pipe: Connection) -> None:
    """Entry point of a worker process. Its numpy calls use one BLAS thread: its devices'
    threads already share the cores, each with vectors of V values, and OpenBLAS's own
    threads only contend with them for the cores, on small vectors where they gain nothing
    (docs/performance.md has the measurement)."""
    logging.basicConfig(level=logging.ERROR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    _raise_fd_limit(min(len(shard.users), shard.connections))
    with threadpool_limits(limits=1, user_api="blas"):
        devices = _make_devices(shard)
        pipe.send(("keys", [d.identity.public for d in devices]))
        command, url = pipe.recv()
        if command == "go":
            asyncio.run(_run(devices, url, shard, pipe))
    pipe.send(("done", peak_resident_mb()))  # what a worker cost: the run's resources
