"""The control messages (fedcart.protocol.control) and their frame (fedcart.protocol.channel):
every message survives its own encoding, and the decoder refuses, naming the field, what a
hostile peer can put in a JSON object."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcart.protocol import channel
from fedcart.protocol.control import (
    Challenge,
    ComeBack,
    ControlMessage,
    Hello,
    Leave,
    Outcome,
    Refusal,
    RoundNotice,
    RoundOver,
    Welcome,
    decode,
    expect,
)
from fedcart.secagg.errors import MalformedMessage

ids = st.integers(1, 2**53 - 1)
versions = st.integers(-1, 2**53 - 1)
digests = st.frozensets(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=16)
reasons = st.text(max_size=1000)

messages = st.one_of(
    st.builds(Challenge, st.binary(min_size=32, max_size=32), st.binary(min_size=32,
                                                                         max_size=32)),
    st.builds(Hello, st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64),
              versions, digests, st.booleans(), st.integers(0, 2**53 - 1),
              st.none() | st.text(max_size=128)),
    st.builds(Welcome, ids, versions),
    st.builds(Refusal, reasons),
    st.builds(RoundNotice, ids, ids),
    st.builds(RoundOver, ids, st.sampled_from(Outcome), versions),
    st.builds(Leave, reasons),
    st.builds(ComeBack, st.floats(0, 7 * 86400.0), st.floats(0, 3600.0)),
)


@given(messages)
def test_every_message_survives_its_frame(message: ControlMessage) -> None:
    kind, parsed = channel.parse(message.to_frame())
    assert kind == channel.CONTROL
    assert parsed == message


def _body(message: ControlMessage) -> dict:
    return json.loads(message.to_frame()[1:])


def _hello() -> Hello:
    return Hello(os.urandom(32), os.urandom(64), 3, frozenset({"ab" * 32}), True, 7, "tok")


def test_the_frame_is_a_plain_json_object_with_its_type() -> None:
    body = _body(RoundOver(4, Outcome.DROPPED, 9))
    assert body == {"type": "round_over", "round_id": 4, "outcome": "dropped",
                    "model_version": 9}
    assert "token" not in _body(Hello(b"\x01" * 32, b"\x02" * 64, -1))


@pytest.mark.parametrize(("change", "complaint"), [
    (lambda b: b.pop("signature"), "hello: no 'signature'"),
    (lambda b: b.update(extra=1), "unexpected field(s) ['extra']"),
    (lambda b: b.update(model_version=True), "'model_version' must be an integer"),
    (lambda b: b.update(model_version=2**53), "'model_version' must be an integer"),
    (lambda b: b.update(last_round=-1), "'last_round' must be an integer"),
    (lambda b: b.update(public_key="00" * 31), "'public_key' must be 32 bytes"),
    (lambda b: b.update(public_key="zz" * 32), "'public_key' must be 32 bytes"),
    (lambda b: b.update(signature=["00"]), "'signature' must be a string"),
    (lambda b: b.update(held_files=["ab" * 32] * 17), "'held_files' must be a list"),
    (lambda b: b.update(held_files=["AB" * 32]), "'held_files' must be a list"),
    (lambda b: b.update(follow_model=1), "'follow_model' must be true or false"),
    (lambda b: b.update(token="t" * 129), "'token' must be a string of at most 128"),
    (lambda b: b.update(type="hi"), "unknown control message type 'hi'"),
])
def test_a_hostile_hello_is_refused_naming_the_field(change, complaint: str) -> None:
    body = _body(_hello())
    change(body)
    with pytest.raises(MalformedMessage, match=complaint.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        decode(body)


def test_an_unknown_outcome_a_zero_id_and_a_delay_out_of_range_are_refused() -> None:
    with pytest.raises(MalformedMessage, match="'outcome' must be one of"):
        decode({"type": "round_over", "round_id": 1, "outcome": "won", "model_version": 1})
    with pytest.raises(MalformedMessage, match="'client_id' must be an integer in \\[1"):
        decode({"type": "round", "round_id": 1, "client_id": 0})
    for after in (-1.0, 8 * 86400.0, True, "5"):
        with pytest.raises(MalformedMessage, match="'after' must be a number of seconds"):
            decode({"type": "come_back", "after": after, "window": 1.0})


@pytest.mark.parametrize("frame", [
    b"", "text", b"\x01not json", b"\x01[1, 2]", b"\x01" + b" " * (64 * 1024 + 1), b"\x09x"])
def test_a_frame_that_is_not_one_is_refused(frame: bytes | str) -> None:
    with pytest.raises(MalformedMessage):
        channel.parse(frame)


def test_expect_refuses_a_message_out_of_order() -> None:
    welcome = Welcome(5, 2)
    assert expect(welcome, Welcome) is welcome
    with pytest.raises(MalformedMessage, match="expected hello, got welcome"):
        expect(welcome, Hello)
