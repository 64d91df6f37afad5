"""Reference kernels of the aggregation family, in plain numpy.

Kernels take validated inputs (see ``fedkern._validate``) and write into ``out``. Sums
run in float64 and are rounded once into the output's dtype. (numpy >= 2 promotes
``np.float64 scalar * float32 array`` to float64, which these loops rely on.)
"""
import numpy as np


def _count_nonfinite(values: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(values)))


def weighted_sum(updates, weights: np.ndarray, divisor: float, out: np.ndarray) -> int:
    """out = (sum_i weights[i] * updates[i]) / divisor; return the number of non-finite outputs."""
    total = np.zeros(updates.d)
    for weight, row in zip(weights, updates):
        total += weight * row
    out[...] = total / divisor
    return _count_nonfinite(out)


def accumulate(acc: np.ndarray, update: np.ndarray, weight: float) -> None:
    """acc += weight * update, computed in float64."""
    acc[...] = acc + np.float64(weight) * update


def count_nonfinite(values: np.ndarray) -> int:
    """Number of NaN and infinite entries of a 1-D array."""
    return _count_nonfinite(values)


def l2_norms(updates, norms: np.ndarray) -> None:
    """norms[i] = sqrt(sum_j updates[i, j]**2), in float64."""
    for i, row in enumerate(updates):
        row64 = row.astype(np.float64)
        norms[i] = np.sqrt(np.dot(row64, row64))


def clip_by_norm(updates, max_norm: float, out, norms: np.ndarray) -> None:
    """out[i] = updates[i] * min(1, max_norm / ||updates[i]||); norms get the norms."""
    l2_norms(updates, norms)
    for norm, row, clipped in zip(norms, updates, out):
        scale = max_norm / norm if norm > max_norm else 1.0
        clipped[...] = np.float64(scale) * row
