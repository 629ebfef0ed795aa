"""Wire messages of a secure-aggregation round: a versioned binary envelope, no pickle.

Envelope (little-endian), then the body of its type:

    magic "FCSA" | version u8 | type u8 | reserved u16 (0) | round_id u64 | sender u32 |
    body_len u32 | body

``sender`` is the client id, or SERVER for the server. Every count and length in a body is
bounded (MAX_CLIENTS, MAX_VECTOR, MAX_TERMS, MAX_CIPHERTEXT) and checked against the bytes
actually present: a decoder returns a message or raises :class:`MalformedMessage`, for any
input. Masked vectors travel as raw little-endian uint32.

Version 2 (this one): the round config carries ``corrupt`` (c, the corrupt participants the
round tolerates: it sets the consistency quorum) and the application's ``terms``, both
signed, and no graph seed; the server sends every advertiser all the advertisements
(:class:`Advertisements`, in ascending sender order), from which the graph seed is derived
(``secagg.graph.graph_seed``); the survivor-set statement names that seed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedcart.secagg.crypto import KEY_BYTES, SIGNATURE_BYTES
from fedcart.secagg.errors import MalformedMessage

__all__ = [
    "MAX_CLIENTS",
    "MAX_TERMS",
    "MAX_VECTOR",
    "SERVER",
    "AdvertiseKeys",
    "Advertisements",
    "ConsistencySignature",
    "EncryptedShares",
    "MaskedInput",
    "Message",
    "RoundConfig",
    "SharesForYou",
    "SurvivorSet",
    "UnmaskRequest",
    "UnmaskShares",
    "consistency_statement",
    "decode",
    "envelope",
]

MAGIC = b"FCSA"
VERSION = 2
SERVER = 0xFFFFFFFF
MAX_CLIENTS = 1 << 16
MAX_VECTOR = 1 << 26  # 64 Mi parameters: 256 MiB of masked input
MAX_CIPHERTEXT = 512
MAX_TERMS = 64 << 10  # the application's round terms (opaque bytes, signed with the config)
_HEADER = struct.Struct("<4sBBHQII")


class _Reader:
    """Bounded reads from a body; any overrun is a MalformedMessage."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def view_of(self, n: int) -> memoryview:
        """The next ``n`` bytes, not copied (a masked vector: megabytes)."""
        if n < 0 or self.pos + n > len(self.view):
            raise MalformedMessage("message body is truncated")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def take(self, n: int) -> bytes:
        return bytes(self.view_of(n))

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size))

    def u32(self) -> int:
        return self.unpack("I")[0]

    def count(self, limit: int, what: str) -> int:
        n = self.u32()
        if n > limit:
            raise MalformedMessage(f"{what}: {n} exceeds the limit {limit}")
        return n

    def ids(self, what: str) -> tuple[int, ...]:
        n = self.count(MAX_CLIENTS, what)
        ids = struct.unpack(f"<{n}I", self.take(4 * n))
        if len(set(ids)) != n:
            raise MalformedMessage(f"{what}: duplicate ids")
        return ids

    def blob(self, limit: int, what: str) -> bytes:
        return self.take(self.count(limit, what))

    def done(self) -> None:
        if self.pos != len(self.view):
            raise MalformedMessage(f"{len(self.view) - self.pos} unexpected trailing bytes")


def _ids(ids: tuple[int, ...]) -> bytes:
    return struct.pack(f"<I{len(ids)}I", len(ids), *ids)


