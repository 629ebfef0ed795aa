"""A device that lies about its input, against the real aggregator and honest devices: it
cannot move the published model by more than the honest range allows, whatever words it
masks, and the round completes."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from fedcart.aggregator.process import AggregatorProcess
from fedcart.model_export.bundle import read_bundle
from fedcart.protocol.terms import RoundTerms, Task
from tests.test_service import CONFIG, cli, make_world

pytestmark = pytest.mark.reliability


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    return make_world(tmp_path)


def serve_with_a_liar(state, devices: list, config: str, lie, rounds: int) -> tuple:  # type: ignore[no-untyped-def]
    """Run the service on ``config`` with every device, the first answering each round's
    input with ``lie(terms, history)``; the devices' reports and the status."""
    state.config.write_text(config)
    devices[0].round_input = lie
    server = AggregatorProcess(state.root)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=rounds, timeout=120)
                                      for d in devices))

    reports = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    return reports, json.loads(cli("status", "--state", str(state.root), "--json"))


NO_DP = CONFIG.format(statistics="false", timeout=10.0, rounds=1).replace(
    'mechanism = "gaussian"', 'mechanism = "none"')


def test_a_lying_device_moves_the_model_no_further_than_the_clip(world) -> None:
    """The issue's attacks: one device moved a training sum by L2 35.8 with clip 1, and a
    tiny weight scaled the no-DP mean by 1.3e8. Here the liar masks int32's largest word in
    every entry (no weight travels any more): its group's sum is clamped and the sum's norm
    limited to what the honest range allows, so the model moves by at most the clip."""
    state, devices = world

    def lie(terms: RoundTerms, history: object = None) -> tuple[np.ndarray, int]:
        del history
        return np.full(terms.n_params, 0x7FFF_FFFF, np.uint32), 8

    reports, status = serve_with_a_liar(state, devices, NO_DP, lie, rounds=1)
    assert all(r[0].status == "completed" for r in reports)
    (round_,) = status["rounds"]
    assert round_["status"] == "completed" and round_["detail"]["norm_limited"]
    key = bytes(state.signing_key().verify_key)
    before = read_bundle(state.bundles / "v00000000", key).weights().flat().astype(float)
    after = read_bundle(state.bundles / "v00000001", key).weights().flat().astype(float)
    # FedAvg at rate 1: the step is the mean, whose norm is at most one device's bound
    # (clip 1, times 1 + SLACK, plus a step of rounding and float32's)
    assert np.linalg.norm(after - before) <= 1.0 * (1 + 1 / 32) * 1.001


def test_a_lying_device_in_an_evaluation_round_is_folded_into_the_honest_range(world) -> None:
    """A liar masks int32's largest word in every entry of each evaluation round: the
    rounds complete, and each estimate stays within what the group could honestly send
    (at most one query, and one hit, a device): bounded, not prevented (docs/security.md)."""
    state, devices = world
    honest_input = devices[0].round_input

    def lie(terms: RoundTerms, history: object = None) -> tuple[np.ndarray, int]:
        if terms.task is not Task.EVALUATE:
            return honest_input(terms, history)  # type: ignore[arg-type]
        return np.full(terms.n_params, 0x7FFF_FFFF, np.uint32), 1

    config = NO_DP.replace("every = 0", "every = 1\nsampling_rate = 1.0")
    reports, status = serve_with_a_liar(state, devices, config, lie, rounds=3)
    assert [r.status for r in reports[0]] == ["completed"] * 3  # the liar was in every sum
    assert [(r["detail"]["task"], r["status"]) for r in status["rounds"]] == [
        ("evaluate", "completed"), ("train", "completed"), ("evaluate", "completed")]
    assert len(status["estimates"]) == 2
    for estimate in status["estimates"]:
        assert 0 <= estimate["queries"] <= len(devices) + 1e-6
        for metric in ("hr", "ndcg", "mrr", "repeat_hr"):
            assert 0 <= estimate[metric]["low"] <= estimate[metric]["high"] <= 1
