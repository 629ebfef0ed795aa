"""``fedcart-aggregator``: the operator's command line (click; rich for tables).

The service's dependencies (onnx, pandas, scipy, dp_accounting) load inside the commands
that need them: ``--help`` and ``--version`` answer at once."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import json
import logging
import os
import signal
import ssl
import sys
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from fedcart import __version__
from fedcart.data.cli_options import data_options

if TYPE_CHECKING:
    from fedcart.aggregator.config import AggregatorConfig, Preset
    from fedcart.aggregator.statedir import StateDir
    from fedcart.model_export.model import Neighbours
    from fedcart.protocol.evaluation import Estimate

out = Console()
err = Console(stderr=True)


class ExitCode(IntEnum):
    """``serve``'s exit status besides 0 (stopped as told) and click's 1 and 2."""

    BUDGET_SPENT = 3  # the service stopped itself: the next round would overspend privacy
    CANNOT_ACCOUNT = 4  # the service stopped itself: a round's privacy cost is not computable


state_option = click.option("--state", "state_dir", required=True,
                            type=click.Path(file_okay=False, path_type=Path),
                            help="The aggregator's state directory.")


def _state(state_dir: Path) -> StateDir:
    from fedcart.aggregator.statedir import StateDir

    state = StateDir(state_dir)
    try:
        state.check()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    return state


def _config(state: StateDir, **overrides: Any) -> AggregatorConfig:
    """The state's config.toml with the given options (None: not given) applied; a bad
    file or value is a one-line error."""
    from fedcart.aggregator.config import ConfigError, load_config

    try:
        config = load_config(state.config)
        return dataclasses.replace(config, **{k: v for k, v in overrides.items()
                                              if v is not None})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedcart-aggregator")
def main() -> None:
    """FedCart aggregator: enroll devices, serve rounds of secure aggregation with central
    differential privacy, publish signed models, and account for privacy."""


def _catalog(catalog: Path | None, id_col: str, name_col: str | None,
             data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(item ids, names) of ``--catalog``, or of ``--data``'s data set: exactly one."""
    if (catalog is None) == (data["data_spec"] is None):
        raise click.UsageError("give --catalog FILE (the item ids, and names with "
                               "--name-col), or --data with a basket data set")
    if catalog is None:
        from fedcart.data.cli_options import load_split

        split, names, _ = load_split(**data)
        return list(split.catalog), [names[i] for i in split.catalog]
    from fedcart.data.datasets import DataError, load_catalog

    try:
        items = load_catalog(catalog, id_col, name_col)
    except DataError as exc:
        raise click.ClickException(str(exc)) from exc
    if len(items) < 2:
        raise click.ClickException(f"{catalog}: a catalog needs at least 2 items, it has "
                                   f"{len(items)}")
    return list(items), list(items.values())


def _name_table(names: list[str], config: AggregatorConfig) -> Neighbours | None:
    """Version 0's item-item table: the item names' neighbours (name_neighbours.py), so that
    a device recommends items named like its cart's before any round. None where no two
    names share a word (ids for names), or the config has no statistics rounds or no name
    weight (then its models carry no names' table either): an all-zero V x K table would
    only make the bundle larger."""
    import numpy as np

    from fedcart.aggregator.item_item import table_width
    from fedcart.aggregator.name_neighbours import with_names
    from fedcart.model_export.model import Neighbours

    stats = config.statistics
    if stats is None or stats.name_weight == 0:
        return None
    k = table_width(stats.neighbours, len(names))
    empty = Neighbours(np.zeros((len(names), k), np.int64),
                       np.zeros((len(names), k), np.float32))
    table = with_names(empty, names, stats.name_weight)
    return table if table.weights.any() else None


@main.command()
@state_option
@click.option("--catalog", type=click.Path(path_type=Path), metavar="FILE",
              help="The item catalog: a .csv, .csv.gz or .zip with one row per item.")
@click.option("--id-col", default="item_id", show_default=True,
              help="--catalog's column with the item id.")
