"""The run report: ``index.html`` (tables and plots, no script, opens from disk),
``report.md`` (the same tables for a pull request or a notebook), PNG plots drawn with
matplotlib, and ``metrics.json`` (everything, including the exact configuration and the data
set's sha256, so that a run can be repeated).

Everything is written from one JSON-able dict (see ``fedcart-sim run``), first to a
temporary name and then renamed, so a report directory never holds a half-written file.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

__all__ = ["PLOTS", "privacy_utility_rows", "write_report"]

PLOTS = {
    "quality.png": "HitRate@10 of each published model, against the central baselines",
    "epsilon.png": "Privacy spent (epsilon at the run's delta) after each round",
    "time.png": "Seconds per round, by protocol phase",
    "bytes.png": "Bytes per device per round, against 4 bytes per parameter",
}
BASELINE_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        completed = sum(1 for r in run["rounds"] if r["status"] == "completed"
                        and r.get("task", "train") == "train")
        rows.append({"name": run["name"], "hr": last["hr"], "ndcg": last["ndcg"],
                     "mrr": last["mrr"], "hr_global": last["hr_global"],
                     "epsilon": last["epsilon"] if run["settings"]["mechanism"] != "none"
                     else None, "rounds": completed})
    return rows


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "HR@10", "NDCG@10", "MRR", "HR@10 global only", "epsilon",
              "training rounds"]
    body = [[r["name"], _fmt(r["hr"]), _fmt(r["ndcg"]), _fmt(r["mrr"]),
             _fmt(r["hr_global"]), _fmt(r["epsilon"], 2),
             "-" if r["rounds"] is None else str(r["rounds"])]
            for r in privacy_utility_rows(report)]
    return header, body


def _round_table(run: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["round", "task", "status", "sampled", "survivors", "HR@10", "HR@10 global",
              "epsilon", "seconds", "KB up/device", "KB down/device", "SecAgg+ groups"]
    body = []
    for r in run["rounds"]:
        body.append([str(r["round"]), r.get("task", "train"), r["status"], str(r["sampled"]),
                     "-" if r["survivors"] is None else str(r["survivors"]),
                     _fmt(r["hr"]), _fmt(r["hr_global"]), _fmt(r["epsilon"], 3),
                     f"{r['seconds']:.2f}",
                     "-" if r["bytes_up"] is None else f"{r['bytes_up'] / 1024:,.0f}",
                     "-" if r["bytes_down"] is None else f"{r['bytes_down'] / 1024:,.0f}",
                     r.get("groups", "-")])
    return header, body


def _plot_quality(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in report["runs"]:
        points = [(r["round"], r["hr"]) for r in run["rounds"] if r.get("hr") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=run["name"])
    central = report.get("baselines", []) + report.get("central", [])
    for style, row in zip(BASELINE_STYLES * 2, central, strict=False):
        ax.axhline(row["hr@10"], linestyle=style, color="grey", linewidth=1)
        ax.annotate(f"{row['name']} {row['hr@10']:.3f}", (1.0, row["hr@10"]),
                    xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7, color="dimgrey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("HitRate@10 (with the device's history)")
    ax.set_title(f"{report['data']['name']}: quality per round")
    if ax.get_legend_handles_labels()[0]:  # a run stopped before any evaluation has none
        ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_epsilon(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for run in report["runs"]:
        done = [r for r in run["rounds"] if r["status"] == "completed"]
        ax.plot([r["round"] for r in done], [r["epsilon"] for r in done], marker=".",
                label=f"{run['name']} (delta {run['delta']:.1e})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_time(report: dict[str, Any], path: Path) -> None:
    run = report["runs"][0]
    done = [r for r in run["rounds"] if r["status"] == "completed"]
    phases = sorted({p for r in done for p in r["phase_seconds"]},
                    key=lambda p: min(i for r in done for i, q in
                                      enumerate(r["phase_seconds"]) if q == p))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0.0] * len(done)
    for phase in phases:
        heights = [r["phase_seconds"].get(phase, 0.0) for r in done]
        ax.bar([r["round"] for r in done], heights, bottom=bottom, label=phase.lower())
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.plot([r["round"] for r in done], [r["seconds"] for r in done], color="black",
            marker=".", linewidth=1, label="whole round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_title(f"{run['name']}: time per round")
    ax.legend(fontsize=7, ncol=3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_bytes(report: dict[str, Any], path: Path) -> None:
    run = report["runs"][0]
    done = [r for r in run["rounds"] if r.get("bytes_up") is not None]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([r["round"] for r in done], [r["bytes_up"] / 1e6 for r in done], marker=".",
            label="up (masked update and protocol)")
    ax.plot([r["round"] for r in done], [r["bytes_down"] / 1e6 for r in done], marker=".",
            label="down (model and protocol)")
    sized = [r for r in done if r.get("values")]
    ax.step([r["round"] for r in sized], [4 * r["values"] / 1e6 for r in sized],
            where="mid", color="grey", linestyle="--",
            label="4 bytes per masked value (statistics, then the trained groups)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("MB per device (log scale)")
    ax.set_title(f"{run['name']}: bytes per device")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _summary(report: dict[str, Any]) -> list[str]:
    data = report["data"]
    lines = [f"Data: {data['name']} (sha256 {data['sha256']}), {data['devices']:,} devices "
             f"(users with training baskets), catalog {data['catalog']:,} items, "
             f"{data['queries']:,} test queries.",
             f"Model: d = {report['model']['dim']}, {report['model']['parameters']:,} "
             "parameters."]
    for run in report["runs"]:
        done = [r for r in run["rounds"] if r["status"] == "completed"]
        trained = sum(1 for r in done if r.get("task", "train") == "train")
        note = " (stopped early: report of the rounds done)" if run["interrupted"] else ""
        noise = ", ".join(f"{task} z = {z:.3f}"
                          for task, z in run.get("noise_multipliers", {}).items())
        lines.append(f"{run['name']}: {len(done) - trained} statistics and {trained} "
                     f"training rounds completed in {run['seconds']:.0f} s{note}; delta "
                     f"{run['delta']:.2e}" + (f"; noise multipliers {noise}" if noise else "")
                     + ".")
    lines.append(f"Repeat with: {report['command']}")
    return lines


def write_report(report_dir: Path, report: dict[str, Any]) -> Path:
    """Write every file of the report; returns the path of index.html."""
    report_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(report_dir / "metrics.json",
                  (json.dumps(report, indent=2, default=str) + "\n").encode())
    drawn = []
    if report["runs"]:
        for name, draw in (("quality.png", _plot_quality), ("epsilon.png", _plot_epsilon),
                           ("time.png", _plot_time), ("bytes.png", _plot_bytes)):
            tmp = report_dir / f".{name}.tmp.png"
            draw(report, tmp)
            os.replace(tmp, report_dir / name)
            drawn.append(name)
    title = f"FedCart simulation: {report['data']['name']}"
    table = _table(report)
    md = [f"# {title}", "", *[f"- {line}" for line in _summary(report)], "",
          "## Privacy and utility (test baskets, HitRate@10 / NDCG@10 / MRR)", "",
          _markdown_table(*table), ""]
    md += [f"![{PLOTS[name]}]({name})\n" for name in drawn]
    for run in report["runs"]:
        md += [f"## Rounds: {run['name']}", "", _markdown_table(*_round_table(run)), ""]
    md += ["## Configuration", "", "```json",
           json.dumps({"runs": [{"name": r["name"], "settings": r["settings"],
                                 "aggregator_config": r["aggregator_config"]}
                                for r in report["runs"]]}, indent=2), "```", ""]
    _atomic_write(report_dir / "report.md", "\n".join(md).encode())

    figures = "".join(f'<figure><img src="{n}" alt="{html.escape(PLOTS[n])}">'
                      f"<figcaption>{html.escape(PLOTS[n])}</figcaption></figure>"
                      for n in drawn)
    rounds = "".join(f"<h2>Rounds: {html.escape(r['name'])}</h2>"
                     + _html_table(*_round_table(r)) for r in report["runs"])
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in _summary(report))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{summary}</ul>
<h2>Privacy and utility</h2>
<p>Test baskets of DESIGN.md section 6. Federated rows: the last evaluated model; "global
only" leaves out the on-device history blend.</p>
{_html_table(*table)}
{figures}
{rounds}
<h2>Configuration</h2>
<p>Everything, with per-round figures, is in <a href="metrics.json">metrics.json</a>.</p>
<pre>{html.escape(json.dumps([r["aggregator_config"] for r in report["runs"]], indent=2))}</pre>
</body></html>
"""
    _atomic_write(report_dir / "index.html", page.encode())
    return report_dir / "index.html"
