"""One limit on the sockets the aggregator holds, whatever their stage: in the websocket
opening handshake, checking in, connected, or being sent away. (With TLS, asyncio hands a
socket over once its TLS handshake is done, so that is where its count starts.)

Pacing (``pacing.py``) bounds the devices that stay connected, and the service counts the
check-ins under way against it; but a connection holds an open file from the moment it is
accepted, and until its opening handshake is done (up to websockets' ``open_timeout``) no
handler of ours has seen it. A flood of connections that never finish their handshake
could then take every file the process may open, and the store's database with them. So
every accepted socket is counted here, and one beyond the limit is closed as it is
accepted, before any byte of it is read: the files under the limit stay the store's.

websockets documents ``create_connection`` as the place for this: a subclass of
``ServerConnection`` that the server makes for each accepted socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from websockets.asyncio.server import ServerConnection

__all__ = ["SocketLimit"]


class SocketLimit:
    """Counts the sockets a websockets server holds and closes the ones beyond ``limit``.
    ``on_refused``: called for each socket closed that way (a metric)."""

    def __init__(self, limit: int, on_refused: Callable[[], None] = lambda: None) -> None:
        if limit < 1:
            raise ValueError(f"a server needs at least one socket, not {limit}")
        self.limit = limit
        self.open = 0
        self.on_refused = on_refused

    def connection_class(self) -> type[ServerConnection]:
        """The ``create_connection`` to pass to ``serve``."""
        limit = self

        class Limited(ServerConnection):
            refused = False

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if limit.open >= limit.limit:
                    self.refused = True
                    limit.on_refused()
                    # no handler is started: nothing of it is read
                    cast(asyncio.Transport, transport).abort()
                    return
                limit.open += 1
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                if self.refused:
                    return
                limit.open -= 1
                super().connection_lost(exc)

        return Limited