@functools.partial(data_options, required=False)
@click.option("--dp/--no-dp", default=None,
              help="Write the tuned preset with differential privacy or without (default: "
                   "with, the config's default mechanism).")
@click.option("--dim", type=click.IntRange(0), default=None,
              help="Embedding size d of the model (default: the preset's).")
@click.option("--seed", type=int, default=None, help="Seed of the initial embeddings.")
def init(state_dir: Path, catalog: Path | None, id_col: str, dp: bool | None,
         dim: int | None, seed: int | None, **data: Any) -> None:
    """Create the signing key, config.toml (the tuned preset of the chosen privacy regime,
    every key commented), the database, and model version 0 over the catalog: --catalog's
    item ids (and names, with --name-col), or --data's. No basket reaches the aggregator;
    with item names, version 0 already recommends items named like the cart's."""
    from fedcart.aggregator.config import AggregatorConfig, Preset
    from fedcart.aggregator.statedir import init_state

    if (state_dir / "state.db").exists():
        raise click.ClickException(f"{state_dir} is already initialised")
    items, names = _catalog(catalog, id_col, data["name_col"], data)
    preset = Preset.of(AggregatorConfig.mechanism) if dp is None else \
        (Preset.DP if dp else Preset.NO_DP)
    config = preset.config()
    dim = preset.value.dim if dim is None else dim
    state = init_state(state_dir, items, names, dim=dim, seed=seed, config=config,
                       neighbours=_name_table(names, config))
    public = bytes(state.signing_key().verify_key).hex()
    out.print(f"initialised {state_dir}: V={len(items)}, d={dim}, model version 0")
    out.print(f"config: {state.config} ({_describe(preset, config)})")
    out.print(f"public key (devices pin it): {public}")


def _describe(preset: Preset, config: AggregatorConfig) -> str:
    """The preset as init reports it: its name, regime and what it trains."""
    tuned = preset.value
    return (f"preset {preset.name}: mechanism {config.mechanism}, trains "
            f"{','.join(tuned.train_groups)}, clip {tuned.clip_norm:g}, head "
            f"{tuned.head_items} items")


@main.command()
@state_option
@click.option("--device-key", "device_keys", required=True, multiple=True,
              metavar="HEX|FILE", help="A device's Ed25519 public key (fedcart-device init "
                                       "prints it); repeat it to enroll several at once.")
def enroll(state_dir: Path, device_keys: tuple[str, ...]) -> None:
    """Allow devices to check in; prints each one's client id, a line each. All or none:
    one bad key enrolls nobody."""
    from fedcart.aggregator.store import Store
    from fedcart.model_export.keys import read_public_key

    state = _state(state_dir)
    try:
        keys = [read_public_key(k) for k in device_keys]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    store = Store(state.database)
    for client_id in store.enroll_many(keys):
        click.echo(client_id)
    store.close()


@main.command()
@state_option
@click.option("--ttl", type=click.FloatRange(min=1), default=86400.0, show_default=True,
              help="Seconds the token stays valid.")
def token(state_dir: Path, ttl: float) -> None:
    """Issue a one-time enrollment token (a device presents it at its first check-in)."""
    from fedcart.aggregator.store import Store

    store = Store(_state(state_dir).database)
    click.echo(store.issue_token(ttl))
    store.close()


def _check_transport(config: AggregatorConfig, insecure: bool) -> None:
    """Refuse plaintext on a network address unless the operator said --insecure: device
    traffic carries their keys and masked updates, and a typo'd host must not expose it."""
    from fedcart.protocol.transport import is_loopback

    if config.tls_cert:
        _check_tls(config.tls_cert, config.tls_key)
    elif not insecure and not is_loopback(config.host):
        raise click.ClickException(
            f"refusing to serve plaintext ws:// on {config.host or 'every interface'} (not "
            "a loopback address): set tls_cert and tls_key ([server] in config.toml, or "
            "--tls-cert/--tls-key), or pass --insecure")


