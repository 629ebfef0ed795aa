"""The control messages of a device's connection, as typed values with a strict decoder.

A connection goes:

    server -> device   Challenge    a fresh nonce and the server's key
    device -> server   Hello        the device's key and its signature of the challenge
    server -> device   Welcome      the device's id; or Refusal, and the connection closes;
                                    or ComeBack: the server is full, return after a delay
    server -> device   RoundNotice  a round's id and this device's id in it (the round's terms
                                    come signed, in the SecAgg+ round config)
    device -> server   Leave        the device will not finish the round, and why
    server -> device   RoundOver    how the round ended for this device, and the model version
    server -> device   ComeBack     (at any time between rounds) close, return after a delay

Each message is a frozen dataclass; ``to_frame()`` encodes it as a CONTROL frame
(``fedcart.protocol.channel``) holding one JSON object with a ``"type"``, and
:func:`decode` turns such an object back into the message, or raises
:class:`~fedcart.secagg.errors.MalformedMessage` naming the field: a missing or extra field, a
wrong type, a value out of range, a string or list over its bound. Both sides build and read
only these types.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from fedcart.secagg.errors import MalformedMessage

__all__ = [
    "CONTROL",
    "Challenge",
    "ComeBack",
    "ControlMessage",
    "Hello",
    "Leave",
    "Outcome",
    "Refusal",
    "RoundNotice",
    "RoundOver",
    "Welcome",
    "decode",
    "expect",
]

CONTROL = 1  # the channel byte of a control frame (fedcart.protocol.channel)
KEY_BYTES = 32  # an Ed25519 public key, and the challenge nonce
SIGNATURE_BYTES = 64
DIGEST_HEX = 64  # a sha256 in hex: a bundle file the device already holds
MAX_HELD_FILES = 16
MAX_TOKEN = 128
MAX_REASON = 1000
MAX_ID = 2**53  # ids and versions stay exact in any JSON reader
MAX_DELAY = 7 * 86400.0  # the longest a server may send a device away for, in seconds


class Outcome(StrEnum):
    """How a round ended for one device."""

    COMPLETED = "completed"  # its input is in the sum the round released
    DROPPED = "dropped"  # its group finished without it
    FAILED = "failed"  # its group (or the round) failed: no sum released


class _Fields:
    """Typed reads from a decoded JSON object, each naming the field it refuses."""

    def __init__(self, kind: str, body: Mapping[str, Any]) -> None:
        self.kind, self.body = kind, body

    def _get(self, key: str) -> Any:
        if key not in self.body:
            raise MalformedMessage(f"{self.kind}: no '{key}'")
        return self.body[key]

    def integer(self, key: str, low: int = 0) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < MAX_ID:
            raise MalformedMessage(f"{self.kind}: '{key}' must be an integer in "
                                   f"[{low}, 2^53), not {value!r:.40}")
        return value

    def text(self, key: str, limit: int) -> str:
        value = self._get(key)
        if not isinstance(value, str) or len(value) > limit:
            raise MalformedMessage(f"{self.kind}: '{key}' must be a string of at most "
                                   f"{limit} characters")
        return value

    def raw(self, key: str, size: int) -> bytes:
        value = self.text(key, 2 * size)
        try:
            data = bytes.fromhex(value)
        except ValueError:
            data = b""
        if len(data) != size:
            raise MalformedMessage(f"{self.kind}: '{key}' must be {size} bytes in hex")
        return data

    def seconds(self, key: str, limit: float) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= limit:
            raise MalformedMessage(f"{self.kind}: '{key}' must be a number of seconds in "
                                   f"[0, {limit:g}], not {value!r:.40}")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise MalformedMessage(f"{self.kind}: '{key}' must be true or false")
        return value

    def digests(self, key: str) -> frozenset[str]:
        value = self._get(key)
        if not isinstance(value, list) or len(value) > MAX_HELD_FILES or not all(
                isinstance(d, str) and len(d) == DIGEST_HEX
                and all(c in "0123456789abcdef" for c in d) for d in value):
            raise MalformedMessage(f"{self.kind}: '{key}' must be a list of at most "
                                   f"{MAX_HELD_FILES} sha256 digests in lower-case hex")
        return frozenset(value)

    def outcome(self, key: str) -> Outcome:
        value = self._get(key)
        try:
            return Outcome(value)
        except ValueError:
            raise MalformedMessage(f"{self.kind}: '{key}' must be one of "
                                   f"{[o.value for o in Outcome]}") from None


class _Message:
    """What every control message does: encode itself as a CONTROL frame."""

    TYPE: ClassVar[str]

    def _body(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_frame(self) -> bytes:
        """One CONTROL frame: the channel byte, then the message as a JSON object."""
        return bytes([CONTROL]) + json.dumps({"type": self.TYPE, **self._body()}).encode()


@dataclass(frozen=True)
class Challenge(_Message):
    """The server's first message: the device signs ``nonce`` (so a hello cannot be
    replayed) together with ``server_key`` (so it cannot be relayed to another server)."""

    TYPE: ClassVar[str] = "challenge"
    nonce: bytes
    server_key: bytes

    def _body(self) -> dict[str, Any]:
        return {"nonce": self.nonce.hex(), "server_key": self.server_key.hex()}

    @classmethod
    def _read(cls, f: _Fields) -> Challenge:
        return cls(f.raw("nonce", KEY_BYTES), f.raw("server_key", KEY_BYTES))


@dataclass(frozen=True)
class Hello(_Message):
    """A device's check-in: its enrolled key, its signature of the challenge
    (``checkin_statement``), the model version and bundle files it holds (so the server
    sends only what it lacks), whether it wants new models, the last round it took part
    in, and an enrolment token if it has not been enrolled yet."""

    TYPE: ClassVar[str] = "hello"
    public_key: bytes
    signature: bytes
    model_version: int
    held_files: frozenset[str] = frozenset()
    follow_model: bool = True
    last_round: int = 0
    token: str | None = None

    def _body(self) -> dict[str, Any]:
        body = {"public_key": self.public_key.hex(), "signature": self.signature.hex(),
                "model_version": self.model_version, "held_files": sorted(self.held_files),
                "follow_model": self.follow_model, "last_round": self.last_round}
        return body if self.token is None else {**body, "token": self.token}

    @classmethod
    def _read(cls, f: _Fields) -> Hello:
        return cls(f.raw("public_key", KEY_BYTES), f.raw("signature", SIGNATURE_BYTES),
                   f.integer("model_version", low=-1), f.digests("held_files"),
                   f.flag("follow_model"), f.integer("last_round"),
                   f.text("token", MAX_TOKEN) if "token" in f.body else None)


@dataclass(frozen=True)
class Welcome(_Message):
    """The check-in was accepted: ``client_id`` is the device's enrolled id, and
    ``model_version`` the version the server serves now."""

    TYPE: ClassVar[str] = "welcome"
    client_id: int
    model_version: int

    @classmethod
    def _read(cls, f: _Fields) -> Welcome:
        return cls(f.integer("client_id", low=1), f.integer("model_version", low=-1))


@dataclass(frozen=True)
class Refusal(_Message):
    """The server refuses the check-in or drops the device for breaking the protocol;
    the connection closes after it."""

    TYPE: ClassVar[str] = "error"
    reason: str

    @classmethod
    def _read(cls, f: _Fields) -> Refusal:
        return cls(f.text("reason", MAX_REASON))


@dataclass(frozen=True)
class RoundNotice(_Message):
    """The device is in round ``round_id`` as participant ``client_id``."""

    TYPE: ClassVar[str] = "round"
    round_id: int
    client_id: int

    @classmethod
    def _read(cls, f: _Fields) -> RoundNotice:
        return cls(f.integer("round_id", low=1), f.integer("client_id", low=1))


@dataclass(frozen=True)
class RoundOver(_Message):
    """Round ``round_id`` ended with ``outcome`` for this device; ``model_version`` is
    the version served after it (a device that follows the model waits for it)."""

    TYPE: ClassVar[str] = "round_over"
    round_id: int
    outcome: Outcome
    model_version: int

    def _body(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "outcome": self.outcome.value,
                "model_version": self.model_version}

    @classmethod
    def _read(cls, f: _Fields) -> RoundOver:
        return cls(f.integer("round_id", low=1), f.outcome("outcome"),
                   f.integer("model_version", low=-1))


@dataclass(frozen=True)
class Leave(_Message):
    """The device leaves the round it is in (it refused the round's terms, say), so the
    server drops it at once instead of waiting for the phase's deadline."""

    TYPE: ClassVar[str] = "leave"
    reason: str

    @classmethod
    def _read(cls, f: _Fields) -> Leave:
        return cls(f.text("reason", MAX_REASON))


@dataclass(frozen=True)
class ComeBack(_Message):
    """The server will not hold this connection now (it is full, or the device's lease is
    over): close, and check in again ``after`` seconds from now, at a moment drawn
    uniformly from the next ``window`` seconds (``fedcart.aggregator.pacing``)."""

    TYPE: ClassVar[str] = "come_back"
    after: float
    window: float

    @classmethod
    def _read(cls, f: _Fields) -> ComeBack:
        return cls(f.seconds("after", MAX_DELAY), f.seconds("window", MAX_DELAY))


ControlMessage = (Challenge | Hello | Welcome | Refusal | RoundNotice | RoundOver | Leave
                  | ComeBack)
_M = TypeVar("_M", bound=_Message)
_READERS: dict[str, Callable[[_Fields], ControlMessage]] = {
    cls.TYPE: cls._read
    for cls in (Challenge, Hello, Welcome, Refusal, RoundNotice, RoundOver, Leave, ComeBack)}
_OPTIONAL = {"token"}


def decode(body: Mapping[str, Any]) -> ControlMessage:
    """The typed message a decoded JSON object holds; MalformedMessage names what is wrong
    (an unknown type, a missing, extra or ill-typed field)."""
    kind = body.get("type")
    reader = _READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise MalformedMessage(f"unknown control message type {kind!r:.40}")
    message = reader(_Fields(kind, body))  # type: ignore[arg-type]
    extra = set(body) - {"type"} - set(message._body()) - _OPTIONAL
    if extra:
        raise MalformedMessage(f"{kind}: unexpected field(s) {sorted(extra)[:5]}")
    return message


def expect(message: ControlMessage, cls: type[_M]) -> _M:
    """``message`` if it is a ``cls``, else MalformedMessage (the protocol's order broken)."""
    if not isinstance(message, cls):
        raise MalformedMessage(f"expected {cls.TYPE}, got {message.TYPE}")
    return message
