"""The simulation report, built from a synthetic run shaped exactly as ``fedcart-sim run``
records one (the real FederatedSettings, RoundRecord, RunResult, Estimate and aggregator
configuration): statistics, training and evaluation rounds kept apart, the privacy budget
split, the federated estimates against the central figures, the deployable config.toml, and
figures whose labels and legends are readable (no two text boxes overlap, no legend covers
data)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from fedcart.aggregator.config import load_config, render_config
from fedcart.aggregator.privacy import default_delta
from fedcart.protocol.evaluation import Estimate, Interval
from fedcart.protocol.terms import Task
from fedcart.simulation.derived import derive
from fedcart.simulation.federated import (
    FederatedSettings,
    RoundRecord,
    RunResult,
    aggregator_config,
)
from fedcart.simulation.report import (
    PLOTS,
    PRIVACY_PLOTS,
    budget_splits,
    delta_warning,
    figures,
    write_report,
)

N = 200
CATALOG = 4000
PHASES = {"ADVERTISE": 0.4, "SHARE": 1.1, "MASKED": 3.0, "UNMASK": 0.8}
# baselines whose HitRate@10 lie within 0.005 of each other: in-plot labels would collide
BASELINES = [("popularity", 0.1431), ("co-occurrence (cosine)", 0.1452),
             ("EASE (lambda 500)", 0.1470), ("own history (device only)", 0.1210),
             ("central training", 0.1466)]


def _round(round_id: int, task: Task, epsilon: float, *, status: str = "completed",
           hr: float | None = None, values: int = 5) -> RoundRecord:
    return RoundRecord(
        round=round_id, task=task, status=status, model_version=round_id, sampled=30,
        survivors=27 if status == "completed" else None, dropped=3, seconds=5.3,
        phase_seconds=dict(PHASES), epsilon=epsilon, elapsed=5.3 * round_id, hr=hr,
        ndcg=None if hr is None else hr / 2, mrr=None if hr is None else hr / 3,
        hr_global=None if hr is None else hr - 0.01,
        bytes_up=None if status != "completed" else 4.0 * values + 2_500,
        bytes_down=None if status != "completed" else 60_000.0, values=values)


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """An evaluation round's estimate of HitRate@10 (NDCG@10: half of it, MRR: a third,
    with a wider interval) and the central figure it is set against."""

    version: int
    hr: float
    low: float
    high: float
    central: float


# the model the statistics gave (round 3) and the last trained one (round 8): in the DP
# run the latter's HitRate@10 and NDCG@10 intervals miss the central figure, its MRR's holds
NO_DP_EVALUATIONS = (Evaluated(1, 0.130, 0.110, 0.150, 0.131),
                     Evaluated(4, 0.146, 0.130, 0.160, 0.1449))
DP_EVALUATIONS = (Evaluated(1, 0.125, 0.100, 0.150, 0.131),
                  Evaluated(4, 0.160, 0.150, 0.170, 0.1449))


def _evaluation(round_id: int, epsilon: float, evaluated: Evaluated) -> RoundRecord:
    def interval(scale: float, widen: float = 0.0) -> Interval:
        return Interval(evaluated.hr * scale, evaluated.low * scale - widen,
                        evaluated.high * scale + widen)

    hr = interval(1.0)
    estimate = Estimate(evaluated.version, 27.3, hr, interval(0.5), interval(1 / 3, 0.02),
                        hr, hr, noise_std=0.4, sampling_rate=0.15)
    record = _round(round_id, Task.EVALUATE, epsilon, values=8)
    record.model_version = evaluated.version
    record.estimate = estimate.to_json()
    record.central_estimate = {"hr": evaluated.central, "ndcg": evaluated.central / 2,
                               "mrr": evaluated.central / 3, "repeat_hr": 0.4, "queries": 180}
    return record


def _run(settings: FederatedSettings, epsilons: list[float],
         evaluations: tuple[Evaluated, Evaluated], *,
         config_file: str | None = None) -> dict[str, Any]:
    """--rounds 3 with --eval-every 5: popularity, co-occurrence, an evaluation round, a
    failed training round, then the three training rounds asked for and an evaluation
    round; the published models evaluated centrally after the statistics and at the last
    training round (two points)."""
    delta = default_delta(N)
    rounds = [_round(1, Task.POPULARITY, epsilons[0], values=CATALOG + 1),
              _round(2, Task.COOCCURRENCE, epsilons[1], hr=0.131, values=2_001_001),
              _evaluation(3, epsilons[2], evaluations[0]),
              _round(4, Task.TRAIN, epsilons[2], status="failed"),
              _round(5, Task.TRAIN, epsilons[3]),
              _round(6, Task.TRAIN, epsilons[4]),
              _round(7, Task.TRAIN, epsilons[5], hr=0.1449),
              _evaluation(8, epsilons[6], evaluations[1])]
    chosen = derive(settings, N, CATALOG)  # as run_federated records them
    settings = chosen.settings
    result = RunResult(settings, dataclasses.asdict(aggregator_config(settings, N, delta)),
                       N, delta, 1.2, rounds=rounds, seconds=40.0,
                       derived=[dataclasses.asdict(c) for c in chosen.choices])
    run = result.as_json()
    if config_file is not None:
        run["config_file"] = config_file
    return run


def _report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tool": "fedcart-sim", "command": "fedcart-sim run --data uci --rounds 3",
        "created": "2026-12-03T21:00:00+0000",
        "data": {"name": "uci", "sha256": "0" * 64, "devices": N, "catalog": CATALOG,
                 "queries": 180},
        "model": {"dim": 16, "parameters": 2 * CATALOG * 16 + CATALOG + 4},
        "baselines": [{"name": name, "hr@10": hr, "ndcg@10": hr / 2, "mrr": hr / 3}
                      for name, hr in BASELINES[:-1]],
        "central": [{"name": BASELINES[-1][0], "hr@10": BASELINES[-1][1],
                     "ndcg@10": 0.07, "mrr": 0.05}],
        "runs": runs,
    }


DP = FederatedSettings(rounds=3, mechanism="gaussian", epsilon=8.0, clients_per_round=30)
NO_DP = FederatedSettings(rounds=3, clients_per_round=30)
# after popularity, co-occurrence, an evaluation, 3 trainings and an evaluation
DP_EPSILONS = [5.1, 7.19, 7.3, 7.6, 7.85, 7.95, 7.999]


CONFIG_FILES = {"config-no-dp.toml": NO_DP, "config-eps-8.toml": DP}


@pytest.fixture
def sweep_report() -> dict[str, Any]:
    """A no-DP run and a DP run at epsilon 8 whose statistics rounds spend 7.19 of it."""
    return _report([_run(NO_DP, [0.0] * 7, NO_DP_EVALUATIONS, config_file="config-no-dp.toml"),
                    _run(DP, DP_EPSILONS, DP_EVALUATIONS, config_file="config-eps-8.toml")])


@pytest.fixture
def written(tmp_path: Path, sweep_report: dict[str, Any]) -> Path:
    """The report directory, with each run's config.toml as the CLI copies it in."""
    for name, settings in CONFIG_FILES.items():
        (tmp_path / name).write_text(
            render_config(aggregator_config(derive(settings, N, CATALOG).settings, N,
                                            default_delta(N))))
    write_report(tmp_path, sweep_report)
    return tmp_path


