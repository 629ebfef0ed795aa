"""``fedcart-sim``: what a data scientist runs before shipping.

Built on click (subcommands, typed options, generated --help) and rich (tables, progress).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcart import __version__
from fedcart.aggregator.config import Preset
from fedcart.aggregator.privacy import default_delta
from fedcart.aggregator.statedir import StateDir
from fedcart.data.cli_options import data_options, load_split, validation_option
from fedcart.data.evaluation import Split
from fedcart.model_export.keys import load_or_create_signing_key
from fedcart.model_export.model import TENSOR_NAMES, n_parameters, trained_groups
from fedcart.protocol.statistics import MAX_HEAD
from fedcart.protocol.terms import Task
from fedcart.protocol.update import TRAIN
from fedcart.simulation.central import Row, baseline_rows, central_rows
from fedcart.simulation.central_training import TrainConfig
from fedcart.simulation.derived import (
    CONNECTED_SHARE,
    EVALUATION_COHORT,
    STATISTICS_BYTES,
    STATISTICS_COHORT,
    derive,
)
from fedcart.simulation.federated import (
    FederatedSettings,
    RoundRecord,
    RunResult,
    run_federated,
)
from fedcart.simulation.report import NO_DP, delta_warning, privacy_utility_rows, write_report
from fedcart.simulation.sizing import check_run
from fedcart.simulation.synth import Profile, generate

console = Console(stderr=True)
out = Console()
AGGREGATOR_DIR = "aggregator"  # run_federated's state directory, under its work directory
CONFIG_FILE = "config.toml"  # a run's aggregator configuration, in its report directory


def print_rows(title: str, rows: list[Row]) -> None:
    table = Table(title=title)
    table.add_column("model")
    for metric in ("HR@10", "NDCG@10", "MRR"):
        table.add_column(metric, justify="right")
    for row in rows:
        m = row.metrics
        table.add_row(row.name, f"{m.hr:.4f}", f"{m.ndcg:.4f}", f"{m.mrr:.4f}")
    out.print(table)


def write_json(path: Path | None, split: Split, rows: list[Row], **extra: Any) -> None:
    if path is None:
        return
    body = {"data": split.name, "catalog": split.n_items, "queries": len(split.queries),
            "rows": [r.as_json() for r in rows], **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    console.print(f"wrote {path}")


def with_clean_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (OSError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedcart-sim")
def main() -> None:
    """FedCart simulation: federated runs of the real service and devices on real basket
    data, central baselines and central training, all evaluated with the protocol of
    DESIGN.md section 6 (last basket of each user held out, one hidden item per test
    basket, HitRate@10, NDCG@10, MRR).

    Start with: fedcart-sim run --data uci --report out/run"""


@main.command()
@data_options
@validation_option
@click.option("--ease-lambda", type=float, default=None,
              help="EASE's L2 weight (default: 500 for uci, 250 otherwise).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as JSON to this file.")
@with_clean_errors
def baselines(json_path: Path | None, ease_lambda: float | None, **data: Any) -> None:
    """Central baselines: popularity, co-occurrence (cosine), EASE, own history."""
    split, _, digest = load_split(**data)
    with console.status("scoring baselines ...") as status:
        rows = baseline_rows(split, ease_lambda,
                             on_row=lambda r: status.update(f"done: {r.name} ..."))
    print_rows(f"Baselines on {split.name}", rows)
    write_json(json_path, split, rows, data_sha256=digest)


@main.command()
@data_options
@validation_option
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the signed model bundle to (must not exist).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 signing key file (created if missing; default: signing.key "
                   "beside --out). Its public half is written beside it as .pub.")
@click.option("--epochs", type=click.IntRange(1), default=TrainConfig.epochs, show_default=True)
@click.option("--dim", type=click.IntRange(0), default=TrainConfig.dim, show_default=True,
              help="Embedding size d.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              default=TrainConfig.lr_embeddings, show_default=True,
              help="SGD learning rate of the embeddings.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--baselines/--no-baselines", "with_baselines", default=True,
              show_default=True, help="Also score the central baselines for comparison.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as JSON to this file.")
@with_clean_errors
def central(out_dir: Path, key_path: Path | None, epochs: int, dim: int, lr: float,
            seed: int, with_baselines: bool, json_path: Path | None, **data: Any) -> None:
    """Train the FedCart model centrally (no privacy: the reference row), write it as a
    signed bundle, and print its metrics."""
    from fedcart.model_export.export import export_bundle

    if out_dir.exists():
        raise click.ClickException(f"{out_dir} exists; bundles are never overwritten")
    split, names, digest = load_split(**data)
    config = TrainConfig(dim=dim, epochs=epochs, lr_embeddings=lr, seed=seed)
    started = time.monotonic()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("epoch {task.completed}/"
                  "{task.total}  loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("train", total=epochs, loss="-")
        weights, neighbours, rows = central_rows(split, config, lambda e, loss: progress.update(
            task, completed=e + 1, loss=f"{loss:.4f}"))
    seconds = time.monotonic() - started
    key_file = key_path or out_dir.parent / "signing.key"
    created = not key_file.exists()
    key = load_or_create_signing_key(key_file)
    console.print(f"{'created the signing key' if created else 'signing with the key'} "
                  f"{key_file} (public half {key_file.with_suffix('.pub')}"
                  + ("; keep it secret: whoever holds it signs models devices accept)"
                     if created else ")"), soft_wrap=True)
    manifest = export_bundle(out_dir, weights, split.catalog,
                             [names[i] for i in split.catalog], key, neighbours=neighbours,
                             history_decay=config.history_decay)
    console.print(f"wrote signed bundle {out_dir} (V={manifest.n_items}, d={manifest.dim}); "
                  f"public key {bytes(key.verify_key).hex()}")
    if with_baselines:
        rows += baseline_rows(split)
    print_rows(f"Central training on {split.name} ({epochs} epochs, {seconds:.0f} s)", rows)
    write_json(json_path, split, rows, data_sha256=digest, config=dataclasses.asdict(config),
               train_seconds=seconds)


def _groups(ctx: click.Context, param: click.Parameter,
            value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        return trained_groups([g.strip() for g in value.split(",") if g.strip()])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def federated_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options of a federated run, shared by run and sweep."""
    d = FederatedSettings()
    options = [
        click.option("--rounds", type=click.IntRange(1), default=d.rounds, show_default=True,
                     help="Training rounds to complete. They follow the statistics rounds "
                          "(popularity, then co-occurrence; see --statistics), and evaluation "
                          "rounds run between them (see --eval-every), so --rounds 3 "
                          "completes 7 rounds, numbered 1 to 7 by the aggregator (more if a "
                          "round fails)."),
        click.option("--clients-per-round", type=click.FloatRange(min=1), default=None,
                     help=f"Expected cohort M; each device joins a round with probability "
                          f"q = M / N (Poisson sampling; beyond the C connections the "
                          "aggregator holds, M / C). Default "
                          f"{d.clients_per_round:g}."),
        click.option("--q", "sampling_rate", type=click.FloatRange(0, 1, min_open=True),
                     help="The sampling rate q itself, instead of --clients-per-round."),
        click.option("--dropout", type=click.FloatRange(0, 1, max_open=True),
                     default=d.dropout, show_default=True,
                     help="Probability that a sampled device goes offline at a random "
                          "protocol step of its round."),
        click.option("--secagg-k", type=click.IntRange(0), default=d.secagg_k,
                     show_default=True, help="SecAgg+ neighbours per device; 0 chooses k and "
                     "t per group from its size and --dropout, bounding P[a group fails]."),
        click.option("--group-size", type=click.IntRange(6), default=d.group_size,
                     show_default=True, help="Largest SecAgg+ group: a larger cohort splits "
                     "into groups whose sums add up, and a failed group costs only its "
                     "devices."),
        click.option("--local-epochs", type=click.IntRange(1), default=d.local_epochs,
                     show_default=True, help="Passes over its own baskets a device makes."),
        click.option("--dim", type=click.IntRange(0), default=d.dim, show_default=True,
                     help="Embedding size d."),
        click.option("--clip-norm", type=click.FloatRange(min=0, min_open=True),
                     help="C: each device clips its update to this L2 norm (L1: Laplace). "
                          f"Default {Preset.NO_DP.value.clip_norm:g} without DP, "
                          f"{Preset.DP.value.clip_norm:g} with (only the blend trains)."),
        click.option("--statistics/--no-statistics", default=True, show_default=True,
                     help="Begin with the statistics rounds (popularity, then co-occurrence "
                          "over the head items) that give the model its item-item table."),
        click.option("--statistics-q", "statistics_sampling_rate",
                     type=click.FloatRange(0, 1, min_open=True),
                     help="q of the statistics rounds: below 1 each is over a Poisson sample "
                          "of the connected devices, and the accountant grants the "
                          f"amplification. Default: 1 up to {STATISTICS_COHORT:,} devices "
                          "(when all can be connected), beyond an expected "
                          f"min({STATISTICS_COHORT:,}, {CONNECTED_SHARE:g} x the connected "
                          "devices) (README, 'Sizing a run')."),
        click.option("--eval-q", "evaluation_sampling_rate",
                     type=click.FloatRange(0, 1, min_open=True),
                     help="q of the evaluation rounds. Default: the training rounds' q, "
                          f"raised to an expected min({CONNECTED_SHARE:g} x the connected "
                          f"devices, {EVALUATION_COHORT:,})."),
        click.option("--popularity-noise-ratio", type=click.FloatRange(min=0, min_open=True),
                     default=d.popularity_noise_ratio, show_default=True,
                     help="The popularity round's noise multiplier over the co-occurrence "
                          "round's: how the budget is split between them."),
        click.option("--training-noise-ratio", type=click.FloatRange(min=0, min_open=True),
                     help="The training rounds' noise multiplier over the co-occurrence "
                          f"round's. Default {Preset.DP.value.training_noise_ratio:g} "
                          "with DP."),
        click.option("--head-items", type=click.IntRange(2, MAX_HEAD),
                     help="M: the co-occurrence round covers the M most popular items "
                          f"(M(M+1)/2 values per device). Default "
                          f"{Preset.NO_DP.value.head_items} without DP, "
                          f"{Preset.DP.value.head_items} with, at most V and at most what "
                          f"keeps the round's uploads within {STATISTICS_BYTES / 1e9:g} GB."),
        click.option("--train-groups", callback=_groups, metavar="NAME,...",
                     help="Parameter groups training rounds train and upload, of "
                          f"{','.join(TENSOR_NAMES)}. Default "
                          f"{','.join(Preset.NO_DP.value.train_groups)} without DP, "
                          f"{','.join(Preset.DP.value.train_groups)} with."),
        click.option("--examples-per-round", type=click.IntRange(1),
                     default=d.examples_per_round, show_default=True,
                     help="Leave-one-out examples of its newest basket a device trains on."),
        click.option("--server-lr", type=click.FloatRange(min=0, min_open=True),
                     default=d.optimizer_lr, show_default=True,
                     help="FedAdam's server learning rate."),
        click.option("--workers", type=click.IntRange(1), default=d.workers,
                     show_default=True, help="Processes the simulated devices run in."),
        click.option("--eval-every", type=click.IntRange(1), default=d.eval_every,
                     show_default=True, help="Evaluate every n-th trained model, the "
                                             "model the statistics rounds give, and the last: "
                                             "in a federated evaluation round (on the devices' "
                                             "own baskets, see --eval-q), and centrally on "
                                             "the test baskets."),
        click.option("--seed", type=int, default=d.seed, show_default=True,
                     help="Seeds model v0 and the dropout draws (sampling and masks use "
                          "the OS CSPRNG, as in production)."),
        click.option("--report", "report_dir", required=True,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Directory for index.html, report.md, the PNG plots, "
                          "metrics.json and the aggregator's config.toml (one per run in "
                          "a sweep), with the trained model."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also copy metrics.json to this file."),
        click.option("--baselines/--no-baselines", "with_baselines", default=True,
                     show_default=True, help="Score the central baselines for the report."),
        click.option("--central/--no-central", "with_central", default=True,
                     show_default=True, help="Train the model centrally (no privacy) for "
                                             "the report's reference row."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(rounds: int, clients_per_round: float | None, sampling_rate: float | None,
              server_lr: float, **kwargs: Any) -> FederatedSettings:
    if clients_per_round is None and sampling_rate is None:
        clients_per_round = FederatedSettings().clients_per_round
    return FederatedSettings(rounds=rounds, clients_per_round=clients_per_round,
                             sampling_rate=sampling_rate, optimizer_lr=server_lr, **kwargs)


def _reference_rows(split: Split, dim: int, with_baselines: bool,
                    with_central: bool) -> tuple[list[Row], list[Row]]:
    base: list[Row] = []
    central: list[Row] = []
    if with_baselines:
        with console.status("scoring the central baselines ..."):
            base = baseline_rows(split)
    if with_central:
        config = TrainConfig(dim=dim)
        with Progress(TextColumn("central training (reference row)"), BarColumn(),
                      TextColumn("epoch {task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("central", total=config.epochs)
            _, _, central = central_rows(split, config, lambda e, _: progress.update(
                task, completed=e + 1))
    return base, central


def _round_line(run: str, record: RoundRecord) -> str:
    """One round as a line of a log: what ran, how it ended, how long, and its quality (an
    evaluation round's: its estimate, and the central figure of the same quantity)."""
    quality = f", HR@10 {record.hr:.4f}" if record.hr is not None else ""
    if record.estimate is not None:
        hr = record.estimate["hr"]
        central = (f" (central {record.central_estimate['hr']:.4f})"
                   if record.central_estimate and record.central_estimate["hr"] is not None
                   else "")
        quality = (f", version {record.model_version} federated HR@10 {hr['value']:.4f} "
                   f"[{hr['low']:.4f}, {hr['high']:.4f}]{central}")
    spent = f", epsilon {record.epsilon:.2f}" if record.epsilon else ""
    return (f"{run}: round {record.round} ({record.task}) {record.status}, "
            f"{record.survivors}/{record.sampled} devices, {record.seconds:.0f} s"
            f"{quality}{spent}")


def _run_with_progress(split: Split, names: dict[str, str], settings: FederatedSettings,
                       index: str, keep_model: Path, keep_config: Path) -> RunResult:
    """Run with a progress bar (a line a round when stderr is no terminal); copy the last
    model to ``keep_model`` and the aggregator's config.toml, as it ran, to
    ``keep_config``."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("round {task.completed}/{task.total}"),
               TextColumn("HR@10 {task.fields[hr]}  eps {task.fields[eps]}  "
                          "survivors {task.fields[survivors]}  {task.fields[status]}"),
               TimeElapsedColumn()]
    with tempfile.TemporaryDirectory(prefix="fedcart-sim-") as tmp, \
            Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{index}{settings.name()}", total=settings.rounds, hr="-",
                                 eps="-", survivors="-", status="")

        def on_round(record: RoundRecord) -> None:
            fields: dict[str, Any] = {"survivors": f"{record.survivors}/{record.sampled}",
                                      "status": "" if record.status == "completed"
                                      else f"(round {record.round} {record.status})"}
            if record.task == Task.EVALUATE:
                fields["status"] = f"evaluation {record.status}"
            elif record.task != TRAIN:
                fields["status"] = f"{record.task} statistic {record.status}"
            if record.status == "completed" and record.task == TRAIN:
                progress.advance(task)
                fields["eps"] = (f"{record.epsilon:.2f}" if settings.mechanism != "none"
                                 else "none")
            if record.hr is not None:
                fields["hr"] = f"{record.hr:.4f}"
            progress.update(task, **fields)
            if not console.is_terminal:  # a log file gets a line a round instead of a bar
                console.print(_round_line(f"{index}{settings.name()}", record),
                              soft_wrap=True)

        result = run_federated(split, names, settings, Path(tmp), on_round=on_round,
                               on_status=lambda m: progress.update(task, status=m),
                               keep_model=keep_model)
        served = StateDir(Path(tmp) / AGGREGATOR_DIR).config
        if served.is_file():  # absent only when the run failed before it began
            keep_config.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(served, keep_config)
    if result.interrupted:
        console.print("[yellow]stopped early: the report covers the rounds done[/]")
    return result


def _command_line(ctx: click.Context) -> str:
    """The command that repeats this run: every option that differs from its default."""
    words = ["fedcart-sim", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or value == param.default or value is None:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            if value or param.secondary_opts:
                words.append(flag if value else param.secondary_opts[0])
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _slug(settings: FederatedSettings) -> str:
    """A sweep run's name in file names: no-dp, eps-2, ..."""
    return "no-dp" if settings.mechanism == NO_DP else f"eps-{settings.epsilon:g}"


def _say_derived(split: Split, settings: FederatedSettings) -> None:
    """Say, before the run, the values derived from the data (derived.py) that it will
    use; the report lists them again."""
    devices = sum(1 for baskets in split.train if baskets)
    for choice in derive(settings, devices, split.n_items).choices:
        console.print(f"derived {choice}", soft_wrap=True, highlight=False)


def _warn_delta(split: Split, settings: FederatedSettings) -> None:
    """Say on stderr, before anything runs, when the run's DP delta is too large for its
    population (the report says it again)."""
    if settings.mechanism == NO_DP:
        return
    devices = sum(1 for baskets in split.train if baskets)
    warning = delta_warning(settings.delta or default_delta(devices), devices)
    if warning is not None:
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)


def _write(report_dir: Path, json_path: Path | None, split: Split, digest: str,
           dim: int, base: list[Row], central: list[Row], results: list[RunResult],
           config_files: list[str]) -> None:
    users = sum(1 for baskets in split.train if baskets)
    report = {
        "tool": "fedcart-sim", "command": _command_line(click.get_current_context()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {"name": split.name, "sha256": digest, "devices": users,
                 "catalog": split.n_items, "queries": len(split.queries)},
        "model": {"dim": dim, "parameters": n_parameters(split.n_items, dim)},
        "baselines": [r.as_json() for r in base], "central": [r.as_json() for r in central],
        "runs": [{**r.as_json(), "config_file": name}
                 for r, name in zip(results, config_files, strict=True)],
    }
    index = write_report(report_dir, report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report_dir / "metrics.json", json_path)
    table = Table(title=f"Privacy and utility on {split.name}")
    for column in ("model", "HR@10", "NDCG@10", "MRR", "epsilon"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in privacy_utility_rows(report):
        table.add_row(row["name"], f"{row['hr']:.4f}", f"{row['ndcg']:.4f}",
                      f"{row['mrr']:.4f}", "-" if row["epsilon"] is None
                      else f"{row['epsilon']:.2f}")
    out.print(table)
    console.print(f"report: [bold]{index}[/] (also report.md, metrics.json, PNG plots, "
                  f"{', '.join(config_files)})")


@main.command()
@data_options
@validation_option
@federated_options
@click.option("--epsilon", type=click.FloatRange(min=0, min_open=True),
              help="Gaussian DP: calibrate the noise so the run spends this epsilon.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="DP delta (default 1 / (100 N) for N devices: N delta, the chance that the "
                   "guarantee fails for some user, is 1%).")
@click.option("--noise-multiplier", type=click.FloatRange(min=0, min_open=True),
              help="DP with this noise multiplier z (noise std z*C) instead of a target "
                   "epsilon.")
@click.option("--laplace", is_flag=True, help="Laplace noise (pure epsilon per round, L1 "
                                              "clip) instead of Gaussian.")
@click.option("--no-dp", is_flag=True, help="Secure aggregation without DP noise (the "
                                            "default when no DP option is given).")
@with_clean_errors
def run(epsilon: float | None, delta: float | None, noise_multiplier: float | None,
        laplace: bool, no_dp: bool, report_dir: Path, json_path: Path | None,
        with_baselines: bool, with_central: bool, data_spec: str, user_col: str | None,
        item_col: str | None, time_col: str | None, basket_col: str | None,
        name_col: str | None, validation: bool, **options: Any) -> None:
    """A federated deployment on real data: the aggregator service and one edge client per
    user, over loopback websockets, with secure aggregation (and DP unless --no-dp) in
    every round; writes the report. Ctrl-C stops and still writes the report."""
    if no_dp and (epsilon or noise_multiplier or laplace):
        raise click.UsageError("--no-dp excludes --epsilon, --noise-multiplier and --laplace")
    mechanism = ("none" if not (epsilon or noise_multiplier)
                 else "laplace" if laplace else "gaussian")
    settings = _settings(mechanism=mechanism, epsilon=epsilon, delta=delta,
                         noise_multiplier=noise_multiplier, **options)
    split, names, digest = load_split(data_spec, user_col, item_col, time_col, basket_col,
                                      name_col, validation)
    check_run(split, [settings], console.print, with_baselines)
    _say_derived(split, settings)
    _warn_delta(split, settings)
    base, central = _reference_rows(split, settings.dim, with_baselines, with_central)
    result = _run_with_progress(split, names, settings, "", report_dir / "model",
                                report_dir / CONFIG_FILE)
    _write(report_dir, json_path, split, digest, settings.dim, base, central, [result],
           [CONFIG_FILE])


@main.command()
@data_options
@validation_option
@federated_options
@click.option("--epsilons", default="2,8", show_default=True, metavar="E,E,...",
              help="Target epsilons of the DP runs (Gaussian, delta 1/(100 N)); a run "
                   "without DP comes first.")
@click.option("--dp-rounds", type=click.IntRange(1),
              help="Training rounds of each DP run, after its statistics rounds (default: "
                   "--rounds). Fewer rounds spend the same epsilon with less noise per round.")
@with_clean_errors
def sweep(epsilons: str, dp_rounds: int | None, report_dir: Path, json_path: Path | None,
          with_baselines: bool, with_central: bool, data_spec: str, user_col: str | None,
          item_col: str | None, time_col: str | None, basket_col: str | None, name_col: str | None,
          validation: bool, **options: Any) -> None:
    """The privacy-utility table: one run without DP, then one per target epsilon, all
    with secure aggregation and the same settings; one combined report."""
    try:
        targets = [float(e) for e in epsilons.split(",") if e.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"not a list of numbers: {epsilons!r}",
                                 param_hint="--epsilons") from exc
    if any(e <= 0 for e in targets):
        raise click.BadParameter("epsilons must be positive", param_hint="--epsilons")
    plans = [_settings(**options)]
    if dp_rounds is not None:
        options["rounds"] = dp_rounds
    plans += [_settings(mechanism="gaussian", epsilon=e, **options) for e in targets]
    split, names, digest = load_split(data_spec, user_col, item_col, time_col, basket_col,
                                      name_col, validation)
    check_run(split, plans, console.print, with_baselines)
    _say_derived(split, plans[0])
    base, central = _reference_rows(split, plans[0].dim, with_baselines, with_central)
    results: list[RunResult] = []
    config_files: list[str] = []
    for i, settings in enumerate(plans, 1):
        config_files.append(f"config-{_slug(settings)}.toml")
        result = _run_with_progress(split, names, settings, f"[{i}/{len(plans)}] ",
                                    report_dir / "models" / _slug(settings),
                                    report_dir / config_files[-1])
        results.append(result)
        if result.interrupted:
            break
    _write(report_dir, json_path, split, digest, plans[0].dim, base, central, results,
           config_files)


@main.command()
@click.option("--users", type=click.IntRange(1), required=True, help="Users to generate.")
@click.option("--items", type=click.IntRange(2), required=True, help="Catalog size V.")
@click.option("--out", "out_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The .csv.gz to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--like", type=click.Choice([p.name.lower() for p in Profile]), default="uci",
              show_default=True, help="The bundled set whose basket sizes, baskets per "
                                      "user, repeat rate and popularity curve to imitate.")
@with_clean_errors
def synth(users: int, items: int, out_path: Path, seed: int, like: str) -> None:
    """Synthetic baskets for scale tests and benchmarks only, never a quality claim: sizes,
    counts and repeats shaped like a bundled set, items without real structure. Read it
    back with --data FILE --user-col user_id --item-col item_id --time-col order_number."""
    started = time.monotonic()
    with console.status(f"writing {users:,} users over {items:,} items ..."):
        made = generate(users, items, seed, out_path, Profile[like.upper()])
    console.print(f"wrote {out_path}: {made.users:,} users, {made.items:,} items bought, "
                  f"{made.baskets:,} baskets, {made.rows:,} rows "
                  f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
