"""What both sides decide about the transport before any frame: whether a host is this
machine only, where plaintext is allowed without the operator's explicit ``--insecure``,
the keepalive both ends keep, and how a large message is cut into fragments."""

from __future__ import annotations

import ipaddress

__all__ = ["PING_INTERVAL", "PING_TIMEOUT", "QUEUED_FRAGMENTS", "fragments", "is_loopback",
           "read_ahead"]

PING_INTERVAL = 20.0  # seconds between keepalive pings, each way
# seconds a ping may go unanswered before the connection is dropped: longer than websockets'
# 20 s default, since a busy aggregator (a round's sums) or a phone's radio may be slower
PING_TIMEOUT = 60.0

FRAGMENT = 64 << 10  # bytes of a large message's websocket fragment
# fragments a device's connection takes in before its application reads them (websockets'
# max_queue); beyond them it stops reading the socket, and the sender's flow control holds
# the rest
QUEUED_FRAGMENTS = 16


def fragments(frame: bytes) -> bytes | list[memoryview]:
    """``frame`` as websockets sends it: whole if it is small, else as fragments of at most
    FRAGMENT bytes (views, not copies). A receiver's parser then holds one fragment of it at
    a time, not the whole message (a masked input or a bundle is megabytes), and one that
    reads slowly holds the rest back in the sender, by the connection's flow control."""
    if len(frame) <= FRAGMENT:
        return frame
    view = memoryview(frame)
    return [view[i:i + FRAGMENT] for i in range(0, len(frame), FRAGMENT)]


def read_ahead(frame: bytes) -> bool:
    """Whether a device's connection takes in all of ``frame`` whether or not its
    application is reading, with room to spare for the messages after it: its frames (the
    fragments, and the empty one websockets ends them with) fill at most half of the
    QUEUED_FRAGMENTS it reads ahead. A ping sent after it is then answered at once, and
    waiting for its pong tells nothing of the device."""
    frames = 1 if len(frame) <= FRAGMENT else -(-len(frame) // FRAGMENT) + 1
    return frames <= QUEUED_FRAGMENTS // 2


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost): traffic to
    it never crosses a network, so plaintext there reveals nothing."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name, or "" (every interface)
        return False
