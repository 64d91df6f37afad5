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
fedkern unchanged. This package imports without Flower; only :func:`aggregate_arrayrecords`
(which builds an ``ArrayRecord``) and :func:`install` need it.

The package is split by concern; everything public is re-exported here:

* ``legacy``: the ``Ins/Res`` helpers; ``message``: the Message-API helpers;
* ``_patching``: :func:`install` / :func:`uninstall` / :func:`patched` and the
  ``np.median`` stand-in they give Flower's Message-API FedMedian and Bulyan;
* ``_layers``: the per-layer building blocks both generations share (grouping by layer,
  dtype rules, zero-copy views, weighted / median / trimmed layers, exact distances and
  Krum scores); ``_decode``: Flower's serialised arrays read without a copy.
"""
from ..._validate import FedkernTypeError, FedkernValueError, NonFiniteError
from ._layers import NDArray, NDArrays
from ._patching import install, installed, patched, uninstall
from .legacy import (
    aggregate, aggregate_bulyan, aggregate_inplace, aggregate_krum, aggregate_median, aggregate_qffl,
    aggregate_trimmed_avg, weighted_loss_avg,
)
from .message import aggregate_arrayrecords, aggregate_n_closest_weights, compute_distances, select_multikrum, trim_mean

__all__ = [
    "aggregate", "aggregate_arrayrecords", "aggregate_bulyan", "aggregate_inplace", "aggregate_krum",
    "aggregate_median", "aggregate_n_closest_weights", "aggregate_qffl", "aggregate_trimmed_avg",
    "compute_distances", "install", "installed", "patched", "select_multikrum", "trim_mean",
    "uninstall", "weighted_loss_avg",
]
