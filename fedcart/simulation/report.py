"""The run report: ``index.html`` (tables and plots, no script, opens from disk),
``report.md`` (the same tables for a pull request or a notebook), PNG plots drawn with
matplotlib, ``metrics.json`` (everything, including the exact configuration and the data
set's sha256, so that a run can be repeated) and, beside them, each run's ``config.toml``:
the aggregator configuration the run served with, as an operator would deploy it (the CLI
copies it in; the report links it).

A run begins with the statistics rounds (popularity, then co-occurrence over the head
items) and then trains: ``--rounds N`` counts the training rounds only. Evaluation rounds
score the model the statistics gave, every ``--eval-every``-th trained one and the last on
the devices' own baskets; the report sets each noised estimate beside the central figure
of the same quantity. The report keeps the kinds apart everywhere (tables, shaded spans in
the plots, the privacy budget split), because they cost and deliver different things.

Everything is written from one JSON-able dict (see ``fedcart-sim run``), first to a
temporary name and then renamed, so a report directory never holds a half-written file.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedcart.atomic_write import write_atomically
from fedcart.data.evaluation import HiddenItem
from fedcart.protocol.terms import Task

__all__ = ["N_DELTA_CAP", "PLOTS", "PRIVACY_PLOTS", "BudgetSplit",
           "budget_splits", "delta_warning", "figures", "privacy_utility_rows", "write_report"]

PLOTS = {
    "quality.png": "HitRate@10 of each published model, against the central baselines; "
                   "the shaded span is the statistics rounds",
    "epsilon.png": "Cumulative epsilon after each round, against each run's budget "
                   "(dashed); the shaded span is the statistics rounds",
    "budget.png": "The privacy budget split: epsilon spent by the statistics rounds "
                  "(popularity, co-occurrence), by the training rounds and by the "
                  "evaluation rounds",
    "federated_evaluation.png": "HitRate@10 of each evaluated model version: the federated "
                                "estimate with its 95% interval, and the central figure of "
                                "the same quantity, one panel per run",
    "time.png": "Seconds per round by protocol phase, one panel per run",
    "bytes.png": "Bytes per device per round (log scale), one panel per run",
}


class RoundStatus(StrEnum):
    """How a round ended, as the aggregator's store records it: the report tells the
    completed rounds (their sum was released, their epsilon charged) from the rest."""

    COMPLETED = "completed"


PRIVACY_PLOTS = frozenset({"epsilon.png", "budget.png"})  # drawn when a run adds noise
EVALUATION_PLOTS = frozenset({"federated_evaluation.png"})  # drawn when a run has estimates
NO_DP = "none"  # FederatedSettings.mechanism of a run without DP noise
STATISTICS_TASKS = (Task.POPULARITY, Task.COOCCURRENCE)  # the order they run in
SPENDING_TASKS = (*STATISTICS_TASKS, Task.TRAIN, Task.EVALUATE)  # the budget split's parts
TASK_LABELS = {Task.POPULARITY: "popularity", Task.COOCCURRENCE: "co-occurrence",
               Task.TRAIN: "training", Task.EVALUATE: "evaluation"}
# N delta is the chance that some user's guarantee fails outright: the default delta,
# 1 / (100 N), and the aggregator's configuration keep it at 1%.
N_DELTA_CAP = 0.01
STATISTICS_SPAN = "statistics rounds (popularity, co-occurrence)"
BASELINE_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
BASELINE_GREYS = ["dimgrey", "grey", "darkgrey"]
SPLIT_COLOURS = {Task.POPULARITY: "#9ecae1", Task.COOCCURRENCE: "#3182bd",
                 Task.TRAIN: "#e6550d", Task.EVALUATE: "#31a354"}
MIN_LINE_POINTS = 3  # fewer evaluations are drawn as markers, not a line
DPI = 110
LEGEND_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0,
                  "fontsize": 8}


def _completed(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run["rounds"] if r["status"] == RoundStatus.COMPLETED]


def _task(record: dict[str, Any]) -> Task:
    return Task(record.get("task", Task.TRAIN))


def _is_statistics(record: dict[str, Any]) -> bool:
    return _task(record) in STATISTICS_TASKS


def _is_training(record: dict[str, Any]) -> bool:
    return _task(record) is Task.TRAIN


def _is_dp(run: dict[str, Any]) -> bool:
    return bool(run["settings"]["mechanism"] != NO_DP)


def privacy_utility_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The table of DESIGN.md section 6: central rows, then each federated run's last
    evaluated model, with the privacy it spent."""
    rows: list[dict[str, Any]] = []
    for row in report.get("baselines", []) + report.get("central", []):
        rows.append({"name": row["name"], "hr": row["hr@10"], "ndcg": row["ndcg@10"],
                     "mrr": row["mrr"], "hr_global": None, "epsilon": None, "rounds": None})
    for run in report.get("runs", []):
        evaluated = [r for r in run["rounds"] if r.get("hr") is not None]
        if not evaluated:
            continue
        last = evaluated[-1]
        completed = sum(1 for r in _completed(run) if _is_training(r))
        rows.append({"name": run["name"], "hr": last["hr"], "ndcg": last["ndcg"],
                     "mrr": last["mrr"], "hr_global": last["hr_global"],
                     "epsilon": last["epsilon"] if _is_dp(run) else None,
                     "rounds": completed})
    return rows


