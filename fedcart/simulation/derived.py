"""The settings a simulation derives from its data and from this machine, where the user
gave none: what makes a run of any size finish, and what it costs, follows from the number
of devices N and of items V, so constants tuned on the bundled sets would not do.

The rule (README, "Sizing a run"):

- **Connections.** The aggregator holds at most C connections at once: its open-file limit
  less ``pacing.FD_MARGIN``, and at most CONNECTIONS_PER_CORE for each of this machine's
  cores, since every held connection is also a simulated device on the same cores (its
  keepalive pings, its share of each round) and opening handshakes in flight need files
  beyond C. A population larger than C takes turns: the aggregator sends the others away
  to come back later, and a round samples among the connected.
- **Statistics rounds** cover every device (q = 1) while N <= min(STATISTICS_COHORT, C).
  Beyond, each is a Poisson sample of the connected devices, of an expected
  min(STATISTICS_COHORT, CONNECTED_SHARE x C): q = that / min(N, C). The counts are then
  estimates from a sample as large as the round's cost allows, and the accountant grants
  the amplification of q. (A round over the whole population cannot start while fewer
  than all of it can be connected: ``rounds.Waits``.)
- **Head M** (the co-occurrence round's items): the regime's tuned M (``Preset``), but at
  most V, and at most what keeps the round's masked inputs within STATISTICS_BYTES
  (expected cohort x 4-byte words a device): the bytes through the aggregator, and each
  device's masking, grow as M^2.
- **Evaluation rounds** sample at the training rounds' q, raised to an expected cohort of
  min(CONNECTED_SHARE x min(N, C), EVALUATION_COHORT): enough devices for intervals of about
  +-0.02 on HitRate@10, and no more, since each costs a round of SecAgg+.

A value the user gave is kept as given; the sizing check (sizing.py) then says whether it
fits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcart.aggregator.config import AggregatorConfig
from fedcart.protocol.statistics import triangle_size
from fedcart.protocol.update import UpdateFormat

if TYPE_CHECKING:  # federated.py derives its settings here
    from fedcart.simulation.federated import FederatedSettings

__all__ = [
    "CONNECTED_SHARE",
    "CONNECTIONS_PER_CORE",
    "EVALUATION_COHORT",
    "STATISTICS_BYTES",
    "STATISTICS_COHORT",
    "Choice",
    "Derived",
    "connections",
    "derive",
    "packed",
]

CONNECTIONS_PER_CORE = 5_000  # held connections a simulation's core serves, at most
STATISTICS_COHORT = 10_000  # devices a statistics round samples, at most, in expectation
STATISTICS_BYTES = 24 * 10**9  # masked inputs of a co-occurrence round, at most
CONNECTED_SHARE = 0.5  # of the connected devices, what a derived sample takes at most
EVALUATION_COHORT = 2_500  # devices an evaluation round samples, at most, in expectation


@dataclass(frozen=True)
class Choice:
    """A derived setting: its option, the value chosen, and why."""

    option: str
    value: float
    why: str

    def __str__(self) -> str:
        return f"{self.option} {self.value:g}: {self.why}"


@dataclass(frozen=True)
class Derived:
    """Settings with every derived value filled, and the choices that filled them."""

    settings: FederatedSettings
    choices: tuple[Choice, ...]


def connections(n_devices: int) -> int:
    """C: the connections the simulation's aggregator holds at once, at most ``n_devices``
    (its process raises its open-file limit to the hard one, which it inherits) and at most
    CONNECTIONS_PER_CORE for each core."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    cores = CONNECTIONS_PER_CORE * (os.cpu_count() or 1)
    return min(n_devices, cores, AggregatorConfig().pacing(open_files=files).capacity)


def packed(settings: FederatedSettings, cohort: float) -> bool:
    """Whether a statistics round of ``settings`` over an expected ``cohort`` sends two
    values a 4-byte word (no DP, and groups small enough for 16-bit lanes)."""
    return settings.mechanism == "none" and UpdateFormat.can_pack(
        min(settings.group_size, max(3, math.ceil(cohort))))


def _words(head: int, two_a_word: bool) -> int:
    values = triangle_size(head)
    return (values + 1) // 2 if two_a_word else values


def _largest_head(cap: int, cohort: float, two_a_word: bool) -> int:
    """The largest M <= cap whose co-occurrence round fits STATISTICS_BYTES."""
    fits = math.isqrt(int(2 * STATISTICS_BYTES / (4 * cohort) * (2 if two_a_word else 1)))
    while fits > 2 and _words(fits, two_a_word) * 4 * cohort > STATISTICS_BYTES:
        fits -= 1
    return max(2, min(cap, fits))


def derive(settings: FederatedSettings, n_devices: int, n_items: int) -> Derived:
    """``settings`` (resolved against their preset) with the statistics rounds' q, the head
    M and the evaluation rounds' q derived from ``n_devices`` and ``n_items`` where unset."""
    resolved = settings.resolved()
    connected = connections(n_devices)
    choices: list[Choice] = []
    changes: dict[str, Any] = {}
    statistics_q = resolved.statistics_sampling_rate
    if statistics_q is None:
        if n_devices <= min(STATISTICS_COHORT, connected):
            statistics_q = 1.0
            why = (f"every device: N = {n_devices:,} is at most {STATISTICS_COHORT:,} and "
                   "all can be connected at once")
        else:
            cohort = min(STATISTICS_COHORT, CONNECTED_SHARE * connected)
            statistics_q = cohort / connected
            why = (f"an expected {cohort:,.0f} of the {connected:,} connected devices (of "
                   f"N = {n_devices:,}): min({STATISTICS_COHORT:,}, {CONNECTED_SHARE:g} of "
                   "them)")
        changes["statistics_sampling_rate"] = statistics_q
        choices.append(Choice("--statistics-q", round(statistics_q, 4), why))
    if resolved.statistics and settings.head_items is None:
        cohort = statistics_q * connected
        two_a_word = packed(resolved, cohort)
        tuned = resolved.head_items or 2
        head = _largest_head(min(tuned, n_items), cohort, two_a_word)
        limit = ("the tuned value" if head == tuned else
                 f"all V = {n_items:,} items" if head == n_items else
                 f"{cohort:,.0f} devices x {_words(head, two_a_word) * 4 / 1e6:.1f} MB stay "
                 f"within the {STATISTICS_BYTES / 1e9:g} GB a co-occurrence round may move "
                 f"(the tuned {tuned:,} would move "
                 f"{cohort * _words(tuned, two_a_word) * 4 / 1e9:.0f} GB)")
        changes["head_items"] = head
        choices.append(Choice("--head-items", head, limit))
    if resolved.evaluation_sampling_rate is None:
        q = resolved.training_q(connected)
        floor = min(CONNECTED_SHARE * connected, EVALUATION_COHORT) / connected
        changes["evaluation_sampling_rate"] = max(q, floor)
        choices.append(Choice(
            "--eval-q", round(max(q, floor), 4),
            f"an expected {max(q, floor) * connected:,.0f} of the {connected:,} connected "
            f"devices: min({CONNECTED_SHARE:g} of them, {EVALUATION_COHORT:,}), or the "
            "training rounds' q if higher"))
    return Derived(dataclasses.replace(resolved, **changes), tuple(choices))
