"""`fedcart-aggregator serve` as a child process: what the simulation, the round benchmark
and the service tests start, so that they run the real service, not an in-process copy.

The port comes from the service's own "serving on" log line (it binds port 0); the log is
kept (and copied to a file when given), since the service reports its peak memory there.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import IO

__all__ = ["AGGREGATOR", "AggregatorProcess"]

AGGREGATOR = [sys.executable, "-m", "aggregator.cli"]
_PROJECT = Path(__file__).resolve().parent.parent


class AggregatorProcess:
    """Start ``serve`` on ``state`` with any free port and wait until it listens."""

    def __init__(self, state: Path, *extra: str, log_file: Path | None = None,
                 start_timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [*AGGREGATOR, "serve", "--state", str(state), "--port", "0", *extra],
            stderr=subprocess.PIPE, text=True, cwd=_PROJECT,
            start_new_session=True)  # Ctrl-C goes to the parent, which stops it cleanly
        self.lines: list[str] = []
        self._log: IO[str] | None = open(log_file, "a") if log_file else None  # noqa: SIM115
        listening = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if self._log is not None:
                    self._log.write(line)
                    self._log.flush()
                if "serving on" in line:
                    listening.set()
            listening.set()  # exited before listening: the check below reports it

        threading.Thread(target=pump, daemon=True).start()
        listening.wait(start_timeout)
        match = re.search(r"serving on (wss?)://\S+:(\d+) ", self.log())
        if match is None:
            self.proc.kill()
            raise RuntimeError("the aggregator did not start:\n" + self.log())
        self.port = int(match.group(2))
        self.url = f"{match.group(1)}://127.0.0.1:{self.port}/ws"

    def http(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read().decode()

    def wait(self, timeout: float | None = 60) -> int:
        """The exit code; kills the process and raises if it has not stopped in time."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("the aggregator did not stop:\n" + self.log()) from None
        if self._log is not None:
            self._log.close()
        return code

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop, as an operator would) and wait."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def log(self) -> str:
        return "".join(self.lines)

    def peak_memory_mb(self) -> float | None:
        """The peak resident memory the service logged when it stopped."""
        found = re.search(r"peak resident memory ([\d.]+) MB", self.log())
        return None if found is None else float(found.group(1))
