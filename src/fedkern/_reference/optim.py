"""Reference kernels of the server-optimizer family, in plain numpy.

``delta`` is the pseudo-gradient: the aggregated client delta (new minus old model), so
every step moves ``params`` *along* it. State arrays are updated in place; the step uses
the float64 values before they are rounded into the state's dtype.
"""
import numpy as np

ADAGRAD, ADAM, YOGI = 0, 1, 2


def momentum_step(params, delta, momentum_buffer, lr: float, momentum: float) -> None:
    """m = momentum * m + delta; params += lr * m."""
    m = momentum * momentum_buffer.astype(np.float64) + delta
    momentum_buffer[...] = m
    params[...] = params + lr * m


def adaptive_step(params, delta, m, v, lr, beta1, beta2, tau, c1, c2, rule) -> None:
    """Reddi et al. (2021) adaptive server step; ``rule`` is ADAGRAD, ADAM or YOGI.

    m = beta1 m + (1 - beta1) delta, v per rule, params += lr (c1 m) / (sqrt(c2 v) + tau),
    with c1, c2 the bias corrections (1 when off).
    """
    g = delta.astype(np.float64)
    g2 = g * g
    v_old = v.astype(np.float64)
    m_new = beta1 * m.astype(np.float64) + (1.0 - beta1) * g
    if rule == ADAGRAD:
        v_new = v_old + g2
    elif rule == ADAM:
        v_new = beta2 * v_old + (1.0 - beta2) * g2
    else:
        v_new = v_old - (1.0 - beta2) * g2 * np.sign(v_old - g2)
    m[...] = m_new
    v[...] = v_new
    params[...] = params + lr * (c1 * m_new) / (np.sqrt(c2 * v_new) + tau)
