"""secagg primitives against independent references: PyNaCl for the PRG, Python integers
for Shamir, PyNaCl for agreement, hashlib for the graph seed; the consistency quorum's
intersection property exhaustively. (Fixed point: tests/test_encoding.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import struct

import nacl.bindings
import nacl.utils
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.secagg import shamir
from fedcart.secagg.consistency import check_quorum, corrupt_count, quorum
from fedcart.secagg.crypto import (
    EphemeralKey,
    IdentityKey,
    mask_seed,
    open_share,
    seal_share,
    signature_valid,
    verify,
)
from fedcart.secagg.errors import ProtocolViolation
from fedcart.secagg.graph import (
    effective_degree,
    graph_seed,
    neighbours,
    neighbours_of,
    pairwise_sign,
)
from fedcart.secagg.messages import SERVER, AdvertiseKeys, RoundConfig
from fedcart.secagg.prg import add_mask, keystream

seeds = st.binary(min_size=32, max_size=32)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, n=st.integers(0, 5000))
def test_prg_is_libsodium_deterministic_rng(seed: bytes, n: int) -> None:
    assert keystream(seed, n) == nacl.utils.randombytes_deterministic(n, seed)


def test_prg_across_chunk_boundaries() -> None:
    seed = os.urandom(32)
    vector = np.zeros((1 << 18) + 3, dtype=np.uint32)  # > one 1 MiB chunk
    add_mask(vector, seed)
    assert vector.tobytes() == nacl.utils.randombytes_deterministic(vector.nbytes, seed)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, values=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_masks_add_and_cancel_mod_2_32(seed: bytes, values: list[int]) -> None:
    vector = np.array(values, dtype=np.uint32)
    stream = np.frombuffer(nacl.utils.randombytes_deterministic(4 * len(values), seed), "<u4")
    add_mask(vector, seed)
    expected = (np.array(values, dtype=np.uint64) + stream) % 2**32
    np.testing.assert_array_equal(vector, expected)
    add_mask(vector, seed, -1)
    np.testing.assert_array_equal(vector, np.array(values, dtype=np.uint32))


def test_prg_rejects_misuse() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keystream(b"short", 4)
    with pytest.raises(TypeError):
        add_mask(np.zeros(4, np.int64), os.urandom(32))
    with pytest.raises(ValueError):
        add_mask(np.zeros(4, np.uint32), os.urandom(32), sign=2)


def _poly_shares(secret_words: list[int], coeffs: list[list[int]], points: list[int]) -> list:
    """Independent reference: Python-int polynomial evaluation mod p."""
    p = shamir.PRIME
    return [[(w + sum(c[j] * pow(x, j + 1, p) for j, c in enumerate(coeffs))) % p
             for w, *_ in [(w,) for w in secret_words]] for x in points]


def test_shamir_known_answer() -> None:
    # Fixed randomness: 31-bit words 1, 2, 3, ... as the coefficients.
    counter = iter(range(1, 10**6))

    def fixed(n: int) -> bytes:
        return b"".join(next(counter).to_bytes(4, "little") for _ in range(n // 4))

    secret = bytes(range(32))
    shares = shamir.split([secret], [1, 2, 5], t=3, random_bytes=fixed)
    words = list(np.frombuffer(secret, "<u2").astype(int))
    # coefficients drawn as [t-1, secrets, WORDS]: degree-1 words first, then degree 2
    c1 = list(range(1, 17))
    c2 = list(range(17, 33))
    p = shamir.PRIME
    for row, x in zip(shares[:, 0, :], [1, 2, 5], strict=True):
        expected = [(w + a * x + b * x * x) % p for w, a, b in zip(words, c1, c2, strict=True)]
        assert row.tolist() == expected
    assert shamir.reconstruct([5, 1, 2], shares[[2, 0, 1]], 3) == [secret]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_shamir_any_t_of_n_reconstruct(data) -> None:
    n = data.draw(st.integers(1, 30))
    t = data.draw(st.integers(1, n))
    secrets = data.draw(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=4))
    points = data.draw(st.lists(st.integers(1, 2**31 - 2), min_size=n, max_size=n,
                                unique=True))
    shares = shamir.split(secrets, points, t)
    chosen = data.draw(st.permutations(range(n)))[:t]
    assert shamir.reconstruct([points[i] for i in chosen], shares[chosen], t) == secrets
    if t > 1:
        with pytest.raises(shamir.ShamirError, match="cannot reconstruct"):
            shamir.reconstruct([points[i] for i in chosen[:-1]], shares[chosen[:-1]], t)


def test_shamir_t_minus_one_shares_fit_every_secret() -> None:
    """For t-1 shares and ANY candidate secret there is a degree t-1 polynomial through
    both: computed with Python integers, so the shares pin nothing down."""
    t, p = 4, shamir.PRIME
    shares = shamir.split([os.urandom(32)], [3, 7, 11, 20], t)[:, 0, 0].tolist()
    for candidate in (0, 1, 65535):
        xs, ys = [0, 3, 7, 11], [candidate, *shares[:3]]

        def at(x: int, xs=xs, ys=ys) -> int:
            total = 0
            for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
                num = den = 1
                for j, xj in enumerate(xs):
                    if j != i:
                        num, den = num * (x - xj) % p, den * (xi - xj) % p
                total += yi * num * pow(den, p - 2, p)
            return total % p

        assert [at(x) for x in (3, 7, 11)] == shares[:3]
        assert at(0) == candidate


def test_shamir_rejects_bad_input() -> None:
    with pytest.raises(shamir.ShamirError):
        shamir.split([b"x" * 31], [1, 2], 2)
    with pytest.raises(shamir.ShamirError):
        shamir.split([b"x" * 32], [1, 1], 2)
    shares = shamir.split([b"x" * 32], [1, 2, 3], 2)
    with pytest.raises(shamir.ShamirError, match="distinct"):
        shamir.reconstruct([1, 1], shares[:2], 2)
    tampered = shares.copy()
    # a random share: all 16 reconstructed words stay below 2^16 with chance 2^-240
    tampered[0, 0] = np.random.default_rng(5).integers(0, shamir.PRIME, shamir.WORDS)
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.reconstruct([1, 2], tampered[:2], 2)


def test_mask_seed_agrees_on_both_ends_and_binds_round_and_ids() -> None:
    a, b = EphemeralKey.generate(), EphemeralKey.generate()
    assert mask_seed(a.secret, b.public, 7, 1, 2) == mask_seed(b.secret, a.public, 7, 2, 1)
    assert mask_seed(a.secret, b.public, 7, 1, 2) != mask_seed(a.secret, b.public, 8, 1, 2)
    assert mask_seed(a.secret, b.public, 7, 1, 2) != mask_seed(a.secret, b.public, 7, 1, 3)
    with pytest.raises(ProtocolViolation, match="low-order"):
        mask_seed(a.secret, bytes(32), 7, 1, 2)


def test_mask_seed_known_answer_rfc7748() -> None:
    """RFC 7748 section 6.1's X25519 vector, then HKDF-SHA256 (RFC 5869) with the salt and
    info the module documents."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob_public = bytes.fromhex(
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert nacl.bindings.crypto_scalarmult(alice, bob_public) == shared
    info = (9).to_bytes(8, "little") + (4).to_bytes(4, "little") + (6).to_bytes(4, "little")
    expected = HKDF(hashes.SHA256(), 32, b"fedcart/secagg/v1/pairwise-mask", info).derive(shared)
    assert mask_seed(alice, bob_public, 9, 6, 4) == expected