@dataclass(frozen=True)
class BudgetSplit:
    """Where one DP run's epsilon went. Composition is not additive, so each part is how
    far the cumulative epsilon (at the run's delta) rose over those rounds, in the order
    they ran: the parts add up to the total, and the statistics rounds, which run first,
    are charged at their full standalone cost."""

    name: str
    budget: float | None  # the target epsilon (None: a fixed noise multiplier, no target)
    spent: dict[Task, float]  # per task, in SPENDING_TASKS order
    training_rounds: int
    evaluation_rounds: int
    delta: float
    population: int

    @property
    def statistics(self) -> float:
        return sum(self.spent[t] for t in STATISTICS_TASKS)

    @property
    def total(self) -> float:
        return sum(self.spent.values())

    @property
    def n_delta(self) -> float:
        """N delta: the chance that the guarantee fails outright for some user."""
        return self.population * self.delta


def budget_splits(report: dict[str, Any]) -> list[BudgetSplit]:
    """The budget split of every run that adds DP noise, from its completed rounds'
    cumulative epsilon."""
    splits = []
    for run in report["runs"]:
        if not _is_dp(run):
            continue
        spent = dict.fromkeys(SPENDING_TASKS, 0.0)
        before = 0.0
        for record in _completed(run):
            spent[_task(record)] += record["epsilon"] - before
            before = record["epsilon"]
        splits.append(BudgetSplit(
            name=run["name"], budget=run["settings"].get("epsilon"), spent=spent,
            training_rounds=sum(1 for r in _completed(run) if _is_training(r)),
            evaluation_rounds=sum(1 for r in _completed(run) if _task(r) is Task.EVALUATE),
            delta=run["delta"], population=run["devices"]))
    return splits


def delta_warning(delta: float, population: int) -> str | None:
    """A warning when N delta, the chance that some user's (epsilon, delta) guarantee fails
    outright, exceeds N_DELTA_CAP (None when it does not)."""
    n_delta = population * delta
    if n_delta <= N_DELTA_CAP:
        return None
    odds = ("more than 1: the guarantee is expected to fail for at least one user"
            if n_delta > 1 else f"above the {N_DELTA_CAP:.0%} the default keeps it at")
    return (f"DP delta {delta:.2g} is large for N = {population:,} devices: N delta = "
            f"{n_delta:.2g}, the chance that the guarantee fails outright for some user, is "
            f"{odds}. Use a delta of at most 1 / (100 N) = {N_DELTA_CAP / population:.2g} "
            "(the default).")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _kb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e3:,.1f}"


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "HR@10", "NDCG@10", "MRR", "HR@10 global only", "epsilon",
              "training rounds"]
    body = [[r["name"], _fmt(r["hr"]), _fmt(r["ndcg"]), _fmt(r["mrr"]),
             _fmt(r["hr_global"]), _fmt(r["epsilon"], 2),
             "-" if r["rounds"] is None else str(r["rounds"])]
            for r in privacy_utility_rows(report)]
    return header, body


HIDDEN_NOTE = ("repeat: the hidden item is in the user's earlier baskets; explore: it is not. "
               "head: it is one of the most bought items that together make up half of the "
               "training purchases; tail: the rest of the catalog.")


def _hidden_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """HitRate@10 by the class of the hidden item, for the central rows and each run's last
    evaluated model; None for a report that has no such figures (an older metrics.json)."""
    rows = [(r["name"], r.get("by_hidden"))
            for r in report.get("baselines", []) + report.get("central", [])]
    for run in report.get("runs", []):
        evaluated = [r for r in run["rounds"] if r.get("by_hidden")]
        if evaluated:
            rows.append((run["name"], evaluated[-1]["by_hidden"]))
    rows = [(name, split) for name, split in rows if split]
    if not rows:
        return None
    classes = [c.value for c in HiddenItem]
    sizes = rows[0][1]
    header = ["model", *(f"{c} ({sizes[c]['queries']} queries)" for c in classes)]
    return header, [[name, *(_fmt(split[c]["hr"]) for c in classes)] for name, split in rows]


class Metric(StrEnum):
    """What an evaluation round estimates, by its key in the estimate's JSON
    (protocol.evaluation.Estimate) and in the central figure's (federated_evaluation)."""

    HR = "hr"
    NDCG = "ndcg"
    MRR = "mrr"


