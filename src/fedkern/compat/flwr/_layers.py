"""The building blocks both generations of Flower helpers share, one layer at a time.

Flower's ``NDArrays`` (lists of numpy arrays) are regrouped by layer position
(:func:`_layers_by_position`); each client's layer reaches a kernel as a zero-copy
``layer.reshape(-1)`` view (:func:`_rows`), computed in the dtype :func:`_compute_dtype`
picks and cast to the dtype Flower's numpy arithmetic gives (:func:`_float_result`,
:func:`_cast`). On these: the weighted, median, trimmed and mean-around-median rules of
one layer, and the exact distances and Krum scores that Krum, Multi-Krum and Bulyan
select with (certified from the Gram form: the exact distances' choice, computing exact
ones only where the choice needs them). Nothing here imports Flower.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import fedkern

from ... import _krum
from ... import _validate as check
from ..._validate import FedkernTypeError, FedkernValueError, NonFiniteError
from ...robust import _Certified

NDArray = np.ndarray
NDArrays = list  # list[np.ndarray], as Flower's ``flwr.common.NDArrays``

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


# --------------------------------------------------------------------------------------
# Layers: grouping, dtypes, zero-copy views
# --------------------------------------------------------------------------------------

def _layers_by_position(clients: Sequence[Sequence[Any]], name: str) -> list[list[np.ndarray]]:
    """Regroup K clients' layer lists into one list of K arrays per layer, checking shapes.

    Flower zips the clients' layers and lets numpy broadcast; here a client with another
    number of layers or another layer shape raises, naming the client and the layer.
    """
    if len(clients) == 0:
        raise FedkernValueError(f"{name} is empty; need at least one client")
    first = clients[0]
    n_layers = len(first)
    for i, layers in enumerate(clients):
        if len(layers) != n_layers:
            raise FedkernValueError(f"{name}[{i}] has {len(layers)} layers but {name}[0] has {n_layers}")
    grouped = []
    for j in range(n_layers):
        arrays = [layers[j] if isinstance(layers[j], np.ndarray) else np.asarray(layers[j]) for layers in clients]
        shape = arrays[0].shape
        for i, array in enumerate(arrays):
            if array.shape != shape:
                raise FedkernValueError(
                    f"layer {j} of {name}[{i}] has shape {array.shape} but layer {j} of {name}[0] has "
                    f"{shape}; every client must send the same layer shapes (Flower would broadcast them)"
                )
        grouped.append(arrays)
    return grouped


def _split_clients(a) -> list[np.ndarray] | None:
    """The K per-client arrays of what Flower hands ``np.median`` / ``trim_mean`` along axis 0.

    A stacked ``(K, *shape)`` array gives K zero-copy views ``a[i, ...]``: arrays of shape
    ``shape``, so a stack of 0-d layers gives 0-d arrays (``list(a)`` would give numpy
    scalars). A list or tuple gives its items, numpy scalars turned into 0-d arrays. None
    when ``a`` is neither (or is 0-d), or holds something else: numpy's own path then.
    """
    if isinstance(a, np.ndarray):
        return [a[i, ...] for i in range(a.shape[0])] if a.ndim else None
    if not isinstance(a, (list, tuple)):
        return None
    arrays = [x if isinstance(x, np.ndarray) else np.asarray(x) if isinstance(x, np.generic) else None for x in a]
    return None if any(x is None for x in arrays) else arrays


def _compute_dtype(dtype: np.dtype) -> np.dtype | None:
    """The float dtype a kernel computes a layer of ``dtype`` in (None: numpy fallback).

    float32/float64 run as they are; float16 runs in float32 (so it cannot overflow) and
    integers/booleans in float64. Complex and extended precision fall back to numpy.
    """
    if dtype in (_F32, _F64):
        return dtype
    if dtype.kind == "f" and dtype.itemsize < 4:
        return _F32
    if dtype.kind in "biu":
        return _F64
    return None


def _float_result(dtype: np.dtype) -> np.dtype:
    """Dtype Flower's numpy arithmetic gives a mean/median of ``dtype`` values."""
    return dtype if dtype.kind in "fc" else _F64


