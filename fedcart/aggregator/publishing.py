"""The aggregator's model versions on disk: each a signed bundle under the state directory's
``bundles/``, named ``v00000001`` and on, whose row in the database makes it published.

Writing a version (exporting, signing, then reading it back and verifying it) takes seconds
for a large model, so it runs in worker threads, off the service's event loop. The service
holds the current version in memory as a :class:`Model`, framed once for every device it
sends it to. Only the newest ``keep_bundles`` bundles and the serving one stay on disk:
devices only download those; the model history stays in the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from fedcart.aggregator.statedir import StateDir
from fedcart.aggregator.store import ModelRow
from fedcart.model_export.bundle import (
    CONSTANT_FILES,
    GRAPH_FILES,
    Bundle,
    pack_members,
    read_bundle,
)
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import Neighbours, Weights
from fedcart.protocol import channel

__all__ = ["Model", "Publisher", "read_model"]


@dataclass(frozen=True)
class Model:
    """A published model version as the service serves it: the verified bundle and two
    frames shared by every send (not a copy per device): the whole bundle, and for a device
    that holds the files that never change, the rest."""

    bundle: Bundle
    constant_files: frozenset[str]
    bundle_frame: bytes
    update_frame: bytes


def read_model(bundle_dir: Path, public_key: bytes) -> Model:
    """Read, verify and frame a bundle: a second of hashing and copying for a large model,
    which the service runs off its event loop after each round."""
    bundle = read_bundle(bundle_dir, public_key)
    return Model(bundle, frozenset(bundle.manifest.files[n] for n in CONSTANT_FILES),
                 bytes([channel.BUNDLE]) + pack_members(bundle.members()),
                 bytes([channel.BUNDLE]) + pack_members(bundle.members(
                     without=CONSTANT_FILES)))


class Publisher:
    """The bundles of one state directory, signed with its key and verified with the
    matching public key."""

    def __init__(self, state: StateDir, signing_key: nacl.signing.SigningKey,
                 public_key: bytes) -> None:
        self.state = state
        self.signing_key = signing_key
        self.public_key = public_key

    def load(self, row: ModelRow) -> Model:
        """A published version's bundle, read and verified."""
        return read_model(self.state.root / row.bundle_dir, self.public_key)

    def remove_unpublished(self, published: list[ModelRow]) -> None:
        """Delete what ``bundles/`` holds beyond the published versions: the bundle of a
        round that a crash interrupted between writing it and publishing it."""
        names = {Path(m.bundle_dir).name for m in published}
        for entry in self.state.bundles.iterdir():
            if entry.name in names:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()

    async def write(self, base: Bundle, weights: Weights, neighbours: Neighbours,
                    version: int, round_id: int) -> tuple[ModelRow, Model]:
        """Write and sign version ``version`` of ``base`` with new weights and item-item
        table, then read it back and verify it: the row that publishes it, and the model to
        serve. Both steps run in worker threads."""
        name = f"v{version:08d}"
        # writing, signing, then reading back and verifying a bundle: off the event loop
        manifest = await asyncio.to_thread(
            export_bundle, self.state.bundles / name, weights, base.items, base.names,
            self.signing_key, neighbours=neighbours, model_version=version,
            round_id=round_id, history_decay=base.manifest.history_decay,
            graphs={n: base.files[n] for n in GRAPH_FILES})
        digest = hashlib.sha256(manifest.to_json()).hexdigest()
        row = ModelRow(version, round_id, f"bundles/{name}", digest)
        model = await asyncio.to_thread(read_model, self.state.root / row.bundle_dir,
                                        self.public_key)
        return row, model

    async def prune(self, published: list[ModelRow], keep: int, serving: int) -> None:
        """Delete the bundles of all but the newest ``keep`` versions and the ``serving``
        one (in a worker thread): devices only download those, and each version is
        megabytes. The model history (versions, rounds, manifest hashes) stays in the
        database. ``keep`` 0 keeps every bundle."""
        for row in published[:-keep] if keep else []:
            if row.version == serving:
                continue
            await asyncio.to_thread(shutil.rmtree, self.state.root / row.bundle_dir,
                                    ignore_errors=True)