METRIC_LABELS = {Metric.HR: "HR@10", Metric.NDCG: "NDCG@10", Metric.MRR: "MRR"}
EVALUATION_HEADING = "Federated evaluation against central evaluation"
EVALUATION_NOTE = ("In an evaluation round the sampled devices score the model version on a "
                   "query from their own newest training basket (one item hidden, the rest "
                   "as the cart, the earlier baskets as the history); only the noised sum of "
                   "their scores is released. The estimate's 95% interval allows for the "
                   "sampling and the noise. The central figure is the same quantity over "
                   "every device's query, computed here from the same baskets: the interval "
                   "should hold it about 95% of the time.")


def _estimated(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's completed evaluation rounds with their estimate."""
    return [r for r in _completed(run) if r.get("estimate")]


def _estimate(record: dict[str, Any], metric: Metric) -> dict[str, float] | None:
    """The estimate's ``{"value", "low", "high"}`` of ``metric`` (None: none, or NaN, an
    estimate over no query)."""
    interval = (record.get("estimate") or {}).get(metric)
    return interval if interval and math.isfinite(interval["value"]) else None


def _central(record: dict[str, Any], metric: Metric) -> float | None:
    return (record.get("central_estimate") or {}).get(metric)


def _interval(record: dict[str, Any], metric: Metric) -> str:
    interval = _estimate(record, metric)
    return "-" if interval is None else (f"{interval['value']:.4f} [{interval['low']:.4f}, "
                                         f"{interval['high']:.4f}]")


def _holds(record: dict[str, Any], metric: Metric) -> bool | None:
    """Whether the estimate's interval holds the central figure (None: one is missing)."""
    interval, central = _estimate(record, metric), _central(record, metric)
    if interval is None or central is None:
        return None
    return interval["low"] <= central <= interval["high"]


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def _queries(record: dict[str, Any]) -> str:
    """The estimate's (noised) query count, of the central figure's."""
    central = (record.get("central_estimate") or {}).get("queries")
    estimated = f"{record['estimate']['queries']:,.0f}"
    return estimated if central is None else f"{estimated} of {central:,}"


def _evaluation_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Every estimate beside the central figure, per run and model version; None when no
    run has an estimate (no evaluation rounds, or an older metrics.json)."""
    rows = [(run["name"], r) for run in report["runs"] for r in _estimated(run)]
    if not rows:
        return None
    header = ["run", "model version", "queries (noised, of all)"]
    for metric in Metric:
        label = METRIC_LABELS[metric]
        header += [f"federated {label} [95% interval]", f"central {label}", "inside"]
    body = [[name, str(r["model_version"]), _queries(r),
             *(cell for metric in Metric for cell in (
                 _interval(r, metric), _fmt(_central(r, metric)), _yes_no(_holds(r, metric))))]
            for name, r in rows]
    return header, body


def _holding(rounds: Sequence[dict[str, Any]], metric: Metric) -> tuple[int, int]:
    """(how many of ``rounds``' estimates of ``metric`` hold the central figure, how many
    can be compared)."""
    held = [h for r in rounds if (h := _holds(r, metric)) is not None]
    return sum(held), len(held)


def _evaluation_sentences(report: dict[str, Any]) -> list[str]:
    """One line per run with estimates to compare: how many intervals hold the figure."""
    lines = []
    for run in report["runs"]:
        rounds = _estimated(run)
        held, compared = _holding(rounds, Metric.HR)
        if not compared:
            continue
        others = ", ".join(f"{h} of {n} for {METRIC_LABELS[m]}"
                           for m in (Metric.NDCG, Metric.MRR)
                           for h, n in [_holding(rounds, m)])
        lines.append(f"{run['name']}: {held} of {compared} estimates hold the central figure "
                     f"within their 95% interval for HitRate@10 ({others}).")
    return lines


def _budget_table(splits: Sequence[BudgetSplit]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "budget (target epsilon)", "popularity", "co-occurrence",
              "statistics rounds", "training rounds", "evaluation rounds", "total spent",
              "statistics share of the budget", "delta", "N delta"]
    body = []
    for s in splits:
        share = (f"{s.statistics / s.budget:.0%}" if s.budget  # a fixed z has no budget
                 else f"{s.statistics / s.total:.0%} of the total" if s.total else "-")
        body.append([s.name, _fmt(s.budget, 2), _fmt(s.spent[Task.POPULARITY], 3),
                     _fmt(s.spent[Task.COOCCURRENCE], 3), _fmt(s.statistics, 3),
                     f"{s.spent[Task.TRAIN]:.3f} ({s.training_rounds} rounds)",
                     f"{s.spent[Task.EVALUATE]:.3f} ({s.evaluation_rounds} rounds)",
                     _fmt(s.total, 3), share,
                     f"{s.delta:.2e}", f"{s.n_delta:.2g}"])
    return header, body


def _budget_sentence(split: BudgetSplit) -> str:
    of = f" of the budget {split.budget:g}" if split.budget else ""
    return (f"{split.name}: the statistics rounds spent epsilon {split.statistics:.2f}{of} "
            f"(popularity {split.spent[Task.POPULARITY]:.2f}, co-occurrence "
            f"{split.spent[Task.COOCCURRENCE]:.2f}); the {split.training_rounds} training "
            f"rounds then spent {split.spent[Task.TRAIN]:.2f} and the "
            f"{split.evaluation_rounds} evaluation rounds {split.spent[Task.EVALUATE]:.2f}, "
            f"{split.total:.2f} in all (delta {split.delta:.2e}).")


class RoundKind(StrEnum):
    """The rounds a run's tables keep apart; each value is its table's CSS class."""

    STATISTICS = "statistics"
    TRAINING = "training"
    EVALUATION = "evaluation"


def _kind(record: dict[str, Any]) -> RoundKind:
    if _is_statistics(record):
        return RoundKind.STATISTICS
    return RoundKind.TRAINING if _is_training(record) else RoundKind.EVALUATION


def _round_table(rounds: Sequence[dict[str, Any]],
                 kind: RoundKind) -> tuple[list[str], list[list[str]]]:
    """The rounds of one kind: statistics rounds by task, training rounds numbered as
    ``--rounds`` counts them (completed ones only) beside the aggregator's round id,
    evaluation rounds by the model version they scored, with the estimate's HitRate@10 and
    the central figure in place of the published model's quality."""
    second, quality = {
        RoundKind.STATISTICS: ("task", ["HR@10", "HR@10 global"]),
        RoundKind.TRAINING: ("training round", ["HR@10", "HR@10 global"]),
        RoundKind.EVALUATION: ("model version", ["federated HR@10 [95% interval]",
                                                 "central HR@10"]),
    }[kind]
    header = ["round", second, "status", "sampled", "survivors", *quality, "epsilon",
              "seconds", "kB up/device", "kB down/device", "SecAgg+ groups"]
    body, trained = [], 0
    for r in rounds:
        if kind is RoundKind.STATISTICS:
            label = TASK_LABELS[_task(r)]
        elif kind is RoundKind.EVALUATION:
            label = str(r["model_version"])
        elif r["status"] == RoundStatus.COMPLETED:
            trained += 1
            label = str(trained)
        else:
            label = "-"
        scores = ([_interval(r, Metric.HR), _fmt(_central(r, Metric.HR))]
                  if kind is RoundKind.EVALUATION else [_fmt(r["hr"]), _fmt(r["hr_global"])])
        body.append([str(r["round"]), label, r["status"], str(r["sampled"]),
                     "-" if r["survivors"] is None else str(r["survivors"]), *scores,
                     _fmt(r["epsilon"], 3), f"{r['seconds']:.2f}", _kb(r["bytes_up"]),
                     _kb(r["bytes_down"]), r.get("groups", "-")])
    return header, body


def _span(rounds: Sequence[dict[str, Any]]) -> str:
    ids = [r["round"] for r in rounds]
    if not ids:
        return "none"
    return f"round {ids[0]}" if len(ids) == 1 else f"rounds {ids[0]}-{ids[-1]}"


Section = tuple[str, str, tuple[list[str], list[list[str]]]]


def _round_sections(run: dict[str, Any]) -> list[Section]:
    """(CSS class, heading, table) for the statistics rounds, the training rounds and the
    evaluation rounds of one run: the page shades the statistics table."""
    by_kind = {kind: [r for r in run["rounds"] if _kind(r) is kind] for kind in RoundKind}
    headings = {
        RoundKind.STATISTICS: "Statistics rounds (popularity, then co-occurrence)",
        RoundKind.TRAINING: f"Training rounds (--rounds {run['settings']['rounds']})",
        RoundKind.EVALUATION: "Evaluation rounds (each scores the latest model version)",
    }
    # a run always has a training table, even one stopped before its first training round
    return [(kind.value, f"{headings[kind]}: {_span(rounds)}", _round_table(rounds, kind))
            for kind, rounds in by_kind.items() if rounds or kind is RoundKind.TRAINING]


# --- plots -------------------------------------------------------------------------------

def _shade_statistics(ax: Axes, runs: Sequence[dict[str, Any]]) -> None:
    """A grey span over each run's statistics rounds, labelled once for the legend."""
    spans = sorted({(min(ids) - 0.5, max(ids) + 0.5) for run in runs
                    if (ids := [r["round"] for r in run["rounds"] if _is_statistics(r)])})
    for i, (lo, hi) in enumerate(spans):
        ax.axvspan(lo, hi, color="grey", alpha=0.15, linewidth=0,
                   label=STATISTICS_SPAN if i == 0 else None)


def _legend_outside(ax: Axes, **extra: Any) -> None:
    """The legend right of the axes: it never covers data, whatever the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**LEGEND_OUTSIDE, **extra)


def _evaluation_note(runs: Sequence[dict[str, Any]]) -> str:
    every = sorted({run["settings"]["eval_every"] for run in runs})
    nth = "every training round" if every == [1] else (
        "every " + " or ".join(f"{n}th" for n in every) + " training round and the last")
    return f"evaluated after the statistics rounds, then {nth}"


def _quality_figure(report: dict[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    runs = report["runs"]
    _shade_statistics(ax, runs)
    statistics_marked = False
    for run in runs:
        points = [r for r in run["rounds"] if r.get("hr") is not None]
        trained = [r for r in points if not _is_statistics(r)]
        sparse = len(trained) < MIN_LINE_POINTS
        line = ax.plot([r["round"] for r in trained], [r["hr"] for r in trained],
                       marker="o", markersize=7 if sparse else 4,
                       linestyle="none" if sparse else "-",
                       label=f"{run['name']} ({len(trained)} evaluated)")[0]
        stats = [r for r in points if _is_statistics(r)]
        if stats:
            ax.plot([r["round"] for r in stats], [r["hr"] for r in stats], marker="D",
                    markersize=7, linestyle="none", color=line.get_color(),
                    markeredgecolor="black")
            statistics_marked = True
    if statistics_marked:
        ax.plot([], [], marker="D", linestyle="none", color="white", markeredgecolor="black",
                label="model of the statistics rounds")
    central = report.get("baselines", []) + report.get("central", [])
    for i, row in enumerate(central):
        ax.axhline(row["hr@10"], linestyle=BASELINE_STYLES[i % len(BASELINE_STYLES)],
                   color=BASELINE_GREYS[i % len(BASELINE_GREYS)], linewidth=1.2,
                   label=f"{row['name']}: {row['hr@10']:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("aggregator round")
    ax.set_ylabel("HitRate@10 (with the device's history)")
    ax.set_title(f"{report['data']['name']}: quality per round\n({_evaluation_note(runs)})",
                 fontsize=10)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def _epsilon_figure(report: dict[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(9, 3.8), layout="constrained")
    runs = [run for run in report["runs"] if _is_dp(run)]
    _shade_statistics(ax, runs)
    for run in runs:
        done = _completed(run)
        line = ax.plot([r["round"] for r in done], [r["epsilon"] for r in done], marker=".",
                       label=f"{run['name']} (delta {run['delta']:.1e})")[0]
        budget = run["settings"].get("epsilon")
        if budget:
            ax.axhline(budget, color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"budget of {run['name']}: {budget:g}")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("aggregator round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_title("Privacy spent after each round")
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def _budget_figure(report: dict[str, Any]) -> Figure:
    splits = budget_splits(report)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.7 * len(splits)), layout="constrained")
    ys = list(range(len(splits)))
    left = [0.0] * len(splits)
    for task in SPENDING_TASKS:
        widths = [s.spent[task] for s in splits]
        ax.barh(ys, widths, left=left, height=0.6, color=SPLIT_COLOURS[task],
                label=f"{TASK_LABELS[task]} rounds")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    budgeted = [(y, s.budget) for y, s in zip(ys, splits, strict=True) if s.budget]
    if budgeted:
        ax.vlines([b for _, b in budgeted], [y - 0.4 for y, _ in budgeted],
                  [y + 0.4 for y, _ in budgeted], color="black", linewidth=2,
                  label="budget (target epsilon)")
    ax.set_yticks(ys, [s.name for s in splits])
    ax.invert_yaxis()  # the first run on top, as in the table
    ax.set_xlim(left=0)
    ax.set_xlabel("epsilon (each part: how far the cumulative epsilon rose)")
    ax.set_title("Privacy budget split: statistics, training and evaluation rounds")
    _legend_outside(ax)
    ax.grid(alpha=0.3, axis="x")
    return fig


def _evaluation_figure(report: dict[str, Any]) -> Figure:
    """One panel per run with estimates: each evaluated version's HitRate@10 estimate with
    its 95% interval, and the central figure of the same quantity."""
    runs = [run for run in report["runs"] if _estimated(run)]
    fig, axes = _panels(runs, 2.8)
    for ax, run in zip(axes, runs, strict=True):
        estimated = [(r, i) for r in _estimated(run)
                     if (i := _estimate(r, Metric.HR)) is not None]
        rounds = [r for r, _ in estimated]
        ax.errorbar([r["model_version"] for r in rounds], [i["value"] for _, i in estimated],
                    yerr=[[i["value"] - i["low"] for _, i in estimated],
                          [i["high"] - i["value"] for _, i in estimated]],
                    fmt="o", markersize=5, capsize=4, label="federated estimate (95% interval)")
        central = [(r["model_version"], c) for r in rounds
                   if (c := _central(r, Metric.HR)) is not None]
        if central:
            ax.plot(*zip(*central, strict=True), marker="D", markersize=8, linestyle="none",
                    markerfacecolor="none", markeredgecolor="black",
                    label="central figure (every device's query)")
        held, compared = _holding(rounds, Metric.HR)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("model version evaluated")
        ax.set_ylabel("HitRate@10")
        ax.set_title(f"{run['name']}: " + (f"{held} of {compared} intervals hold the central "
                                           "figure" if compared else "estimates"), fontsize=10)
        _legend_outside(ax, reverse=True)  # the estimate (drawn first, listed last) on top
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['data']['name']}: federated evaluation against central evaluation "
                 "(95% intervals)", fontsize=11)
    return fig


def _panels(runs: Sequence[dict[str, Any]], height: float) -> tuple[Figure, list[Axes]]:
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 0.6 + height * len(runs)),
                             layout="constrained", squeeze=False)
    return fig, list(axes[:, 0])


def _time_figure(report: dict[str, Any]) -> Figure:
    runs = report["runs"]
    fig, axes = _panels(runs, 2.8)
    phases: list[str] = []  # in the order they first appear, one colour each in every panel
    for run in runs:
        for r in _completed(run):
            phases += [p for p in r["phase_seconds"] if p not in phases]
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(phases)}
    for ax, run in zip(axes, runs, strict=True):
        done = _completed(run)
        _shade_statistics(ax, [run])
        bottom = [0.0] * len(done)
        for phase in phases:
            heights = [r["phase_seconds"].get(phase, 0.0) for r in done]
            ax.bar([r["round"] for r in done], heights, bottom=bottom, color=colours[phase],
                   label=phase.lower())
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.plot([r["round"] for r in done], [r["seconds"] for r in done], color="black",
                marker=".", linewidth=1, label="whole round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("aggregator round")
        ax.set_ylabel("seconds")
        ax.set_title(f"{run['name']}: time per round", fontsize=10)
        _legend_outside(ax)
    return fig


def _human_bytes(value: float, _position: object = None) -> str:
    """1 kB = 1000 bytes, as the tables count."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def _bytes_axis(ax: Axes, values: Sequence[float]) -> None:
    """A log axis labelled in B, kB, MB: powers of ten across two decades or more, also
    2 and 5 times them across less (so the axis always has a few labels)."""
    ax.set_yscale("log")
    positive = [v for v in values if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades >= 2
                                          else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(_human_bytes))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _bytes_figure(report: dict[str, Any]) -> Figure:
    runs = report["runs"]
    fig, axes = _panels(runs, 2.8)
    for ax, run in zip(axes, runs, strict=True):
        done = [r for r in run["rounds"] if r.get("bytes_up") is not None]
        _shade_statistics(ax, [run])
        rounds = [r["round"] for r in done]
        ax.plot(rounds, [r["bytes_up"] for r in done], marker=".",
                label="up (masked update and protocol)")
        ax.plot(rounds, [r["bytes_down"] for r in done], marker=".",
                label="down (model and protocol)")
        sized = [r for r in done if r.get("values")]
        ax.step([r["round"] for r in sized], [4 * r["values"] for r in sized], where="mid",
                color="grey", linestyle="--", label="4 bytes per masked value")
        _bytes_axis(ax, [v for r in done for v in (r["bytes_up"], r["bytes_down"])]
                    + [4 * r["values"] for r in sized])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("aggregator round")
        ax.set_ylabel("per device")
        ax.set_title(f"{run['name']}: bytes per device", fontsize=10)
        _legend_outside(ax)
    return fig


FIGURES: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "quality.png": _quality_figure, "epsilon.png": _epsilon_figure,
    "budget.png": _budget_figure, "federated_evaluation.png": _evaluation_figure,
    "time.png": _time_figure, "bytes.png": _bytes_figure,
}


