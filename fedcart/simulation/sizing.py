"""Pre-flight check of a federated simulation: whether this machine can hold the run, said
before anything starts, with the figure and the flag that fits.

The estimate, for N devices of which the aggregator holds C connected at once
(derived.connections), a catalog of V items, embedding size d, w worker processes, a
statistics round's expected cohort c in G = ceil(c / --group-size) SecAgg+ groups, and a
co-occurrence head of M items (L = M (M + 1) / 2 values; 4-byte words, two values a word
when the round is packed); n is the longest round vector (L, V, or a training update's
parameters):

- aggregator: AGGREGATOR_BASE, plus AGGREGATOR_PER_DEVICE per connected device, plus a
  round's G group sums and the masked inputs in flight (at most w * INPUTS_AT_ONCE, as the
  workers send them) as words, plus three n-long 64-bit vectors (the decoded group sums,
  their total, the noised release) and the item table derived from the co-occurrence sum
  (TABLE_COPIES dense M x M float64 arrays);
- workers: WORKER_BASE each, DEVICE_BYTES per device, and INPUTS_AT_ONCE devices per
  worker holding a round's input at once, INPUT_COPIES times its words each;
- this process, evaluating the published models: EVALUATION_BYTES.

The peak is the sum, against memory.available_bytes(). Open files: the aggregator never
holds more than C connections (pacing sends the others away), so only a worker can run out:
it raises its soft limit to the hard one and holds DEVICE_FILES per connected device of its
shard, at most min(N / w, C), plus SPARE_FILES. The figures are upper bounds built from the
code's own constants, not measurements of a run.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedcart.data.evaluation import SCORES_BUDGET, Split
from fedcart.data.memory import available_bytes, gigabytes
from fedcart.model_export.model import group_size, n_parameters
from fedcart.simulation.central import baseline_notes
from fedcart.simulation.derived import connections, derive, packed
from fedcart.simulation.devices import INPUTS_AT_ONCE
from fedcart.simulation.federated import FederatedSettings

__all__ = ["Needs", "TooLarge", "check_run", "needs"]

AGGREGATOR_BASE = 200 << 20  # the service's resident size with its first connections
AGGREGATOR_PER_DEVICE = 35 << 10  # a websocket connection and its session
WORKER_BASE = 200 << 20  # a worker process: Python, numpy, onnxruntime, websockets
# a device: under 1 kB idle (its store holds no file open), plus its live websocket
# connection and asyncio task
DEVICE_BYTES = 50 << 10
INPUT_COPIES = 3  # a device's input while it is masked (2,000 inputs of 4 MB took 24 GB)
TABLE_COPIES = 3  # the unpacked Gram matrix and EASE's two (item_item.EASE_COPIES)
EVALUATION_BYTES = 6 * SCORES_BUDGET  # score matrices of one evaluation batch and copies
DEVICE_FILES = 1  # its socket: an idle device holds no file open (edge_client.store)
SPARE_FILES = 64  # stdio, pipes, logs and databases of a process (devices.py's margin)


class TooLarge(ValueError):
    """The run cannot fit on this machine; the message names the figure and a flag that
    fits (or what else would)."""


@dataclass(frozen=True)
class Needs:
    """A run's estimated peak (see module doc)."""

    memory: int  # bytes, all processes together
    worker_files: int  # of the busiest worker


def _head(settings: FederatedSettings, n_items: int) -> int:
    return min(settings.head_items or 0, n_items) if settings.statistics else 0


