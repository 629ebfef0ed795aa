"""A device: its identity, purchase history and model, offline recommendations, and the rounds
of federated training it agrees to.

``Device`` holds what is the device's own: its identity key and store (edge_client.store),
the installed bundle, verified as it is read, and the terms it accepts. A round's input is
computed by edge_client.training, and the connection to the aggregator is an
edge_client.session ``Session``; ``participate`` starts one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedcart.edge_client import training
from fedcart.edge_client.recommender import OfflineRecommender, Recommendation
from fedcart.edge_client.session import RoundReport, participate
from fedcart.edge_client.store import DeviceStore
from fedcart.lru import Lru
from fedcart.model_export.bundle import (
    CONSTANT_FILES,
    MANIFEST,
    SIGNATURE,
    Bundle,
    BundleError,
    Manifest,
    unpack_members,
    verify_members,
)
from fedcart.protocol.policy import DevicePolicy
from fedcart.protocol.terms import RoundTerms, TermsError
from fedcart.protocol.update import UpdateFormat
from fedcart.secagg.crypto import IdentityKey

# RoundReport is the session's (edge_client.session), named here too: what participate returns
__all__ = ["Device", "RoundReport"]

log = logging.getLogger("fedcart.device")


# Bundles verified in this process, by (server key, manifest sha256): the devices a
# simulation worker holds all run the same model version, and each would otherwise read and
# hash the same files again. Only verified bytes go in, so what runs is what was checked.
VERIFIED_CACHE = 2
_verified: Lru[tuple[bytes, str], Bundle] = Lru(VERIFIED_CACHE)


def _verified_bundle(server_key: bytes, manifest_sha256: str) -> Bundle | None:
    return _verified.get((server_key, manifest_sha256))


def _remember(server_key: bytes, bundle: Bundle) -> None:
    _verified.put((server_key, hashlib.sha256(bundle.manifest_json).hexdigest()), bundle)


class Device:
    """One shopper's device. ``server_key`` is the aggregator's pinned Ed25519 key: it
    signs bundles and round configs. ``policy``: the rounds it agrees to join, pinned here
    like the key (protocol.policy). ``blob_dir``: a bundle file store shared with other
    profiles on this host (see DeviceStore); the device's own by default.

    Only the current bundle's manifest stays in memory: the files are read back and verified
    when they are used, so a process can hold thousands of idle devices."""

    def __init__(self, state_dir: Path | str, server_key: bytes,
                 blob_dir: Path | None = None, policy: DevicePolicy | None = None) -> None:
        self.store = DeviceStore(Path(state_dir), blob_dir)
        self.server_key = server_key
        self.policy = policy or DevicePolicy()
        with self.store.opened():  # one connection (and one checkpoint) for the identity
            seed = self.store.get("identity_seed")
            if seed is None:
                seed = os.urandom(32).hex()
                self.store.put("identity_seed", seed)
        self.identity = IdentityKey(bytes.fromhex(seed))
        self._recommender: OfflineRecommender | None = None
        current = self.current_bundle()
        self.manifest: Manifest | None = None if current is None else current.manifest

    # -- offline use ---------------------------------------------------------------------
    @property
    def model_version(self) -> int:
        return -1 if self.manifest is None else self.manifest.model_version

    def current_bundle(self) -> Bundle | None:
        """The installed bundle, verified again as it is read (or as verified earlier in this
        process: the bytes kept then are what runs); None if there is none or it no longer
        verifies (then the next round's download replaces it)."""
        files = self.store.current_files()
        if not files:
            return None
        cached = _verified_bundle(self.server_key, files.get(MANIFEST, ""))
        if cached is not None:
            return cached
        members = {n: data for n in (MANIFEST, SIGNATURE)
                   if (data := self.store.blob(files.get(n, ""))) is not None}
        try:
            bundle = verify_members(members, self.server_key, lookup=self.store.blob,
                                    origin=f"{self.store.dir}: installed bundle")
        except BundleError as exc:
            log.warning("%s", exc)
            return None
        _remember(self.server_key, bundle)
        return bundle

    def held_files(self) -> list[str]:
        """sha256 of the current bundle's files that do not change between model versions:
        the server leaves them out of the next download."""
        return [d for n, d in sorted(self.store.current_files().items())
                if n in CONSTANT_FILES and self.store.has_blob(d)]

    def add_basket(self, items: Sequence[str]) -> None:
        self.store.add_basket(list(items))

    def recommend(self, cart: Sequence[str], k: int = 10) -> list[Recommendation]:
        """Top-k for ``cart``, blended with this device's own purchase history (offline)."""
        if self._recommender is None:
            bundle = self.current_bundle()
            if bundle is None:
                raise RuntimeError("no model installed yet: take part in a round first")
            self._recommender = OfflineRecommender(bundle)
        known = [[i for i in b if i in self._recommender.index] for b in self.store.baskets()]
        return self._recommender.recommend(cart, k, [b for b in known if b])

    def install(self, data: bytes) -> Bundle:
        """Verify received bundle bytes (signature, hashes, vocabulary, no downgrade), taking
        the files left out of them from this device's store, and swap them in; on any
        failure the current bundle keeps serving."""
        return self.install_members(unpack_members(data), "received bundle")

    def install_members(self, members: Mapping[str, bytes], origin: str) -> Bundle:
        """:meth:`install` for a bundle's files by name: also the bundle an app ships with
        (``fedcart-device init --bundle``), so a device can take part in the statistics
        rounds, which need its catalog but no newer model, before any download."""
        pinned = self.store.get("vocabulary_sha256")
        bundle = verify_members(members, self.server_key, lookup=self.store.blob,
                                origin=origin, vocabulary_sha256=pinned,
                                min_model_version=self.model_version + 1)
        self.store.install_bundle(bundle.members(), known=bundle.manifest.files)
        _remember(self.server_key, bundle)
        if pinned is None:
            self.store.put("vocabulary_sha256", bundle.manifest.vocabulary_sha256)
        self.manifest, self._recommender = bundle.manifest, None
        return bundle

    # -- local training and statistics -----------------------------------------------------
    def _installed(self) -> Bundle:
        """The installed bundle a round's input is computed with; RuntimeError if none."""
        bundle = self.current_bundle()
        if bundle is None:
            raise RuntimeError("no model installed: nothing to train")
        return bundle

    def local_update(self, epochs: int, learning_rates: Sequence[float], batch_size: int,
                     history: list[list[str]] | None = None, seed: int | None = None,
                     examples: int | None = None) -> tuple[np.ndarray, int]:
        """(delta = local weights - global weights, examples per epoch) after ``epochs`` of
        SGD through train_step.ort on leave-one-out examples of this device's newest basket,
        at most ``examples`` of them an epoch (training.local_update). ``history`` (the
        stored baskets by default) lets a worker thread train without touching the
        database."""
        bundle = self._installed()
        return training.local_update(bundle, self.store.baskets() if history is None else history,
                                     epochs, learning_rates, batch_size, seed, examples)

    def accept_terms(self, data: bytes, participants: int = 1,
                     vector_len: int | None = None) -> RoundTerms:
        """A round's signed terms, decoded and checked against this device's policy and
        installed model, and against the signed config they came in (its ``participants``
        and ``vector_len``); raises TermsError for terms it will not follow."""
        if self.manifest is None:
            raise TermsError("no model installed")
        terms = RoundTerms.from_bytes(data)
        self.policy.check(terms, self.manifest)
        try:
            fmt = UpdateFormat.of(terms)
        except ValueError as exc:
            raise TermsError(f"the terms name no valid format: {exc}") from None
        if terms.group_size < participants:
            raise TermsError(f"the terms encode for groups of {terms.group_size}, the round "
                             f"has {participants} participants: sums could overflow")
        if vector_len is not None and vector_len != fmt.vector_len:
            raise TermsError(f"the round aggregates {vector_len} words, the terms "
                             f"{fmt.vector_len}")
        return terms

    def round_input(self, terms: RoundTerms, history: list[list[str]] | None = None,
                    ) -> tuple[np.ndarray, int]:
        """The encoded vector this device masks in a round on ``terms`` (already accepted),
        and its example count: for a training round its clipped, weighted update of the
        trained groups; for a statistics round its clipped statistic
        (fedcart/protocol/statistics.py). ``history``: the stored baskets by default
        (training.round_input computes it)."""
        bundle = self._installed()
        return training.round_input(bundle, terms,
                                    self.store.baskets() if history is None else history)

    # -- federated rounds ----------------------------------------------------------------
    async def participate(self, url: str, rounds: int | None = 1, token: str | None = None,
                          ssl_context: ssl.SSLContext | None = None,
                          timeout: float | None = 600.0, follow_model: bool = True,
                          ) -> list[RoundReport]:
        """Connect, check in, and take part in ``rounds`` rounds (None: until the server
        closes). Returns what happened in each round this device was sampled for.

        ``follow_model``: receive every new model version while connected (an app that
        recommends); otherwise the server sends the model only when the device is sampled
        for a round and is behind.

        ``timeout``: seconds the whole call lasts at most. A session that is still waiting
        for its rounds then ends with the rounds done so far, and a warning that says it was
        connected all along (the aggregator offered no round: it waits for more devices,
        say); failing to connect raises OSError or TimeoutError. An aggregator that is full
        sends the device away (``ComeBack``): it closes, waits the time it was told within
        the window given, and checks in again, as long as the timeout allows.

        ``ssl_context``: for a ``wss://`` URL, the system's CAs when not given."""
        return await participate(self, url, rounds, token, ssl_context, timeout, follow_model)
