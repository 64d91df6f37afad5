"""Flower drop-in: Flower's aggregation helpers, same names and signatures, on fedkern kernels.

Two generations of helpers are mirrored:

* the ``Ins/Res`` API (``flwr.server.strategy.aggregate``): :func:`aggregate`,
  :func:`aggregate_inplace`, :func:`aggregate_median`, :func:`aggregate_trimmed_avg`,
  :func:`aggregate_krum`, :func:`aggregate_bulyan`, :func:`weighted_loss_avg`,
  :func:`aggregate_qffl`;
* the Message API (``flwr.serverapp.strategy``): :func:`aggregate_arrayrecords`
  (``strategy_utils``), :func:`compute_distances` and :func:`select_multikrum`
  (``multikrum``), :func:`aggregate_n_closest_weights` (``bulyan``) and :func:`trim_mean`
  (``fedtrimmedavg``).

They work layer by layer on Flower's ``NDArrays`` (lists of numpy arrays): each layer of
each client is handed to a kernel as a zero-copy ``layer.reshape(-1)`` view, so a model is
never flattened or stacked into a K x D copy. Results agree with Flower's to float
tolerance (same weighting, same dtypes, same selection rules); the defects of Flower's
helpers listed in the README ("Use with Flower") are fixed, and every difference is
documented on the function concerned.

:func:`install`, :func:`uninstall` and :func:`patched` swap these functions into every
loaded Flower module that holds Flower's originals, so Flower's strategy classes run on
fedkern unchanged. This module imports without Flower; only :func:`aggregate_arrayrecords`
(which builds an ``ArrayRecord``) and :func:`install` need it.
"""
from __future__ import annotations

import contextlib
import functools
import io
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import fedkern

from .. import _validate as check
from .._validate import FedkernTypeError, FedkernValueError, NonFiniteError

__all__ = [
    "aggregate", "aggregate_arrayrecords", "aggregate_bulyan", "aggregate_inplace", "aggregate_krum",
    "aggregate_median", "aggregate_n_closest_weights", "aggregate_qffl", "aggregate_trimmed_avg",
    "compute_distances", "install", "installed", "patched", "select_multikrum", "trim_mean",
    "uninstall", "weighted_loss_avg",
]

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
# Decoding Flower's serialised arrays without a copy
# --------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """(dtype, shape, fortran_order, data offset) of a .npy header, or None if unusual."""
    stream = io.BytesIO(prefix)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except ValueError:
        return None
    if dtype.hasobject:
        return None
    return dtype, shape, fortran, stream.tell()


def _decode(data: bytes) -> np.ndarray:
    """A numpy array from ``np.save`` bytes, as a read-only view of ``data`` (no copy).

    Flower's ``np.load`` copies every array out of its buffer; the kernels only read, so a
    view suffices. Anything unusual (other .npy versions, object dtypes, truncated data)
    goes through ``np.load(allow_pickle=False)``, which raises as Flower would.
    """
    header = None
    if len(data) >= 12 and data[:6] == _NPY_MAGIC:
        size = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
        if size <= len(data):
            header = _npy_header(bytes(data[:size]))
    if header is not None:
        dtype, shape, fortran, offset = header
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize <= len(data):
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            return flat.reshape(shape, order="F" if fortran else "C")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_array(array) -> np.ndarray:
    """A Flower ``Array`` as a numpy array (zero-copy for numpy-serialised arrays)."""
    if getattr(array, "stype", None) == "numpy.ndarray" and isinstance(getattr(array, "data", None), bytes):
        return _decode(array.data)
    return array.numpy()


def _decode_record(record) -> list[np.ndarray]:
    """An ``ArrayRecord``'s arrays in key order, as ``ArrayRecord.to_numpy_ndarrays`` does."""
    return [_decode_array(value) for value in record.values()]


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


def _mean_around_median_layer(arrays: list[np.ndarray], keep: int) -> np.ndarray:
    """Per coordinate, the mean of the ``keep`` values closest to the median (Bulyan)."""
    def rule(rows):
        drop = len(rows) - keep
        if len(rows) >= 2 * drop + 1:
            return fedkern.meamed(rows, drop, check_finite=False)
        # fewer than half kept (Flower's Bulyan allows it): meamed refuses, its kernel does not
        from ..backends import kernels

        valid = check.updates(rows)
        result = np.empty(valid.d, valid.dtype)
        kernels("robust", kernel="mean_around_median").mean_around_median(valid, keep, result)
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