def figures(report: dict[str, Any]) -> dict[str, Figure]:
    """The report's figures by file name, in PLOTS order: none without a run, the privacy
    plots only when a run adds DP noise, the evaluation plot only when a run has estimates.
    The caller closes them."""
    if not report["runs"]:
        return {}
    left_out = (set() if any(_is_dp(run) for run in report["runs"]) else PRIVACY_PLOTS) | (
        set() if any(_estimated(run) for run in report["runs"]) else EVALUATION_PLOTS)
    return {name: FIGURES[name](report) for name in PLOTS if name not in left_out}


# --- pages -------------------------------------------------------------------------------

def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in body)
    attribute = f' class="{css}"' if css else ""
    return f"<table{attribute}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _rounds_note(report: dict[str, Any]) -> str:
    records = [r for run in report["runs"] for r in run["rounds"]]
    note = ("--rounds N counts training rounds: the aggregator first runs the statistics "
            "rounds (a secure sum of popularity, then of co-occurrence over the head items, "
            "which give the model its item-item table), then N training rounds; it numbers "
            "all of them from 1." if any(_is_statistics(r) for r in records)
            else "--rounds N counts training rounds; these runs had no statistics rounds.")
    if any(_task(r) is Task.EVALUATE for r in records):
        note += (" Between them run the evaluation rounds, which publish no model: the "
                 f"latest version is {_evaluation_note(report['runs'])}.")
    return note


