r"""Run configurations: TOML in, a validated :class:`~fedkern.sim.rounds.Simulation` out.

A config is a dict (read from TOML) whose keys are listed in :data:`SCALARS` and
:data:`TABLES`; every key has a default, so ``{}`` is a valid config. A key that takes
parameters is a table with a ``name`` and the parameters (a bare string is its name
alone). :func:`build` checks everything before anything runs, and every error names the
config key: an unknown key, a wrong type, an impossible value (``clients_per_round``
larger than the number of clients, a robust rule whose K is too small for its f).

Examples
--------
>>> from fedkern.sim import config
>>> settings = config.resolve({"rounds": 5, "dataset": {"name": "fedprox_synthetic", "n_clients": 8},
...                            "clients_per_round": 4})
>>> settings["aggregator"]
{'name': 'mean'}
>>> config.resolve({"round": 5})
Traceback (most recent call last):
...
fedkern.sim.config.ConfigError: unknown config key 'round'; did you mean 'rounds'?
"""
from __future__ import annotations

import copy
import difflib
import math
import re
import sys
from typing import Any

from .. import optim
from ..privacy import AdaptiveClipping
from .._errors import FedkernValueError
from .. import datasets
from . import partition as partitions
from .algorithms import ALGORITHMS
from . import compression as compressions
from .compression import Compression
from .data import FederatedDataset
from .executors import EXECUTORS
from .models import LocalTraining, make_model
from .privacy import DifferentialPrivacy
from .secure import SecureAggregation
from .rounds import Aggregator, Attack, Dropout, Simulation, Stragglers
from .sampling import SAMPLERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(FedkernValueError):
    """A config key is unknown, of the wrong type, or has an impossible value."""


#: Top-level scalar keys: (type, default, lowest allowed value, meaning).
SCALARS: dict[str, tuple[type, Any, float | None, str]] = {
    "rounds": (int, 100, 1, "number of rounds"),
    "clients_per_round": (int, 10, 1, "clients selected each round"),
    "local_epochs": (int, 1, 1, "local epochs per client and round"),
    "batch_size": (int, 10, 1, "local minibatch size"),
    "lr": (float, 0.01, 0.0, "local learning rate (> 0)"),
    "momentum": (float, 0.0, 0.0, "local heavy-ball momentum"),
    "weight_decay": (float, 0.0, 0.0, "local L2 weight decay"),
    "availability": (float, 1.0, 0.0, "probability that a client is online in a round, in (0, 1]"),
    "reject_norm_ratio": (float, 0.0, 0.0, "reject updates with norm above this x the median (0: off)"),
    "seed": (int, 0, 0, "the run's seed: every random draw derives from it"),
    "eval_every": (int, 1, 1, "evaluate the test data every this many rounds (and after the last)"),
    "checkpoint_every": (int, 0, 0, "checkpoint every this many rounds (0: only after the last)"),
    "output": (str, "", None, "directory for the results ('' : none; --output overrides)"),
    "backend": (str, "auto", None, "fedkern backend for the aggregation kernels"),
}

