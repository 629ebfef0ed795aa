"""A whole round in memory: server and clients wired together with no network, and
clients that vanish at a chosen phase. Tests, benchmarks and the fuzzers drive rounds here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedcart.secagg.client import ClientRound
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.errors import RemoteProtocolError, RoundFailed
from fedcart.secagg.messages import RoundConfig
from fedcart.secagg.policy import PERMISSIVE, ClientPolicy
from fedcart.secagg.server import ServerRound, ServerState

__all__ = ["PHASES", "LocalRound", "run_local_round"]

# The server phase in which a client's answer is due; a client "dropping at" one of these
# sends nothing from then on.
PHASES = (ServerState.ADVERTISE, ServerState.SHARE, ServerState.MASKED,
          ServerState.CONSISTENCY, ServerState.UNMASK)


@dataclass
class LocalRound:
    """The finished round, with what each side sent and the time each side computed."""

    server: ServerRound
    clients: dict[int, ClientRound]
    failures: dict[int, str] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    server_seconds: float = 0.0
    client_seconds: dict[int, float] = field(default_factory=dict)


def run_local_round(inputs: Mapping[int, np.ndarray], degree: int, threshold: int, *,
                    drop_at: Mapping[int, ServerState] | None = None, round_id: int = 1,
                    server_identity: IdentityKey | None = None,
                    identities: Mapping[int, IdentityKey] | None = None,
                    corrupt: int = 0, terms: bytes = b"",
                    policy: ClientPolicy = PERMISSIVE,
                    check_terms: Callable[[RoundConfig], None] | None = None) -> LocalRound:
    """Run one round to DONE or FAILED (then ``server.failure`` says why). ``policy`` is
    every client's: PERMISSIVE by default, since tests and simulations run cohorts smaller
    than a device's default policy accepts."""
    drop_at = drop_at or {}
    server_identity = server_identity or IdentityKey.generate()
    identities = identities or {i: IdentityKey.generate() for i in inputs}
    vector_len = len(next(iter(inputs.values())))
    server = ServerRound(round_id, {i: identities[i].public for i in inputs}, degree,
                         threshold, vector_len, server_identity, corrupt=corrupt, terms=terms)
    clients = {i: ClientRound(i, identities[i], server_identity.public, round_id - 1,
                              policy=policy, check_terms=check_terms)
               for i in inputs}
    run = LocalRound(server, clients, bytes_up=dict.fromkeys(inputs, 0),
                     bytes_down=dict.fromkeys(inputs, 0),
                     client_seconds=dict.fromkeys(inputs, 0.0))
    for i, vector in inputs.items():
        started = time.perf_counter()
        clients[i].set_input(vector)
        run.client_seconds[i] += time.perf_counter() - started
    gone: set[int] = set()
    started = time.perf_counter()
    server.start()
    run.server_seconds += time.perf_counter() - started
    with contextlib.suppress(RoundFailed):  # the server is FAILED; server.failure says why
        _drive(run, drop_at, gone)
    return run


def _drive(run: LocalRound, drop_at: Mapping[int, ServerState], gone: set[int]) -> None:
    server, clients = run.server, run.clients
    while server.state not in (ServerState.DONE, ServerState.FAILED):
        phase = server.state
        if phase == ServerState.RECONSTRUCT:
            started = time.perf_counter()
            try:
                server.finish()
            finally:
                run.server_seconds += time.perf_counter() - started
            return
        for cid, data in server.data_to_send():
            if cid in gone:
                continue
            run.bytes_down[cid] += len(data)
            started = time.perf_counter()
            try:
                clients[cid].receive(data)
            except (RemoteProtocolError, RoundFailed) as exc:
                run.failures[cid] = str(exc)
                gone.add(cid)
            run.client_seconds[cid] += time.perf_counter() - started
        for cid, client in clients.items():
            if cid in gone:
                continue
            for data in client.data_to_send():
                if drop_at.get(cid) == phase:
                    gone.add(cid)
                    break
                run.bytes_up[cid] += len(data)
                started = time.perf_counter()
                try:
                    server.receive(cid, data)
                except RemoteProtocolError:
                    gone.add(cid)
                finally:
                    run.server_seconds += time.perf_counter() - started
        if server.state == phase:
            started = time.perf_counter()
            try:
                server.deadline()
            finally:
                run.server_seconds += time.perf_counter() - started
