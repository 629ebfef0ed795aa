"""Shared fixtures: the bundled data sets' splits (loaded once per session), a small
synthetic split for fast unit tests, and the owner of every process a test starts, with
the check at the session's end that none is left running."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedcart.data.datasets import BasketData, load_instacart, load_uci
from fedcart.data.evaluation import Split, make_split
from fedcart.protocol.policy import DevicePolicy
from fedcart.secagg.policy import PERMISSIVE
from tests.process_owner import SESSION, ProcessOwner, end, left_running

_SESSION_TMP = pytest.StashKey[Path]()


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Note the session's tmp dir: at the end, an aggregator still serving a state under it
    was left running by this session, however it was started."""
    request.config.stash[_SESSION_TMP] = tmp_path_factory.getbasetemp()


@pytest.fixture(autouse=True)
def processes(request: pytest.FixtureRequest) -> Iterator[ProcessOwner]:
    """Start a test's subprocesses with ``processes.popen``: at its teardown every one still
    alive (its whole process group), and every AggregatorProcess the test left running, is
    killed. Leaving one is an error of a test that otherwise passed, a warning of one that
    failed (its failure may have stopped it before it stopped them)."""
    owner = ProcessOwner()
    failures = request.session.testsfailed
    yield owner
    left = owner.end()
    if not left:
        return
    message = "the test left running (now killed):\n  " + "\n  ".join(left)
    if request.session.testsfailed == failures:
        pytest.fail(message, pytrace=False)
    warnings.warn(message, stacklevel=1)


@pytest.hookimpl(trylast=True)  # after every fixture's teardown (Ctrl-C defers them to here)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if a process the suite started is still alive, and end it."""
    left = left_running(SESSION, session.config.stash.get(_SESSION_TMP, None))
    if not left:
        return
    writer = session.config.get_terminal_writer()
    writer.line()
    writer.sep("=", "processes the test session left running (now killed)", red=True)
    for process in left:
        writer.line(str(process), red=True)
        try:
            end(process)
        except RuntimeError as error:  # it survived SIGKILL (say, stuck in the kernel)
            writer.line(f"  {error}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:  # never hides an interruption or an error
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def uci_split() -> Split:
    return make_split(load_uci())


@pytest.fixture(scope="session")
def instacart_split() -> Split:
    return make_split(load_instacart())


def synthetic_data(n_users: int = 40, n_items: int = 30, seed: int = 0) -> BasketData:
    """Users who buy from two overlapping 'aisles', so co-occurrence carries signal."""
    rng = np.random.default_rng(seed)
    users = {}
    for u in range(n_users):
        aisle = rng.integers(0, 2)
        pool = np.arange(n_items // 2) + aisle * (n_items // 3)
        baskets = []
        for _ in range(rng.integers(2, 6)):
            size = int(rng.integers(2, 7))
            baskets.append(tuple(sorted(f"i{int(x):03d}" for x in
                                        rng.choice(pool, size, replace=False))))
        users[f"{u:04d}"] = baskets
    names = {f"i{i:03d}": f"item number {i}" for i in range(n_items)}
    return BasketData(name="synthetic", users=users, item_names=names)


@pytest.fixture
def small_split() -> Split:
    return make_split(synthetic_data())


# The policy of the tests' devices, whose cohorts are 3 to 12 devices: a deployed device's
# default refuses cohorts under 20 (secagg.policy).
SMALL_COHORTS = DevicePolicy(secagg=PERMISSIVE)

CSV_OPTS = ["--user-col", "customer", "--item-col", "sku", "--time-col", "day",
            "--name-col", "title"]


def write_basket_csv(path: Path) -> Path:
    """A small retailer's export (60 customers), as a user would give it by path; CSV_OPTS
    name its columns."""
    data = synthetic_data(n_users=60, n_items=30, seed=2)
    lines = ["customer,sku,day,title"]
    for user, baskets in data.users.items():
        for day, basket in enumerate(baskets):
            lines += [f"{user},{item},2024-03-{day + 1:02d},{data.name_of(item)}"
                      for item in basket]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def basket_csv(tmp_path: Path) -> Path:
    return write_basket_csv(tmp_path / "shop.csv")