#: Table keys: (default table, meaning).
TABLES: dict[str, tuple[dict, str]] = {
    "dataset": ({"name": "fedprox_synthetic", "alpha": 1.0, "beta": 1.0, "n_clients": 30},
                "datasets.load(name, **params)"),
    "partition": ({"name": "iid", "n_clients": 20}, "how a central dataset is split (ignored by federated ones)"),
    "model": ({"name": "logistic_regression"}, "models.make_model(name, **params)"),
    "algorithm": ({"name": "fedavg"}, "fedavg, fedprox with mu, fednova with mu, qffl with q and lipschitz, "
                                      "scaffold with global_lr, fbl with balanced_loss, balanced_weights, "
                                      "balanced_sampling, tau, fedbuff with buffer_size, concurrency, "
                                      "staleness_exponent, server_lr, mean_delay"),
    "sampler": ({"name": "uniform"}, "uniform, by_size, power_of_choice with d"),
    "aggregator": ({"name": "mean"}, "mean or a robust rule, with its parameters"),
    "server_optimizer": ({"name": "fedavg", "lr": 1.0}, "fedavg, fedavgm, fedadagrad, fedadam, fedyogi"),
    "attack": ({"name": "none"}, "Byzantine clients: name, fraction or clients, parameters"),
    "dropout": ({"rate": 0.0, "quorum": 1}, "rate, quorum"),
    "stragglers": ({"fraction": 0.0, "mode": "partial"}, "fraction, mode (partial or drop)"),
    "executor": ({"name": "serial"}, "serial, threads, processes or ray (with workers; ray also address, "
                                     "num_cpus), each with deadline"),
    "privacy": ({"name": "none"}, "differential privacy: none, central or local, with clip, noise_multiplier "
                                  "or target_epsilon, delta, sampling, adaptive, max_epsilon, on_budget"),
    "secure_aggregation": ({"name": "none"}, "secure aggregation: none, full (Bonawitz et al.) or neighbours (SecAgg+) "
                                             "with neighbours, threshold, clip, levels, bits, weights"),
    "compression": ({"name": "none"}, "compressed uploads: none or a codec (top_k, random_k, qsgd, terngrad, "
                                      "stochastic_quantizer, scaled_sign) with its parameters, error_feedback, rotated"),
}

#: The parameters of a ``privacy`` table other than its name (the mode), with their defaults.
PRIVACY_PARAMS: dict[str, Any] = {"clip": 1.0, "adaptive": False, "noise_multiplier": None, "target_epsilon": None,
                                  "delta": 1e-5, "sampling": "poisson", "max_epsilon": None, "on_budget": "stop"}
#: The parameters of an ``adaptive`` table (:class:`fedkern.privacy.AdaptiveClipping`'s, but the clip).
ADAPTIVE_PARAMS = ("target_quantile", "learning_rate", "count_stddev")

_OPTIMIZERS = {"fedavg": optim.FedAvg, "fedavgm": optim.FedAvgM, "fedadagrad": optim.FedAdagrad,
               "fedadam": optim.FedAdam, "fedyogi": optim.FedYogi}


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _scalar(key: str, value: Any) -> Any:
    kind, _, low, _ = SCALARS[key]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"config key {key!r} must be {kind.__name__}; got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be finite; got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"config key {key!r} must be >= {low}; got {value!r}")
    return value


def resolve(config: dict) -> dict:
    """Fill in the defaults and check the shape of every key (not yet their meaning)."""
    if not isinstance(config, dict):
        raise ConfigError(f"a config is a table of keys; got {type(config).__name__}")
    resolved: dict[str, Any] = {key: spec[1] for key, spec in SCALARS.items()}
    resolved.update({key: copy.deepcopy(spec[0]) for key, spec in TABLES.items()})
    for key, value in config.items():
        if key in SCALARS:
            resolved[key] = _scalar(key, value)
        elif key in TABLES:
            if isinstance(value, str):
                value = {"name": value}
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a table or a name; got {value!r}")
            table = dict(value)
            if "name" in TABLES[key][0] and "name" in table and table["name"] != TABLES[key][0]["name"]:
                resolved[key] = table          # another name: the default's parameters do not apply
            else:
                resolved[key].update(table)
        else:
            raise _unknown(key, {**SCALARS, **TABLES})
    for key in ("lr",):
        if resolved[key] <= 0:
            raise ConfigError(f"config key {key!r} must be > 0; got {resolved[key]}")
    if not 0 < resolved["availability"] <= 1:
        raise ConfigError(f"config key 'availability' must be in (0, 1]; got {resolved['availability']}")
    return resolved


def _params(settings: dict, key: str) -> tuple[str, dict]:
    table = dict(settings[key])
    name = table.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"config key '{key}.name' must be a string; got {name!r}")
    return name, table


def _optional_params(settings: dict, key: str) -> tuple[str, dict] | None:
    """``_params`` of a table that is off by default: None for ``name = "none"``, which
    takes no parameters."""
    name, params = _params(settings, key)
    if name != "none":
        return name, params
    if params:
        raise ConfigError(f"config key '{key}': name 'none' takes no parameters; got {sorted(params)}")
    return None


