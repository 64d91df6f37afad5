r"""Atomic checkpoints: a run killed at any moment resumes from its last complete one.

A checkpoint is one ``.npz`` file holding named arrays (parameters, optimizer state,
per-client state) and one JSON document (round counter, optimizer step count, history).
It is written to a temporary file in the same directory, flushed to disk and renamed
over the old one (``os.replace`` is atomic on POSIX and Windows), so a crash leaves
either the previous checkpoint or the new one, never a torn file. No generator state
needs saving: every random draw of a run comes from a stream keyed by (seed, round,
client), so the round counter determines all of them.

Examples
--------
>>> import tempfile, os
>>> from fedkern.sim import checkpoint
>>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.npz")
>>> checkpoint.save(path, {"params": np.arange(3.0)}, {"round": 7})
>>> arrays, meta = checkpoint.load(path)
>>> arrays["params"], meta["round"]
(array([0., 1., 2.]), 7)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._errors import FedkernValueError

_META = "__meta__"


def save(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` and the JSON-serialisable ``meta`` to ``path`` atomically."""
    path = Path(path)
    if _META in arrays:
        raise FedkernValueError(f"checkpoint array name {_META!r} is reserved")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays, **{_META: np.array(json.dumps(meta))})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_directory(path.parent)


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save`: ``(arrays, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise FedkernValueError(f"no checkpoint at {str(path)!r}")
    with np.load(path, allow_pickle=False) as data:
        if _META not in data.files:
            raise FedkernValueError(f"{str(path)!r} is not a fedkern checkpoint (no metadata)")
        meta = json.loads(str(data[_META]))
        return {name: data[name] for name in data.files if name != _META}, meta


def _sync_directory(directory: Path) -> None:
    # makes the rename itself durable; not possible on every platform (e.g. Windows)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
