"""Command-line options shared by the tools that read basket data (fedcart-sim,
fedcart-aggregator init): click decorators and the loader behind them. The loader's
imports (pandas) wait for a command to run, so that --help stays quick."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

if TYPE_CHECKING:
    from fedcart.data.evaluation import Split

__all__ = ["data_options", "load_split", "validation_option"]

console = Console(stderr=True)


def data_options(func: Callable[..., Any], required: bool = True) -> Callable[..., Any]:
    """--data (``required``: a command that can do without it says so) and the column
    options of a user's own CSV, shared by every subcommand."""
    options = [
        click.option("--data", "data_spec", required=required, metavar="uci|instacart|PATH",
                     help="A bundled data set, or a .csv/.csv.gz/.zip of your own baskets "
                          "(then give the column options)."),
        click.option("--user-col", help="Column with the user (customer) id."),
        click.option("--item-col", help="Column with the item id."),
        click.option("--time-col", help="Column that orders a user's baskets in time."),
        click.option("--basket-col", help="Column with the basket id (default: one basket "
                                          "per user and time value)."),
        click.option("--name-col", help="Column with item names (optional)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


validation_option = click.option(
    "--validation", is_flag=True,
    help="Hold out each user's second-to-last basket instead of the last, and drop the "
         "last: the split for choosing settings without touching the test baskets.")


def load_split(data_spec: str, user_col: str | None, item_col: str | None,
               time_col: str | None, basket_col: str | None, name_col: str | None,
               validation: bool = False) -> tuple[Split, dict[str, str], str]:
    from fedcart.data.datasets import CsvColumns, DataError, load
    from fedcart.data.evaluation import make_split, validation_data

    columns = None
    if data_spec not in ("uci", "instacart"):
        missing = [flag for flag, value in (("--user-col", user_col), ("--item-col", item_col),
                                            ("--time-col", time_col)) if not value]
        if missing:
            raise click.UsageError(f"--data {data_spec} is a file: also give "
                                   f"{', '.join(missing)}")
        columns = CsvColumns(user=user_col, item=item_col, time=time_col,  # type: ignore[arg-type]
                             basket=basket_col, name=name_col)
    with console.status(f"loading {data_spec} ..."):
        try:
            data = load(data_spec, columns)
        except DataError as exc:
            raise click.ClickException(str(exc)) from exc
        split = make_split(validation_data(data) if validation else data)
    if not split.queries:
        raise click.ClickException(f"{data_spec}: no user has a test basket with 2 or more "
                                   "catalog items; nothing to evaluate")
    console.print(f"[bold]{data.name}[/]: {len(data.users):,} users, {data.n_baskets:,} "
                  f"baskets, catalog {split.n_items:,} items, {len(split.queries):,} "
                  f"{'validation' if validation else 'test'} queries "
                  f"(sha256 {data.sha256[:12]})")
    names = dict(zip(split.catalog, split.names, strict=True))
    return split, names, data.sha256
