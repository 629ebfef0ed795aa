"""The processes the test suite starts, and the check that none of them outlives it.

A test starts its subprocesses through a ProcessOwner (the ``processes`` fixture in
conftest.py): each leads its own process group, so that ending it ends whatever it started
too. At the test's teardown the owner SIGKILLs every group still alive, and every
AggregatorProcess the test left running, and names them. Each group is also recorded for
the session (``SESSION``): at its end ``left_running`` names any still alive, and any
aggregator still serving a state under the session's tmp dir, however it was started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcart.aggregator.process import running

END_TIMEOUT = 10.0  # seconds a SIGKILLed group may take to be gone


@dataclass(frozen=True)
class Started:
    """A process the suite started (or found): its pid, its process group, its command."""

    pid: int
    group: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} (group {self.group}): {self.command}"


SESSION: list[Started] = []  # every group any owner started during this session


def _describe(args: Sequence[str | os.PathLike[str]]) -> str:
    """A command line on one short line (inline scripts can be long and multi-line): its
    start and its end, where an aggregator's --state is."""
    line = " ".join(" ".join(map(str, args)).split())
    return line if len(line) <= 160 else f"{line[:80]} ... {line[-75:]}"


def _stat(pid: str) -> tuple[str, int] | None:
    """The state letter and process group of ``pid`` from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces
    return fields[0], int(fields[2])


def live_groups() -> dict[int, list[int]]:
    """The live (not zombie) processes on this machine, by process group."""
    groups: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        stat = _stat(entry) if entry.isdigit() else None
        if stat is not None and stat[0] != "Z":
            groups.setdefault(stat[1], []).append(int(entry))
    return groups


def end_group(group: int) -> None:
    """SIGKILL process group ``group`` and wait until none of its processes is alive."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + END_TIMEOUT
    while group in live_groups():
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {group} survived SIGKILL")
        time.sleep(0.05)


def end(process: Started) -> None:
    """End a process left running: its whole group, unless that is the runner's own."""
    if process.group == os.getpgrp():
        os.kill(process.pid, signal.SIGKILL)
    else:
        end_group(process.group)


def _argument(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv``, given as ``--option value`` or ``--option=value``."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def _serves_under(argv: list[str], root: Path) -> bool:
    """Whether ``argv`` is this project's ``serve`` with a --state under ``root``."""
    aggregator = any(a == "fedcart.aggregator.cli" or Path(a).name == "fedcart-aggregator"
                     for a in argv)
    state = _argument(argv, "--state")
    return (aggregator and "serve" in argv and state is not None
            and Path(state).is_relative_to(root))


def stray_aggregators(root: Path) -> list[Started]:
    """Aggregators serving a state directory under ``root``, found by their command lines
    in /proc: what escaped every owner (started by a raw Popen, or in another fixture)."""
    found = []
    for group, pids in live_groups().items():
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # it has just exited
                continue
            argv = cmdline.decode(errors="replace").split("\0")[:-1]
            if _serves_under(argv, root):
                found.append(Started(pid, group, _describe(argv)))
    return found


def left_running(started: Iterable[Started], root: Path | None) -> list[Started]:
    """Which of the ``started`` groups still has a live process, and the aggregators still
    serving a state under ``root`` (when given) that are in none of those groups."""
    groups = live_groups()
    left = [s for s in started if s.group in groups]
    if root is not None:
        known = {s.group for s in left}
        left += [s for s in stray_aggregators(root) if s.group not in known]
    return left


def _release(proc: subprocess.Popen[Any]) -> None:
    """Reap ``proc`` and close its pipes (its group has been ended or has exited)."""
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class ProcessOwner:
    """Owns the processes one test starts, and ends those still alive at its teardown."""

    def __init__(self) -> None:
        self._popens: list[tuple[subprocess.Popen[Any], Started]] = []
        self._aggregators_before = set(running())  # a broader fixture's, not the test's

    def popen(self, args: Sequence[str | os.PathLike[str]],
              **options: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` in a new session (its own process group), recorded."""
        proc: subprocess.Popen[Any] = subprocess.Popen(args, start_new_session=True,
                                                       **options)
        started = Started(proc.pid, proc.pid, _describe(args))
        self._popens.append((proc, started))
        SESSION.append(started)
        return proc

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL the group of ``proc`` (one this owner started) and reap it."""
        if proc.pid in live_groups():
            end_group(proc.pid)
        _release(proc)

    def end(self) -> list[str]:
        """End every process the test started that is still alive: the groups of its
        subprocesses and its AggregatorProcess instances. The ones that were alive."""
        return [*self._end_popens(), *self._end_aggregators()]

    def _end_popens(self) -> list[str]:
        groups = live_groups()
        left = [str(started) for proc, started in self._popens if started.group in groups]
        for proc, _ in self._popens:
            self.kill(proc)
        return left

    def _end_aggregators(self) -> list[str]:
        new = [a for a in running() if a not in self._aggregators_before]
        return [f"aggregator pid {a.proc.pid}: {_describe(a.proc.args)}"
                for a in new if a.kill()]
