"""``fedcart-device``: try the device runtime from a shell (click for the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edge_client.recommender import OfflineRecommender, UnknownItemError
from model_export.bundle import BundleError, read_bundle
from model_export.keys import read_public_key


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """FedCart on the device: offline recommendations from a signed model bundle."""


@main.command()
@click.option("--bundle", "bundle_path", required=True,
              type=click.Path(exists=True, path_type=Path),
              help="Bundle directory or zip, as the aggregator (or fedcart-sim central) wrote.")
@click.option("--public-key", required=True, metavar="HEX|FILE",
              help="The signer's Ed25519 public key (64 hex digits, or the .pub file) the "
                   "bundle must verify against.")
@click.option("--cart", required=True, metavar="ID,ID,...",
              help="Item ids in the cart, comma-separated (may be empty: '').")
@click.option("--history", "history", multiple=True, metavar="ID,ID,...",
              help="One past basket of this user, oldest first; repeat for each basket.")
@click.option("--k", type=click.IntRange(1), default=10, show_default=True)
def recommend(bundle_path: Path, public_key: str, cart: str, history: tuple[str, ...],
              k: int) -> None:
    """Verify the bundle, then print the top-k items for the cart (id, name, score)."""
    try:
        bundle = read_bundle(bundle_path, read_public_key(public_key))
        recommender = OfflineRecommender(bundle)
        results = recommender.recommend(_ids(cart), k, [_ids(b) for b in history])
    except (BundleError, UnknownItemError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    m = bundle.manifest
    click.echo(f"model version {m.model_version} (round {m.round}), V={m.n_items}, "
               f"verified", err=True)
    width = max((len(r.item) for r in results), default=4)
    for rank, r in enumerate(results, 1):
        click.echo(f"{rank:>3}  {r.item:<{width}}  {r.score:9.4f}  {r.name}")


if __name__ == "__main__":
    sys.exit(main())
