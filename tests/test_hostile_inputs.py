"""Every decoder of outside input accepts or raises its documented error, for any input:
the TOML config, the bundle manifest, connection frames, and a user's CSV."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aggregator.config import ConfigError, load_config
from model_export.bundle import BundleError, Manifest
from model_export.datasets import BasketData, CsvColumns, DataError, load_csv
from secagg import channel
from secagg.errors import MalformedMessage

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
        kind, body = channel.parse(frame)
    except MalformedMessage:
        return
    assert kind == channel.CONTROL and isinstance(body["type"], str)


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


VALID = {"format": 1, "model_version": 3, "round": 2, "n_items": 2, "dim": 4,
         "vocabulary_sha256": "", "history": {"decay": 0.9},
         "files": dict.fromkeys(["recommend.onnx", "recommend.ort", "train_step.onnx",
                                 "train_step.ort", "weights.bin"], "00"),
         "items": [["a", "A"], ["b", "B"]]}


@FUZZ
@given(field=st.sampled_from(sorted(VALID)), value=json_values)
@example(field="format", value=float("inf"))  # int(inf) raises OverflowError
@example(field="n_items", value=-1)
@example(field="items", value=[["a"], ["b", "B"]])
def test_manifest_with_one_bad_field(field: str, value: object) -> None:
    from model_export.bundle import vocabulary_digest

    body = {**VALID, "vocabulary_sha256": vocabulary_digest(["a", "b"]), field: value}
    with contextlib.suppress(BundleError):
        Manifest.from_json(json.dumps(body).encode())
