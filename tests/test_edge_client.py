"""The device runtime on its own: bundles refused without harm, a crash mid-swap, the
bounded cart store, and the local update it would send."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fedcart
from fedcart.aggregator.statedir import init_state
from fedcart.edge_client import training
from fedcart.edge_client.cli import main as device_main
from fedcart.edge_client.device import Device
from fedcart.edge_client.store import MAX_BASKETS
from fedcart.model_export.bundle import (
    CONSTANT_FILES,
    GRAPH_FILES,
    BundleError,
    pack_members,
    read_bundle,
    unpack_members,
)
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import N_BLEND, init_weights, pick
from fedcart.protocol.statistics import triangle_size
from fedcart.protocol.terms import Norm, RoundTerms, Task, TermsError, TrainingPlan
from fedcart.protocol.update import UpdateFormat

ITEMS = [f"sku{i:02d}" for i in range(25)]


@pytest.fixture
def served(tmp_path: Path):
    """An aggregator state (model v0) and a v1 bundle signed by the same key."""
    state = init_state(tmp_path / "agg", ITEMS, ITEMS, dim=4, seed=0)
    key = state.signing_key()
    public = bytes(key.verify_key)
    first = read_bundle(state.bundles / "v00000000", public)
    export_bundle(tmp_path / "v1", init_weights(25, 4, np.random.default_rng(9)), ITEMS,
                  ITEMS, key, model_version=1, round_id=1, history_decay=0.9,
                  graphs={n: first.files[n] for n in GRAPH_FILES})
    v0 = pack_members(first.members())
    v1 = pack_members(read_bundle(tmp_path / "v1", public).members())
    return public, v0, v1


def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(served, tmp_path) -> None:
    server_key, v0, v1 = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    before = device.recommend(["sku01"], 5)
    tampered = bytearray(v1)
    tampered[len(tampered) // 2] ^= 0xFF
    for bad in (bytes(tampered), v1[:1000], b"not a zip"):
        with pytest.raises(BundleError):
            device.install(bad)
    unsigned = unpack_members(v1)
    del unsigned["manifest.sig"]
    with pytest.raises(BundleError, match="unsigned"):
        device.install(pack_members(unsigned))
    assert device.model_version == 0 and device.recommend(["sku01"], 5) == before
    device.install(v1)
    assert device.model_version == 1
    with pytest.raises(BundleError, match="downgrade"):
        device.install(v0)
    # a restarted device verifies and uses what it installed last
    assert Device(tmp_path / "device", server_key).model_version == 1


def test_a_crash_mid_swap_leaves_the_old_bundle(served, tmp_path) -> None:
    server_key, v0, v1 = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    blobs = tmp_path / "device" / "blobs"
    (blobs / ".deadbeef.x.tmp").write_bytes(v1[: len(v1) // 3])  # torn write
    (tmp_path / "device" / ".current.x.tmp").write_bytes(b'{"manifest.json": "dead"}')
    restarted = Device(tmp_path / "device", server_key)
    assert restarted.model_version == 0
    assert restarted.recommend(["sku02"], 3)


def test_a_new_version_needs_only_manifest_and_weights(served, tmp_path) -> None:
    """The server leaves out the files a device says it holds; a device whose store lost
    one refuses the partial bundle and keeps its current one."""
    server_key, v0, v1 = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    held = set(device.held_files())
    manifest = read_bundle(tmp_path / "v1", server_key).manifest
    assert held == {manifest.files[n] for n in CONSTANT_FILES}
    lean = unpack_members(v1)
    for name in CONSTANT_FILES:
        del lean[name]
    (device.store.blobs / manifest.files["train_step.ort"]).rename(tmp_path / "aside")
    with pytest.raises(BundleError, match=r"train_step\.ort is missing"):
        device.install(pack_members(lean))
    assert device.model_version == 0
    (tmp_path / "aside").rename(device.store.blobs / manifest.files["train_step.ort"])
    device.install(pack_members(lean))
    assert device.model_version == 1 and device.recommend(["sku01"], 3)
    # a private store keeps only the current bundle's files
    assert {p.name for p in device.store.blobs.iterdir()} == set(
        device.store.current_files().values())


def test_cart_store_is_bounded_and_ordered(served, tmp_path) -> None:
    server_key, _, _ = served
    device = Device(tmp_path / "device", server_key)
    for i in range(MAX_BASKETS + 7):
        device.store.add_basket([f"sku{i % 25:02d}", "sku24"], at=float(i))
    baskets = device.store.baskets()
    assert len(baskets) == MAX_BASKETS
    assert baskets[0] == sorted(["sku07", "sku24"])  # the 7 oldest are gone
    with pytest.raises(ValueError, match="at least one item"):
        device.add_basket([])


def test_local_update_trains_on_own_baskets_only(served, tmp_path) -> None:
    server_key, v0, _ = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    with pytest.raises(RuntimeError):
        Device(tmp_path / "fresh", server_key).recommend(["sku01"])
    delta, examples = device.local_update(1, [2.0, 2.0, 0.5, 0.05], 8)
    assert examples == 0 and not delta.any()  # no history yet: nothing to learn
    device.add_basket(["sku01", "sku02", "sku03"])
    device.add_basket(["sku02", "sku03", "unknown-item"])  # unknown items are skipped
    delta, examples = device.local_update(2, [2.0, 2.0, 0.5, 0.05], 8, seed=0)
    # leave-one-out examples of the newest basket only; the older one is history
    assert examples == 2 and np.abs(delta).max() > 0
    _, capped = device.local_update(1, [2.0, 2.0, 0.5, 0.05], 8, seed=0, examples=1)
    assert capped == 1
    fmt = UpdateFormat(n_params=delta.size, clip_norm=0.5, group_size=10)
    encoded = fmt.encode(delta, examples)
    assert encoded.dtype == np.uint32 and encoded.size == delta.size  # no weight travels


def test_a_training_input_is_the_update_of_the_named_groups_only(served, tmp_path,
                                                                  monkeypatch) -> None:
    """The device trains only the groups the notice names (the others at learning rate 0)
    and uploads their update alone, weighted by its examples."""
    server_key, v0, _ = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    device.add_basket(["sku01", "sku02", "sku03"])
    device.add_basket(["sku02", "sku03"])
    train = training.local_update
    rates_used = []

    def spy(bundle, history, epochs, rates, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates_used.append(list(rates))
        return train(bundle, history, epochs, rates, *args, **kwargs)

    monkeypatch.setattr(training, "local_update", spy)
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rates=(2.0, 2.0, 0.5, 0.05),
                        examples=8, groups=("blend",))
    terms = device.accept_terms(RoundTerms(
        Task.TRAIN, device.manifest.vocabulary_sha256, n_params=N_BLEND, clip_norm=60.0,
        norm=Norm.L2, packed=False, group_size=10, weight_cap=8.0, model_version=0,
        training=plan).to_bytes())
    vector, examples = device.round_input(terms)
    assert rates_used == [[0.0, 0.0, 0.0, 0.05]] and examples == 2
    fmt = UpdateFormat(N_BLEND, 60.0, 10, weight_cap=8.0)
    values = fmt.values(fmt.decode(vector))
    delta, _ = train(device.current_bundle(), device.store.baskets(), 1,
                     [0.0, 0.0, 0.0, 0.05], 8)  # one batch holds both examples
    np.testing.assert_allclose(values, 2 / 8 * pick(delta, ["blend"], len(ITEMS), 4),
                               atol=2 / fmt.scale)


def test_statistics_inputs_are_the_devices_clipped_summaries(served, tmp_path) -> None:
    """A statistics round's input is the device's own popularity or co-occurrence vector,
    clipped, with weight 1; a notice it cannot follow is refused with the reason."""
    server_key, v0, _ = served
    device = Device(tmp_path / "device", server_key)
    device.install(v0)
    device.add_basket(["sku01", "sku02"])
    device.add_basket(["sku02", "sku03", "unknown-item"])
    index = {item: i for i, item in enumerate(ITEMS)}
    base = RoundTerms(Task.POPULARITY, device.manifest.vocabulary_sha256,
                      n_params=len(ITEMS), clip_norm=1.0, norm=Norm.L2, packed=False,
                      group_size=10)
    vector, has_data = device.round_input(device.accept_terms(base.to_bytes()))
    fmt = UpdateFormat(len(ITEMS), 1.0, 10)
    values = fmt.values(fmt.decode(vector))
    assert has_data == 1
    want = np.zeros(len(ITEMS))
    want[[index["sku01"], index["sku02"], index["sku03"]]] = 1 / np.sqrt(3)  # clipped to 1
    np.testing.assert_allclose(values, want, atol=1 / fmt.scale)
    head = (index["sku03"], index["sku01"], index["sku02"])
    cooc = replace(base, task=Task.COOCCURRENCE, head=head, n_params=6, clip_norm=10.0)
    vector, _ = device.round_input(device.accept_terms(cooc.to_bytes()))
    fmt = UpdateFormat(6, 10.0, 10)
    values = fmt.values(fmt.decode(vector))
    # head positions 0: sku03, 1: sku01, 2: sku02; pairs (a <= b) row by row
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    bought = {(0, 0), (1, 1), (2, 2), (1, 2), (0, 2)}  # sku01 and sku03 never together
    np.testing.assert_allclose(values, [float(p in bought) for p in pairs], atol=1e-4)
    for bad in ((index["sku01"],) * 2, (0, len(ITEMS)), (1,)):
        with pytest.raises(TermsError, match="head"):
            device.accept_terms(replace(cooc, head=bad, n_params=triangle_size(len(bad)))
                                .to_bytes())


def test_a_device_recommends_and_trains_with_a_model_without_embeddings(tmp_path) -> None:
    """d = 0: the device ranks its user's own history first (the blend; v0 knows no
    popularity), trains and uploads the bias and blend, and refuses to train embeddings the
    model does not have."""
    state = init_state(tmp_path / "agg", ITEMS, ITEMS, dim=0, seed=0)
    public = bytes(state.signing_key().verify_key)
    device = Device(tmp_path / "device", public)
    bundle = device.install(pack_members(read_bundle(state.bundles / "v00000000",
                                                     public).members()))
    assert bundle.manifest.dim == 0 and bundle.weights().flat().size == len(ITEMS) + N_BLEND
    device.add_basket(["sku05", "sku06"])
    device.add_basket(["sku07", "sku01"])
    top = [r.item for r in device.recommend(["sku01"], 3)]
    assert set(top[:3]) == {"sku05", "sku06", "sku07"}  # history first, cart item excluded
    plan = TrainingPlan(epochs=1, batch_size=8, learning_rates=(2.0, 2.0, 0.5, 0.05),
                        examples=8, groups=("bias", "blend"))
    terms = device.accept_terms(RoundTerms(
        Task.TRAIN, device.manifest.vocabulary_sha256, n_params=len(ITEMS) + N_BLEND,
        clip_norm=60.0, norm=Norm.L2, packed=False, group_size=10, weight_cap=8.0,
        model_version=0, training=plan).to_bytes())
    vector, examples = device.round_input(terms)
    assert examples == 2 and vector.size == len(ITEMS) + N_BLEND
    fmt = UpdateFormat(len(ITEMS) + N_BLEND, 60.0, 10, weight_cap=8.0)
    assert np.any(fmt.values(fmt.decode(vector))[:len(ITEMS)] != 0)  # the bias moved
    embeddings = replace(plan, groups=("e_out", "bias"))
    with pytest.raises(ValueError, match="d = 0 has no e_out"):
        device.accept_terms(replace(terms, training=embeddings).to_bytes())


def test_the_device_command_says_its_version() -> None:
    result = CliRunner().invoke(device_main, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"fedcart-device, version {fedcart.__version__}\n"


def test_add_basket_refuses_items_outside_the_catalog_and_stores_nothing(served,
                                                                         tmp_path) -> None:
    server_key, v0, _ = served
    shipped = tmp_path / "v0.zip"
    shipped.write_bytes(v0)
    state = str(tmp_path / "dev")
    init = CliRunner().invoke(device_main, ["init", "--state", state, "--server-key",
                                            server_key.hex(), "--bundle", str(shipped)])
    assert init.exit_code == 0, init.output
    typo = ["sku01", *(f"nope{i}" for i in range(7)), "nope0"]
    refused = CliRunner().invoke(device_main, ["add-basket", "--state", state,
                                               "--items", ",".join(typo)])
    assert refused.exit_code == 1
    assert refused.output == ("Error: not in the catalog of model version 0: 'nope0', "
                              "'nope1', 'nope2', 'nope3', 'nope4' and 2 more; nothing "
                              "stored\n")
    assert Device(state, server_key).store.baskets() == []
    added = CliRunner().invoke(device_main, ["add-basket", "--state", state,
                                             "--items", "sku01,sku02"])
    assert added.exit_code == 0 and added.output == ""
    assert Device(state, server_key).store.baskets() == [["sku01", "sku02"]]


def test_add_basket_without_a_model_stores_the_basket_unchecked_and_says_so(
        served, tmp_path) -> None:
    server_key, _, _ = served
    state = str(tmp_path / "dev")
    init = CliRunner().invoke(device_main, ["init", "--state", state, "--server-key",
                                            server_key.hex()])
    assert init.exit_code == 0, init.output
    added = CliRunner().invoke(device_main, ["add-basket", "--state", state,
                                             "--items", "anything"])
    assert added.exit_code == 0
    assert added.stderr.startswith("warning: no model installed: the item ids are not checked")
    assert Device(state, server_key).store.baskets() == [["anything"]]


def test_bundle_pack_zips_a_verified_bundle_once(served, tmp_path) -> None:
    server_key, _, v1 = served
    out = tmp_path / "model.zip"
    packed = CliRunner().invoke(device_main, ["bundle", "pack", str(tmp_path / "v1"),
                                              str(out), "--public-key", server_key.hex()])
    assert packed.exit_code == 0, packed.output
    assert packed.output.startswith(f"{out}: model version 1 (round 1), V=25, ")
    assert unpack_members(out.read_bytes()) == unpack_members(v1)  # what a device is sent
    assert read_bundle(out, server_key).manifest.model_version == 1
    again = CliRunner().invoke(device_main, ["bundle", "pack", str(tmp_path / "v1"),
                                             str(out), "--public-key", server_key.hex()])
    assert again.exit_code == 1 and "exists: a bundle is never overwritten" in again.output
    stranger = tmp_path / "stranger.zip"
    wrong_key = CliRunner().invoke(device_main, ["bundle", "pack", str(tmp_path / "v1"),
                                                 str(stranger), "--public-key", "ab" * 32])
    assert wrong_key.exit_code == 1
    assert wrong_key.output.startswith("Error: not packed: ") and not stranger.exists()
    assert "signature does not verify" in wrong_key.output
