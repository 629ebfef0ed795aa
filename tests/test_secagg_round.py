"""Whole SecAgg+ rounds in memory: exact sums under any dropout pattern the threshold and
the consistency quorum allow, a clear failure otherwise; a malicious server refused; a
hostile client dropped. (tests/test_malicious_server.py: the equivocating server, the
device policy, the derived graph seed, the signed terms.)"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcart.secagg.client import ClientRound, ClientState
from fedcart.secagg.consistency import quorum
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.errors import ProtocolViolation, RemoteProtocolError, RoundFailed
from fedcart.secagg.graph import neighbours
from fedcart.secagg.local import PHASES, run_local_round
from fedcart.secagg.messages import (
    Advertisements,
    MaskedInput,
    RoundConfig,
    UnmaskRequest,
    decode,
)
from fedcart.secagg.policy import PERMISSIVE
from fedcart.secagg.server import ServerRound, ServerState

ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK = PHASES


def expected_survivors(ids: list[int], degree: int, seed: bytes, t: int, q: int,
                       drop_at: dict) -> set[int] | str:
    """An independent oracle: who survives each phase, with the clients' own aborts, and
    whether every secret the server needs has t live holders. The graph is drawn over the
    advertisers from the round's derived ``seed``; every phase from ADVERTISE on needs
    max(t, q) clients (q: the consistency quorum), and the advertisers one more than t (so
    that each has t neighbours). Returns the survivor set, or a string naming why the round
    must fail."""
    def alive_at(phase) -> set[int]:
        return {i for i in ids if drop_at.get(i) is None or drop_at[i] > phase}

    need = max(t, q)
    u1 = alive_at(ADVERTISE)
    if len(u1) < max(t + 1, q):
        return "advertised"
    graph = neighbours(sorted(u1), degree, seed)
    u2 = alive_at(SHARE) & u1  # every advertiser has t advertised neighbours: it shares
    if len(u2) < need:
        return "shared"
    # a client that received fewer than t neighbours' shares aborts before masking
    u3 = {u for u in alive_at(MASKED) & u2 if len(graph[u] & u2) >= t}
    if len(u3) < need:
        return "masked"
    u4 = alive_at(CONSISTENCY) & u3
    if len(u4) < need:
        return "signed"
    u5 = alive_at(UNMASK) & u4
    for owner in u2:
        if len(graph[owner] & u2 & u5) < t:
            return "threshold"
    return u3


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_rounds_are_exact_or_fail_clearly(data) -> None:
    n = data.draw(st.integers(3, 200), label="n")
    # k anywhere in [2, n-1]; dense graphs of large n are slow, so they come less often
    wide = data.draw(st.integers(0, 9), label="wide") == 0 or n <= 40
    k = data.draw(st.integers(2, n - 1 if wide else min(24, n - 1)), label="k")
    degree = min(n - 1, k + k % 2)
    t = data.draw(st.integers(degree // 2 + 1, degree), label="t")
    ids = sorted(data.draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n,
                                    unique=True)))
    rate = data.draw(st.sampled_from([0.0, 0.05, 0.1, 0.3]), label="dropout")
    drop_at = {i: data.draw(st.sampled_from(PHASES)) for i in ids
               if data.draw(st.floats(0, 1)) < rate}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = {i: rng.integers(0, 2**32, 16, dtype=np.uint64).astype(np.uint32) for i in ids}
    corrupt = data.draw(st.integers(0, n // 4), label="corrupt")
    run = run_local_round(inputs, k, t, drop_at=drop_at, corrupt=corrupt)
    if run.server.graph_seed is None:  # too few advertised: no graph was drawn
        assert run.server.state == ServerState.FAILED
        assert "advertised keys" in run.server.failure
        return
    oracle = expected_survivors(ids, k, run.server.graph_seed, t, quorum(n, corrupt),
                                drop_at)
    if isinstance(oracle, str):
        assert run.server.state == ServerState.FAILED
        assert "threshold" in run.server.failure
        return
    assert run.server.state == ServerState.DONE, run.server.failure
    assert isinstance(oracle, set) and set(run.server.survivors) == oracle
    total = np.zeros(16, dtype=np.uint32)
    for i in oracle:
        total += inputs[i]
    np.testing.assert_array_equal(run.server.result, total)


@pytest.mark.parametrize("seed", range(12))
def test_failures_happen_exactly_when_the_oracle_says(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = list(range(12))
    drop_at = {int(i): PHASES[int(rng.integers(0, 5))]
               for i in rng.choice(12, int(rng.integers(2, 7)), replace=False)}
    inputs = {i: rng.integers(0, 2**32, 4, dtype=np.uint64).astype(np.uint32) for i in ids}
    run = run_local_round(inputs, 6, 4, drop_at=drop_at)
    seed = run.server.graph_seed or bytes(32)
    oracle = expected_survivors(ids, 6, seed, 4, quorum(12, 0), drop_at)
    if isinstance(oracle, set):
        assert run.server.state == ServerState.DONE and set(run.server.survivors) == oracle
    else:
        assert run.server.state == ServerState.FAILED
        assert "threshold" in run.server.failure


def test_complete_graph_with_ten_percent_dropout() -> None:
    rng = np.random.default_rng(1)
    ids = list(range(30))
    inputs = {i: rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32) for i in ids}
    drop_at = {0: ADVERTISE, 1: SHARE, 2: MASKED}
    run = run_local_round(inputs, 29, 16, drop_at=drop_at)
    assert set(run.server.survivors) == set(ids) - {0, 1, 2}
    assert run.server.dropped.keys() >= {0, 1, 2}
    np.testing.assert_array_equal(
        run.server.result, np.sum([inputs[i] for i in ids if i > 2], axis=0, dtype=np.uint32))


def test_round_fails_naming_the_missing_secret() -> None:
    rng = np.random.default_rng(2)
    ids = list(range(6))
    inputs = {i: rng.integers(0, 2**32, 4, dtype=np.uint64).astype(np.uint32) for i in ids}
    # 3 of 6 drop before unmasking: survivors' self-mask seeds have 2 live holders, t = 4
    run = run_local_round(inputs, 5, 4, drop_at={0: UNMASK, 1: UNMASK, 2: CONSISTENCY})
    assert run.server.state == ServerState.FAILED and run.server.result is None
    assert re.search(r"self-mask seed: \d shares .* threshold 4", run.server.failure)


# -- a malicious server against honest clients -------------------------------------------
class Setup:
    """A round of n honest clients (PERMISSIVE policy) and an honest server, stepped by
    hand so that a test can change what the server sends."""

    def __init__(self, n: int = 5, k: int = 4, t: int = 3, corrupt: int = 0) -> None:
        self.server_key = IdentityKey.generate()
        self.keys = {i: IdentityKey.generate() for i in range(n)}
        self.server = ServerRound(1, {i: k.public for i, k in self.keys.items()}, k, t, 4,
                                  self.server_key, corrupt=corrupt)
        self.clients = {i: ClientRound(i, key, self.server_key.public, 0, policy=PERMISSIVE)
                        for i, key in self.keys.items()}
        for c in self.clients.values():
            c.set_input(np.ones(4, np.uint32))
        self.server.start()

    def step(self) -> dict[int, list[bytes]]:
        """Deliver the server's messages, return what each client sent back (undelivered)."""
        for cid, data in self.server.data_to_send():
            self.clients[cid].receive(data)
        return {cid: c.data_to_send() for cid, c in self.clients.items()}

    def deliver(self, replies: dict[int, list[bytes]]) -> None:
        """Send replies on; a dropped client's connection is closed, as the I/O layer does."""
        for cid, items in replies.items():
            if cid in self.server.dropped:
                continue
            for data in items:
                self.server.receive(cid, data)

    def run_to(self, state: ServerState) -> None:
        while self.server.state != state:
            if self.server.state == ServerState.RECONSTRUCT:
                self.server.finish()
                continue
            self.deliver(self.step())


