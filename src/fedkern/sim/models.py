"""Models of the simulation engine: a protocol, and two built-ins trained by compiled kernels.

A model's parameters are one flat float32 vector. The round engine calls
:meth:`Model.train` once per client with a preallocated ``delta_out`` row and
:meth:`Model.evaluate` on held-out data; users plug in any object with these methods
(e.g. one wrapping a torch module). The built-ins, :class:`LogisticRegression` and
:class:`MLP`, are dense networks whose training loop runs entirely in one compiled
kernel that releases the GIL, so a thread executor trains clients in parallel:
``backend="cython"`` (``fedkern._cython.models``, the fastest: vectorised without
reassociation) or ``"numba"`` (``fedkern._numba.models``); the default ``"auto"`` takes
the first that imports, in that order. ``backend="reference"`` runs the numpy twin of
the same math (``fedkern._reference.models``). The backends differ only in float64
summation order, so they agree to float32 tolerance.

Math of one local step on a minibatch B, with weights w, the round's global model
w_g and logits z = f(x; w) of a row x with label y:

* loss: l = -log softmax(z)_y = log sum_j exp(z_j - m) - (z_y - m), m = max_j z_j
  (subtracting m keeps exp from overflowing);
* its gradient with respect to the logits: dl/dz = softmax(z) - onehot(y), then
  backpropagated through the layers (ReLU passes the gradient where its input > 0);
* g = (1/|B|) sum_{x in B} dl/dw + weight_decay w + mu (w - w_g), the last term
  FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous
  Networks", MLSys 2020);
* heavy-ball momentum: v = momentum v + g; w = w - lr v (v starts at 0 each call).

Every epoch visits the client's rows in a uniformly random order, in batches of
``batch_size``. The orders come from one 64-bit seed drawn from ``rng``: epoch e's is the
Fisher-Yates shuffle of 0 .. n - 1 on stream e of fedkern's counter-based generator under
that seed, each swap index drawn by Lemire's exact multiply-shift with rejection, inside
the compiled kernels (without the GIL) and the same on every backend; the last batch of an epoch holds the remaining ``n % batch_size`` rows
when that is not 0 (it is not dropped or padded). Weight decay applies to every
parameter, biases included. Precision: inputs and parameters are float32, all
arithmetic inside a call is float64, and the trained weights are rounded to float32
once; ``delta_out = float32(w_final) - params`` in float32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .. import _validate, backends
from .._errors import FedkernTypeError, FedkernValueError

#: The ``backend`` choices of the built-ins; "auto" resolves to the first of "cython",
#: "numba" (then "reference") that imports here.
BACKENDS = ("auto", "cython", "numba", "reference")


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains locally: minibatch SGD with momentum, L2 and FedProx terms.

    Parameters
    ----------
    epochs : int
        Passes over the client's data (>= 1).
    batch_size : int
        Rows per minibatch (>= 1); a batch size above the client's row count is one
        full batch per epoch.
    lr : float
        Learning rate (> 0).
    momentum : float
        Heavy-ball coefficient (>= 0): v = momentum v + g; w -= lr v.
    weight_decay : float
        L2 coefficient (>= 0): g += weight_decay w.
    mu : float
        FedProx proximal coefficient (>= 0; Li et al. 2020): g += mu (w - w_global).

    Examples
    --------
    >>> from fedkern.sim.models import LocalTraining
    >>> LocalTraining(epochs=2, lr=0.1).batch_size
    10
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0

    def __post_init__(self) -> None:
        _validate.count(self.epochs, "epochs", low=1)
        _validate.count(self.batch_size, "batch_size", low=1)
        _validate.real(self.lr, "lr", low=0.0, low_inclusive=False)
        for name in ("momentum", "weight_decay", "mu"):
            _validate.real(getattr(self, name), name, low=0.0)


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training reports.

    Attributes
    ----------
    loss : float
        Mean over the local steps of each minibatch's mean cross-entropy, taken before
        the step (nan when the client has no rows).
    steps : int
        Minibatch SGD steps taken: epochs * ceil(n / batch_size).
    """

    loss: float
    steps: int


