"""TLS from the command lines: `fedcart-device participate --ca-file` takes part in a round
with a `fedcart-aggregator serve` whose certificate a private CA signed, and plaintext off
loopback needs --insecure on either side."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcart.aggregator.process import AGGREGATOR, AggregatorProcess
from fedcart.aggregator.statedir import StateDir, init_state
from fedcart.aggregator.store import Store
from fedcart.data.evaluation import Split, make_split
from fedcart.edge_client.cli import main as device_main
from fedcart.edge_client.device import Device
from tests.conftest import SMALL_COHORTS, synthetic_data
from tests.process_owner import ProcessOwner

DEVICE = [sys.executable, "-m", "fedcart.edge_client.cli"]
PROJECT = Path(__file__).parent.parent
OPEN_TIMEOUT = 10.0  # websockets' default open_timeout, which the aggregator keeps
COHORT = 20  # the smallest cohort a device's default policy joins (secagg.policy)
CONFIG = f"""
[round]
sampling_rate = 1.0
min_clients = 3
min_connected = {COHORT}
phase_timeout = 30.0
max_rounds = 1
[privacy]
noise_multiplier = 1.5
budget_epsilon = 1000.0
[statistics]
enabled = false
[evaluation]
every = 0
"""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1 and localhost, as PEM
    files: (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedcart test CA"))
          .issuer_name(_name("fedcart test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(_name("fedcart aggregator"))
              .issuer_name(ca.subject).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=1))
              .not_valid_after(now + datetime.timedelta(hours=1))
              .add_extension(x509.SubjectAlternativeName([
                  x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.DNSName("localhost")]), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(server_key))
    return paths


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ [A-Z]+ ")


def assert_one_line_error(code: int, stderr: str, *expected: str) -> None:
    """Exit status non-zero, no traceback, and besides the service's log lines (what it
    logged as it started) one line on stderr: the error, holding each of ``expected``."""
    assert code != 0, stderr
    said = [line for line in stderr.splitlines() if not LOG_LINE.match(line)]
    assert "Traceback" not in stderr and len(said) == 1, stderr
    assert said[0].startswith("Error: "), stderr
    for text in expected:
        assert text in said[0], stderr


def cohort_with_a_seat(tmp_path: Path) -> tuple[StateDir, Split, list, list[Device]]:
    """An aggregator state serving CONFIG, its split, its users' baskets, and API devices
    holding the baskets of every user but the first (enrolled by the caller, with the first
    user's device under test): a round of COHORT."""
    data = synthetic_data(n_users=COHORT, n_items=30, seed=4)
    split = make_split(data)
    state = init_state(tmp_path / "agg", list(split.catalog),
                       [data.name_of(i) for i in split.catalog], dim=8, seed=0)
    state.config.write_text(CONFIG)
    server_key = bytes(state.signing_key().verify_key)
    users = list(data.users.values())
    others = []
    for u, baskets in enumerate(users[1:]):
        device = Device(tmp_path / f"device{u}", server_key, policy=SMALL_COHORTS)
        for basket in baskets:
            device.add_basket(basket)
        others.append(device)
    return state, split, users, others


def test_a_device_takes_part_over_tls_from_the_command_line(
        tmp_path: Path, processes: ProcessOwner) -> None:
    state, _, users, others = cohort_with_a_seat(tmp_path)
    server_key = bytes(state.signing_key().verify_key)
    # one device set up and run from the command line, the others through the API
    cli_state = tmp_path / "cli-device"
    init = CliRunner().invoke(device_main, ["init", "--state", str(cli_state),
                                            "--server-key", server_key.hex()])
    assert init.exit_code == 0, init.output
    for basket in users[0]:
        added = CliRunner().invoke(device_main, ["add-basket", "--state", str(cli_state),
                                                 "--items", ",".join(basket)])
        assert added.exit_code == 0, added.output
    store = Store(state.database)
    for public in [bytes.fromhex(init.output.strip())] + [d.identity.public for d in others]:
        store.enroll(public)
    store.close()
    ca, cert, cert_key = make_ca_and_server_cert(tmp_path)
    server = AggregatorProcess(state.root, "--tls-cert", str(cert), "--tls-key", str(cert_key))
    assert server.url.startswith("wss://127.0.0.1:")

    # without the private CA, the system's CAs do not vouch for the server: one line
    untrusted = subprocess.run([*DEVICE, "participate", "--state", str(cli_state),
                                "--url", server.url], capture_output=True, text=True,
                               timeout=60, cwd=PROJECT)
    assert_one_line_error(untrusted.returncode, untrusted.stderr, "cannot reach",
                          "certificate verify failed")

    cli_device = processes.popen([*DEVICE, "participate", "--state", str(cli_state),
                                  "--url", server.url, "--ca-file", str(ca)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=PROJECT)
    trust = ssl.create_default_context(cafile=str(ca))

    async def the_others() -> list:
        return await asyncio.gather(*(d.participate(server.url, rounds=1, ssl_context=trust,
                                                    timeout=120) for d in others))

    reports = asyncio.run(the_others())
    out, err = cli_device.communicate(timeout=120)
    assert cli_device.returncode == 0, err
    assert out.splitlines()[0].startswith("round 1: completed"), out
    assert out.splitlines()[-1] == "model version 1", out
    assert all([r.status for r in rs] == ["completed"] for rs in reports)
    assert server.wait() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def test_plaintext_beyond_loopback_needs_insecure_on_the_device(tmp_path: Path) -> None:
    for url in ("ws://192.0.2.10:8765/ws", "ws://aggregator.example/ws", "ws://[2001:db8::1]/ws"):
        refused = CliRunner().invoke(device_main, ["participate", "--state",
                                                   str(tmp_path / "dev"), "--url", url])
        assert refused.exit_code == 1 and refused.exception is not None
        assert refused.output.startswith("Error: refusing plaintext ws:// to "), refused.output
        assert "--insecure" in refused.output and len(refused.output.splitlines()) == 1
    # --ca-file is for wss:// only: a plaintext URL with it is a mistake, said so
    mixed = CliRunner().invoke(device_main, ["participate", "--state", str(tmp_path / "dev"),
                                             "--url", "ws://127.0.0.1:8765/ws",
                                             "--ca-file", str(tmp_path / "ca.pem")])
    assert mixed.exit_code == 1 and "--ca-file is for wss://" in mixed.output
    # and a wrong --ca-file is named before anything connects
    missing = CliRunner().invoke(device_main, ["participate", "--state", str(tmp_path / "dev"),
                                               "--url", "wss://127.0.0.1:8765/ws",
                                               "--ca-file", str(tmp_path / "ca.pem")])
    assert missing.exit_code == 1
    assert missing.output == f"Error: --ca-file: {tmp_path / 'ca.pem'} does not exist\n"


def test_plaintext_beyond_loopback_needs_insecure_on_the_aggregator(tmp_path: Path) -> None:
    data = synthetic_data(n_users=4, n_items=30, seed=4)
    split = make_split(data)
    state = init_state(tmp_path / "agg", list(split.catalog),
                       [data.name_of(i) for i in split.catalog], dim=8, seed=0)
    refused = subprocess.run([*AGGREGATOR, "serve", "--state", str(state.root), "--host",
                              "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                             timeout=60, cwd=PROJECT)
    assert_one_line_error(refused.returncode, refused.stderr,
                          "refusing to serve plaintext ws:// on 0.0.0.0",
                          "set tls_cert and tls_key", "--insecure")


def test_a_connection_that_never_finishes_its_tls_handshake_is_closed(tmp_path: Path) -> None:
    """Until its TLS handshake is done, a socket is not yet the server's (asyncio hands it
    over then, and only then does the socket limit count it): websockets gives the
    handshake its open_timeout, so the server closes a silent one after OPEN_TIMEOUT, not
    asyncio's 60 s, and goes on serving."""
    state, _, _, _ = cohort_with_a_seat(tmp_path)
    ca, cert, cert_key = make_ca_and_server_cert(tmp_path)
    server = AggregatorProcess(state.root, "--tls-cert", str(cert), "--tls-key", str(cert_key))
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        silent.settimeout(60)
        opened = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server, without a byte of TLS
        held = time.monotonic() - opened
    assert OPEN_TIMEOUT - 1 <= held < OPEN_TIMEOUT + 5, held
    trust = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() is not None  # a handshake that goes on is served
    server.terminate()
