"""``python -m bench [NAME ...] [--quick] [--json FILE]``: run benchmarks, print markdown
tables, write the rows as JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import onnxruntime

from bench import model, secagg
from bench.common import markdown_table
from bench.population import bench_population
from bench.round import bench_round
from bench.runs import bench_runs
from bench.scale import bench_scale

BENCHES = {"recommend": model.bench_recommend, "train": model.bench_train,
           "prg": secagg.bench_prg, "secagg": secagg.bench_secagg,
           "groups": secagg.bench_groups, "round": bench_round,
           "population": bench_population, "scale": bench_scale, "runs": bench_runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHES], metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid that runs in seconds (the test suite's smoke run)")
    parser.add_argument("--json", type=Path, help="write every row to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for name in args.names or list(BENCHES):
        started = time.monotonic()
        result = BENCHES[name](args.quick)
        print(f"\n## {name} ({time.monotonic() - started:.0f} s)\n")
        print(markdown_table(result))
        rows += result
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"python": platform.python_version(), "cpu": platform.processor(),
                        "onnxruntime": onnxruntime.__version__},
            "rows": [r.as_json() for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
