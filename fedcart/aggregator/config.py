"""The aggregator's configuration: a TOML file read with the standard library's tomllib and
checked into a typed, frozen value.

:class:`AggregatorConfig` is the one place each setting is defined: its default, its section
and key in config.toml, and the comment the file carries (the field's metadata, a
:class:`Key`). :func:`render_config` writes the file from it with tomlkit; :func:`load_config`
reads it back strictly. :class:`Preset` holds the values tuned on the validation splits, by
privacy regime: ``fedcart-aggregator init`` writes one, and the simulation runs with them.
"""

from __future__ import annotations

import dataclasses
import textwrap
import tomllib
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Final

import tomlkit
from tomlkit.items import Table

from fedcart.aggregator.item_item import StatisticsSettings
from fedcart.aggregator.pacing import FD_MARGIN, Pacing, PacingError
from fedcart.aggregator.privacy import check_accountable
from fedcart.model_export.model import TENSOR_NAMES, learning_rates, trained_groups
from fedcart.secagg.policy import ClientPolicy

__all__ = ["NO_NOISE", "AggregatorConfig", "ConfigError", "Key", "Preset", "Publish", "Section",
           "Tuning", "load_config", "render_config"]

NO_NOISE: Final = "none"  # privacy.mechanism of a deployment without differential privacy
_KEY: Final = "key"  # the metadata entry of an AggregatorConfig field that holds its Key
_WIDTH: Final = 90  # comment lines of config.toml wrap at this width


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or holds a bad value."""


class Section(StrEnum):
    """The tables of config.toml, in the order the file lists them."""

    SERVER = "server"
    ROUND = "round"
    PACING = "pacing"
    TRAINING = "training"
    STATISTICS = "statistics"  # its keys are StatisticsSettings' fields, and "enabled"
    EVALUATION = "evaluation"
    PRIVACY = "privacy"
    OPTIMIZER = "optimizer"


class Publish(StrEnum):
    """Which model versions go to every device that follows the model (a training round's
    cohort always gets the version it trains)."""

    ALWAYS = "always"  # each new version, as it is published
    NOT_WORSE = "not_worse"  # a version once its evaluation estimate is not worse


_SECTION_COMMENTS: Final = {
    Section.PACING: "check-in beyond the connections the server holds: devices told when to "
                    "come back",
    Section.TRAINING: "what devices do locally each round",
    Section.STATISTICS: "before training: secure sums of the devices' basket statistics",
    Section.EVALUATION: "devices score the model on their own newest basket; only the noised "
                        "sum of their scores is seen",
}

# The comments of [statistics]: its defaults are StatisticsSettings' (item_item.py)
_STATISTICS_COMMENTS: Final = {
    "sampling_rate": "q of the two statistics rounds",
    "head_items": "M: co-occurrence over the M most popular items (M(M+1)/2 values per "
                  "device)",
    "popularity_clip": "C of a device's popularity vector",
    "cooccurrence_clip": "C of a device's co-occurrence vector",
    "neighbours": "K: neighbours per item in the bundle's item-item table",
    "ease_lambda": "EASE ridge (exact sums), times the mean diagonal",
    "threshold": "noised co-occurrences below threshold * noise std are dropped",
    "popularity_weight": "bias = this * log(1 + popularity)",
    "popularity_noise_ratio": "noise multiplier of the popularity round / co-occurrence's",
    "name_weight": "weight of the neighbours by item name (0: none); names are public",
}
_ENABLED: Final = "enabled"  # the [statistics] key that turns the statistics rounds off


@dataclass(frozen=True)
class Key:
    """Where a field lives in config.toml, and the comment written above it."""

    section: Section
    comment: str
    name: str = ""  # its key, where that is not the field's name


def _setting(default: Any, section: Section, comment: str, name: str = "") -> Any:
    """A field with its default and its place and comment in config.toml."""
    return field(default=default, metadata={_KEY: Key(section, comment, name)})


@dataclass(frozen=True)
class AggregatorConfig:
    """Every setting of the aggregator service, with its default."""

    host: str = _setting("127.0.0.1", Section.SERVER,
                         "listen address; a public address needs tls_cert and tls_key")
    port: int = _setting(8765, Section.SERVER, "listen port (0: any free port)")
    keep_bundles: int = _setting(5, Section.SERVER, "model versions whose bundles stay on "
                                                    "disk (0: all); older ones are deleted")
    min_download_rate: float = _setting(
        100_000.0, Section.SERVER, "bytes per second: a device that takes in a message (a "
        "bundle) slower, after 10 s of grace, is disconnected: it would hold a send slot and "
        "its round; 0: no limit")
    tls_cert: str = _setting("", Section.SERVER,
                             "PEM certificate: serve wss:// instead of ws://")
    tls_key: str = _setting("", Section.SERVER, "PEM private key of tls_cert")
    sampling_rate: float = _setting(
        0.5, Section.ROUND, "q: each connected, enrolled device joins a round with "
                            "probability q")
    min_clients: int = _setting(
        ClientPolicy.min_participants, Section.ROUND,
        "a round with fewer sampled devices is skipped (and costs no privacy); a device's "
        f"default policy refuses rounds of fewer than {ClientPolicy.min_participants}")
    min_connected: int = _setting(
        0, Section.ROUND, "a round waits (up to population_wait) for this many checked-in "
                          "devices")
    population_wait: float = _setting(
        60.0, Section.ROUND, "seconds a round waits for min_connected before it goes ahead")
    population_share: float = _setting(
        0.9, Section.ROUND, "a statistics round over every device (sampling rate 1) starts "
                            "only with this share of the enrolled devices checked in")
    group_size: int = _setting(
        250, Section.ROUND, "a larger cohort splits into groups, each its own SecAgg+ round")
    expected_dropout: float = _setting(
        0.1, Section.ROUND, "share of a group's devices expected to drop out of a round")
    corrupt_fraction: float = _setting(
        0.0, Section.ROUND, "share of devices that may collude with the server")
    failure_bound: float = _setting(
        1e-6, Section.ROUND, "k and t keep P[a group fails] at expected_dropout below this")
    secagg_degree: int = _setting(
        0, Section.ROUND, "k: 0 chooses k and t per group (above); > 0 fixes k, t = k/2+1")
    phase_timeout: float = _setting(
        30.0, Section.ROUND, "seconds a protocol phase waits before going on without "
                             "stragglers")
    round_interval: float = _setting(0.0, Section.ROUND, "seconds between rounds")
    capacity: int = _setting(0, Section.PACING, "connections held at once (0: the open-file "
                                                f"limit less {FD_MARGIN})")
    pace_rate: float = _setting(100.0, Section.PACING,
                                "check-ins per second that devices sent away return at", "rate")
    min_delay: float = _setting(5.0, Section.PACING,
                                "the shortest time a device is sent away for, seconds")
    lease: float = _setting(600.0, Section.PACING, "seconds a device stays connected while "
                                                   "others wait to check in")
    jitter: float = _setting(10.0, Section.PACING, "the window, seconds, a device returns in")
    max_rounds: int = _setting(
        0, Section.ROUND, "stop after this many completed rounds (0: until told to stop)")
    local_epochs: int = _setting(1, Section.TRAINING,
                                 "passes a device makes over its examples")
    examples_per_round: int = _setting(
        8, Section.TRAINING, "leave-one-out examples of its newest basket a device trains on")
    lr_embeddings: float = _setting(5.0, Section.TRAINING,
                                    "device SGD learning rate of e_in and e_out")
    lr_bias: float = _setting(1.0, Section.TRAINING, "device SGD learning rate of the bias")
    lr_blend: float = _setting(0.05, Section.TRAINING,
                               "device SGD learning rate of the blend weights")
    batch_size: int = _setting(64, Section.TRAINING, "examples per local SGD step")
    train_groups: tuple[str, ...] = _setting(
        ("bias", "blend"), Section.TRAINING, f"what rounds train and devices upload, of "
                                             f"{', '.join(TENSOR_NAMES)}")
    statistics: StatisticsSettings | None = field(
        default_factory=StatisticsSettings,
        metadata={_KEY: Key(Section.STATISTICS, "a popularity round, then a co-occurrence "
                                                "round over the head items (false: none)",
                            _ENABLED)})
    evaluate_every: int = _setting(
        5, Section.EVALUATION, "an evaluation round scores the model after the statistics "
                               "rounds and after every this many training rounds (0: never)",
        "every")
    evaluation_sampling_rate: float = _setting(
        0.0, Section.EVALUATION, "q of evaluation rounds (0: round.sampling_rate, the "
                                 "training rounds' q)", "sampling_rate")
    evaluation_noise_ratio: float = _setting(
        4.0, Section.EVALUATION, "noise multiplier of evaluation rounds / co-occurrence's",
        "noise_ratio")
    publish: Publish = _setting(  # noqa: RUF009 (an enum member: immutable)
        Publish.ALWAYS, Section.EVALUATION,
        '"always": every new version goes to the devices that follow the model; '
        '"not_worse": a version goes to them once its HitRate@10 estimate is at least the '
        "serving version's less tolerance (the first estimated version always does)")
    publish_tolerance: float = _setting(0.0, Section.EVALUATION,
                                        "HitRate@10 a new version may lose and still go out",
                                        "tolerance")
    mechanism: str = _setting(
        "gaussian", Section.PRIVACY, f'"gaussian", "laplace" (pure epsilon, L1 clip) or '
                                     f'"{NO_NOISE}"')
    clip_norm: float = _setting(1.0, Section.PRIVACY,
                                "C: each device clips its update to this norm")
    noise_multiplier: float = _setting(
        1.0, Section.PRIVACY, "z: noise std (or Laplace scale) = z * C; see target_epsilon")
    target_epsilon: float = _setting(
        0.0, Section.PRIVACY, "> 0: calibrate z so that planned_rounds training rounds, "
                              "with the statistics and evaluation rounds, spend this epsilon")
    planned_rounds: int = _setting(100, Section.PRIVACY,
                                   "training rounds target_epsilon is calibrated for")
    delta: float = _setting(1e-5, Section.PRIVACY, "the delta of (epsilon, delta)-DP")
    budget_epsilon: float = _setting(10.0, Section.PRIVACY,
                                     "rounds that would spend more are refused")
    weight_cap: float = _setting(8.0, Section.PRIVACY,
                                 "a device's weight is min(examples / weight_cap, 1)")
    population: int = _setting(0, Section.PRIVACY, "N for the fixed denominator q*N (0: the "
                               "number enrolled; at most pacing.capacity)")
    training_noise_ratio: float = _setting(
        1.0, Section.PRIVACY, "noise multiplier of training rounds / co-occurrence's")
    optimizer: str = _setting("fedavg", Section.OPTIMIZER, '"fedavg" or "fedadam"', "name")
    optimizer_lr: float = _setting(1.0, Section.OPTIMIZER, "server learning rate", "lr")

    def __post_init__(self) -> None:
        checks = [
            (0 < self.sampling_rate <= 1, "round.sampling_rate must lie in (0, 1]"),
            (self.min_clients >= 2, "round.min_clients must be at least 2"),
            (self.keep_bundles >= 0, "server.keep_bundles must not be negative"),
            (self.min_download_rate >= 0, "server.min_download_rate must not be negative"),
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
            (self.mechanism in ("gaussian", "laplace", NO_NOISE),
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
            (self.evaluate_every >= 0, "evaluation.every must not be negative"),
            (0 <= self.evaluation_sampling_rate <= 1,
             "evaluation.sampling_rate must lie in [0, 1]"),
            (self.evaluation_noise_ratio > 0, "evaluation.noise_ratio must be positive"),
            (0 <= self.publish_tolerance <= 1, "evaluation.tolerance must lie in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            self.pacing(open_files=FD_MARGIN + 1)
        except PacingError as exc:
            raise ConfigError(f"[pacing]: {exc}") from exc
        try:
            trained_groups(self.train_groups)
        except ValueError as exc:
            raise ConfigError(f"training.train_groups: {exc}") from exc
        if self.mechanism != NO_NOISE:
            rates = {self.sampling_rate} | ({self.statistics.sampling_rate}
                                            if self.statistics is not None else set()) | (
                {self.evaluation_q} if self.evaluate_every else set())
            for rate in sorted(rates):
                try:
                    check_accountable(self.mechanism, rate, self.target_epsilon, self.delta)
                except ValueError as exc:
                    raise ConfigError(f"[privacy]: {exc}") from exc

    def pacing(self, open_files: int) -> Pacing:
        """The pacing settings for a process that may open ``open_files`` files."""
        return Pacing(self.capacity or max(open_files - FD_MARGIN, 1), self.pace_rate,
                      self.min_delay, self.lease, self.jitter)

    @property
    def evaluation_q(self) -> float:
        """q of the evaluation rounds: their own, or the training rounds'. A deployment
        whose training rounds take every device then evaluates with every device too,
        rather than waiting for cohorts its min_clients refuses."""
        return self.evaluation_sampling_rate or self.sampling_rate

    @property
    def learning_rates(self) -> tuple[float, float, float, float]:
        """The devices' SGD learning rates, one per tensor (model.learning_rates)."""
        return learning_rates(self.lr_embeddings, self.lr_bias, self.lr_blend)


