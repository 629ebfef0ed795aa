"""secagg and prg: round cost against n (k fixed), against d, against Flower's SecAgg+ in
the same run; upload bytes against 4 bytes per parameter; what the consistency quorum and
the derived graph seed cost a device at n = 1000 (Ed25519 verifications, time, download
bytes) against the t-signature check and neighbour-only key list they replace; a device's
CPU per round against its group's size (k and t chosen for the group, as the aggregator
chooses them), against the previous default of groups up to 1,000; mask expansion against
OpenSSL's raw ChaCha20 keystream."""

from __future__ import annotations

import os
import time

import nacl.utils
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from bench.common import Row, seconds_per_call
from fedcart.secagg.consistency import check_quorum, quorum
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.graph import graph_seed, neighbours_of
from fedcart.secagg.local import PHASES, run_local_round
from fedcart.secagg.messages import (
    SERVER,
    AdvertiseKeys,
    Advertisements,
    RoundConfig,
    UnmaskRequest,
    consistency_statement,
)
from fedcart.secagg.params import choose, fixed
from fedcart.secagg.prg import add_mask

MASKED = PHASES[2]


def _inputs(n: int, dim: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**32, dim, dtype=np.uint64).astype(np.uint32)
            for i in range(n)}


def _round(n: int, dim: int, k: int, dropout: float):  # type: ignore[no-untyped-def]
    inputs = _inputs(n, dim)
    dropped = set(range(0, n, round(1 / dropout))) if dropout else set()
    degree = min(k, n - 1)
    t = fixed(n, degree).threshold
    started = time.perf_counter()
    run = run_local_round(inputs, degree, t, drop_at=dict.fromkeys(dropped, MASKED))
    seconds = time.perf_counter() - started
    expected = np.sum([inputs[i] for i in range(n) if i not in dropped], axis=0,
                      dtype=np.uint32)
    assert np.array_equal(run.server.result, expected), "secagg sum is wrong"
    return run, seconds, dropped, t


def bench_secagg(quick: bool) -> list[Row]:
    rows: list[Row] = []
    k = 20
    dim = 10_000 if quick else 100_000
    base_n = 30 if quick else 50
    # cost against n at fixed k: per-client and server time must not grow with n
    base = None
    for n in ([30, 60] if quick else [50, 100, 200, 400]):
        run, seconds, _, _ = _round(n, dim, k, 0.1)
        per_client = float(np.mean(list(run.client_seconds.values())))
        server_per_client = run.server_seconds / n  # it must add n inputs: O(n d) in all
        if base is None:
            base = (per_client, server_per_client)
        params = {"n": n, "k": k, "d": dim, "dropout": 0.1}
        rows.append(Row("secagg", params, "client s/round", per_client, "s",
                        f"same at n={base_n}", base[0], base[0] / per_client))
        rows.append(Row("secagg", params, "server s/round per client", server_per_client,
                        "s", f"same at n={base_n}", base[1], base[1] / server_per_client))
    # cost against d
    for d in ([1_000, 10_000] if quick else [10_000, 100_000, 1_000_000]):
        run, seconds, _, _ = _round(100 if not quick else 30, d, k, 0.1)
        per_client = float(np.mean(list(run.client_seconds.values())))
        survivors = [i for i in run.bytes_up if i in run.server.survivors]
        upload = float(np.mean([run.bytes_up[i] for i in survivors]))
        params = {"n": 100 if not quick else 30, "k": k, "d": d, "dropout": 0.1}
        vector = np.zeros(d, np.uint32)
        seed = os.urandom(32)
        masks_only = (k + 1) * seconds_per_call(lambda v=vector, s=seed: add_mask(v, s),
                                                repeats=3)
        rows.append(Row("secagg", params, "client s/round", per_client, "s",
                        "its k+1 mask expansions alone", masks_only, masks_only / per_client))
        rows.append(Row("secagg", params, "upload bytes/client", upload, "B",
                        "4 bytes per parameter", 4.0 * d, upload / (4.0 * d)))
    # against Flower's SecAgg+ (same n, d, dropout, degree), and the complete graph
    n = 20 if quick else 100
    for degree in ([8] if quick else [k, n - 1]):
        run, seconds, dropped, t = _round(n, dim, degree, 0.1)
        flower = _flower(n, dim, degree, t, dropped)
        params = {"n": n, "k": degree, "d": dim, "dropout": 0.1}
        if flower is not None:
            rows.append(Row("secagg", params, "round s (all clients + server)", seconds, "s",
                            "Flower SecAgg+ 1.42.0", flower, flower / seconds))
        rows.append(Row("secagg", params, "server s/round", run.server_seconds, "s",
                        "round s (all clients + server)", seconds, seconds / run.server_seconds))
        # devices compute in parallel on their own hardware: the round's compute latency is
        # the server's time plus the slowest device's
        critical = run.server_seconds + max(run.client_seconds.values())
        rows.append(Row("secagg", params, "critical path s (server + slowest client)",
                        critical, "s", "round s (all clients + server)", seconds,
                        seconds / critical))
    rows += bench_consistency(1000, k)
    return rows


