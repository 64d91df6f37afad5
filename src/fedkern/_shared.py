"""What the API modules share when they run kernels on validated inputs: one weighted sum
with its non-finite check, and the one scan for updates holding NaN or inf."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import _validate as check
from ._updates import DTypeLike, Updates
from .backends import kernels


def weighted_sum(op: str, rows: Updates, weights: np.ndarray, divisor: float, out: np.ndarray | None,
                 dtype: DTypeLike, check_finite: bool, backend: str | None) -> np.ndarray:
    """(sum_i w_i x_i) / divisor into ``out`` (or a new array): the float64 sum is divided
    once, then rounded; with ``check_finite`` a non-finite result raises naming ``op``."""
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    nonfinite = kernels("aggregate", backend).weighted_sum(rows, weights, divisor, result)
    if check_finite and nonfinite:
        check.raise_nonfinite(op, rows, result)
    return result


def nonfinite(rows: Updates, backend: str | None) -> Iterator[bool]:
    """For each update in turn, whether it holds NaN or inf: exact (a huge finite update is
    finite) and lazy, so a caller that needs only the first finite update reads one."""
    module = kernels("aggregate", backend)
    return (module.count_nonfinite(row) > 0 for row in rows)


def nonfinite_mask(rows: Updates, backend: str | None) -> np.ndarray:
    """Boolean mask of the updates holding NaN or inf."""
    return np.fromiter(nonfinite(rows, backend), bool, rows.k)
