"""A malicious aggregator against unmodified honest devices (``ClientRound``).

- It equivocates in the consistency step: each neighbour of a target is shown "the target
  survived, its other neighbours dropped", each such set signed by t devices it was shown
  to, to collect both the target's self-mask seed and its neighbours' masking keys. The
  devices require a quorum of more than (n + c) / 2 signatures over the set they signed.
- It proposes rounds too small, or tolerating too few corrupt devices, for the device's
  pinned policy; it alters an advertisement in the list the graph seed is derived from; it
  proposes terms the application refuses. Each is refused before the device reveals
  anything the attack needs.
"""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from fedcart.secagg.client import MASK_KEY, SELF_MASK, ClientRound, ClientState
from fedcart.secagg.consistency import quorum
from fedcart.secagg.crypto import IdentityKey, verify
from fedcart.secagg.errors import ProtocolViolation
from fedcart.secagg.graph import graph_seed, neighbours
from fedcart.secagg.local import PHASES, run_local_round
from fedcart.secagg.messages import (
    SERVER,
    Advertisements,
    ConsistencySignature,
    RoundConfig,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    consistency_statement,
    decode,
)
from fedcart.secagg.policy import PERMISSIVE, ClientPolicy
from fedcart.secagg.server import ServerRound, ServerState

N, DEGREE, T = 20, 4, 3  # the smallest cohort and degree the default policy accepts


class Cohort:
    """N honest devices with the default policy and a server whose honest core runs the
    phases the attacker leaves alone (ADVERTISE, SHARE, MASKED); the test plays the server
    from the consistency step on."""

    def __init__(self, n: int = N, k: int = DEGREE, t: int = T, corrupt: int = 0,
                 policy: ClientPolicy | None = None) -> None:
        self.server_key = IdentityKey.generate()
        self.keys = {i: IdentityKey.generate() for i in range(n)}
        self.server = ServerRound(1, {i: key.public for i, key in self.keys.items()}, k, t, 8,
                                  self.server_key, corrupt=corrupt)
        self.clients = {i: ClientRound(i, key, self.server_key.public, 0,
                                       policy=policy or ClientPolicy())
                        for i, key in self.keys.items()}
        rng = np.random.default_rng(n)
        self.inputs = {i: rng.integers(0, 2**32, 8, dtype=np.uint64).astype(np.uint32)
                       for i in self.keys}
        for i, client in self.clients.items():
            client.set_input(self.inputs[i])
        self.server.start()

    def honest_until(self, state: ServerState) -> None:
        while self.server.state != state:
            for cid, data in self.server.data_to_send():
                self.clients[cid].receive(data)
            for cid, client in self.clients.items():
                for data in client.data_to_send():
                    self.server.receive(cid, data)


def equivocate(cohort: Cohort, views: dict[tuple[int, ...], list[int]],
               ) -> tuple[dict[tuple[int, int], int], dict[int, str]]:
    """The malicious consistency step: show each device in ``views[S]`` the survivor set S
    and collect its signature; then send it an unmask request for S carrying every genuine
    signature over S the server holds. Returns how many shares of each (owner, kind) the
    server obtained, and why each refusing device refused."""
    seed = cohort.server.graph_seed
    assert seed is not None and cohort.server.state == ServerState.CONSISTENCY
    cohort.server.data_to_send()  # the honest survivor set is never sent
    everyone = tuple(sorted(cohort.clients))
    signatures: dict[tuple[int, ...], dict[int, bytes]] = {}
    for survivors, shown in views.items():
        signatures[survivors] = {}
        for cid in shown:
            cohort.clients[cid].receive(SurvivorSet(1, SERVER, survivors).encode())
            (reply,) = cohort.clients[cid].data_to_send()
            m = decode(reply)
            assert isinstance(m, ConsistencySignature)
            # genuine: a signature over exactly S (and the seed the device computed)
            verify(cohort.keys[cid].public, consistency_statement(1, seed, survivors),
                   m.signature, "survivor set")
            signatures[survivors][cid] = m.signature
    shares: dict[tuple[int, int], int] = {}
    refused: dict[int, str] = {}
    for survivors, shown in views.items():
        signers = tuple(sorted(signatures[survivors]))
        dropped = tuple(sorted(set(everyone) - set(survivors)))
        request = UnmaskRequest(1, SERVER, survivors, dropped, signers,
                                tuple(signatures[survivors][s] for s in signers)).encode()
        for cid in shown:
            try:
                cohort.clients[cid].receive(request)
            except ProtocolViolation as exc:
                refused[cid] = str(exc)
                assert cohort.clients[cid].data_to_send() == []
                continue
            (reply,) = cohort.clients[cid].data_to_send()
            answer = decode(reply)
            assert isinstance(answer, UnmaskShares)
            for owner, kind in zip(answer.owners, answer.kinds, strict=True):
                shares[owner, kind] = shares.get((owner, kind), 0) + 1
    return shares, refused