@dataclass(frozen=True)
class Tuning:
    """The values a :class:`Preset` sets: those tuned on the validation splits, where they
    differ from AggregatorConfig's generic defaults. Both regimes share the server optimizer
    (FedAdam at 0.05) and ``dim``, the embedding size of model version 0: 0, since the
    embeddings train in neither (d = 0: no V x d product on the device, no embeddings in
    the bundle)."""

    train_groups: tuple[str, ...]
    head_items: int
    cooccurrence_clip: float
    clip_norm: float
    training_noise_ratio: float
    lr_blend: float = AggregatorConfig.lr_blend
    optimizer: str = "fedadam"
    optimizer_lr: float = 0.05
    dim: int = 0

    def apply(self, config: AggregatorConfig) -> AggregatorConfig:
        """``config`` with these values (the statistics ones only where it has statistics
        rounds)."""
        statistics = (None if config.statistics is None else dataclasses.replace(
            config.statistics, head_items=self.head_items,
            cooccurrence_clip=self.cooccurrence_clip))
        return dataclasses.replace(
            config, train_groups=self.train_groups, clip_norm=self.clip_norm,
            training_noise_ratio=self.training_noise_ratio, lr_blend=self.lr_blend,
            optimizer=self.optimizer, optimizer_lr=self.optimizer_lr, statistics=statistics)


