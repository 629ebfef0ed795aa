"""The aggregator configuration written back as TOML (what init and the simulation write)
reads back to the same values, for any valid configuration; reading is strict; the presets
init writes are the ones the simulation runs with."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import tomlkit
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.aggregator.config import (
    NO_NOISE,
    AggregatorConfig,
    ConfigError,
    Preset,
    load_config,
    render_config,
)
from fedcart.aggregator.item_item import StatisticsSettings
from fedcart.model_export.model import TENSOR_NAMES
from fedcart.simulation.federated import FederatedSettings

statistics = st.none() | st.builds(
    StatisticsSettings,
    sampling_rate=st.floats(1e-6, 1.0),
    head_items=st.integers(2, 4096),
    popularity_clip=st.floats(1e-6, 1e6),
    cooccurrence_clip=st.floats(1e-6, 1e6),
    neighbours=st.integers(1, 1000),
    ease_lambda=st.floats(1e-6, 1e3),
    threshold=st.floats(0, 10),
    popularity_weight=st.floats(0, 10),
    popularity_noise_ratio=st.floats(1e-3, 100),
    name_weight=st.floats(0, 10),
)

configs = st.builds(
    AggregatorConfig,
    host=st.text(max_size=20),
    port=st.integers(0, 65535),
    sampling_rate=st.floats(1e-6, 1.0),
    min_clients=st.integers(2, 1000),
    min_connected=st.integers(0, 10**6),
    group_size=st.integers(2000, 10**6),
    expected_dropout=st.floats(0, 0.5),
    corrupt_fraction=st.floats(0, 0.4),
    failure_bound=st.floats(1e-12, 0.5),
    secagg_degree=st.just(0) | st.integers(2, 1000),
    phase_timeout=st.floats(1e-3, 1e6),
    max_rounds=st.integers(0, 10**6),
    mechanism=st.sampled_from(["gaussian", "laplace", "none"]),
    clip_norm=st.floats(1e-9, 1e9),
    noise_multiplier=st.floats(1e-6, 1e3),
    target_epsilon=st.floats(0, 100),
    delta=st.floats(1e-15, 0.5),
    weight_cap=st.floats(1e-3, 1e6),
    optimizer=st.sampled_from(["fedavg", "fedadam"]),
    optimizer_lr=st.floats(1e-9, 10),
    examples_per_round=st.integers(1, 1000),
    train_groups=st.lists(st.sampled_from(TENSOR_NAMES), min_size=1, unique=True).map(
        lambda g: tuple(n for n in TENSOR_NAMES if n in g)),
    statistics=statistics,
    training_noise_ratio=st.floats(1e-3, 100),
)


@settings(max_examples=150, deadline=None)
@given(config=configs)
def test_rendered_config_reads_back_equal(tmp_path_factory, config: AggregatorConfig) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "config.toml"
    path.write_text(render_config(config))
    assert load_config(path) == config


@settings(max_examples=40, deadline=None)
@given(config=configs)
def test_rendering_what_was_read_gives_the_same_text(tmp_path_factory,
                                                     config: AggregatorConfig) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "config.toml"
    text = render_config(config)
    path.write_text(text)
    assert render_config(load_config(path)) == text


def test_every_key_is_written_under_its_comment() -> None:
    """Each setting's comment comes from its field: the line above each key is a comment,
    and the renamed and nested keys land in their sections."""
    text = render_config(AggregatorConfig(min_connected=4335))
    lines = text.splitlines()
    at = lines.index("min_connected = 4335")
    assert lines[at - 1] == ("# a round waits (up to population_wait) for this many "
                             "checked-in devices")
    keys = [i for i, line in enumerate(lines) if " = " in line and not line.startswith("#")]
    # the statistics field is written as "enabled" and StatisticsSettings' fields
    assert len(keys) == len(fields(AggregatorConfig)) + len(fields(StatisticsSettings))
    assert all(lines[i - 1].startswith("# ") for i in keys)
    optimizer = text.index("[optimizer]")
    assert text.index('name = "fedavg"') > optimizer and text.index("lr = 1.0") > optimizer
    assert "[statistics] # before training" in text and "enabled = true" in text


def test_arrays_with_spaces_and_multiple_lines_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[training]\ntrain_groups = [ "bias" ,\n  "blend" ]\n')
    assert load_config(path).train_groups == ("bias", "blend")


@pytest.mark.parametrize(("text", "message"), [
    ("[round]\nsampling_rat = 0.5\n", "unknown key round.sampling_rat"),
    ("[round]\nsampling_rate = \"half\"\n", "round.sampling_rate must be float"),
    ("[round]\nmin_clients = 3.0\n", "round.min_clients must be int"),
    ("[statistics]\nenabled = 1\n", "statistics.enabled must be bool"),
    ("[statistics]\nheads = 10\n", "unknown key statistics.heads"),
    ("[optimizer]\noptimizer_lr = 0.1\n", "unknown key optimizer.optimizer_lr"),
    ("[training]\ntrain_groups = [\"bias\", 3]\n", "training.train_groups must be tuple"),
    ("[server]\nhost = \"a\"\n[network]\nport = 1\n", r"unknown section \[network\]"),
])
def test_a_bad_key_or_value_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_each_statistics_key_has_a_comment() -> None:
    text = render_config(AggregatorConfig())
    for f in fields(StatisticsSettings):
        line = text.splitlines().index(f"{f.name} = {tomlkit.item(f.default).as_string()}")
        assert text.splitlines()[line - 1].startswith("# ")


@pytest.mark.parametrize("preset", list(Preset))
def test_a_preset_config_carries_its_tuned_values(preset: Preset, tmp_path: Path) -> None:
    """What init writes reads back with the preset's values, in its regime."""
    path = tmp_path / "config.toml"
    path.write_text(render_config(preset.config()))
    config = load_config(path)
    tuned = preset.value
    assert config.statistics is not None
    assert (config.train_groups, config.clip_norm, config.training_noise_ratio,
            config.lr_blend, config.optimizer, config.optimizer_lr,
            config.statistics.head_items, config.statistics.cooccurrence_clip) == (
        tuned.train_groups, tuned.clip_norm, tuned.training_noise_ratio, tuned.lr_blend,
        tuned.optimizer, tuned.optimizer_lr, tuned.head_items, tuned.cooccurrence_clip)
    assert (config.mechanism == NO_NOISE) == (preset is Preset.NO_DP)
    assert Preset.of(config.mechanism) is preset


