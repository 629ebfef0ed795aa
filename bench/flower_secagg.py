"""Flower's SecAgg+ (flwr 1.42.0, the ``bench`` extra) driven in-process, as a baseline.

Its own ``SecAggPlusWorkflow`` runs against an in-memory Grid that hands each message to that
node's ``secaggplus_mod`` wrapped around a client that returns a fixed vector: the same
protocol stages, clients and server in one process, exactly as our in-memory round runs.
Dropped clients stop answering at the masked-vector stage (Flower aborts when a client drops
before sharing keys, so that is the latest stage both protocols recover from).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable

import numpy as np


def run_flower_round(n: int, dim: int, num_shares: int, threshold: int,
                     dropped: set[int], seed: int = 0) -> tuple[float, np.ndarray,
                                                                 np.ndarray]:
    """Seconds for one round, Flower's aggregate, and the float mean it should equal."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import (
        fitres_to_recorddict,
        parameters_to_arrayrecord,
    )
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(seed)
    vectors = {nid: rng.uniform(-1.0, 1.0, dim).astype(np.float32) for nid in range(1, n + 1)}

    class Proxy(ClientProxy):
        def __init__(self, nid: int) -> None:
            super().__init__(str(nid))
            self.node_id = nid

        def get_properties(self, *a, **k):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    def client_app(msg: Message, ctxt: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vectors[ctxt.node_id]]),
                     1, {})
        return Message(fitres_to_recorddict(res, False), reply_to=msg)

    contexts = {nid: Context(0, nid, {}, RecordDict(), {}) for nid in vectors}
    stage = {"n": 0}

    class MemoryGrid(Grid):
        def send_and_receive(self, messages: Iterable[Message], *,
                             timeout: float | None = None) -> Iterable[Message]:
            stage["n"] += 1
            replies = []
            for msg in messages:
                nid = msg.metadata.dst_node_id
                if stage["n"] >= 3 and nid in dropped:
                    continue
                # a transport gives each node its own copy (the mod mutates its input)
                replies.append(secaggplus_mod(copy.deepcopy(msg), contexts[nid], client_app))
            return replies

        def set_run(self, run_id): ...  # type: ignore[no-untyped-def]
        def run(self): ...  # type: ignore[no-untyped-def]
        def create_message(self, *a, **k): ...  # type: ignore[no-untyped-def]
        def get_node_ids(self): return list(vectors)  # type: ignore[no-untyped-def]
        def push_messages(self, messages): ...  # type: ignore[no-untyped-def]
        def pull_messages(self, message_ids): ...  # type: ignore[no-untyped-def]

    manager = SimpleClientManager()
    for nid in vectors:
        manager.register(Proxy(nid))
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 1})
    state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(dim, np.float32)]), True)
    context = LegacyContext(Context(0, 0, {}, state, {}), strategy=strategy,
                            client_manager=manager)
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                  clipping_range=1.0)
    started = time.perf_counter()
    workflow(MemoryGrid(), context)
    seconds = time.perf_counter() - started
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

    result = parameters_to_ndarrays(arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], True))[0]
    expected = np.mean([v for nid, v in vectors.items() if nid not in dropped], axis=0)
    return seconds, result, expected