def _summary(report: dict[str, Any]) -> list[str]:
    data = report["data"]
    lines = [f"Data: {data['name']} (sha256 {data['sha256']}), {data['devices']:,} devices "
             f"(users with training baskets), catalog {data['catalog']:,} items, "
             f"{data['queries']:,} test queries.",
             f"Model: d = {report['model']['dim']}, {report['model']['parameters']:,} "
             "parameters."]
    for run in report["runs"]:
        done = _completed(run)
        stats = [r for r in done if _is_statistics(r)]
        trained = [r for r in done if _is_training(r)]
        evaluations = [r for r in done if _task(r) is Task.EVALUATE]
        evaluated = (f" and {len(evaluations)} evaluation rounds ({_span(evaluations)})"
                     if evaluations else "")
        note = " (stopped early: report of the rounds done)" if run["interrupted"] else ""
        noise = ", ".join(f"{TASK_LABELS[Task(task)]} z = {z:.3f}"
                          for task, z in run.get("noise_multipliers", {}).items())
        lines.append(f"{run['name']}: {len(stats)} statistics rounds ({_span(stats)}), then "
                     f"{len(trained)} training rounds ({_span(trained)}){evaluated} "
                     f"completed in {run['seconds']:.0f} s{note}; delta {run['delta']:.2e}"
                     + (f"; noise multipliers {noise}" if noise else "") + ".")
    lines.append(f"Repeat with: {report['command']}")
    return lines