# --- the figures ---------------------------------------------------------------------------

def _texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text the figure draws: titles, axis labels, legend entries
    and titles, annotations, and the tick labels inside each axis' view (matplotlib keeps
    labels for ticks outside it, but does not draw them)."""
    ticks = [tick for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks())]
    tick_labels = {id(label) for tick in ticks for label in (tick.label1, tick.label2)}
    drawn_tick_labels = [label for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                         for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks())
                         if _in_view(axis, tick.get_loc())
                         for label in (tick.label1, tick.label2)]
    texts = [t for t in fig.findobj(Text) if id(t) not in tick_labels] + drawn_tick_labels
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _in_view(axis: Axis, location: float | None) -> bool:
    low, high = sorted(axis.get_view_interval())
    span = high - low
    return location is not None and low - 1e-9 * span <= location <= high + 1e-9 * span


def _drawn(fig: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays out (constrained layout) and places every text
    return canvas


def _text_boxes(fig: Figure) -> list[tuple[str, Bbox]]:
    renderer = _drawn(fig).get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _texts(fig)]
    return [(text, box) for text, box in boxes if box.width > 0 and box.height > 0]


def _overlapping_texts(fig: Figure) -> list[tuple[str, str]]:
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(_text_boxes(fig), 2)
            if box_a.overlaps(box_b)]


def _cut_off_texts(fig: Figure) -> list[str]:
    """Texts that reach past the figure's edge, where the saved PNG cuts them off."""
    edge = fig.bbox.padded(0.5)  # half a pixel for rounding
    return [text for text, box in _text_boxes(fig)
            if not (edge.contains(box.x0, box.y0) and edge.contains(box.x1, box.y1))]


