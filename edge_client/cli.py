"""``fedcart-device``: try the device runtime from a shell (click for the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edge_client.device import Device
from edge_client.recommender import OfflineRecommender, UnknownItemError
from edge_client.store import DeviceStore
from model_export.bundle import BundleError, read_bundle
from model_export.keys import read_public_key


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """FedCart on the device: offline recommendations from a signed model bundle."""


state_option = click.option("--state", "state_dir", required=True,
                            type=click.Path(file_okay=False, path_type=Path),
                            help="The device's state directory.")


def _device(state_dir: Path) -> Device:
    store = DeviceStore(state_dir)
    key = store.get("server_key")
    store.close()
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
    store.close()
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
    """Record a purchase on the device (it never leaves the device)."""
    try:
        _device(state_dir).add_basket(_ids(items))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@state_option
@click.option("--url", required=True, help="The aggregator, e.g. ws://127.0.0.1:8765/ws")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True)
@click.option("--token", help="One-time enrollment token, for a first check-in.")
def participate(state_dir: Path, url: str, rounds: int, token: str | None) -> None:
    """Connect, take part in rounds of federated training, install the new model."""
    import asyncio

    device = _device(state_dir)
    try:
        reports = asyncio.run(device.participate(url, rounds, token))
    except (OSError, TimeoutError) as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from exc
    for r in reports:
        click.echo(f"round {r.round_id}: {r.status}, {r.examples} examples, "
                   f"{r.bytes_up} bytes up, {r.bytes_down} bytes down")
    click.echo(f"model version {device.model_version}")


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


if __name__ == "__main__":
    sys.exit(main())
