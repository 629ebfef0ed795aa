"""The deployment by hand (docs/deployment.md, which the README points to), pasted as
written into a fresh shell, completes its rounds: the aggregator and 20 devices, each its
own process, through both statistics rounds, an evaluation round, three training rounds and
another evaluation round; the first estimate read from /metrics, then a recommendation, the
status with the estimates, and the ledger.

The block runs with bash in a temporary directory that holds a ``.venv`` link to the venv
running the tests (``. .venv/bin/activate`` then works as it does at the repository root),
from a PATH without the venv, as a fresh shell has. Its one change: the page's port 8765
becomes a free one, since another run on this machine may hold 8765."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process_owner import ProcessOwner

PAGE = Path(__file__).parent.parent / "docs" / "deployment.md"
SECTION = "## A deployment by hand"
PORT = "8765"  # the page's
DEVICES = 20
ROUNDS = 7  # each device's: two statistics, an evaluation, three training, an evaluation
TIMEOUT = 300.0  # seconds: about two on 2 idle cores
RANKED = re.compile(r"^\s*(\d+)\s+(\S+)\s+-?\d+\.\d+\s", re.MULTILINE)  # recommend's rows


def page_block() -> str:
    """The first ```sh block after the section's heading."""
    text = PAGE.read_text()
    start = text.index("```sh\n", text.index(SECTION)) + len("```sh\n")
    return text[start:text.index("\n```\n", start) + 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_shell_env(venv: Path) -> dict[str, str]:
    """This environment as a new shell has it: no venv active, its bin not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p) != venv / "bin")
    return env


def test_the_block_is_found_and_pasteable() -> None:
    """The block the slow test runs is the section's, activates the venv itself, and starts
    and stops its own server (no placeholder left for the reader to fill in)."""
    block = page_block()
    assert block.startswith(". .venv/bin/activate\n")
    assert re.search(r"<[a-z ]+>", block) is None  # no <placeholder> to fill in
    assert f"--port {PORT}" in block and "kill $server" in block
    assert f"seq 1 {DEVICES}" in block and f"--rounds {ROUNDS}" in block


@pytest.mark.slow
def test_the_readme_deployment_by_hand_completes_its_rounds(
        tmp_path: Path, processes: ProcessOwner) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run from a venv: no .venv to activate")
    if shutil.which("curl") is None:
        pytest.skip("no curl: the block asks the server's /healthz with it")
    venv = Path(sys.executable).parent.parent  # .venv/bin/python: not resolved (a link)
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    script = tmp_path / "block.sh"
    script.write_text(page_block().replace(PORT, str(free_port())))
    log = tmp_path / "block.log"
    with log.open("w") as out:
        proc = processes.popen(["bash", str(script)], cwd=tmp_path, stdout=out,
                               stderr=subprocess.STDOUT, env=fresh_shell_env(venv))
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            processes.kill(proc)  # the shell, its server and its devices: one group
            pytest.fail(f"the block ran over {TIMEOUT:g} s:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert "failed" not in output, output[-4000:]
    assert "completed 3 rounds: stopping" in output  # the server stopped by itself
    work = tmp_path / "out" / "by-hand"
    for i in range(1, DEVICES + 1):
        rounds = re.findall(r"^round \d+: (\S+),", (work / f"dev{i}.log").read_text(),
                            re.MULTILINE)
        assert rounds == ["completed"] * ROUNDS, f"device {i}: {rounds}"
    status = json.loads(subprocess.run(
        [str(venv / "bin" / "fedcart-aggregator"), "status", "--state", str(work / "agg"),
         "--json"], capture_output=True, text=True, check=True, timeout=60).stdout)
    assert status["enrolled"] == DEVICES and status["model_version"] == 4
    assert [(r["detail"]["task"], r["status"], r["sampled"], r["survivors"])
            for r in status["rounds"]] == [
        ("popularity", "completed", DEVICES, DEVICES),
        ("cooccurrence", "completed", DEVICES, DEVICES),
        ("evaluate", "completed", DEVICES, DEVICES),
        *[("train", "completed", DEVICES, DEVICES)] * 3,
        ("evaluate", "completed", DEVICES, DEVICES)]
    assert 0 < status["epsilon"] <= 8.0 + 1e-6  # the plan's target, spent by its rounds
    # the estimates of versions 1 and 4, each an interval around a HitRate@10 in [0, 1];
    # or, when the noise left the count of 20 queries below one, none: NaN in [0, 1]
    estimates = {e["model_version"]: e["hr"] for e in status["estimates"]}
    assert sorted(estimates) == [1, 4]
    assert all(0 <= e["low"] <= e["value"] <= e["high"] <= 1
               or (math.isnan(e["value"]) and (e["low"], e["high"]) == (0, 1))
               for e in estimates.values())
    # /metrics showed version 1's, as status has it
    shown = dict(re.findall(r'bound="(\w+)",metric="hr10",model_version="1"\} (\S+)',
                            (work / "hr10.txt").read_text()))
    assert float(shown["estimate"]) == pytest.approx(estimates[1]["value"], nan_ok=True)
    assert float(shown["low"]) == pytest.approx(estimates[1]["low"])
    assert "federated evaluation" in output
    ranked = RANKED.findall(output)
    assert [int(rank) for rank, _ in ranked] == [1, 2, 3, 4, 5], output[-4000:]
    assert "20725" not in [item for _, item in ranked]  # the cart is not recommended
