"""What both sides decide about the transport before any frame: whether a host is this
machine only, where plaintext is allowed without the operator's explicit ``--insecure``."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost): traffic to
    it never crosses a network, so plaintext there reveals nothing."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name, or "" (every interface)
        return False
