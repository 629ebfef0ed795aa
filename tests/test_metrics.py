"""The aggregator's /metrics, read as a scraper reads it (a raw HTTP GET, headers and all):
one Content-Type, the format the scraper asks for, the FedCart version, the process and
platform collectors, and each round's duration by task and outcome."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import fedcart
from fedcart.aggregator.process import AggregatorProcess
from tests.test_service import CONFIG, make_world

OPENMETRICS = "application/openmetrics-text"


def raw_get(port: int, path: str, accept: str | None = None) -> tuple[list[tuple[str, str]],
                                                                       str]:
    """GET ``path`` over a plain socket: the response's headers as sent (name, value), in
    order and with repeats (urllib would merge them), and its body."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if accept is not None:
        request += f"Accept: {accept}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall((request + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    assert status.startswith("HTTP/1.1 200"), status
    headers = [(name.strip().lower(), value.strip())
               for name, _, value in (line.partition(":") for line in lines)]
    return headers, body


def sample(body: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` (in any order), or None."""
    for line in body.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


def test_metrics_send_one_content_type_the_version_the_process_and_round_durations(
        tmp_path: Path) -> None:
    state, devices = make_world(tmp_path, n_users=4)
    state.config.write_text(CONFIG.format(statistics="false", timeout=10.0, rounds=0))
    with AggregatorProcess(state.root) as server:
        async def one_round() -> list:
            return await asyncio.gather(*(d.participate(server.url, rounds=1, timeout=120)
                                          for d in devices))

        reports = asyncio.run(one_round())
        assert all([r.status for r in rs] == ["completed"] for rs in reports), reports
        headers, body = raw_get(server.port, "/metrics")
        negotiated, open_body = raw_get(server.port, "/metrics", accept=OPENMETRICS)
        assert server.terminate() == 0, server.log()

    types = [value for name, value in headers if name == "content-type"]
    assert len(types) == 1 and types[0].startswith("text/plain; version="), headers
    assert sample(body, "fedcart_build_info", version=fedcart.__version__) == 1.0
    assert (sample(body, "process_cpu_seconds_total") or 0) > 0  # the process collector
    assert (sample(body, "process_resident_memory_bytes") or 0) > 0
    assert any(line.startswith("python_info{") for line in body.splitlines())  # platform
    # the one round ran: one observation of its duration, within the round's bounds
    assert sample(body, "fedcart_round_duration_seconds_count", task="train",
                  status="completed") == 1.0
    seconds = sample(body, "fedcart_round_duration_seconds_sum", task="train",
                     status="completed")
    assert seconds is not None and 0 < seconds < 120

    open_types = [value for name, value in negotiated if name == "content-type"]
    assert len(open_types) == 1 and open_types[0].startswith(OPENMETRICS), negotiated
    assert open_body.rstrip().endswith("# EOF")  # OpenMetrics' terminator
