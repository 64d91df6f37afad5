"""Cython/OpenMP kernels of the server-optimizer family: one fused pass per step.

Same kernels and arguments as ``fedkern._reference.optim``: ``delta`` is the aggregated
client delta, state arrays share ``params``' dtype and are updated in place, and each
coordinate is computed in float64 and rounded once on store. ``prange`` runs over blocks
and each block is a plain loop in an inline function, which the C compiler vectorises
(loops directly under ``prange`` carry OpenMP bookkeeping that stops it).
"""
from cython.parallel cimport prange
from libc.math cimport sqrt

from _blocks cimport OPTIM_BLOCK  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t, out_t  # out_t: parameters and optimizer state; in_t: the delta

cdef enum:
    ADAGRAD = 0
    ADAM = 1
    YOGI = 2


def momentum_step(params, delta, momentum_buffer, double lr, double momentum) -> None:
    """m = momentum * m + delta; params += lr * m."""
    _momentum_step(params, delta, momentum_buffer, lr, momentum)


cdef inline void _momentum_block(out_t* x, const in_t* g, out_t* m, Py_ssize_t n,
                                 double lr, double momentum) noexcept nogil:
    cdef Py_ssize_t j
    cdef double mj
    for j in range(n):
        mj = momentum * m[j] + g[j]
        m[j] = <out_t> mj
        x[j] = <out_t> (x[j] + lr * mj)


def _momentum_step(out_t[::1] params, const in_t[::1] delta, out_t[::1] m,
                   double lr, double momentum):
    cdef Py_ssize_t b, j0, d = params.shape[0]
    with nogil:
        for b in prange((d + OPTIM_BLOCK - 1) // OPTIM_BLOCK, schedule="static"):
            j0 = b * OPTIM_BLOCK
            _momentum_block(&params[j0], &delta[j0], &m[j0], min(<Py_ssize_t> OPTIM_BLOCK, d - j0), lr, momentum)


def adaptive_step(params, delta, m, v, double lr, double beta1, double beta2, double tau,
                  double c1, double c2, int rule) -> None:
    """Reddi et al. (2021) adaptive step; rule 0 = Adagrad, 1 = Adam, 2 = Yogi.

    v = a v + (b - s sign(v - g^2)) g^2 covers the three rules without a branch in the loop
    (which would stop vectorisation); the coefficient of g^2 is exact, so the rounding
    equals the per-rule formulas, and no term multiplies g^2 by zero (which would turn an
    overflowed g^2 into NaN where the reference keeps inf).
    """
    cdef double a = beta2 if rule == ADAM else 1.0
    cdef double b = 1.0 if rule == ADAGRAD else (1.0 - beta2 if rule == ADAM else 0.0)
    cdef double s = 1.0 - beta2 if rule == YOGI else 0.0
    _adaptive_step(params, delta, m, v, lr, beta1, tau, c1, c2, a, b, s)


cdef inline void _adaptive_block(out_t* x, const in_t* delta, out_t* m, out_t* v,
                                 Py_ssize_t n, double lr, double beta1, double tau, double c1,
                                 double c2, double a, double b, double s) noexcept nogil:
    cdef Py_ssize_t j
    cdef double g, g2, mj, vj, vold
    for j in range(n):
        g = delta[j]
        g2 = g * g
        vold = v[j]
        mj = beta1 * m[j] + (1.0 - beta1) * g
        # sign(vold - g2) as doubles: an int-valued comparison would stop vectorisation
        vj = a * vold + (b - s * ((1.0 if vold > g2 else 0.0) - (1.0 if vold < g2 else 0.0))) * g2
        m[j] = <out_t> mj
        v[j] = <out_t> vj
        x[j] = <out_t> (x[j] + lr * (c1 * mj) / (sqrt(c2 * vj) + tau))


def _adaptive_step(out_t[::1] params, const in_t[::1] delta, out_t[::1] m, out_t[::1] v,
                   double lr, double beta1, double tau, double c1, double c2,
                   double a, double b, double s):
    cdef Py_ssize_t blk, j0, d = params.shape[0]
    with nogil:
        for blk in prange((d + OPTIM_BLOCK - 1) // OPTIM_BLOCK, schedule="static"):
            j0 = blk * OPTIM_BLOCK
            _adaptive_block(&params[j0], &delta[j0], &m[j0], &v[j0], min(<Py_ssize_t> OPTIM_BLOCK, d - j0),
                            lr, beta1, tau, c1, c2, a, b, s)
