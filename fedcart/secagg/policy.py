"""What a device requires of a round before it takes part: pinned on the device, never set
by the server, checked on the signed round config before the device sends anything.

The server picks n, k, t and c; each can weaken a device's privacy if chosen small, so the
device bounds each:

- n, the participants: the server learns the sum over the survivors, and the consistency
  quorum (``secagg.consistency``) makes that more than (n + c) / 2 of them. At the default
  ``min_participants`` of 20 a device's input is summed with at least 10 others' (c = 0);
  a smaller cohort is refused.
- k, the neighbours (after rounding up to even, at most n - 1): they hold the device's
  shares and are the parties it masks with. The rule k/2 < t <= k is what keeps a server
  from rebuilding both of a device's secrets from a consistent survivor set, and t >= 2
  keeps one neighbour from rebuilding either alone, so k >= 2; ``min_degree`` (4 by
  default, or n - 1 when the cohort is smaller) asks for more.
- c, the corrupt participants the round tolerates: it sets the quorum, so a server that
  claims c = 0 while it runs sybils gets a quorum its sybils can help reach.
  ``min_corrupt_fraction`` makes the device require c >= ceil(fraction * n).
- with c > 0, the chance that a random neighbourhood holds 2t - k or more corrupt clients
  (who, with the server, expose the device's input through shares) is
  P[Bin(k, c/n) >= 2t - k]; the device requires it to be at most ``max_disclosure``, per
  graph drawn (the server can try several graphs: see ``secagg.graph``).

Violations raise ProtocolViolation; the device leaves the round having sent nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcart.secagg.consistency import corrupt_count
from fedcart.secagg.errors import ProtocolViolation
from fedcart.secagg.graph import effective_degree
from fedcart.secagg.messages import RoundConfig
from fedcart.secagg.params import DISCLOSURE_BOUND, binomial_cdf

__all__ = ["DEFAULT_POLICY", "PERMISSIVE", "ClientPolicy"]


@dataclass(frozen=True)
class ClientPolicy:
    """A device's rules for a round's SecAgg+ parameters (see the module docstring).

    ``min_participants``: the smallest n accepted. ``min_degree``: the fewest neighbours k
    (n - 1 when the cohort is smaller). ``min_corrupt_fraction``: c must be at least
    ceil(fraction * n). ``max_disclosure``: the largest P[Bin(k, c/n) >= 2t - k] accepted."""

    min_participants: int = 20
    min_degree: int = 4
    min_corrupt_fraction: float = 0.0
    max_disclosure: float = DISCLOSURE_BOUND

    def __post_init__(self) -> None:
        if self.min_participants < 3 or self.min_degree < 2:
            raise ValueError("no round of fewer than 3 participants or 2 neighbours is "
                             "private: min_participants >= 3, min_degree >= 2")
        if not 0.0 <= self.min_corrupt_fraction < 1.0 or not 0.0 <= self.max_disclosure <= 1:
            raise ValueError("min_corrupt_fraction must lie in [0, 1), max_disclosure in "
                             "[0, 1]")

    def required_corrupt(self, n: int) -> int:
        """The smallest c this device accepts for n participants: ceil(fraction * n)."""
        return corrupt_count(n, self.min_corrupt_fraction)

    def check(self, config: RoundConfig) -> None:
        """Raise ProtocolViolation naming the first rule ``config`` breaks."""
        n, t, c = len(config.participants), config.threshold, config.corrupt
        if n < self.min_participants:
            raise ProtocolViolation(f"{n} participants, this device's policy requires at "
                                    f"least {self.min_participants}")
        if config.degree < 1:
            raise ProtocolViolation(f"degree {config.degree} is not a neighbour graph")
        k = effective_degree(n, config.degree)
        if k < min(self.min_degree, n - 1):
            raise ProtocolViolation(f"{k} neighbours, this device's policy requires at "
                                    f"least {min(self.min_degree, n - 1)}")
        if not (2 * t > k and k >= t >= 2):
            raise ProtocolViolation(f"threshold {t} unsafe for {k} neighbours (need "
                                    "k/2 < t <= k and t >= 2)")
        if c >= n:
            raise ProtocolViolation(f"the round tolerates {c} corrupt of {n} participants: "
                                    "no quorum exists")
        if c < self.required_corrupt(n):
            raise ProtocolViolation(f"the round tolerates {c} corrupt participants, this "
                                    f"device's policy requires at least "
                                    f"{self.required_corrupt(n)} of {n}")
        if c > 0:
            # P[Bin(k, c/n) >= 2t - k], summed exactly: P[Bin(k, 1 - c/n) <= 2k - 2t]
            risk = binomial_cdf(2 * k - 2 * t, k, 1.0 - c / n)
            if risk > self.max_disclosure:
                raise ProtocolViolation(
                    f"with {c} of {n} corrupt, {2 * t - k} corrupt among {k} neighbours "
                    f"(probability {risk:.1e}) would expose this device's input; its policy "
                    f"accepts {self.max_disclosure:.1e}")


# What a device holds to unless it is given another policy: ClientPolicy() (frozen).
DEFAULT_POLICY = ClientPolicy()

# For in-memory rounds of small cohorts (tests, simulations, benchmarks): any round the
# protocol allows at all (from 3 participants, k = 2, t = 2; any c). Never a device's policy.
PERMISSIVE = ClientPolicy(min_participants=3, min_degree=2, max_disclosure=1.0)