def test_client_refuses_overlapping_survivor_and_dropped_sets() -> None:
    s = Setup()
    s.run_to(ServerState.UNMASK)
    for cid, data in s.server.data_to_send():
        m = decode(data)
        assert isinstance(m, UnmaskRequest)
        evil = dataclasses.replace(m, dropped=(m.survivors[0],))  # ask for both secrets
        with pytest.raises(ProtocolViolation, match="both survivor and dropped"):
            s.clients[cid].receive(evil.encode())
        assert s.clients[cid].state == ClientState.FAILED
        assert s.clients[cid].data_to_send() == []


def test_client_refuses_a_survivor_set_other_than_it_signed() -> None:
    s = Setup()
    s.run_to(ServerState.UNMASK)
    cid, data = s.server.data_to_send()[0]
    m = decode(data)
    fewer = dataclasses.replace(m, survivors=m.survivors[1:], dropped=m.survivors[:1])
    with pytest.raises(ProtocolViolation, match="differ from the set this client signed"):
        s.clients[cid].receive(fewer.encode())


def test_client_refuses_an_unvouched_survivor_set() -> None:
    s = Setup()
    s.run_to(ServerState.UNMASK)
    cid, data = s.server.data_to_send()[0]
    m = decode(data)
    unsigned = dataclasses.replace(m, signers=m.signers[:2], signatures=m.signatures[:2])
    with pytest.raises(ProtocolViolation, match="vouch"):
        s.clients[cid].receive(unsigned.encode())
    forged = dataclasses.replace(m, signatures=(bytes(64),) * len(m.signers))
    other = next(c for c in s.clients if c != m.survivors[0] and
                 s.clients[c].state == ClientState.WAIT_UNMASK)
    with pytest.raises(ProtocolViolation, match="bad signature"):
        s.clients[other].receive(forged.encode())