def exposes(shares: dict[tuple[int, int], int], target: int, peers: frozenset[int],
            t: int) -> bool:
    """Whether the shares rebuild what unmasks ``target``'s input: its self-mask seed, and
    for each neighbour the masking key of one end of their pair."""
    return shares.get((target, SELF_MASK), 0) >= t and all(
        shares.get((v, MASK_KEY), 0) >= t or shares.get((target, MASK_KEY), 0) >= t
        for v in peers)


def _attack_views(cohort: Cohort, target: int, per_set: int) -> dict[tuple[int, ...], list[int]]:
    """Problem 1's attack: neighbour v_i of the target is shown S_i = everyone but the
    target's other neighbours, with ``per_set`` - 1 non-neighbours to sign S_i beside it;
    the target and the remaining devices are shown S_0 = everyone but all its neighbours."""
    peers = sorted(cohort.server.graph[target])
    others = [c for c in sorted(cohort.clients) if c != target and c not in peers]
    everyone = set(cohort.clients)
    views: dict[tuple[int, ...], list[int]] = {}
    for v in peers:
        helpers, others = others[:per_set - 1], others[per_set - 1:]
        views[tuple(sorted(everyone - (set(peers) - {v})))] = [v, *helpers]
    views[tuple(sorted(everyone - set(peers)))] = [target, *others]
    return views


def test_equivocation_with_t_signatures_per_set_is_refused() -> None:
    """Every neighbour of the target is shown its own survivor set, each signed by t
    devices: enough for the old check, and it would have given the server t shares of the
    target's self-mask seed and of every neighbour's masking key. Every device refuses."""
    cohort = Cohort()
    cohort.honest_until(ServerState.CONSISTENCY)
    target = 0
    peers = cohort.server.graph[target]
    views = _attack_views(cohort, target, per_set=T)
    assert len(views) == DEGREE + 1 and all(len(shown) >= T for shown in views.values())
    shares, refused = equivocate(cohort, views)
    assert set(refused) == set(cohort.clients)
    assert all("vouch" in why and f"quorum is {quorum(N, 0)}" in why
               for why in refused.values())
    assert shares == {}
    assert not exposes(shares, target, peers, T)
    assert all(c.state == ClientState.FAILED for c in cohort.clients.values())


@pytest.mark.parametrize("quorum_view", ["target-alone", "one-neighbour"])
def test_equivocation_that_gives_one_set_a_quorum_gets_one_kind_only(quorum_view: str) -> None:
    """The server gives one of its sets a real quorum: the devices shown it answer (the
    check is not a blanket refusal), everyone else refuses, and what the server gets never
    covers both the target's self-mask seed and its neighbours' masking keys."""
    cohort = Cohort()
    cohort.honest_until(ServerState.CONSISTENCY)
    target = 0
    peers = sorted(cohort.server.graph[target])
    everyone = set(cohort.clients)
    non_neighbours = sorted(everyone - set(peers) - {target})
    q = quorum(N, 0)
    if quorum_view == "target-alone":  # target survived, every neighbour dropped
        views = {tuple(sorted(everyone - set(peers))): [target, *non_neighbours]}
        views |= {tuple(sorted(everyone - (set(peers) - {v}))): [v] for v in peers}
    else:  # the first neighbour survived with the target, the others dropped
        first = peers[0]
        views = {tuple(sorted(everyone - set(peers[1:]))): [first, *non_neighbours[:q - 1]]}
        views |= {tuple(sorted(everyone - (set(peers) - {v}))): [v] for v in peers[1:]}
        views[tuple(sorted(everyone - set(peers)))] = [target, *non_neighbours[q - 1:]]
    shares, refused = equivocate(cohort, views)
    winners = next(shown for shown in views.values() if len(shown) >= q)
    assert set(refused) == everyone - set(winners)  # the quorum's devices answered
    assert shares and not exposes(shares, target, frozenset(peers), T)
    assert shares.get((target, SELF_MASK), 0) < T


def signed_config(server_key: IdentityKey, keys: dict[int, IdentityKey], n: int, degree: int,
                  t: int, corrupt: int = 0) -> bytes:
    """A round config as a malicious server may sign it: no ServerRound checks."""
    ids = tuple(range(n))
    config = RoundConfig(3, SERVER, ids, tuple(keys[i].public for i in ids), degree, t,
                         corrupt, 4)
    return dataclasses.replace(config, signature=server_key.sign(config.signed_part())).encode()


