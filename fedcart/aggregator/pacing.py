"""Pace steering: which checked-in devices stay connected, and when the others come back.

A server holds one socket per connected device, and the operating system caps its open
files; a population larger than that cannot all stay connected, and one that reconnects at
will arrives as a storm the server cannot serve. So, as in Bonawitz et al. (2019,
section 2.3), the server answers each check-in with one of two things: stay (while it holds
fewer than ``capacity`` connections), or come back after a delay it names. The delays are
handed out as consecutive slots of ``1 / rate`` seconds, so that devices sent away return at
``rate`` check-ins per second however many there are, each within ``jitter`` seconds of its
slot. A device that stays is released once it has been connected ``lease`` seconds while
others wait, so the connected set turns over and every device is in time among those a
round samples.

This module is sans-I/O: :class:`Pacer` takes times and counts and returns decisions; the
service (``fedcart.aggregator.service``) sends them as ``ComeBack`` messages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FD_MARGIN", "FILES_KEPT", "Pacer", "Pacing", "PacingError"]

# open files below the limit that the default capacity leaves free: FILES_KEPT of them no
# socket may take (the database, bundles and logs), the others for sockets in their opening
# handshake or being sent away (aggregator.sockets)
FD_MARGIN = 256
FILES_KEPT = FD_MARGIN // 2


class PacingError(ValueError):
    """A pacing setting out of range."""


@dataclass(frozen=True)
class Pacing:
    """The pacing settings. ``capacity``: connections held at once. ``rate``: check-ins per
    second that returning devices are spread over. ``min_delay``: the shortest time a
    device is sent away for. ``lease``: seconds a device stays connected while others wait.
    ``jitter``: the window a device may return in after its slot's start."""

    capacity: int
    rate: float
    min_delay: float = 5.0
    lease: float = 300.0
    jitter: float = 2.0

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise PacingError(f"capacity must be at least 1, not {self.capacity}")
        if not self.rate > 0:
            raise PacingError(f"rate must be positive, not {self.rate}")
        if self.min_delay < 0 or self.lease <= 0 or self.jitter < 0:
            raise PacingError("min_delay and jitter must be >= 0 and lease > 0")


class Pacer:
    """Decides check-ins under :class:`Pacing`; its one piece of state is ``next_slot``, the
    start of the first slot not yet handed out."""

    def __init__(self, pacing: Pacing) -> None:
        self.pacing = pacing
        self.next_slot = 0.0

    def admits(self, connected: int) -> bool:
        """True when a device checking in now may stay connected."""
        return connected < self.pacing.capacity

    def send_away(self, now: float) -> float:
        """Book the next free slot for a device sent away at ``now``; the delay, in seconds,
        until its slot starts (it returns within ``jitter`` after that)."""
        start = max(now + self.pacing.min_delay, self.next_slot)
        self.next_slot = start + 1.0 / self.pacing.rate
        return start - now

    def waiting(self, now: float) -> bool:
        """True while devices sent away have not all had their slot: connections that
        outstay their lease should then make room."""
        return self.next_slot > now

    def outstayed(self, connected_since: dict[int, float], now: float) -> list[int]:
        """The devices (by id) to release now: those connected longer than the lease,
        oldest first, when others wait; none otherwise."""
        if not self.waiting(now):
            return []
        due = [(since, cid) for cid, since in connected_since.items()
               if now - since >= self.pacing.lease]
        return [cid for _, cid in sorted(due)]
