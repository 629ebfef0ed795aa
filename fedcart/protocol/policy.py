"""What a device agrees to, pinned on the device like its server key: the server proposes a
round's terms, the device's policy decides.

The secure-aggregation rules (smallest cohort, threshold, tolerated corruption) are
``secagg.policy.ClientPolicy``, checked by the round itself; this policy holds them too, and
adds the rules on what the device computes: the largest clip norm it will send at, the
norms it accepts, and that the terms describe the model and catalog the device holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedcart.model_export.bundle import Manifest
from fedcart.model_export.model import group_size, trained_groups
from fedcart.protocol.evaluation import SLOTS
from fedcart.protocol.statistics import check_head, triangle_size
from fedcart.protocol.terms import Norm, RoundTerms, Task, TermsError
from fedcart.secagg.policy import ClientPolicy

__all__ = ["DevicePolicy"]


@dataclass(frozen=True)
class DevicePolicy:
    """A device's rules for the rounds it joins. ``max_clip_norm``: the largest norm it
    lets a round clip its contribution at (the noise a server adds is out of the device's
    sight, so a larger clip can only weaken a round's privacy); ``norms``: the clipping norms
    it accepts; ``secagg``: the protocol's rules."""

    max_clip_norm: float = 64.0
    norms: frozenset[Norm] = frozenset(Norm)
    secagg: ClientPolicy = field(default_factory=ClientPolicy)

    def check(self, terms: RoundTerms, manifest: Manifest) -> None:
        """Raise TermsError unless this device may take part in a round on ``terms`` with
        the model ``manifest`` describes."""
        if terms.clip_norm > self.max_clip_norm:
            raise TermsError(f"clip norm {terms.clip_norm:g} exceeds this device's limit "
                             f"{self.max_clip_norm:g}")
        if terms.norm not in self.norms:
            raise TermsError(f"this device does not clip in the {terms.norm.value} norm")
        if terms.vocabulary_sha256 != manifest.vocabulary_sha256:
            raise TermsError("the round is for another catalog")
        if terms.task in (Task.TRAIN, Task.EVALUATE) and \
                terms.model_version != manifest.model_version:
            raise TermsError(f"the round is for model {terms.model_version}, this "
                             f"device has {manifest.model_version}")
        if terms.task is Task.TRAIN:
            assert terms.training is not None
            if terms.packed:
                raise TermsError("a training update cannot be packed")
            try:
                groups = trained_groups(terms.training.groups)
            except ValueError as exc:
                raise TermsError(str(exc)) from None
            expected = group_size(groups, manifest.n_items, manifest.dim)
        elif terms.task is Task.POPULARITY:
            expected = manifest.n_items
        elif terms.task is Task.EVALUATE:
            expected = SLOTS
        else:
            try:
                check_head(list(terms.head), manifest.n_items)
            except ValueError as exc:
                raise TermsError(str(exc)) from None
            expected = triangle_size(len(terms.head))
        if terms.n_params != expected:
            raise TermsError(f"the round aggregates {terms.n_params} values, this device's "
                             f"{terms.task.value} has {expected}")
