"""The command lines as a user runs them: a CSV of one's own baskets through baselines and
central training, then the device recommending from the bundle it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from fedcart.edge_client.cli import main as device_main
from fedcart.model_export.evaluation import make_split
from fedcart.simulation.cli import main as sim_main
from tests.conftest import CSV_OPTS, synthetic_data


def test_baselines_on_a_csv_writes_json(basket_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = CliRunner().invoke(sim_main, ["baselines", "--data", str(basket_csv), *CSV_OPTS,
                                           "--json", str(out)])
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    expected = make_split(synthetic_data(n_users=60, n_items=30, seed=2))
    assert body["data"] == "shop.csv"
    assert (body["catalog"], body["queries"]) == (expected.n_items, len(expected.queries))
    names = [r["name"] for r in body["rows"]]
    assert names[0] == "popularity" and names[-1] == "own history (device only)"
    assert all(0.0 <= r[m] <= 1.0 for r in body["rows"] for m in ("hr@10", "ndcg@10", "mrr"))
    # 30 items, 2-6 per cart: co-occurrence must beat popularity on this clustered data
    by_name = {r["name"]: r["hr@10"] for r in body["rows"]}
    assert by_name["co-occurrence (cosine)"] > by_name["popularity"]


def test_missing_column_options_are_a_usage_error(basket_csv: Path) -> None:
    result = CliRunner().invoke(sim_main, ["baselines", "--data", str(basket_csv)])
    assert result.exit_code == 2
    assert "--user-col, --item-col, --time-col" in result.output


def test_unknown_column_is_reported(basket_csv: Path) -> None:
    result = CliRunner().invoke(sim_main, ["baselines", "--data", str(basket_csv),
                                           "--user-col", "nobody", "--item-col", "sku",
                                           "--time-col", "day"])
    assert result.exit_code == 1
    assert "missing column(s) ['nobody']" in result.output


def test_central_then_device_recommend(basket_csv: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "run" / "bundle"
    report = tmp_path / "run" / "central.json"
    result = CliRunner().invoke(sim_main, [
        "central", "--data", str(basket_csv), *CSV_OPTS, "--out", str(bundle),
        "--epochs", "3", "--dim", "8", "--lr", "5", "--json", str(report)])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(report.read_text())["rows"]}
    assert {"FedCart central + history", "FedCart central, global only",
            "popularity"} <= set(rows)
    public = tmp_path / "run" / "signing.pub"
    assert len(bytes.fromhex(public.read_text().strip())) == 32

    ok = CliRunner().invoke(device_main, ["recommend", "--bundle", str(bundle),
                                          "--public-key", str(public), "--cart", "i003,i004",
                                          "--history", "i005", "--k", "4"])
    assert ok.exit_code == 0, ok.output
    lines = [line.split() for line in ok.stdout.strip().splitlines()]
    assert len(lines) == 4
    assert not {"i003", "i004"} & {line[1] for line in lines}
    scores = [float(line[2]) for line in lines]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()

    unknown = CliRunner().invoke(device_main, ["recommend", "--bundle", str(bundle),
                                               "--public-key", str(public),
                                               "--cart", "i003,nope"])
    assert unknown.exit_code == 1 and "'nope'" in unknown.output

    stranger = "ab" * 32
    refused = CliRunner().invoke(device_main, ["recommend", "--bundle", str(bundle),
                                               "--public-key", stranger, "--cart", "i003"])
    assert refused.exit_code == 1 and "signature does not verify" in refused.output

    # a device created with the bundle its app ships with recommends before any round
    shipped = CliRunner().invoke(device_main, ["init", "--state", str(tmp_path / "dev"),
                                               "--server-key", str(public),
                                               "--bundle", str(bundle)])
    assert shipped.exit_code == 0, shipped.output
    assert len(bytes.fromhex(shipped.stdout.strip())) == 32
    offline = CliRunner().invoke(device_main, ["recommend", "--state", str(tmp_path / "dev"),
                                               "--cart", "i003,i004", "--k", "4"])
    assert offline.exit_code == 0, offline.output
    assert len(offline.stdout.strip().splitlines()) == 4
    both = CliRunner().invoke(device_main, ["recommend", "--state", str(tmp_path / "dev"),
                                            "--bundle", str(bundle), "--cart", "i003"])
    assert both.exit_code == 2 and "give --state, or --bundle" in both.output
    wrong_key = CliRunner().invoke(device_main, ["init", "--state", str(tmp_path / "dev2"),
                                                 "--server-key", stranger,
                                                 "--bundle", str(bundle)])
    assert wrong_key.exit_code == 1 and "not installed" in wrong_key.output


def test_central_refuses_an_existing_output(basket_csv: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(sim_main, ["central", "--data", str(basket_csv), *CSV_OPTS,
                                           "--out", str(tmp_path)])
    assert result.exit_code == 1 and "never overwritten" in result.output
