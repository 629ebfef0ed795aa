"""Wire messages: round trips, and for any bytes a message or MalformedMessage."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.secagg.errors import MalformedMessage
from fedcart.secagg.messages import (
    MAX_CLIENTS,
    MAX_TERMS,
    SERVER,
    VERSION,
    AdvertiseKeys,
    Advertisements,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    Message,
    RoundConfig,
    SharesForYou,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    decode,
)

K32, SIG = b"k" * 32, b"s" * 64
ad = AdvertiseKeys(5, 3, K32, b"m" * 32, SIG)
SAMPLES: list[Message] = [
    RoundConfig(5, SERVER, (1, 2, 3), (K32, K32, K32), 2, 2, 1, 10, b'{"clip":1}', SIG),
    RoundConfig(5, SERVER, (1, 2, 3), (K32, K32, K32), 2, 2, 0, 10, b"", SIG),
    ad,
    Advertisements(5, SERVER, (ad, AdvertiseKeys(5, 4, K32, K32, SIG))),
    EncryptedShares(5, 3, (1, 2), (b"c" * 168, b"d" * 168)),
    SharesForYou(5, SERVER, (1,), (b"c" * 168,)),
    MaskedInput(5, 3, np.arange(10, dtype=np.uint32) * 2**28),
    SurvivorSet(5, SERVER, (1, 3)),
    ConsistencySignature(5, 3, SIG),
    UnmaskRequest(5, SERVER, (1, 3), (2,), (1, 3), (SIG, SIG)),
    UnmaskShares(5, 3, (1, 2), (0, 1), np.arange(32, dtype=np.int64).reshape(2, 16)),
]


def same(a: Message, b: Message) -> bool:
    if type(a) is not type(b):
        return False
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        if isinstance(value, np.ndarray):
            if not np.array_equal(value, other):
                return False
        elif value != other:
            return False
    return True


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    assert same(decode(message.encode()), message)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_extension_is_malformed(message: Message) -> None:
    data = message.encode()
    for cut in range(len(data)):
        with pytest.raises(MalformedMessage):
            decode(data[:cut])
    with pytest.raises(MalformedMessage):
        decode(data + b"\x00")


def test_envelope_errors_are_named() -> None:
    data = bytearray(SAMPLES[1].encode())
    for offset, value, text in [(0, ord("X"), "magic"), (4, 9, "version"),
                                (5, 99, "unknown message type"), (6, 1, "reserved")]:
        bad = bytearray(data)
        bad[offset] = value
        with pytest.raises(MalformedMessage, match=text):
            decode(bytes(bad))


def test_counts_are_bounded_before_allocation() -> None:
    header = struct.pack("<4sBBHQII", b"FCSA", VERSION, 6, 0, 1, 1, 4)
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode(header + struct.pack("<I", 2**31))
    header = struct.pack("<4sBBHQII", b"FCSA", VERSION, 7, 0, 1, SERVER, 4)
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode(header + struct.pack("<I", MAX_CLIENTS + 1))
    dup = SurvivorSet(1, SERVER, (1, 1)).encode()
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode(dup)


def test_version_1_messages_are_refused() -> None:
    data = bytearray(SAMPLES[0].encode())
    assert VERSION == 2 and data[4] == 2
    data[4] = 1
    with pytest.raises(MalformedMessage, match="version 1 is not supported"):
        decode(bytes(data))


def test_terms_are_bounded_and_signed() -> None:
    config = SAMPLES[0]
    assert isinstance(config, RoundConfig)
    big = RoundConfig(5, SERVER, (1,), (K32,), 1, 1, 0, 1, b"x" * (MAX_TERMS + 1), SIG)
    with pytest.raises(MalformedMessage, match="terms"):
        decode(big.encode())
    assert decode(RoundConfig(5, SERVER, (1,), (K32,), 1, 1, 0, 1, b"x" * MAX_TERMS,
                              SIG).encode()).terms == b"x" * MAX_TERMS
    # every privacy parameter, terms included, is in the signed part, length-prefixed
    base = config.signed_part()
    for change in ({"terms": b'{"clip":2}'}, {"corrupt": 2}, {"degree": 3},
                   {"threshold": 3}, {"participants": (1, 2, 4)}):
        assert dataclasses.replace(config, **change).signed_part() != base
    assert (dataclasses.replace(config, terms=b"a", vector_len=10).signed_part()
            != dataclasses.replace(config, terms=b"", vector_len=10).signed_part())


def test_advertisements_must_be_in_ascending_sender_order() -> None:
    a3, a4 = AdvertiseKeys(5, 3, K32, K32, SIG), AdvertiseKeys(5, 4, K32, K32, SIG)
    for bad in ((a4, a3), (a3, a3)):
        with pytest.raises(MalformedMessage, match="ascending"):
            decode(Advertisements(5, SERVER, bad).encode())
    # 132 bytes per advertisement on the wire
    one, two = (len(Advertisements(5, SERVER, keys).encode()) for keys in ((a3,), (a3, a4)))
    assert two - one == 132


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_decode_or_raise_the_documented_error(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(data)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_messages_decode_or_raise_the_documented_error(data) -> None:
    raw = bytearray(data.draw(st.sampled_from(SAMPLES)).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    try:
        message = decode(bytes(raw))
    except MalformedMessage:
        return
    assert isinstance(message, Message)
    assert decode(message.encode()).encode() == message.encode()
