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


@njit(**KERNEL)
def adaptive_step(params, delta, m, v, lr, beta1, beta2, tau, c1, c2, rule):
    """Reddi et al. (2021) adaptive step; rule 0 = Adagrad, 1 = Adam, 2 = Yogi."""
    for j in prange(params.shape[0]):
        g = np.float64(delta[j])
        g2 = g * g
        vold = np.float64(v[j])
        mj = beta1 * m[j] + (1.0 - beta1) * g
        if rule == ADAGRAD:
            vj = vold + g2
        elif rule == ADAM:
            vj = beta2 * vold + (1.0 - beta2) * g2
        else:
            vj = vold - (1.0 - beta2) * g2 * np.sign(vold - g2)
        m[j] = mj
        v[j] = vj
        params[j] = params[j] + lr * (c1 * mj) / (np.sqrt(c2 * vj) + tau)
