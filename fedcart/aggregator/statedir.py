"""The aggregator's state directory, and ``init``: signing key, configuration with
commented defaults, database, and model version 0.

    config.toml   signing.key (mode 0600)   signing.pub   state.db   bundles/   serve.lock

``serve.lock`` holds the pid of the ``serve`` process that has the directory: two services
on one database would each run their own rounds and charge one privacy ledger twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import nacl.signing
import numpy as np

from fedcart.aggregator.config import AggregatorConfig, render_config
from fedcart.aggregator.store import ModelRow, Store
from fedcart.model_export.export import export_bundle
from fedcart.model_export.keys import load_or_create_signing_key
from fedcart.model_export.model import HISTORY_DECAY, Neighbours, init_weights

__all__ = ["StateDir", "StateDirInUse", "init_state"]


class StateDirInUse(RuntimeError):
    """Another process holds the state directory's lock."""


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def key(self) -> Path:
        return self.root / "signing.key"

    @property
    def bundles(self) -> Path:
        return self.root / "bundles"

    @property
    def lock_file(self) -> Path:
        return self.root / "serve.lock"

    def lock(self) -> IO[str]:
        """Take the directory for this process, or raise StateDirInUse naming the holder.

        The lock is an flock on ``serve.lock``, held while the returned file stays open
        (close it to release, or let the process end): the kernel releases it when its
        holder dies however it dies, so a SIGKILLed service leaves no stale lock behind."""
        handle = self.lock_file.open("a+")  # not "w": that would erase the holder's pid
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StateDirInUse(f"state directory {self.root} is in use by another "
                                f"fedcart-aggregator (pid {holder})") from None
        except BaseException:
            handle.close()
            raise
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle

    def signing_key(self) -> nacl.signing.SigningKey:
        if not self.key.exists():
            raise FileNotFoundError(f"{self.key} is missing: run fedcart-aggregator init")
        return load_or_create_signing_key(self.key)

    def check(self) -> None:
        missing = [p.name for p in (self.config, self.database, self.key) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.root} is not an initialised state directory "
                                    f"(missing {', '.join(missing)}): run "
                                    "fedcart-aggregator init first")


def init_state(root: Path, items: list[str], names: list[str], dim: int = 0,
               seed: int | None = None, config: AggregatorConfig | None = None,
               neighbours: Neighbours | None = None) -> StateDir:
    """Create the state directory with model version 0 over the catalog ``items``, and
    config.toml from ``config`` (default: AggregatorConfig's defaults) unless one exists.

    Version 0 is ``init_weights``' start with a zero bias and the item-item table
    ``neighbours`` (default none): the aggregator has seen no basket, so it knows no
    popularity or co-occurrence, only what public data such as the item names give; the
    statistics rounds bring both, and training the rest."""
    state = StateDir(Path(root))
    if state.database.exists():
        raise FileExistsError(f"{root} already holds an aggregator (state.db exists)")
    state.bundles.mkdir(parents=True, exist_ok=True)
    if not state.config.exists():
        state.config.write_text(render_config(config or AggregatorConfig()))
    key = load_or_create_signing_key(state.key)
    weights = init_weights(len(items), dim, np.random.default_rng(seed))
    manifest = export_bundle(state.bundles / "v00000000", weights, items, names, key,
                             neighbours=neighbours, model_version=0, round_id=0,
                             history_decay=HISTORY_DECAY)
    store = Store(state.database)
    store.publish(ModelRow(0, None, "bundles/v00000000",
                           hashlib.sha256(manifest.to_json()).hexdigest()), {}, None, None, {})
    store.close()
    return state