def _rows(arrays: Sequence[np.ndarray], dtype: np.dtype) -> list[np.ndarray]:
    """Each client's layer as a 1-D contiguous array of ``dtype``: a view when it can be.

    A contiguous layer of the right dtype is passed as ``layer.reshape(-1)`` (no copy; a
    0-d layer becomes length 1). Only other dtypes or non-contiguous layers are copied.
    """
    rows = []
    for array in arrays:
        if array.dtype != dtype:
            array = array.astype(dtype)
        elif not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        rows.append(array.reshape(-1))
    return rows


def _weights(values, name: str) -> np.ndarray:
    """Example counts (any real numbers, including numpy integers) as validated float64."""
    try:
        array = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise FedkernTypeError(f"{name} must be real numbers: {err}") from None
    return check.weights(array, len(array), name)


def _cast(result: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], round_ints: bool = False) -> np.ndarray:
    result = result.reshape(shape)
    if result.dtype == dtype:
        return result
    if round_ints and dtype.kind in "biu":
        result = np.rint(result)
    return result.astype(dtype)


def _weighted_layer(arrays: list[np.ndarray], w: np.ndarray, result_dtype: np.dtype, *,
                    normalise: bool = True, round_ints: bool = False) -> np.ndarray:
    """sum_i w_i x_i (/ sum_i w_i) of one layer, in ``result_dtype``."""
    shape = arrays[0].shape
    if arrays[0].size == 0:
        return np.zeros(shape, result_dtype)
    compute = _compute_dtype(np.result_type(*arrays))
    if compute is None:  # complex or long double: plain numpy, widest precision
        total = sum(wi * np.asarray(a, np.result_type(a.dtype, _F64)) for wi, a in zip(w, arrays))
        return np.asarray(total / (w.sum() if normalise else 1.0)).astype(result_dtype)
    rows = _rows(arrays, compute)
    op = fedkern.weighted_mean if normalise else fedkern.weighted_sum
    return _cast(op(rows, w, check_finite=False), result_dtype, shape, round_ints)


# --------------------------------------------------------------------------------------
# Robust-family building blocks
# --------------------------------------------------------------------------------------

def _coordinatewise_layer(arrays: list[np.ndarray], rule, numpy_rule=None) -> np.ndarray:
    """A coordinate-wise rule on one layer, in Flower's result dtype.

    ``rule(rows)`` runs on fedkern's kernels for float and integer layers; complex and
    extended-precision layers go to ``numpy_rule(stacked)``, or are computed in float64
    when there is none.
    """
    shape, dtype = arrays[0].shape, np.result_type(*arrays)
    result_dtype = _float_result(dtype)
    if arrays[0].size == 0:
        return np.zeros(shape, result_dtype)
    compute = _compute_dtype(dtype)
    if compute is None and numpy_rule is not None:
        return np.asarray(numpy_rule(np.stack(arrays))).astype(result_dtype)
    return _cast(rule(_rows(arrays, compute or _F64)), result_dtype, shape)


