"""Which model version goes to every device that follows the model: the publishing policy.

A training round's cohort always gets the version it trains, and an evaluation round's the
version it scores. Under ``Publish.ALWAYS`` every device that follows the model gets each new
version as it is published; under ``Publish.NOT_WORSE`` a new version waits for its
evaluation round, and goes out only when its HitRate@10 estimate is at least the serving
version's less the tolerance. The comparison is of point estimates from two rounds with
different cohorts: their intervals say how far apart two equal models can land.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcart.aggregator.config import Publish
from fedcart.protocol.evaluation import Estimate

__all__ = ["Decision", "decide"]


@dataclass(frozen=True)
class Decision:
    """Whether a version goes to every device, and why, in a sentence for the log."""

    publish: bool
    reason: str


def decide(candidate: Estimate, serving: Estimate | None, serving_version: int,
           policy: Publish, tolerance: float) -> Decision | None:
    """What the policy makes of ``candidate``'s estimate, beside the serving version's (None:
    it has none); None when there is nothing to decide (the policy publishes at once, or the
    candidate is the serving version)."""
    if policy is Publish.ALWAYS or candidate.model_version <= serving_version:
        return None
    version = candidate.model_version
    if serving is None:
        return Decision(True, f"version {version} (HitRate@10 {candidate.hr}) goes to every "
                              f"device: serving version {serving_version} has no estimate")
    beside = (f"HitRate@10 {candidate.hr} against serving version {serving_version}'s "
              f"{serving.hr}")
    if candidate.hr.value >= serving.hr.value - tolerance:
        return Decision(True, f"version {version} goes to every device: {beside}")
    return Decision(False, f"version {version} is not sent to every device: {beside}, worse "
                           f"by more than the tolerance {tolerance:g}")