def _check_tls(cert: str, key: str) -> None:
    """Load the certificate and key now, so that a missing or bad file is named in one line
    before anything starts (the service would otherwise fail deep in its startup)."""
    for what, path in (("tls_cert", cert), ("tls_key", key)):
        if not Path(path).is_file():
            raise click.ClickException(f"{what}: {path} does not exist")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise click.ClickException(f"cannot use TLS certificate {cert} with key {key}: "
                                   f"{exc}") from exc


def _listen_error(config: AggregatorConfig, exc: OSError) -> click.ClickException:
    """A failure to listen (the port in use, say) as one line."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = ": choose another with --port or [server] port" if exc.errno == errno.EADDRINUSE \
        else ""
    return click.ClickException(f"cannot listen on {config.host}:{config.port}: {reason}"
                                f"{hint}")


class _JsonLines(logging.Formatter):
    """One JSON object a line (time, level, logger, message), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(verbose: bool, as_json: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if as_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonLines())
    logging.getLogger("websockets").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ort_format_model").setLevel(logging.WARNING)


@main.command()
@state_option
@click.option("--host", help="Listen address (default: config.toml's, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (0: any free port).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="PEM certificate (chain): serve wss://.")
@click.option("--tls-key", type=click.Path(dir_okay=False),
              help="PEM private key of --tls-cert.")
@click.option("--insecure", is_flag=True,
              help="Allow plaintext ws:// on an address other than loopback (a test "
                   "network only: anyone on the path reads and alters the traffic).")
@click.option("--max-rounds", type=click.IntRange(0), help="Stop after this many rounds.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection.")
@click.option("--log-json", is_flag=True, help="Log one JSON object a line (time, level, "
                                               "logger, message).")
def serve(state_dir: Path, host: str | None, port: int | None, tls_cert: str | None,
          tls_key: str | None, insecure: bool, max_rounds: int | None,
          verbose: bool, log_json: bool) -> None:
    """Serve rounds until SIGTERM/SIGINT or --max-rounds (exit status 0), until the
    privacy budget is spent (exit status 3), or until a round's privacy cost cannot be
    computed (exit status 4), saying which in one line. Takes the state directory for the
    process's life: a second serve on it is refused."""
    from fedcart.aggregator.privacy import BudgetExceeded
    from fedcart.aggregator.service import Aggregator
    from fedcart.aggregator.statedir import StateDirInUse

    state = _state(state_dir)
    config = _config(state, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                     max_rounds=max_rounds)
    _check_transport(config, insecure)
    try:
        lock = state.lock()
    except StateDirInUse as exc:
        raise click.ClickException(str(exc)) from exc
    _configure_logging(verbose, log_json)

    async def run() -> Exception | None:
        """Serve; why the service stopped by itself (the privacy accounting refused the next
        round), or None when it stopped as told (a signal, max_rounds)."""
        aggregator = Aggregator(state, config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, aggregator.stop)
        listening = asyncio.Event()
        try:
            await aggregator.serve(listening)
        except OSError as exc:
            if listening.is_set():  # not a failure to listen: a real fault, in full
                raise
            raise _listen_error(config, exc) from exc
        return aggregator.stop_reason

    with lock:
        refused = asyncio.run(run())
    if isinstance(refused, BudgetExceeded):
        err.print(_budget_line(state, config), highlight=False, soft_wrap=True)
        click.get_current_context().exit(ExitCode.BUDGET_SPENT)
    if refused is not None:
        err.print(f"stopped: {refused}", highlight=False, soft_wrap=True)
        click.get_current_context().exit(ExitCode.CANNOT_ACCOUNT)


def _budget_line(state: StateDir, config: AggregatorConfig) -> str:
    """The one line serve ends with when the privacy accounting stopped it."""
    from fedcart.aggregator.privacy import epsilon_spent
    from fedcart.aggregator.store import Store

    store = Store(state.database)
    eps = epsilon_spent(store.ledger(), config.delta)
    store.close()
    return (f"privacy budget spent: epsilon {eps:.4g} of {config.budget_epsilon:g} at delta "
            f"{config.delta:g}; the next round would go over it (the log above says why)")


@main.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path, as_json: bool) -> None:
    """Rounds, model versions, their federated evaluation estimates and privacy spent so
    far."""
    from fedcart.aggregator.privacy import epsilon_spent
    from fedcart.aggregator.store import Store

    state = _state(state_dir)
    config = _config(state)
    store = Store(state.database)
    rounds, models, estimates = store.rounds(), store.models(), store.estimates()
    serving = store.serving_version()
    eps = epsilon_spent(store.ledger(), config.delta)
    body = {"enrolled": store.enrolled(), "model_version": models[-1].version,
            "serving_version": serving,
            "estimates": [e.to_json() for e in estimates],
            "epsilon": eps, "delta": config.delta, "budget_epsilon": config.budget_epsilon,
            "rounds": [dataclasses.asdict(r) for r in rounds],
            "models": [{"version": m.version, "round_id": m.round_id,
                        "bundle_kept": (state.root / m.bundle_dir).is_dir()} for m in models]}
    store.close()
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    out.print(f"{body['enrolled']} devices enrolled; model version {body['model_version']}; "
              f"epsilon {eps:.4g} of {config.budget_epsilon:g} at delta {config.delta:g}")
    table = Table(title="rounds")
    for column in ("round", "task", "status", "model", "sampled", "survivors", "seconds"):
        table.add_column(column, justify="right")
    table.add_column("SecAgg+ groups", justify="left")
    for r in rounds:
        seconds = f"{r.finished_at - r.started_at:.2f}" if r.finished_at else "-"
        table.add_row(str(r.round_id), str(r.detail.get("task", "-")), r.status,
                      str(r.model_version), str(r.sampled),
                      str(r.survivors if r.survivors is not None else "-"), seconds,
                      r.secagg())
    out.print(table)
    if estimates:
        out.print(_estimates_table(estimates, serving))


