"""Wire messages: round trips, and for any bytes a message or MalformedMessage."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg.errors import MalformedMessage
from secagg.messages import (
    MAX_CLIENTS,
    SERVER,
    AdvertiseKeys,
    ConsistencySignature,
    EncryptedShares,
    MaskedInput,
    Message,
    NeighbourKeys,
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
    RoundConfig(5, SERVER, (1, 2, 3), (K32, K32, K32), 2, 2, b"g" * 32, 10, SIG),
    ad,
    NeighbourKeys(5, SERVER, (ad, AdvertiseKeys(5, 4, K32, K32, SIG))),
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
    header = struct.pack("<4sBBHQII", b"FCSA", 1, 6, 0, 1, 1, 4)
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode(header + struct.pack("<I", 2**31))
    header = struct.pack("<4sBBHQII", b"FCSA", 1, 7, 0, 1, SERVER, 4)
    with pytest.raises(MalformedMessage, match="exceeds the limit"):
        decode(header + struct.pack("<I", MAX_CLIENTS + 1))
    dup = SurvivorSet(1, SERVER, (1, 1)).encode()
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode(dup)


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
