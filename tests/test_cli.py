"""The command lines as a user runs them: a CSV of one's own baskets through baselines and
central training, then the device recommending from the bundle it wrote; an operator's
fedcart-aggregator init from a catalog, its --help and --version, and serve's exit status."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fedcart
from fedcart.aggregator.cli import main as aggregator_main
from fedcart.aggregator.config import Preset, load_config
from fedcart.aggregator.process import AggregatorProcess
from fedcart.data.evaluation import make_split
from fedcart.edge_client.cli import main as device_main
from fedcart.model_export.bundle import read_bundle
from fedcart.simulation.cli import main as sim_main
from tests.conftest import CSV_OPTS, synthetic_data
from tests.test_service import CONFIG, make_world


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


# -- fedcart-aggregator ----------------------------------------------------------------------
CATALOG = """sku,title
a1,JUMBO BAG RED RETROSPOT
a2,JUMBO BAG PINK POLKADOT
b1,WHITE HANGING HEART T-LIGHT HOLDER
b2,RED HANGING HEART T-LIGHT HOLDER
c1,ALARM CLOCK BAKELIKE GREEN
c2,
"""
HEAVY = ("onnx", "onnxruntime", "pandas", "scipy", "dp_accounting")


def _catalog(tmp_path: Path, text: str = CATALOG, name: str = "catalog.csv.gz") -> Path:
    path = tmp_path / name
    path.write_bytes(gzip.compress(text.encode()))
    return path


def _recommend(state: Path, cart: str) -> list[tuple[str, float]]:
    result = CliRunner().invoke(device_main, [
        "recommend", "--bundle", str(state / "bundles" / "v00000000"),
        "--public-key", str(state / "signing.pub"), "--cart", cart, "--k", "3"])
    assert result.exit_code == 0, result.output
    return [(line.split()[1], float(line.split()[2]))
            for line in result.stdout.strip().splitlines()]


def test_init_from_a_catalog_alone_recommends_items_named_like_the_cart(
        tmp_path: Path) -> None:
    """No basket history: version 0 carries the names' neighbour table, so the first model a
    device gets ranks the items named like its cart's first, where it used to score all 0;
    config.toml is the DP preset, and init says so."""
    state = tmp_path / "agg"
    result = CliRunner().invoke(aggregator_main, [
        "init", "--state", str(state), "--catalog", str(_catalog(tmp_path)),
        "--id-col", "sku", "--name-col", "title", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "V=6, d=0" in result.output and "preset DP: mechanism gaussian" in result.output
    assert load_config(state / "config.toml") == Preset.DP.config()
    top = _recommend(state, "a1")
    assert top[0][0] == "a2" and top[0][1] > 0
    assert _recommend(state, "b1")[0][0] == "b2"
    bundle = read_bundle(state / "bundles" / "v00000000",
                         bytes.fromhex((state / "signing.pub").read_text().strip()))
    assert bundle.names[-1] == "c2"  # a row without a name is named by its id
    assert bundle.names[0] == "JUMBO BAG RED RETROSPOT"


def test_init_from_a_catalog_without_names_has_no_table(tmp_path: Path) -> None:
    state = tmp_path / "agg"
    result = CliRunner().invoke(aggregator_main, [
        "init", "--state", str(state), "--catalog", str(_catalog(tmp_path)),
        "--id-col", "sku", "--no-dp", "--dim", "4"])
    assert result.exit_code == 0, result.output
    assert "V=6, d=4" in result.output and "preset NO_DP: mechanism none" in result.output
    assert load_config(state / "config.toml") == Preset.NO_DP.config()
    assert all(score == 0 for _, score in _recommend(state, "a1"))
    bundle = read_bundle(state / "bundles" / "v00000000",
                         bytes.fromhex((state / "signing.pub").read_text().strip()))
    assert bundle.neighbours().ids.shape == (6, 1)  # the empty table, not 6 x K zeros


@pytest.mark.parametrize(("args", "text", "message"), [
    (["--catalog", "{tmp}/nothing.csv"], CATALOG, "nothing.csv: no such file"),
    (["--id-col", "item"], CATALOG, "missing column(s) ['item']"),
    (["--id-col", "sku", "--name-col", "name"], CATALOG, "missing column(s) ['name']"),
    (["--id-col", "sku"], CATALOG + "a1,again\nb1,again\n",
     "2 item id(s) listed more than once in sku, e.g. ['a1', 'b1']"),
    (["--id-col", "sku"], "sku\na1\n", "a catalog needs at least 2 items, it has 1"),
])
def test_a_bad_catalog_is_one_line(tmp_path: Path, args: list[str], text: str,
                                   message: str) -> None:
    catalog = _catalog(tmp_path, text)
    options = [a.format(tmp=tmp_path) for a in args]
    if "--catalog" not in options:
        options += ["--catalog", str(catalog)]
    result = CliRunner().invoke(aggregator_main, ["init", "--state", str(tmp_path / "agg"),
                                                  *options])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and message in result.output
    assert result.output.count("\n") == 1
    assert not (tmp_path / "agg").exists()


def test_init_takes_a_catalog_or_data_not_both(basket_csv: Path, tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    both = CliRunner().invoke(aggregator_main, ["init", "--state", str(tmp_path / "agg"),
                                                "--catalog", str(catalog), "--data", "uci"])
    neither = CliRunner().invoke(aggregator_main, ["init", "--state", str(tmp_path / "agg")])
    for result in (both, neither):
        assert result.exit_code == 2 and "give --catalog FILE" in result.output


def test_init_from_basket_data_still_works(basket_csv: Path, tmp_path: Path) -> None:
    state = tmp_path / "agg"
    result = CliRunner().invoke(aggregator_main, [
        "init", "--state", str(state), "--data", str(basket_csv), *CSV_OPTS, "--no-dp"])
    assert result.exit_code == 0, result.output
    assert "V=25" in result.output and "preset NO_DP" in result.output
    assert load_config(state / "config.toml").mechanism == "none"


def test_version() -> None:
    result = CliRunner().invoke(aggregator_main, ["--version"])
    assert result.exit_code == 0 and result.output == f"fedcart-aggregator, version " \
                                                      f"{fedcart.__version__}\n"


def test_help_loads_none_of_the_services_dependencies() -> None:
    """--help of the group and of every command answers without onnx, pandas, scipy or
    dp_accounting (a fresh interpreter, so no other test has loaded them)."""
    script = f"""
