"""Cython/OpenMP kernels of the server-optimizer family: one fused pass per step.

Same kernels and arguments as ``fedkern._reference.optim``: ``delta`` is the aggregated
client delta, state arrays share ``params``' dtype and are updated in place, and each
coordinate is computed in float64 and rounded once on store.
"""
from cython.parallel cimport prange
from libc.math cimport sqrt

ctypedef fused param_t:
    float
    double

ctypedef fused delta_t:
    float
    double

cdef enum:
    ADAGRAD = 0
    ADAM = 1
    YOGI = 2


def momentum_step(params, delta, momentum_buffer, double lr, double momentum) -> None:
    """m = momentum * m + delta; params += lr * m."""
    _momentum_step(params, delta, momentum_buffer, lr, momentum)


def _momentum_step(param_t[::1] params, const delta_t[::1] delta, param_t[::1] m,
                   double lr, double momentum):
    cdef Py_ssize_t j, d = params.shape[0]
    cdef double mj
    with nogil:
        for j in prange(d, schedule="static"):
            mj = momentum * m[j] + delta[j]
            m[j] = <param_t> mj
            params[j] = <param_t> (params[j] + lr * mj)


def adaptive_step(params, delta, m, v, double lr, double beta1, double beta2, double tau,
                  double c1, double c2, int rule) -> None:
    """Reddi et al. (2021) adaptive step; rule 0 = Adagrad, 1 = Adam, 2 = Yogi."""
    _adaptive_step(params, delta, m, v, lr, beta1, beta2, tau, c1, c2, rule)


def _adaptive_step(param_t[::1] params, const delta_t[::1] delta, param_t[::1] m,
                   param_t[::1] v, double lr, double beta1, double beta2, double tau,
                   double c1, double c2, int rule):
    cdef Py_ssize_t j, d = params.shape[0]
    cdef double g, g2, mj, vj, vold
    with nogil:
        for j in prange(d, schedule="static"):
            g = delta[j]
            g2 = g * g
            vold = v[j]
            mj = beta1 * m[j] + (1.0 - beta1) * g
            if rule == ADAGRAD:
                vj = vold + g2
            elif rule == ADAM:
                vj = beta2 * vold + (1.0 - beta2) * g2
            else:
                vj = vold - (1.0 - beta2) * g2 * ((vold > g2) - (vold < g2))
            m[j] = <param_t> mj
            v[j] = <param_t> vj
            params[j] = <param_t> (params[j] + lr * (c1 * mj) / (sqrt(c2 * vj) + tau))