def test_sealed_shares_are_bound_to_round_and_ends() -> None:
    a, b = EphemeralKey.generate(), EphemeralKey.generate()
    box_ab, box_ba = a.box(b.public), b.box(a.public)
    sealed = seal_share(box_ab, 3, 1, 2, b"payload")
    assert open_share(box_ba, 3, 1, 2, sealed) == b"payload"
    with pytest.raises(ProtocolViolation, match="another round or recipient"):
        open_share(box_ba, 4, 1, 2, sealed)
    with pytest.raises(ProtocolViolation, match="do not decrypt"):
        open_share(box_ba, 3, 1, 2, sealed[:-1] + bytes([sealed[-1] ^ 1]))


def test_signatures() -> None:
    key = IdentityKey.generate()
    verify(key.public, b"m", key.sign(b"m"), "m")
    with pytest.raises(ProtocolViolation, match="bad signature on m"):
        verify(key.public, b"m2", key.sign(b"m"), "m")
    # RFC 8032 section 7.1, test 1: the empty message
    rfc_public = bytes.fromhex(
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    rfc_signature = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    assert signature_valid(rfc_public, b"", rfc_signature)
    assert not signature_valid(rfc_public, b"x", rfc_signature)
    assert not signature_valid(rfc_public[:31], b"", rfc_signature)  # a malformed key
    assert not signature_valid(rfc_public, b"", rfc_signature[:63])


@pytest.mark.parametrize(("n", "k"), [(3, 2), (10, 4), (11, 5), (50, 8), (20, 19), (7, 100)])
def test_neighbour_graph(n: int, k: int) -> None:
    ids = [3 * i + 1 for i in range(n)]
    seed = os.urandom(32)
    graph = neighbours(ids, k, seed)
    assert graph == neighbours(list(reversed(ids)), k, seed)  # same for everyone
    assert all(neighbours_of(ids[::-1], k, seed, u) == graph[u] for u in ids)
    expected_degree = min(n - 1, k + k % 2)
    for u, peers in graph.items():
        assert u not in peers and len(peers) == expected_degree
        assert all(u in graph[v] for v in peers)  # symmetric
    if k < n - 1:
        assert graph != neighbours(ids, k, os.urandom(32))  # the seed matters
    assert pairwise_sign(1, 2) == -pairwise_sign(2, 1) == 1


def test_effective_degree_matches_the_graph() -> None:
    for n, k in [(3, 1), (3, 2), (10, 3), (10, 4), (11, 9), (11, 10), (5, 100)]:
        graph = neighbours(range(n), k, bytes(32))
        assert {len(p) for p in graph.values()} == {effective_degree(n, k)}


def test_graph_seed_is_sha256_over_the_documented_layout() -> None:
    """Computed here with hashlib from the layout graph.py documents, not with graph.py."""
    config = RoundConfig(7, SERVER, (2, 5, 9), (b"a" * 32, b"b" * 32, b"c" * 32), 2, 2, 1,
                         10, b"terms", b"s" * 64)
    ads = [AdvertiseKeys(7, i, bytes([i]) * 32, bytes([i + 1]) * 32, bytes([i + 2]) * 64)
           for i in (9, 2, 5)]
    signed = (b"fedcart/secagg/v2/round-config" + struct.pack("<Q", 7)
              + struct.pack("<4I", 3, 2, 5, 9) + b"a" * 32 + b"b" * 32 + b"c" * 32
              + struct.pack("<4I", 2, 2, 1, 10) + struct.pack("<I", 5) + b"terms")
    assert config.signed_part() == signed
    expected = hashlib.sha256(
        b"fedcart/secagg/v2/graph-seed" + struct.pack("<I", len(signed)) + signed
        + struct.pack("<I", 3) + b"".join(
            struct.pack("<I", i) + bytes([i]) * 32 + bytes([i + 1]) * 32 + bytes([i + 2]) * 64
            for i in (2, 5, 9))).digest()
    assert graph_seed(config, ads) == graph_seed(config, ads[::-1]) == expected
    # every field moves the seed: the signed config, each advertisement's every part
    assert graph_seed(dataclasses.replace(config, terms=b"other"), ads) != expected
    assert graph_seed(dataclasses.replace(config, signature=b"x" * 64), ads) == expected
    for field in ("share_key", "mask_key", "signature"):
        changed = dataclasses.replace(ads[0], **{field: b"\xff" * len(getattr(ads[0], field))})
        assert graph_seed(config, [changed, *ads[1:]]) != expected
    assert graph_seed(config, ads[1:]) != expected


def test_quorum_is_more_than_half_of_n_plus_c() -> None:
    assert [quorum(20, c) for c in (0, 1, 2, 19)] == [11, 11, 12, 20]
    assert quorum(1000, 0) == 501 and quorum(3, 0) == 2
    with pytest.raises(ValueError):
        quorum(5, 5)
    # ceil(fraction * n) without the float artefacts of math.ceil(0.07 * 100) == 8
    assert [corrupt_count(100, 0.07), corrupt_count(20, 0.05), corrupt_count(20, 0.051),
            corrupt_count(20, 0.0)] == [7, 1, 2, 0]


def test_two_quorums_share_an_honest_signer() -> None:
    """Exhaustively for small rounds: two sets of signers of quorum size, over n clients of
    which c are corrupt (any c of them), always share an honest client: it would have had
    to sign two different survivor sets."""
    for n in range(3, 9):
        for c in range(n):
            q = quorum(n, c)
            for a, b in itertools.combinations(itertools.combinations(range(n), q), 2):
                assert len(set(a) & set(b)) > c
            if q - 1 >= 1:  # one fewer and two disjoint-enough quorums exist
                assert 2 * (q - 1) - n <= c


def test_check_quorum_counts_distinct_valid_survivor_signatures() -> None:
    keys = {i: IdentityKey.generate() for i in range(5)}
    identity = {i: k.public for i, k in keys.items()}
    statement = b"statement"
    sigs = {i: k.sign(statement) for i, k in keys.items()}
    survivors = frozenset(range(5))
    check_quorum(identity, statement, survivors, [0, 1, 2], [sigs[i] for i in (0, 1, 2)], 3)
    with pytest.raises(ProtocolViolation, match="quorum is 3"):
        check_quorum(identity, statement, survivors, [0, 1], [sigs[0], sigs[1]], 3)
    with pytest.raises(ProtocolViolation, match="not a survivor"):
        check_quorum(identity, statement, frozenset({0, 1}), [0, 1, 2],
                     [sigs[i] for i in (0, 1, 2)], 3)
    with pytest.raises(ProtocolViolation, match="bad signature"):
        check_quorum(identity, statement, survivors, [0, 1, 2], [sigs[0], sigs[1], sigs[0]], 3)
    with pytest.raises(ProtocolViolation, match="bad signature"):
        check_quorum(identity, b"another set", survivors, [0, 1, 2],
                     [sigs[i] for i in (0, 1, 2)], 3)
