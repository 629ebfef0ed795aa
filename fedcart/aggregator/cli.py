"""``fedcart-aggregator``: the operator's command line (click; rich for tables)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from fedcart.aggregator.config import AggregatorConfig, ConfigError, load_config
from fedcart.aggregator.privacy import epsilon_spent
from fedcart.aggregator.statedir import StateDir, StateDirInUse, init_state
from fedcart.aggregator.store import Store
from fedcart.model_export.cli_options import data_options, load_split
from fedcart.model_export.keys import read_public_key
from fedcart.protocol.transport import is_loopback

out = Console()
state_option = click.option("--state", "state_dir", required=True,
                            type=click.Path(file_okay=False, path_type=Path),
                            help="The aggregator's state directory.")


def _state(state_dir: Path) -> StateDir:
    state = StateDir(state_dir)
    try:
        state.check()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    return state


def _config(state: StateDir, **overrides: Any) -> AggregatorConfig:
    """The state's config.toml with the given options (None: not given) applied; a bad
    file or value is a one-line error."""
    try:
        config = load_config(state.config)
        return dataclasses.replace(config, **{k: v for k, v in overrides.items()
                                              if v is not None})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """FedCart aggregator: enroll devices, serve rounds of secure aggregation with central
    differential privacy, publish signed models, and account for privacy."""


@main.command()
@state_option
@data_options
@click.option("--dim", type=click.IntRange(1), default=128, show_default=True,
              help="Embedding size d of the model.")
@click.option("--seed", type=int, default=None, help="Seed of the initial embeddings.")
def init(state_dir: Path, dim: int, seed: int | None, **data: Any) -> None:
    """Create the signing key, config.toml (commented defaults), the database, and model
    version 0 over the data set's catalog. Only the catalog (item ids and names) is read
    from the data; no basket reaches the aggregator."""
    if (state_dir / "state.db").exists():
        raise click.ClickException(f"{state_dir} is already initialised")
    split, names, _ = load_split(**data)
    state = init_state(state_dir, list(split.catalog), [names[i] for i in split.catalog],
                       dim=dim, seed=seed)
    public = bytes(state.signing_key().verify_key).hex()
    out.print(f"initialised {state_dir}: V={split.n_items}, d={dim}, model version 0")
    out.print(f"config: {state.config}")
    out.print(f"public key (devices pin it): {public}")


@main.command()
@state_option
@click.option("--device-key", required=True, metavar="HEX|FILE",
              help="The device's Ed25519 public key (fedcart-device init prints it).")
def enroll(state_dir: Path, device_key: str) -> None:
    """Allow one device to check in; prints its client id."""
    state = _state(state_dir)
    try:
        key = read_public_key(device_key)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    store = Store(state.database)
    click.echo(store.enroll(key))
    store.close()


@main.command()
@state_option
@click.option("--ttl", type=click.FloatRange(min=1), default=86400.0, show_default=True,
              help="Seconds the token stays valid.")
def token(state_dir: Path, ttl: float) -> None:
    """Issue a one-time enrollment token (a device presents it at its first check-in)."""
    store = Store(_state(state_dir).database)
    click.echo(store.issue_token(ttl))
    store.close()


def _check_transport(config: AggregatorConfig, insecure: bool) -> None:
    """Refuse plaintext on a network address unless the operator said --insecure: device
    traffic carries their keys and masked updates, and a typo'd host must not expose it."""
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


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
def serve(state_dir: Path, host: str | None, port: int | None, tls_cert: str | None,
          tls_key: str | None, insecure: bool, max_rounds: int | None,
          verbose: bool) -> None:
    """Serve rounds until SIGTERM/SIGINT, --max-rounds, or the privacy budget is spent.
    Takes the state directory for the process's life: a second serve on it is refused."""
    from fedcart.aggregator.service import Aggregator

    state = _state(state_dir)
    config = _config(state, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                     max_rounds=max_rounds)
    _check_transport(config, insecure)
    try:
        lock = state.lock()
    except StateDirInUse as exc:
        raise click.ClickException(str(exc)) from exc
    _configure_logging(verbose)

    async def run() -> None:
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

    with lock:
        asyncio.run(run())


@main.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path, as_json: bool) -> None:
    """Rounds, model versions and privacy spent so far."""
    state = _state(state_dir)
    config = _config(state)
    store = Store(state.database)
    rounds, models = store.rounds(), store.models()
    eps = epsilon_spent(store.ledger(), config.delta)
    body = {"enrolled": store.enrolled(), "model_version": models[-1].version,
            "epsilon": eps, "delta": config.delta, "budget_epsilon": config.budget_epsilon,
            "rounds": [dataclasses.asdict(r) for r in rounds]}
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


@main.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ledger(state_dir: Path, as_json: bool) -> None:
    """The privacy ledger: every charged round and epsilon after it (RDP, and PLD)."""
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
