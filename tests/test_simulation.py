"""fedcart-sim run and sweep as a data scientist runs them: a CSV given by path, the real
aggregator process and one device per user, the report, and the report rendered by a real
browser (headless Chromium, driven over the DevTools protocol with websockets)."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.asyncio.client import connect

from fedcart.aggregator.config import load_config
from fedcart.aggregator.privacy import default_delta
from fedcart.model_export.model import group_size
from fedcart.simulation.cli import main as sim_main
from fedcart.simulation.report import PLOTS
from tests.conftest import CSV_OPTS, write_basket_csv
from tests.process_owner import ProcessOwner

FAST = ["--dim", "8", "--clients-per-round", "30", "--secagg-k", "20", "--no-central"]


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(sim_main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def csv_report(tmp_path_factory) -> Path:
    """One DP run on a CSV of another retailer, given by path and column options."""
    tmp = tmp_path_factory.mktemp("sim")
    csv = write_basket_csv(tmp / "shop.csv")
    report = tmp / "report"
    output = run_cli("run", "--data", str(csv), *CSV_OPTS, "--rounds", "3", "--dropout",
                     "0.2", "--epsilon", "4", *FAST, "--report", str(report), "--json",
                     str(tmp / "m.json"))
    (tmp / "output.txt").write_text(output)
    return report


def test_output_that_is_not_a_terminal_gets_a_line_a_round(csv_report: Path) -> None:
    """A log file shows progress too: one line per round, in the order they ran."""
    output = (csv_report.parent / "output.txt").read_text()
    (run,) = json.loads((csv_report / "metrics.json").read_text())["runs"]
    said = [line.split(": round ", 1)[1].split(",")[0] for line in output.splitlines()
            if ": round " in line]
    assert said == [f"{r['round']} ({r['task']}) {r['status']}" for r in run["rounds"]]


def test_a_run_on_a_csv_goes_through_secagg_and_dp(csv_report: Path) -> None:
    metrics = json.loads((csv_report / "metrics.json").read_text())
    assert metrics["data"]["devices"] == 60 and len(metrics["data"]["sha256"]) == 64
    (run,) = metrics["runs"]
    completed = [r for r in run["rounds"] if r["status"] == "completed"]
    assert not run["interrupted"]
    # the two statistics rounds, then the three training rounds asked for, the model the
    # statistics gave and the last trained one evaluated on the devices
    assert [r["task"] for r in completed] == ["popularity", "cooccurrence", "evaluate",
                                              *["train"] * 3, "evaluate"]
    for r in completed:
        assert 3 <= r["survivors"] <= r["sampled"]
        assert set(r["phase_seconds"]) >= {"ADVERTISE", "SHARE", "MASKED", "UNMASK"}
    # one masked vector each: the catalog's popularity, the head's co-occurrence triangle,
    # and the trained groups' values (under DP by default the blend's four), each plus the
    # weight word
    catalog, head = metrics["data"]["catalog"], run["settings"]["head_items"]
    popularity, cooccurrence = completed[:2]
    training = [r for r in completed if r["task"] == "train"]
    evaluations = [r for r in completed if r["task"] == "evaluate"]
    assert 4 * (catalog + 1) < popularity["bytes_up"] < 4 * (catalog + 1) + 20_000
    assert cooccurrence["bytes_up"] > 4 * (min(head, catalog) * (min(head, catalog) + 1) // 2)
    trained = group_size(run["settings"]["train_groups"], catalog, run["settings"]["dim"])
    assert all(4 * trained < r["bytes_up"] < 4 * trained + 20_000 for r in training)
    assert all(4 * 8 < r["bytes_up"] < 4 * 8 + 20_000 for r in evaluations)
    assert popularity["model_version"] == 0 and cooccurrence["model_version"] == 1
    # the ledger charges every round, the statistics and evaluations included, and spends at
    # most the target
    epsilons = [r["epsilon"] for r in completed]
    assert epsilons[0] > 0 and all(a < b for a, b in itertools.pairwise(epsilons))
    assert epsilons[-1] <= 4.004
    # an evaluation round publishes nothing; its estimate, of the version it scored, has an
    # interval around it, and the central figure of the same quantity is beside it
    assert [r["model_version"] for r in evaluations] == [1, training[-1]["model_version"]]
    for r in evaluations:
        assert r["estimate"]["model_version"] == r["model_version"]
        for metric in ("hr", "ndcg", "mrr"):
            interval = r["estimate"][metric]
            assert interval["low"] <= interval["value"] <= interval["high"], (metric, r)
            assert 0 <= r["central_estimate"][metric] <= 1
        assert 0 < r["central_estimate"]["queries"] <= 60
    assert run["noise_multiplier"] > 0 and run["delta"] == default_delta(60)
    assert 60 * run["delta"] <= 0.01
    # the model the statistics gave is evaluated, and the last trained one
    assert cooccurrence["hr"] is not None and training[-1]["hr"] is not None
    assert training[-1]["hr_global"] is not None
    names = [r["name"] for r in metrics["baselines"]]
    assert names[:2] == ["popularity", "co-occurrence (cosine)"]
    # the configuration the aggregator ran with, so the run can be repeated
    assert run["aggregator_config"]["mechanism"] == "gaussian"
    assert run["aggregator_config"]["population"] == 60


def test_without_sampling_or_noise_the_estimate_is_the_central_figure(basket_csv: Path,
                                                                     tmp_path: Path) -> None:
    """No DP, q = 1, no dropout: every device scores every evaluated version, and each
    estimate is the central figure computed from the same baskets."""
    report = tmp_path / "exact"
    run_cli("run", "--data", str(basket_csv), *CSV_OPTS, "--no-dp", "--q", "1", "--dropout",
            "0", "--rounds", "1", "--eval-every", "1", "--no-statistics", "--dim", "8",
            "--secagg-k", "20", "--no-baselines", "--no-central", "--report", str(report))
    (run,) = json.loads((report / "metrics.json").read_text())["runs"]
    evaluations = [r for r in run["rounds"] if r["task"] == "evaluate"]
    assert [(r["status"], r["model_version"]) for r in evaluations] == [("completed", 0),
                                                                       ("completed", 1)]
    for r in evaluations:
        estimate, central = r["estimate"], r["central_estimate"]
        assert estimate["queries"] == pytest.approx(central["queries"], abs=1e-6)
        # exact up to the fixed-point rounding, which the interval (a few 1e-6 wide) counts
        for metric in ("hr", "repeat_hr", "ndcg", "mrr"):
            interval = estimate[metric]
            assert interval["value"] == pytest.approx(central[metric], abs=1e-6), metric
            assert interval["high"] - interval["low"] < 1e-4
    assert ("2 of 2 estimates hold the central figure within their 95% interval for "
            "HitRate@10 (2 of 2 for NDCG@10, 2 of 2 for MRR)") in (report / "report.md").read_text()


def test_report_files_and_tables(csv_report: Path) -> None:
    assert {p.name for p in csv_report.iterdir()} >= {"index.html", "report.md",
                                                        "metrics.json", "config.toml", *PLOTS}
    # the configuration the aggregator served with, linked, and one an operator can load
    config = load_config(csv_report / "config.toml")
    assert config.mechanism == "gaussian" and config.population == 60
    assert '<a href="config.toml">' in (csv_report / "index.html").read_text()
    md = (csv_report / "report.md").read_text()
    for row in ("popularity", "co-occurrence (cosine)", "own history (device only)",
                "federated, SecAgg, DP eps=4"):
        assert f"| {row} |" in md
    # the values derived from the data's size (derived.py), each with its reason
    sizing = md[md.index("## Sizing"):md.index("## Configuration")]
    for option in ("--statistics-q | 1 | every device", "--eval-q |"):
        assert f"| federated, SecAgg, DP eps=4 | {option}" in sizing
    repeat = next(line for line in md.splitlines() if "Repeat with:" in line)
    assert "fedcart-sim run --data" in repeat
    assert "--validation" not in repeat  # a flag left off is not in the command
    assert not list(csv_report.glob(".*.tmp*"))  # every file was renamed into place


def test_sweep_writes_one_report_with_a_row_per_epsilon(basket_csv: Path,
                                                         tmp_path: Path) -> None:
    report = tmp_path / "sweep"
    run_cli("sweep", "--data", str(basket_csv), *CSV_OPTS, "--rounds", "2",
            "--epsilons", "2,8", "--no-baselines", "--dropout", "0", *FAST,
            "--report", str(report))
    metrics = json.loads((report / "metrics.json").read_text())
    names = [r["name"] for r in metrics["runs"]]
    assert names == ["federated, SecAgg, no DP", "federated, SecAgg, DP eps=2",
                     "federated, SecAgg, DP eps=8"]
    no_dp, low, high = metrics["runs"]
    assert no_dp["noise_multiplier"] is None
    assert low["noise_multiplier"] > high["noise_multiplier"] > 0  # less epsilon, more noise
    for run in metrics["runs"]:
        assert sum(r["status"] == "completed" and r["task"] == "train"
                   for r in run["rounds"]) == 2


def test_bad_options_are_clear_errors(basket_csv: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(sim_main, ["run", "--data", str(basket_csv), *CSV_OPTS,
                                      "--no-dp", "--epsilon", "3", "--report",
                                      str(tmp_path / "r")])
    assert result.exit_code != 0 and "--no-dp excludes" in result.output
    result = runner.invoke(sim_main, ["sweep", "--data", str(basket_csv), *CSV_OPTS,
                                      "--epsilons", "2,x", "--report", str(tmp_path / "r")])
    assert result.exit_code != 0 and "not a list of numbers" in result.output
    assert not (tmp_path / "r").exists()


async def _images_in_chromium(page: Path, processes: ProcessOwner) -> list[dict]:
    """Open ``page`` in headless Chromium and return every <img> with its load state."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is missing: make test installs it"
    with tempfile.TemporaryDirectory() as profile:
        proc = processes.popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            endpoint = ""
            for line in proc.stderr:
                if "DevTools listening on" in line:
                    endpoint = line.split("DevTools listening on", 1)[1].strip()
                    break
            assert endpoint, "Chromium did not open its DevTools endpoint"
            async with connect(endpoint, max_size=None) as ws:
                counter = 0

                async def call(method: str, session: str | None = None, **params) -> dict:
                    nonlocal counter
                    counter += 1
                    message = {"id": counter, "method": method, "params": params}
                    if session:
                        message["sessionId"] = session
                    await ws.send(json.dumps(message))
                    while True:
                        reply = json.loads(await ws.recv())
                        if reply.get("id") == counter:
                            assert "error" not in reply, reply
                            return reply["result"]

                target = await call("Target.createTarget", url=page.as_uri())
                session = (await call("Target.attachToTarget", targetId=target["targetId"],
                                      flatten=True))["sessionId"]
                script = ("location.href !== " + json.dumps(page.as_uri()) + " ? null : "
                          "new Promise(r => { const done = () => r(JSON.stringify("
                          "Array.from(document.images).map(i => ({src: i.getAttribute('src'),"
                          " complete: i.complete, width: i.naturalWidth, height: "
                          "i.naturalHeight})))); document.readyState === 'complete' ? "
                          "done() : window.addEventListener('load', done); })")
                for _ in range(50):
                    result = await call("Runtime.evaluate", session, expression=script,
                                        awaitPromise=True, returnByValue=True)
                    if result["result"].get("value") is not None:
                        return json.loads(result["result"]["value"])
                    await asyncio.sleep(0.1)
                raise AssertionError("the page never finished loading")
        finally:
            processes.kill(proc)  # with the renderers and helpers in its process group


def test_report_renders_in_chromium_with_every_plot(csv_report: Path,
                                                     processes: ProcessOwner) -> None:
    images = asyncio.run(_images_in_chromium(csv_report / "index.html", processes))
    assert sorted(i["src"] for i in images) == sorted(PLOTS)
    for image in images:
        assert image["complete"] and image["width"] > 300 and image["height"] > 150, image