def test_client_refuses_swapped_public_keys() -> None:
    s = Setup()
    s.deliver(s.step())  # advertise
    assert s.server.state == ServerState.SHARE
    for cid, data in s.server.data_to_send():
        m = decode(data)
        assert isinstance(m, Advertisements)
        neighbour = min(s.server.graph[cid])
        first = next(k for k in m.keys if k.sender == neighbour)
        second = next(k for k in m.keys if k.sender not in (neighbour, cid))
        swapped = dataclasses.replace(first, mask_key=second.mask_key)  # server-chosen key
        evil = dataclasses.replace(m, keys=tuple(swapped if k is first else k for k in m.keys))
        with pytest.raises(ProtocolViolation, match="bad signature"):
            s.clients[cid].receive(evil.encode())


def test_client_refuses_replayed_and_unsigned_round_configs() -> None:
    server_key = IdentityKey.generate()
    key = IdentityKey.generate()
    server = ServerRound(4, {0: key.public, 1: IdentityKey.generate().public,
                             2: IdentityKey.generate().public}, 2, 2, 4, server_key)
    server.start()
    config = next(d for c, d in server.data_to_send() if c == 0)

    def client(last: int, server_public: bytes = server_key.public) -> ClientRound:
        return ClientRound(0, key, server_public, last_round_id=last, policy=PERMISSIVE)

    with pytest.raises(ProtocolViolation, match="replayed config"):
        client(4).receive(config)
    m = decode(config)
    assert isinstance(m, RoundConfig)
    for change in ({"degree": 1}, {"corrupt": 1}, {"terms": b"other"}):
        with pytest.raises(ProtocolViolation, match="bad signature on the round config"):
            client(3).receive(dataclasses.replace(m, **change).encode())
    with pytest.raises(ProtocolViolation, match="bad signature"):
        client(3, IdentityKey.generate().public).receive(config)
    accepted = client(3)
    accepted.receive(config)
    with pytest.raises(ProtocolViolation, match="out of phase"):
        accepted.receive(config)


def test_server_fails_a_round_without_a_consistency_quorum() -> None:
    """Six of nine survivors sign (t = 3 would do), the quorum for n = 9, c = 3 is 7: the
    server fails the round rather than ask for shares no client would give."""
    s = Setup(n=9, k=4, t=3, corrupt=3)
    assert s.server.quorum == 7
    s.run_to(ServerState.CONSISTENCY)
    replies = s.step()
    silent = sorted(replies)[:3]
    with pytest.raises(RoundFailed, match=r"signed the survivor set: 6 clients, the round "
                                          r"needs 7 .*consistency quorum 7"):
        s.deliver({c: r for c, r in replies.items() if c not in silent})
        s.server.deadline()
    assert s.server.state == ServerState.FAILED and s.server.data_to_send() == []


def test_client_refuses_a_survivor_set_below_the_quorum() -> None:
    s = Setup(n=9, k=4, t=3, corrupt=3)
    s.run_to(ServerState.CONSISTENCY)
    cid, data = s.server.data_to_send()[0]
    survivors = decode(data)
    fewer = dataclasses.replace(survivors, survivors=tuple(sorted(
        {cid, *[c for c in survivors.survivors if c != cid][:5]})))
    with pytest.raises(RoundFailed, match="6 survivors, the round needs 7"):
        s.clients[cid].receive(fewer.encode())
    assert s.clients[cid].state == ClientState.FAILED and s.clients[cid].data_to_send() == []


def test_client_rejects_a_message_from_another_round() -> None:
    s = Setup()
    s.deliver(s.step())
    cid, data = s.server.data_to_send()[0]
    m = decode(data)
    with pytest.raises(ProtocolViolation, match="replay or mix-up"):
        s.clients[cid].receive(dataclasses.replace(m, round_id=0).encode())


# -- a hostile client against the server ---------------------------------------------------
def test_server_drops_a_garbage_client_and_completes() -> None:
    s = Setup(n=8, k=7, t=4)
    s.deliver(s.step())
    s.deliver(s.step())
    assert s.server.state == ServerState.MASKED
    replies = s.step()
    with pytest.raises(RemoteProtocolError):
        s.server.receive(0, b"\x00garbage")
    replies.pop(0)
    wrong = MaskedInput(1, 1, np.zeros(9, np.uint32)).encode()  # wrong length
    with pytest.raises(ProtocolViolation, match="length 9"):
        s.server.receive(1, wrong)
    replies.pop(1)
    s.deliver(replies)
    with pytest.raises(ProtocolViolation, match="out of phase"):
        s.server.receive(2, replies[2][0])  # replay of an accepted message
    s.run_to(ServerState.DONE)
    # client 2's masked input was accepted before its replay: it stays a survivor
    assert set(s.server.survivors) == {2, 3, 4, 5, 6, 7}
    np.testing.assert_array_equal(s.server.result, np.full(4, 6, np.uint32))
    assert set(s.server.dropped) == {0, 1, 2}


def test_server_rejects_impersonation() -> None:
    s = Setup()
    replies = s.step()
    with pytest.raises(ProtocolViolation, match="another sender"):
        s.server.receive(1, replies[0][0])  # client 1's connection sends client 0's keys
    assert 1 in s.server.dropped
