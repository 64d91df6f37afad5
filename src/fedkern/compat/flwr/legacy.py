"""The ``Ins/Res`` API's helpers (``flwr.server.strategy.aggregate``), on fedkern kernels.

Same names and signatures as Flower's: :func:`aggregate`, :func:`aggregate_inplace`,
:func:`aggregate_median`, :func:`aggregate_trimmed_avg`, :func:`aggregate_krum`,
:func:`aggregate_bulyan`, :func:`weighted_loss_avg`, :func:`aggregate_qffl`. Each
difference from Flower's is documented on the function concerned.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._validate import FedkernTypeError, FedkernValueError, NonFiniteError
from ... import _krum
from ._decode import _decode
from ._layers import (
    _F64, NDArrays, _certified, _cut_count, _float_result, _krum_selection, _layers_by_position,
    _meamed_layer, _median_layer, _nonfinite_clients, _num_closest, _sq_distances, _trimmed_layer,
    _weighted_layer, _weights,
)

__all__ = [
    "aggregate", "aggregate_bulyan", "aggregate_inplace", "aggregate_krum", "aggregate_median", "aggregate_qffl",
    "aggregate_trimmed_avg", "weighted_loss_avg",
]


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

    The choice is the exact distances' on every input, but found at BLAS speed: scores
    are bounded from the centred Gram form with rigorous rounding-error bounds, and exact
    distances are computed only for the clients those bounds cannot rank (see
    ``fedkern.robust._Certified`` and ``fedkern._krum``).
    """
    if len(results) == 0:
        raise FedkernValueError("results is empty; need at least one client")
    clients = [params for params, _ in results]
    layers = _layers_by_position(clients, "results")
    order = _krum_selection(layers, _num_closest(len(results), num_malicious), max(to_keep, 1))
    if to_keep > 0:
        keep = order[::-1]  # Flower averages them from the highest score down
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

    Pairwise distances are computed once instead of once per round, certified as in
    :func:`aggregate_krum` (each round's choice is the exact distances'); ``results``
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
    neighbours = lambda n: _num_closest(n, num_malicious)  # noqa: E731
    bounds = _certified(layers)
    if bounds is None:
        distances = _sq_distances(layers)
        bad = _nonfinite_clients(distances, layers)
        best = _krum.exact_best(distances, neighbours, bad)
    else:
        bad = bounds.bad
        best = _krum.certified_best(bounds.lower, bounds.upper, bounds.exact_rows, neighbours, bad)
    if k - bad.sum() < theta:
        raise NonFiniteError(
            f"Bulyan selects theta = {theta} clients but only {k - bad.sum()} of {k} updates are finite"
        )
    selected = _krum.bulyan_selection(k, theta, best)
    return [_meamed_layer([arrays[i] for i in selected], beta) for arrays in layers]


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