def _data_points(ax: Axes) -> list[tuple[float, float]]:
    """Display coordinates of every plotted point and bar corner of ``ax``."""
    points = []
    for line in ax.get_lines():
        xy = np.asarray(line.get_xydata())
        if len(xy):
            points += [tuple(p) for p in line.get_transform().transform(xy)
                       if all(map(math.isfinite, p))]
    for patch in ax.patches:
        box = patch.get_window_extent()
        points += [(box.x0, box.y1), (box.x1, box.y1), (box.x0, box.y0), (box.x1, box.y0)]
    return points


def _legend_covers_data(ax: Axes) -> bool:
    legend = ax.get_legend()
    if legend is None:
        return False
    box: Bbox = legend.get_window_extent()
    if not box.overlaps(ax.get_window_extent()):
        return False  # outside the axes: it covers nothing plotted
    return any(box.contains(x, y) for x, y in _data_points(ax))


@pytest.mark.parametrize("which", ["sweep", "dp only", "no dp only"])
def test_no_two_labels_overlap_and_no_legend_covers_data(which: str,
                                                           sweep_report: dict[str, Any]) -> None:
    runs = {"sweep": sweep_report["runs"], "dp only": sweep_report["runs"][1:],
            "no dp only": sweep_report["runs"][:1]}[which]
    drawn = figures({**sweep_report, "runs": runs})
    try:
        expected = set(PLOTS) - (PRIVACY_PLOTS if which == "no dp only" else set())
        assert set(drawn) == expected
        for name, fig in drawn.items():
            assert _overlapping_texts(fig) == [], name
            assert _cut_off_texts(fig) == [], name
            for ax in fig.axes:
                assert not _legend_covers_data(ax), (name, ax.get_title())
    finally:
        for fig in drawn.values():
            plt.close(fig)


def test_the_checks_find_overlapping_and_cut_off_labels() -> None:
    """The checks above would fail on the old quality plot's in-plot baseline labels, on a
    legend drawn over the lines, and on a label longer than the figure is wide."""
    fig, ax = plt.subplots()
    try:
        ax.plot([1, 2, 3], [0.1, 0.2, 0.3], label="run")
        for name, hr in BASELINES:
            ax.annotate(f"{name} {hr:.3f}", (1.0, hr), xycoords=("axes fraction", "data"))
        ax.legend(loc="center")
        ax.set_xlabel("round " * 40)
        assert _overlapping_texts(fig)
        assert _legend_covers_data(ax)
        assert _cut_off_texts(fig)
    finally:
        plt.close(fig)


