"""Offline datasets for fedkern simulations: central data and federated generators.

:class:`Dataset` is a central (not yet federated) train/test split, which
:func:`fedkern.sim.partition.partition` spreads over clients.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset"]


class Dataset(NamedTuple):
    """A central train/test split: float32 features, int32 labels in [0, n_classes)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str
