"""Frames on a device's websocket connection: one channel byte, then the payload.

    0x01 CONTROL  a JSON object (UTF-8, at most MAX_CONTROL bytes): check-in, round notices,
                  model announcements, errors. Parsed with json, never unpickled.
    0x02 SECAGG   one secagg wire message (secagg.messages)
    0x03 BUNDLE   a signed model bundle as a zip (verified by the receiver before use)
"""

from __future__ import annotations

import json
from typing import Any

from fedcart.secagg.errors import MalformedMessage

__all__ = ["BUNDLE", "CONTROL", "MAX_CONTROL", "SECAGG", "checkin_statement", "control", "parse"]

CONTROL, SECAGG, BUNDLE = 1, 2, 3
MAX_CONTROL = 64 * 1024


def control(kind: str, **fields: Any) -> bytes:
    return bytes([CONTROL]) + json.dumps({"type": kind, **fields}).encode()


def parse(frame: bytes | str) -> tuple[int, Any]:
    """(channel, payload): a dict for CONTROL, bytes for BUNDLE, a memoryview of the frame
    for SECAGG (not copied: a masked input is megabytes); MalformedMessage if bad."""
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
        if not isinstance(body, dict) or not isinstance(body.get("type"), str):
            raise MalformedMessage("control message must be an object with a 'type'")
        return channel, body
    if channel == SECAGG:
        return channel, payload
    if channel == BUNDLE:
        return channel, bytes(payload)
    raise MalformedMessage(f"unknown channel {channel}")


def checkin_statement(nonce: bytes, server_key: bytes) -> bytes:
    """What a device signs to check in: the server's fresh nonce (no replay) and the
    server's key (no relay to another server)."""
    return b"fedcart/checkin/v1" + nonce + server_key