def test_every_run_gets_time_and_bytes_panels_in_readable_units(
        sweep_report: dict[str, Any]) -> None:
    drawn = figures(sweep_report)
    try:
        for name in ("time.png", "bytes.png"):
            titles = [ax.get_title() for ax in drawn[name].axes]
            assert [t.split(":")[0] for t in titles] == [r["name"]
                                                        for r in sweep_report["runs"]]
        _drawn(drawn["bytes.png"])
        labels = {t.get_text() for ax in drawn["bytes.png"].axes
                  for t in ax.get_yticklabels() if t.get_text()}
        assert labels and all(label.endswith((" B", " kB", " MB")) for label in labels)
        assert "1 MB" in labels  # the co-occurrence round's 8 MB is on a labelled decade
    finally:
        for fig in drawn.values():
            plt.close(fig)


def test_quality_plot_marks_the_statistics_rounds_and_sparse_evaluations(
        sweep_report: dict[str, Any]) -> None:
    drawn = figures(sweep_report)
    try:
        ax = drawn["quality.png"].axes[0]
        legend = ax.get_legend()
        assert legend is not None
        labels = [t.get_text() for t in legend.get_texts()]
        assert "statistics rounds (popularity, co-occurrence)" in labels
        assert "model of the statistics rounds" in labels
        assert all(f"{name}: {hr:.3f}" in labels for name, hr in BASELINES)
        assert "every 5th training round and the last" in ax.get_title()
        runs = [line for line in ax.get_lines() if str(line.get_label()).startswith("federated")]
        # one training evaluation each: a marker, not a line through nothing
        assert runs and all(line.get_linestyle() == "None" for line in runs)
    finally:
        for fig in drawn.values():
            plt.close(fig)


# --- the privacy budget --------------------------------------------------------------------

def test_budget_split_charges_statistics_training_and_evaluation(
        sweep_report: dict[str, Any]) -> None:
    (split,) = budget_splits(sweep_report)  # the no-DP run spends nothing and has no row
    assert split.budget == 8.0 and split.training_rounds == 3
    assert split.evaluation_rounds == 2
    assert split.spent[Task.POPULARITY] == pytest.approx(5.1)
    assert split.spent[Task.COOCCURRENCE] == pytest.approx(2.09)
    assert split.statistics == pytest.approx(7.19)
    assert split.spent[Task.TRAIN] == pytest.approx(7.95 - 7.3)  # the failed round: 0
    assert split.spent[Task.EVALUATE] == pytest.approx((7.3 - 7.19) + (7.999 - 7.95))
    assert split.total == pytest.approx(7.999)


def test_a_fixed_noise_multiplier_has_no_budget_line(tmp_path: Path) -> None:
    fixed = FederatedSettings(rounds=3, mechanism="gaussian", noise_multiplier=1.0,
                              clients_per_round=30)
    report = _report([_run(fixed, DP_EPSILONS, DP_EVALUATIONS)])
    (split,) = budget_splits(report)
    assert split.budget is None
    drawn = figures(report)
    try:
        legend = drawn["epsilon.png"].axes[0].get_legend()
        assert legend is not None
        assert not any(t.get_text().startswith("budget") for t in legend.get_texts())
    finally:
        for fig in drawn.values():
            plt.close(fig)
    page = write_report(tmp_path, report).read_text()
    assert "<td>90% of the total</td>" in page


def test_delta_warning_at_the_cap() -> None:
    assert delta_warning(default_delta(N), N) is None
    issue = delta_warning(1 / N ** 1.1, N)  # 2.9e-3 at N = 200: N delta = 0.59
    assert issue is not None and "N delta = 0.59" in issue and "1 / (100 N)" in issue
    worse = delta_warning(2 / N, N)
    assert worse is not None and "expected to fail for at least one user" in worse


def test_report_warns_about_a_large_delta(tmp_path: Path) -> None:
    run = _run(DP, DP_EPSILONS, DP_EVALUATIONS)
    run["delta"] = 1 / N ** 1.1  # the aggregator refuses it; a report of older metrics shows it
    report = _report([run])
    page = write_report(tmp_path, report).read_text()
    assert 'class="warning"' in page and "N delta = 0.59" in page
    assert "**Warning:**" in (tmp_path / "report.md").read_text()


