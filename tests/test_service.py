"""A real `fedcart-aggregator serve` process on loopback and real edge clients (asyncio tasks,
each with its own store and keys): rounds complete through dropouts at every phase, a client
sending garbage, an unenrolled client, and a SIGKILL of the server mid-round."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from websockets.asyncio.client import connect

from fedcart.aggregator.item_item import StatisticsSettings, head_items, item_table
from fedcart.aggregator.process import AGGREGATOR, AggregatorProcess
from fedcart.aggregator.statedir import init_state
from fedcart.aggregator.store import Store
from fedcart.data.evaluation import make_split
from fedcart.edge_client.device import Device
from fedcart.edge_client.session import Session
from fedcart.model_export.bundle import read_bundle
from fedcart.protocol import channel
from fedcart.protocol.control import Leave, Refusal, RoundNotice, Welcome
from fedcart.protocol.statistics import COOCCURRENCE, POPULARITY, sum_contributions
from fedcart.secagg.client import ClientState
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.fixedpoint import packed_scale_for
from tests.conftest import SMALL_COHORTS, synthetic_data
from tests.wire import check_in

CONFIG = """
[round]
sampling_rate = 1.0
min_clients = 3
phase_timeout = {timeout}
max_rounds = {rounds}
[privacy]
mechanism = "gaussian"
noise_multiplier = 1.5
clip_norm = 1.0
budget_epsilon = 1000.0
delta = 1e-5
[training]
lr_embeddings = 2.0
[statistics]
enabled = {statistics}
[evaluation]
every = 0
"""


def config_for_all(n_devices: int, **fields: object) -> str:
    """CONFIG whose rounds wait for ``n_devices`` check-ins: without it a round starts at
    min_clients, and a device that checks in late under load is left out of it."""
    return CONFIG.format(**fields).replace(
        "min_clients = 3", f"min_clients = 3\nmin_connected = {n_devices}")


def cli(*args: str) -> str:
    result = subprocess.run([*AGGREGATOR, *args], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def world(tmp_path: Path):
    return make_world(tmp_path)


def make_world(tmp_path: Path, n_users: int = 12) -> tuple:
    """An initialised aggregator and enrolled devices holding their users' baskets."""
    data = synthetic_data(n_users=n_users, n_items=30, seed=4)
    split = make_split(data)
    state = init_state(tmp_path / "agg", list(split.catalog),
                       [data.name_of(i) for i in split.catalog], dim=8, seed=0)
    server_key = bytes(state.signing_key().verify_key)
    store = Store(state.database)
    devices = []
    for u, baskets in enumerate(data.users.values()):
        device = Device(tmp_path / f"device{u}", server_key, policy=SMALL_COHORTS)
        for basket in baskets:
            device.add_basket(basket)
        store.enroll(device.identity.public)
        devices.append(device)
    store.close()
    return state, devices


def drop_schedule(monkeypatch, rules: dict[tuple[bytes, int], ClientState | str]) -> None:
    """Make a device vanish (close its connection) when its round reaches a state, instead
    of sending that state's message; 'stall' makes it hang silently instead."""
    original = Session.flush

    async def flush(self) -> None:
        rule = rules.get((self.device.identity.public, self.round_id))
        if rule is not None and self.round is not None and self.round.state == rule:
            await self.ws.close()
            return
        if rule == "stall" and self.round is not None and \
                self.round.state == ClientState.WAIT_SURVIVORS:
            await asyncio.sleep(3600)
        await original(self)

    monkeypatch.setattr(Session, "flush", flush)


async def garbage_client(url: str, key: IdentityKey, server_key: bytes) -> str:
    """Checks in honestly, then answers the round with bytes that are not a message."""
    async with connect(url, max_size=None) as ws:
        assert isinstance(await check_in(ws, key, server_key), Welcome)
        async for frame in ws:
            _, message = channel.parse(frame)
            if isinstance(message, RoundNotice):
                await ws.send(bytes([channel.SECAGG]) + b"not a secagg message" * 4)
            if isinstance(message, Refusal):
                return message.reason
    return "closed without an error"


async def unenrolled_client(url: str, server_key: bytes) -> str:
    async with connect(url) as ws:
        reply = await check_in(ws, IdentityKey.generate(), server_key)
        assert isinstance(reply, Refusal)
        return reply.reason