def _krum_scores(distances: np.ndarray, num_closest: int, bad: np.ndarray) -> np.ndarray:
    """Krum score of each client: the sum of its ``num_closest`` smallest distances to others.

    As in Flower, the smallest entry of a row (the client itself, at distance 0) is
    skipped. Distances to non-finite clients (+inf) are left out of finite clients' sums:
    every finite client has the same number of them among its closest, so this ranks the
    finite clients as if those clients were absent. Non-finite clients score +inf.
    """
    closest = np.sort(distances, axis=1)[:, 1:num_closest + 1]
    scores = np.where(np.isinf(closest), 0.0, closest).sum(axis=1)
    scores[bad] = np.inf
    return scores


def _krum_order(scores: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Finite clients by increasing score, ties to the lower index; non-finite ones dropped."""
    order = np.argsort(scores, kind="stable")
    order = order[~bad[order]]
    if order.size == 0:
        raise NonFiniteError("every client's update holds NaN or inf; there is nothing to select")
    return order


def _num_closest(k: int, num_malicious: int) -> int:
    return max(1, k - num_malicious - 2)  # as Flower: n - f - 2 neighbours, at least one


# --------------------------------------------------------------------------------------
# flwr.server.strategy.aggregate
# --------------------------------------------------------------------------------------

def aggregate(results: list[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted average of the clients' layers, weighted by their example counts.

    Flower's ``aggregate``. ``results`` holds one ``(layers, num_examples)`` per client.
    Float layers keep their dtype whatever the type of the counts (Flower turns float32
    into float64 when the counts are ``np.int64``); float16 is summed in float32 (Flower's
    ``layer * num_examples`` overflows); integer layers give float64, as in Flower. 0-d
    layers stay 0-d arrays. NaN and inf propagate as in Flower. Counts must be >= 0 and
    not all zero (Flower returns NaN for an all-zero total).
    """
    if len(results) == 0:
        return []  # Flower returns an empty list too
    w = _weights([n for _, n in results], "num_examples")
    layers = _layers_by_position([params for params, _ in results], "results")
    return [_weighted_layer(arrays, w, _float_result(np.result_type(*arrays))) for arrays in layers]


def aggregate_inplace(results: list[tuple[Any, Any]]) -> NDArrays:
    """Weighted average of ``(ClientProxy, FitRes)`` results (Flower's ``aggregate_inplace``).

    Each ``FitRes.parameters`` is decoded as read-only views of its bytes (no copy) and
    averaged layer by layer with weights ``FitRes.num_examples``. Every layer keeps the
    first client's dtype, as in Flower; integer layers (e.g. BatchNorm's
    ``num_batches_tracked``) get the rounded weighted mean, where Flower multiplies them by
    a scaling factor cast to 0 and returns zeros.
    """
    if len(results) == 0:
        raise FedkernValueError("results is empty; need at least one client")
    w = _weights([fit_res.num_examples for _, fit_res in results], "num_examples")
    clients = [[_decode(t) for t in fit_res.parameters.tensors] for _, fit_res in results]
    layers = _layers_by_position(clients, "results")
    return [_weighted_layer(arrays, w, arrays[0].dtype, round_ints=True) for arrays in layers]


def aggregate_median(results: list[tuple[NDArrays, int]]) -> NDArrays:
    """Coordinate-wise median of each layer, unweighted (Flower's ``aggregate_median``).

    Even K gives the midpoint of the two middle values, as ``np.median``. Dtypes as
    ``np.median`` (integers give float64). Unlike ``np.median``, a NaN is ordered as +inf
    instead of turning the whole coordinate into NaN, so one client cannot poison it.
    """
    layers = _layers_by_position([params for params, _ in results], "results")
    return [_median_layer(arrays) for arrays in layers]


def _cut_count(proportion: float, k: int) -> int:
    if not 0.0 <= proportion < 0.5:
        raise FedkernValueError(f"proportion to cut must be in [0, 0.5); got {proportion}")
    return int(proportion * k)  # Flower's (and scipy's) floor of the float product


def aggregate_trimmed_avg(results: list[tuple[NDArrays, int]], proportiontocut: float) -> NDArrays:
    """Coordinate-wise trimmed mean, unweighted (Flower's ``aggregate_trimmed_avg``).

    Drops ``int(proportiontocut * K)`` values at each end of every coordinate and
    averages the rest, as ``scipy.stats.trim_mean``. Raises ``ValueError`` outside
    ``[0, 0.5)``.
    """
    f = _cut_count(proportiontocut, len(results))
    layers = _layers_by_position([params for params, _ in results], "results")
    return [_trimmed_layer(arrays, f) for arrays in layers]


def aggregate_krum(results: list[tuple[NDArrays, int]], num_malicious: int, to_keep: int) -> NDArrays:
    """Krum, or Multi-Krum when ``to_keep > 0`` (Flower's ``aggregate_krum``).

    Each client scores the sum of its squared distances to its ``max(1, K - f - 2)``
    nearest other clients. ``to_keep == 0`` returns (a copy of) the lowest-scoring
    client's layers, ties going to the first client; ``to_keep > 0`` returns the weighted
    :func:`aggregate` of the ``to_keep`` lowest-scoring clients. Distances are exact
    (float64 differences). A client whose update holds NaN or inf is never selected, and
    ``to_keep >= K`` averages every finite client (Flower keeps only ``to_keep - K``).
    """
    if len(results) == 0:
        raise FedkernValueError("results is empty; need at least one client")
    clients = [params for params, _ in results]
    layers = _layers_by_position(clients, "results")
    distances = _sq_distances(layers)
    bad = _nonfinite_clients(distances, layers)
    order = _krum_order(_krum_scores(distances, _num_closest(len(results), num_malicious), bad), bad)
    if to_keep > 0:
        keep = order[:to_keep][::-1]  # Flower averages them from the highest score down
        return aggregate([results[i] for i in keep])
    return [np.array(layer, copy=True) for layer in clients[order[0]]]


def _is_krum(rule: Callable) -> bool:
    if rule is aggregate_krum:
        return True
    return (getattr(rule, "__name__", None) == "aggregate_krum"
            and getattr(rule, "__module__", None) == "flwr.server.strategy.aggregate")


def aggregate_bulyan(results: list[tuple[NDArrays, int]], num_malicious: int,
                     aggregation_rule: Callable, **aggregation_rule_kwargs: Any) -> NDArrays:
    """Bulyan (Flower's ``aggregate_bulyan``), with Krum as the selection rule.

    Selects ``theta = K - 2f`` clients one at a time, each time the Krum winner among the
    clients not yet selected (neighbour count recomputed from how many remain, ties to the
    first client), then returns, per coordinate, the mean of the ``beta = theta - 2f``
    selected values closest to their median. Needs ``K >= 4f + 3``.

    Pairwise distances are computed once, exactly, instead of once per round; ``results``
    is left untouched (Flower pops the selected clients out of the caller's list). A client
    whose update holds NaN or inf is never selected (Flower raises "reference weights not
    found"); if fewer than ``theta`` finite clients remain, :class:`fedkern.NonFiniteError`
    is raised. ``aggregation_rule`` must be Krum (Flower's ``aggregate_krum`` or this
    module's); ``to_keep`` may be omitted (Flower's Bulyan strategy with default arguments
    fails with a TypeError) and must be 0.
    """
    k = len(results)
    if k < 4 * num_malicious + 3:
        raise FedkernValueError(
            f"Bulyan needs at least 4 * num_malicious + 3 = {4 * num_malicious + 3} clients; got {k}"
        )
    if not _is_krum(aggregation_rule):
        raise FedkernValueError(
            f"aggregation_rule {getattr(aggregation_rule, '__name__', aggregation_rule)!r} is not supported; "
            f"Bulyan's first step must be Krum (aggregate_krum), as in Flower"
        )
    extra = set(aggregation_rule_kwargs) - {"to_keep"}
    if extra:
        raise FedkernTypeError(f"aggregate_krum got unexpected keyword arguments {sorted(extra)}")
    if aggregation_rule_kwargs.get("to_keep", 0) > 0:
        raise FedkernValueError("Bulyan selects one client per round: to_keep must be 0 (Krum, not Multi-Krum)")
    theta = k - 2 * num_malicious
    beta = theta - 2 * num_malicious
    layers = _layers_by_position([params for params, _ in results], "results")
    distances = _sq_distances(layers)
    bad = _nonfinite_clients(distances, layers)
    if k - bad.sum() < theta:
        raise NonFiniteError(
            f"Bulyan selects theta = {theta} clients but only {k - bad.sum()} of {k} updates are finite"
        )
    remaining = np.arange(k)
    selected = []
    for _ in range(theta):
        sub = distances[np.ix_(remaining, remaining)]
        scores = _krum_scores(sub, _num_closest(remaining.size, num_malicious), bad[remaining])
        best = _krum_order(scores, bad[remaining])[0]
        selected.append(remaining[best])
        remaining = np.delete(remaining, best)
    return [_mean_around_median_layer([arrays[i] for i in selected], beta) for arrays in layers]


def weighted_loss_avg(results: list[tuple[int, float]]) -> float:
    """Average of the clients' losses weighted by their example counts, as a float."""
    counts = np.asarray([float(n) for n, _ in results], dtype=np.float64)
    losses = np.asarray([float(loss) for _, loss in results], dtype=np.float64)
    total = counts.sum()
    if counts.size == 0 or total == 0:
        raise FedkernValueError("weighted_loss_avg needs at least one result with num_examples > 0")
    return float(np.dot(counts, losses) / total)


def aggregate_qffl(parameters: NDArrays, deltas: list[NDArrays], hs_fll: list[NDArrays]) -> NDArrays:
    """q-FedAvg step (Flower's ``aggregate_qffl``): ``parameters - sum(deltas) / sum(hs_fll)``.

    The sum over clients runs in float64 in one pass per layer; the result keeps the
    dtype of ``parameters`` (Flower returns float64 for float32 parameters, because the
    denominator is a numpy float64).
    """
    denominator = float(np.sum(np.asarray(hs_fll, dtype=np.float64)))
    layers = _layers_by_position(deltas, "deltas")
    if len(layers) != len(parameters):
        raise FedkernValueError(f"deltas have {len(layers)} layers but parameters have {len(parameters)}")
    ones = np.ones(len(deltas))
    new = []
    for param, arrays in zip(parameters, layers):
        param = np.asarray(param)
        if param.shape != arrays[0].shape:
            raise FedkernValueError(f"a parameter of shape {param.shape} has deltas of shape {arrays[0].shape}")
        total = _weighted_layer(arrays, ones, _F64, normalise=False)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.subtract(param, total / denominator, dtype=np.float64)
        new.append(np.asarray(step).astype(_float_result(param.dtype), copy=False))
    return new


# --------------------------------------------------------------------------------------
# flwr.serverapp.strategy (Message API)
# --------------------------------------------------------------------------------------

def aggregate_arrayrecords(records: list[Any], weighting_metric_name: str):
    """Weighted average of the ``ArrayRecord``s of reply contents (Flower's helper).

    Each ``RecordDict``'s weight is ``weighting_metric_name`` in its (first) MetricRecord;
    every array of every ArrayRecord is added, by key, with weight ``w_i / sum(w)``, in one
    pass over zero-copy views of the serialised bytes. Dtypes as Flower: a float layer
    keeps the first record's dtype, an integer layer gives float64.
    """
    from flwr.app import Array, ArrayRecord

    weights = _weights([next(iter(record.metric_records.values()))[weighting_metric_name] for record in records],
                       weighting_metric_name)
    factors = weights / weights.sum()
    by_key: dict[str, tuple[list[np.ndarray], list[float]]] = {}
    for record, factor in zip(records, factors):
        for array_record in record.array_records.values():
            for key, value in array_record.items():
                arrays, ws = by_key.setdefault(key, ([], []))
                arrays.append(_decode_array(value))
                ws.append(factor)
    out = {}
    for key, (arrays, ws) in by_key.items():
        shape = arrays[0].shape
        for i, array in enumerate(arrays):
            if array.shape != shape:
                raise FedkernValueError(f"array {key!r} has shape {array.shape} in one reply but {shape} in the first")
        w = np.asarray(ws)
        if w.any():
            result = _weighted_layer(arrays, w, _float_result(arrays[0].dtype), normalise=False)
        else:  # every record holding this key has weight 0
            result = np.zeros(shape, _float_result(arrays[0].dtype))
        out[key] = Array(np.asarray(result))
    return ArrayRecord(out)


def compute_distances(records: list[Any]) -> NDArray:
    """K x K squared L2 distances between ArrayRecords (Flower's multikrum helper).

    Exact: differences and sums in float64, so the result is float64, symmetric, exactly 0
    on the diagonal and never negative (Flower's float32 Gram form ``|x|^2 + |y|^2 - 2x.y``
    cancels catastrophically for nearby updates). A record holding NaN or inf is +inf
    from every other record.
    """
    layers = _layers_by_position([_decode_record(record) for record in records], "records")
    return _sq_distances(layers)


def select_multikrum(contents: list[Any], num_malicious_nodes: int, num_nodes_to_select: int) -> list[Any]:
    """The ``num_nodes_to_select`` lowest Krum scores' contents, best first (Flower's helper).

    Scores as in :func:`aggregate_krum`, on exact distances; ties go to the earlier
    reply, and a reply whose arrays hold NaN or inf is never selected.
    """
    record_key = next(iter(contents[0].array_records.keys()))
    layers = _layers_by_position([_decode_record(content[record_key]) for content in contents], "contents")
    distances = _sq_distances(layers)
    bad = _nonfinite_clients(distances, layers)
    order = _krum_order(_krum_scores(distances, _num_closest(len(contents), num_malicious_nodes), bad), bad)
    return [contents[i] for i in order[:num_nodes_to_select]]


def aggregate_n_closest_weights(ref_weights: NDArrays, weights_list: list[NDArrays], beta: int) -> NDArrays:
    """Per coordinate, the mean of the ``beta`` values closest to ``ref_weights``.

    Flower's Bulyan helper. When a reference layer is the coordinate-wise median of the
    layers (as in Bulyan) one fused kernel does the work; otherwise values are ranked by
    distance to the reference, ties going to the lower value (Flower leaves ties to
    ``np.argpartition``).
    """
    layers = _layers_by_position(weights_list, "weights_list")
    if len(ref_weights) != len(layers):
        raise FedkernValueError(f"ref_weights has {len(ref_weights)} layers but weights_list has {len(layers)}")
    if not 1 <= beta <= len(weights_list):
        raise FedkernValueError(f"beta must be in [1, {len(weights_list)}]; got {beta}")
    aggregated = []
    for ref, arrays in zip(ref_weights, layers):
        ref = np.asarray(ref)
        if ref.shape != arrays[0].shape:
            raise FedkernValueError(f"a reference layer of shape {ref.shape} has layers of shape {arrays[0].shape}")
        if arrays[0].size and _compute_dtype(np.result_type(*arrays)) is not None and \
                np.array_equal(_median_layer(arrays).astype(ref.dtype), ref):
            aggregated.append(_mean_around_median_layer(arrays, beta))
        else:
            aggregated.append(_closest_to_reference(ref, arrays, beta))
    return aggregated


def _closest_to_reference(ref: np.ndarray, arrays: list[np.ndarray], beta: int) -> np.ndarray:
    result_dtype = _float_result(np.result_type(ref, *arrays))
    values = np.stack([np.asarray(a, np.float64) for a in arrays])
    gap = np.abs(values - np.asarray(ref, np.float64))
    rank = np.lexsort((values, gap), axis=0)[:beta]  # by distance, then by value
    return np.asarray(np.take_along_axis(values, rank, axis=0).mean(axis=0)).astype(result_dtype)


def trim_mean(array: NDArray, cut_fraction: float) -> NDArray:
    """Trimmed mean along axis 0 (Flower's ``fedtrimmedavg.trim_mean``).

    Drops ``int(cut_fraction * K)`` values at each end of every coordinate, as
    ``scipy.stats.trim_mean``. Raises ``ValueError`` outside ``[0, 0.5)``.
    """
    array = np.asarray(array)
    f = _cut_count(cut_fraction, array.shape[0])
    return _trimmed_layer(_split_clients(array), f)


# --------------------------------------------------------------------------------------
# np.median as Flower's Message-API strategies call it
# --------------------------------------------------------------------------------------

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


def _median_like_numpy(a, axis=None, out=None, overwrite_input=False, keepdims=False):
    """``np.median`` with a fedkern fast path for ``axis=0`` over K same-shaped arrays.

    Every layer shape takes the fast path, 0-d layers included (stacked, they are a 1-D
    array), so NaN is ordered as +inf in every layer alike. As ``np.median``, a 0-d
    result is returned as a numpy scalar.
    """
    if axis == 0 and out is None and not keepdims:
        arrays = _split_clients(a)
        if arrays and len({x.shape for x in arrays}) == 1 and _compute_dtype(np.result_type(*arrays)) is not None:
            result = _median_layer(arrays)
            return result[()] if result.ndim == 0 else result
    return np.median(a, axis=axis, out=out, overwrite_input=overwrite_input, keepdims=keepdims)


class _NumpyWithFedkernMedian(types.ModuleType):
    """Stands in for ``numpy`` in a Flower module: everything is numpy's except ``median``."""

    def __init__(self):
        super().__init__("numpy")
        self.median = _median_like_numpy

    def __getattr__(self, name):
        return getattr(np, name)


# --------------------------------------------------------------------------------------
# install / uninstall / patched
# --------------------------------------------------------------------------------------

#: Flower module -> helper names it defines, replaced by this module's functions.
_TARGETS = {
    "flwr.server.strategy.aggregate": (
        "aggregate", "aggregate_inplace", "aggregate_median", "aggregate_trimmed_avg", "aggregate_krum",
        "aggregate_bulyan", "weighted_loss_avg", "aggregate_qffl",
    ),
    "flwr.serverapp.strategy.strategy_utils": ("aggregate_arrayrecords",),
    "flwr.serverapp.strategy.multikrum": ("compute_distances", "select_multikrum"),
    "flwr.serverapp.strategy.bulyan": ("aggregate_n_closest_weights",),
    "flwr.serverapp.strategy.fedtrimmedavg": ("trim_mean",),
}
#: Strategy packages imported by install() so every module importing a helper is patched.
_PACKAGES = ("flwr.server.strategy", "flwr.serverapp.strategy")
#: Message-API modules that call ``np.median`` inline (FedMedian, Bulyan).
_NUMPY_MEDIAN_MODULES = ("flwr.serverapp.strategy.fedmedian", "flwr.serverapp.strategy.bulyan")

_lock = threading.RLock()
_depth = 0
_originals: dict[int, tuple[str, Callable]] = {}  # id(Flower's function) -> (name, function)
_numpy_proxy = _NumpyWithFedkernMedian()


def _flwr_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "flwr" or name.startswith("flwr."))]


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _depth > 0