@pytest.mark.parametrize("preset", list(Preset))
def test_init_and_the_simulation_deploy_the_same_tuned_values(preset: Preset) -> None:
    """The simulation's aggregator runs with the preset init writes: every tuned value and
    the model size agree."""
    from fedcart.simulation.derived import derive
    from fedcart.simulation.federated import FederatedSettings, aggregator_config

    mechanism = NO_NOISE if preset is Preset.NO_DP else "gaussian"
    settings = derive(FederatedSettings(mechanism=mechanism,
                                        epsilon=None if preset is Preset.NO_DP else 8.0),
                      1000, 5000).settings
    simulated, deployed = aggregator_config(settings, 1000, 1e-5), preset.config()

    def tuned(c: AggregatorConfig) -> tuple:
        assert c.statistics is not None
        return (c.train_groups, c.clip_norm, c.training_noise_ratio, c.lr_blend, c.lr_bias,
                c.optimizer, c.optimizer_lr, c.statistics.head_items,
                c.statistics.cooccurrence_clip, c.mechanism)

    assert tuned(simulated) == tuned(deployed)
    assert settings.dim == preset.value.dim == 0


def test_presets_differ_from_the_generic_defaults_where_tuned() -> None:
    generic = AggregatorConfig()
    assert Preset.DP.config().train_groups == ("blend",) != generic.train_groups
    assert Preset.NO_DP.config().train_groups == ("bias", "blend")
    assert Preset.DP.config().optimizer == "fedadam" != generic.optimizer
    # a config without statistics rounds keeps none
    assert Preset.DP.value.apply(AggregatorConfig(statistics=None)).statistics is None


def test_the_simulation_resolves_to_the_presets() -> None:
    """One definition: a federated run's unset settings are its regime's preset values."""
    for mechanism, preset in (("none", Preset.NO_DP), ("gaussian", Preset.DP)):
        resolved = FederatedSettings(mechanism=mechanism,
                                     epsilon=8.0 if mechanism != "none" else None).resolved()
        tuned = preset.value
        assert (resolved.train_groups, resolved.head_items, resolved.cooccurrence_clip,
                resolved.clip_norm, resolved.lr_blend, resolved.training_noise_ratio,
                resolved.optimizer, resolved.optimizer_lr, resolved.dim) == (
            tuned.train_groups, tuned.head_items, tuned.cooccurrence_clip, tuned.clip_norm,
            tuned.lr_blend, tuned.training_noise_ratio, tuned.optimizer, tuned.optimizer_lr,
            tuned.dim)
    assert FederatedSettings(clip_norm=2.0).resolved().clip_norm == 2.0


def test_groups_smaller_than_two_rounds_are_refused() -> None:
    with pytest.raises(ConfigError, match="group_size must be at least twice"):
        AggregatorConfig(min_clients=3, group_size=5)
    assert AggregatorConfig(min_clients=3, group_size=6).group_size == 6


def test_a_delta_not_well_under_one_over_n_is_refused() -> None:
    """The issue's finding: delta 1/N^1.1 gave N delta = 0.43 at 4,335 devices."""
    with pytest.raises(ConfigError, match=r"well under 1 / privacy\.population"):
        AggregatorConfig(population=4335, delta=4335 ** -1.1)
    assert AggregatorConfig(population=4335, delta=1 / 433_500).delta == 1 / 433_500


def test_laplace_with_sampling_is_accounted_not_fatal() -> None:
    """Sampled Laplace rounds used to stop the service (the RDP accountant could not
    account them); they are accounted, and a target epsilon calibrates them."""
    config = AggregatorConfig(mechanism="laplace", sampling_rate=0.05, target_epsilon=4.0,
                              delta=1e-6)
    assert config.mechanism == "laplace"