def _median_layer(arrays: list[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median of one layer (midpoint for even K; NaN ordered as +inf)."""
    return _coordinatewise_layer(arrays, lambda rows: fedkern.median(rows, check_finite=False),
                                 lambda stacked: np.median(stacked, axis=0))


def _trimmed_layer(arrays, f: int) -> np.ndarray:
    """Mean after dropping the ``f`` smallest and ``f`` largest values of each coordinate."""
    return _coordinatewise_layer(arrays, lambda rows: fedkern.trimmed_mean(rows, f=f, check_finite=False),
                                 lambda stacked: np.sort(stacked, axis=0)[f:len(stacked) - f].mean(axis=0))


def _cut_count(proportion: float, k: int) -> int:
    if not 0.0 <= proportion < 0.5:
        raise FedkernValueError(f"proportion to cut must be in [0, 0.5); got {proportion}")
    return int(proportion * k)  # Flower's (and scipy's) floor of the float product


def _meamed_layer(arrays: list[np.ndarray], keep: int) -> np.ndarray:
    """Per coordinate, the mean of the ``keep`` values closest to the median (Bulyan)."""
    def rule(rows):
        drop = len(rows) - keep
        if len(rows) >= 2 * drop + 1:
            return fedkern.meamed(rows, drop, check_finite=False)
        # fewer than half kept (Flower's Bulyan allows it): meamed refuses, its kernel does not
        from ...backends import kernels

        valid = check.updates(rows)
        result = np.empty(valid.d, valid.dtype)
        kernels("robust", kernel="meamed").meamed(valid, keep, result)
        return result

    return _coordinatewise_layer(arrays, rule)


def _sq_distances(layers: list[list[np.ndarray]]) -> np.ndarray:
    """Exact K x K squared Euclidean distances between clients, summed over layers.

    Each layer's distances are computed by ``fedkern.pairwise_sq_distances(method="exact")``
    (differences and sums in float64, no Gram-form cancellation); a pair involving a
    client that holds NaN or inf is +inf apart.
    """
    k = len(layers[0]) if layers else 0
    total = np.zeros((k, k))
    for arrays in layers:
        if arrays[0].size == 0:
            continue
        compute = _compute_dtype(np.result_type(*arrays)) or _F64
        total += fedkern.pairwise_sq_distances(_rows(arrays, compute), method="exact")
    return total


def _nonfinite_clients(distances: np.ndarray, layers: list[list[np.ndarray]]) -> np.ndarray:
    """Boolean mask of the clients whose update holds NaN or inf.

    Such a client is +inf away from every other client, so only clients whose whole row
    is +inf (off the diagonal) are scanned; with finite updates this costs nothing.
    """
    k = distances.shape[0]
    off = distances + np.diag(np.full(k, np.inf))
    candidates = np.flatnonzero(np.isinf(off).all(axis=1)) if k > 1 else np.arange(k)
    bad = np.zeros(k, bool)
    for i in candidates:
        bad[i] = not all(np.isfinite(arrays[i]).all() for arrays in layers if arrays[i].dtype.kind in "fc")
    return bad


def _certified(layers: list[list[np.ndarray]]) -> _Certified | None:
    """Certified bounds of :func:`_sq_distances` (``fedkern.robust._Certified``, one part
    per non-empty layer, in the same compute dtypes), or None when a layer has no kernel
    dtype (complex, extended precision: the exact path then) or every layer is empty.

    With kernel dtypes only, a client holds NaN or inf in some layer exactly when its
    compute-dtype rows do, so the bounds' ``bad`` is :func:`_nonfinite_clients`' mask.
    """
    parts = []
    for arrays in layers:
        if arrays[0].size == 0:
            continue
        compute = _compute_dtype(np.result_type(*arrays))
        if compute is None:
            return None
        parts.append(check.updates(_rows(arrays, compute)))
    return _Certified(parts, None) if parts else None


def _krum_selection(layers: list[list[np.ndarray]], neighbours: int, count: int) -> np.ndarray:
    """The ``count`` finite clients of lowest Krum score on exact distances, best first, ties
    to the lower index: ``_krum_order(...)[:count]``, selected from certified bounds."""
    bounds = _certified(layers)
    if bounds is None:
        distances = _sq_distances(layers)
        bad = _nonfinite_clients(distances, layers)
        return _krum_order(_krum.scores(distances, neighbours, bad), bad)[:count]
    good = np.flatnonzero(~bounds.bad)
    if good.size == 0:
        raise NonFiniteError("every client's update holds NaN or inf; there is nothing to select")
    return _krum.certified_order(bounds.lower, bounds.upper, bounds.exact_rows, neighbours, bounds.bad,
                                 count, among=good)


def _krum_order(scores: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Finite clients by increasing score, ties to the lower index; non-finite ones dropped."""
    order = np.argsort(scores, kind="stable")
    order = order[~bad[order]]
    if order.size == 0:
        raise NonFiniteError("every client's update holds NaN or inf; there is nothing to select")
    return order


def _num_closest(k: int, num_malicious: int) -> int:
    return max(1, k - num_malicious - 2)  # as Flower: n - f - 2 neighbours, at least one