def _call(key: str, factory, *args, **params):
    """Call a constructor; any TypeError/ValueError becomes a ConfigError naming the key.

    An error that begins with another config key (``"sampler: ..."`` from the
    Simulation's checks of ``clients_per_round`` and the rest) is about that key, and names
    it instead.
    """
    try:
        return factory(*args, **params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        message = str(err)
        named = re.match(r"([a-z_]+(?:\.[a-z_]+)*): ", message)
        top = named.group(1).split(".")[0] if named else ""
        if top in {**SCALARS, **TABLES} and top != key.split(".")[0]:
            key = named.group(1)
        raise ConfigError(f"config key {key!r}: {message.removeprefix(key + ': ')}") from None


def _choose(key: str, registry: dict, name: str):
    if name not in registry:
        raise ConfigError(f"config key '{key}.name' must be one of {sorted(registry)}; got {name!r}")
    return registry[name]


def load_data(settings: dict) -> FederatedDataset:
    """The config's dataset, partitioned if it is central."""
    name, params = _params(settings, "dataset")
    loaded = _call("dataset", datasets.load, name, **params)
    if isinstance(loaded, FederatedDataset):
        return loaded
    part_name, part_params = _params(settings, "partition")
    n_clients = part_params.pop("n_clients", None)
    if isinstance(n_clients, bool) or not isinstance(n_clients, int):
        raise ConfigError(f"config key 'partition.n_clients' must be an integer; got {n_clients!r}")
    return _call("partition", partitions.partition, loaded, part_name, n_clients, **part_params)


def build(config: dict, data: FederatedDataset | None = None) -> tuple[Simulation, dict]:
    """A ready :class:`Simulation` and the resolved settings, or a :class:`ConfigError`."""
    settings = resolve(config)
    data = data if data is not None else load_data(settings)
    model_name, model_params = _params(settings, "model")
    model = _call("model", make_model, model_name, data.train.n_features, data.train.n_classes, **model_params)
    local = _call("local_epochs/batch_size/lr/momentum/weight_decay", LocalTraining,
                  epochs=settings["local_epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                  momentum=settings["momentum"], weight_decay=settings["weight_decay"])
    algorithm_name, algorithm_params = _params(settings, "algorithm")
    algorithm = _call("algorithm", _choose("algorithm", ALGORITHMS, algorithm_name), **algorithm_params)
    privacy = _privacy(settings)
    if privacy is not None and "sampler" not in config:
        # the cohort is drawn as the accountant assumes; written so, a saved config resumes alike
        settings["sampler"] = {"name": "poisson" if privacy.sampling == "poisson" else "uniform"}
    sampler_name, sampler_params = _params(settings, "sampler")
    sampler = _call("sampler", _choose("sampler", SAMPLERS, sampler_name), **sampler_params)
    aggregator_name, aggregator_params = _params(settings, "aggregator")
    aggregator = _call("aggregator", Aggregator, aggregator_name, **aggregator_params)
    _call("aggregator", aggregator.validate, settings["clients_per_round"])
    optimizer_name, optimizer_params = _params(settings, "server_optimizer")
    optimizer = _call("server_optimizer", _choose("server_optimizer", _OPTIMIZERS, optimizer_name),
                      **optimizer_params)
    attack_name, attack_params = _params(settings, "attack")
    attack = None
    if attack_name != "none":
        fraction = attack_params.pop("fraction", 0.0)
        clients = tuple(attack_params.pop("clients", ()))
        attack = _call("attack", Attack, attack_name, fraction=fraction, clients=clients, params=attack_params)
    executor_name, executor_params = _params(settings, "executor")
    executor = _call("executor", _choose("executor", EXECUTORS, executor_name), **executor_params)
    simulation = _call(
        "clients_per_round", Simulation, data, model, clients_per_round=settings["clients_per_round"],
        local=local, algorithm=algorithm, sampler=sampler, availability=settings["availability"],
        aggregator=aggregator, server_optimizer=optimizer, attack=attack,
        dropout=_call("dropout", Dropout, **settings["dropout"]),
        stragglers=_call("stragglers", Stragglers, **settings["stragglers"]),
        reject_norm_ratio=settings["reject_norm_ratio"] or None, executor=executor,
        seed=settings["seed"], eval_every=settings["eval_every"],
        backend=None if settings["backend"] == "auto" else settings["backend"], privacy=privacy,
        secure_aggregation=_secure_aggregation(settings), compression=_compression(settings))
    return simulation, settings


def _compression(settings: dict) -> Compression | None:
    """The ``compression`` table (its name the codec) as settings; None for ``"none"``."""
    table = _optional_params(settings, "compression")
    if table is None:
        return None
    name, params = table
    if name not in compressions.CODECS:
        raise ConfigError(f"config key 'compression.name' must be one of {sorted(compressions.CODECS) + ['none']}; "
                          f"got {name!r}")
    flags = {flag: params.pop(flag) for flag in ("error_feedback", "rotated") if flag in params}
    known = compressions.parameters(name)
    for key in params:
        if key not in known:
            raise _unknown(f"compression.{key}", [f"compression.{k}" for k in known + ("error_feedback", "rotated")])
    return _call("compression", Compression, name, params, **flags)


def _secure_aggregation(settings: dict) -> SecureAggregation | None:
    """The ``secure_aggregation`` table (its name the graph) as settings; None for ``"none"``."""
    table = _optional_params(settings, "secure_aggregation")
    if table is None:
        return None
    name, params = table
    return _call("secure_aggregation", SecureAggregation, graph=name, **params)


def _privacy(settings: dict) -> DifferentialPrivacy | None:
    """The ``privacy`` table as :class:`DifferentialPrivacy` settings (None for ``"none"``);
    a ``target_epsilon`` is spread over the config's ``rounds``."""
    table = _optional_params(settings, "privacy")
    if table is None:
        return None
    name, params = table
    if name not in ("central", "local"):
        raise ConfigError(f"config key 'privacy.name' must be one of ['central', 'local', 'none']; got {name!r}")
    for key in params:
        if key not in PRIVACY_PARAMS:
            raise _unknown(f"privacy.{key}", [f"privacy.{k}" for k in PRIVACY_PARAMS])
    params = {**PRIVACY_PARAMS, **params}
    adaptive, clip = params.pop("adaptive"), params.pop("clip")
    if isinstance(adaptive, dict) or adaptive is True:
        table = {} if adaptive is True else adaptive
        for key in table:
            if key not in ADAPTIVE_PARAMS:
                raise _unknown(f"privacy.adaptive.{key}", [f"privacy.adaptive.{k}" for k in ADAPTIVE_PARAMS])
        adaptive, clip = _call("privacy.adaptive", AdaptiveClipping, clip=clip, **table), None
    elif adaptive is False:
        adaptive = None
    else:
        raise ConfigError(f"config key 'privacy.adaptive' must be true, false or a table; got {adaptive!r}")
    rounds = settings["rounds"] if params["target_epsilon"] is not None else None
    return _call("privacy", DifferentialPrivacy, mode=name, clip=clip, adaptive=adaptive, rounds=rounds, **params)


# --------------------------------------------------------------------------- TOML
def read(path) -> dict:
    """Read a TOML config file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config {str(path)!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {str(path)!r} is not valid TOML: {err}") from None


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings (dotted keys reach into tables; values are TOML, else strings)."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value; got {item!r}")
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        table = config
        for parent in parents:
            if isinstance(table.get(parent), str):
                table[parent] = {"name": table[parent]}
            table = table.setdefault(parent, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {key}: {parent!r} is not a table")
        table[leaf] = value
    return config


def to_toml(settings: dict) -> str:
    """Write resolved settings as TOML (scalars first, then one table per key)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in settings.items() if not isinstance(value, dict)]
    for key, value in settings.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError(f"cannot write {value!r} to TOML")
