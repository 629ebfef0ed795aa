"""Crashes: the aggregator SIGKILLed at random moments over many rounds, and a device process
SIGKILLed while it swaps bundles. Nothing committed is lost, the privacy ledger never
under-counts, and no half-written bundle is ever served."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import Store
from fedcart.data.evaluation import make_split
from fedcart.edge_client.device import Device
from fedcart.model_export.bundle import GRAPH_FILES, pack_members, read_bundle
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import init_weights
from tests.conftest import SMALL_COHORTS, synthetic_data
from tests.process_owner import ProcessOwner
from tests.test_service import cli, ledger_matches_dp_accounting

pytestmark = pytest.mark.reliability

KILLS = 30
CONFIG = """
[round]
sampling_rate = 1.0
min_clients = 3
phase_timeout = 2.0
[privacy]
mechanism = "gaussian"
noise_multiplier = 1.5
budget_epsilon = 100000.0
delta = 1e-5
[evaluation]
every = 0
"""


def _world(root: Path) -> tuple:
    data = synthetic_data(n_users=10, n_items=30, seed=11)
    split = make_split(data)
    state = init_state(root / "agg", list(split.catalog), list(split.catalog), dim=8, seed=0)
    state.config.write_text(CONFIG)
    server_key = bytes(state.signing_key().verify_key)
    devices = []
    store = Store(state.database)
    for u, baskets in enumerate(data.users.values()):
        device = Device(root / f"device{u}", server_key, policy=SMALL_COHORTS)
        device.store.add_baskets([list(b) for b in baskets])
        store.enroll(device.identity.public)
        devices.append(device)
    store.close()
    return state, server_key, devices


async def _serve_then_kill(url: str, devices: list[Device], pid: int, after: float) -> None:
    tasks = [asyncio.create_task(d.participate(url, rounds=None, timeout=None))
             for d in devices]
    await asyncio.sleep(after)
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait(tasks, timeout=5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_thirty_random_sigkills_lose_nothing_and_never_undercount(tmp_path: Path) -> None:
    state, server_key, devices = _world(tmp_path)
    rng = random.Random(1234)
    # each service is ended on leaving its block, whatever raised inside it: the last one,
    # told to stop after two rounds, would otherwise serve on if its devices failed
    for _ in range(KILLS):
        with AggregatorProcess(state.root) as server:
            asyncio.run(_serve_then_kill(server.url, devices, server.proc.pid,
                                         rng.uniform(0.05, 1.5)))
        # every restart must find a consistent store
        assert Store(state.database).integrity_ok()
    # a final clean stretch: the service resumes and completes rounds again
    with AggregatorProcess(state.root, "--max-rounds", "2") as server:

        async def resume() -> None:
            await asyncio.gather(*(d.participate(server.url, rounds=2, timeout=120)
                                   for d in devices))

        asyncio.run(resume())
        assert server.wait(60) == 0, server.log()

    store = Store(state.database)
    assert store.integrity_ok()
    rounds = store.rounds()
    statuses = {r.status for r in rounds}
    assert statuses <= {"completed", "failed", "interrupted"}  # none left "running"
    assert sum(r.status == "interrupted" for r in rounds) >= 1  # kills did hit rounds
    models = store.models()
    completed = [r.round_id for r in rounds if r.status == "completed"]
    assert len(completed) >= 2 and [m.version for m in models] == list(range(len(models)))
    # never under-counts: every published model's round was charged first
    charged = {c.round_id for c in store.ledger()}
    assert {m.round_id for m in models if m.round_id is not None} <= charged
    store.close()
    ledger_matches_dp_accounting(state.root)
    # only published bundles are left in bundles/ (older ones pruned, keep_bundles = 5), the
    # newest five are all there, and every one left verifies
    names = {Path(m.bundle_dir).name for m in models}
    left = {p.name for p in state.bundles.iterdir()}
    assert left <= names and {Path(m.bundle_dir).name for m in models[-5:]} <= left
    for m in models:
        if Path(m.bundle_dir).name in left:
            assert read_bundle(state.root / m.bundle_dir,
                               server_key).manifest.model_version == m.version
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert status["model_version"] == models[-1].version


SWAPPER = """
import sys
from pathlib import Path
from fedcart.edge_client.device import Device
device = Device(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
print("ready", flush=True)
for path in sys.argv[3:]:
    device.install(Path(path).read_bytes())
"""


def test_sigkill_of_a_device_mid_swap_keeps_a_verified_bundle(
        tmp_path: Path, processes: ProcessOwner) -> None:
    items = [f"sku{i:03d}" for i in range(2000)]
    state = init_state(tmp_path / "agg", items, items, dim=64, seed=0)
    key = state.signing_key()
    server_key = bytes(key.verify_key)
    first = read_bundle(state.bundles / "v00000000", server_key)
    graphs = {n: first.files[n] for n in GRAPH_FILES}
    versions = [tmp_path / "v0.zip"]
    versions[0].write_bytes(pack_members(first.members()))
    for v in range(1, 40):
        export_bundle(tmp_path / f"v{v}", init_weights(2000, 64, np.random.default_rng(v)),
                      items, items, key, model_version=v, history_decay=0.9, graphs=graphs)
        versions.append(tmp_path / f"v{v}.zip")
        versions[-1].write_bytes(pack_members(read_bundle(tmp_path / f"v{v}",
                                                          server_key).members()))
    rng = random.Random(7)
    reached = []
    for trial in range(10):
        device_dir = tmp_path / f"device{trial}"
        Device(device_dir, server_key, policy=SMALL_COHORTS).install(
            versions[0].read_bytes())
        proc = processes.popen(
            [sys.executable, "-c", SWAPPER, str(device_dir), server_key.hex(),
             *map(str, versions[1:])],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        device = Device(device_dir, server_key, policy=SMALL_COHORTS)
        assert device.current_bundle() is not None, f"trial {trial}: no verified bundle"
        assert device.recommend(["sku001"], 3)
        reached.append(device.model_version)
    # the kills landed in the middle of the sequence of swaps, not only before or after it
    assert any(0 < v < len(versions) - 1 for v in reached), reached