class Preset(Enum):
    """Tuned settings by privacy regime (the validation splits).

    With the item-item table in the model, training the embeddings adds nothing measurable
    on the validation splits (central training, UCI and Instacart), so rounds train the bias
    and blend (V + 4 numbers to upload, not 2 V d). Without DP the table is EASE over a
    large head. Under DP only the blend trains (four numbers, so the noise per coordinate
    barely matters) and the table is the thresholded cosine over a smaller head, whose
    users' vectors are clipped harder."""

    NO_DP = Tuning(train_groups=("bias", "blend"), head_items=2000, cooccurrence_clip=32.0,
                   clip_norm=5.0, training_noise_ratio=1.0)
    DP = Tuning(train_groups=("blend",), head_items=1000, cooccurrence_clip=5.0,
                clip_norm=0.5, training_noise_ratio=4.0)

    @classmethod
    def of(cls, mechanism: str) -> Preset:
        """The preset of a deployment with noise ``mechanism``."""
        return cls.NO_DP if mechanism == NO_NOISE else cls.DP

    def config(self) -> AggregatorConfig:
        """AggregatorConfig's defaults in this regime (no noise for NO_DP, the default
        mechanism for DP) with the preset's values."""
        base = AggregatorConfig(mechanism=NO_NOISE) if self is Preset.NO_DP \
            else AggregatorConfig()
        return self.value.apply(base)


