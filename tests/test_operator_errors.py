"""What an operator or an app developer meets when something is wrong: one line saying what
and how to fix it, and a non-zero exit status, never a traceback. Also the device package's
promise to an app: ``import edge_client`` loads none of the aggregator's dependencies."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.asyncio.client import connect

from fedcart.aggregator.cli import main as aggregator_main
from fedcart.aggregator.process import AGGREGATOR, AggregatorProcess
from fedcart.aggregator.statedir import StateDir, init_state
from fedcart.aggregator.store import Store
from fedcart.data.evaluation import make_split
from fedcart.edge_client.cli import main as device_main
from fedcart.secagg.crypto import IdentityKey
from tests.conftest import synthetic_data
from tests.test_tls_cli import DEVICE, PROJECT, assert_one_line_error
from tests.wire import challenge, hello


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    """An initialised aggregator state over a small synthetic catalog."""
    data = synthetic_data(n_users=4, n_items=30, seed=4)
    split = make_split(data)
    return init_state(tmp_path / "agg", list(split.catalog),
                      [data.name_of(i) for i in split.catalog], dim=8, seed=0)


def aggregator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGGREGATOR, *args], capture_output=True, text=True, timeout=60,
                          cwd=PROJECT)


def device(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEVICE, *args], capture_output=True, text=True, timeout=60,
                          cwd=PROJECT)


# -- the state directory's lock --------------------------------------------------------------
def test_a_second_serve_on_a_state_directory_is_refused(state: StateDir) -> None:
    first = AggregatorProcess(state.root)
    second = aggregator("serve", "--state", str(state.root), "--port", "0")
    assert_one_line_error(second.returncode, second.stderr,
                          f"state directory {state.root} is in use by another "
                          f"fedcart-aggregator (pid {first.proc.pid})")
    assert first.proc.poll() is None  # the first one serves on, untouched
    first.kill()  # the kernel releases a SIGKILLed holder's lock: no stale lock to clear
    restarted = AggregatorProcess(state.root)
    assert restarted.terminate() == 0


# -- serve -----------------------------------------------------------------------------------
def test_a_port_in_use_is_one_line(state: StateDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = aggregator("serve", "--state", str(state.root), "--port", str(port))
    assert_one_line_error(result.returncode, result.stderr,
                          f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_missing_tls_files_are_named(state: StateDir, tmp_path: Path) -> None:
    cert, key = tmp_path / "missing-cert.pem", tmp_path / "missing-key.pem"
    given = aggregator("serve", "--state", str(state.root), "--tls-cert", str(cert),
                       "--tls-key", str(key))
    assert_one_line_error(given.returncode, given.stderr, f"tls_cert: {cert} does not exist")
    key.write_text("not a key\n")
    cert.write_text("not a certificate\n")
    bad = aggregator("serve", "--state", str(state.root), "--tls-cert", str(cert),
                     "--tls-key", str(key))
    assert_one_line_error(bad.returncode, bad.stderr, f"cannot use TLS certificate {cert}")
    cert.unlink()
    state.config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    configured = aggregator("serve", "--state", str(state.root))
    assert_one_line_error(configured.returncode, configured.stderr,
                          f"tls_cert: {cert} does not exist")


# -- status and ledger -----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["status", "ledger"])
def test_status_and_ledger_on_a_bad_or_missing_config(state: StateDir, command: str) -> None:
    def run() -> tuple[int, str]:
        result = CliRunner().invoke(aggregator_main, [command, "--state", str(state.root)])
        assert isinstance(result.exception, SystemExit), result.exception  # no traceback
        return result.exit_code, result.stderr

    state.config.write_text("[server]\nport = 'eighty'\n")
    assert_one_line_error(*run(), str(state.config), "server.port must be int")
    state.config.write_text("[server\n")
    assert_one_line_error(*run(), str(state.config), "not valid TOML")
    state.config.unlink()
    assert_one_line_error(*run(), "missing config.toml", "fedcart-aggregator init")


# -- the device ------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8765/ws", "127.0.0.1:8765",
                                 "ws://127.0.0.1:99999/ws", "wss:///ws"])
def test_a_device_url_must_be_a_websocket_url(tmp_path: Path, url: str) -> None:
    result = device("participate", "--state", str(tmp_path / "dev"), "--url", url)
    assert_one_line_error(result.returncode, result.stderr,
                          f"{url}: the URL must be ws:// or wss://")


def test_an_unenrolled_device_exits_non_zero(state: StateDir, tmp_path: Path) -> None:
    server_key = bytes(state.signing_key().verify_key).hex()
    init = CliRunner().invoke(device_main, ["init", "--state", str(tmp_path / "dev"),
                                            "--server-key", server_key])
    assert init.exit_code == 0, init.output
    server = AggregatorProcess(state.root)
    result = device("participate", "--state", str(tmp_path / "dev"), "--url", server.url)
    assert_one_line_error(result.returncode, result.stderr,
                          "took part in 0 of 1 rounds: server refused: check-in refused: "
                          "this device is not enrolled")
    assert result.stdout == "model version -1\n"
    assert server.terminate() == 0


async def _vanish(url: str, key: IdentityKey, server_key: bytes, check_in: bool) -> None:
    """Connect and drop the connection without a close frame, as a phone losing its
    network does: at the challenge, or once checked in."""
    async with connect(url, max_size=None) as ws:
        nonce = (await challenge(ws)).nonce
        if check_in:
            await ws.send(hello(key, nonce, server_key).to_frame())
            await ws.recv()  # welcome
        assert ws.transport is not None
        ws.transport.abort()


def test_an_abrupt_disconnect_is_one_info_line(state: StateDir) -> None:
    key = IdentityKey.generate()
    store = Store(state.database)
    store.enroll(key.public)
    store.close()
    server_key = bytes(state.signing_key().verify_key)
    server = AggregatorProcess(state.root)
    asyncio.run(_vanish(server.url, key, server_key, check_in=False))
    asyncio.run(_vanish(server.url, key, server_key, check_in=True))
    deadline = time.monotonic() + 30
    while server.log().count("disconnected") + server.log().count("closed before") < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert server.terminate() == 0
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert [line.split(" INFO ")[1] for line in log.splitlines()
            if "closed before" in line or "disconnected" in line] == [
        "a connection closed before its check-in: no close frame received or sent",
        "device 1 disconnected: no close frame received or sent"]


# -- the device package ----------------------------------------------------------------------
SERVER_ONLY = ("onnx", "pandas", "scipy", "click", "dp_accounting")


def test_import_edge_client_loads_no_server_dependency() -> None:
    probe = ("import fedcart.edge_client, sys; "
             f"print(','.join(m for m in {SERVER_ONLY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=PROJECT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import edge_client loaded {result.stdout.strip()}"


def test_the_public_api_keeps_a_device_across_instances(state: StateDir,
                                                        tmp_path: Path) -> None:
    """Everything ``__all__`` names exists; a device holds nothing open, so there is
    nothing to close, and a second instance on the same directory is the same device."""
    from fedcart import edge_client

    for name in edge_client.__all__:
        assert getattr(edge_client, name) is not None
    server_key = edge_client.read_public_key(bytes(state.signing_key().verify_key).hex())
    dev = edge_client.Device(tmp_path / "dev", server_key)
    dev.add_basket(["i001", "i002"])
    bundle = edge_client.read_bundle(state.bundles / "v00000000", server_key)
    dev.install_members(bundle.members(), "shipped")
    assert dev.model_version == 0
    again = edge_client.Device(tmp_path / "dev", server_key)
    assert again.identity.public == dev.identity.public
    assert again.store.baskets() == [["i001", "i002"]]
    assert again.model_version == 0