def _estimates_table(estimates: list[Estimate], serving: int | None) -> Table:
    """The federated evaluation of each model version, with its intervals."""
    from fedcart.protocol.evaluation import CONFIDENCE

    table = Table(title=f"federated evaluation ({round(100 * CONFIDENCE)}% intervals; the "
                        f"serving version is marked *)")
    for column in ("model", "queries", "HitRate@10", "NDCG@10", "MRR", "repeat", "explore"):
        table.add_column(column, justify="right")
    for e in estimates:
        table.add_row(f"{e.model_version}{' *' if e.model_version == serving else ''}",
                      f"{e.queries:.0f}", str(e.hr), str(e.ndcg), str(e.mrr),
                      f"{e.repeat_hr.value:.4f}", f"{e.explore_hr.value:.4f}")
    return table


@main.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ledger(state_dir: Path, as_json: bool) -> None:
    """The privacy ledger: every charged round and epsilon after it (RDP, and PLD)."""
    from fedcart.aggregator.privacy import epsilon_spent
    from fedcart.aggregator.store import Store

    state = _state(state_dir)
    delta = _config(state).delta
    store = Store(state.database)
    charges = store.ledger()
    store.close()
    rows = [{**dataclasses.asdict(c), "epsilon_rdp": epsilon_spent(charges[:i + 1], delta),
             "epsilon_pld": epsilon_spent(charges[:i + 1], delta, "pld")}
            for i, c in enumerate(charges)]
    if as_json:
        click.echo(json.dumps({"delta": delta, "rounds": rows}, indent=2))
        return
    table = Table(title=f"privacy ledger (delta {delta:g})")
    for column in ("round", "q", "z", "mechanism", "epsilon (RDP)", "epsilon (PLD)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["round_id"]), f"{r['sampling_rate']:g}",
                      f"{r['noise_multiplier']:.4g}", r["mechanism"],
                      f"{r['epsilon_rdp']:.4g}", f"{r['epsilon_pld']:.4g}")
    out.print(table)


if __name__ == "__main__":
    sys.exit(main())
