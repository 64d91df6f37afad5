r"""Server optimizers: objects that own their state and step the global model in place.

Convention (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the
**pseudo-gradient** :math:`\Delta_t` passed to :meth:`ServerOptimizer.step` is the
aggregated client delta, i.e. the weighted mean of (client model - global model), so
every optimizer moves the model *along* it: FedAvg with ``lr=1`` sets the model to the
clients' weighted mean. (Flower's FedAvgM uses old - new and subtracts; that is the same
step with the sign of the pseudo-gradient flipped.)

Each step is one fused pass over ``params``, ``delta`` and the state; state arrays are
created on the first step with ``params``' length and dtype, and every coordinate is
computed in float64 and rounded once on store.
"""
from __future__ import annotations

import numpy as np

from . import _validate as check
from .backends import kernels

ADAGRAD, ADAM, YOGI = 0, 1, 2  # the ``rule`` argument of every backend's adaptive_step


class ServerOptimizer:
    """Base class: validates a step, owns the state, counts steps (``self.t``)."""

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float, *, check_finite: bool = True, backend: str | None = None):
        self.lr = check.real(lr, "lr", low=0.0, low_inclusive=False)
        self.check_finite = check_finite
        self.backend = backend
        self.state: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Apply one server step to ``params`` (1-D, updated in place and returned).

        ``delta`` is the round's pseudo-gradient, e.g. ``fedkern.weighted_mean`` of the
        client deltas. With ``check_finite`` a non-finite ``delta`` raises before
        ``params`` or the state are touched.
        """
        params = check.vector(params, "params", writeable=True)
        delta = check.vector(delta, "delta", length=params.shape[0])
        if not self.state:
            self.state = {name: self._initial_state(name, params) for name in self.state_names}
        for name, array in self.state.items():
            if array.shape != params.shape or array.dtype != params.dtype:
                raise check.FedkernValueError(
                    f"params has shape {params.shape} and dtype {params.dtype} but the optimizer "
                    f"state was created for {array.shape} {array.dtype}; call reset() to start over"
                )
        aggregate_kernels = kernels("aggregate", self.backend)
        if self.check_finite and aggregate_kernels.count_nonfinite(delta):
            check.raise_nonfinite(f"{type(self).__name__}.step", [delta], name="delta")
        self.t += 1
        self._apply(params, delta, aggregate_kernels)
        return params

    def reset(self) -> None:
        """Drop the state and the step count (the next step starts afresh)."""
        self.state = {}
        self.t = 0

    def _initial_state(self, name: str, params: np.ndarray) -> np.ndarray:
        return np.zeros_like(params)

    def _apply(self, params, delta, aggregate_kernels) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("state", "t", "backend"))
        return f"{type(self).__name__}({settings})"


class FedAvg(ServerOptimizer):
    r"""Plain server SGD on the pseudo-gradient: :math:`x \leftarrow x + \eta \Delta`.

    With ``lr=1`` (the default) this is McMahan et al.'s FedAvg.

    Examples
    --------
    >>> params = np.zeros(3, np.float32)
    >>> fedkern.FedAvg().step(params, np.ones(3, np.float32))
    array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, lr: float = 1.0, **options):
        super().__init__(lr, **options)

    def _apply(self, params, delta, aggregate_kernels):
        aggregate_kernels.accumulate(params, delta, self.lr)


class FedAvgM(ServerOptimizer):
    r"""Server momentum (Hsu et al. 2019): :math:`m \leftarrow \mu m + \Delta,\ x \leftarrow x + \eta m`.

    Examples
    --------
    >>> opt, params = fedkern.FedAvgM(lr=1.0, momentum=0.5), np.zeros(2)
    >>> opt.step(params, np.ones(2)); opt.step(params, np.ones(2))
    array([2.5, 2.5])
    """

    state_names = ("momentum",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, **options):
        super().__init__(lr, **options)
        self.momentum = check.real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)

    def _apply(self, params, delta, aggregate_kernels):
        kernels("optim", self.backend).momentum_step(params, delta, self.state["momentum"], self.lr, self.momentum)


class _AdaptiveOptimizer(ServerOptimizer):
    """Reddi et al. (2021), Algorithm 2; subclasses choose the second-moment ``rule``."""

    state_names = ("m", "v")
    rule = ADAM

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float, *, bias_correction: bool = False,
                 initial_v: float | None = None, **options):
        super().__init__(lr, **options)
        self.beta1 = check.real(beta1, "beta1", low=0.0, high=1.0, high_inclusive=False)
        self.beta2 = check.real(beta2, "beta2", low=0.0, high=1.0, high_inclusive=False)
        self.tau = check.real(tau, "tau", low=0.0, low_inclusive=False)
        self.bias_correction = bool(bias_correction)
        self.initial_v = self.tau**2 if initial_v is None else check.real(initial_v, "initial_v", low=0.0)

    def _initial_state(self, name, params):
        return np.full_like(params, self.initial_v) if name == "v" else np.zeros_like(params)

    def _apply(self, params, delta, aggregate_kernels):
        c1 = c2 = 1.0
        if self.bias_correction:
            c1 = 1.0 / (1.0 - self.beta1**self.t)
            c2 = 1.0 / (1.0 - self.beta2**self.t) if self.rule != ADAGRAD else 1.0
        kernels("optim", self.backend).adaptive_step(
            params, delta, self.state["m"], self.state["v"],
            self.lr, self.beta1, self.beta2, self.tau, c1, c2, self.rule,
        )


class FedAdagrad(_AdaptiveOptimizer):
    r"""FedAdagrad: :math:`v_t = v_{t-1} + \Delta_t^2` (``beta2`` unused; ``bias_correction`` scales ``m`` only). See :class:`FedAdam` for the step."""

    rule = ADAGRAD

    def __init__(self, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3, **options):
        super().__init__(lr, beta1, 0.0, tau, **options)


class FedAdam(_AdaptiveOptimizer):
    r"""FedAdam (Reddi et al. 2021): :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2` and

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\Delta_t, \qquad
        x_{t+1} = x_t + \eta\,\frac{c_1 m_t}{\sqrt{c_2 v_t} + \tau}

    with :math:`c_1 = 1/(1-\beta_1^t)`, :math:`c_2 = 1/(1-\beta_2^t)` if
    ``bias_correction=True`` and 1 otherwise (the default, as in the paper). ``m``
    starts at 0 and ``v`` at ``initial_v`` (default :math:`\tau^2`: the paper's
    :math:`v_{-1} \ge \tau^2`). ``m`` and ``v`` are in :attr:`state`.

    Examples
    --------
    >>> opt, params = fedkern.FedAdam(lr=0.1), np.zeros(2, np.float32)
    >>> opt.step(params, np.ones(2, np.float32)).round(4)
    array([0.0996, 0.0996], dtype=float32)
    """

    rule = ADAM

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **options):
        super().__init__(lr, beta1, beta2, tau, **options)


class FedYogi(_AdaptiveOptimizer):
    r"""FedYogi: :math:`v_t = v_{t-1} - (1-\beta_2)\Delta_t^2\,\mathrm{sign}(v_{t-1} - \Delta_t^2)`. See :class:`FedAdam`."""

    rule = YOGI

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **options):
        super().__init__(lr, beta1, beta2, tau, **options)