def ledger_matches_dp_accounting(state_dir: Path) -> float:
    body = json.loads(cli("ledger", "--state", str(state_dir), "--json"))
    accountant = dp_accounting.rdp.RdpAccountant()
    for row in body["rounds"]:
        accountant.compose(dp_accounting.GaussianDpEvent(row["noise_multiplier"]))
    fresh = accountant.get_epsilon(body["delta"])
    assert body["rounds"][-1]["epsilon_rdp"] == pytest.approx(fresh, rel=1e-9)
    return fresh


def test_rounds_survive_dropouts_garbage_and_strangers(world, monkeypatch) -> None:
    state, devices = world
    state.config.write_text("[server]\nkeep_bundles = 2\n"
                            + CONFIG.format(statistics='false', timeout=4.0, rounds=3))
    keys = [d.identity.public for d in devices]
    drop_schedule(monkeypatch, {
        (keys[0], 1): ClientState.WAIT_KEYS,       # vanishes instead of advertising keys
        (keys[1], 1): ClientState.WAIT_SHARES,     # ... instead of sharing keys
        (keys[2], 2): ClientState.WAIT_SURVIVORS,  # ... instead of sending its input
        (keys[3], 2): ClientState.WAIT_UNMASK,     # ... after its input was summed
        (keys[4], 3): ClientState.DONE,            # ... instead of sending unmask shares
    })
    garbage_key = IdentityKey.generate()
    store = Store(state.database)
    store.enroll(garbage_key.public)
    store.close()
    server = AggregatorProcess(state.root, "--log-json")
    server_key = bytes(state.signing_key().verify_key)
    v0 = read_bundle(state.bundles / "v00000000", server_key).weights().flat()

    async def everyone() -> tuple:
        stranger = await unenrolled_client(server.url, server_key)
        tasks = [d.participate(server.url, rounds=3, timeout=120) for d in devices]
        return stranger, await asyncio.gather(garbage_client(server.url, garbage_key,
                                                             server_key), *tasks)

    stranger, (garbage, *reports) = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    assert "not enrolled" in stranger
    assert "not a FedCart secagg message (bad magic)" in garbage
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert [r["status"] for r in status["rounds"]] == ["completed"] * 3, server.log()
    survivors = [r["survivors"] for r in status["rounds"]]
    # round 1: 12 honest sampled, 2 vanished early; round 2: 10, one left before its
    # input and one after (still a survivor); round 3: 8, one left at the very end
    assert survivors == [10, 9, 8]
    assert status["model_version"] == 3
    for device in devices[5:]:
        assert device.model_version == 3
        assert [r.status for r in reports[devices.index(device)]] == ["completed"] * 3
    v3 = read_bundle(state.bundles / "v00000003", server_key).weights().flat()
    assert np.abs(v3 - v0).max() > 1e-3  # the model changed
    assert ledger_matches_dp_accounting(state.root) > 0
    assert Store(state.database).integrity_ok()
    # keep_bundles = 2: only the newest two versions' bundles stay on disk
    assert sorted(p.name for p in state.bundles.iterdir()) == ["v00000002", "v00000003"]
    assert [(m["version"], m["bundle_kept"]) for m in status["models"]] == [
        (0, False), (1, False), (2, True), (3, True)]  # the history stays
    logged = [json.loads(line) for line in server.log().splitlines()
              if line.startswith("{")]  # --log-json: a JSON object a line
    assert any(e["message"].startswith("round 3: ") and e["level"] == "INFO" for e in logged)


