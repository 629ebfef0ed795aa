"""Frames on a device's websocket connection: one channel byte, then the payload.

    0x01 CONTROL  one control message (``fedcart.protocol.control``) as a JSON object, UTF-8,
                  at most MAX_CONTROL bytes; parsed with json, never unpickled
    0x02 SECAGG   one SecAgg+ wire message (``fedcart.secagg.messages``)
    0x03 BUNDLE   a signed model bundle as a zip (verified by the receiver before use)
"""

from __future__ import annotations

import json

from fedcart.protocol.control import CONTROL, ControlMessage, decode
from fedcart.secagg.errors import MalformedMessage

__all__ = ["BUNDLE", "CONTROL", "MAX_CONTROL", "SECAGG", "Frame", "checkin_statement", "parse"]

SECAGG, BUNDLE = 2, 3
MAX_CONTROL = 64 * 1024

Frame = tuple[int, ControlMessage | memoryview | bytes]


def parse(frame: bytes | bytearray | str) -> Frame:
    """(channel, payload): the typed message for CONTROL, the bundle's bytes for BUNDLE, a
    memoryview of the frame for SECAGG (not copied: a masked input is megabytes); raises
    MalformedMessage, saying why, for anything else."""
    if isinstance(frame, str) or not frame:
        raise MalformedMessage("frames are non-empty binary messages")
    channel, payload = frame[0], memoryview(frame)[1:]
    if channel == CONTROL:
        if len(payload) > MAX_CONTROL:
            raise MalformedMessage(f"control message over {MAX_CONTROL} bytes")
        try:
            body = json.loads(bytes(payload))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage(f"control message is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise MalformedMessage("a control message is a JSON object")
        return channel, decode(body)
    if channel == SECAGG:
        return channel, payload
    if channel == BUNDLE:
        return channel, bytes(payload)
    raise MalformedMessage(f"unknown channel {channel}")


def checkin_statement(nonce: bytes, server_key: bytes) -> bytes:
    """What a device signs to check in: the server's fresh nonce (no replay) and the
    server's key (no relay to another server)."""
    return b"fedcart/checkin/v1" + nonce + server_key
