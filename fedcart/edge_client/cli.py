"""``fedcart-device``: try the device runtime from a shell (click for the CLI), and pack a
bundle directory into the zip an app ships or a server hands out."""

from __future__ import annotations

import logging
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
import websockets

from fedcart import __version__
from fedcart.atomic_write import write_atomically
from fedcart.edge_client.device import Device, RoundReport
from fedcart.edge_client.recommender import OfflineRecommender, UnknownItemError
from fedcart.edge_client.store import DeviceStore
from fedcart.model_export.bundle import BundleError, pack_members, read_bundle
from fedcart.model_export.keys import read_public_key
from fedcart.protocol.transport import is_loopback


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


SHOWN_UNKNOWN = 5  # unknown item ids add-basket names before "and N more"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fedcart-device")
def main() -> None:
    """FedCart on the device: offline recommendations from a signed model bundle."""


state_option = click.option("--state", "state_dir", required=True,
                            type=click.Path(file_okay=False, path_type=Path),
                            help="The device's state directory.")


def _device(state_dir: Path) -> Device:
    store = DeviceStore(state_dir)
    key = store.get("server_key")
    if key is None:
        raise click.ClickException(f"{state_dir} is not a device: run fedcart-device init")
    try:
        return Device(state_dir, bytes.fromhex(key))
    except BundleError as exc:
        raise click.ClickException(f"the installed bundle does not verify: {exc}") from exc


@main.command()
@state_option
@click.option("--server-key", required=True, metavar="HEX|FILE",
              help="The aggregator's public key (fedcart-aggregator init prints it).")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, path_type=Path),
              help="A signed model bundle to install now, as an app ships with model "
                   "version 0: the device can then take part in the statistics rounds "
                   "without a download.")
def init(state_dir: Path, server_key: str, bundle_path: Path | None) -> None:
    """Create a device: its identity key and the pinned server key. Prints the device's
    public key for `fedcart-aggregator enroll`."""
    try:
        key = read_public_key(server_key)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    store = DeviceStore(state_dir)
    if store.get("server_key") not in (None, key.hex()):
        raise click.ClickException(f"{state_dir} is pinned to another server key")
    store.put("server_key", key.hex())
    device = Device(state_dir, key)
    if bundle_path is not None:
        try:
            device.install_members(read_bundle(bundle_path, key).members(), str(bundle_path))
        except BundleError as exc:
            raise click.ClickException(f"not installed: {exc}") from exc
    click.echo(device.identity.public.hex())


@main.command("add-basket")
@state_option
@click.option("--items", required=True, metavar="ID,ID,...", help="Items bought together.")
def add_basket(state_dir: Path, items: str) -> None:
    """Record a purchase on the device (it never leaves the device). Item ids outside the
    installed model's catalog are refused, and nothing is stored: a typo would otherwise
    be a basket no round ever uses."""
    device = _device(state_dir)
    basket = _ids(items)
    bundle = device.current_bundle()
    if bundle is None:
        click.echo("warning: no model installed: the item ids are not checked against a "
                   "catalog (fedcart-device init --bundle installs the app's)", err=True)
    else:
        catalog = set(bundle.items)
        unknown = list(dict.fromkeys(i for i in basket if i not in catalog))
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:SHOWN_UNKNOWN])
            more = (f" and {len(unknown) - SHOWN_UNKNOWN} more"
                    if len(unknown) > SHOWN_UNKNOWN else "")
            raise click.ClickException(
                f"not in the catalog of model version {bundle.manifest.model_version}: "
                f"{shown}{more}; nothing stored")
    try:
        device.add_basket(basket)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _trust(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that trusts the CA certificates in ``ca_file`` (PEM) alone, or the
    system's when None, and checks that the server's certificate names the URL's host."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise click.ClickException(f"--ca-file: {ca_file} does not exist") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise click.ClickException(f"--ca-file: {ca_file} holds no PEM CA certificate "
                                   f"({exc})") from exc


def _transport(url: str, ca_file: Path | None, insecure: bool) -> ssl.SSLContext | None:
    """The TLS context to connect to ``url`` with (None: plaintext). Plaintext is refused
    beyond loopback unless ``insecure``: the traffic carries this device's check-in and
    masked updates."""
    parts = urlsplit(url)
    host = parts.hostname
    try:
        valid = parts.scheme in ("ws", "wss") and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number in 0-65535
        valid = False
    if not valid or not host:
        raise click.ClickException(f"{url}: the URL must be ws:// or wss://, e.g. "
                                   "wss://aggregator.example:8765/ws")
    if parts.scheme == "wss":
        return _trust(ca_file)
    if ca_file is not None:
        raise click.ClickException("--ca-file is for wss:// URLs: this one is plaintext ws://")
    if not insecure and not is_loopback(host):
        raise click.ClickException(
            f"refusing plaintext ws:// to {host} (not a loopback address): use "
            "wss:// (with --ca-file for a private CA), or pass --insecure")
    return None


