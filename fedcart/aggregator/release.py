"""What a round releases, computed from its groups' sums: functions of explicit inputs that
neither read nor write the service's state.

A round's completed groups' integer sums are clamped to what their devices could honestly
have sent and added up (:func:`add_up`); the total gets the round's DP noise, sampled
exactly in the integers (:func:`add_noise`), and is brought back into the values' units
within the norm honest inputs and the noise can reach (:func:`in_units`). A training round's
noised mean then steps the server optimizer (:func:`training_step`); a co-occurrence round's
noised sum becomes the item-item table and, with the released popularity, the model's bias
(:func:`cooccurrence_model`).

The service commits a round's privacy charge to the ledger before it calls
:func:`add_noise`: no noised sum exists that the ledger does not account for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcart.aggregator import noise
from fedcart.aggregator.item_item import StatisticsSettings, item_table
from fedcart.aggregator.optimizer import make_optimizer
from fedcart.aggregator.privacy import Mechanism, RoundCharge
from fedcart.model_export.model import Neighbours, Weights, place
from fedcart.protocol.statistics import popularity_bias
from fedcart.protocol.update import UpdateFormat

__all__ = ["Noised", "add_noise", "add_up", "cooccurrence_model", "in_units",
           "inputs_bound", "training_step"]


def add_up(fmt: UpdateFormat, results: Sequence[tuple[np.ndarray, int]],
           dp: bool) -> tuple[np.ndarray, list[int]]:
    """The groups' integer sums added up, each (a group's modular sum of encodings, with
    its number of survivors) first decoded and clamped to what its devices could honestly
    have sent (UpdateFormat.clamp says why it is clamped, not refused); and how many entries
    of each group's sum were outside that range. Under DP (``dp``) the range is for the
    format's group size, a constant; without DP, the survivors'."""
    total = np.zeros(fmt.n_params, np.int64)
    outside: list[int] = []
    for result, survivors in results:
        sums, count = fmt.clamp(fmt.decode(result), fmt.group_size if dp else survivors)
        outside.append(count)
        total += sums
    return total, outside


@dataclass(frozen=True)
class Noised:
    """An integer sum with noise added, the noise's standard deviation, and a bound on the
    noise's norm that it exceeds with negligible probability (all in the integers' steps)."""

    sums: np.ndarray
    std: float
    norm_bound: float


def add_noise(sums: np.ndarray, charge: RoundCharge) -> Noised:
    """``sums`` plus the noise ``charge`` accounts for (its mechanism at its noise scale),
    sampled exactly in the integers: seconds for a large vector, so the service calls it in
    a worker thread."""
    scale = charge.noise_scale
    if charge.mechanism is Mechanism.GAUSSIAN:
        draw = noise.discrete_gaussian(sums.size, scale)
        std, norm_bound = scale, noise.gaussian_norm_bound(sums.size, scale)
    else:
        draw = noise.discrete_laplace(sums.size, scale)
        std, norm_bound = scale * math.sqrt(2), noise.laplace_norm_bound(sums.size, scale)
    return Noised(sums + draw, std, norm_bound)


def in_units(fmt: UpdateFormat, noised: Noised, inputs: int) -> tuple[np.ndarray, float, bool]:
    """A noised sum of ``inputs`` devices' integers in the values' units and brought within
    the norm honest inputs and the noise can reach; the noise's standard deviation in those
    units; and whether the norm had to be scaled down."""
    values, limited = fmt.limit_norm(fmt.values(noised.sums), inputs, noised.norm_bound)
    return values, noised.std / fmt.scale, limited


def inputs_bound(expected: float) -> int:
    """How many inputs a DP round's released sum's norm is bounded for, given the expected
    cohort size q N: a number that depends on no one's participation, which Poisson sampling
    exceeds with probability below 1e-9 (q N + 6 sqrt(q N) + 1), so that the bound, when a
    lying device makes it bind, reveals nothing."""
    return math.ceil(expected + 6 * math.sqrt(expected) + 1)


def training_step(weights: Weights, noised: np.ndarray, denominator: float,
                  groups: Sequence[str], optimizer: str, lr: float,
                  state: dict[str, np.ndarray]) -> tuple[Weights, dict[str, np.ndarray]]:
    """The weights after one step of the server optimizer (``optimizer`` at ``lr``, resumed
    from ``state``) on the trained ``groups`` with the mean update, the noised sum over a
    ``denominator`` the server fixes (no device's input sets it); and the optimizer's new
    state."""
    mean = noised / max(denominator, 1.0)
    step = make_optimizer(optimizer, lr)
    step.load(state)
    flat = step.step(weights.flat().astype(np.float64),
                     place(mean, groups, weights.n_items, weights.dim))
    return Weights.from_flat(flat.astype(np.float32), weights.n_items, weights.dim), step.state()


def cooccurrence_model(weights: Weights, total: np.ndarray, head: np.ndarray,
                       names: Sequence[str], settings: StatisticsSettings, noise_std: float,
                       popularity: np.ndarray) -> tuple[Weights, Neighbours]:
    """A new model from a noised co-occurrence sum over the ``head`` items: ``weights`` with
    the bias of the released ``popularity``, and the item-item table derived from the sum
    (seconds of numpy for a large catalog: the names' table, EASE's inverse)."""
    table = item_table(total, head, names, settings, noise_std)
    bias = settings.popularity_weight * popularity_bias(popularity)
    return Weights(weights.e_in, weights.e_out, bias, weights.blend), table
