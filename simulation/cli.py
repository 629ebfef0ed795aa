"""``fedcart-sim``: what a data scientist runs before shipping.

Built on click (subcommands, typed options, generated --help) and rich (tables, progress).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from model_export.cli_options import data_options, load_split
from model_export.evaluation import Split
from model_export.keys import load_or_create_signing_key
from model_export.train import TrainConfig
from simulation.central import Row, baseline_rows, central_rows

console = Console(stderr=True)
out = Console()


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
def main() -> None:
    """FedCart simulation: baselines, central training, and (later) federated runs on real
    basket data, evaluated with the protocol of DESIGN.md section 6 (last basket of each
    user held out, one hidden item per test basket, HitRate@10, NDCG@10, MRR)."""


@main.command()
@data_options
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
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the signed model bundle to (must not exist).")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 signing key file (created if missing; default: signing.key "
                   "beside --out). Its public half is written beside it as .pub.")
@click.option("--epochs", type=click.IntRange(1), default=TrainConfig.epochs, show_default=True)
@click.option("--dim", type=click.IntRange(1), default=TrainConfig.dim, show_default=True,
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
    from model_export.export import export_bundle

    if out_dir.exists():
        raise click.ClickException(f"{out_dir} exists; bundles are never overwritten")
    split, names, digest = load_split(**data)
    config = TrainConfig(dim=dim, epochs=epochs, lr_embeddings=lr, seed=seed)
    started = time.monotonic()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("epoch {task.completed}/"
                  "{task.total}  loss {task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("train", total=epochs, loss="-")
        weights, rows = central_rows(split, config, lambda e, loss: progress.update(
            task, completed=e + 1, loss=f"{loss:.4f}"))
    seconds = time.monotonic() - started
    key = load_or_create_signing_key(key_path or out_dir.parent / "signing.key")
    manifest = export_bundle(out_dir, weights, split.catalog,
                             [names[i] for i in split.catalog], key,
                             history_decay=config.history_decay)
    console.print(f"wrote signed bundle {out_dir} (V={manifest.n_items}, d={manifest.dim}); "
                  f"public key {bytes(key.verify_key).hex()}")
    if with_baselines:
        rows += baseline_rows(split)
    print_rows(f"Central training on {split.name} ({epochs} epochs, {seconds:.0f} s)", rows)
    write_json(json_path, split, rows, data_sha256=digest, config=config.__dict__,
               train_seconds=seconds)


if __name__ == "__main__":
    sys.exit(main())
