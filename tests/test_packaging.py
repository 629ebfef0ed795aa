"""What `pip install 'fedcart[device]'` gives an app's developer: a wheel that holds the
fedcart package only (no data sets a device never reads), and in a fresh venv the device's
dependencies only, with every console script it installs running: the device's own, and the
aggregator's and the simulation's saying in one line which extra they need.

The slow tests build the wheel (pip fetches the build backend) and install its dependencies
from the package index: about 30 s."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fedcart._entry import Extra, extra_modules, run_script
from fedcart.aggregator.statedir import init_state

PROJECT = Path(__file__).parent.parent
VERSION = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]
# what the server and sim extras add, none of which a device install may hold
NOT_ON_A_DEVICE = {"onnx", "pandas", "scipy", "matplotlib", "dp-accounting", "opendp", "rich",
                   "prometheus-client", "tomlkit"}
DEVICE_NEEDS = {"numpy", "onnxruntime", "websockets", "pynacl", "cryptography", "click"}
INSTALL_TIMEOUT = 600


def test_each_extra_maps_to_the_modules_it_installs() -> None:
    """From the installed metadata; this dev install holds every extra, so a distribution
    whose module is named otherwise (pynacl: nacl) and not mapped shows here."""
    device, server, sim = (extra_modules(extra) for extra in Extra)
    assert device == {"numpy", "onnxruntime", "websockets", "nacl", "cryptography", "click"}
    assert device < server < sim and {"onnx", "pandas", "rich"} <= server - device
    assert {"matplotlib"} <= sim - server
    assert [m for m in sim if importlib.util.find_spec(m) is None] == []


def test_a_command_without_its_extra_says_which_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A command line whose import lacks rich (a server module) as if installed without the
    server extra; one that lacks a module of no extra is a bug, and raises."""
    (tmp_path / "lacks_rich.py").write_text("raise ModuleNotFoundError(name='rich')\n")
    (tmp_path / "lacks_other.py").write_text("raise ModuleNotFoundError(name='nosuch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["fedcart-aggregator", "ledger", "--state", "x"])
    with pytest.raises(SystemExit) as exited:
        run_script("lacks_rich", "fedcart-aggregator", Extra.SERVER, "The aggregator.")
    assert exited.value.code == 1
    assert capsys.readouterr() == ("", "fedcart-aggregator ledger needs the server extra: "
                                       "pip install 'fedcart[server]'\n")
    monkeypatch.setattr(sys, "argv", ["fedcart-aggregator", "--help"])
    with pytest.raises(SystemExit) as exited:
        run_script("lacks_rich", "fedcart-aggregator", Extra.SERVER, "The aggregator.")
    shown = capsys.readouterr().out
    assert exited.value.code == 0 and shown.startswith("Usage: fedcart-aggregator ")
    assert "(rich is not installed): pip install 'fedcart[server]'" in shown
    with pytest.raises(ModuleNotFoundError):
        run_script("lacks_other", "fedcart-aggregator", Extra.SERVER, "The aggregator.")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of its sources (a build in the checkout
    would leave build/ behind, whose stale files a later build packs)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source / name)
    shutil.copytree(PROJECT / "fedcart", source / "fedcart",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(out), str(source)], capture_output=True, text=True,
                           timeout=INSTALL_TIMEOUT)
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("fedcart-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_holds_the_fedcart_package_and_no_data_set(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fedcart", f"fedcart-{VERSION}.dist-info"}
    assert "fedcart/edge_client/__init__.py" in names and "fedcart/_entry.py" in names
    assert [name for name in names if name.endswith((".csv", ".csv.gz", ".zip"))] == []
    assert wheel.stat().st_size < 1 << 20  # the data sets alone are 8.9 MB


def _in_venv(venv: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], capture_output=True,
                          text=True, timeout=120, cwd=venv)


@pytest.mark.slow
def test_the_device_extra_installs_a_device_and_commands_that_run(wheel: Path,
                                                                  tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                                f"{wheel}[device]"], capture_output=True, text=True,
                               timeout=INSTALL_TIMEOUT)
    assert installed.returncode == 0, installed.stderr
    listed = _in_venv(venv, "python", "-m", "pip", "list", "--format=json")
    packages = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert packages >= DEVICE_NEEDS and not NOT_ON_A_DEVICE & packages, packages

    device_help = _in_venv(venv, "fedcart-device", "--help")
    assert device_help.returncode == 0 and "bundle" in device_help.stdout, device_help.stderr
    version = _in_venv(venv, "fedcart-device", "--version")
    assert (version.returncode, version.stdout) == (0, f"fedcart-device, version {VERSION}\n")
    for script, extra in (("fedcart-aggregator", "server"), ("fedcart-sim", "sim")):
        shown = _in_venv(venv, script, "--help")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"Usage: {script} ")
        assert f"pip install 'fedcart[{extra}]'" in shown.stdout
    serve = _in_venv(venv, "fedcart-aggregator", "serve", "--state", "x")
    assert (serve.returncode, serve.stdout) == (1, "")
    assert serve.stderr == ("fedcart-aggregator serve needs the server extra: "
                            "pip install 'fedcart[server]'\n")
    sim = _in_venv(venv, "fedcart-sim", "run", "--data", "uci")
    assert (sim.returncode, sim.stderr) == (1, "fedcart-sim run needs the sim extra: "
                                               "pip install 'fedcart[sim]'\n")

    # and the device's commands do their work there: verify, recommend, pack
    items = [f"sku{i:02d}" for i in range(25)]
    state = init_state(tmp_path / "agg", items, items, dim=4, seed=0)
    public = str(state.key.with_suffix(".pub"))
    bundle = str(state.bundles / "v00000000")
    recommended = _in_venv(venv, "fedcart-device", "recommend", "--bundle", bundle,
                       "--public-key", public, "--cart", "sku01,sku02", "--k", "3")
    assert recommended.returncode == 0, recommended.stderr
    assert len(recommended.stdout.splitlines()) == 3
    packed = _in_venv(venv, "fedcart-device", "bundle", "pack", bundle, str(tmp_path / "m.zip"),
                  "--public-key", public)
    assert packed.returncode == 0, packed.stderr
    assert (tmp_path / "m.zip").stat().st_size > 0
