"""The Message API's helpers (``flwr.serverapp.strategy``), on fedkern kernels.

Same names and signatures as Flower's: :func:`aggregate_arrayrecords`
(``strategy_utils``), :func:`compute_distances` and :func:`select_multikrum`
(``multikrum``), :func:`aggregate_n_closest_weights` (``bulyan``) and :func:`trim_mean`
(``fedtrimmedavg``). Only :func:`aggregate_arrayrecords`, which builds an ``ArrayRecord``,
imports Flower, when called.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..._validate import FedkernValueError
from ._decode import _decode_array, _decode_record
from ._layers import (
    NDArray, NDArrays, _compute_dtype, _cut_count, _float_result, _krum_selection, _layers_by_position,
    _meamed_layer, _median_layer, _num_closest, _split_clients, _sq_distances, _trimmed_layer,
    _weighted_layer, _weights,
)

__all__ = ["aggregate_arrayrecords", "aggregate_n_closest_weights", "compute_distances", "select_multikrum", "trim_mean"]


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

    Scores as in :func:`aggregate_krum`: the choice of exact distances, certified from the
    Gram form; ties go to the earlier reply, and a reply whose arrays hold NaN or inf is
    never selected.
    """
    record_key = next(iter(contents[0].array_records.keys()))
    layers = _layers_by_position([_decode_record(content[record_key]) for content in contents], "contents")
    order = _krum_selection(layers, _num_closest(len(contents), num_malicious_nodes), num_nodes_to_select)
    return [contents[i] for i in order]


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
            aggregated.append(_meamed_layer(arrays, beta))
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
