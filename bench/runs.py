"""runs: what a whole simulated run costs as the population N and the catalog V grow.

For each (N, V) of the grid, synthetic baskets (``fedcart-sim synth``: Zipf popularity and
basket shapes fitted to the bundled sets; never a quality claim) run through
``run_federated`` with the defaults a user gets, derived from N and V
(``fedcart.simulation.derived``), but only RUN_ROUNDS training rounds: the statistics
rounds, the training rounds and the evaluation rounds each run at least once. Reported per
cell: the whole run's wall time and its setup (devices created, the aggregator started),
the peak resident memory of the aggregator and of the largest worker, and for each round
kind its time and the bytes a device sends. Every figure is compared with the grid's first
cell, measured in the same run: the ratio says how the cost grows.

The central baselines are not part of it (``fedcart-sim baselines`` sizes them; their
budget is docs/performance.md's "Large data"). The 100,000-device cell takes about an hour
on 2 cores and is left to the command line (docs/performance.md has its run).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import Row
from fedcart.data.datasets import CsvColumns, load_csv
from fedcart.data.evaluation import make_split
from fedcart.simulation.federated import FederatedSettings, RunResult, run_federated
from fedcart.simulation.synth import COLUMNS, generate

RUN_ROUNDS = 2  # training rounds of each run: enough for every round kind to run
QUICK_GRID = ((300, 200),)
GRID = ((1_000, 1_000), (1_000, 10_000), (1_000, 50_000), (10_000, 1_000),
        (10_000, 10_000), (10_000, 50_000))


def run_cell(n_users: int, n_items: int, workdir: Path) -> RunResult:
    """One simulated run over ``n_users`` synthetic users and ``n_items`` items."""
    data = workdir / "baskets.csv.gz"
    generate(n_users, n_items, seed=0, out=data)
    user, time_col, item = COLUMNS
    split = make_split(load_csv(data, CsvColumns(user=user, item=item, time=time_col)))
    settings = FederatedSettings(rounds=RUN_ROUNDS, eval_every=RUN_ROUNDS)
    return run_federated(split, {}, settings, workdir / "run")


def _by_kind(result: RunResult) -> dict[str, tuple[float, float]]:
    """Each round kind's median (seconds, bytes up per device) over its completed rounds."""
    kinds: dict[str, tuple[float, float]] = {}
    for task in dict.fromkeys(r.task for r in result.rounds):
        done = [r for r in result.rounds if r.task == task and r.status == "completed"]
        if done:
            kinds[task] = (statistics.median(r.seconds for r in done),
                           statistics.median(r.bytes_up or 0.0 for r in done))
    return kinds


def _figures(result: RunResult) -> dict[str, tuple[float, str]]:
    """The cell's measured figures: name -> (value, unit)."""
    figures = {"whole run": (result.seconds, "s"), "setup": (result.setup_seconds, "s"),
               "aggregator peak memory": (result.server_peak_mb or 0.0, "MB"),
               "largest worker's peak memory": (max(result.worker_peak_mb, default=0.0),
                                                "MB")}
    for task, (seconds, up) in _by_kind(result).items():
        figures[f"{task} round"] = (seconds, "s")
        figures[f"{task} upload per device"] = (up / 1e6, "MB")
    return figures


def bench_runs(quick: bool) -> list[Row]:
    rows: list[Row] = []
    first: dict[str, float] = {}
    for n_users, n_items in QUICK_GRID if quick else GRID:
        with tempfile.TemporaryDirectory(prefix="fedcart-bench-runs-") as tmp:
            result = run_cell(n_users, n_items, Path(tmp))
        figures = _figures(result)
        print(f"  N={n_users} V={n_items}: {len(result.rounds)} rounds, "
              f"{result.seconds:.0f} s, interrupted={result.interrupted}", file=sys.stderr)
        if not first:
            first = {name: value for name, (value, _) in figures.items()}
            cell = f"the first cell (N={n_users}, V={n_items})"
        params = {"N": n_users, "V": n_items}
        for name, (value, unit) in figures.items():
            base = first.get(name)
            rows.append(Row("runs", params, name, value, unit, cell,
                            base if base is not None else float("nan"),
                            value / base if base else float("nan")))
    return rows
