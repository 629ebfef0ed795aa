"""The server side of a SecAgg+ round, sans I/O.

Call :meth:`ServerRound.start`, then feed each client's bytes to :meth:`receive` and send
what :meth:`data_to_send` returns; call :meth:`deadline` when a phase's time is up (the core
keeps no clock). A phase ends when every client still expected has answered, or at its
deadline with those who have. A client whose message is malformed, out of phase, replayed or
badly signed is dropped (``receive`` raises RemoteProtocolError for the I/O layer to log and
close) and the round goes on without it. A client dropped as absent (its deadline passed, or
the I/O layer said it went) whose message arrives after all is late, not malicious:
``receive`` raises LateMessage and the connection may stay for the next round.

When the last unmask answer is in, the round waits in RECONSTRUCT: :meth:`finish` does the
CPU-bound work (Shamir reconstruction, a mask expansion per survivor and per pair with a
dropped client), which an I/O layer runs off its event loop.

Phases (state: what it collects -> what it sends when the phase ends):

    ADVERTISE    AdvertiseKeys          -> Advertisements (all) to each advertiser (U1)
    SHARE        EncryptedShares        -> SharesForYou to each sharer             (U2)
    MASKED       MaskedInput            -> SurvivorSet to each survivor            (U3)
    CONSISTENCY  ConsistencySignature   -> UnmaskRequest to each signer            (U4)
    UNMASK       UnmaskShares           -> RECONSTRUCT
    RECONSTRUCT  (finish())             -> DONE: ``result`` is the sum over U3

The neighbour graph is drawn over U1 when ADVERTISE ends, from a seed hashed over the signed
config and every advertisement (``secagg.graph.graph_seed``): the server does not pick it.
Every phase needs at least t clients, and from ADVERTISE on at least the consistency quorum
of more than (n + c) / 2 (``secagg.consistency``; n participants, c tolerated corrupt):
fewer, and the round fails at once (RoundFailed), since no client would reveal a share for a
survivor set signed by fewer.

Masked inputs are summed as they arrive, so memory is O(d), not O(n d). Unmasking removes
each survivor's self mask (seed rebuilt from t shares) and, for each client that shared keys
but sent no input, the pairwise masks its surviving neighbours added (its masking key rebuilt
from t shares and checked against the key it advertised).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import IntEnum

import nacl.bindings
import numpy as np

from fedcart.secagg import shamir
from fedcart.secagg.client import MASK_KEY, SELF_MASK
from fedcart.secagg.consistency import quorum
from fedcart.secagg.crypto import IdentityKey, mask_seed, verify
from fedcart.secagg.errors import (
    LateMessage,
    LocalProtocolError,
    ProtocolViolation,
    RemoteProtocolError,
    RoundFailed,
)
from fedcart.secagg.graph import effective_degree, graph_seed, neighbours, pairwise_sign
from fedcart.secagg.messages import (
    MAX_TERMS,
    SERVER,
    AdvertiseKeys,
    Advertisements,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    Message,
    RoundConfig,
    SharesForYou,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    consistency_statement,
    decode,
    envelope,
)
from fedcart.secagg.prg import add_mask

__all__ = ["ServerRound", "ServerState"]


class ServerState(IntEnum):
    CREATED = 0
    ADVERTISE = 1
    SHARE = 2
    MASKED = 3
    CONSISTENCY = 4
    UNMASK = 5
    RECONSTRUCT = 6
    DONE = 7
    FAILED = 8


_SUMMED = np.zeros(0, dtype=np.uint32)  # stands in for a vector already added to the sum

_EXPECTS: dict[ServerState, type[Message]] = {
    ServerState.ADVERTISE: AdvertiseKeys,
    ServerState.SHARE: EncryptedShares,
    ServerState.MASKED: MaskedInput,
    ServerState.CONSISTENCY: ConsistencySignature,
    ServerState.UNMASK: UnmaskShares,
}


class ServerRound:
    """One round of secure aggregation over ``participants`` (id -> identity public key).

    ``corrupt``: c, how many corrupt participants the round tolerates; it sets the
    consistency quorum, and devices whose policy asks for more refuse the round. ``terms``:
    the application's round terms (at most MAX_TERMS bytes), signed in the config."""

    def __init__(self, round_id: int, participants: Mapping[int, bytes], degree: int,
                 threshold: int, vector_len: int, identity: IdentityKey, *,
                 corrupt: int = 0, terms: bytes = b"") -> None:
        ids = tuple(sorted(participants))
        if len(ids) < 2 or degree < 1:
            raise LocalProtocolError(f"a round needs two participants and degree >= 1, got "
                                     f"{len(ids)} and {degree}")
        k = effective_degree(len(ids), degree)
        if not (2 * threshold > k >= threshold >= 1):
            raise LocalProtocolError(f"threshold {threshold} must satisfy k/2 < t <= k for "
                                     f"degree {degree} among {len(ids)} clients")
        if not 0 <= corrupt < len(ids):
            raise LocalProtocolError(f"corrupt must lie in [0, {len(ids)}), got {corrupt}")
        if len(terms) > MAX_TERMS:
            raise LocalProtocolError(f"terms of {len(terms)} bytes exceed {MAX_TERMS}")
        self.round_id = round_id
        self.participants = dict(participants)
        self.degree, self.threshold, self.vector_len = degree, threshold, vector_len
        self.corrupt, self.terms = corrupt, bytes(terms)
        self.quorum = quorum(len(ids), corrupt)
        self.identity = identity
        self.config: RoundConfig | None = None  # signed, once started
        self.graph_seed: bytes | None = None  # derived when ADVERTISE ends
        self.graph: dict[int, frozenset[int]] = {}  # over the advertisers, from then on
        self.state = ServerState.CREATED
        self.result: np.ndarray | None = None
        self.failure: str | None = None
        self.dropped: dict[int, str] = {}  # client -> why (malformed, violation, ...)
        self._absent: set[int] = set()  # dropped for silence or a lost connection
        self._outbox: list[tuple[int, bytes]] = []
        self._expected: set[int] = set()
        self._answers: dict[int, Message] = {}
        self._keys: dict[int, AdvertiseKeys] = {}
        self._shares_sent: dict[int, EncryptedShares] = {}
        self._held_by: dict[int, list[int]] = {}
        self._total = np.zeros(vector_len, dtype=np.uint32)
        self._survivors: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._unmask_answers: dict[int, Message] = {}
        self._aborted = False
        self._phase_end = {
            ServerState.ADVERTISE: self._end_advertise,
            ServerState.SHARE: self._end_share,
            ServerState.MASKED: self._end_masked,
            ServerState.CONSISTENCY: self._end_consistency,
            ServerState.UNMASK: self._end_unmask,
        }

    # -- the I/O layer's side ------------------------------------------------------------
    def start(self) -> None:
        if self.state != ServerState.CREATED:
            raise LocalProtocolError("the round has already started")
        ids = tuple(sorted(self.participants))
        config = RoundConfig(self.round_id, SERVER, ids,
                             tuple(self.participants[i] for i in ids), self.degree,
                             self.threshold, self.corrupt, self.vector_len, self.terms)
        self.config = dataclasses.replace(
            config, signature=self.identity.sign(config.signed_part()))
        data = self.config.encode()
        self._outbox += [(i, data) for i in ids if i not in self.dropped]
        self._enter(ServerState.ADVERTISE, set(ids))

    def receive(self, client: int, data: bytes | memoryview) -> None:
        """One message from ``client``. A bad one drops the client (RemoteProtocolError is
        raised for the caller to log) and never stops the round; a late one (LateMessage)
        changes nothing."""
        if self.state == ServerState.CREATED:
            raise LocalProtocolError("the round has not started")
        collecting = self.state in _EXPECTS
        try:
            round_id, sender = envelope(data)
            if sender != client or round_id != self.round_id:
                raise ProtocolViolation("message names another sender or round")
            # judged late from the envelope alone: a late vector is never parsed
            if client in self.participants and (client in self._absent or not collecting):
                raise LateMessage(f"client {client}'s message came after the round stopped "
                                  f"waiting for it ({self.state.name})")
            message = decode(data)
            if client not in self._expected:
                raise ProtocolViolation(f"client {client} is not expected in "
                                        f"{self.state.name} (dropped, replay, or unknown)")
            if client in self._answers:
                raise ProtocolViolation(f"client {client} already answered {self.state.name}")
            if not isinstance(message, _EXPECTS[self.state]):
                raise ProtocolViolation(f"{type(message).__name__} is out of phase in "
                                        f"{self.state.name}")
            self._accept(client, message)
        except RemoteProtocolError as exc:
            if collecting:
                self._drop(client, str(exc))
            raise
        # a masked input lives on only in the running sum: keeping n vectors until the phase
        # ends would make the server's memory O(n d)
        self._answers[client] = (dataclasses.replace(message, vector=_SUMMED)
                                 if isinstance(message, MaskedInput) else message)
        self._maybe_end_phase()

    def drop(self, client: int, reason: str) -> None:
        """Expect nothing more from ``client``: the I/O layer lost it (disconnected, or it
        left). A message it sends after all is late (LateMessage), not a violation. A valid
        answer it already gave in this phase stands: a masked input in the sum must be
        unmasked."""
        if client not in self.participants or self.state not in (ServerState.CREATED,
                                                                 *_EXPECTS):
            return
        self._absent.add(client)
        if self.state == ServerState.CREATED:  # start() leaves it out
            self.dropped.setdefault(client, reason)
            return
        self._drop(client, reason)

    def _drop(self, client: int, reason: str) -> None:
        self.dropped.setdefault(client, reason)
        self._expected.discard(client)
        self._maybe_end_phase()

    def deadline(self) -> None:
        """The current phase's time is up: go on with the clients that answered (the others
        are absent: what they send later is late)."""
        if self.state in self._phase_end:
            for client in self._expected - set(self._answers):
                self.dropped.setdefault(client, f"no answer in {self.state.name}")
                self._absent.add(client)
            self._expected = set(self._answers)
            self._maybe_end_phase()

    def finish(self) -> None:
        """Unmask the sum (RECONSTRUCT -> DONE, or FAILED raising RoundFailed): rebuild each
        survivor's self-mask seed and each dropped client's masking key from t shares and
        remove their masks. CPU-bound (a mask expansion of the vector per survivor and per
        survivor-dropped pair): an asyncio I/O layer runs it in a worker thread, and calls
        nothing else on this round meanwhile."""
        if self.state != ServerState.RECONSTRUCT:
            raise LocalProtocolError(f"nothing to reconstruct in {self.state.name}")
        try:
            self._reconstruct()
        except RoundFailed as exc:
            self.state = ServerState.FAILED
            self.failure = exc.reason
            raise

    def data_to_send(self) -> list[tuple[int, bytes]]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def survivors(self) -> tuple[int, ...]:
        return self._survivors

    # -- checks on arrival ---------------------------------------------------------------
    def _accept(self, client: int, m: Message) -> None:
        if isinstance(m, AdvertiseKeys):
            verify(self.participants[client],
                   AdvertiseKeys.signed_part(self.round_id, client, m.share_key, m.mask_key),
                   m.signature, f"client {client}'s keys")
        elif isinstance(m, EncryptedShares):
            wanted = tuple(sorted(self.graph[client]))
            if tuple(sorted(m.recipients)) != wanted:
                raise ProtocolViolation(f"client {client} shared with {sorted(m.recipients)}"
                                        f", its advertised neighbours are {list(wanted)}")
        elif isinstance(m, MaskedInput):
            if m.vector.size != self.vector_len:
                raise ProtocolViolation(f"masked input of length {m.vector.size}, the round "
                                        f"aggregates {self.vector_len}")
            np.add(self._total, m.vector, out=self._total)
        elif isinstance(m, ConsistencySignature):
            assert self.graph_seed is not None
            verify(self.participants[client],
                   consistency_statement(self.round_id, self.graph_seed, self._survivors),
                   m.signature, f"client {client}'s survivor-set signature")
        elif isinstance(m, UnmaskShares):
            expected = {v: SELF_MASK if v in self._survivors else MASK_KEY
                        for v in self._held_by.get(client, ())}
            got = dict(zip(m.owners, m.kinds, strict=True))
            if got != expected or m.shares.shape != (len(m.owners), shamir.WORDS):
                raise ProtocolViolation(f"client {client} answered the unmask request with "
                                        "other shares than it holds")
            if m.shares.size and m.shares.max() >= shamir.PRIME:
                raise ProtocolViolation(f"client {client}'s shares are not field elements")

    # -- phase ends ----------------------------------------------------------------------
    def _enter(self, state: ServerState, expected: set[int]) -> None:
        self.state = state
        self._expected = expected - set(self.dropped)
        self._answers = {}
        self._maybe_end_phase()

    def _maybe_end_phase(self) -> None:
        if self.state in self._phase_end and set(self._answers) >= self._expected:
            try:
                self._phase_end[self.state]()
            except RoundFailed as exc:
                self.state = ServerState.FAILED
                self.failure = exc.reason
                self._outbox = []
                raise

    def _need(self, count: int, what: str, need: int) -> None:
        if count < need:
            raise RoundFailed(f"{what}: {count} clients, the round needs {need} (threshold "
                              f"{self.threshold}, consistency quorum {self.quorum})")

    def _end_advertise(self) -> None:
        self._keys = {c: m for c, m in self._answers.items() if isinstance(m, AdvertiseKeys)}
        # each advertiser needs t neighbours among the others, and the quorum must be able
        # to sign
        self._need(len(self._keys), "clients that advertised keys",
                   max(self.threshold + 1, self.quorum))
        assert self.config is not None
        adverts = tuple(self._keys[c] for c in sorted(self._keys))
        self.graph_seed = graph_seed(self.config, adverts)
        self.graph = neighbours(tuple(self._keys), self.degree, self.graph_seed)
        # the same list for everyone (each client recomputes the seed from it): encoded once
        data = Advertisements(self.round_id, SERVER, adverts).encode()
        self._outbox += [(u, data) for u in sorted(self._keys)]
        self._enter(ServerState.SHARE, set(self._keys))

    def _end_share(self) -> None:
        self._shares_sent = {c: m for c, m in self._answers.items()
                             if isinstance(m, EncryptedShares)}
        self._need(len(self._shares_sent), "clients that shared keys",
                   max(self.threshold, self.quorum))
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in self._shares_sent}
        for u, sent in sorted(self._shares_sent.items()):
            for v, ciphertext in zip(sent.recipients, sent.ciphertexts, strict=True):
                if v in inbox:
                    inbox[v].append((u, ciphertext))
        # whose shares each sharer holds: what its unmask answer must cover
        self._held_by = {v: [u for u, _ in items] for v, items in inbox.items()}
        for v, items in inbox.items():
            self._outbox.append((v, SharesForYou(self.round_id, SERVER,
                                                 tuple(u for u, _ in items),
                                                 tuple(c for _, c in items)).encode()))
        self._enter(ServerState.MASKED, set(self._shares_sent))

    def _end_masked(self) -> None:
        self._survivors = tuple(sorted(self._answers))
        self._need(len(self._survivors), "clients that sent a masked input",
                   max(self.threshold, self.quorum))
        data = SurvivorSet(self.round_id, SERVER, self._survivors).encode()
        self._outbox += [(u, data) for u in self._survivors]
        self._enter(ServerState.CONSISTENCY, set(self._survivors))

    def _end_consistency(self) -> None:
        self._signatures = {c: m.signature for c, m in self._answers.items()
                            if isinstance(m, ConsistencySignature)}
        self._need(len(self._signatures), "survivors that signed the survivor set",
                   max(self.threshold, self.quorum))
        # a quorum of signatures proves the set to a client, and no fewer do: each unmask
        # request carries (n + c) / 2 + 1 of them, the same bytes for every signer
        signers = tuple(sorted(self._signatures))[:self.quorum]
        dropped = tuple(sorted(set(self._shares_sent) - set(self._survivors)))
        data = UnmaskRequest(self.round_id, SERVER, self._survivors, dropped, signers,
                             tuple(self._signatures[s] for s in signers)).encode()
        self._outbox += [(u, data) for u in self._signatures]
        self._enter(ServerState.UNMASK, set(self._signatures))

    def _end_unmask(self) -> None:
        self._unmask_answers = self._answers
        self._expected, self._answers = set(), {}
        self.state = ServerState.RECONSTRUCT

    def abort(self) -> None:
        """Make a ``finish()`` running in another thread give up at its next secret (the
        service is stopping): it raises RoundFailed and the round is FAILED. Safe to call
        from any thread."""
        self._aborted = True

    def _reconstruct(self) -> None:
        collected: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        for holder, m in sorted(self._unmask_answers.items()):
            assert isinstance(m, UnmaskShares)
            for owner, kind, share in zip(m.owners, m.kinds, m.shares, strict=True):
                collected.setdefault((owner, kind), []).append((holder + 1, share))
        total = self._total
        for u in self._survivors:
            self._check_aborted()
            add_mask(total, self._rebuild(collected, u, SELF_MASK), -1)
        for v in sorted(set(self._shares_sent) - set(self._survivors)):
            self._check_aborted()
            secret = self._rebuild(collected, v, MASK_KEY)
            if nacl.bindings.crypto_scalarmult_base(secret) != self._keys[v].mask_key:
                raise RoundFailed(f"client {v}'s masking key rebuilt from shares does not "
                                  "match the key it advertised (bad shares)")
            for u in self._survivors:
                if u in self._shares_sent[v].recipients:  # u masked with v
                    seed = mask_seed(secret, self._keys[u].mask_key, self.round_id, u, v)
                    add_mask(total, seed, -pairwise_sign(u, v))
        self.result = total
        self.state = ServerState.DONE

    def _check_aborted(self) -> None:
        if self._aborted:
            raise RoundFailed("aborted: the server is stopping")

    def _rebuild(self, collected: dict[tuple[int, int], list[tuple[int, np.ndarray]]],
                 owner: int, kind: int) -> bytes:
        shares = collected.get((owner, kind), [])
        what = "self-mask seed" if kind == SELF_MASK else "masking key"
        if len(shares) < self.threshold:
            raise RoundFailed(f"client {owner}'s {what}: {len(shares)} shares from surviving "
                              f"neighbours, threshold {self.threshold}")
        points = [x for x, _ in shares]
        stacked = np.stack([s for _, s in shares])[:, None, :]
        try:
            (secret,) = shamir.reconstruct(points, stacked, self.threshold)
        except shamir.ShamirError as exc:
            raise RoundFailed(f"client {owner}'s {what}: {exc}") from exc
        return secret