import sys
from click.testing import CliRunner
from fedcart.aggregator.cli import main
for args in (["--help"], *([name, "--help"] for name in main.commands)):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "Usage:" in result.output, (args, result.output)
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    control = subprocess.run([sys.executable, "-c", "import sys; import fedcart.aggregator."
                              "config; print('scipy' in sys.modules)"], capture_output=True,
                             text=True, timeout=60)
    assert control.stdout.strip() == "True"  # the check would see an eager import


def test_serve_exits_3_saying_so_when_the_budget_is_spent(tmp_path: Path) -> None:
    """The service stops itself when the next round would overspend: serve says so in its
    last line and exits 3 (0 is for SIGTERM and --max-rounds)."""
    state, devices = make_world(tmp_path)
    # z = 1.5 at q = 1: one round spends ~3.3 at delta 1e-5, two ~4.8: budget 4 allows one
    state.config.write_text(CONFIG.format(statistics="false", timeout=5.0, rounds=0).replace(
        "budget_epsilon = 1000.0", "budget_epsilon = 4.0"))
    server = AggregatorProcess(state.root)

    async def run() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=2, timeout=60)
                                      for d in devices[:5]))

    asyncio.run(run())
    assert server.wait() == 3, server.log()
    status = CliRunner().invoke(aggregator_main, ["status", "--state", str(state.root),
                                                  "--json"])
    spent = json.loads(status.stdout)["epsilon"]
    assert 0 < spent <= 4
    assert server.log().strip().splitlines()[-1].startswith(
        f"privacy budget spent: epsilon {spent:.4g} of 4 at delta 1e-05;")


def test_enroll_takes_several_keys_and_enrolls_none_if_one_is_bad(tmp_path: Path) -> None:
    from fedcart.aggregator.statedir import init_state
    from fedcart.aggregator.store import Store
    from fedcart.secagg.crypto import IdentityKey

    state = init_state(tmp_path / "agg", ["a", "b"], ["A", "B"], seed=0)
    keys = [IdentityKey.generate().public.hex() for _ in range(3)]
    bad = CliRunner().invoke(aggregator_main, [
        "enroll", "--state", str(state.root), "--device-key", keys[0], "--device-key", "00ff"])
    assert bad.exit_code == 1 and "Error:" in bad.output
    store = Store(state.database)
    assert store.enrolled() == 0  # the good key was not enrolled either
    store.close()
    args = [a for k in keys for a in ("--device-key", k)]
    ok = CliRunner().invoke(aggregator_main, ["enroll", "--state", str(state.root), *args])
    assert ok.exit_code == 0, ok.output
    assert ok.output.split() == ["1", "2", "3"]
    again = CliRunner().invoke(aggregator_main, ["enroll", "--state", str(state.root), *args])
    assert again.output.split() == ["1", "2", "3"]  # enrolling twice keeps the ids
