"""Weighted aggregation of client updates: FedAvg's core, streaming, norms and clipping.

Every op validates its inputs once (``fedkern._validate``), runs one kernel of the chosen
backend (``fedkern.backends``) and returns numpy arrays. Updates are a (K, D) C-contiguous
array or a sequence of K 1-D contiguous arrays (never stacked); float32 or float64; sums
accumulate in float64 and are rounded once.
"""
from __future__ import annotations


import numpy as np

from . import _shared as shared
from . import _validate as check
from ._updates import DTypeLike, OutUpdates, UpdatesLike, UpdatesSource, WeightsLike
from .backends import kernels



def weighted_sum(updates: UpdatesLike, weights: WeightsLike, *, out: np.ndarray | None = None, dtype: DTypeLike = None,
                 check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Weighted sum of client updates, :math:`s_j = \sum_i w_i x_{ij}`.

    Parameters
    ----------
    updates : (K, D) array or sequence of K 1-D arrays, float32 or float64
        One row per client. A sequence is read in place, never stacked.
    weights : array_like of K finite numbers >= 0, not all zero
    out : (D,) array, optional
        Written in place and returned; its dtype is the result's dtype.
    dtype : float32 or float64, optional
        Result dtype when ``out`` is not given; defaults to the updates' dtype.
    check_finite : bool
        Raise :class:`fedkern.NonFiniteError` naming the client whose update holds NaN
        or inf (detected in the kernel's own pass over the updates).
    backend : "reference", "cython", "numba" or "auto", optional

    Examples
    --------
    >>> fedkern.weighted_sum([np.ones(3, np.float32), np.arange(3, dtype=np.float32)], [1, 2])
    array([1., 3., 5.], dtype=float32)
    """
    rows = check.updates(updates)
    w = check.weights(weights, rows.k)
    return shared.weighted_sum("weighted_sum", rows, w, 1.0, out, dtype, check_finite, backend)


def weighted_mean(updates: UpdatesLike, weights: WeightsLike | None = None, *, out: np.ndarray | None = None,
                  dtype: DTypeLike = None,
                  check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Weighted mean of client updates (FedAvg), :math:`m_j = \sum_i w_i x_{ij} / \sum_i w_i`.

    ``weights`` are typically the clients' example counts; None gives every client the
    same weight. A :class:`fedkern.UpdateMatrix` passed without weights uses its own.
    Other parameters as in :func:`weighted_sum`.

    Examples
    --------
    >>> updates = [np.full(4, 1.0, np.float32), np.full(4, 4.0, np.float32)]
    >>> fedkern.weighted_mean(updates, weights=[30, 10])
    array([1.75, 1.75, 1.75, 1.75], dtype=float32)
    """
    if weights is None and isinstance(updates, UpdatesSource):
        weights = updates.weights
    rows = check.updates(updates)
    w = np.ones(rows.k) if weights is None else check.weights(weights, rows.k)
    return shared.weighted_sum("weighted_mean", rows, w, w.sum(), out, dtype, check_finite, backend)


def accumulate(acc: np.ndarray, update: np.ndarray, weight: float = 1.0, *,
               check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Add a weighted update to an accumulator in place, :math:`a_j \mathrel{+}= w x_j`.

    The product and sum are computed in float64 and rounded once into ``acc``'s dtype.
    With ``check_finite`` the update is checked before ``acc`` is touched, so a rejected
    update leaves ``acc`` unchanged (one extra read of ``update``).

    Parameters
    ----------
    acc : (D,) float32 or float64 array, updated in place and returned
    update : (D,) float32 or float64 array
    weight : finite number >= 0

    Examples
    --------
    >>> acc = np.zeros(3)
    >>> fedkern.accumulate(acc, np.ones(3, np.float32), 2.0)
    array([2., 2., 2.])
    """
    acc = check.vector(acc, "acc", writeable=True)
    update = check.vector(update, "update", length=acc.shape[0])
    weight = check.real(weight, "weight", low=0.0)
    _accumulate_checked(kernels("aggregate", backend), acc, update, weight, check_finite)
    return acc


def _accumulate_checked(module, acc, update, weight, check_finite, op="accumulate", name="update"):
    if check_finite and module.count_nonfinite(update):
        check.raise_nonfinite(op, [update], name=name)
    module.accumulate(acc, update, weight)


class Accumulator:
    """Streaming FedAvg: add client updates one at a time, then take their weighted mean.

    Only two D-vectors live in memory (a float64 running sum), never K x D, and the sum
    is exactly the one :func:`weighted_sum` computes over the same updates in arrival
    order. A rejected (non-finite) update leaves the accumulator unchanged.

    Parameters
    ----------
    d : number of coordinates
    dtype : dtype of :meth:`mean` and :meth:`sum` results (float32 or float64)
    backend : backend for :meth:`add`, as in every op

    Examples
    --------
    >>> acc = fedkern.Accumulator(4, dtype=np.float32)
    >>> for update, n_examples in [(np.ones(4, np.float32), 30), (np.zeros(4, np.float32), 10)]:
    ...     acc.add(update, n_examples)
    >>> acc.mean()
    array([0.75, 0.75, 0.75, 0.75], dtype=float32)
    """

    def __init__(self, d: int, dtype: DTypeLike = np.float32, *, backend: str | None = None):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            raise check.FedkernValueError(f"d must be a positive integer; got {d!r}")
        self.dtype = check.result_dtype(dtype, np.dtype(np.float32))
        self.backend = backend
        self._sum = np.zeros(int(d))
        self.total_weight = 0.0
        self.count = 0

    @property
    def d(self) -> int:
        return self._sum.shape[0]

    def add(self, update: np.ndarray, weight: float = 1.0, *, check_finite: bool = True) -> None:
        """Add ``weight * update`` (weight: e.g. the client's example count, >= 0)."""
        update = check.vector(update, "update", length=self.d)
        weight = check.real(weight, "weight", low=0.0)
        module = kernels("aggregate", self.backend)
        _accumulate_checked(module, self._sum, update, weight, check_finite, op="Accumulator.add")
        self.total_weight += weight
        self.count += 1

    def sum(self, *, out: np.ndarray | None = None) -> np.ndarray:
        """The weighted sum so far, rounded to ``dtype`` (or ``out``'s dtype)."""
        result = check.out(out, (self.d,), self.dtype)
        result[...] = self._sum
        return result

    def mean(self, *, out: np.ndarray | None = None) -> np.ndarray:
        """The weighted mean so far; raises if nothing with positive weight was added."""
        if self.total_weight <= 0:
            raise check.FedkernValueError("Accumulator.mean: no update with positive weight was added")
        result = check.out(out, (self.d,), self.dtype)
        np.divide(self._sum, self.total_weight, out=result, casting="unsafe")
        return result

    def reset(self) -> None:
        """Forget every update (start a new round) without reallocating."""
        self._sum[...] = 0.0
        self.total_weight = 0.0
        self.count = 0


def l2_norms(updates: UpdatesLike, *, out: np.ndarray | None = None, dtype: DTypeLike = None,
             check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Euclidean norm of each client's update, :math:`n_i = \sqrt{\sum_j x_{ij}^2}`.

    Squares are summed in float64 in fixed blocks, so a float32 norm is correctly rounded
    in practice and independent of the thread count. Returns a (K,) array of the
    updates' dtype (or ``dtype``).

    Examples
    --------
    >>> fedkern.l2_norms(np.array([[3.0, 4.0], [0.0, 1.0]]))
    array([5., 1.])
    """
    rows = check.updates(updates)
    result = check.out(out, (rows.k,), rows.dtype, dtype)
    norms = result if result.dtype == np.float64 else np.empty(rows.k)
    kernels("aggregate", backend).l2_norms(rows, norms)
    if norms is not result:
        result[...] = norms
    if check_finite and not np.isfinite(result).all():  # a finite float64 norm may overflow float32
        check.raise_nonfinite("l2_norms", rows, result)
    return result


def clip_by_norm(updates: UpdatesLike, max_norm: float, *, out: OutUpdates = None, return_norms: bool = False,
                 check_finite: bool = True, backend: str | None = None) -> np.ndarray | list[np.ndarray] | tuple:
    r"""Scale each update whose L2 norm exceeds ``max_norm`` down to that norm.

    :math:`y_i = x_i \min(1, c / \lVert x_i \rVert_2)` (as in DP-FedAvg and norm-bounding
    defences); updates within the bound, and zero updates, pass unchanged.

    Parameters
    ----------
    updates : (K, D) array or sequence of K 1-D arrays
    max_norm : finite number > 0
    out : (K, D) array or sequence of K 1-D arrays of the updates' dtype, optional
        Written in place; ``out=updates`` clips in place. Default: a new (K, D) array.
    return_norms : also return the float64 norms before clipping

    Examples
    --------
    >>> fedkern.clip_by_norm(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    rows = check.updates(updates)
    max_norm = check.real(max_norm, "max_norm", low=0.0, low_inclusive=False)
    target = check.out_updates(out, rows)
    norms = np.empty(rows.k)
    kernels("aggregate", backend).clip_by_norm(rows, max_norm, target, norms)
    if check_finite and not np.isfinite(norms).all():
        check.raise_nonfinite("clip_by_norm", rows)
    result = target.matrix if target.matrix is not None else list(target.rows)
    if out is not None:
        result = out
    return (result, norms) if return_norms else result
