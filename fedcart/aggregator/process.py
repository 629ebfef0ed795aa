"""`fedcart-aggregator serve` as a child process: what the simulation, the round benchmark
and the service tests start, so that they run the real service, not an in-process copy.

The port comes from the service's own "serving on" log line (it binds port 0); the log is
kept (and copied to a file when given), since the service reports its peak memory there.

Every instance is listed in a module registry (``running()``) until it is reaped, so that
whoever started it (a test fixture, a Ctrl-C handler) can end it rather than leave it
serving. The child leads its own process group, and ending it kills that whole group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["AGGREGATOR", "AggregatorProcess", "running"]

AGGREGATOR = [sys.executable, "-m", "fedcart.aggregator.cli"]
_PROJECT = Path(__file__).resolve().parent.parent
TAIL_LINES = 20  # how much of the log an error message quotes, at most
_PUMP_DRAIN_SECONDS = 5.0  # how long an exited service's last log lines may take to arrive

_running: set[AggregatorProcess] = set()


def running() -> list[AggregatorProcess]:
    """The instances started and not yet reaped (by ``wait``, ``terminate`` or ``kill``)."""
    return list(_running)


class AggregatorProcess:
    """Start ``serve`` on ``state`` with any free port and wait until it listens."""

    def __init__(self, state: Path, *extra: str, log_file: Path | None = None,
                 start_timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [*AGGREGATOR, "serve", "--state", str(state), "--port", "0", *extra],
            stderr=subprocess.PIPE, text=True, cwd=_PROJECT,
            start_new_session=True)  # Ctrl-C goes to the parent, which stops it cleanly
        _running.add(self)
        self.lines: list[str] = []
        self.log_file = log_file
        self._log: IO[str] | None = open(log_file, "a") if log_file else None  # noqa: SIM115
        listening = threading.Event()
        self._pump = threading.Thread(target=self._read_log, args=(listening,), daemon=True)
        self._pump.start()
        try:
            said = listening.wait(start_timeout)
        except BaseException:  # Ctrl-C while it starts: it must not outlive us
            self.kill()
            raise
        match = re.search(r"serving on (wss?)://\S+:(\d+) ", self.log())
        if match is None:
            raise RuntimeError(self._not_started(said, start_timeout))
        self.port = int(match.group(2))
        self.url = f"{match.group(1)}://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> AggregatorProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        """Leaving the block ends the service if it still runs."""
        self.kill()

    def _not_started(self, said: bool, timeout: float) -> str:
        """End a service that is not serving; why, briefly. ``said``: its log ended or
        said "serving on" (unreadably), rather than the wait timing out."""
        if said:  # most likely its log ended as it exits: let it, for its own exit status
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(_PUMP_DRAIN_SECONDS)
        if self.kill():
            return self._failure(f"did not say it was serving within {timeout:g} s, "
                                 "and was killed")
        return self._failure(f"exited with status {self.proc.returncode} before serving")

    def _read_log(self, listening: threading.Event) -> None:
        """Keep (and copy) each log line; signal the "serving on" line or an early exit."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            if "serving on" in line:
                listening.set()
        listening.set()  # exited before listening: the caller's check reports it

    def http(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def wait(self, timeout: float | None = 60) -> int:
        """The exit code. If the service has not stopped in time (or Ctrl-C interrupts the
        wait) its process group is killed; on a timeout a RuntimeError says so, briefly."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(self._failure(
                f"did not stop within {timeout:g} s, and was killed")) from None
        except BaseException:
            self.kill()
            raise
        self._reaped()
        return code

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop, as an operator would) and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def kill(self) -> bool:
        """SIGKILL the process group and reap it; whether the service was still running."""
        # until the leader is reaped its pid, the group's id, cannot name another group
        unreaped = self.proc.returncode is None
        was_running = self.proc.poll() is None
        if unreaped:
            with contextlib.suppress(ProcessLookupError):  # the group has already gone
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reaped()
        return was_running

    def _reaped(self) -> None:
        """After the exit: take the last log lines, close the copy, leave the registry."""
        self._pump.join(_PUMP_DRAIN_SECONDS)
        if self._log is not None and not self._pump.is_alive():
            self._log.close()
        _running.discard(self)

    def _failure(self, what: str) -> str:
        """A short account of a failure: what happened, the pid, and where the log is (or
        its last lines), never the whole log (tens of thousands of lines on a long run)."""
        head = f"the aggregator (pid {self.proc.pid}) {what}"
        if self.log_file is not None:
            return f"{head}; its log: {self.log_file}"
        tail = "".join(self.lines[-TAIL_LINES:]).rstrip("\n")
        return f"{head}; the end of its log:\n{tail}"

    def log(self) -> str:
        return "".join(self.lines)

    def peak_memory_mb(self) -> float | None:
        """The peak resident memory the service logged when it stopped."""
        found = re.search(r"peak resident memory ([\d.]+) MB", self.log())
        return None if found is None else float(found.group(1))
