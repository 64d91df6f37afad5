r"""Running configs to an output directory, resuming them, and the built-in demo.

This is what ``fedkern simulate`` calls. An output directory holds ``config.toml``
(the resolved config), ``checkpoint.npz`` (the run's state, rewritten atomically),
``history.json``, ``history.csv``, ``params.npy`` (the final global parameters) and,
with matplotlib installed, ``learning_curves.png``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from . import config as configs
from .history import History
from .rounds import Simulation

CHECKPOINT = "checkpoint.npz"

#: The built-in experiment of ``fedkern simulate`` without a config: (title, config).
#: FedProx's Synthetic(1,1) protocol with 90% stragglers (FedAvg drops them, FedProx
#: keeps their partial work, as in the FedProx paper), then Synthetic-IID with 20% of the
#: clients sending inner-product-manipulation updates (-10 x the honest mean), under the
#: mean and two robust rules. Generated data only: a plain install runs it.
_FEDPROX = {"rounds": 200, "clients_per_round": 10, "local_epochs": 20, "batch_size": 10, "lr": 0.01,
            "dataset": {"name": "fedprox_synthetic", "alpha": 1.0, "beta": 1.0, "n_clients": 30},
            "stragglers": {"fraction": 0.9}, "executor": {"name": "threads"}}
_BYZANTINE = {"rounds": 50, "clients_per_round": 30, "local_epochs": 2, "batch_size": 10, "lr": 0.05,
              "dataset": {"name": "fedprox_synthetic", "alpha": 0.0, "beta": 0.0, "iid": True, "n_clients": 30},
              "aggregator": {"name": "mean", "weights": "equal"}, "executor": {"name": "threads"}}
_IPM = {"name": "ipm", "fraction": 0.2, "tau": 10.0}
DEMO: list[tuple[str, dict]] = [
    ("FedAvg, Synthetic(1,1), 90% stragglers dropped", {**_FEDPROX, "stragglers": {"fraction": 0.9, "mode": "drop"}}),
    ("FedProx mu=1, Synthetic(1,1), 90% stragglers", {**_FEDPROX, "algorithm": {"name": "fedprox", "mu": 1.0}}),
    ("mean, Synthetic-IID, no attack", _BYZANTINE),
    ("mean, Synthetic-IID, 20% IPM", {**_BYZANTINE, "attack": _IPM}),
    ("median, Synthetic-IID, 20% IPM", {**_BYZANTINE, "attack": _IPM, "aggregator": "median"}),
    ("Multi-Krum f=6 m=10, Synthetic-IID, 20% IPM",
     {**_BYZANTINE, "attack": _IPM, "aggregator": {"name": "krum", "f": 6, "m": 10}}),
]


def _write_outputs(simulation: Simulation, settings: dict, directory: Path, title: str) -> None:
    simulation.history.save(directory)
    np.save(directory / "params.npy", simulation.params)
    try:
        simulation.history.plot(directory / "learning_curves.png", title=title)
    except ImportError:
        pass     # matplotlib is optional; the CLI says so once


def run(config: dict, output: str | os.PathLike | None = None, *, title: str = "",
        progress: Callable[[dict], None] | None = None) -> tuple[Simulation, dict]:
    """Build and run one config; with ``output``, write the results and checkpoints there."""
    simulation, settings = configs.build(config)
    output = output or settings["output"] or None
    try:
        if output is None:
            simulation.run(settings["rounds"], progress=progress)
            return simulation, settings
        directory = Path(output)
        directory.mkdir(parents=True, exist_ok=True)
        settings["output"] = str(directory)
        (directory / "config.toml").write_text(configs.to_toml(settings))
        simulation.run(settings["rounds"], checkpoint_path=directory / CHECKPOINT,
                       checkpoint_every=settings["checkpoint_every"], progress=progress)
        _write_outputs(simulation, settings, directory, title)
        return simulation, settings
    finally:
        simulation.close()


def saved_config(directory: str | os.PathLike) -> dict:
    """The config of the run whose outputs are in ``directory``."""
    path = Path(directory) / "config.toml"
    if not path.is_file():
        raise configs.ConfigError(f"--resume {str(directory)!r}: no config.toml there (not a fedkern output directory)")
    return configs.read(path)


def resume(directory: str | os.PathLike, *, progress: Callable[[dict], None] | None = None) -> tuple[Simulation, dict]:
    """Continue the run saved in ``directory`` from its last checkpoint to its last round."""
    directory = Path(directory)
    simulation, settings = configs.build(saved_config(directory))
    try:
        if (directory / CHECKPOINT).is_file():
            simulation.restore(directory / CHECKPOINT)
        simulation.run(settings["rounds"], checkpoint_path=directory / CHECKPOINT,
                       checkpoint_every=settings["checkpoint_every"], progress=progress)
        _write_outputs(simulation, settings, directory, "")
        return simulation, settings
    finally:
        simulation.close()


def summary(rows: list[tuple[str, History, float]]) -> str:
    """A table of finished runs: final test accuracy, balanced accuracy, rounds and seconds;
    with differential privacy the final epsilon too, and why a run stopped early."""
    width = max(len("run"), *(len(title) for title, _, _ in rows))
    private = any(len(history) and math.isfinite(history.last("epsilon")) for _, history, _ in rows)
    lines = [f"{'run':<{width}}  rounds  test acc  balanced acc  train loss  skipped  seconds"
             + ("  epsilon" if private else "")]
    for title, history, seconds in rows:
        skipped = int(np.nansum(history.column("skipped"))) if len(history) else 0
        line = (f"{title:<{width}}  {len(history):>6}  {_pct(history.last('test_accuracy')):>8}  "
                f"{_pct(history.last('balanced_accuracy')):>12}  {history.last('train_loss'):>10.4f}  "
                f"{skipped:>7}  {seconds:>7.2f}")
        epsilon = history.column("epsilon")[-1] if len(history) else math.nan   # inf: no privacy
        lines.append(line + (f"  {epsilon:>7.3g}" if private else ""))
    lines += [f"{title}: stopped early: {history.stopped}" for title, history, _ in rows if history.stopped]
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.1f}%"
