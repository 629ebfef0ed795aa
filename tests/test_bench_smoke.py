"""The benchmark suite's quick grid runs, agrees with its baselines' results (each bench
asserts that before timing), and writes rows of the documented shape. No timing is checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.__main__ import main

FIELDS = {"bench", "params", "metric", "value", "unit", "baseline", "baseline_value", "ratio"}


def test_quick_bench_writes_every_row(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"recommend", "train", "prg", "secagg", "groups",
                                            "round", "population", "scale", "runs"}
    for row in rows:
        assert set(row) == FIELDS
        assert math.isfinite(row["value"]) and math.isfinite(row["ratio"])
        # a growth or a count of failed groups or refused check-ins may be zero; times,
        # rates, sizes not
        if not any(w in row["metric"] for w in ("growth", "failed", "refused")):
            assert row["value"] > 0
    refused = [r for r in rows if r["metric"] == "refused check-ins"]
    assert refused and all(r["value"] == 0 for r in refused)
    # a whole run: every round kind ran and its devices uploaded something
    kinds = {r["metric"] for r in rows if r["bench"] == "runs"}
    for task in ("popularity", "cooccurrence", "train", "evaluate"):
        assert {f"{task} round", f"{task} upload per device"} <= kinds
    assert "| recommend |" in capsys.readouterr().out
