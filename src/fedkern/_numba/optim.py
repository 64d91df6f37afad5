"""Numba kernels of the server-optimizer family; same math as ``ext/optim.pyx``."""
import numpy as np
from numba import njit, prange

from ._runtime import KERNEL

ADAGRAD, ADAM, YOGI = 0, 1, 2


@njit(**KERNEL)
def momentum_step(params, delta, momentum_buffer, lr, momentum):
    """m = momentum * m + delta; params += lr * m."""
    for j in prange(params.shape[0]):
        mj = momentum * np.float64(momentum_buffer[j]) + delta[j]
        momentum_buffer[j] = mj
        params[j] = params[j] + lr * mj


def adaptive_step(params, delta, m, v, lr, beta1, beta2, tau, c1, c2, rule) -> None:
    """Reddi et al. (2021) adaptive step; rule 0 = Adagrad, 1 = Adam, 2 = Yogi.

    v = a v + (b - s sign(v - g^2)) g^2 with per-rule coefficients, as in ext/optim.pyx.
    """
    a = beta2 if rule == ADAM else 1.0
    b = 1.0 if rule == ADAGRAD else (1.0 - beta2 if rule == ADAM else 0.0)
    s = 1.0 - beta2 if rule == YOGI else 0.0
    _adaptive_step(params, delta, m, v, lr, beta1, tau, c1, c2, a, b, s)


@njit(**KERNEL)
def _adaptive_step(params, delta, m, v, lr, beta1, tau, c1, c2, a, b, s):
    for j in prange(params.shape[0]):
        g = np.float64(delta[j])
        g2 = g * g
        vold = np.float64(v[j])
        mj = beta1 * m[j] + (1.0 - beta1) * g
        # sign(vold - g2) from comparisons: np.sign(inf - inf) would be NaN, and 0 * NaN
        # would poison the rules that do not use it
        sign = (1.0 if vold > g2 else 0.0) - (1.0 if vold < g2 else 0.0)
        vj = a * vold + (b - s * sign) * g2
        m[j] = mj
        v[j] = vj
        params[j] = params[j] + lr * (c1 * mj) / (np.sqrt(c2 * vj) + tau)
