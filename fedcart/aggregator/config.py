"""The aggregator's configuration: a TOML file with commented defaults, read with the
standard library's tomllib and checked into a typed, frozen value."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedcart.aggregator.privacy import check_accountable
from fedcart.model_export.item_item import StatisticsSettings
from fedcart.model_export.model import TENSOR_NAMES, trained_groups

__all__ = ["DEFAULT_TOML", "AggregatorConfig", "ConfigError", "load_config", "render_config"]


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or holds a bad value."""


DEFAULT_TOML = '''\
# FedCart aggregator configuration. Every key is optional; these are the defaults.

[server]
host = "127.0.0.1"      # listen address; a public address needs tls_cert and tls_key
port = 8765
tls_cert = ""           # PEM certificate: serve wss:// instead of ws://
tls_key = ""

[round]
sampling_rate = 0.5     # q: each connected, enrolled device joins a round with probability q
min_clients = 3         # a round with fewer sampled devices is skipped (and costs no privacy)
min_connected = 0       # a round waits (up to population_wait) for this many checked-in devices
population_wait = 60.0  # seconds a round waits for min_connected before it goes ahead
population_share = 0.9  # a statistics round over every device starts only with this share in
group_size = 250        # a larger cohort splits into groups, each its own SecAgg+ round
expected_dropout = 0.1  # share of a group's devices expected to drop out of a round
corrupt_fraction = 0.0  # share of devices that may collude with the server
failure_bound = 1e-6    # k and t keep P[a group fails] at expected_dropout below this
secagg_degree = 0       # k: 0 chooses k and t per group (above); > 0 fixes k, t = k/2+1
phase_timeout = 30.0    # seconds a protocol phase waits before going on without stragglers
round_interval = 0.0    # seconds between rounds
max_rounds = 0          # stop after this many completed rounds (0: until told to stop)

[training]              # what devices do locally each round
local_epochs = 1
examples_per_round = 8  # leave-one-out examples of its newest basket a device trains on
lr_embeddings = 5.0
lr_bias = 1.0
lr_blend = 0.05
batch_size = 64
train_groups = ["e_in","e_out","bias","blend"]  # what rounds train and devices upload

[statistics]            # before training: secure sums of the devices' basket statistics
enabled = true          # a popularity round, then a co-occurrence round over the head items
sampling_rate = 1.0     # q of these two rounds
head_items = 2000       # M: co-occurrence over the M most popular items (M(M+1)/2 values)
popularity_clip = 5.0   # C of a device's popularity vector
cooccurrence_clip = 32.0  # C of a device's co-occurrence vector
neighbours = 100        # K: neighbours per item in the bundle's item-item table
ease_lambda = 0.5       # EASE ridge (exact sums), times the mean diagonal
threshold = 2.5         # noised co-occurrences below threshold * noise std are dropped
popularity_weight = 0.01  # bias = this * log(1 + popularity)
popularity_noise_ratio = 4.0  # noise multiplier of the popularity round / co-occurrence's
name_weight = 0.3       # of the neighbours by item name (0: none); names are public

[privacy]
mechanism = "gaussian"  # "gaussian", "laplace" (pure epsilon, L1 clip) or "none"
clip_norm = 1.0         # C: each device clips its update to this norm
noise_multiplier = 1.0  # z: noise std (or Laplace scale) = z * C; see target_epsilon
target_epsilon = 0.0    # > 0: calibrate z so that planned_rounds rounds spend this epsilon
planned_rounds = 100
delta = 1e-5
budget_epsilon = 10.0   # rounds that would spend more are refused
weight_cap = 8.0        # a device's weight is min(examples / weight_cap, 1)
population = 0          # N for the fixed denominator q*N (0: the number enrolled)
training_noise_ratio = 1.0  # noise multiplier of training rounds / co-occurrence's

[optimizer]
name = "fedavg"         # "fedavg" or "fedadam"
lr = 1.0
'''


