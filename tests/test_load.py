"""Load, in the reduced form `make test` runs (the full form is `python -m bench round`
with n = 1,000, and `make demo`'s 4,335 devices): many devices through full rounds with
random dropouts at random phases, and thousands of idle connections, with the service's
memory and file descriptors bounded and its health check answering throughout."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from fedcart.aggregator.process import AggregatorProcess
from fedcart.data.evaluation import make_split
from fedcart.simulation.federated import FederatedSettings, run_federated
from tests.conftest import synthetic_data
from tests.test_service import CONFIG, make_world

pytestmark = pytest.mark.reliability

IDLE = 2000


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_hundreds_of_devices_with_dropouts_at_random_phases(tmp_path: Path) -> None:
    split = make_split(synthetic_data(n_users=400, n_items=60, seed=21))
    settings = FederatedSettings(rounds=3, clients_per_round=150, dropout=0.1, dim=16,
                                 secagg_k=20, eval_every=3)
    result = run_federated(split, {}, settings, tmp_path)
    completed = [r for r in result.rounds if r.status == "completed"]
    # the two statistics rounds take every device (q = 1), then three training rounds, with
    # an evaluation of the statistics' model and of the last
    assert [r.task for r in completed] == ["popularity", "cooccurrence", "evaluate",
                                           *["train"] * 3, "evaluate"]
    assert completed[0].sampled == 400 and not result.interrupted
    for r in completed:
        assert r.dropped >= 1  # devices did vanish mid-round ...
        assert r.survivors is not None and r.survivors >= 0.7 * r.sampled  # ... and it went on
    assert result.server_peak_mb is not None and result.server_peak_mb < 400
    # each worker says what it cost (the report's resources, bench runs)
    assert len(result.worker_peak_mb) == settings.workers
    assert all(50 < mb < 2000 for mb in result.worker_peak_mb)


def test_thousands_of_idle_connections_are_bounded_and_released(tmp_path: Path) -> None:
    state, _ = make_world(tmp_path, n_users=4)
    state.config.write_text(CONFIG.format(statistics='false', timeout=10.0, rounds=0))
    server = AggregatorProcess(state.root)
    pid = server.proc.pid
    fds_before, rss_before = _fds(pid), _rss_mb(pid)

    async def flood() -> tuple[int, float, str]:
        sockets = await asyncio.gather(*(connect(server.url, open_timeout=60)
                                         for _ in range(IDLE)))
        await asyncio.sleep(0.5)
        held, rss = _fds(pid), _rss_mb(pid)
        health = await asyncio.to_thread(server.http, "/healthz")
        for ws in sockets:
            with contextlib.suppress(Exception):
                await ws.close()
        return held, rss, health

    held, rss, health = asyncio.run(flood())
    assert health.startswith("ok")
    # one descriptor per connection (plus a few), and a bounded amount of memory for each
    assert IDLE <= held - fds_before <= IDLE + 50
    assert (rss - rss_before) / IDLE < 0.2  # MB per idle connection
    for _ in range(100):  # released once they are gone
        if _fds(pid) <= fds_before + 5:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert _fds(pid) <= fds_before + 5
    assert server.terminate() == 0
