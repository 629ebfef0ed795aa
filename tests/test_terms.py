"""A round's terms: a typed value that decodes strictly, and a device policy that refuses
terms which would weaken the device's privacy whatever the server signs."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.aggregator.statedir import init_state
from fedcart.edge_client.device import Device
from fedcart.model_export.bundle import pack_members, read_bundle
from fedcart.model_export.model import TENSOR_NAMES, group_size
from fedcart.protocol.policy import DevicePolicy
from fedcart.protocol.terms import MAX_TERMS, Norm, RoundTerms, Task, TermsError, TrainingPlan

ITEMS = [f"sku{i:02d}" for i in range(20)]
PLAN = TrainingPlan(epochs=1, batch_size=8, learning_rates=(2.0, 2.0, 0.5, 0.05), examples=8,
                    groups=TENSOR_NAMES)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    state = init_state(tmp_path / "agg", ITEMS, ITEMS, dim=4, seed=0)
    public = bytes(state.signing_key().verify_key)
    device = Device(tmp_path / "device", public)
    device.install(pack_members(read_bundle(state.bundles / "v00000000", public).members()))
    return device


def _training(device: Device, **changes: object) -> RoundTerms:
    assert device.manifest is not None
    terms = RoundTerms(Task.TRAIN, device.manifest.vocabulary_sha256,
                       n_params=group_size(TENSOR_NAMES, len(ITEMS), 4), clip_norm=1.0,
                       norm=Norm.L2, packed=False, group_size=100, weight_cap=8.0,
                       model_version=0, training=PLAN)
    return replace(terms, **changes)


def test_terms_round_trip_and_decode_strictly(device: Device) -> None:
    terms = _training(device)
    assert RoundTerms.from_bytes(terms.to_bytes()) == terms
    cooc = replace(terms, task=Task.COOCCURRENCE, training=None, head=(3, 1, 2), n_params=6)
    assert RoundTerms.from_bytes(cooc.to_bytes()) == cooc
    raw = json.loads(terms.to_bytes())
    for bad, why in [({**raw, "clip_norm": "1"}, "wrong type"),
                     ({**raw, "packed": 1}, "wrong type"),
                     ({**raw, "n_params": True}, "wrong type"),
                     ({**raw, "extra": 1}, "unknown fields"),
                     ({k: v for k, v in raw.items() if k != "norm"}, "lack 'norm'"),
                     ({**raw, "task": "exfiltrate"}, "not a valid Task"),
                     ({**raw, "training": None}, "training plan"),
                     ({**raw, "clip_norm": -1.0}, "positive")]:
        with pytest.raises(TermsError, match=why):
            RoundTerms.from_bytes(json.dumps(bad).encode())
    for data in (b"\xff", b"[1]", b'{"clip_norm": NaN}', b" " * (MAX_TERMS + 1)):
        with pytest.raises(TermsError):
            RoundTerms.from_bytes(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_any_bytes_decode_to_terms_or_a_terms_error(data: bytes) -> None:
    with contextlib.suppress(TermsError):
        RoundTerms.from_bytes(data)


def test_a_server_signing_a_huge_clip_is_refused(device: Device) -> None:
    """The attack of the issue: a notice with clip_norm 1e6 made the same basket go out with
    norm 141.8 against a calibrated 5. Signed or not, the device's policy refuses it."""
    device.add_basket(["sku01", "sku02", "sku03"])
    with pytest.raises(TermsError, match="exceeds this device's limit"):
        device.accept_terms(_training(device, clip_norm=1e6).to_bytes())
    strict = Device(device.store.dir, device.server_key,
                    policy=DevicePolicy(max_clip_norm=0.5, norms=frozenset({Norm.L2})))
    with pytest.raises(TermsError, match=r"limit 0\.5"):
        strict.accept_terms(_training(device).to_bytes())
    with pytest.raises(TermsError, match="l1 norm"):
        strict.accept_terms(_training(device, clip_norm=0.5, norm=Norm.L1).to_bytes())


@pytest.mark.parametrize(("changes", "why"), [
    ({"model_version": 7}, "for model 7"),
    ({"vocabulary_sha256": "0" * 64}, "another catalog"),
    ({"n_params": 5}, "aggregates 5 values"),
    ({"packed": True}, "cannot be packed"),
])
def test_terms_for_another_model_or_shape_are_refused(device: Device, changes: dict,
                                                      why: str) -> None:
    with pytest.raises(TermsError, match=why):
        device.accept_terms(_training(device, **changes).to_bytes())
    assert device.accept_terms(_training(device).to_bytes()) == _training(device)
