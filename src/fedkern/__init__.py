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
    WorkerError,
)
from .aggregate import Accumulator, accumulate, clip_by_norm, l2_norms, weighted_mean, weighted_sum
from .backends import get_backend, get_num_threads, set_backend, set_num_threads, use_backend
from .buffers import Layout, UpdateMatrix
from .optim import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, ServerOptimizer
from .privacy import add_gaussian_noise, clip_and_accumulate
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
from . import attacks, privacy
from . import secagg
from . import compress
from .secagg import add_masks, ring_dequantize, ring_quantize

__version__ = "0.1.0"

from ._registry import public_names as _op_names

#: The ops of the registry (one row each) and the names around them.
__all__ = sorted({*_op_names(), "Accumulator", "ServerOptimizer", "Layout", "UpdateMatrix", "attacks", "privacy",
                  "secagg",
                  "compress",
                  "FedkernError", "FedkernTypeError", "FedkernValueError", "NonFiniteError", "BackendUnavailableError",
                  "WorkerError",
                  "get_backend", "set_backend", "use_backend", "get_num_threads", "set_num_threads"})