def bench_groups(quick: bool) -> list[Row]:
    """Mean CPU seconds a device spends in one round (a popularity-sized vector, 10% of the
    devices dropping before their masked input) against the group's size: the quorum, the
    advertisements and the graph seed grow with it, k's key agreements barely do. Baseline:
    867, the group UCI's 4,335 devices got when groups held up to 1,000."""
    dim, baseline_n = 1_822, (100 if quick else 867)
    rows: list[Row] = []
    measured: dict[int, tuple[float, int, int]] = {}
    for n in ([100, 50] if quick else [867, 500, 250, 125]):
        params = choose(n, 0.1)
        inputs = _inputs(n, dim)
        dropped = set(range(0, n, 10))
        run = run_local_round(inputs, params.degree, params.threshold,
                              drop_at=dict.fromkeys(dropped, MASKED))
        expected = np.sum([v for i, v in inputs.items() if i not in dropped], axis=0,
                          dtype=np.uint32)
        assert np.array_equal(run.server.result, expected), "secagg sum is wrong"
        measured[n] = (float(np.mean([run.client_seconds[i] for i in inputs
                                      if i not in dropped])), params.degree,
                       params.threshold)
    base = measured[baseline_n][0]
    for n, (per_device, degree, threshold) in measured.items():
        rows.append(Row("groups", {"n": n, "k": degree, "t": threshold, "d": dim,
                                   "dropout": 0.1}, "device CPU s/round", per_device, "s",
                        f"same in a group of {baseline_n}", base, base / per_device))
    return rows