def install() -> None:
    """Make Flower's strategies aggregate with fedkern.

    Every loaded Flower module whose global is one of Flower's helpers (the defining
    module and each strategy module that did ``from .aggregate import aggregate``) gets
    this module's function of the same name; the Message-API FedMedian and Bulyan get an
    ``np`` whose ``median`` is fedkern's. Calls nest: each :func:`install` needs one
    :func:`uninstall`. Message-API ``Bulyan`` binds its selection rule when constructed,
    so construct it after installing. Raises ``ImportError`` when Flower is missing.
    """
    global _depth
    import importlib

    with _lock:
        if _depth:
            _depth += 1
            return
        try:
            for package in _PACKAGES:
                importlib.import_module(package)
            defining = {name: importlib.import_module(name) for name in _TARGETS}
        except ImportError as err:
            raise ImportError(f"fedkern.compat.flwr.install() needs Flower (pip install flwr): {err}") from err
        ours = globals()
        for module_name, names in _TARGETS.items():
            for name in names:
                original = getattr(defining[module_name], name)
                if original is not ours[name]:
                    _originals[id(original)] = (name, original)
        for module in _flwr_modules():
            for attr, value in list(vars(module).items()):
                if callable(value) and id(value) in _originals and _originals[id(value)][1] is value:
                    setattr(module, attr, ours[_originals[id(value)][0]])
        for module_name in _NUMPY_MEDIAN_MODULES:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, "np", None) is np:
                module.np = _numpy_proxy
        _depth = 1


def uninstall() -> None:
    """Undo :func:`install`: every Flower module gets Flower's own helpers back."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        ours = globals()
        by_name = {name: fn for name, fn in _originals.values()}
        for module in _flwr_modules():
            for attr, value in list(vars(module).items()):
                if attr in by_name and value is ours.get(attr):
                    setattr(module, attr, by_name[attr])
            if getattr(module, "np", None) is _numpy_proxy:
                module.np = np


@contextlib.contextmanager
def patched():
    """``with patched():`` Flower's strategies aggregate with fedkern inside the block."""
    install()
    try:
        yield
    finally:
        uninstall()
