"""A hostile server against a real edge client over a websocket: a tampered bundle and a
round config signed by a key other than the pinned one. The device refuses each and says
why (in its log, its round report, and a leave frame to the server); its current bundle is
untouched and keeps serving."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import serve

from fedcart.aggregator.statedir import init_state
from fedcart.edge_client.device import Device
from fedcart.model_export.bundle import pack_members, read_bundle
from fedcart.protocol import channel
from fedcart.protocol.control import Challenge, Leave, Outcome, RoundNotice, RoundOver, Welcome
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.server import ServerRound

pytestmark = pytest.mark.reliability

ITEMS = [f"sku{i:02d}" for i in range(20)]


def test_device_refuses_a_tampered_bundle_and_a_forged_round_config(tmp_path: Path,
                                                                      caplog) -> None:
    state = init_state(tmp_path / "agg", ITEMS, ITEMS, dim=4, seed=0)
    pinned = bytes(state.signing_key().verify_key)
    v0 = read_bundle(state.bundles / "v00000000", pinned)
    device = Device(tmp_path / "device", pinned)
    device.install(pack_members(v0.members()))
    device.add_basket(["sku01", "sku02", "sku03"])
    before = device.recommend(["sku01"], 5)
    tampered = dict(v0.members())
    weights = bytearray(tampered["weights.bin"])
    weights[10] ^= 0xFF
    tampered["weights.bin"] = bytes(weights)
    manifest = v0.manifest
    n_params = 2 * manifest.n_items * manifest.dim + manifest.n_items + 2
    rogue = IdentityKey.generate()  # not the key the device pinned
    seen: dict[str, object] = {}

    async def hostile(ws) -> None:
        await ws.send(Challenge(os.urandom(32), pinned).to_frame())
        await ws.recv()  # the hello
        await ws.send(Welcome(1, 1).to_frame())
        await ws.send(bytes([channel.BUNDLE]) + pack_members(tampered))
        await ws.send(RoundNotice(5, 1).to_frame())
        others = {2: IdentityKey.generate().public, 3: IdentityKey.generate().public}
        server = ServerRound(5, {1: device.identity.public, **others}, 2, 2, n_params + 1,
                             rogue)
        server.start()
        for cid, data in server.data_to_send():
            if cid == 1:
                await ws.send(bytes([channel.SECAGG]) + data)
        async for frame in ws:
            _, message = channel.parse(frame)
            if isinstance(message, Leave):
                seen["leave"] = message.reason
                await ws.send(RoundOver(5, Outcome.FAILED, 0).to_frame())
                return

    async def run() -> list:
        async with serve(hostile, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            return await device.participate(f"ws://127.0.0.1:{port}", rounds=1, timeout=30)

    (report,) = asyncio.run(run())
    assert report.status.startswith("refused:") and "signature" in report.status
    assert "signature" in str(seen["leave"])
    assert "refused a bundle" in caplog.text and "tampered" in caplog.text
    # the current bundle is untouched and still serves the same recommendations
    assert device.model_version == 0
    restarted = Device(tmp_path / "device", pinned)
    assert restarted.model_version == 0
    assert restarted.current_bundle() is not None
    assert restarted.recommend(["sku01"], 5) == before
    assert np.array_equal(restarted.current_bundle().weights().flat(), v0.weights().flat())
