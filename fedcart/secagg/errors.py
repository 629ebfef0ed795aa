"""Errors of the secure aggregation core.

    SecAggError                    base of every error this package raises
    ├── LocalProtocolError         this side misused the core (wrong phase, bad argument)
    └── RemoteProtocolError        the peer misbehaved; the core's state is unchanged
        ├── MalformedMessage       bytes that do not decode as a message
        └── ProtocolViolation      a well-formed message the protocol forbids: out of
                                   phase, replayed, badly signed, inconsistent sets, a
                                   survivor set short of the consistency quorum; or a
                                   round config the device's policy or terms refuse
    LateMessage                    (SecAggError) a message the round no longer waits for:
                                   its sender was dropped as absent (a deadline passed, or
                                   its connection went), or the round stopped collecting
    RoundFailed                    (SecAggError) the server cannot finish the round: too
                                   few survivors or shares; the message names the reason

A server drops a client that raises RemoteProtocolError and goes on; a client that raises
it abandons the round without revealing anything more. A late message is no violation: a
slow device is not a malicious one, so the I/O layer ignores it and keeps the connection
for the next round.
"""

from __future__ import annotations

__all__ = [
    "LateMessage",
    "LocalProtocolError",
    "MalformedMessage",
    "ProtocolViolation",
    "RemoteProtocolError",
    "RoundFailed",
    "SecAggError",
]


class SecAggError(Exception):
    """Base of every error the secagg package raises."""


class LocalProtocolError(SecAggError):
    """This side used the core wrongly: a programming error, not the peer's fault."""


class RemoteProtocolError(SecAggError):
    """The peer sent something the protocol does not allow."""


class MalformedMessage(RemoteProtocolError, ValueError):
    """Bytes that are not a valid message (bad magic, version, type, length, field)."""


class ProtocolViolation(RemoteProtocolError):
    """A valid message the protocol forbids here (phase, replay, signature, consistency),
    or a round the device's policy or the application's terms check refuses."""


class LateMessage(SecAggError):
    """A well-formed message from a client the round has stopped waiting for."""


class RoundFailed(SecAggError):
    """The round cannot complete; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