def test_server_killed_mid_round_resumes(world, monkeypatch) -> None:
    state, devices = world
    devices = devices[:6]
    state.config.write_text(CONFIG.format(statistics='false', timeout=30.0, rounds=2))
    # one device stalls before sending its input, so round 1 waits in its MASKED phase
    drop_schedule(monkeypatch, {(devices[0].identity.public, 1): "stall"})
    server = AggregatorProcess(state.root)

    async def until_killed() -> None:
        tasks = [asyncio.create_task(d.participate(server.url, rounds=2, timeout=120))
                 for d in devices]
        for _ in range(200):
            await asyncio.sleep(0.05)
            if "round 1: 6 devices sampled" in server.log():
                break
        await asyncio.sleep(1.0)  # the five others have sent their masked inputs
        os.kill(server.proc.pid, signal.SIGKILL)
        await asyncio.wait(tasks, timeout=5)  # the stalled device never returns by itself
        for task in tasks:
            task.cancel()

    asyncio.run(until_killed())
    server.wait()
    assert Store(state.database).integrity_ok()
    # what a kill during publishing would leave: a bundle no model row points at
    (state.bundles / "v00000001").mkdir()
    (state.bundles / "v00000001" / "weights.bin").write_bytes(b"half")
    (state.bundles / ".v00000001.tmpdir").mkdir()
    restarted = AggregatorProcess(state.root)
    assert not (state.bundles / "v00000001" / "weights.bin").exists()
    assert not (state.bundles / ".v00000001.tmpdir").exists()
    assert "ok model_version=0" in restarted.http("/healthz")

    async def resume() -> list:
        return await asyncio.gather(*(d.participate(restarted.url, rounds=2, timeout=120)
                                      for d in devices[1:]))

    asyncio.run(resume())
    assert restarted.wait() == 0, restarted.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert [r["status"] for r in status["rounds"]] == ["interrupted", "completed", "completed"]
    assert status["model_version"] == 2
    body = json.loads(cli("ledger", "--state", str(state.root), "--json"))
    charged = {r["round_id"] for r in body["rounds"]}
    completed = {r["round_id"] for r in status["rounds"] if r["status"] == "completed"}
    assert completed <= charged  # the ledger never under-counts
    ledger_matches_dp_accounting(state.root)
    assert Store(state.database).integrity_ok()


def test_metrics_and_health(world) -> None:
    state, _ = world
    state.config.write_text(CONFIG.format(statistics='false', timeout=4.0, rounds=0))
    server = AggregatorProcess(state.root)
    try:
        assert server.http("/healthz").startswith("ok")
        metrics = server.http("/metrics")
        assert "fedcart_model_version 0.0" in metrics
        assert "fedcart_epsilon_spent" in metrics
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    time.sleep(0)


def test_token_enrollment_tls_laplace_and_fedadam(world, tmp_path) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state, devices = world
    state.config.write_text(CONFIG.format(statistics='false', timeout=5.0, rounds=1).replace(
        'mechanism = "gaussian"', 'mechanism = "laplace"') + '[optimizer]\nname = "fedadam"\n'
        'lr = 0.05\n')
    newcomer = Device(tmp_path / "newcomer", bytes(state.signing_key().verify_key),
                      policy=SMALL_COHORTS)
    newcomer.add_basket(["i001", "i002", "i003"])
    token = cli("token", "--state", str(state.root)).strip()
    # a self-signed certificate for 127.0.0.1
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcart-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = AggregatorProcess(state.root, "--tls-cert", str(cert_path), "--tls-key", str(key_path))
    assert server.url.startswith("wss://")
    trust = ssl.create_default_context(cafile=str(cert_path))

    async def run() -> list:
        tasks = [d.participate(server.url, rounds=1, ssl_context=trust, timeout=60)
                 for d in devices[:4]]
        tasks.append(newcomer.participate(server.url, rounds=1, token=token,
                                          ssl_context=trust, timeout=60))
        return await asyncio.gather(*tasks)

    reports = asyncio.run(run())
    assert server.wait() == 0, server.log()
    assert [r.status for r in reports[-1]] == ["completed"]  # enrolled by its token
    assert newcomer.model_version == 1
    body = json.loads(cli("ledger", "--state", str(state.root), "--json"))
    assert [r["mechanism"] for r in body["rounds"]] == ["laplace"]
    second = IdentityKey.generate()  # a used token cannot enroll anyone else
    store = Store(state.database)
    assert store.redeem_token(token, second.public) is None
    store.close()


def _serve_five(state, devices: list, rounds: int, setting: str, changed: str,
                status: int) -> AggregatorProcess:
    """Serve CONFIG with one setting changed until the service stops by itself with exit
    ``status``, five devices taking part in up to ``rounds`` rounds each; the stopped
    process."""
    state.config.write_text(CONFIG.format(statistics="false", timeout=5.0, rounds=0).replace(
        setting, changed))
    server = AggregatorProcess(state.root)

    async def run() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=rounds, timeout=60)
                                      for d in devices[:5]))

    asyncio.run(run())
    assert server.wait() == status, server.log()
    return server


def test_server_stops_before_the_budget_is_exceeded(world) -> None:
    state, devices = world
    # z = 1.5 at q = 1: one round spends ~3.3 at delta 1e-5, two ~4.8: budget 4 allows one
    server = _serve_five(state, devices, 2, "budget_epsilon = 1000.0", "budget_epsilon = 4.0",
                         status=3)
    assert "over the budget of 4" in server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert [r["status"] for r in status["rounds"]] == ["completed"]
    assert status["epsilon"] <= 4.0


