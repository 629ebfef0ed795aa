"""The client side of a SecAgg+ round, sans I/O.

Feed it the server's bytes with :meth:`ClientRound.receive`, give it the input vector with
:meth:`ClientRound.set_input` (any time before it must mask), and send what
:meth:`ClientRound.data_to_send` returns. It keeps no clock and opens no socket.

Transitions (state, message received -> next state); anything else is a
ProtocolViolation, after which the client is FAILED and reveals nothing more:

    WAIT_CONFIG     RoundConfig     -> WAIT_KEYS       sends AdvertiseKeys
    WAIT_KEYS       Advertisements  -> WAIT_SHARES     sends EncryptedShares
    WAIT_SHARES     SharesForYou    -> WAIT_SURVIVORS  sends MaskedInput (once it has input)
    WAIT_SURVIVORS  SurvivorSet     -> WAIT_UNMASK     sends ConsistencySignature
    WAIT_UNMASK     UnmaskRequest   -> DONE            sends UnmaskShares

What the client refuses beyond Flower's SecAgg+:

- a round config not signed by the pinned server key, not newer than the last round it
  took part in (replay), that gives it another identity key than its own, that its pinned
  :class:`~secagg.policy.ClientPolicy` refuses (too few participants or neighbours, an
  unsafe threshold, too few tolerated corrupt clients), or whose terms the application's
  ``check_terms`` refuses: all before it sends anything;
- an advertisement list that leaves out or alters its own advertisement, names a
  non-participant, or gives a neighbour's keys not signed by that neighbour's identity key
  (the graph seed is derived from the list: ``secagg.graph``);
- a survivor set smaller than the consistency quorum, and an unmask request whose survivor
  set differs from the one it signed, overlaps the dropped set, is signed by fewer than
  the quorum of more than (n + c) / 2 survivors (``secagg.consistency``), or leaves a
  neighbour that shared with it in neither set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import IntEnum

import numpy as np

from fedcart.secagg import shamir
from fedcart.secagg.consistency import check_quorum, quorum
from fedcart.secagg.crypto import (
    EphemeralKey,
    IdentityKey,
    mask_seed,
    open_share,
    seal_share,
    verify,
)
from fedcart.secagg.errors import (
    LocalProtocolError,
    ProtocolViolation,
    RemoteProtocolError,
    RoundFailed,
)
from fedcart.secagg.graph import graph_seed, neighbours_of, pairwise_sign
from fedcart.secagg.messages import (
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
)
from fedcart.secagg.policy import DEFAULT_POLICY, ClientPolicy
from fedcart.secagg.prg import add_mask

__all__ = ["PROTOCOL_MESSAGES", "ClientRound", "ClientState"]

SELF_MASK, MASK_KEY = 0, 1
# messages a client sends in a round: keys, shares, masked input, consistency signature,
# unmask shares
PROTOCOL_MESSAGES = 5
_SHARE_PAYLOAD = 2 * shamir.WORDS * 4


class ClientState(IntEnum):
    WAIT_CONFIG = 0
    WAIT_KEYS = 1
    WAIT_SHARES = 2
    WAIT_SURVIVORS = 3
    WAIT_UNMASK = 4
    DONE = 5
    FAILED = 6


class ClientRound:
    """One client's part in one round.

    ``policy``: the device's rules for the round's parameters, pinned on the device (the
    default is safe for cohorts of 20 or more; tests of smaller in-memory rounds pass
    ``secagg.policy.PERMISSIVE``). ``check_terms``: the application's judgement of the
    round config (its signed ``terms`` above all, against the rest of the config), called
    once the config's signature and the policy are checked and before anything is sent; a
    ValueError (or ProtocolViolation) it raises refuses the round. Once accepted,
    ``config`` is the round's config and ``config.terms`` its terms."""

    def __init__(self, client_id: int, identity: IdentityKey, server_key: bytes,
                 last_round_id: int = -1,
                 random_bytes: Callable[[int], bytes] = os.urandom, *,
                 policy: ClientPolicy = DEFAULT_POLICY,
                 check_terms: Callable[[RoundConfig], None] | None = None) -> None:
        self.id = client_id
        self.identity = identity
        self.server_key = server_key
        self.last_round_id = last_round_id
        self.random_bytes = random_bytes
        self.policy = policy
        self.check_terms = check_terms
        self.state = ClientState.WAIT_CONFIG
        self.config: RoundConfig | None = None
        self.graph_seed: bytes | None = None  # derived from the advertisements
        self._quorum = 0
        self._advert: AdvertiseKeys | None = None
        self._advertisers: frozenset[int] = frozenset()
        self._outbox: list[bytes] = []
        self._input: np.ndarray | None = None
        self._masked_sent = False
        self._neighbours: frozenset[int] = frozenset()
        self._peer_keys: dict[int, AdvertiseKeys] = {}
        self._held: dict[int, np.ndarray] = {}  # neighbour -> its two shares, [2, 16]
        self._survivors: tuple[int, ...] = ()
        self._handlers: dict[tuple[ClientState, type[Message]], Callable[[Message], None]] = {
            (ClientState.WAIT_CONFIG, RoundConfig): self._on_config,
            (ClientState.WAIT_KEYS, Advertisements): self._on_keys,
            (ClientState.WAIT_SHARES, SharesForYou): self._on_shares,
            (ClientState.WAIT_SURVIVORS, SurvivorSet): self._on_survivors,
            (ClientState.WAIT_UNMASK, UnmaskRequest): self._on_unmask,
        }

    # -- the I/O layer's side ------------------------------------------------------------
    def receive(self, data: bytes | memoryview) -> None:
        """Process one message from the server. Raises RemoteProtocolError (the client is
        then FAILED) or RoundFailed (the round cannot succeed from here)."""
        if self.state in (ClientState.DONE, ClientState.FAILED):
            raise LocalProtocolError(f"the round is over ({self.state.name})")
        try:
            message = decode(data)
            if message.sender != SERVER:
                raise ProtocolViolation("message does not come from the server")
            if self.config is not None and message.round_id != self.config.round_id:
                raise ProtocolViolation(f"message for round {message.round_id} in round "
                                        f"{self.config.round_id} (replay or mix-up)")
            handler = self._handlers.get((self.state, type(message)))
            if handler is None:
                raise ProtocolViolation(f"{type(message).__name__} is out of phase in "
                                        f"{self.state.name}")
            handler(message)
        except (RemoteProtocolError, RoundFailed):
            self._fail()
            raise

    def set_input(self, vector: np.ndarray) -> None:
        """The uint32 vector to aggregate (already encoded); masked once shares are in."""
        if self._masked_sent or self.state in (ClientState.DONE, ClientState.FAILED):
            raise LocalProtocolError(f"input given too late ({self.state.name})")
        vector = np.ascontiguousarray(vector)
        if vector.dtype != np.uint32 or vector.ndim != 1:
            raise LocalProtocolError("the input must be a 1-d uint32 vector")
        if self.config is not None and vector.size != self.config.vector_len:
            raise LocalProtocolError(f"input has {vector.size} entries, the round "
                                     f"aggregates {self.config.vector_len}")
        self._input = vector.copy()
        self._maybe_send_masked()

    def data_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    @property
    def masked_sent(self) -> bool:
        """The masked input has been queued: the client no longer holds its input."""
        return self._masked_sent

    # -- phases --------------------------------------------------------------------------
    def _on_config(self, m: Message) -> None:
        assert isinstance(m, RoundConfig)
        verify(self.server_key, m.signed_part(), m.signature, "the round config")
        if m.round_id <= self.last_round_id:
            raise ProtocolViolation(f"round {m.round_id} is not newer than round "
                                    f"{self.last_round_id} (replayed config)")
        if self.id not in m.participants:
            raise ProtocolViolation("this client is not among the round's participants")
        if m.identity_keys[m.participants.index(self.id)] != self.identity.public:
            raise ProtocolViolation("the round config names another identity key for this "
                                    "client")
        self.policy.check(m)
        if self.check_terms is not None:
            try:
                self.check_terms(m)
            except (ValueError, ProtocolViolation) as exc:
                raise ProtocolViolation(f"the round's terms were refused: {exc}") from exc
        if self._input is not None and self._input.size != m.vector_len:
            raise LocalProtocolError("input length differs from the round's vector length")
        self.config = m
        self._quorum = quorum(len(m.participants), m.corrupt)
        self._identity_of = dict(zip(m.participants, m.identity_keys, strict=True))
        self._share_key = EphemeralKey(self.random_bytes(32))
        self._mask_key = EphemeralKey(self.random_bytes(32))
        self._self_seed = self.random_bytes(32)
        signature = self.identity.sign(AdvertiseKeys.signed_part(
            m.round_id, self.id, self._share_key.public, self._mask_key.public))
        self._advert = AdvertiseKeys(m.round_id, self.id, self._share_key.public,
                                     self._mask_key.public, signature)
        self._send(self._advert)
        self.state = ClientState.WAIT_KEYS

    def _on_keys(self, m: Message) -> None:
        assert isinstance(m, Advertisements) and self.config is not None
        senders = [k.sender for k in m.keys]
        strangers = set(senders) - set(self._identity_of)
        if strangers:
            raise ProtocolViolation(f"advertisements from non-participants "
                                    f"{sorted(strangers)[:5]}")
        own = next((k for k in m.keys if k.sender == self.id), None)
        if own is None or own != self._advert:
            raise ProtocolViolation("this client's advertisement is missing from the list "
                                    "or altered")
        need = max(self.config.threshold + 1, self._quorum)
        if len(senders) < need:
            raise RoundFailed(f"only {len(senders)} clients advertised keys, the round "
                              f"needs {need} (threshold {self.config.threshold}, "
                              f"consistency quorum {self._quorum})")
        self.graph_seed = graph_seed(self.config, m.keys)
        self._advertisers = frozenset(senders)
        self._neighbours = neighbours_of(senders, self.config.degree, self.graph_seed,
                                         self.id)
        if len(self._neighbours) < self.config.threshold:
            raise RoundFailed(f"only {len(self._neighbours)} neighbours advertised keys, "
                              f"threshold {self.config.threshold}")
        for keys in m.keys:
            if keys.sender in self._neighbours:
                verify(self._identity_of[keys.sender],
                       AdvertiseKeys.signed_part(self.config.round_id, keys.sender,
                                                 keys.share_key, keys.mask_key),
                       keys.signature, f"client {keys.sender}'s keys")
        self._peer_keys = {k.sender: k for k in m.keys if k.sender in self._neighbours}
        self._boxes = {v: self._share_key.box(k.share_key) for v, k in self._peer_keys.items()}
        recipients = tuple(sorted(self._peer_keys))
        shares = shamir.split([self._self_seed, self._mask_key.secret],
                              [v + 1 for v in recipients], self.config.threshold,
                              self.random_bytes)
        ciphertexts = tuple(
            seal_share(self._boxes[v], self.config.round_id, self.id, v,
                       shares[i].astype("<u4").tobytes())
            for i, v in enumerate(recipients))
        self._send(EncryptedShares(self.config.round_id, self.id, recipients, ciphertexts))
        self.state = ClientState.WAIT_SHARES

    def _on_shares(self, m: Message) -> None:
        assert isinstance(m, SharesForYou) and self.config is not None
        held = {}
        for sender, ciphertext in zip(m.senders, m.ciphertexts, strict=True):
            if sender not in self._boxes:
                raise ProtocolViolation(f"shares from client {sender}, whose keys this "
                                        "client never got")
            plain = open_share(self._boxes[sender], self.config.round_id, sender, self.id,
                               ciphertext)
            if len(plain) != _SHARE_PAYLOAD:
                raise ProtocolViolation(f"shares from client {sender} have a bad length")
            words = np.frombuffer(plain, dtype="<u4").astype(np.int64).reshape(2, -1)
            if words.max() >= shamir.PRIME:
                raise ProtocolViolation(f"shares from client {sender} are not field elements")
            held[sender] = words
        if len(held) < self.config.threshold:
            raise RoundFailed(f"only {len(held)} neighbours shared keys, threshold "
                              f"{self.config.threshold}: this client's masks could not be "
                              "removed")
        self._held = held
        self.state = ClientState.WAIT_SURVIVORS
        self._maybe_send_masked()

    def _maybe_send_masked(self) -> None:
        if (self.state != ClientState.WAIT_SURVIVORS or self._input is None
                or self._masked_sent):
            return
        assert self.config is not None
        y = self._input
        add_mask(y, self._self_seed)
        for v in sorted(self._held):
            seed = mask_seed(self._mask_key.secret, self._peer_keys[v].mask_key,
                             self.config.round_id, self.id, v)
            add_mask(y, seed, pairwise_sign(self.id, v))
        self._input = None
        self._masked_sent = True
        self._send(MaskedInput(self.config.round_id, self.id, y))

    def _on_survivors(self, m: Message) -> None:
        assert isinstance(m, SurvivorSet) and self.config is not None
        assert self.graph_seed is not None
        if not self._masked_sent:
            raise ProtocolViolation("survivor set before this client sent its input")
        if self.id not in m.survivors:
            raise ProtocolViolation("the survivor set leaves out this client")
        if not set(m.survivors) <= self._advertisers:
            raise ProtocolViolation("the survivor set names clients that did not advertise "
                                    "keys")
        need = max(self.config.threshold, self._quorum)
        if len(m.survivors) < need:
            raise RoundFailed(f"{len(m.survivors)} survivors, the round needs {need} "
                              f"(threshold {self.config.threshold}, consistency quorum "
                              f"{self._quorum})")
        self._survivors = tuple(sorted(m.survivors))
        statement = consistency_statement(self.config.round_id, self.graph_seed,
                                          self._survivors)
        self._send(ConsistencySignature(self.config.round_id, self.id,
                                        self.identity.sign(statement)))
        self.state = ClientState.WAIT_UNMASK

    def _on_unmask(self, m: Message) -> None:
        assert isinstance(m, UnmaskRequest) and self.config is not None
        assert self.graph_seed is not None
        survivors, dropped = set(m.survivors), set(m.dropped)
        if tuple(sorted(survivors)) != self._survivors:
            raise ProtocolViolation("the unmask request's survivors differ from the set "
                                    "this client signed")
        if survivors & dropped:
            raise ProtocolViolation(f"clients {sorted(survivors & dropped)} are named both "
                                    "survivor and dropped")
        undecided = set(self._held) - survivors - dropped
        if undecided:
            raise ProtocolViolation(f"neighbours {sorted(undecided)} shared keys but are "
                                    "neither survivor nor dropped")
        # more than (n + c) / 2 valid signatures over this exact set: no other set can have
        # them too, so no neighbour of any client is shown another (secagg.consistency)
        statement = consistency_statement(self.config.round_id, self.graph_seed,
                                          self._survivors)
        check_quorum(self._identity_of, statement, frozenset(survivors), m.signers,
                     m.signatures, self._quorum)
        owners, kinds, rows = [], [], []
        for v in sorted(self._held):
            kind = SELF_MASK if v in survivors else MASK_KEY
            owners.append(v)
            kinds.append(kind)
            rows.append(self._held[v][kind])
        shares = np.array(rows, dtype=np.int64).reshape(-1, shamir.WORDS)
        self._send(UnmaskShares(self.config.round_id, self.id, tuple(owners), tuple(kinds),
                                shares))
        self.state = ClientState.DONE

    # -- helpers -------------------------------------------------------------------------
    def _send(self, message: Message) -> None:
        self._outbox.append(message.encode())

    def _fail(self) -> None:
        self.state = ClientState.FAILED
        self._outbox = []
        self._input = None
        self._held = {}