def test_default_policy_refuses_tiny_rounds_before_sending_anything() -> None:
    server_key = IdentityKey.generate()
    keys = {i: IdentityKey.generate() for i in range(N)}

    def refuses(data: bytes, match: str, policy: ClientPolicy | None = None) -> None:
        client = ClientRound(0, keys[0], server_key.public, 2, policy=policy or ClientPolicy())
        with pytest.raises(ProtocolViolation, match=match):
            client.receive(data)
        assert client.state == ClientState.FAILED and client.data_to_send() == []
        assert client.config is None

    # n = 2, k = 1, t = 1: the device's own signature would be the whole quorum
    tiny = signed_config(server_key, keys, 2, 1, 1)
    refuses(tiny, "2 participants, this device's policy requires at least 20")
    refuses(tiny, "requires at least 3", PERMISSIVE)  # not even the test policy takes it
    with pytest.raises(ValueError, match="min_participants >= 3"):
        ClientPolicy(min_participants=2)
    refuses(signed_config(server_key, keys, 3, 2, 1), "threshold 1 unsafe", PERMISSIVE)
    refuses(signed_config(server_key, keys, N, 2, 2),
            "2 neighbours, this device's policy requires at least 4")
    refuses(signed_config(server_key, keys, N, 6, 3), "threshold 3 unsafe for 6 neighbours")
    refuses(signed_config(server_key, keys, N, 4, 5), "threshold 5 unsafe for 4 neighbours")
    refuses(signed_config(server_key, keys, N, DEGREE, T, corrupt=N), "no quorum exists")
    impostor = dict(keys)
    impostor[0] = IdentityKey.generate()  # the server swaps this device's own key
    refuses(signed_config(server_key, impostor, N, DEGREE, T), "another identity key")
    accepted = ClientRound(0, keys[0], server_key.public, 2)
    accepted.receive(signed_config(server_key, keys, N, DEGREE, T))
    assert accepted.state == ClientState.WAIT_KEYS and len(accepted.data_to_send()) == 1


def test_a_round_tolerating_too_few_corrupt_devices_is_refused() -> None:
    server_key = IdentityKey.generate()
    keys = {i: IdentityKey.generate() for i in range(N)}
    policy = ClientPolicy(min_corrupt_fraction=0.1)  # c >= 2 of 20

    def client_receives(degree: int, t: int, corrupt: int) -> ClientRound:
        server = ServerRound(3, {i: k.public for i, k in keys.items()}, degree, t, 4,
                             server_key, corrupt=corrupt)
        server.start()
        client = ClientRound(0, keys[0], server_key.public, 2, policy=policy)
        client.receive(server.data_to_send()[0][1])
        return client

    with pytest.raises(ProtocolViolation, match="tolerates 1 corrupt participants, this "
                                                "device's policy requires at least 2 of 20"):
        client_receives(19, 18, 1)
    # c = 2 of 20 with k = 4, t = 3: 2 corrupt neighbours of 4 (5%) would expose the input
    with pytest.raises(ProtocolViolation, match="would expose this device's input"):
        client_receives(DEGREE, T, 2)
    accepted = client_receives(19, 18, 2)  # 17 corrupt of 19 neighbours: about 2^-49
    assert accepted.state == ClientState.WAIT_KEYS and accepted.config is not None
    assert accepted.config.corrupt == 2 and len(accepted.data_to_send()) == 1


def test_the_graph_seed_is_derived_not_chosen_by_the_server() -> None:
    assert "graph_seed" not in {f.name for f in dataclasses.fields(RoundConfig)}
    assert "seed" not in " ".join(inspect.signature(ServerRound).parameters)
    cohort = Cohort()
    assert cohort.server.graph_seed is None  # unknown until the advertisements are in
    cohort.honest_until(ServerState.SHARE)
    sent = cohort.server.data_to_send()
    assert {cid for cid, _ in sent} == set(cohort.clients)
    assert len({data for _, data in sent}) == 1  # every device gets the same list
    message = decode(sent[0][1])
    assert isinstance(message, Advertisements) and len(message.keys) == N
    config = cohort.server.config
    assert config is not None
    seed = graph_seed(config, message.keys)
    assert cohort.server.graph_seed == seed
    assert cohort.server.graph == neighbours(range(N), DEGREE, seed)
    for cid, data in sent:
        cohort.clients[cid].receive(data)
        assert cohort.clients[cid].graph_seed == seed
    # download: 132 bytes per advertiser
    assert len(sent[0][1]) == 24 + 4 + 132 * N


