"""round: a real aggregator process and N devices over loopback, through full rounds.

Reports the round's time and its phases, bytes per device up (against 4 bytes per
parameter), and the server's peak resident memory (VmHWM, which the server logs when it
stops) against N at fixed d and against d at fixed N. Aggregation keeps one running sum,
so memory must not grow with N beyond per-connection buffers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import Row
from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import Store
from fedcart.edge_client.device import Device
from fedcart.model_export.model import n_parameters
from fedcart.open_files import raise_open_file_limit
from fedcart.simulation.devices import POLICY

CONFIG = """
[round]
sampling_rate = 1.0
min_clients = 3
min_connected = {n}     # the round waits for every device (a cohort of n splits into groups)
population_wait = 300.0
secagg_degree = 20
phase_timeout = 300.0
max_rounds = 1
[training]
train_groups = ["e_in", "e_out", "bias", "blend"]   # every parameter: uploads grow with d
[statistics]
enabled = false         # the benchmark times a training round
[evaluation]
every = 0               # ... alone
[privacy]
mechanism = "gaussian"
noise_multiplier = 1.0
budget_epsilon = 1000000.0
"""


def run_round(n: int, n_items: int, dim: int, workdir: Path) -> dict:
    """One full round with ``n`` devices; the measurements of it."""
    raise_open_file_limit()
    rng = np.random.default_rng(0)
    items = [f"sku{i:05d}" for i in range(n_items)]
    state = init_state(workdir / "agg", items, items, dim=dim, seed=0)
    state.config.write_text(CONFIG.format(n=n))
    server_key = bytes(state.signing_key().verify_key)
    store = Store(state.database)
    devices = []
    for u in range(n):
        device = Device(workdir / f"d{u}", server_key, policy=POLICY)
        for _ in range(3):
            device.add_basket([items[i] for i in rng.choice(n_items, 5, replace=False)])
        store.enroll(device.identity.public)
        devices.append(device)
    store.close()
    server = AggregatorProcess(state.root)
    url = server.url
    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(url, rounds=1, timeout=900)
                                      for d in devices))

    reports = asyncio.run(everyone())
    if server.wait(300) != 0:
        raise RuntimeError("aggregator failed:\n" + server.log())
    peak = server.peak_memory_mb()
    assert peak is not None, server.log()
    store = Store(state.database)
    (round_row,) = store.rounds()
    store.close()
    assert round_row.status == "completed", server.log()
    n_params = n_parameters(n_items, dim)
    up = [r[0].bytes_up for r in reports if r]
    return {"seconds": round_row.finished_at - round_row.started_at,
            "phases": round_row.detail.get("phase_seconds", {}),
            "survivors": round_row.survivors, "n_params": n_params,
            "bytes_up": float(np.mean(up)), "peak_rss_mb": peak}


def bench_round(quick: bool) -> list[Row]:
    rows: list[Row] = []
    n_items = 500
    dims = [8, 16, 64] if quick else [16, 64, 512]
    ns = [10, 30] if quick else [100, 1000]
    base_rss = None
    for n in ns:  # against N at fixed d
        with tempfile.TemporaryDirectory(prefix="fedcart-bench-round-") as tmp:
            m = run_round(n, n_items, dims[0], Path(tmp))
        params = {"n": n, "V": n_items, "d": dims[0], "params": m["n_params"]}
        base_rss = base_rss or m["peak_rss_mb"]
        phases = sum(m["phases"].values())
        rows.append(Row("round", params, "time in protocol phases", phases, "s",
                        "whole round (training, secagg, noise, signing, publishing)",
                        m["seconds"], m["seconds"] / phases))
        rows.append(Row("round", params, "server peak RSS", m["peak_rss_mb"], "MB",
                        f"same at n={ns[0]}", base_rss, base_rss / m["peak_rss_mb"]))
        rows.append(Row("round", params, "upload bytes/device", m["bytes_up"], "B",
                        "4 bytes per parameter", 4.0 * m["n_params"],
                        m["bytes_up"] / (4.0 * m["n_params"])))
        print(f"  n={n}: {json.dumps(m)}", file=sys.stderr)
    first = None
    for dim in dims[1:]:  # against d at fixed N: growth per parameter
        with tempfile.TemporaryDirectory(prefix="fedcart-bench-round-") as tmp:
            m = run_round(ns[0], n_items, dim, Path(tmp))
        params = {"n": ns[0], "V": n_items, "d": dim, "params": m["n_params"]}
        if first is None:
            first = m
            continue
        grown_mb = m["peak_rss_mb"] - first["peak_rss_mb"]
        added_model_mb = 4e-6 * (m["n_params"] - first["n_params"])
        rows.append(Row("round", params, "server RSS growth over d=" f"{dims[1]}", grown_mb,
                        "MB", "growth of one float32 model copy", added_model_mb,
                        grown_mb / added_model_mb))
        rows.append(Row("round", params, "upload bytes/device", m["bytes_up"], "B",
                        "4 bytes per parameter", 4.0 * m["n_params"],
                        m["bytes_up"] / (4.0 * m["n_params"])))
    return rows