def _key(f: dataclasses.Field[Any]) -> Key:
    key: Key = f.metadata[_KEY]
    return key


def _file_key(f: dataclasses.Field[Any]) -> str:
    return _key(f).name or f.name


def _checked(path: Path, where: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default`` (an int may stand for a float, a TOML array of
    strings for a tuple), or ConfigError."""
    expected = type(default)
    if isinstance(default, StrEnum) and isinstance(value, str):
        try:
            return expected(value)
        except ValueError:
            choices = ", ".join(f'"{c}"' for c in expected)
            raise ConfigError(f"{path}: {where} must be one of {choices}, got {value!r}") \
                from None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is tuple and isinstance(value, list) and all(isinstance(v, str)
                                                             for v in value):
        value = tuple(value)
    if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
        raise ConfigError(f"{path}: {where} must be {expected.__name__}, got {value!r}")
    return value


def _statistics(path: Path, body: dict[str, Any]) -> StatisticsSettings | None:
    defaults = {f.name: f.default for f in fields(StatisticsSettings)} | {_ENABLED: True}
    values = {}
    for key, value in body.items():
        if key not in defaults:
            raise ConfigError(f"{path}: unknown key {Section.STATISTICS}.{key}")
        values[key] = _checked(path, f"{Section.STATISTICS}.{key}", value, defaults[key])
    if not values.pop(_ENABLED, True):
        return None
    try:
        return StatisticsSettings(**values)
    except ValueError as exc:
        raise ConfigError(f"{path}: [{Section.STATISTICS}]: {exc}") from exc


_FIELDS: Final = {(_key(f).section, _file_key(f)): f for f in fields(AggregatorConfig)
                  if _key(f).section is not Section.STATISTICS}


def load_config(path: Path) -> AggregatorConfig:
    """Read config.toml; a missing key takes its default. Raises ConfigError naming the file
    and the key for an unknown section or key, a value of the wrong type, or a value
    AggregatorConfig refuses."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    values: dict[str, Any] = {}
    for name, body in raw.items():
        try:
            section = Section(name)
        except ValueError:
            raise ConfigError(f"{path}: unknown section [{name}]") from None
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: [{name}] must be a table, got {body!r}")
        if section is Section.STATISTICS:
            values["statistics"] = _statistics(path, body)
            continue
        for key, value in body.items():
            f = _FIELDS.get((section, key))
            if f is None:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            values[f.name] = _checked(path, f"{section}.{key}", value, f.default)
    return AggregatorConfig(**values)


def _add(table: Table, key: str, value: Any, comment: str) -> None:
    """``key = value`` with ``comment`` on the lines above it."""
    for line in textwrap.wrap(comment, _WIDTH - 2):
        table.add(tomlkit.comment(line))
    if isinstance(value, StrEnum):
        value = value.value
    table.add(key, list(value) if isinstance(value, tuple) else value)


def render_config(config: AggregatorConfig) -> str:
    """``config`` as config.toml: every key, each with its comment, in Section order.
    ``load_config`` reads the text back to ``config``."""
    document = tomlkit.document()
    document.add(tomlkit.comment("FedCart aggregator configuration. Every key is optional: "
                                 "a key left out takes its default."))
    tables = {section: tomlkit.table() for section in Section}
    for section, comment in _SECTION_COMMENTS.items():
        tables[section].comment(comment)
    for f in fields(AggregatorConfig):
        key = _key(f)
        if key.section is not Section.STATISTICS:
            _add(tables[key.section], _file_key(f), getattr(config, f.name), key.comment)
            continue
        _add(tables[key.section], _ENABLED, config.statistics is not None, key.comment)
        statistics = config.statistics or StatisticsSettings()
        for s in fields(StatisticsSettings):
            _add(tables[key.section], s.name, getattr(statistics, s.name),
                 _STATISTICS_COMMENTS[s.name])
    for section, table in tables.items():
        document.add(section.value, table)
    return tomlkit.dumps(document)
