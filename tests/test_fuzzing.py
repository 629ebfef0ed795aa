"""Runs the atheris harness (tests/fuzz_decoders.py) from a seed corpus of valid inputs for
a bounded time: a decoder that raises anything but its documented error fails the test."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from fedcart.model_export.bundle import pack_members, read_bundle
from fedcart.model_export.export import export_bundle
from fedcart.model_export.model import init_weights
from fedcart.protocol.control import Hello
from fedcart.secagg.crypto import IdentityKey
from fedcart.secagg.messages import MaskedInput
from fedcart.secagg.server import ServerRound

pytestmark = pytest.mark.reliability

SECONDS = 20
ADDRESS_SPACE = 4 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _seeds(tmp_path: Path) -> list[bytes]:
    keys = {i: IdentityKey.generate().public for i in (1, 2, 3)}
    server = ServerRound(4, keys, 2, 2, 9, IdentityKey.generate())
    server.start()
    config = server.data_to_send()[0][1]
    masked = MaskedInput(4, 1, np.arange(9, dtype=np.uint32)).encode()
    key = nacl.signing.SigningKey(bytes(range(32)))
    export_bundle(tmp_path / "b", init_weights(3, 2, np.random.default_rng(0)),
                  ["a", "b", "c"], ["A", "B", "C"], key, model_version=1)
    bundle = read_bundle(tmp_path / "b", bytes(key.verify_key))
    return [b"\x00" + config, b"\x00" + masked,
            b"\x01" + Hello(bytes(32), bytes(64), -1).to_frame(),
            b"\x02" + bundle.manifest_json, b"\x03" + pack_members(bundle.members())]


def test_decoders_survive_coverage_guided_fuzzing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(_seeds(tmp_path)):
        (corpus / f"seed{i}").write_bytes(seed)
    harness = Path(__file__).with_name("fuzz_decoders.py")
    # libFuzzer's own -rss_limit_mb reads ru_maxrss, which a child inherits from its parent
    # (pytest's peak, gigabytes after the EASE tests); an address-space limit instead turns
    # any oversized allocation into a MemoryError, which the harness reports as a crash
    result = subprocess.run(
        [sys.executable, str(harness), str(corpus), f"-max_total_time={SECONDS}",
         f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=0", "-max_len=65536",
         "-print_final_stats=1"],
        capture_output=True, text=True, timeout=SECONDS + 120,
        cwd=Path(__file__).parent.parent, preexec_fn=_limit_memory)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert "Done" in result.stderr and "stat::number_of_executed_units" in result.stderr
