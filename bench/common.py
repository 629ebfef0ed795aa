"""Rows, timing and tables shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured figure and the baseline it is compared with (ratio = baseline/value
    for times, value/baseline for rates: above 1 means better than the baseline)."""

    bench: str
    params: dict[str, Any]
    metric: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def seconds_per_call(func: Callable[[], object], min_time: float = 0.3,
                     repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time per call in a loop of >= ``min_time``."""
    func()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            func()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / repeats:
            break
        loops *= 2
    samples = [elapsed / loops]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(loops):
            func()
        samples.append((time.perf_counter() - start) / loops)
    return statistics.median(samples)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| bench | params | metric | value | baseline | baseline value | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        lines.append(f"| {r.bench} | {params} | {r.metric} | {r.value:.4g} {r.unit} | "
                     f"{r.baseline} | {r.baseline_value:.4g} {r.unit} | {r.ratio:.2f}x |")
    return "\n".join(lines)
