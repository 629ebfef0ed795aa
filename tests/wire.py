"""A hand-driven device connection for tests that play a device the real one would never be:
the check-in any such test starts with, and raw control frames for what the typed messages
cannot express (a hostile peer's malformed JSON)."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection

from fedcart.protocol import channel
from fedcart.protocol.control import Challenge, ControlMessage, Hello, expect
from fedcart.secagg.crypto import IdentityKey


def raw_control(body: dict[str, Any]) -> bytes:
    """A CONTROL frame holding ``body`` as it is, valid or not."""
    return bytes([channel.CONTROL]) + json.dumps(body).encode()


async def challenge(ws: ClientConnection) -> Challenge:
    """The server's first message."""
    _, message = channel.parse(await ws.recv())
    return expect(message, Challenge)  # type: ignore[arg-type]


def hello(key: IdentityKey, nonce: bytes, server_key: bytes, model_version: int = -1,
          follow_model: bool = True) -> Hello:
    """An honest hello of ``key`` for the challenge ``nonce``."""
    return Hello(key.public, key.sign(channel.checkin_statement(nonce, server_key)),
                 model_version, follow_model=follow_model)


async def check_in(ws: ClientConnection, key: IdentityKey, server_key: bytes,
                   model_version: int = -1, follow_model: bool = True) -> ControlMessage:
    """Check in honestly as ``key``; the server's answer (a Welcome, a Refusal...)."""
    nonce = (await challenge(ws)).nonce
    await ws.send(hello(key, nonce, server_key, model_version, follow_model).to_frame())
    _, reply = channel.parse(await ws.recv())
    return reply  # type: ignore[return-value]
