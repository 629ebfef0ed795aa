"""Every decoder of outside input accepts or raises its documented error, for any input:
the TOML config, the bundle manifest, connection frames, and a user's CSV."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedcart.aggregator.config import ConfigError, load_config
from fedcart.data.datasets import BasketData, CsvColumns, DataError, load_csv
from fedcart.model_export.bundle import FORMAT_VERSION, PAYLOAD_FILES, BundleError, Manifest
from fedcart.protocol import channel
from fedcart.protocol.control import ControlMessage
from fedcart.secagg.errors import MalformedMessage

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
toml_values = st.recursive(
    st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_config_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        load_config(path)


@FUZZ
@given(section=st.sampled_from(["server", "round", "training", "privacy", "optimizer", "x"]),
       key=st.sampled_from(["port", "sampling_rate", "min_clients", "clip_norm", "name",
                            "lr", "mechanism", "delta", "tls_cert", "unknown"]),
       value=toml_values)
def test_config_values(tmp_path: Path, section: str, key: str, value: object) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[{section}]\n{key} = {json.dumps(value)}\n")
    with contextlib.suppress(ConfigError):
        load_config(path)


@FUZZ
@given(body=json_values)
def test_manifest_json(body: object) -> None:
    with contextlib.suppress(BundleError):
        Manifest.from_json(json.dumps(body).encode())


@FUZZ
@given(raw=st.binary(max_size=200))
def test_manifest_bytes(raw: bytes) -> None:
    with contextlib.suppress(BundleError):
        Manifest.from_json(raw)


@FUZZ
@given(frame=st.binary(max_size=300) | st.text(max_size=50))
def test_connection_frames(frame: bytes | str) -> None:
    with contextlib.suppress(MalformedMessage):
        channel.parse(frame)


@FUZZ
@given(frame=st.builds(lambda body: bytes([channel.CONTROL]) + json.dumps(body).encode(),
                       json_values))
def test_control_frames(frame: bytes) -> None:
    try:
        kind, message = channel.parse(frame)
    except MalformedMessage:
        return
    assert kind == channel.CONTROL and isinstance(message, ControlMessage)


@FUZZ
@given(rows=st.lists(st.lists(st.text(alphabet="ab1,\"\n ;x", max_size=6), min_size=1,
                              max_size=4), max_size=8))
def test_csv_loader(tmp_path: Path, rows: list[list[str]]) -> None:
    path = tmp_path / "baskets.csv"
    path.write_text("u,i,t\n" + "\n".join(",".join(r) for r in rows))
    try:
        data = load_csv(path, CsvColumns(user="u", item="i", time="t"))
    except DataError:
        return
    assert isinstance(data, BasketData) and data.users


VALID = {"format": FORMAT_VERSION, "model_version": 3, "round": 2, "n_items": 2, "dim": 4,
         "neighbours": 1, "vocabulary_sha256": "00", "history": {"decay": 0.9},
         "files": dict.fromkeys(PAYLOAD_FILES, "00")}


def test_the_valid_manifest_is_accepted() -> None:
    """The base the next test varies must itself parse, or that test proves nothing."""
    assert Manifest.from_json(json.dumps(VALID).encode()).model_version == 3


@FUZZ
@given(field=st.sampled_from(sorted(VALID)), value=json_values)
@example(field="format", value=float("inf"))  # int(inf) raises OverflowError
@example(field="n_items", value=-1)
@example(field="neighbours", value=-1)
@example(field="files", value={"weights.bin": "00"})
def test_manifest_with_one_bad_field(field: str, value: object) -> None:
    body = {**VALID, field: value}
    with contextlib.suppress(BundleError):
        Manifest.from_json(json.dumps(body).encode())


@pytest.fixture(scope="module")
def packed_bundle(tmp_path_factory) -> bytes:
    import nacl.signing
    import numpy as np

    from fedcart.model_export.bundle import pack_members, read_bundle
    from fedcart.model_export.export import export_bundle
    from fedcart.model_export.model import init_weights

    key = nacl.signing.SigningKey(bytes(32))
    out = tmp_path_factory.mktemp("b") / "v1"
    export_bundle(out, init_weights(3, 2, np.random.default_rng(0)), ["a", "b", "c"],
                  ["A", "B", "C"], key, model_version=1)
    return pack_members(read_bundle(out, bytes(key.verify_key)).members())


@FUZZ
@given(data=st.data())
def test_received_bundle_bytes(packed_bundle: bytes, data) -> None:
    """What a device receives as a bundle frame: cut, flipped or junk bytes are refused."""
    import nacl.signing

    from fedcart.model_export.bundle import unpack_members, verify_members

    raw = bytearray(packed_bundle)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    public = bytes(nacl.signing.SigningKey(bytes(32)).verify_key)
    try:
        bundle = verify_members(unpack_members(bytes(raw)), public)
    except BundleError:
        return
    # a flip in zip metadata may be harmless, but what is accepted is exactly what was signed
    assert bundle.members() == verify_members(unpack_members(packed_bundle), public).members()
