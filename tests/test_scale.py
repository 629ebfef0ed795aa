"""Large catalogs and populations: the O(V^2) baselines run over the most popular items that
fit and say so, a federated run that cannot fit is refused before it starts with the
figure and the flag that fits, the settings a run leaves unset follow its size, and the
synthetic generator's output loads and has the shape it claims."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedcart.aggregator.config import AggregatorConfig
from fedcart.aggregator.item_item import EASE_COPIES, StatisticsSettings
from fedcart.aggregator.rounds import Waits
from fedcart.data import baselines
from fedcart.data.datasets import CsvColumns, load_csv
from fedcart.data.evaluation import Split, evaluate, make_split
from fedcart.data.memory import AVAILABLE_ENV
from fedcart.protocol.statistics import POPULARITY, triangle_size
from fedcart.simulation import derived
from fedcart.simulation.central import baseline_rows
from fedcart.simulation.cli import main as sim_main
from fedcart.simulation.derived import (
    CONNECTED_SHARE,
    STATISTICS_BYTES,
    STATISTICS_COHORT,
    derive,
)
from fedcart.simulation.federated import FederatedSettings, aggregator_config
from fedcart.simulation.sizing import TooLarge, check_run, needs
from fedcart.simulation.synth import COLUMNS, Profile, generate

SYNTH_COLUMNS = CsvColumns(user=COLUMNS[0], item=COLUMNS[2], time=COLUMNS[1])
SYNTH_OPTS = ["--user-col", COLUMNS[0], "--item-col", COLUMNS[2], "--time-col", COLUMNS[1]]


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "baskets.csv.gz"
    generate(300, 120, seed=1, out=path)
    return path


@pytest.fixture(scope="module")
def split(synth_csv: Path) -> Split:
    return make_split(load_csv(synth_csv, SYNTH_COLUMNS))


def _basket_matrix(split: Split) -> np.ndarray:
    x = np.zeros((sum(len(b) for b in split.train), split.n_items))
    for row, basket in zip(x, split.training_baskets(), strict=True):
        row[basket] = 1.0
    return x


def _direct_ease(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    return np.eye(x.shape[1]) - p / np.diag(p)


def test_ease_over_the_whole_catalog_when_the_budget_covers_it(split: Split) -> None:
    v = split.n_items
    head = baselines.ease_head(split, budget=8 * EASE_COPIES * v * v)
    assert head.whole and head.note("EASE") is None and head.label("lambda 3") == "lambda 3"
    queries = list(split.queries)
    b = _direct_ease(_basket_matrix(split), 3.0)
    expected = np.vstack([b[q.cart].sum(axis=0) for q in queries])
    np.testing.assert_allclose(baselines.ease(split, 3.0, head)(queries), expected,
                               atol=1e-10)


def test_ease_under_a_small_budget_runs_over_the_most_popular_items(split: Split) -> None:
    k = 40
    head = baselines.ease_head(split, budget=8 * EASE_COPIES * k * k + 7)
    counts = baselines.basket_counts(split)
    assert len(head.items) == k and not head.whole
    assert counts[head.items].min() >= np.delete(counts, head.items).max()
    assert head.note("EASE") == (f"EASE over the 40 most popular items: the full catalog "
                                 f"({split.n_items}) needs {head.needed / 1e9:.1f} GB, the "
                                 f"budget is 0.0 GB")
    assert head.label("lambda 3") == "lambda 3, top 40 items"

    queries = list(split.queries)
    scores = baselines.ease(split, 3.0, head)(queries)
    outside = np.setdiff1d(np.arange(split.n_items), head.items)
    assert np.isneginf(scores[:, outside]).all()
    b = _direct_ease(_basket_matrix(split)[:, head.items], 3.0)
    at = {item: i for i, item in enumerate(head.items)}
    expected = np.vstack([b[[at[i] for i in q.cart if i in at]].sum(axis=0) for q in queries])
    np.testing.assert_allclose(scores[:, head.items], expected, atol=1e-10)


def test_cooccurrence_under_a_small_budget_runs_over_the_most_popular_items(
        split: Split) -> None:
    whole = baselines.cooccurrence_head(split, budget=1 << 40)
    assert whole.whole
    x = _basket_matrix(split)
    pop = x.sum(axis=0)
    cos = (x.T @ x) / np.sqrt(np.outer(pop, pop))
    np.fill_diagonal(cos, 0.0)
    queries = list(split.queries)
    expected = np.vstack([cos[q.cart].sum(axis=0) for q in queries])
    expected[expected <= 0] = -np.inf
    np.testing.assert_allclose(baselines.cooccurrence(split, whole)(queries), expected,
                               atol=1e-12)

    small = baselines.cooccurrence_head(split, budget=baselines.PAIR_BYTES * 30 * 30)
    assert 0 < len(small.items) <= 30 and not small.whole
    scores = baselines.cooccurrence(split, small)(queries)
    outside = np.setdiff1d(np.arange(split.n_items), small.items)
    assert np.isneginf(scores[:, outside]).all() and np.isfinite(scores).any()


def test_the_rows_name_the_cut(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AVAILABLE_ENV, str(2 * 8 * EASE_COPIES * 50 * 50))
    names = [row.name for row in baseline_rows(split, ease_lambda=3.0)]
    assert "EASE (lambda 3, top 50 items)" in names
    assert any(name.startswith("co-occurrence (cosine, top ") for name in names)
    monkeypatch.delenv(AVAILABLE_ENV)
    assert [row.name for row in baseline_rows(split, ease_lambda=3.0)][1:3] == [
        "co-occurrence (cosine)", "EASE (lambda 3)"]


def _wide_split(n_items: int) -> Split:
    """Three users over a catalog of ``n_items``: what the estimate reads."""
    basket = (np.arange(3, dtype=np.int64),)
    catalog = tuple(f"{i:05d}" for i in range(n_items))
    return Split(name="wide", catalog=catalog, names=catalog, users=("1", "2", "3"),
                 train=(basket, basket, basket), queries=())


def test_a_run_that_cannot_fit_is_refused_with_the_head_that_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    split = _wide_split(5000)
    big = FederatedSettings(head_items=4096)
    fitting = needs(FederatedSettings(head_items=2000).resolved(), 3, 5000).memory
    assert needs(big.resolved(), 3, 5000).memory > fitting
    monkeypatch.setenv(AVAILABLE_ENV, str(fitting))
    with pytest.raises(TooLarge, match=r"head of 4,096 need \d+\.\d GB at the peak of a round; "
                                       r"\d+\.\d GB available: use --head-items 2000 or fewer"):
        check_run(split, [big], print, with_baselines=False)
    check_run(split, [FederatedSettings(head_items=2000)], print, with_baselines=False)
    monkeypatch.setenv(AVAILABLE_ENV, str(10 << 20))
    with pytest.raises(TooLarge, match="no setting fits"):
        check_run(split, [FederatedSettings()], print, with_baselines=False)


def test_the_cli_refuses_up_front_in_one_line(synth_csv: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(sim_main, [
        "run", "--data", str(synth_csv), *SYNTH_OPTS, "--head-items", "4096",
        "--report", str(tmp_path / "report")], env={AVAILABLE_ENV: str(100 << 20)})
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "report").exists()
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "GB available" in error[0], result.output


def test_synthetic_baskets_load_and_have_the_profiles_shape(tmp_path: Path) -> None:
    path = tmp_path / "synth.csv.gz"
    made = generate(2000, 1000, seed=0, out=path)
    data = load_csv(path, SYNTH_COLUMNS)
    items = {item for baskets in data.users.values() for b in baskets for item in b}
    assert len(data.users) == made.users == 2000 and len(items) == made.items == 1000
    assert data.n_baskets == made.baskets
    sizes = [len(b) for baskets in data.users.values() for b in baskets]
    repeats = []
    for baskets in data.users.values():
        seen: set[str] = set()
        for i, basket in enumerate(baskets):
            if i:
                repeats.append(sum(item in seen for item in basket) / len(basket))
            seen.update(basket)
    target = Profile.UCI.value
    # with only 1,000 items, fresh draws often land in the history: the share runs high
    assert np.mean(sizes) == pytest.approx(target.mean_basket, rel=0.15)
    assert np.mean(repeats) == pytest.approx(target.repeat_rate, abs=0.08)


def test_the_synth_command_writes_what_the_loader_reads(tmp_path: Path) -> None:
    path = tmp_path / "s.csv.gz"
    result = CliRunner().invoke(sim_main, ["synth", "--users", "50", "--items", "40",
                                           "--out", str(path), "--like", "instacart"])
    assert result.exit_code == 0, result.output
    assert "50 users, 40 items bought" in " ".join(result.output.split())
    assert len(load_csv(path, SYNTH_COLUMNS).users) == 50
    help_text = CliRunner().invoke(sim_main, ["synth", "--help"]).output
    assert "never a quality claim" in help_text


def test_evaluation_batches_stay_within_their_budget(split: Split) -> None:
    from fedcart.data.evaluation import SCORES_BUDGET, batch_size

    assert batch_size(3644) == batch_size(13880) == 256
    assert 8 * 50_000 * batch_size(50_000) <= SCORES_BUDGET
    scorer = baselines.popularity(split)
    assert evaluate(scorer, split) == evaluate(scorer, split, batch=7)


def test_a_bundled_size_keeps_the_tuned_settings() -> None:
    """UCI's size (4,335 devices, 3,644 items): statistics over every device, the tuned
    head, evaluation at half the devices."""
    chosen = derive(FederatedSettings(), 4335, 3644)
    assert (chosen.settings.statistics_sampling_rate, chosen.settings.head_items,
            chosen.settings.evaluation_sampling_rate) == (1.0, 2000, 0.5)
    assert [c.option for c in chosen.choices] == ["--statistics-q", "--head-items", "--eval-q"]
    assert derive(FederatedSettings(), 100, 30).settings.head_items == 30  # at most V


@pytest.mark.parametrize("mechanism", ["none", "gaussian"])
def test_a_large_population_samples_its_statistics_and_sizes_its_head(
        monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    """100,000 devices of which the aggregator holds 25,000: the statistics rounds sample
    an expected STATISTICS_COHORT of them, and the head is the largest whose co-occurrence
    round stays within STATISTICS_BYTES (two values a word without DP)."""
    monkeypatch.setattr(derived, "connections", lambda n: min(n, 25_000))
    assert STATISTICS_COHORT <= CONNECTED_SHARE * 25_000  # the cohort, not the share, binds
    settings = FederatedSettings(mechanism=mechanism,
                                 epsilon=8.0 if mechanism == "gaussian" else None)
    chosen = derive(settings, 100_000, 50_000).settings
    assert chosen.statistics_sampling_rate == pytest.approx(STATISTICS_COHORT / 25_000)
    per_value = 2 if mechanism == "none" else 4  # bytes
    head = chosen.head_items
    assert head is not None
    cost = STATISTICS_COHORT * triangle_size(head) * per_value
    tuned = settings.resolved().head_items
    assert tuned is not None
    if STATISTICS_COHORT * triangle_size(tuned) * per_value <= STATISTICS_BYTES:
        assert head == tuned
    else:
        assert cost <= STATISTICS_BYTES * 1.0001 < STATISTICS_COHORT * triangle_size(
            head + 1) * per_value
    assert chosen.evaluation_sampling_rate == pytest.approx(2500 / 25_000)
    given = FederatedSettings(head_items=3000, statistics_sampling_rate=0.2,
                              evaluation_sampling_rate=0.3)
    kept = derive(given, 100_000, 50_000)
    assert (kept.settings.head_items, kept.settings.statistics_sampling_rate,
            kept.settings.evaluation_sampling_rate, kept.choices) == (3000, 0.2, 0.3, ())


def test_a_population_beyond_the_connections_never_gets_a_whole_population_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """8,000 devices, fewer than STATISTICS_COHORT, of which the aggregator holds 5,000: a
    statistics round at q = 1 could never start (rounds.Waits), so it samples half the
    connected; and C is bounded by the machine's cores."""
    monkeypatch.setattr(derived, "connections", lambda n: min(n, 5_000))
    chosen = derive(FederatedSettings(), 8_000, 3_000).settings
    assert chosen.statistics_sampling_rate == pytest.approx(CONNECTED_SHARE)
    assert derive(FederatedSettings(), 5_000, 3_000).settings.statistics_sampling_rate == 1.0
    monkeypatch.undo()
    cores = os.cpu_count() or 1
    assert derived.connections(10**7) <= derived.CONNECTIONS_PER_CORE * cores
    assert derived.connections(100) == 100
    # the aggregator the simulation configures holds C, not its open-file limit
    config = aggregator_config(derive(FederatedSettings(), 10**6, 100).settings, 10**6, 1e-9)
    assert config.capacity == config.min_connected == derived.connections(10**6)


def test_a_whole_population_round_beyond_capacity_says_it_cannot_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """population_share of the enrolled devices above the connections the aggregator holds:
    the round does not start, and the log says it never can and what to change."""
    config = AggregatorConfig(statistics=StatisticsSettings(sampling_rate=1.0),
                              population_share=0.9)
    waits = Waits(config, capacity=100)
    with caplog.at_level(logging.ERROR, logger="fedcart.aggregator"):
        assert not waits.population_ready(POPULARITY, 1.0, 100, lambda: 1000)
    assert "needs 900 connections" in caplog.text and "cannot start" in caplog.text
    assert "sampling_rate below 1" in caplog.text
    assert Waits(config, capacity=1000).population_ready(POPULARITY, 1.0, 900, lambda: 1000)