@pytest.mark.parametrize("tamper", ["altered", "omitted"])
def test_a_tampered_advertisement_list_is_detected_by_its_owner(tamper: str) -> None:
    """Changing one device's advertisement changes the seed (so the graph); the device it
    belongs to refuses the list, and any other device shown it computes another seed, so
    its survivor-set signature cannot count towards the honest view's quorum."""
    cohort = Cohort()
    cohort.honest_until(ServerState.SHARE)
    sent = dict(cohort.server.data_to_send())
    honest = decode(sent[0])
    assert isinstance(honest, Advertisements)
    victim = 7
    if tamper == "altered":
        changed = tuple(dataclasses.replace(k, mask_key=IdentityKey.generate().public)
                        if k.sender == victim else k for k in honest.keys)
    else:
        changed = tuple(k for k in honest.keys if k.sender != victim)
    evil = dataclasses.replace(honest, keys=changed)
    assert cohort.server.config is not None
    assert graph_seed(cohort.server.config, changed) != cohort.server.graph_seed
    with pytest.raises(ProtocolViolation, match="advertisement is missing from the list or "
                                                "altered"):
        cohort.clients[victim].receive(evil.encode())
    assert cohort.clients[victim].data_to_send() == []
    # another device shown the tampered list (where the victim is not its neighbour, or
    # its signature would fail) derives the other seed
    other_graph = neighbours([k.sender for k in changed], DEGREE,
                             graph_seed(cohort.server.config, changed))
    bystander = next(c for c in sorted(cohort.clients)
                     if c != victim and victim not in other_graph[c])
    cohort.clients[bystander].receive(evil.encode())
    assert cohort.clients[bystander].graph_seed != cohort.server.graph_seed


def test_terms_the_application_refuses_stop_the_round_before_advertising() -> None:
    server_key = IdentityKey.generate()
    keys = {i: IdentityKey.generate() for i in range(N)}
    terms = b'{"clip_norm": 1000.0}'
    server = ServerRound(3, {i: k.public for i, k in keys.items()}, DEGREE, T, 4, server_key,
                         terms=terms)
    server.start()
    data = server.data_to_send()[0][1]
    seen: list[bytes] = []

    def too_loose(got: RoundConfig) -> None:
        seen.append(got.terms)
        raise ValueError("clip norm 1000 exceeds this device's limit 64")

    client = ClientRound(0, keys[0], server_key.public, 2, check_terms=too_loose)
    with pytest.raises(ProtocolViolation, match="terms were refused: clip norm 1000"):
        client.receive(data)
    assert seen == [terms]  # the signed bytes, exactly
    assert client.state == ClientState.FAILED and client.data_to_send() == []

    def violation(got: RoundConfig) -> None:
        raise ProtocolViolation("not for this catalog")

    refusing = ClientRound(0, keys[0], server_key.public, 2, check_terms=violation)
    with pytest.raises(ProtocolViolation, match="terms were refused: not for this catalog"):
        refusing.receive(data)
    assert refusing.data_to_send() == []
    # the policy is checked first: terms of a round the policy refuses are never looked at
    small = ServerRound(3, {i: keys[i].public for i in range(5)}, DEGREE, T, 4, server_key,
                        terms=terms)
    small.start()
    seen.clear()
    with pytest.raises(ProtocolViolation, match="participants"):
        ClientRound(0, keys[0], server_key.public, 2, check_terms=too_loose).receive(
            small.data_to_send()[0][1])
    assert seen == []
    accepted = ClientRound(0, keys[0], server_key.public, 2, check_terms=lambda got: None)
    accepted.receive(data)
    assert accepted.config is not None and accepted.config.terms == terms
    assert len(accepted.data_to_send()) == 1


def test_default_policy_round_with_dropouts_at_every_phase_sums_exactly() -> None:
    rng = np.random.default_rng(3)
    n = 30
    inputs = {i: rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
              for i in range(n)}
    drop_at = {2 * j: phase for j, phase in enumerate(PHASES)}
    seen: list[bytes] = []
    # k = 10, t = 6: each client keeps t live neighbours whoever of the five drops
    run = run_local_round(inputs, 10, 6, drop_at=drop_at, policy=ClientPolicy(),
                          terms=b"terms", check_terms=lambda c: seen.append(c.terms))
    assert run.server.state == ServerState.DONE, run.server.failure
    assert seen == [b"terms"] * n
    survivors = set(range(n)) - {0, 2, 4}  # dropped before their masked input was in
    assert set(run.server.survivors) == survivors
    np.testing.assert_array_equal(
        run.server.result, np.sum([inputs[i] for i in survivors], axis=0, dtype=np.uint32))