def _warnings(report: dict[str, Any]) -> list[str]:
    return [f"{run['name']}: {warning}" for run in report["runs"] if _is_dp(run)
            and (warning := delta_warning(run["delta"], run["devices"])) is not None]


def _configs(report_dir: Path, report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(run name, file name, TOML text) of each run whose config.toml is in the report."""
    found = []
    for run in report["runs"]:
        name = run.get("config_file")
        if name and (report_dir / name).is_file():
            found.append((run["name"], name, (report_dir / name).read_text()))
    return found


SPLIT_NOTE = ("Composition is not additive: each part is how far the cumulative epsilon rose "
              "over those rounds, in the order they ran, so the parts add up to the total "
              "and the statistics rounds, which run first, are charged their full "
              "standalone cost.")
DEPLOY_NOTE = ("The aggregator configuration each run served with, as written to its state "
               "directory: to deploy it, put it in place of config.toml in a state directory "
               "(fedcart-aggregator init --state DIR), then set [server] host (the "
               "simulation listened on loopback) and the round sizes for the real "
               "population.")


SIZING_NOTE = ("Values the simulation derived from the data's N devices and V items, and "
               "from this machine, for the options the command left unset (README, "
               "'Sizing a run').")


def _sizing_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the derived settings of every run (derived.Choice), or None."""
    rows = [[run["name"], choice["option"], f"{choice['value']:g}", choice["why"]]
            for run in report["runs"] for choice in run.get("derived", [])]
    return (["run", "option", "value", "why"], rows) if rows else None


def write_report(report_dir: Path, report: dict[str, Any]) -> Path:
    """Write every file of the report; returns the path of index.html. A run's
    ``config_file`` (a name in ``report_dir``) is linked and shown when the file is there."""
    report_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(report_dir / "metrics.json",
                  (json.dumps(report, indent=2, default=str) + "\n").encode())
    drawn = []
    for name, fig in figures(report).items():
        tmp = report_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=DPI)
        plt.close(fig)
        os.replace(tmp, report_dir / name)
        drawn.append(name)
    title = f"FedCart simulation: {report['data']['name']}"
    table = _table(report)
    splits = budget_splits(report)
    warnings = _warnings(report)
    configs = _configs(report_dir, report)
    privacy_figures = [n for n in drawn if n in PRIVACY_PLOTS]
    evaluation_figures = [n for n in drawn if n in EVALUATION_PLOTS]
    other_figures = [n for n in drawn if n not in PRIVACY_PLOTS | EVALUATION_PLOTS]
    evaluation = _evaluation_table(report)

    md = [f"# {title}", "", *[f"- {line}" for line in _summary(report)], "",
          *[f"> **Warning:** {w}\n" for w in warnings],
          _rounds_note(report), "",
          "## Privacy and utility (test baskets, HitRate@10 / NDCG@10 / MRR)", "",
          _markdown_table(*table), ""]
    hidden = _hidden_table(report)
    if hidden is not None:
        md += ["### HitRate@10 by hidden item", "", HIDDEN_NOTE, "", _markdown_table(*hidden),
               ""]
    md += [f"![{PLOTS[name]}]({name})\n" for name in other_figures[:1]]
    if evaluation is not None:
        md += [f"## {EVALUATION_HEADING}", "",
               *[f"- {line}" for line in _evaluation_sentences(report)], "", EVALUATION_NOTE,
               "", _markdown_table(*evaluation), ""]
        md += [f"![{PLOTS[name]}]({name})\n" for name in evaluation_figures]
    md += ["## Privacy budget split", ""]
    if splits:
        md += [*[f"- {_budget_sentence(s)}" for s in splits], "", SPLIT_NOTE, "",
               _markdown_table(*_budget_table(splits)), ""]
        md += [f"![{PLOTS[name]}]({name})\n" for name in privacy_figures]
    else:
        md += ["No run added DP noise: no privacy budget was spent.", ""]
    md += [f"![{PLOTS[name]}]({name})\n" for name in other_figures[1:]]
    for run in report["runs"]:
        md += [f"## Rounds: {run['name']}", ""]
        for _, heading, section in _round_sections(run):
            md += [f"### {heading}", "", _markdown_table(*section), ""]
    sizing = _sizing_table(report)
    if sizing is not None:
        md += ["## Sizing", "", SIZING_NOTE, "", _markdown_table(*sizing), ""]
    md += ["## Configuration", ""]
    if configs:
        md += [DEPLOY_NOTE, ""]
        for run_name, file_name, text in configs:
            md += [f"### [{file_name}]({file_name}): {run_name}", "", "```toml", text.rstrip(),
                   "```", ""]
    md += ["Everything, with per-round figures and the simulation's settings, is in "
           "[metrics.json](metrics.json).", ""]
    write_atomically(report_dir / "report.md", "\n".join(md).encode())

    def figure_html(names: list[str]) -> str:
        return "".join(f'<figure><img src="{n}" alt="{html.escape(PLOTS[n])}">'
                       f"<figcaption>{html.escape(PLOTS[n])}</figcaption></figure>"
                       for n in names)

    rounds = "".join(
        f"<h2>Rounds: {html.escape(run['name'])}</h2>" + "".join(
            f"<h3>{html.escape(heading)}</h3>" + _html_table(*section, css=css)
            for css, heading, section in _round_sections(run))
        for run in report["runs"])
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary(report))
    warning_html = "".join(f'<p class="warning"><strong>Warning:</strong> {html.escape(w)}'
                           "</p>" for w in warnings)
    evaluation_html = "" if evaluation is None else (
        f"<h2>{html.escape(EVALUATION_HEADING)}</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in _evaluation_sentences(report))
        + f"</ul><p>{html.escape(EVALUATION_NOTE)}</p>"
        + _html_table(*evaluation, css="federated-evaluation")
        + figure_html(evaluation_figures))
    if splits:
        budget_html = ("<ul>" + "".join(f"<li>{html.escape(_budget_sentence(s))}</li>"
                                        for s in splits) + "</ul>"
                       f"<p>{html.escape(SPLIT_NOTE)}</p>"
                       + _html_table(*_budget_table(splits), css="budget")
                       + figure_html(privacy_figures))
    else:
        budget_html = "<p>No run added DP noise: no privacy budget was spent.</p>"
    config_html = (f"<p>{html.escape(DEPLOY_NOTE)}</p>" + "".join(
        f'<h3><a href="{html.escape(file_name)}">{html.escape(file_name)}</a>: '
        f"{html.escape(run_name)}</h3><pre>{html.escape(text)}</pre>"
        for run_name, file_name, text in configs)) if configs else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
