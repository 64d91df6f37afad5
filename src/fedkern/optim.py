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

import inspect

import numpy as np

from . import _validate as check
from .backends import _check_name, kernels

ADAGRAD, ADAM, YOGI = 0, 1, 2  # the ``rule`` argument of every backend's adaptive_step


def _flag(value, name: str) -> bool:
    # bool() would take any object, so a misplaced argument (a string, an array) would pass
    if not isinstance(value, (bool, np.bool_)):
        raise check.FedkernTypeError(f"{name} must be True or False; got {type(value).__name__}")
    return bool(value)


class ServerOptimizer:
    """Base class: validates a step, owns the state, counts steps (``self.t``).

    Parameters
    ----------
    lr : float
        Server learning rate, > 0.
    check_finite : bool, default True
        Raise :class:`fedkern.NonFiniteError` on a NaN or infinite ``delta``, before
        ``params`` or the state are touched.
    backend : str or None, default None
        ``"reference"``, ``"cython"``, ``"numba"`` or ``"auto"``; None follows
        :func:`fedkern.set_backend` at each step.
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float, *, check_finite: bool = True, backend: str | None = None):
        self.lr = check.real(lr, "lr", low=0.0, low_inclusive=False)
        self.check_finite = _flag(check_finite, "check_finite")
        # checked now, so a misspelt backend fails here rather than at the first step
        self.backend = None if backend is None else _check_name(backend)
        self.state: dict[str, np.ndarray] = {}
        self.t = 0

    def _reject(self, unknown: dict, **not_taken: str) -> None:
        """Raise for keyword arguments the subclass's ``__init__`` collected in ``**unknown``.

        ``not_taken`` maps an argument that a sibling optimizer takes, but this one has no
        use for, to the reason. The accepted arguments are read from the signature, so the
        message cannot go stale.
        """
        if not unknown:
            return
        cls = type(self)
        name = next(iter(unknown))
        accepted = ", ".join(
            p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        reason = f" ({not_taken[name]})" if name in not_taken else ""
        raise check.FedkernTypeError(f"{cls.__name__} has no argument {name!r}{reason}; it accepts {accepted}")

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Apply one server step to ``params`` (1-D, updated in place and returned).

        ``delta`` is the round's pseudo-gradient, e.g. ``fedkern.weighted_mean`` of the
        client deltas; it is only read, and may be read-only or of the other float dtype.
        With ``check_finite`` a non-finite ``delta`` raises before ``params``, the state or
        :attr:`t` are touched.
        """
        params = check.vector(params, "params", writeable=True)
        delta = check.vector(delta, "delta", length=params.shape[0])
        for name, array in self.state.items():
            if array.shape != params.shape or array.dtype != params.dtype:
                raise check.FedkernValueError(
                    f"params has shape {params.shape} and dtype {params.dtype} but the optimizer "
                    f"state was created for {array.shape} {array.dtype}; call reset() to start over"
                )
        aggregate_kernels = kernels("aggregate", self.backend)
        if self.check_finite and aggregate_kernels.count_nonfinite(delta):
            check.raise_nonfinite(f"{type(self).__name__}.step", [delta], name="delta")
        # only after the check: a rejected first step must leave no state to mismatch later
        if not self.state:
            self.state = {name: self._initial_state(name, params) for name in self.state_names}
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

    With ``lr=1`` (the default) this is McMahan et al.'s FedAvg. Takes ``lr``,
    ``check_finite`` and ``backend`` as :class:`ServerOptimizer`; it has no state.

    Examples
    --------
    >>> params = np.zeros(3, np.float32)
    >>> fedkern.FedAvg().step(params, np.ones(3, np.float32))
    array([1., 1., 1.], dtype=float32)
    """

    def __init__(self, lr: float = 1.0, *, check_finite: bool = True, backend: str | None = None, **unknown: object):
        self._reject(unknown, momentum="server momentum is FedAvgM")
        super().__init__(lr, check_finite=check_finite, backend=backend)

    def _apply(self, params, delta, aggregate_kernels):
        aggregate_kernels.accumulate(params, delta, self.lr)


class FedAvgM(ServerOptimizer):
    r"""Server momentum (Hsu et al. 2019): :math:`m \leftarrow \mu m + \Delta,\ x \leftarrow x + \eta m`.

    Parameters
    ----------
    lr : float, default 1.0
        Server learning rate :math:`\eta`, > 0.
    momentum : float, default 0.9
        :math:`\mu`, in [0, 1). ``m`` starts at 0 and is in :attr:`state`.
    check_finite, backend
        As for :class:`ServerOptimizer`.

    Examples
    --------
    >>> opt, params = fedkern.FedAvgM(lr=1.0, momentum=0.5), np.zeros(2)
    >>> opt.step(params, np.ones(2))
    array([1., 1.])
    >>> opt.step(params, np.ones(2))  # m = 0.5 * 1 + 1
    array([2.5, 2.5])
    """

    state_names = ("momentum",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9, *, check_finite: bool = True,
                 backend: str | None = None, **unknown: object):
        self._reject(unknown)
        super().__init__(lr, check_finite=check_finite, backend=backend)
        self.momentum = check.real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)

    def _apply(self, params, delta, aggregate_kernels):
        kernels("optim", self.backend).momentum_step(params, delta, self.state["momentum"], self.lr, self.momentum)


class _AdaptiveOptimizer(ServerOptimizer):
    """Reddi et al. (2021), Algorithm 2; subclasses choose the second-moment ``rule``."""

    state_names = ("m", "v")
    rule = ADAM

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float, *, bias_correction: bool,
                 initial_v: float | None, check_finite: bool, backend: str | None):
        super().__init__(lr, check_finite=check_finite, backend=backend)
        self.beta1 = check.real(beta1, "beta1", low=0.0, high=1.0, high_inclusive=False)
        self.beta2 = check.real(beta2, "beta2", low=0.0, high=1.0, high_inclusive=False)
        self.tau = check.real(tau, "tau", low=0.0, low_inclusive=False)
        self.bias_correction = _flag(bias_correction, "bias_correction")
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
    r"""FedAdagrad: :math:`v_t = v_{t-1} + \Delta_t^2`; the step is :class:`FedAdam`'s.

    Takes the arguments of :class:`FedAdam` except ``beta2``: the second moment is a
    running sum, with no decay rate to set. ``bias_correction`` scales ``m`` only
    (:math:`c_2 = 1`).
    """

    rule = ADAGRAD

    def __init__(self, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3, *, bias_correction: bool = False,
                 initial_v: float | None = None, check_finite: bool = True, backend: str | None = None,
                 **unknown: object):
        self._reject(unknown, beta2="its second moment is a running sum of squares, with no decay rate")
        super().__init__(lr, beta1, 0.0, tau, bias_correction=bias_correction, initial_v=initial_v,
                         check_finite=check_finite, backend=backend)


class FedAdam(_AdaptiveOptimizer):
    r"""FedAdam (Reddi et al. 2021): :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2)\Delta_t^2` and

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\Delta_t, \qquad
        x_{t+1} = x_t + \eta\,\frac{c_1 m_t}{\sqrt{c_2 v_t} + \tau}

    with :math:`c_1 = 1/(1-\beta_1^t)`, :math:`c_2 = 1/(1-\beta_2^t)` if
    ``bias_correction=True`` and 1 otherwise (the default, as in the paper). ``m``
    starts at 0 and ``v`` at ``initial_v`` (default :math:`\tau^2`: the paper's
    :math:`v_{-1} \ge \tau^2`). ``m`` and ``v`` are in :attr:`state`.

    Parameters
    ----------
    lr : float, default 0.1
        :math:`\eta`, > 0.
    beta1, beta2 : float, default 0.9, 0.99
        Decay rates of ``m`` and ``v``, in [0, 1).
    tau : float, default 1e-3
        Adaptivity :math:`\tau`, > 0.
    bias_correction : bool, default False
        Scale by :math:`c_1, c_2` as above.
    initial_v : float or None, default None
        Starting value of ``v``, >= 0; None means :math:`\tau^2`.
    check_finite, backend
        As for :class:`ServerOptimizer`.

    Examples
    --------
    >>> opt, params = fedkern.FedAdam(lr=0.1), np.zeros(2, np.float32)
    >>> opt.step(params, np.ones(2, np.float32)).round(4)  # 0.1 * 0.1 / (sqrt(0.01000099) + 0.001)
    array([0.099, 0.099], dtype=float32)
    """

    rule = ADAM

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, *,
                 bias_correction: bool = False, initial_v: float | None = None, check_finite: bool = True,
                 backend: str | None = None, **unknown: object):
        self._reject(unknown)
        super().__init__(lr, beta1, beta2, tau, bias_correction=bias_correction, initial_v=initial_v,
                         check_finite=check_finite, backend=backend)


class FedYogi(_AdaptiveOptimizer):
    r"""FedYogi: :math:`v_t = v_{t-1} - (1-\beta_2)\Delta_t^2\,\mathrm{sign}(v_{t-1} - \Delta_t^2)`.

    Same arguments and step as :class:`FedAdam`, with ``lr`` defaulting to 0.01. Where
    :math:`v_{t-1} = \Delta_t^2` exactly, ``v`` is left as it is (:math:`\mathrm{sign}(0) = 0`).
    """

    rule = YOGI

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, *,
                 bias_correction: bool = False, initial_v: float | None = None, check_finite: bool = True,
                 backend: str | None = None, **unknown: object):
        self._reject(unknown)
        super().__init__(lr, beta1, beta2, tau, bias_correction=bias_correction, initial_v=initial_v,
                         check_finite=check_finite, backend=backend)