# --- the pages -----------------------------------------------------------------------------

def test_index_separates_statistics_from_training(written: Path) -> None:
    page = (written / "index.html").read_text()
    assert "--rounds N counts training rounds" in page
    assert page.count('<table class="statistics">') == 2  # one per run
    assert page.count('<table class="training">') == 2
    assert "Statistics rounds (popularity, then co-occurrence): rounds 1-2" in page
    assert "Training rounds (--rounds 3): rounds 4-7" in page
    # training rounds numbered as --rounds counts them: the failed one is not one of them
    assert [row[:2] for row in _table_rows(page, "training", 1)] == [
        ["4", "-"], ["5", "1"], ["6", "2"], ["7", "3"]]
    # evaluation rounds by the version they scored, with the estimate and the central figure
    assert page.count('<table class="evaluation">') == 2
    assert [[row[1], row[5], row[6]] for row in _table_rows(page, "evaluation", 1)] == [
        ["1", "0.1250 [0.1000, 0.1500]", "0.1310"], ["4", "0.1600 [0.1500, 0.1700]", "0.1449"]]
    summary = ("2 statistics rounds (rounds 1-2), then 3 training rounds (rounds 5-7) and 2 "
               "evaluation rounds (rounds 3-8)")
    assert summary in page and summary in (written / "report.md").read_text()


def _table_rows(page: str, css: str, which: int = 0) -> list[list[str]]:
    """The body cells of the ``which``-th table of class ``css`` on ``page``."""
    table = page.split(f'<table class="{css}">')[which + 1].split("</table>")[0]
    return [[cell.removeprefix("<td>") for cell in row.split("</td>")[:-1]]
            for row in table.split("<tr>")[2:]]


def test_estimates_are_set_against_the_central_figure(written: Path) -> None:
    """The table says for each estimate whether its interval holds the central figure:
    the DP run's last HitRate@10 and NDCG@10 intervals miss it, its MRR interval holds it."""
    page = (written / "index.html").read_text()
    rows = _table_rows(page, "federated-evaluation")
    header = page.split('<table class="federated-evaluation">')[1].split("</thead>")[0]
    assert header.count("<th>inside</th>") == 3
    assert "federated HR@10 [95% interval]" in header and "central MRR" in header
    inside = {(row[0], row[1]): (row[5], row[8], row[11]) for row in rows}
    assert inside == {("federated, SecAgg, no DP", "1"): ("yes", "yes", "yes"),
                      ("federated, SecAgg, no DP", "4"): ("yes", "yes", "yes"),
                      ("federated, SecAgg, DP eps=8", "1"): ("yes", "yes", "yes"),
                      ("federated, SecAgg, DP eps=8", "4"): ("no", "no", "yes")}
    assert rows[0][2] == "27 of 180"  # the noised query count, of every device's
    sentence = ("federated, SecAgg, DP eps=8: 1 of 2 estimates hold the central figure within "
                "their 95% interval for HitRate@10 (1 of 2 for NDCG@10, 2 of 2 for MRR).")
    markdown = (written / "report.md").read_text()
    for text in (page, markdown):
        assert sentence in text
        assert "2 of 2 estimates hold the central figure" in text  # the no-DP run
        assert "federated_evaluation.png" in text
    assert "## Federated evaluation against central evaluation" in markdown
    assert "| federated, SecAgg, DP eps=8 | 4 | 27 of 180 | 0.1600 [0.1500, 0.1700] | " \
           "0.1449 | no |" in markdown