table.statistics td {{ background: #f2f2f2; }}
.warning {{ background: #fff3cd; border-left: 0.4em solid #d39e00; padding: 0.6em 1em; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{summary}</ul>
{warning_html}
<p>{html.escape(_rounds_note(report))}</p>
<h2>Privacy and utility</h2>
<p>Test baskets of DESIGN.md section 6. Federated rows: the last evaluated model; "global
only" leaves out the on-device history blend.</p>
{_html_table(*table)}
{"" if hidden is None else "<h3>HitRate@10 by hidden item</h3><p>" + html.escape(HIDDEN_NOTE)
 + "</p>" + _html_table(*hidden, css="hidden")}
{figure_html(other_figures[:1])}
{evaluation_html}
<h2 id="budget">Privacy budget split</h2>
{budget_html}
{figure_html(other_figures[1:])}
{rounds}
{"" if sizing is None else "<h2>Sizing</h2><p>" + html.escape(SIZING_NOTE) + "</p>"
 + _html_table(*sizing, css="sizing")}
<h2>Configuration</h2>
{config_html}
<p>Everything, with per-round figures and the simulation's settings, is in
<a href="metrics.json">metrics.json</a>.</p>
</body></html>
"""
    write_atomically(report_dir / "index.html", page.encode())
    return report_dir / "index.html"
