"""What both sides decide about the transport before any frame: whether a host is this
machine only, where plaintext is allowed without the operator's explicit ``--insecure``,
and the keepalive both ends keep."""

from __future__ import annotations

import ipaddress

__all__ = ["PING_INTERVAL", "PING_TIMEOUT", "is_loopback"]

PING_INTERVAL = 20.0  # seconds between keepalive pings, each way
# seconds a ping may go unanswered before the connection is dropped: longer than websockets'
# 20 s default, since a busy aggregator (a round's sums) or a phone's radio may be slower
PING_TIMEOUT = 60.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost): traffic to
    it never crosses a network, so plaintext there reveals nothing."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name, or "" (every interface)
        return False