def bench_consistency(n: int, k: int, dropout: float = 0.1) -> list[Row]:
    """One device's cost, at n participants, of the consistency quorum (verifying more than
    n / 2 signatures, against the t = k/2 + 1 the old check verified) and of the derived
    graph (hashing every advertisement and drawing its neighbours; downloading all n
    advertisements and a quorum of signatures, against its k neighbours' and t)."""
    rows: list[Row] = []
    keys = [IdentityKey.generate() for _ in range(n)]
    identity_of = {i: key.public for i, key in enumerate(keys)}
    q, t = quorum(n, 0), k // 2 + 1
    survivors = frozenset(range(n - int(dropout * n)))
    statement = consistency_statement(1, bytes(32), tuple(sorted(survivors)))
    signers = sorted(survivors)[:q]
    signatures = [keys[i].sign(statement) for i in signers]
    ours = seconds_per_call(lambda: check_quorum(identity_of, statement, survivors, signers,
                                                 signatures, q), repeats=3)
    old = seconds_per_call(lambda: check_quorum(identity_of, statement, survivors,
                                                signers[:t], signatures[:t], t), repeats=3)
    params = {"n": n, "c": 0, "k": k, "Ed25519 verifications": q}
    rows.append(Row("secagg", params, "consistency check s/device", ours, "s",
                    f"old check ({t} signatures)", old, old / ours))
    config = RoundConfig(1, SERVER, tuple(range(n)), tuple(identity_of[i] for i in range(n)),
                         k, t, 0, 100_000, b"", bytes(64))
    adverts = tuple(AdvertiseKeys(1, i, os.urandom(32), os.urandom(32), os.urandom(64))
                    for i in range(n))
    ids, seed = list(range(n)), os.urandom(32)
    derived = seconds_per_call(lambda: neighbours_of(ids, k, graph_seed(config, adverts), 0),
                               repeats=3)
    given = seconds_per_call(lambda: neighbours_of(ids, k, seed, 0), repeats=3)
    rows.append(Row("secagg", {"n": n, "k": k}, "graph seed + neighbours s/device", derived,
                    "s", "neighbours from a given seed (old)", given, given / derived))
    everyone = len(Advertisements(1, SERVER, adverts).encode())
    neighbours_only = len(Advertisements(1, SERVER, adverts[:k]).encode())
    rows.append(Row("secagg", {"n": n, "k": k}, "advertisements download B/device",
                    float(everyone), "B", f"its {k} neighbours' only", float(neighbours_only),
                    neighbours_only / everyone))
    dropped = tuple(range(len(survivors), n))
    request = len(UnmaskRequest(1, SERVER, tuple(sorted(survivors)), dropped, tuple(signers),
                                tuple(signatures)).encode())
    with_t = len(UnmaskRequest(1, SERVER, tuple(sorted(survivors)), dropped,
                               tuple(signers[:t]), tuple(signatures[:t])).encode())
    rows.append(Row("secagg", {"n": n, "dropout": dropout, "quorum": q},
                    "unmask request download B/device", float(request), "B",
                    f"with t = {t} signatures", float(with_t), with_t / request))
    return rows


def _flower(n: int, dim: int, degree: int, t: int, dropped: set[int]) -> float | None:
    try:
        from bench.flower_secagg import run_flower_round
    except ImportError:
        return None
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("(flwr not installed: pip install -e '.[bench]' for the Flower baseline)")
        return None
    # Flower counts the node itself among its shares and wants an odd count
    shares = n if degree >= n - 1 else degree + 1
    seconds, result, expected = run_flower_round(n, dim, shares, t, {i + 1 for i in dropped})
    assert np.abs(result - expected).max() < 1e-3, "Flower's aggregate is wrong"
    return seconds


def bench_prg(quick: bool) -> list[Row]:
    rows = []
    for n_bytes in ([4 << 20] if quick else [400_000, 4 << 20, 64 << 20]):
        seed = os.urandom(32)
        vector = np.zeros(n_bytes // 4, dtype=np.uint32)
        zeros = bytes(min(n_bytes, 1 << 20))
        out = bytearray(len(zeros) + 63)

        def raw_openssl(seed: bytes = seed, n: int = n_bytes, zeros: bytes = zeros,
                        out: bytearray = out) -> None:
            enc = Cipher(algorithms.ChaCha20(seed, b"\0\0\0\0LibsodiumDRG"), None).encryptor()
            for _ in range(0, n, len(zeros)):
                enc.update_into(zeros, out)

        ours = seconds_per_call(lambda v=vector, s=seed: add_mask(v, s))
        base = seconds_per_call(raw_openssl)
        nacl_s = seconds_per_call(lambda n=n_bytes, s=seed: nacl.utils.randombytes_deterministic(
            n, s), repeats=3)
        params = {"bytes": n_bytes}
        rows.append(Row("prg", params, "mask add GB/s", n_bytes / ours / 1e9, "GB/s",
                        "OpenSSL ChaCha20 keystream", n_bytes / base / 1e9, base / ours))
        rows.append(Row("prg", params, "mask add GB/s", n_bytes / ours / 1e9, "GB/s",
                        "PyNaCl randombytes_deterministic", n_bytes / nacl_s / 1e9,
                        nacl_s / ours))
    return rows
