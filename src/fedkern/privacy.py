r"""Differential privacy for federated averaging: clipped sums, Gaussian noise, adaptive
clipping and privacy accounting.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018) bounds each client's influence by clipping its update to L2
norm C, sums the clipped updates, adds Gaussian noise of standard deviation z C to the sum
(z is the noise multiplier) and divides by the *expected* number of clients, a fixed
denominator (as TensorFlow Federated does), so the mean reveals nothing through its
divisor. The privacy spent over rounds is accounted by :class:`RDPAccountant`.

* :func:`clip_and_accumulate` clips and weight-sums K updates in one kernel;
* :func:`add_gaussian_noise` adds normal noise from fedkern's counter-based stream: the
  same bits on every backend and thread count (the stream is defined in
  ``fedkern._reference.privacy``);
* :func:`dp_mean` (central noise, added once by the server) and :func:`local_dp_update`
  (each client noises its own clipped update) are the two DP-FedAvg aggregations;
* :class:`AdaptiveClipping` moves C towards a quantile of the update norms (Andrew,
  Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with Adaptive
  Clipping", NeurIPS 2021).

A NaN or infinite update is rejected before any noise is added: noise must never hide it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _validate as check
from ._accounting import DEFAULT_RDP_ORDERS, RDPAccountant, noise_multiplier_for, pld_epsilon
from ._errors import FedkernValueError
from ._updates import DTypeLike, UpdatesLike, WeightsLike
from .backends import kernels

#: A noise seed: an int in [0, 2**64), or a Generator whose next 64 bits become one.
SeedLike = int | np.random.Generator

__all__ = ["clip_and_accumulate", "add_gaussian_noise", "dp_mean", "local_dp_update", "AdaptiveClipping",
           "split_noise_multiplier", "RDPAccountant", "DEFAULT_RDP_ORDERS", "noise_multiplier_for", "pld_epsilon"]


def clip_and_accumulate(updates: UpdatesLike, clip: float, weights: WeightsLike | None = None, *,
                        out: np.ndarray | None = None, dtype: DTypeLike = None, return_stats: bool = False,
                        check_finite: bool = True,
                        backend: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray, int]:
    r"""Clip each update to L2 norm ``clip`` and take their weighted sum.

    :math:`s = \sum_i w_i \min(1, C / \lVert x_i \rVert_2)\, x_i`, accumulated in float64 and
    rounded once. Rows go in cache-sized groups, norms then the sum, so a group's second
    read comes from cache rather than memory. Zero updates are kept as they are.

    Parameters
    ----------
    updates : (K, D) array or sequence of K 1-D arrays, float32 or float64
    clip : finite number > 0
        The clipping norm C.
    weights : array_like of K finite numbers >= 0, optional
        Default: all ones (DP-FedAvg's unweighted sum).
    out : (D,) array, optional
        Written in place and returned; its dtype is the result's dtype.
    dtype : float32 or float64, optional
        Result dtype when ``out`` is not given; defaults to the updates' dtype.
    return_stats : bool
        Also return the float64 norms before clipping and the number of updates within
        the bound (norm <= C), which adaptive clipping needs.
    check_finite : bool
        Raise :class:`fedkern.NonFiniteError` naming the first client whose update holds
        NaN or inf.

    Returns
    -------
    sum : (D,) array, or ``(sum, norms, unclipped)`` with ``return_stats``

    Examples
    --------
    >>> from fedkern import privacy
    >>> privacy.clip_and_accumulate(np.array([[3.0, 4.0], [0.3, 0.4]]), 1.0)
    array([0.9, 1.2])
    >>> _, norms, unclipped = privacy.clip_and_accumulate(np.array([[3.0, 4.0], [0.0, 0.0]]), 1.0,
    ...                                                   return_stats=True)
    >>> norms, unclipped
    (array([5., 0.]), 1)
    """
    rows = check.updates(updates)
    clip = check.real(clip, "clip", low=0.0, low_inclusive=False)
    w = np.ones(rows.k) if weights is None else check.weights(weights, rows.k)
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    total = result if result.dtype == np.float64 else np.empty(rows.d)
    norms = np.empty(rows.k)
    kernels("privacy", backend, "clip_and_sum").clip_and_sum(rows, clip, w, total, norms)
    if check_finite and not np.isfinite(norms).all():
        check.raise_nonfinite("clip_and_accumulate", rows)
    if total is not result:
        result[...] = total
    return (result, norms, int(np.count_nonzero(norms <= clip))) if return_stats else result


def _seed(seed: SeedLike) -> int:
    """A uint64 stream seed from an int in [0, 2**64) or drawn from a numpy Generator."""
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**64, dtype=np.uint64))
    return check.count(seed, "seed", high=2**64 - 1, why=" (a uint64, or pass a numpy.random.Generator)")


def add_gaussian_noise(x: np.ndarray, std: float, seed: SeedLike, *, stream: int = 0, out: np.ndarray | None = None,
                       dtype: DTypeLike = None, backend: str | None = None) -> np.ndarray:
    r"""Return ``x`` plus independent normal noise of standard deviation ``std``.

    :math:`y_j = x_j + \sigma z_j` with :math:`z_j` normal ``j`` of stream ``stream`` under
    ``seed`` (Box-Muller on Philox4x32-10 blocks; the exact definition is in
    ``fedkern._reference.privacy``), computed in float64 per coordinate and rounded once
    into the result's dtype: no float64 copy of the vector is made. The result is the same on
    every backend and thread count, so a server can regenerate or audit it from the seed.

    Parameters
    ----------
    x : (D,) float32 or float64 array, finite
        Never modified unless passed as ``out``.
    std : finite number >= 0
    seed : int in [0, 2**64) or numpy.random.Generator
        A Generator gives a seed of its own next 64 bits.
    stream : int in [0, 2**64)
        Independent streams under one seed (e.g. one per round).
    out : (D,) float32 or float64 array, optional
        Written in place and returned; ``out=x`` adds the noise in place.
    dtype : float32 or float64, optional
        Result dtype when ``out`` is not given; defaults to ``x``'s dtype.

    Examples
    --------
    >>> from fedkern import privacy
    >>> y = privacy.add_gaussian_noise(np.zeros(100_000, np.float32), 2.0, seed=7)
    >>> round(float(y.std()), 1)
    2.0
    >>> bool(np.array_equal(y, privacy.add_gaussian_noise(np.zeros(100_000, np.float32), 2.0, seed=7)))
    True
    """
    x = check.vector(x, "x")
    std = check.real(std, "std", low=0.0)
    seed = _seed(seed)
    stream = check.count(stream, "stream", high=2**64 - 1)
    result = check.out(out, x.shape, x.dtype, dtype)
    if kernels("aggregate", backend, "count_nonfinite").count_nonfinite(x):
        check.raise_nonfinite("add_gaussian_noise", [x], name="x")
    kernels("privacy", backend, "gaussian_noise").gaussian_noise(x, std, seed, stream, 0, result)
    return result


def dp_mean(updates: UpdatesLike, clip: float, noise_multiplier: float, expected_clients: float, seed: SeedLike, *,
            weights: WeightsLike | None = None, stream: int = 0, out: np.ndarray | None = None,
            dtype: DTypeLike = None, backend: str | None = None) -> np.ndarray:
    r"""DP-FedAvg's server step with central noise: clip, sum, noise, divide by a fixed count.

    :math:`ar x = ig(\sum_i w_i \min(1, C/\lVert x_i
Vert) x_i + \mathcal N(0, (zC)^2 I)ig) / m`
    with m the *expected* number of clients per round, not the number that arrived
    (McMahan et al. 2018; TensorFlow Federated's fixed denominator): the divisor then
    reveals nothing. With weights, each must be <= 1, so that one client moves the sum by
    at most C, the sensitivity the noise is calibrated to.

    Parameters
    ----------
    updates : (K, D) array or sequence of K 1-D arrays
    clip : finite number > 0, the clipping norm C
    noise_multiplier : finite number >= 0, z (the noise's std is z C)
    expected_clients : finite number > 0, m
    seed, stream : the noise's stream, as in :func:`add_gaussian_noise`
    weights : K numbers in [0, 1], optional (default all ones)

    Examples
    --------
    >>> from fedkern import privacy
    >>> updates = np.ones((4, 3), np.float32)
    >>> privacy.dp_mean(updates, clip=1.0, noise_multiplier=0.0, expected_clients=4, seed=0)
    array([0.57735026, 0.57735026, 0.57735026], dtype=float32)
    """
    rows = check.updates(updates)
    noise_multiplier = check.real(noise_multiplier, "noise_multiplier", low=0.0)
    expected_clients = check.real(expected_clients, "expected_clients", low=0.0, low_inclusive=False)
    if weights is not None:
        weights = check.weights(weights, rows.k)
        if weights.max() > 1.0:
            raise FedkernValueError(f"weights must be <= 1 so that one client moves the sum by at most clip "
                                    f"(the noise's sensitivity); got max {weights.max()}")
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    total = clip_and_accumulate(rows.matrix if rows.matrix is not None else rows.rows, clip, weights,
                                dtype=np.float64, backend=backend)
    add_gaussian_noise(total, noise_multiplier * clip, seed, stream=stream, out=total, backend=backend)
    result[...] = total / expected_clients
    return result


def local_dp_update(update: np.ndarray, clip: float, noise_multiplier: float, seed: SeedLike, *, stream: int = 0,
                    out: np.ndarray | None = None, backend: str | None = None) -> np.ndarray:
    r"""DP-FedAvg's client step with local noise: clip one update to C and add N(0, (zC)^2).

    Each client noises its own update before it leaves, so the server (or anyone
    watching) sees only noised updates; the server then sums them and divides by the
    expected number of clients, e.g. ``fedkern.weighted_sum(noised, np.ones(k)) / m``.
    Local noise costs about sqrt(m) times the central noise of :func:`dp_mean` for the
    same guarantee per client.

    Examples
    --------
    >>> from fedkern import privacy
    >>> privacy.local_dp_update(np.array([3.0, 4.0]), clip=1.0, noise_multiplier=0.0, seed=0)
    array([0.6, 0.8])
    """
    update = check.vector(update, "update")
    noise_multiplier = check.real(noise_multiplier, "noise_multiplier", low=0.0)
    result = check.out(out, update.shape, update.dtype)
    clip_and_accumulate(update[np.newaxis], clip, out=result, backend=backend)
    return add_gaussian_noise(result, noise_multiplier * clip, seed, stream=stream, out=result, backend=backend)


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    r"""The noise multiplier left for the values when adaptive clipping's count takes its share.

    Adaptive clipping releases a noised count of unclipped updates beside the noised sum.
    With count noise of standard deviation :math:`\sigma_b` (on a sum of bits of
    sensitivity 1/2) and value noise multiplier :math:`z_\Delta`, the pair is as private as
    one Gaussian mechanism of multiplier z when
    :math:`z_\Delta = (z^{-2} - (2\sigma_b)^{-2})^{-1/2}` (Andrew et al. 2021, Theorem 1;
    TensorFlow Federated's split). Zero noise stays zero.

    Examples
    --------
    >>> from fedkern import privacy
    >>> round(privacy.split_noise_multiplier(1.0, count_stddev=5.0), 4)
    1.005
    """
    z = check.real(noise_multiplier, "noise_multiplier", low=0.0)
    sigma = check.real(count_stddev, "count_stddev", low=0.0)
    if z == 0.0:
        return 0.0
    if 2.0 * sigma <= z:
        raise FedkernValueError(f"count_stddev must exceed noise_multiplier / 2 = {z / 2:g}, or the count alone "
                                f"spends the whole privacy budget; got {sigma:g}")
    return (z**-2 - (2.0 * sigma) ** -2) ** -0.5


@dataclass
class AdaptiveClipping:
    r"""A clipping norm that follows a quantile of the clients' update norms.

    Each round the server learns the (noised) fraction of updates that were not clipped,
    from bits centred at 1/2 so that one client moves their sum by at most 1/2,
    :math:`\tilde b = \big(\sum_{i=1}^{n} ([\lVert x_i \rVert \le C] - \tfrac12) + \mathcal N(0, \sigma_b^2)\big) / m + \tfrac12`
    over the n updates counted and the m expected, and moves the norm geometrically,
    :math:`C \leftarrow C \exp(-\eta (\tilde b - \gamma))`:
    it shrinks while more than a fraction :math:`\gamma` of updates fit, grows while fewer
    do (Andrew et al., "Differentially Private Learning with Adaptive Clipping", NeurIPS
    2021). The defaults are TensorFlow Federated's.

    Parameters
    ----------
    clip : the initial norm C0 (> 0), then the current one
    target_quantile : gamma in [0, 1]
    learning_rate : eta >= 0
    count_stddev : sigma_b >= 0, or None for m / 20 (TFF's default) with m the expected
        clients of :meth:`update`

    Examples
    --------
    >>> from fedkern import privacy
    >>> adaptive = privacy.AdaptiveClipping(count_stddev=0.0)
    >>> round(adaptive.update(unclipped=10, expected_clients=10, seed=0), 4)  # all fit: shrink
    0.0905
    """

    clip: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        self.clip = check.real(self.clip, "clip", low=0.0, low_inclusive=False)
        check.real(self.target_quantile, "target_quantile", low=0.0, high=1.0)
        check.real(self.learning_rate, "learning_rate", low=0.0)
        if self.count_stddev is not None:
            check.real(self.count_stddev, "count_stddev", low=0.0)

    def stddev(self, expected_clients: float) -> float:
        """The count noise's standard deviation for ``expected_clients`` clients a round."""
        return expected_clients / 20.0 if self.count_stddev is None else float(self.count_stddev)

    def update(self, unclipped: int, expected_clients: float, seed: SeedLike, *, stream: int = 0,
               clients: int | None = None) -> float:
        """Move the norm after a round in which ``unclipped`` of ``clients`` updates had norm
        <= clip (``clients``: default the expected number, as in a fixed cohort); return it.

        ``seed`` and ``stream`` give the count noise's stream (:func:`add_gaussian_noise`).
        """
        unclipped = check.count(unclipped, "unclipped")
        m = check.real(expected_clients, "expected_clients", low=0.0, low_inclusive=False)
        n = m if clients is None else check.count(clients, "clients", low=unclipped,
                                                  why=" (the unclipped updates are among them)")
        centred = add_gaussian_noise(np.array([unclipped - n / 2]), self.stddev(m), seed, stream=stream)[0]
        self.clip *= math.exp(-self.learning_rate * (centred / m + 0.5 - self.target_quantile))
        return self.clip