def _vector(settings: FederatedSettings, n_items: int, cohort: float) -> tuple[int, int]:
    """(values, 4-byte words) of the run's longest round vector."""
    head = _head(settings, n_items)
    statistic = max(head * (head + 1) // 2, n_items) if settings.statistics else 0
    update = group_size(settings.train_groups or (), n_items, settings.dim)
    words = (statistic + 1) // 2 if packed(settings, cohort) else statistic
    return max(statistic, update), max(words, update)


def needs(settings: FederatedSettings, n_devices: int, n_items: int) -> Needs:
    """The peak of a run of ``settings`` (derived: derived.derive) over ``n_devices`` and
    ``n_items``."""
    connected = connections(n_devices)
    cohort = max((settings.statistics_sampling_rate or 1.0) * connected,
                 settings.training_q(connected) * connected)
    groups = math.ceil(max(cohort, 1) / settings.group_size)
    workers = max(1, min(settings.workers, n_devices))
    values, words = _vector(settings, n_items, cohort)
    head = _head(settings, n_items)
    aggregator = (AGGREGATOR_BASE + AGGREGATOR_PER_DEVICE * connected
                  + 4 * words * (groups + workers * INPUTS_AT_ONCE) + 3 * 8 * values
                  + TABLE_COPIES * 8 * head * head)
    held = min(INPUTS_AT_ONCE, math.ceil(n_devices / workers))
    devices = (workers * WORKER_BASE + DEVICE_BYTES * n_devices
               + workers * held * INPUT_COPIES * 4 * words)
    evaluation = EVALUATION_BYTES + 2 * 4 * n_parameters(n_items, settings.dim)
    return Needs(memory=aggregator + devices + evaluation,
                 worker_files=DEVICE_FILES * min(math.ceil(n_devices / workers), connected)
                 + SPARE_FILES)


def _largest_fitting(settings: FederatedSettings, n_devices: int, n_items: int,
                     field: str, low: int, high: int, memory: int) -> int | None:
    """The largest value of ``field`` in [low, high] whose run fits in ``memory``."""
    def fits(value: int) -> bool:
        changed: dict[str, Any] = {field: value}
        return needs(replace(settings, **changed), n_devices, n_items).memory <= memory
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _check_memory(settings: FederatedSettings, n_devices: int, n_items: int,
                  memory: int) -> None:
    need = needs(settings, n_devices, n_items).memory
    if need <= memory:
        return
    head = _head(settings, n_items)
    figure = (f"{n_devices:,} devices, {n_items:,} items"
              + (f" and a co-occurrence head of {head:,}" if head else "")
              + f" need {gigabytes(need)} at the peak of a round; {gigabytes(memory)} "
              "available")
    options = [("--head-items", "head_items", 2, settings.head_items or 2)
               ] if settings.statistics else []
    options += [("--workers", "workers", 1, settings.workers),
                ("--dim", "dim", 0, settings.dim)]
    for flag, field, low, current in options:
        best = _largest_fitting(settings, n_devices, n_items, field, low, current, memory)
        if best is not None:
            raise TooLarge(f"{figure}: use {flag} {best} or fewer")
    raise TooLarge(f"{figure}: no setting fits; simulate a sample of the users or use a "
                   "machine with more memory")


def _check_files(n_devices: int, workers: int, need: Needs) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and need.worker_files > hard:
        per_worker = max(1, hard - SPARE_FILES) // DEVICE_FILES
        raise TooLarge(f"{n_devices:,} devices in {workers} workers need "
                       f"{need.worker_files:,} open files per worker, the hard limit is "
                       f"{hard:,}: use --workers {math.ceil(n_devices / per_worker)} or more")


def check_run(split: Split, plans: Sequence[FederatedSettings], say: Callable[[str], None],
              with_baselines: bool = True) -> None:
    """Refuse (:class:`TooLarge`) a run of ``plans`` over ``split`` that this machine
    cannot hold, before it starts; ``say`` what the central baselines will leave out."""
    n_devices = sum(1 for baskets in split.train if baskets)  # federated.population
    memory = available_bytes()
    for plan in plans:
        settings = derive(plan, n_devices, split.n_items).settings
        _check_memory(settings, n_devices, split.n_items, memory)
        _check_files(n_devices, min(settings.workers, n_devices),
                     needs(settings, n_devices, split.n_items))
    if with_baselines:
        for note in baseline_notes(split):
            say(note)