def test_a_round_that_cannot_be_accounted_stops_the_service_saying_why(world) -> None:
    """A noise multiplier too small for the format's sensitivity (a discrete Gaussian needs
    sigma >= 4 steps) used to raise inside the round loop: the service must stop, say why,
    and run no round."""
    state, devices = world
    server = _serve_five(state, devices, 1, "noise_multiplier = 1.5", "noise_multiplier = 1e-9",
                         status=4)
    assert "cannot be accounted" in server.log() and "sigma" in server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert status["rounds"] == [] and status["epsilon"] == 0


async def leaving_client(url: str, key: IdentityKey, server_key: bytes) -> None:
    """Checks in, then declines its round with a leave frame and stays connected."""
    async with connect(url, max_size=None) as ws:
        assert isinstance(await check_in(ws, key, server_key, follow_model=False), Welcome)
        async for frame in ws:
            if isinstance(channel.parse(frame)[1], RoundNotice):
                await ws.send(Leave("cannot verify the config").to_frame())


def test_a_device_that_leaves_does_not_hold_the_round_to_its_deadline(world) -> None:
    state, devices = world
    state.config.write_text(config_for_all(len(devices) + 1, statistics='false',
                                           timeout=300.0, rounds=1))
    leaver = IdentityKey.generate()
    store = Store(state.database)
    leaver_id = store.enroll(leaver.public)
    store.close()
    server = AggregatorProcess(state.root)
    server_key = bytes(state.signing_key().verify_key)

    async def everyone() -> None:
        task = asyncio.create_task(leaving_client(server.url, leaver, server_key))
        await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=120)
                               for d in devices))
        task.cancel()

    asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    (round_row,) = status["rounds"]
    assert round_row["status"] == "completed" and round_row["survivors"] == len(devices)
    assert round_row["detail"]["dropped"] == {str(leaver_id): "left"}
    assert max(round_row["detail"]["phase_seconds"].values()) < 60  # not the 300 s deadline


def test_a_population_round_waits_for_its_share_and_says_why(world) -> None:
    """The statistics rounds (q = 1) name the head items and build the table for everyone:
    with half of the 12 enrolled devices checked in none starts, however long it waits,
    and the log says why; once the rest check in, the rounds run."""
    state, devices = world
    state.config.write_text(CONFIG.format(statistics="true", timeout=30.0, rounds=1).replace(
        "min_clients = 3", "min_clients = 3\npopulation_wait = 0.5"))
    server = AggregatorProcess(state.root)
    waits = "of 12 enrolled devices are checked in, a round over the whole population needs 11"

    async def run() -> list:
        first = [asyncio.create_task(d.participate(server.url, rounds=3, timeout=180))
                 for d in devices[:6]]
        deadline = time.monotonic() + 60
        while waits not in server.log() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # four more population_waits
        store = Store(state.database)
        started = store.rounds()
        store.close()
        rest = [asyncio.create_task(d.participate(server.url, rounds=3, timeout=180))
                for d in devices[6:]]
        return [started, await asyncio.gather(*first, *rest)]

    started, reports = asyncio.run(run())
    assert server.wait() == 0, server.log()
    assert waits in server.log() and started == []
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert [(r["status"], r["detail"]["task"]) for r in status["rounds"]] == [
        ("completed", "popularity"), ("completed", "cooccurrence"), ("completed", "train")]
    assert all([r.status for r in rs] == ["completed"] * 3 for rs in reports)


