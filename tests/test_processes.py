"""The suite leaves nothing running: a test's process owner ends the whole process group of
whatever the test left alive, and names it; the check at the session's end names a process
still alive and nothing that is gone. An aggregator that will not stop is killed with a
short message, not its whole log, and so is one interrupted by Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedcart.aggregator.process import TAIL_LINES, AggregatorProcess, running
from fedcart.aggregator.statedir import StateDir, init_state
from fedcart.data.evaluation import make_split
from tests.conftest import synthetic_data
from tests.process_owner import ProcessOwner, Started, left_running, live_groups

SLEEP = [sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(60)"]


def _ready(proc: subprocess.Popen[str]) -> None:
    """Wait for ``proc``'s "ready": by then it runs its own command line, not its parent's."""
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"


def _state(tmp_path: Path) -> StateDir:
    split = make_split(synthetic_data(n_users=10, n_items=30, seed=11))
    return init_state(tmp_path / "agg", list(split.catalog), list(split.catalog), dim=8,
                      seed=0)


def test_the_owner_ends_the_whole_group_of_what_was_left_and_names_it() -> None:
    owner = ProcessOwner()
    shell = owner.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                        text=True)
    assert shell.stdout is not None
    child = int(shell.stdout.readline())
    assert sorted(live_groups()[shell.pid]) == sorted([shell.pid, child])
    left = owner.end()
    assert len(left) == 1 and left[0].startswith(f"pid {shell.pid} "), left
    assert shell.returncode == -signal.SIGKILL
    assert shell.pid not in live_groups()  # the child it started is gone too
    assert owner.end() == []


def test_the_owner_names_nothing_that_exited() -> None:
    owner = ProcessOwner()
    assert owner.popen(["true"]).wait() == 0
    assert owner.end() == []


def test_the_session_check_names_a_live_process_and_not_a_dead_one() -> None:
    owner = ProcessOwner()
    proc = owner.popen(SLEEP, stdout=subprocess.PIPE, text=True)
    _ready(proc)
    sleeper = Started(proc.pid, proc.pid, "a sleeper")
    assert left_running([sleeper], None) == [sleeper]
    owner.kill(proc)
    assert left_running([sleeper], None) == []


def test_the_session_check_finds_an_aggregator_serving_under_its_tmp_dir(
        tmp_path: Path) -> None:
    owner = ProcessOwner()  # a stand-in with an aggregator's command line
    fake = owner.popen([*SLEEP, "fedcart.aggregator.cli", "serve", "--state",
                        str(tmp_path / "agg")], stdout=subprocess.PIPE, text=True)
    _ready(fake)
    assert [s.pid for s in left_running([], tmp_path)] == [fake.pid]
    assert left_running([], tmp_path / "another") == []
    owner.end()
    assert left_running([], tmp_path) == []


def test_the_owner_ends_the_aggregators_its_test_started_and_no_other(
        tmp_path: Path) -> None:
    older = AggregatorProcess(_state(tmp_path / "a").root)  # as a broader fixture's would be
    owner = ProcessOwner()
    left_behind = AggregatorProcess(_state(tmp_path / "b").root)
    left = owner.end()
    assert len(left) == 1 and left[0].startswith(f"aggregator pid {left_behind.proc.pid}:")
    assert left_behind.proc.returncode == -signal.SIGKILL and left_behind not in running()
    assert older.proc.poll() is None and older in running()
    assert older.kill() and older not in running()


def test_an_aggregator_that_does_not_stop_is_killed_with_a_short_message(
        tmp_path: Path) -> None:
    state = _state(tmp_path)
    server = AggregatorProcess(state.root)
    server.lines += [f"round {i}: a long run's log line\n" for i in range(1000)]
    with pytest.raises(RuntimeError) as raised:
        server.wait(0.5)
    message = str(raised.value)
    assert message.startswith(f"the aggregator (pid {server.proc.pid}) did not stop")
    assert len(message.splitlines()) == 1 + TAIL_LINES and "round 999:" in message
    assert "round 979:" not in message
    assert server.proc.returncode == -signal.SIGKILL and server not in running()

    logged = AggregatorProcess(state.root, log_file=tmp_path / "aggregator.log")
    with pytest.raises(RuntimeError) as raised:
        logged.terminate(timeout=0)  # SIGTERM, and no time to act on it
    assert str(raised.value) == (f"the aggregator (pid {logged.proc.pid}) did not stop "
                                 f"within 0 s, and was killed; its log: "
                                 f"{tmp_path / 'aggregator.log'}")
    assert "serving on" in (tmp_path / "aggregator.log").read_text()


def test_ctrl_c_while_waiting_for_an_aggregator_kills_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = AggregatorProcess(_state(tmp_path).root)

    def interrupted(timeout: float | None = None) -> int:
        monkeypatch.undo()  # Ctrl-C interrupts this one wait; the kill's own is the real one
        raise KeyboardInterrupt

    monkeypatch.setattr(server.proc, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.wait(60)
    assert server.proc.returncode == -signal.SIGKILL and server not in running()


def test_an_aggregator_that_cannot_start_says_why_briefly(tmp_path: Path) -> None:
    before = running()
    with pytest.raises(RuntimeError, match=r"exited with status 1 before serving; "
                       r"the end of its log:\nError: .* is not an initialised state"):
        AggregatorProcess(tmp_path / "missing")
    assert running() == before
