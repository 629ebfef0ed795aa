"""A simulated device holds no open file between its uses: a worker's descriptors do not
grow with its devices (a run of 32,000 customers failed with EMFILE at 6,662 devices per
worker, each holding device.db and its -wal and -shm), and a device built the way the
simulation builds it still reads its baskets, installs a bundle and recommends."""

from __future__ import annotations

import asyncio
import os
import queue
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from fedcart.aggregator.statedir import init_state
from fedcart.data.evaluation import make_split
from fedcart.model_export.bundle import GRAPH_FILES, pack_members, read_bundle
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import init_weights
from fedcart.protocol.control import ComeBack
from fedcart.simulation.devices import FD_MARGIN, Shard, _make_devices, _raise_fd_limit
from fedcart.simulation.federated import _Workers, population
from tests.conftest import synthetic_data

DEVICES = 200
SLACK = 4  # descriptors the first uses may leave behind for good (an ORT session, say)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_devices_hold_no_files(tmp_path: Path) -> None:
    split = make_split(synthetic_data(n_users=DEVICES, n_items=30, seed=3))
    users = population(split)
    assert len(users) == DEVICES
    catalog = list(split.catalog)
    state = init_state(tmp_path / "aggregator", catalog, catalog, dim=4, seed=0)
    key = state.signing_key()
    server_key = bytes(key.verify_key)
    shard = Shard(worker=0, root=tmp_path, server_key=server_key, users=tuple(users),
                  dropout=0.0, seed=0, initial_bundle=state.bundles / "v00000000",
                  connections=DEVICES, workers=1)

    before = _open_fds()
    devices = _make_devices(shard)
    assert _open_fds() <= before + SLACK  # not one a device

    first = read_bundle(shard.initial_bundle, server_key)
    export_bundle(tmp_path / "v1", init_weights(len(catalog), 4, np.random.default_rng(1)),
                  catalog, catalog, key, model_version=1, round_id=1, history_decay=0.9,
                  graphs={n: first.files[n] for n in GRAPH_FILES})
    v1 = pack_members(read_bundle(tmp_path / "v1", server_key).members())
    for device, (_, baskets) in zip(devices[:3], users, strict=False):
        assert device.store.baskets() == [sorted(set(b)) for b in baskets]
        assert device.model_version == 0 and device.recommend([catalog[0]], 3)
        device.install(v1)
        device.add_basket([catalog[1], catalog[2]])
        assert device.model_version == 1 and device.recommend([catalog[0]], 3)
        assert device.store.baskets()[-1] == sorted([catalog[1], catalog[2]])
    assert _open_fds() <= before + SLACK


def test_a_worker_checks_its_open_file_limit_first() -> None:
    """A worker's devices that the aggregator may hold at once have a socket each: a
    shard whose share cannot fit under the hard limit is refused before any device is
    made, saying what to do."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    _raise_fd_limit(100)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    with pytest.raises(RuntimeError, match="use more workers"):
        _raise_fd_limit(hard - FD_MARGIN + 1)


def test_a_worker_that_dies_creating_its_devices_is_reported_not_waited_for(
        tmp_path: Path) -> None:
    """Creating devices has no fixed timeout (100,000 of them outlasted one), so a worker
    that dies meanwhile, here for want of its shipped bundle, must end the wait at once
    with why."""
    shard = Shard(worker=0, root=tmp_path, server_key=bytes(32),
                  users=(("u0", (("a", "b"),)),), dropout=0.0, seed=0,
                  initial_bundle=tmp_path / "no-such-bundle", connections=1, workers=1)
    workers = _Workers([shard])
    try:
        with pytest.raises(RuntimeError, match="died creating its devices"):
            workers.keys()
    finally:
        workers.finish(timeout=5)


def test_devices_sent_away_stop_as_soon_as_the_run_ends(tmp_path: Path) -> None:
    """A server that sends every device away for ten minutes, then the run ends: the worker
    stops its devices at once and reports its peak memory. Before, devices slept out their
    come-back delay (minutes at 100,000 devices), the worker was killed at the end of
    the run, and what it cost was lost."""
    split = make_split(synthetic_data(n_users=5, n_items=30, seed=3))
    catalog = list(split.catalog)
    state = init_state(tmp_path / "aggregator", catalog, catalog, dim=4, seed=0)
    shard = Shard(worker=0, root=tmp_path, server_key=bytes(state.signing_key().verify_key),
                  users=tuple(population(split)), dropout=0.0, seed=0,
                  initial_bundle=state.bundles / "v00000000", connections=5, workers=1)
    sent_away = threading.Semaphore(0)
    ready: queue.Queue[str] = queue.Queue()

    async def away(ws: ServerConnection) -> None:
        await ws.send(ComeBack(600.0, 0.0).to_frame())
        sent_away.release()

    def serve_forever() -> None:
        async def main() -> None:
            async with serve(away, "127.0.0.1", 0) as server:
                ready.put(f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}")
                await asyncio.Future()
        asyncio.run(main())

    threading.Thread(target=serve_forever, daemon=True).start()
    workers = _Workers([shard])
    try:
        assert len(workers.keys()) == len(shard.users)
        workers.send("go", ready.get(timeout=10))
        for _ in shard.users:
            assert sent_away.acquire(timeout=60)
        started = time.monotonic()
        workers.stop()
        workers.finish(timeout=30)
        assert time.monotonic() - started < 15
        assert len(workers.peak_mb) == 1 and workers.peak_mb[0] > 0
    finally:
        workers.finish(timeout=5)
