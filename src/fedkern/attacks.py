r"""Byzantine attacks, to stress robust rules in simulations and tests.

Each attack takes the honest clients' updates (as every op: a (K, D) array or K rows)
and the number ``f`` of Byzantine clients, and returns the (f, D) malicious updates in
the honest updates' dtype; randomised attacks take ``seed`` (an int, None or a
:class:`numpy.random.Generator`). Statistics of the honest updates are computed in
float64. These are simulation tools, written in plain numpy.

Examples
--------
>>> honest = np.random.default_rng(0).standard_normal((8, 100)).astype(np.float32)
>>> updates = np.concatenate([honest, fedkern.attacks.alie(honest, f=2)])
>>> fedkern.median(updates).shape
(100,)
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from . import _validate as check
from .aggregate import UpdatesLike


def _honest(honest: UpdatesLike, f) -> tuple[np.ndarray, int, np.dtype]:
    """The honest updates stacked in float64, the validated f, and the updates' dtype."""
    rows = check.updates(honest, "honest")
    return np.array([np.asarray(row, np.float64) for row in rows]), check.count(f, "f"), rows.dtype


def _repeat(vector: np.ndarray, f: int, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.repeat(vector[None, :], f, axis=0).astype(dtype)


def sign_flip(honest: UpdatesLike, f: int) -> np.ndarray:
    r"""Sign flipping: every Byzantine client sends :math:`-\bar{x}`, the negated honest mean."""
    x, f, dtype = _honest(honest, f)
    return _repeat(-x.mean(axis=0), f, dtype)


def ipm(honest: UpdatesLike, f: int, tau: float = 0.1) -> np.ndarray:
    r"""Inner product manipulation (Xie et al., UAI 2019): :math:`-\tau \bar{x}`."""
    x, f, dtype = _honest(honest, f)
    tau = check.real(tau, "tau", low=0.0)
    return _repeat(-tau * x.mean(axis=0), f, dtype)


def alie_z(n: int, f: int) -> float:
    r"""Baruch et al.'s (NeurIPS 2019) default z for n clients of which f are Byzantine.

    :math:`s = \lfloor n/2 + 1 \rfloor - f` and :math:`z = \Phi^{-1}((n - s)/n)`.
    """
    n, f = check.count(n, "n", low=1), check.count(f, "f")
    s = (n // 2 + 1) - f
    if not 0 < n - s < n:
        raise check.FedkernValueError(f"alie_z: n={n}, f={f} leaves no valid quantile (n - s = {n - s})")
    return NormalDist().inv_cdf((n - s) / n)


def alie(honest: UpdatesLike, f: int, z: float | None = None) -> np.ndarray:
    r"""A little is enough (Baruch et al., NeurIPS 2019): :math:`\bar{x} + z \sigma`.

    :math:`\sigma` is the coordinate-wise (population) standard deviation of the honest
    updates; ``z`` defaults to :func:`alie_z` with n = K + f clients.
    """
    x, f, dtype = _honest(honest, f)
    z = alie_z(x.shape[0] + f, f) if z is None else check.real(z, "z")
    return _repeat(x.mean(axis=0) + z * x.std(axis=0), f, dtype)


def gaussian(honest: UpdatesLike, f: int, mean: float = 0.0, std: float = 1.0, seed=None) -> np.ndarray:
    r"""Gaussian noise: each Byzantine client sends an independent :math:`N(\mu, \sigma^2 I)` vector."""
    rows = check.updates(honest, "honest")
    f = check.count(f, "f")
    mean, std = check.real(mean, "mean"), check.real(std, "std", low=0.0)
    return np.random.default_rng(seed).normal(mean, std, (f, rows.d)).astype(rows.dtype)


def infinite(honest: UpdatesLike, f: int) -> np.ndarray:
    """Every Byzantine client sends a vector of +inf (tests the non-finite handling)."""
    rows = check.updates(honest, "honest")
    return np.full((check.count(f, "f"), rows.d), np.inf, rows.dtype)