def test_the_evaluation_plot_has_a_panel_per_run_with_intervals(
        sweep_report: dict[str, Any]) -> None:
    drawn = figures(sweep_report)
    try:
        fig = drawn["federated_evaluation.png"]
        titles = [ax.get_title() for ax in fig.axes]
        assert titles == ["federated, SecAgg, no DP: 2 of 2 intervals hold the central figure",
                          "federated, SecAgg, DP eps=8: 1 of 2 intervals hold the central "
                          "figure"]
        suptitle = fig.get_suptitle()
        assert "uci" in suptitle and "95% intervals" in suptitle
        ax = fig.axes[1]
        legend = ax.get_legend()
        assert legend is not None
        assert {t.get_text() for t in legend.get_texts()} == {
            "federated estimate (95% interval)", "central figure (every device's query)"}
        (central,) = [line for line in ax.get_lines() if line.get_marker() == "D"]
        # the DP run's central figures: the first in its interval, the second below it
        assert np.asarray(central.get_xydata()).tolist() == [[1.0, 0.131], [4.0, 0.1449]]
    finally:
        for fig in drawn.values():
            plt.close(fig)


def test_no_evaluation_rounds_no_evaluation_section(tmp_path: Path,
                                                   sweep_report: dict[str, Any]) -> None:
    """A report of runs without evaluation rounds (--eval-every 0 or an older metrics.json)
    draws no evaluation plot and has no comparison table."""
    for run in sweep_report["runs"]:
        run["rounds"] = [r for r in run["rounds"] if r["task"] != Task.EVALUATE]
    drawn = figures(sweep_report)
    for fig in drawn.values():
        plt.close(fig)
    assert "federated_evaluation.png" not in drawn
    page = write_report(tmp_path, sweep_report).read_text()
    assert "federated-evaluation" not in page and '<table class="evaluation">' not in page
    assert "Federated evaluation against central evaluation" not in page


def test_index_has_the_budget_split(written: Path) -> None:
    page = (written / "index.html").read_text()
    budget = page.split('<table class="budget">')[1].split("</table>")[0]
    assert "federated, SecAgg, DP eps=8" in budget and "no DP" not in budget
    assert "<td>7.190</td>" in budget and "<td>90%</td>" in budget  # 7.19 of the 8
    assert "the statistics rounds spent epsilon 7.19 of the budget 8" in page
    assert '<img src="budget.png"' in page and '<img src="epsilon.png"' in page
    assert "| statistics rounds |" in (written / "report.md").read_text()


def test_config_toml_is_linked_and_deployable(written: Path) -> None:
    page = (written / "index.html").read_text()
    markdown = (written / "report.md").read_text()
    for run in ("no-dp", "eps-8"):
        name = f"config-{run}.toml"
        assert f'<a href="{name}">' in page and f"[{name}]({name})" in markdown
        config = load_config(written / name)
        assert config.population == N
    assert load_config(written / "config-eps-8.toml").target_epsilon == 8.0
    assert load_config(written / "config-no-dp.toml").mechanism == "none"
    assert not list(written.glob(".*.tmp*"))  # every file renamed into place


def test_hitrate_by_hidden_item_is_tabled_for_central_rows_and_each_run(
        tmp_path: Path, sweep_report: dict[str, Any]) -> None:
    split = {"repeat": {"hr": 0.61, "queries": 70}, "explore": {"hr": 0.123, "queries": 110},
             "head": {"hr": 0.45, "queries": 90}, "tail": {"hr": 0.0987, "queries": 90}}
    sweep_report["baselines"][0]["by_hidden"] = split
    sweep_report["runs"][1]["rounds"][-1]["by_hidden"] = {
        **split, "tail": {"hr": 0.0456, "queries": 90}}
    page = write_report(tmp_path, sweep_report).read_text()
    table = page[page.index("HitRate@10 by hidden item"):]
    table = table[:table.index("</table>")]
    assert "explore (110 queries)" in table and "tail (90 queries)" in table
    assert "0.0987" in table and "0.0456" in table  # the baseline's row and the DP run's
    assert sweep_report["runs"][0]["name"] not in table  # a run with no figures: no row
    markdown = (tmp_path / "report.md").read_text()
    assert "### HitRate@10 by hidden item" in markdown
