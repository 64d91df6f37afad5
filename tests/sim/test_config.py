"""Configs: defaults, every bad key caught before anything runs, TOML round trips, overrides."""
import sys

import numpy as np
import pytest

from fedkern.sim import config
from fedkern.sim.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SMALL = {"rounds": 2, "clients_per_round": 4, "local_epochs": 1,
         "dataset": {"name": "fedprox_synthetic", "n_clients": 8, "alpha": 0.5, "beta": 0.5}}


def test_empty_config_resolves_to_the_documented_defaults():
    settings = config.resolve({})
    assert {k: settings[k] for k in config.SCALARS} == {k: spec[1] for k, spec in config.SCALARS.items()}
    assert {k: settings[k] for k in config.TABLES} == {k: spec[0] for k, spec in config.TABLES.items()}


def test_a_table_with_another_name_drops_the_default_parameters():
    settings = config.resolve({"dataset": {"name": "digits"}, "aggregator": "median"})
    assert settings["dataset"] == {"name": "digits"} and settings["aggregator"] == {"name": "median"}
    assert config.resolve({"dataset": {"alpha": 0.0}})["dataset"]["beta"] == 1.0


def test_resolved_config_round_trips_through_toml():
    settings = config.resolve({**SMALL, "aggregator": {"name": "krum", "f": 1, "pre": {"name": "bucketing", "s": 2}},
                               "attack": {"name": "ipm", "fraction": 0.25, "tau": 0.5},
                               "model": {"name": "mlp", "hidden": [16, 8]}})
    assert tomllib.loads(config.to_toml(settings)) == settings


@pytest.mark.parametrize("bad, key", [
    ({"round": 3}, "'round'; did you mean 'rounds'"),
    ({"bogus_key": 1}, "valid keys"),
    ({"rounds": "ten"}, "'rounds' must be int"),
    ({"rounds": 2.5}, "'rounds' must be int"),
    ({"rounds": True}, "'rounds' must be int"),
    ({"rounds": 0}, "'rounds' must be >= 1"),
    ({"lr": 0}, "'lr' must be > 0"),
    ({"lr": float("nan")}, "'lr' must be finite"),
    ({"availability": 1.5}, "'availability'"),
    ({"aggregator": 3}, "'aggregator' must be a table"),
])
def test_shape_errors_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        config.resolve(bad)


@pytest.mark.parametrize("bad, key", [
    ({"clients_per_round": 9}, "clients_per_round"),
    ({"aggregator": {"name": "krum", "f": 2}}, "'aggregator'.*at least 7"),
    ({"aggregator": {"name": "krum"}}, "'aggregator'"),
    ({"aggregator": {"name": "median", "beta": 0.1}}, "'aggregator'.*beta"),
    ({"aggregator": {"name": "averaging"}}, "aggregator.name"),
    ({"server_optimizer": {"name": "fedadam", "momentum": 0.9}}, "'server_optimizer'.*momentum"),
    ({"server_optimizer": {"name": "sgd"}}, "server_optimizer.name"),
    ({"algorithm": {"name": "fedprox"}}, "'algorithm'"),
    ({"algorithm": {"name": "fedprox", "mu": -1.0}}, "'algorithm'.*mu"),
    ({"sampler": {"name": "power_of_choice", "d": 2}}, "d >= clients_per_round"),
    ({"sampler": {"name": "round_robin"}}, "sampler.name"),
    ({"attack": {"name": "teleport", "fraction": 0.1}}, "'attack'.*attack.name"),
    ({"dropout": {"rate": 1.0}}, "'dropout'.*dropout.rate"),
    ({"dropout": {"chance": 0.1}}, "'dropout'.*chance"),
    ({"stragglers": {"fraction": 0.5, "mode": "slow"}}, "'stragglers'.*mode"),
    ({"executor": {"name": "threads", "workers": 0}}, "'executor'.*workers"),
    ({"executor": {"name": "processes", "workers": 0}}, "'executor'.*workers"),
    ({"executor": {"name": "processes", "workers": "2"}}, "'executor'.*workers must be an integer"),
    ({"executor": {"name": "processes", "worker": 2}}, "'executor'.*worker"),
    ({"executor": {"name": "ray", "workers": 0}}, "'executor'.*workers"),
    ({"executor": {"name": "dask"}}, "executor.name"),
    ({"model": {"name": "resnet"}}, "'model'"),
    ({"dataset": {"name": "imagenet"}}, "'dataset'"),
    ({"dataset": {"name": "fedprox_synthetic", "n_clients": 8, "gamma": 1}}, "'dataset'.*gamma"),
])
def test_meaning_errors_name_the_key_before_anything_runs(bad, key):
    with pytest.raises(ConfigError, match=key):
        config.build({**SMALL, **bad})


def test_power_of_choice_needs_d_at_least_the_cohort_checked_at_build():
    simulation, _ = config.build({**SMALL, "sampler": {"name": "power_of_choice", "d": 6}})
    simulation.run(1)


def test_central_dataset_is_partitioned():
    pytest.importorskip("sklearn")
    simulation, settings = config.build({"rounds": 1, "clients_per_round": 5, "dataset": "digits",
                                         "partition": {"name": "dirichlet", "alpha": 0.5, "n_clients": 10}})
    assert simulation.train_data.n_clients == 10 and simulation.data.test.n_clients == 1


def test_overrides_reach_into_tables_and_parse_toml_values():
    changed = config.apply_overrides({"aggregator": "median"}, [
        "rounds=7", "aggregator.f=2", "dataset.name=digits", "model.hidden=[32, 16]", "lr=0.5", "output=runs/a"])
    assert changed == {"rounds": 7, "aggregator": {"name": "median", "f": 2}, "dataset": {"name": "digits"},
                       "model": {"hidden": [32, 16]}, "lr": 0.5, "output": "runs/a"}


@pytest.mark.parametrize("item", ["rounds", "=3"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="key=value"):
        config.apply_overrides({}, [item])


def test_read_reports_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.read(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.read(tmp_path / "bad.toml")


def test_build_gives_a_runnable_simulation():
    simulation, settings = config.build(SMALL)
    history = simulation.run(settings["rounds"])
    assert len(history) == 2 and np.isfinite(simulation.params).all()
