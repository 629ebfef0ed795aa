"""Federated evaluation: the query a device draws, its contribution, the estimate's interval
(against a Monte Carlo of sampling and noise), the publishing policy, and evaluation rounds
through a real aggregator whose estimates equal the central figure on the same baskets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedcart.aggregator import rounds
from fedcart.aggregator.config import AggregatorConfig, Publish
from fedcart.aggregator.process import AggregatorProcess
from fedcart.aggregator.serving import decide
from fedcart.edge_client.training import catalog_baskets
from fedcart.model_export.bundle import read_bundle
from fedcart.model_export.features import history_of
from fedcart.model_export.runtime import Recommender
from fedcart.protocol.evaluation import (
    CLIP,
    SLOTS,
    Estimate,
    Interval,
    Slot,
    contribution,
    estimate,
    query_of,
    rank_of_hidden,
)
from fedcart.protocol.policy import DevicePolicy
from fedcart.protocol.terms import Norm, RoundTerms, Task, TermsError
from fedcart.protocol.update import UpdateFormat
from tests.test_service import cli, make_world


def test_the_query_is_the_newest_basket_with_an_item_hidden_by_its_contents() -> None:
    older, newest = np.array([1, 2]), np.array([9, 4, 7, 5])
    query = query_of([older, newest])
    assert query is not None and query.hidden in newest
    assert sorted([*query.cart, query.hidden]) == [4, 5, 7, 9]
    assert [b.tolist() for b in query.history] == [[1, 2]]
    # the same basket in any order, after any history, hides the same item
    again = query_of([np.array([3]), np.array([3, 8]), newest[::-1]])
    assert again is not None and again.hidden == query.hidden
    hidden = {q.hidden for n in range(40)
              if (q := query_of([np.arange(n, n + 6)])) is not None}
    assert len(hidden) > 10  # the draw depends on the basket: not always its first item
    assert query_of([newest, np.array([3])]) is None  # the newest has one item: no query
    assert query_of([]) is None


def test_rank_of_hidden_matches_a_sort() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        scores = rng.integers(0, 6, 40).astype(np.float64)  # many ties
        scores[rng.integers(0, 40, 3)] = -np.inf
        cart = rng.choice(40, 5, replace=False)
        hidden = int(rng.choice(np.setdiff1d(np.arange(40), cart)))
        # by sorting: the hidden item placed first among its ties, the cart left out
        order = sorted((i for i in range(40) if i not in cart),
                       key=lambda i: (-scores[i], i != hidden))
        expected = math.inf if scores[hidden] == -np.inf else order.index(hidden) + 1
        assert rank_of_hidden(scores, cart, hidden) == expected


@pytest.mark.parametrize("rank,repeat", [(1.0, True), (10.0, False), (11.0, True),
                                         (math.inf, False)])
def test_a_contribution_is_never_clipped_and_encodes_exactly(rank: float, repeat: bool) -> None:
    values = contribution(rank, repeat)
    assert values.shape == (SLOTS,) and values.min() >= 0 and values.max() <= 1
    assert np.linalg.norm(values) <= CLIP
    hit = rank <= 10
    assert values[Slot.HIT] == hit and values[Slot.REPEAT_HIT] == (hit and repeat)
    assert values[Slot.RR] == pytest.approx(0.0 if rank == math.inf else 1 / rank)
    assert values[Slot.NDCG] == pytest.approx(1 / math.log2(rank + 1) if hit else 0.0)
    fmt = UpdateFormat(SLOTS, CLIP, group_size=250, unit=True)
    integers = fmt.integers(values)
    np.testing.assert_allclose(fmt.values(integers), values, atol=1 / fmt.scale)


def test_the_interval_covers_the_population_figure_under_sampling_and_noise() -> None:
    """Poisson sampling at q and Gaussian noise on every sum, 2,000 times: the 95% intervals
    hold the population's HitRate@10, NDCG@10 and MRR about 95% of the time, and do not
    cover it from being too wide (their width is close to the spread of the estimates)."""
    rng = np.random.default_rng(7)
    n, q, sigma, trials = 3000, 0.3, 6.0, 2000
    ranks = np.where(rng.random(n) < 0.35, rng.integers(1, 11, n), rng.integers(11, 400, n))
    repeat = rng.random(n) < 0.5
    population = np.array([contribution(float(r), bool(p))
                           for r, p in zip(ranks, repeat, strict=True)])
    truth = population.sum(axis=0)
    covered = {"hr": 0, "ndcg": 0, "mrr": 0, "repeat_hr": 0}
    values, widths = [], []
    for _ in range(trials):
        sample = population[rng.random(n) < q].sum(axis=0)
        est = estimate(1, sample + rng.normal(0, sigma, SLOTS), sigma, q)
        covered["hr"] += est.hr.contains(truth[Slot.HIT] / truth[Slot.COUNT])
        covered["ndcg"] += est.ndcg.contains(truth[Slot.NDCG] / truth[Slot.COUNT])
        covered["mrr"] += est.mrr.contains(truth[Slot.RR] / truth[Slot.COUNT])
        covered["repeat_hr"] += est.repeat_hr.contains(truth[Slot.REPEAT_HIT]
                                                       / truth[Slot.REPEAT])
        values.append(est.hr.value)
        widths.append(est.hr.high - est.hr.low)
    for name, count in covered.items():
        assert 0.93 <= count / trials <= 0.97, (name, count / trials)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.std(values), rel=0.1)


def test_at_q_1_without_noise_the_interval_is_the_figure() -> None:
    totals = np.array([40.0, 12, 8, 3, 15, 9, 20, 7])
    est = estimate(3, totals, 0.0, 1.0)
    assert est.hr == Interval(0.3, 0.3, 0.3) and est.queries == 40
    assert est.repeat_hr.value == pytest.approx(7 / 20)
    assert est.explore_hr.value == pytest.approx(5 / 20)
    assert Estimate.from_json(json.loads(json.dumps(est.to_json()))) == est
    with pytest.raises(ValueError, match="8 values"):
        estimate(3, totals[:4], 0.0, 1.0)


def _estimate(version: int, hr: float) -> Estimate:
    i = Interval(hr, hr - 0.02, hr + 0.02)
    return Estimate(version, 500.0, i, i, i, i, i, 1.0, 0.5)


def test_the_publishing_policy() -> None:
    serving = _estimate(4, 0.30)
    assert decide(_estimate(5, 0.25), serving, 4, Publish.ALWAYS, 0.0) is None
    assert decide(_estimate(4, 0.25), serving, 4, Publish.NOT_WORSE, 0.0) is None
    better = decide(_estimate(5, 0.31), serving, 4, Publish.NOT_WORSE, 0.0)
    assert better is not None and better.publish and "goes to every device" in better.reason
    worse = decide(_estimate(5, 0.29), serving, 4, Publish.NOT_WORSE, 0.0)
    assert worse is not None and not worse.publish and "tolerance 0" in worse.reason
    tolerated = decide(_estimate(5, 0.29), serving, 4, Publish.NOT_WORSE, 0.02)
    assert tolerated is not None and tolerated.publish
    first = decide(_estimate(5, 0.01), None, 4, Publish.NOT_WORSE, 0.0)
    assert first is not None and first.publish and "has no estimate" in first.reason


def test_a_device_scores_only_the_model_it_holds(tmp_path: Path) -> None:
    state, _ = make_world(tmp_path, n_users=3)
    bundle = read_bundle(state.bundles / "v00000000", bytes(state.signing_key().verify_key))
    manifest = bundle.manifest
    terms = RoundTerms(Task.EVALUATE, manifest.vocabulary_sha256, SLOTS, CLIP, Norm.L2,
                       packed=False, group_size=20, model_version=manifest.model_version)
    assert RoundTerms.from_bytes(terms.to_bytes()) == terms
    DevicePolicy().check(terms, manifest)
    for bad, why in [({"model_version": manifest.model_version + 1}, "the round is for model"),
                     ({"n_params": SLOTS + 1}, "evaluate has 8")]:
        with pytest.raises(TermsError, match=why):
            DevicePolicy().check(RoundTerms(**{**terms.__dict__, **bad}), manifest)


def _central(bundle_dir: Path, server_key: bytes, devices: list) -> tuple[float, int]:
    """HitRate@10 of a version on every device's query, computed here from the devices'
    stored baskets: what an evaluation round over all of them must report."""
    bundle = read_bundle(bundle_dir, server_key)
    recommender = Recommender(bundle.files["recommend.ort"], bundle.weights(),
                              bundle.neighbours())
    hits = []
    for device in devices:
        query = query_of(catalog_baskets(bundle, device.store.baskets()))
        if query is None:
            continue
        features = history_of(query.history, bundle.manifest.history_decay, query.cart)
        scores = recommender.all_scores([query.cart], [features])[0]
        others = [s for i, s in enumerate(scores) if i not in set(query.cart.tolist())]
        hits.append(1 + sum(s > scores[query.hidden] for s in others) <= 10)
    return float(np.mean(hits)), len(hits)


CONFIG = """
[round]
sampling_rate = 1.0
min_clients = 3
phase_timeout = 10.0
max_rounds = 2
[privacy]
mechanism = "none"
[training]
lr_embeddings = 2.0
lr_bias = 5.0
[statistics]
enabled = false
[evaluation]
every = 1
sampling_rate = 1.0
publish = "not_worse"
"""


def test_evaluation_rounds_report_the_central_figure_and_drive_publishing(
        tmp_path: Path) -> None:
    """Every version is evaluated by all twelve devices through SecAgg+ (no noise, q = 1):
    each estimate is the figure computed centrally from the same baskets; the policy's
    decisions follow the estimates; status and /metrics (after a restart) show them."""
    state, devices = make_world(tmp_path)
    state.config.write_text(CONFIG.replace("min_clients = 3",
                                           f"min_clients = 3\nmin_connected = {len(devices)}"))
    server_key = bytes(state.signing_key().verify_key)
    server = AggregatorProcess(state.root)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=5, timeout=120)
                                      for d in devices))

    reports = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    assert all([r.status for r in rs] == ["completed"] * 5 for rs in reports), server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    tasks = [r["detail"]["task"] for r in status["rounds"]]
    assert tasks == ["evaluate", "train", "evaluate", "train", "evaluate"]
    estimates = {e["model_version"]: Estimate.from_json(e) for e in status["estimates"]}
    assert sorted(estimates) == [0, 1, 2]
    for version, est in estimates.items():
        hr, queries = _central(state.bundles / f"v{version:08d}", server_key, devices)
        assert est.queries == pytest.approx(queries, abs=1e-6)
        assert est.hr.value == pytest.approx(hr, abs=1e-6)
        # every device, no noise: the interval is the fixed-point rounding's alone
        assert est.hr.low <= hr <= est.hr.high and est.hr.high - est.hr.low < 1e-5
    # the policy: each later version goes out only if it is not worse than the serving one
    serving = 0
    for r in status["rounds"][2::2]:
        version = r["model_version"]
        decision = r["detail"]["publish"]
        assert decision["sent"] == (estimates[version].hr.value
                                    >= estimates[serving].hr.value), decision
        serving = version if decision["sent"] else serving
    assert status["serving_version"] == serving
    table = cli("status", "--state", str(state.root))
    assert "federated evaluation" in table and f"{serving} *" in table

    again = AggregatorProcess(state.root)  # no device: it only serves /metrics
    try:
        metrics = again.http("/metrics")
    finally:
        again.terminate()
    for version, est in estimates.items():
        line = (f'fedcart_evaluation{{bound="estimate",metric="hr10",'
                f'model_version="{version}"}}')
        assert any(m.startswith(line) and float(m.split()[-1]) == pytest.approx(est.hr.value)
                   for m in metrics.splitlines()), metrics
    assert f"fedcart_serving_model_version {serving}.0" in metrics


def test_evaluation_rounds_sample_as_training_does_unless_told() -> None:
    """A deployment whose training rounds take every device evaluates with every device
    too, not at a rate whose cohorts its min_clients would refuse; its own q wins."""
    config = AggregatorConfig(sampling_rate=1.0)
    assert rounds.sampling_rate(config, Task.EVALUATE) == 1.0
    assert rounds.sampling_rate(dataclasses.replace(config, evaluation_sampling_rate=0.2),
                                Task.EVALUATE) == 0.2
    assert rounds.sampling_rate(config, Task.TRAIN) == 1.0
