r"""The per-round record of a run, saved as JSON and CSV, with an optional plot.

Each round appends one dict with the keys of :data:`FIELDS`; ``seconds`` is wall time,
``train_loss`` the weighted mean of the accepted clients' local training losses (the
loss of each minibatch before its step), and the test metrics are those of the global
model after the round's server step (nan in rounds that do not evaluate). With
differential privacy, ``epsilon`` is the run's epsilon after the round (at the configured
delta) and ``clip`` the clipping norm the round used; without privacy both are inf (no
guarantee, no clipping). ``bytes_up`` is what the arrived clients sent (float32 updates;
with compression, the messages' bytes; with secure aggregation, masked vectors and the
protocol's messages) and ``bytes_up_uncompressed`` what they would have sent as float32
updates (the ``bytes_up`` of plain FedAvg). ``dropped`` counts the selected clients whose
update never arrived, ``lost`` those of them the executor lost (past its deadline, or on a
worker that died twice: see :class:`~fedkern.sim.executors.Lost`). In ``history.json`` NaN is written as null and an infinity as the
string ``"inf"`` (neither is JSON).

Examples
--------
>>> from fedkern.sim.history import History
>>> history = History()
>>> history.append({"round": 1, "test_accuracy": 0.5})
>>> history.column("test_accuracy")
array([0.5])
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

#: The fields of one round's record, in CSV column order.
FIELDS = ("round", "seconds", "train_loss", "test_loss", "test_accuracy", "balanced_accuracy",
          "worst_class_accuracy", "selected", "arrived", "dropped", "lost", "stragglers", "rejected", "byzantine", "skipped",
          "bytes_up", "bytes_down", "epsilon", "clip", "secagg_bytes", "secagg_seconds",
          "bytes_up_uncompressed")


class History:
    """A list of per-round records (dicts) with JSON/CSV export and a plot.

    ``stopped`` says why a run ended before its last round (a privacy budget), else ``""``.
    """

    def __init__(self, records: list[dict] | None = None, stopped: str = ""):
        self.records: list[dict] = list(records or [])
        self.stopped = stopped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]

    def append(self, record: dict) -> None:
        self.records.append(record)

    def column(self, name: str) -> np.ndarray:
        """One field over the rounds, as a float array (nan where a record lacks it)."""
        return np.array([float(r.get(name, math.nan)) for r in self.records])

    def last(self, name: str) -> float:
        """The last finite value of ``name`` (nan if there is none)."""
        values = self.column(name)
        finite = values[np.isfinite(values)]
        return float(finite[-1]) if finite.size else math.nan

    def to_json(self) -> str:
        # NaN is not JSON: written as null so any JSON reader can load the file
        clean = [{k: _to_json(v) for k, v in r.items()} for r in self.records]
        return json.dumps(clean, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "History":
        return cls([{k: _from_json(v) for k, v in r.items()} for r in json.loads(text)])

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``history.json`` and ``history.csv`` into ``directory``."""
        directory = Path(directory)
        _atomic_text(directory / "history.json", self.to_json())
        with open(directory / "history.csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)
        os.replace(directory / "history.csv.tmp", directory / "history.csv")

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        """Save the learning curves (test accuracy, balanced accuracy, train loss) as an image.

        Needs matplotlib: ``pip install 'fedkern[plot]'``.
        """
        rounds = self.column("round")
        figure = _figure(figsize=(10, 3.6))
        left, right = figure.subplots(1, 2)
        for name in ("test_accuracy", "balanced_accuracy"):
            values = self.column(name)
            keep = np.isfinite(values)
            left.plot(rounds[keep], values[keep], label=name.replace("_", " "))
        left.set(xlabel="round", ylabel="accuracy", ylim=(0, 1))
        left.legend()
        right.plot(rounds, self.column("train_loss"))
        right.set(xlabel="round", ylabel="train loss")
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=110)


def _to_json(value):
    # NaN and infinities are not JSON: null and "inf"/"-inf", so any JSON reader loads the file
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _from_json(value):
    if value is None:
        return math.nan
    return float(value) if value in ("inf", "-inf") else value


def _figure(**options):
    # a bare Figure, not pyplot: no global backend or figure registry is touched
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting the history needs matplotlib: pip install 'fedkern[plot]'") from None
    return Figure(**options)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
