"""The console scripts' entry points: each runs its command line, or says in one line which
extra to install when that command needs dependencies this install lacks.

``pip install 'fedcart[device]'`` installs all three scripts but only the device's
dependencies: ``fedcart-aggregator`` and ``fedcart-sim`` then cannot import their command
lines (rich, onnx, pandas...). Rather than a traceback ending in ``No module named 'rich'``,
``--help`` says what the command is and which extra it needs, and any other command exits 1
with ``fedcart-aggregator serve needs the server extra: pip install 'fedcart[server]'``.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from enum import Enum
from importlib.metadata import PackageNotFoundError, requires

__all__ = ["Extra", "aggregator", "device", "extra_modules", "run_script", "sim"]

HELP_OPTIONS = ("-h", "--help")
# a requirement's name, the extras it asks for and the extra its marker names:
# 'onnx>=1.17; extra == "server"', 'fedcart[device]; extra == "server"'
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?"
                          r".*?extra\s*==\s*['\"]([^'\"]+)['\"]")


class Extra(Enum):
    """The optional-dependency sets of pyproject.toml a console script needs."""

    DEVICE = "device"
    SERVER = "server"
    SIM = "sim"


# the dependencies whose module is not named after their distribution
_MODULE_OF = {"pynacl": "nacl"}


def _module_name(distribution: str) -> str:
    """The top-level module a distribution installs: its name with dashes as underscores
    (dp-accounting: dp_accounting), but for those in ``_MODULE_OF``."""
    name = distribution.lower().replace("-", "_").replace(".", "_")
    return _MODULE_OF.get(name, name)


def extra_modules(extra: Extra) -> frozenset[str]:
    """The top-level modules ``extra`` installs, with those of the extras it includes (sim
    includes server, which includes device), from the installed package's metadata; empty
    in a source tree that was never installed."""
    try:
        requirements = requires("fedcart") or []
    except PackageNotFoundError:
        return frozenset()
    modules: dict[str, set[str]] = {}
    includes: dict[str, set[str]] = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:  # a dependency of every install
            continue
        name, asked, owner = match.groups()
        if name.lower() == "fedcart":
            includes.setdefault(owner, set()).update(e.strip() for e in (asked or "").split(","))
        else:
            modules.setdefault(owner, set()).add(_module_name(name))
    found: set[str] = set()
    todo, seen = [extra.value], set[str]()
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            found |= modules.get(current, set())
            todo += includes.get(current, set())
    return frozenset(found)


def _command(argv: list[str]) -> str | None:
    """The subcommand on the command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def run_script(module: str, script: str, extra: Extra, summary: str) -> None:
    """Run ``module``'s click ``main`` as ``script``; if it (or the command it runs) lacks a
    module of ``extra``, say which extra to install: on stdout with exit 0 for ``--help``,
    else on stderr with exit 1. Any other missing module is a bug, and raises."""
    argv = sys.argv[1:]
    try:
        main: Callable[..., object] = importlib.import_module(module).main
        main(prog_name=script)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in extra_modules(extra):
            raise
        install = f"pip install 'fedcart[{extra.value}]'"
        command = _command(argv)
        if command is None and any(word in HELP_OPTIONS for word in argv):
            print(f"Usage: {script} [OPTIONS] COMMAND [ARGS]...\n\n  {summary}\n\n"
                  f"  Its commands need the {extra.value} extra ({missing} is not installed): "
                  f"{install}")
            sys.exit(0)
        print(f"{' '.join(filter(None, (script, command)))} needs the {extra.value} extra: "
              f"{install}", file=sys.stderr)
        sys.exit(1)


def device() -> None:
    """``fedcart-device``: the device runtime from a shell."""
    run_script("fedcart.edge_client.cli", "fedcart-device", Extra.DEVICE,
               "FedCart on the device: offline recommendations from a signed model bundle.")


def aggregator() -> None:
    """``fedcart-aggregator``: the aggregator service."""
    run_script("fedcart.aggregator.cli", "fedcart-aggregator", Extra.SERVER,
               "The FedCart aggregator: runs rounds of secure aggregation and publishes models.")


def sim() -> None:
    """``fedcart-sim``: a federated deployment simulated on real data."""
    run_script("fedcart.simulation.cli", "fedcart-sim", Extra.SIM,
               "FedCart simulations: a deployment of devices and the aggregator on a data set.")