@dataclass(frozen=True)
class Evaluation:
    """A model's quality on labelled rows.

    Attributes
    ----------
    loss : float
        Mean softmax cross-entropy.
    accuracy : float
        Fraction of rows whose largest logit (the first one on ties) is the label.
    recall : numpy.ndarray
        (n_classes,) per-class recall; nan for classes absent from y.
    n : int
        Rows evaluated. With none, loss, accuracy and every recall are nan.
    """

    loss: float
    accuracy: float
    recall: np.ndarray
    n: int

    @property
    def balanced_accuracy(self) -> float:
        """Mean recall over the classes present in y (nan if none)."""
        present = self.recall[~np.isnan(self.recall)]
        return float(present.mean()) if present.size else math.nan

    @property
    def worst_class_accuracy(self) -> float:
        """The lowest recall over the classes present in y (nan if none)."""
        present = self.recall[~np.isnan(self.recall)]
        return float(present.min()) if present.size else math.nan


@runtime_checkable
class Model(Protocol):
    """What the round engine needs from a model; implement it to plug in your own.

    ``init`` returns a fresh (n_params,) float32 vector. ``train`` trains a private
    copy starting at ``params`` (never modifying it) on rows x (float32, (N, F)) with
    labels y (int32, (N,)), writes ``delta_out[:] = w_after - params`` (float32) and
    returns a :class:`TrainResult`; ``rng`` drives the minibatch order. ``evaluate``
    and ``loss`` leave ``params`` unchanged.
    """

    n_params: int
    n_classes: int

    def init(self, rng: np.random.Generator) -> np.ndarray: ...

    def train(self, params: np.ndarray, x: np.ndarray, y: np.ndarray, config: LocalTraining,
              rng: np.random.Generator, delta_out: np.ndarray) -> TrainResult: ...

    def evaluate(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> Evaluation: ...

    def loss(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float: ...


class _DenseNetwork:
    """Shared machinery of the built-ins: layer widths, checks and the kernel calls."""

    def __init__(self, widths: Sequence[int], backend: str):
        if backend not in BACKENDS:
            raise FedkernValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        # an explicitly chosen backend that does not import raises BackendUnavailableError here
        self._kernels = backends.kernels("models", backend)
        self.backend = self._kernels.backend  # the concrete backend, also when "auto" chose it
        self._sizes = np.array(widths, np.int64)
        self.n_features = int(widths[0])
        self.n_classes = int(widths[-1])
        self.n_params = int(sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:])))

    def __getstate__(self) -> dict:
        # kernels are modules, which do not pickle: a copy sent to another process (a Flower
        # or Ray worker, a process executor) loads the same concrete backend there
        return {k: v for k, v in vars(self).items() if k != "_kernels"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._kernels = backends.kernels("models", self.backend)

    def _check(self, params: np.ndarray, x, y) -> int:
        """Cheap checks of one call's inputs (shapes, dtypes, label range); returns n."""
        _check_array(params, "params", np.float32, (self.n_params,))
        _check_array(x, "x", np.float32, None)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise FedkernValueError(f"x must have shape (n, {self.n_features}); got {x.shape}")
        _check_array(y, "y", np.int32, (x.shape[0],))
        n = x.shape[0]
        if n and (y.min() < 0 or y.max() >= self.n_classes):
            bad = int(np.flatnonzero((y < 0) | (y >= self.n_classes))[0])
            raise FedkernValueError(f"y[{bad}] is {y[bad]}; labels must be in 0 .. {self.n_classes - 1}")
        return n

    #: train() takes SCAFFOLD's ``correction`` (a model of your own may too: set this)
    takes_correction = True
    #: train() takes FBL's ``logit_adjustment`` (a model of your own may too: set this)
    takes_logit_adjustment = True

    def train(self, params: np.ndarray, x: np.ndarray, y: np.ndarray, config: LocalTraining,
              rng: np.random.Generator, delta_out: np.ndarray, correction: np.ndarray | None = None,
              logit_adjustment: np.ndarray | None = None) -> TrainResult:
        """Run local SGD from ``params`` on (x, y); write ``delta_out = w_after - params``.

        See the module docstring for the step, the batch order and the precision. A
        client with no rows leaves the model as it is: delta 0, loss nan, 0 steps.
        ``correction`` (float32, like ``params``; SCAFFOLD's c - c_i) is added to every
        step's gradient. ``logit_adjustment`` (float32, (n_classes,); FBL's tau log of the
        client's label prior) is added to the logits in training only, the loss becoming
        -log softmax(z + a)_y (Menon et al. 2021; Balanced Softmax, Ren et al. 2020).
        """
        n = self._check(params, x, y)
        if correction is not None:
            _check_array(correction, "correction", np.float32, (self.n_params,))
        if logit_adjustment is not None:
            _check_array(logit_adjustment, "logit_adjustment", np.float32, (self.n_classes,))
            if not np.isfinite(logit_adjustment).all():
                raise FedkernValueError("logit_adjustment must be finite")
            params, correction = self._adjusted(params, config, correction, logit_adjustment)
        if not isinstance(config, LocalTraining):
            raise FedkernTypeError(f"config must be a LocalTraining; got {type(config).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise FedkernTypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
        _check_array(delta_out, "delta_out", np.float32, (self.n_params,))
        if not delta_out.flags.writeable:
            raise FedkernValueError("delta_out is read-only")
        if n == 0:
            delta_out[:] = 0.0
            return TrainResult(math.nan, 0)
        if n >= 2**32:
            raise FedkernValueError(f"x has {n} rows; a client holds at most 2**32 - 1")
        order = np.empty((config.epochs, n), np.int64)
        self._kernels.shuffle(rng.integers(2**64, dtype=np.uint64), order)
        total = self._kernels.train(params, self._sizes, x, y, order, config.batch_size, config.lr,
                                    config.momentum, config.weight_decay, config.mu, correction, delta_out)
        steps = config.epochs * -(-n // config.batch_size)
        return TrainResult(float(total) / steps, steps)

    def _adjusted(self, params, config, correction, adjustment) -> tuple[np.ndarray, np.ndarray | None]:
        """The start and correction under which plain training is training with logits z + a.

        A constant added to the logits is a shift of the output bias, so training from
        b + a gives every step the adjusted loss's gradient and the same delta; only weight
        decay would see the shift, and the correction -weight_decay a on b takes it back.
        """
        start = params.copy()
        start[-self.n_classes:] += adjustment
        if config.weight_decay:
            correction = np.zeros(self.n_params, np.float32) if correction is None else correction.copy()
            correction[-self.n_classes:] -= np.float32(config.weight_decay) * adjustment
        return start, correction

    def evaluate(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Mean cross-entropy, accuracy and per-class recall of the model on (x, y)."""
        n = self._check(params, x, y)
        if n == 0:
            return Evaluation(math.nan, math.nan, np.full(self.n_classes, math.nan), 0)
        predictions = np.empty(n, np.int64)
        total = self._kernels.evaluate(params, self._sizes, x, y, predictions)
        support = np.bincount(y, minlength=self.n_classes)
        hits = np.bincount(y[predictions == y], minlength=self.n_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(support > 0, hits / support, math.nan)
        return Evaluation(float(total) / n, float(hits.sum()) / n, recall, n)

    def loss(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy of the model on (x, y) (nan with no rows)."""
        return self.evaluate(params, x, y).loss


def _check_array(obj, name: str, dtype, shape: tuple[int, ...] | None) -> None:
    if not isinstance(obj, np.ndarray):
        raise FedkernTypeError(f"{name} must be a numpy array; got {type(obj).__name__}")
    if obj.dtype != dtype:
        raise FedkernTypeError(f"{name} has dtype {obj.dtype}; expected {np.dtype(dtype).name}")
    if shape is not None and obj.shape != shape:
        raise FedkernValueError(f"{name} has shape {obj.shape}; expected {shape}")
    if not obj.flags.c_contiguous:
        raise FedkernValueError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")


class LogisticRegression(_DenseNetwork):
    """Multinomial logistic regression: logits z = x W + b, softmax cross-entropy.

    ``params = [W (n_features x n_classes, row-major), b (n_classes)]``. The gradient
    of the mean loss over a batch is W: (1/|B|) X^T (P - Y), b: the column means of
    P - Y, with P the softmax rows and Y the one-hot labels; see the module docstring
    for the local step (momentum, weight decay, FedProx's mu).

    Parameters
    ----------
    n_features, n_classes : int
        Input width (>= 1) and number of classes (>= 2).
    backend : {"auto", "cython", "numba", "reference"}
        A compiled kernel ("auto": Cython if built, else Numba), or its numpy twin.
    init_scale : float
        :meth:`init` draws W from N(0, init_scale^2) (``rng.standard_normal``, float64
        rounded to float32); the default 0 gives zeros and draws nothing. b starts at 0.

    Examples
    --------
    >>> from fedkern.sim.models import LocalTraining, LogisticRegression
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((40, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> model = LogisticRegression(3, 2)
    >>> params = model.init(rng)
    >>> delta = np.empty_like(params)
    >>> result = model.train(params, x, y, LocalTraining(epochs=5, lr=0.5), rng, delta)
    >>> result.steps
    20
    >>> bool(model.loss(params + delta, x, y) < model.loss(params, x, y))
    True
    """

    def __init__(self, n_features: int, n_classes: int, *, backend: str = "auto", init_scale: float = 0.0):
        _validate.count(n_features, "n_features", low=1)
        _validate.count(n_classes, "n_classes", low=2)
        self.init_scale = _validate.real(init_scale, "init_scale", low=0.0)
        super().__init__((n_features, n_classes), backend)

    def init(self, rng: np.random.Generator) -> np.ndarray:
        """Fresh parameters: W ~ N(0, init_scale^2) (zeros if 0), b = 0."""
        params = np.zeros(self.n_params, np.float32)
        if self.init_scale > 0.0:
            size = self.n_features * self.n_classes
            params[:size] = self.init_scale * rng.standard_normal(size)
        return params

    def __repr__(self) -> str:
        return f"LogisticRegression({self.n_features}, {self.n_classes}, backend={self.backend!r})"


class MLP(_DenseNetwork):
    """A multilayer perceptron: dense layers of the given widths, ReLU, softmax output.

    ``params`` concatenates, layer after layer, W_l (in x out, row-major) and b_l.
    Backpropagation: with dz the gradient at a layer's output, the layer's gradients are
    (1/|B|) A^T dz (weights) and the column means of dz (bias), and the layer below
    receives (dz W^T) * (A > 0), A being the ReLU output that fed the layer.

    Parameters
    ----------
    n_features : int
        Input width (>= 1).
    hidden : sequence of int
        Widths of the hidden layers (each >= 1; empty is logistic regression).
    n_classes : int
        Number of classes (>= 2).
    backend : {"auto", "cython", "numba", "reference"}
        A compiled kernel ("auto": Cython if built, else Numba), or its numpy twin.

    Notes
    -----
    :meth:`init` draws each W_l in layer order with ``rng.uniform(-a, a, (in, out))``:
    He uniform, a = sqrt(6 / in), for layers followed by ReLU, and Glorot uniform,
    a = sqrt(6 / (in + out)), for the output layer; biases are 0.

    Examples
    --------
    >>> from fedkern.sim.models import LocalTraining, MLP
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((60, 2)).astype(np.float32)
    >>> y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)      # XOR: not linearly separable
    >>> model = MLP(2, [16], 2)
    >>> model.n_params
    82
    >>> params = model.init(rng)
    >>> delta = np.empty_like(params)
    >>> _ = model.train(params, x, y, LocalTraining(epochs=30, lr=0.2, momentum=0.9), rng, delta)
    >>> bool(model.evaluate(params + delta, x, y).accuracy > 0.9)
    True
    """

    def __init__(self, n_features: int, hidden: Sequence[int], n_classes: int, *, backend: str = "auto"):
        _validate.count(n_features, "n_features", low=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise FedkernTypeError(f"hidden must be a sequence of layer widths; got {type(hidden).__name__}")
        self.hidden = tuple(_validate.count(h, f"hidden[{i}]", low=1) for i, h in enumerate(hidden))
        _validate.count(n_classes, "n_classes", low=2)
        super().__init__((n_features, *self.hidden, n_classes), backend)

    def init(self, rng: np.random.Generator) -> np.ndarray:
        """Fresh parameters: He uniform hidden weights, Glorot uniform output weights, zero biases."""
        params = np.zeros(self.n_params, np.float32)
        widths = self._sizes.tolist()
        p = 0
        for l, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            output = l == len(widths) - 2
            bound = math.sqrt(6.0 / (n_in + n_out)) if output else math.sqrt(6.0 / n_in)
            params[p:p + n_in * n_out] = rng.uniform(-bound, bound, (n_in, n_out)).ravel()
            p += (n_in + 1) * n_out
        return params

    def __repr__(self) -> str:
        return f"MLP({self.n_features}, {list(self.hidden)}, {self.n_classes}, backend={self.backend!r})"


MODELS = {"logistic_regression": LogisticRegression, "mlp": MLP}


def make_model(name: str, n_features: int, n_classes: int, **params) -> Model:
    """Build a built-in model by name (from a config): "logistic_regression" or "mlp".

    ``params`` are the model's keyword arguments (``backend``, ``init_scale``;
    ``hidden`` for the MLP). An unknown name or parameter raises
    :class:`~fedkern.FedkernValueError` listing the valid ones.

    Examples
    --------
    >>> from fedkern.sim.models import make_model
    >>> make_model("mlp", 4, 3, hidden=[8]).n_params
    67
    """
    if name not in MODELS:
        raise FedkernValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODELS))}")
    _validate.parameters(MODELS[name], params, f"model {name!r}", given=("n_features", "n_classes"))
    return MODELS[name](n_features=n_features, n_classes=n_classes, **params)