class _Warnings(logging.Handler):
    """Keeps the device's warnings (a refused bundle, a round left, the server refusing
    this device) to show when the session is over, the last one as the reason if the
    session ended early."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def _participate(device: Device, url: str, rounds: int, token: str | None,
                       tls: ssl.SSLContext | None) -> tuple[list[RoundReport], list[str]]:
    """The session's round reports, and the warnings the device logged during it."""
    warnings = _Warnings()
    logger = logging.getLogger("fedcart.device")
    logger.addHandler(warnings)
    try:
        reports = await device.participate(url, rounds, token, ssl_context=tls)
    finally:
        logger.removeHandler(warnings)
    return reports, warnings.messages


@main.command()
@state_option
@click.option("--url", required=True,
              help="The aggregator: wss://host:port/ws (ws:// only on loopback, e.g. "
                   "ws://127.0.0.1:8765/ws, unless --insecure).")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificate of the CA to trust for a wss:// URL (a private CA; by "
                   "default the system's CAs). The server's name is checked against it.")
@click.option("--insecure", is_flag=True,
              help="Allow plaintext ws:// to a host other than loopback (a test network "
                   "only: anyone on the path reads and alters the traffic).")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True)
@click.option("--token", help="One-time enrollment token, for a first check-in.")
def participate(state_dir: Path, url: str, ca_file: Path | None, insecure: bool, rounds: int,
                token: str | None) -> None:
    """Connect, take part in rounds of federated training, install the new model. Exits
    non-zero if the session ends before --rounds rounds (the aggregator refused this
    device, say)."""
    import asyncio

    tls = _transport(url, ca_file, insecure)
    device = _device(state_dir)
    try:
        reports, warnings = asyncio.run(_participate(device, url, rounds, token, tls))
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise click.ClickException(f"cannot reach {url}: {str(exc) or 'timed out'}") from exc
    ended_early = len(reports) < rounds
    for message in warnings[:-1] if ended_early else warnings:
        click.echo(f"warning: {message}", err=True)
    for r in reports:
        click.echo(f"round {r.round_id}: {r.status}, {r.examples} examples, "
                   f"{r.bytes_up} bytes up, {r.bytes_down} bytes down")
    click.echo(f"model version {device.model_version}")
    if ended_early:
        reason = warnings[-1] if warnings else "the aggregator closed the connection"
        raise click.ClickException(f"took part in {len(reports)} of {rounds} rounds: "
                                   f"{reason}")


@main.command()
@click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Recommend as this device does: its installed bundle, blended with the "
                   "baskets it has stored.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, path_type=Path),
              help="Or a bundle directory or zip, as the aggregator (or fedcart-sim central) "
                   "wrote; needs --public-key.")
@click.option("--public-key", metavar="HEX|FILE",
              help="The signer's Ed25519 public key (64 hex digits, or the .pub file) the "
                   "bundle must verify against.")
@click.option("--cart", required=True, metavar="ID,ID,...",
              help="Item ids in the cart, comma-separated (may be empty: '').")
@click.option("--history", "history", multiple=True, metavar="ID,ID,...",
              help="With --bundle: one past basket of this user, oldest first; repeat for "
                   "each basket.")
@click.option("--k", type=click.IntRange(1), default=10, show_default=True)
def recommend(state_dir: Path | None, bundle_path: Path | None, public_key: str | None,
              cart: str, history: tuple[str, ...], k: int) -> None:
    """Verify the model, then print the top-k items for the cart (id, name, score)."""
    if (state_dir is None) == (bundle_path is None) or (bundle_path is None) != (
            public_key is None) or (state_dir is not None and history):
        raise click.UsageError("give --state, or --bundle with --public-key (and --history)")
    try:
        if state_dir is not None:
            device = _device(state_dir)
            results = device.recommend(_ids(cart), k)
            bundle = device.current_bundle()
        else:
            assert bundle_path is not None and public_key is not None
            bundle = read_bundle(bundle_path, read_public_key(public_key))
            results = OfflineRecommender(bundle).recommend(_ids(cart), k,
                                                           [_ids(b) for b in history])
    except (BundleError, UnknownItemError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    assert bundle is not None
    m = bundle.manifest
    click.echo(f"model version {m.model_version} (round {m.round}), V={m.n_items}, "
               f"verified", err=True)
    width = max((len(r.item) for r in results), default=4)
    for rank, r in enumerate(results, 1):
        click.echo(f"{rank:>3}  {r.item:<{width}}  {r.score:9.4f}  {r.name}")


@main.group("bundle")
def bundle_group() -> None:
    """Signed model bundles: pack one for an app or a download."""


@bundle_group.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public-key", required=True, metavar="HEX|FILE",
              help="The key devices pin (the aggregator's signing.pub): only a bundle that "
                   "verifies against it is packed.")
def pack(directory: Path, out: Path, public_key: str) -> None:
    """Zip the bundle in DIRECTORY as OUT, the form every reader takes (files at the root,
    stored): verified first, written whole or not at all, never over an existing OUT."""
    if out.exists():
        raise click.ClickException(f"{out} exists: a bundle is never overwritten")
    try:
        verified = read_bundle(directory, read_public_key(public_key))
    except (BundleError, ValueError) as exc:
        raise click.ClickException(f"not packed: {exc}") from exc
    try:
        write_atomically(out, pack_members(verified.members()))
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from exc
    m = verified.manifest
    click.echo(f"{out}: model version {m.model_version} (round {m.round}), V={m.n_items}, "
               f"{out.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