def test_statistics_rounds_release_exact_sums_then_publish_the_table(world) -> None:
    """The first two rounds sum the devices' statistics: without DP noise the released sums
    equal the devices' clipped contributions added up (statistics.sum_contributions, the
    central path), the co-occurrence round covers the most popular items, and model
    version 1 carries the table and bias derived from them. Training follows."""
    state, devices = world
    state.config.write_text(CONFIG.format(
        statistics="true\nhead_items = 12\nneighbours = 4\npopularity_clip = 2.0\n"
                   "cooccurrence_clip = 3.0", timeout=30.0, rounds=1).replace(
        'mechanism = "gaussian"', 'mechanism = "none"'))
    server = AggregatorProcess(state.root)
    server_key = bytes(state.signing_key().verify_key)

    async def everyone() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=3, timeout=120)
                                      for d in devices))

    reports = asyncio.run(everyone())
    assert server.wait() == 0, server.log()
    status = json.loads(cli("status", "--state", str(state.root), "--json"))
    assert [(r["status"], r["detail"]["task"]) for r in status["rounds"]] == [
        ("completed", "popularity"), ("completed", "cooccurrence"), ("completed", "train")]
    assert all([r.status for r in rs] == ["completed"] * 3 for rs in reports)
    assert status["model_version"] == 2
    # the exact count of devices with data is released nowhere (it was an unnoised release)
    assert not any("devices" in r["detail"] for r in status["rounds"])

    v0 = read_bundle(state.bundles / "v00000000", server_key)
    index = {item: i for i, item in enumerate(v0.items)}
    users = [[np.array(sorted(index[i] for i in b if i in index), np.int64)
              for b in d.store.baskets()] for d in devices]
    n_items = v0.manifest.n_items
    store = Store(state.database)
    popularity = store.statistic(POPULARITY)
    cooccurrence = store.statistic(COOCCURRENCE)
    store.close()
    assert popularity is not None and cooccurrence is not None
    assert popularity.noise_std == cooccurrence.noise_std == 0.0
    # statistics travel packed, two 16-bit values a word, rounded stochastically: at most
    # one step (1 / packed_scale_for(cohort)) per device off
    step = 1 / packed_scale_for(len(devices))
    exact = sum_contributions(POPULARITY, users, n_items, 2.0)
    np.testing.assert_allclose(popularity.total, exact, atol=len(devices) * step)
    np.testing.assert_array_equal(cooccurrence.head, head_items(popularity.total, 12))
    exact = sum_contributions(COOCCURRENCE, users, n_items, 3.0, head=cooccurrence.head)
    np.testing.assert_allclose(cooccurrence.total, exact, atol=len(devices) * step)
    assert status["rounds"][1]["detail"]["values"] == (12 * 13 // 2 + 1) // 2  # packed

    v1 = read_bundle(state.bundles / "v00000001", server_key)
    settings = StatisticsSettings(head_items=12, neighbours=4)
    table = item_table(cooccurrence.total, cooccurrence.head, v1.names, settings, 0.0)
    np.testing.assert_array_equal(v1.neighbours().ids, table.ids)
    np.testing.assert_array_equal(v1.neighbours().weights, table.weights)
    np.testing.assert_allclose(v1.weights().bias, settings.popularity_weight *
                               np.log1p(np.maximum(popularity.total, 0)), rtol=1e-6)
    assert v1.neighbours().weights[cooccurrence.head].max() == pytest.approx(
        v1.neighbours().weights.max()) and v1.neighbours().weights.max() > 0
    # the statistics rounds sent no model: each device downloaded v0 at check-in, then v1
    # and v2 for the training round and after it, never a copy per statistics round
    assert all(d.model_version == 2 for d in devices)


def test_a_round_short_of_min_clients_says_why_once_and_devices_that_they_were_connected(
        world, caplog) -> None:
    """Fewer devices checked in than min_clients: no round starts. The aggregator says why
    once (not at each tick of its round loop, five a second), and each device, when its
    session times out, that it was connected all along and offered no round, not that it
    could not reach the aggregator (what `fedcart-device participate` used to print)."""
    state, devices = world
    state.config.write_text(CONFIG.format(statistics="false", timeout=4.0, rounds=0).replace(
        "min_clients = 3", "min_clients = 5"))
    server = AggregatorProcess(state.root)

    async def run() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=3)
                                      for d in devices[:3]))

    try:
        with caplog.at_level(logging.WARNING, logger="fedcart.device"):
            reports = asyncio.run(run())
    finally:
        assert server.terminate() == 0, server.log()
    assert reports == [[], [], []]
    waits = [line for line in server.log().splitlines() if "round waits:" in line]
    assert len(waits) == 1, waits
    assert waits[0].endswith("devices checked in, a round needs min_clients = 5")
    said = [r.getMessage() for r in caplog.records if r.name == "fedcart.device"]
    assert said == [f"connected to {server.url} for 3 s, no round was offered: the "
                    "aggregator waits for more devices to check in, or did not sample this "
                    "one (see its log)"] * 3
    store = Store(state.database)
    assert store.rounds() == []
    store.close()