def _blob(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


@dataclass(frozen=True)
class Message:
    """Base of every message: the envelope fields."""

    TYPE: ClassVar[int] = 0
    round_id: int
    sender: int

    def body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> Message:
        raise NotImplementedError

    def encode(self) -> bytes:
        body = self.body()
        return _HEADER.pack(MAGIC, VERSION, self.TYPE, 0, self.round_id, self.sender,
                            len(body)) + body


@dataclass(frozen=True)
class RoundConfig(Message):
    """Server -> clients: who takes part (ids and identity keys), the neighbour graph's
    degree k, the threshold t, how many corrupt participants c the round tolerates (the
    consistency quorum is more than (n + c) / 2 signatures), the vector length and the
    application's terms (opaque bytes, at most MAX_TERMS); all signed by the server. Every
    parameter that bears on a client's privacy is in the signed part; the graph seed is
    not: it is derived after the ADVERTISE phase."""

    TYPE: ClassVar[int] = 1
    participants: tuple[int, ...]
    identity_keys: tuple[bytes, ...]
    degree: int
    threshold: int
    corrupt: int
    vector_len: int
    terms: bytes = b""
    signature: bytes = b""

    def _fields(self) -> bytes:
        return (_ids(self.participants) + b"".join(self.identity_keys)
                + struct.pack("<IIII", self.degree, self.threshold, self.corrupt,
                              self.vector_len) + _blob(self.terms))

    def signed_part(self) -> bytes:
        return (b"fedcart/secagg/v2/round-config" + struct.pack("<Q", self.round_id)
                + self._fields())

    def body(self) -> bytes:
        return self._fields() + self.signature

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> RoundConfig:
        participants = r.ids("participants")
        keys = tuple(r.take(KEY_BYTES) for _ in participants)
        degree, threshold, corrupt, vector_len = r.unpack("IIII")
        if vector_len > MAX_VECTOR:
            raise MalformedMessage(f"vector length {vector_len} exceeds {MAX_VECTOR}")
        terms = r.blob(MAX_TERMS, "terms")
        return cls(round_id, sender, participants, keys, degree, threshold, corrupt,
                   vector_len, terms, r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """Client -> server: two fresh X25519 public keys, signed by the client's identity."""

    TYPE: ClassVar[int] = 2
    share_key: bytes
    mask_key: bytes
    signature: bytes

    @staticmethod
    def signed_part(round_id: int, sender: int, share_key: bytes, mask_key: bytes) -> bytes:
        return b"advertise" + struct.pack("<QI", round_id, sender) + share_key + mask_key

    def body(self) -> bytes:
        return self.share_key + self.mask_key + self.signature

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> AdvertiseKeys:
        return cls(round_id, sender, r.take(KEY_BYTES), r.take(KEY_BYTES),
                   r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class Advertisements(Message):
    """Server -> each advertiser: every advertisement of the round, in ascending sender
    order (the decoder refuses any other), so that each client can recompute the graph seed
    and take its neighbours' keys from it. 132 bytes per advertiser."""

    TYPE: ClassVar[int] = 3
    keys: tuple[AdvertiseKeys, ...]

    def body(self) -> bytes:
        return struct.pack("<I", len(self.keys)) + b"".join(
            struct.pack("<I", k.sender) + k.body() for k in self.keys)

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> Advertisements:
        """Read in one slice (a client parses n entries: per-field reads cost more than the
        signatures it checks at n = 100)."""
        n = r.count(MAX_CLIENTS, "advertisements")
        raw = r.take(_ADVERT_BYTES * n)
        column = np.frombuffer(raw, dtype="<u4").reshape(n, _ADVERT_BYTES // 4)[:, 0]
        if (np.diff(column.astype(np.int64)) <= 0).any():
            raise MalformedMessage("advertisements: senders not in ascending order")
        owners: list[int] = column.tolist()
        keys = []
        for i, owner in enumerate(owners):
            at = i * _ADVERT_BYTES + 4
            keys.append(AdvertiseKeys(round_id, owner, raw[at:at + KEY_BYTES],
                                      raw[at + KEY_BYTES:at + 2 * KEY_BYTES],
                                      raw[at + 2 * KEY_BYTES:at + _ADVERT_BYTES - 4]))
        return cls(round_id, sender, tuple(keys))


_ADVERT_BYTES = 4 + 2 * KEY_BYTES + SIGNATURE_BYTES  # sender, share key, mask key, signature


@dataclass(frozen=True)
class EncryptedShares(Message):
    """Client -> server: for each neighbour, a box holding its shares of b_u and s_sk_u."""

    TYPE: ClassVar[int] = 4
    recipients: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def body(self) -> bytes:
        return _ids(self.recipients) + b"".join(_blob(c) for c in self.ciphertexts)

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> EncryptedShares:
        recipients = r.ids("share recipients")
        return cls(round_id, sender, recipients,
                   tuple(r.blob(MAX_CIPHERTEXT, "ciphertext") for _ in recipients))


@dataclass(frozen=True)
class SharesForYou(Message):
    """Server -> client: the boxes its neighbours addressed to it."""

    TYPE: ClassVar[int] = 5
    senders: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def body(self) -> bytes:
        return _ids(self.senders) + b"".join(_blob(c) for c in self.ciphertexts)

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> SharesForYou:
        senders = r.ids("share senders")
        return cls(round_id, sender, senders,
                   tuple(r.blob(MAX_CIPHERTEXT, "ciphertext") for _ in senders))


@dataclass(frozen=True, eq=False)
class MaskedInput(Message):
    """Client -> server: the masked vector, raw little-endian uint32."""

    TYPE: ClassVar[int] = 6
    vector: np.ndarray

    def body(self) -> bytes:
        return struct.pack("<I", self.vector.size) + self.vector.astype("<u4").tobytes()

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> MaskedInput:
        """The vector is a read-only view of the received bytes: the server adds it to its
        running sum and drops it, so a copy would only cost time."""
        n = r.count(MAX_VECTOR, "vector length")
        return cls(round_id, sender, np.frombuffer(r.view_of(4 * n), dtype="<u4"))


@dataclass(frozen=True)
class SurvivorSet(Message):
    """Server -> survivors: who sent a masked input; each survivor signs it."""

    TYPE: ClassVar[int] = 7
    survivors: tuple[int, ...]

    def body(self) -> bytes:
        return _ids(self.survivors)

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> SurvivorSet:
        return cls(round_id, sender, r.ids("survivors"))


def consistency_statement(round_id: int, graph_seed: bytes,
                          survivors: tuple[int, ...]) -> bytes:
    """What a survivor signs: the round, the graph seed it computed (so the clients that
    reveal shares agree on the advertisements, hence the graph) and the survivor set."""
    return (b"fedcart/secagg/v2/survivors" + struct.pack("<Q", round_id) + graph_seed
            + _ids(tuple(sorted(survivors))))


@dataclass(frozen=True)
class ConsistencySignature(Message):
    """Survivor -> server: its identity signature over the survivor set."""

    TYPE: ClassVar[int] = 8
    signature: bytes

    def body(self) -> bytes:
        return self.signature

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> ConsistencySignature:
        return cls(round_id, sender, r.take(SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Server -> survivor: the survivor set with a consistency quorum of the survivors'
    signatures over it, and the dropped clients whose masking keys it asks shares of."""

    TYPE: ClassVar[int] = 9
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signers: tuple[int, ...]
    signatures: tuple[bytes, ...]

    def body(self) -> bytes:
        return (_ids(self.survivors) + _ids(self.dropped) + _ids(self.signers)
                + b"".join(self.signatures))

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> UnmaskRequest:
        survivors, dropped, signers = r.ids("survivors"), r.ids("dropped"), r.ids("signers")
        return cls(round_id, sender, survivors, dropped, signers,
                   tuple(r.take(SIGNATURE_BYTES) for _ in signers))


@dataclass(frozen=True, eq=False)
class UnmaskShares(Message):
    """Survivor -> server: its shares of b_v for surviving neighbours v and of s_sk_v for
    dropped ones: ``kinds[i]`` is 0 (self mask seed) or 1 (masking key) for ``owners[i]``."""

    TYPE: ClassVar[int] = 10
    owners: tuple[int, ...]
    kinds: tuple[int, ...]
    shares: np.ndarray  # int64 [len(owners), 16], field elements

    def body(self) -> bytes:
        return (_ids(self.owners) + bytes(self.kinds)
                + self.shares.astype("<u4").tobytes())

    @classmethod
    def parse(cls, round_id: int, sender: int, r: _Reader) -> UnmaskShares:
        owners = r.ids("share owners")
        kinds = tuple(r.take(len(owners)))
        if any(k not in (0, 1) for k in kinds):
            raise MalformedMessage("share kind must be 0 or 1")
        raw = np.frombuffer(r.take(64 * len(owners)), dtype="<u4")
        return cls(round_id, sender, owners, kinds, raw.astype(np.int64).reshape(-1, 16))


_TYPES: dict[int, type[Message]] = {m.TYPE: m for m in (
    RoundConfig, AdvertiseKeys, Advertisements, EncryptedShares, SharesForYou, MaskedInput,
    SurvivorSet, ConsistencySignature, UnmaskRequest, UnmaskShares)}


def envelope(data: bytes | memoryview) -> tuple[int, int]:
    """(round_id, sender) from a message's envelope, checked but without parsing the body:
    what an I/O layer needs to route a message to its round, or to recognise one for a
    round that has ended."""
    round_id, sender, _ = _envelope(data)
    return round_id, sender


def _envelope(data: bytes | memoryview) -> tuple[int, int, int]:
    if len(data) < _HEADER.size:
        raise MalformedMessage(f"{len(data)} bytes is shorter than the envelope")
    magic, version, kind, reserved, round_id, sender, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage("not a FedCart secagg message (bad magic)")
    if version != VERSION:
        raise MalformedMessage(f"protocol version {version} is not supported ({VERSION})")
    if kind not in _TYPES:
        raise MalformedMessage(f"unknown message type {kind}")
    if reserved != 0:
        raise MalformedMessage("reserved envelope bits are set")
    if length != len(data) - _HEADER.size:
        raise MalformedMessage(f"body length {length} disagrees with the "
                               f"{len(data) - _HEADER.size} bytes received")
    return round_id, sender, kind


def decode(data: bytes | memoryview) -> Message:
    """One message from bytes, or MalformedMessage saying what is wrong."""
    round_id, sender, kind = _envelope(data)
    reader = _Reader(memoryview(data)[_HEADER.size:])
    message = _TYPES[kind].parse(round_id, sender, reader)
    reader.done()
    return message
