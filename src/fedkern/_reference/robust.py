"""Reference kernels of the robust-aggregation family, in plain numpy.

Kernels take validated inputs (see ``fedkern._validate``) and write into ``out``.
Ordering conventions shared by every backend: NaN is ordered as +inf (a Byzantine client
may send it, and a robust rule must still work), values are gathered per coordinate in
float64, and every mean is computed in float64 and rounded once into ``out``.
"""
import numpy as np


def _stack64(updates) -> np.ndarray:
    """The K x D updates as float64 with NaN replaced by +inf (the shared ordering)."""
    stacked = np.array([np.asarray(row, np.float64) for row in updates])
    stacked[np.isnan(stacked)] = np.inf
    return stacked


def trimmed_mean(updates, lo: int, hi: int, out: np.ndarray) -> None:
    """out[j] = mean of the sorted values x_(lo) .. x_(hi-1) of coordinate j.

    With lo = (K-1)//2 and hi = K//2 + 1 this is the median (the midpoint for even K).
    """
    ordered = np.sort(_stack64(updates), axis=0)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, as in every backend
        out[...] = ordered[lo:hi].mean(axis=0)


def meamed(updates, keep: int, out: np.ndarray) -> None:
    """out[j] = mean of the ``keep`` values of coordinate j closest to its median.

    In sorted order those values are a window [a, b); it grows from the middle one value
    at a time, taking the lower neighbour ``a - 1`` when ``b == K`` or when
    ``median - x_(a-1) <= x_(b) - median`` (ties go to the lower value), else ``b``.
    Every backend makes exactly these comparisons, so they pick the same window.
    """
    ordered = np.sort(_stack64(updates), axis=0)
    k, d = ordered.shape
    columns = np.arange(d)
    a = np.full(d, k // 2)
    b = a.copy()
    with np.errstate(invalid="ignore"):
        median = 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])
        for _ in range(keep):
            below = ordered[np.maximum(a - 1, 0), columns]
            above = ordered[np.minimum(b, k - 1), columns]
            lower = (a > 0) & ((b == k) | (median - below <= above - median))
            a -= lower
            b += ~lower
        inside = (np.arange(k)[:, None] >= a) & (np.arange(k)[:, None] < b)
        out[...] = np.where(inside, ordered, 0.0).sum(axis=0) / keep


def gather_tile(updates, j0: int, center: bool, tile: np.ndarray) -> None:
    """tile[i] = x_i[j0 : j0 + n] (minus x_0[j0 : j0 + n] if ``center``), in tile's dtype."""
    n = tile.shape[1]
    first = np.asarray(updates[0][j0:j0 + n], np.float64)
    for i, row in enumerate(updates):
        values = np.asarray(row[j0:j0 + n], np.float64)
        tile[i] = values - first if center else values


def exact_sq_distances(updates, out: np.ndarray) -> None:
    """out[i, l] = sum_j (x_ij - x_lj)^2, differences and sums in float64; the diagonal is 0."""
    _exact_rows(updates, range(len(updates)), out)


def exact_sq_rows(updates, rows: np.ndarray, out: np.ndarray) -> None:
    """out[r, l] = sum_j (x_ij - x_lj)^2 for i = rows[r] and every l, and out[r, i] = 0:
    rows of :func:`exact_sq_distances`, bit for bit (the same sums, in the same order)."""
    _exact_rows(updates, rows, out)


def _exact_rows(updates, rows, out: np.ndarray) -> None:
    stacked = np.array([np.asarray(row, np.float64) for row in updates])
    with np.errstate(invalid="ignore", over="ignore"):
        for r, i in enumerate(rows):
            diff = stacked - stacked[i]
            out[r] = np.einsum("kd,kd->k", diff, diff)
            out[r, i] = 0.0


def sq_distances_to(updates, point: np.ndarray, out: np.ndarray) -> None:
    """out[i] = sum_j (x_ij - point_j)^2 in float64 (``point`` is float64)."""
    with np.errstate(invalid="ignore", over="ignore"):
        for i, row in enumerate(updates):
            diff = np.asarray(row, np.float64) - point
            out[i] = np.sum(diff * diff)  # numpy's fixed-order sum: BLAS's dot may differ by machine