@dataclass(frozen=True)
class AggregatorConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    tls_cert: str = ""
    tls_key: str = ""
    sampling_rate: float = 0.5
    min_clients: int = 3
    min_connected: int = 0
    population_wait: float = 60.0
    # the share of enrolled devices a statistics round over the whole population (sampling
    # rate 1) needs checked in: it does not start without them
    population_share: float = 0.9
    group_size: int = 250
    expected_dropout: float = 0.1
    corrupt_fraction: float = 0.0
    failure_bound: float = 1e-6
    secagg_degree: int = 0
    phase_timeout: float = 30.0
    round_interval: float = 0.0
    max_rounds: int = 0
    local_epochs: int = 1
    examples_per_round: int = 8
    lr_embeddings: float = 5.0
    lr_bias: float = 1.0
    lr_blend: float = 0.05
    batch_size: int = 64
    train_groups: tuple[str, ...] = TENSOR_NAMES
    # None: no statistics rounds
    statistics: StatisticsSettings | None = field(default_factory=StatisticsSettings)
    mechanism: str = "gaussian"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0
    planned_rounds: int = 100
    delta: float = 1e-5
    budget_epsilon: float = 10.0
    weight_cap: float = 8.0
    population: int = 0
    training_noise_ratio: float = 1.0
    optimizer: str = "fedavg"
    optimizer_lr: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (0 < self.sampling_rate <= 1, "round.sampling_rate must lie in (0, 1]"),
            (self.min_clients >= 2, "round.min_clients must be at least 2"),
            (self.min_connected >= 0, "round.min_connected must not be negative"),
            (self.secagg_degree == 0 or self.secagg_degree >= 2,
             "round.secagg_degree must be 0 (chosen per group) or at least 2"),
            (self.group_size >= 2 * self.min_clients,
             "round.group_size must be at least twice round.min_clients: a cohort split "
             "into groups then gives each group at least min_clients devices"),
            (0 <= self.expected_dropout < 1 and 0 <= self.corrupt_fraction < 1
             and self.expected_dropout + self.corrupt_fraction < 1,
             "round.expected_dropout and round.corrupt_fraction must lie in [0, 1) with a "
             "sum below 1"),
            (0 < self.failure_bound < 1, "round.failure_bound must lie in (0, 1)"),
            (self.phase_timeout > 0, "round.phase_timeout must be positive"),
            (self.population_wait >= 0, "round.population_wait must not be negative"),
            (0 <= self.population_share <= 1, "round.population_share must lie in [0, 1]"),
            (self.mechanism in ("gaussian", "laplace", "none"),
             "privacy.mechanism must be gaussian, laplace or none"),
            (self.clip_norm > 0, "privacy.clip_norm must be positive"),
            (self.noise_multiplier > 0, "privacy.noise_multiplier must be positive"),
            (0 < self.delta < 1, "privacy.delta must lie in (0, 1)"),
            (self.population == 0 or self.delta * self.population <= 0.01,
             "privacy.delta must be well under 1 / privacy.population: N * delta is the "
             "chance that the guarantee fails for some user (docs/security.md)"),
            (self.optimizer in ("fedavg", "fedadam"), "optimizer.name must be fedavg or fedadam"),
            (bool(self.tls_cert) == bool(self.tls_key), "give both tls_cert and tls_key"),
            (self.examples_per_round >= 1, "training.examples_per_round must be at least 1"),
            (self.training_noise_ratio > 0, "privacy.training_noise_ratio must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            trained_groups(self.train_groups)
        except ValueError as exc:
            raise ConfigError(f"training.train_groups: {exc}") from exc
        if self.mechanism != "none":
            rates = {self.sampling_rate} | ({self.statistics.sampling_rate}
                                            if self.statistics is not None else set())
            for rate in sorted(rates):
                try:
                    check_accountable(self.mechanism, rate, self.target_epsilon, self.delta)
                except ValueError as exc:
                    raise ConfigError(f"[privacy]: {exc}") from exc

    @property
    def learning_rates(self) -> tuple[float, float, float, float]:
        return (self.lr_embeddings, self.lr_embeddings, self.lr_bias, self.lr_blend)


_SECTIONS = {"server", "round", "training", "statistics", "privacy", "optimizer"}
_RENAMED = {("optimizer", "name"): "optimizer", ("optimizer", "lr"): "optimizer_lr"}
STATISTICS = "statistics"  # its keys are StatisticsSettings' fields, and "enabled"


def _checked(path: Path, where: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (an int may stand for a float, a TOML array of
    strings for a tuple), or ConfigError."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list) and all(isinstance(v, str)
                                                             for v in value):
        value = tuple(value)
    if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
        raise ConfigError(f"{path}: {where} must be {expected.__name__}, got {value!r}")
    return value


def _statistics(path: Path, body: dict[str, Any]) -> StatisticsSettings | None:
    defaults = StatisticsSettings()
    values = {}
    for key, value in body.items():
        if key != "enabled" and key not in {f.name for f in fields(StatisticsSettings)}:
            raise ConfigError(f"{path}: unknown key statistics.{key}")
        values[key] = _checked(path, f"statistics.{key}", value,
                               True if key == "enabled" else getattr(defaults, key))
    if not values.pop("enabled", True):
        return None
    try:
        return StatisticsSettings(**values)
    except ValueError as exc:
        raise ConfigError(f"{path}: [statistics]: {exc}") from exc


def load_config(path: Path) -> AggregatorConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    known = {f.name for f in fields(AggregatorConfig)} - {STATISTICS}
    values: dict[str, Any] = {}
    for section, body in raw.items():
        if section not in _SECTIONS or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        if section == STATISTICS:
            values[STATISTICS] = _statistics(path, body)
            continue
        for key, value in body.items():
            name = _RENAMED.get((section, key), key)
            if name not in known:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            values[name] = _checked(path, f"{section}.{key}", value,
                                    getattr(AggregatorConfig, name))
    return AggregatorConfig(**values)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):  # no spaces: render_config reads a value as one word
        return "[" + ",".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):  # a TOML basic string: escape quote, backslash, controls
        return '"' + "".join(
            f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
            for c in value) + '"'
    return repr(value)


def _value_of(config: AggregatorConfig, section: str, key: str) -> object:
    if section == STATISTICS:
        if key == "enabled":
            return config.statistics is not None
        return getattr(config.statistics or StatisticsSettings(), key)
    return getattr(config, _RENAMED.get((section, key), key))


def render_config(config: AggregatorConfig) -> str:
    """``config`` as a TOML file: DEFAULT_TOML with each value replaced, comments kept."""
    lines, section = [], ""
    for line in DEFAULT_TOML.splitlines():
        header = re.match(r"\[(\w+)\]", line)
        entry = re.match(r"(\w+)(\s*=\s*)(\S+)(\s*#.*)?$", line)
        if header:
            section = header.group(1)
        elif entry:
            key = entry.group(1)
            value = _toml_value(_value_of(config, section, key))
            line = f"{key}{entry.group(2)}{value}{entry.group(4) or ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"
