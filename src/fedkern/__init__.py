"""fedkern: fast, validated aggregation kernels for federated learning.

Numpy arrays in, numpy arrays out; each op runs on the numpy ``"reference"``, the
``"cython"`` (OpenMP) or the ``"numba"`` backend (see :mod:`fedkern.backends`).
"""
from ._errors import (
    BackendUnavailableError,
    FedkernError,
    FedkernTypeError,
    FedkernValueError,
    NonFiniteError,
)
from .aggregate import Accumulator, accumulate, clip_by_norm, l2_norms, weighted_mean, weighted_sum
from .backends import get_backend, get_num_threads, set_backend, set_num_threads, use_backend
from .buffers import Layout, UpdateMatrix
from .optim import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, ServerOptimizer
from .robust import (
    adaptive_clipping,
    bucketing,
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    meamed,
    median,
    nearest_neighbor_mixing,
    pairwise_sq_distances,
    trimmed_mean,
)
from . import attacks

__version__ = "0.1.0"

__all__ = [
    "Accumulator", "BackendUnavailableError", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi",
    "FedkernError", "FedkernTypeError", "FedkernValueError", "Layout", "NonFiniteError", "ServerOptimizer",
    "UpdateMatrix", "accumulate", "clip_by_norm", "get_backend", "get_num_threads", "l2_norms",
    "set_backend", "set_num_threads", "use_backend", "weighted_mean", "weighted_sum",
    "adaptive_clipping", "attacks", "bucketing", "bulyan", "centered_clipping", "geometric_median", "krum",
    "meamed", "median", "nearest_neighbor_mixing", "pairwise_sq_distances", "trimmed_mean",
]
