r"""Compressed uploads in the simulator: clients encode their update, the server sums the bytes.

With ``Simulation(..., compression=Compression(...))`` every client of a round encodes
its update :math:`\Delta_i` with one codec of :mod:`fedkern.compress` and sends the
:class:`~fedkern.compress.Encoded` message; the server never decodes a message alone: it
decodes and weight-adds all the round's messages in one pass with
:func:`fedkern.compress.accumulate` (weights: the FedAvg weights of the round) and steps
the model by

.. math:: \Delta = \frac{\sum_i w_i\, \mathrm{decode}(C(\Delta_i))}{\sum_i w_i},

the same mean as uncompressed FedAvg with each update replaced by its decode. With
``error_feedback`` each client keeps the part of its updates not sent yet (Seide et al.
2014; Karimireddy et al., ICML 2019): :math:`p = \Delta_i + e_i`, send :math:`C(p)`,
:math:`e_i \leftarrow p - \mathrm{decode}(C(p))` (:class:`fedkern.compress.ErrorFeedback`);
a residual exists only for a client that has sent at least once, and moves only when it
sends (an update rejected as non-finite, a dropout or a straggler that is dropped leaves it
as it was; a round skipped for want of a quorum does not give it back, as a real client
could not know). The residuals are part of every checkpoint.

Randomness: each round draws one 64-bit message seed per selected client from the
round's stream (in the cohort's order, after the faults), and with ``rotated`` one
rotation seed shared by the round's clients (the rotation is undone once, after the sum,
so all of them must rotate alike), so a run depends only on its seed, not on the executor
or a restart.

``bytes_up`` of a round is what the clients sent: the sum of the messages'
:attr:`~fedkern.compress.Encoded.nbytes` (seeds included; an update rejected as
non-finite cannot be encoded and sends nothing); ``bytes_up_uncompressed`` is what the
arrived clients would have sent as float32, the ``bytes_up`` of the same run without
compression.

Combinations (checked when the :class:`~fedkern.sim.Simulation` is built):

* supported: local differential privacy (each client clips and noises its update, then
  encodes it: the message is post-processing of the noised update, so the accounting is
  unchanged), Byzantine clients (a forged update is encoded like an honest one), dropouts,
  stragglers, any server optimizer;
* refused: secure aggregation (its masked ring sums need one fixed-point encoding shared
  by all clients, its own ``levels``; per-client scales and indices cannot be summed under
  masks), central differential privacy (the server would have to decode each message to
  clip it, and a codec's output is not bounded by the clip: random-k scales by d / k, error
  feedback adds the residual), robust aggregation rules, pre-aggregation and
  ``reject_norm_ratio`` (they need every decoded row; the fused sum never builds one).

Examples
--------
>>> from fedkern import datasets, sim
>>> data = datasets.fedprox_synthetic(1.0, 1.0, n_clients=10, seed=0)
>>> model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
>>> run = sim.Simulation(data, model, clients_per_round=5, seed=0,
...                      compression=sim.Compression("top_k", {"fraction": 0.01}, error_feedback=True))
>>> record = run.step()
>>> record["bytes_up"], record["bytes_up_uncompressed"]     # 5 clients x (6 x 8 + 8) bytes against 5 x 610 x 4
(280, 12200)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .. import _validate as check
from .._errors import FedkernTypeError, FedkernValueError
from ..compress import (QSGD, Codec, Encoded, ErrorFeedback, RandomK, Rotated, ScaledSign, StochasticQuantizer,
                        TernGrad, TopK)

__all__ = ["Compression", "CODECS", "ROTATABLE", "parameters", "encode"]

#: The codecs by name (their parameters are the classes').
CODECS: dict[str, type[Codec]] = {"top_k": TopK, "random_k": RandomK, "qsgd": QSGD, "terngrad": TernGrad,
                                  "stochastic_quantizer": StochasticQuantizer, "scaled_sign": ScaledSign}
#: The codecs a randomized Hadamard rotation can wrap (:class:`fedkern.compress.Rotated`'s unbiased quantisers).
ROTATABLE = ("qsgd", "terngrad", "stochastic_quantizer")
_SPARSE = (TopK, RandomK)


def parameters(name: str) -> tuple[str, ...]:
    """The parameters codec ``name`` takes (top_k and random_k: ``fraction`` besides ``k``).

    Examples
    --------
    >>> from fedkern.sim import compression
    >>> compression.parameters("qsgd")
    ('levels', 'bucket_size')
    """
    cls = CODECS[name]
    return tuple(f.name for f in dataclasses.fields(cls)) + (("fraction",) if cls in _SPARSE else ())


@dataclasses.dataclass(frozen=True)
class Compression:
    r"""How clients compress their updates (``Simulation(..., compression=)``).

    Parameters
    ----------
    name : one of :data:`CODECS`: ``"top_k"``, ``"random_k"``, ``"qsgd"``, ``"terngrad"``,
        ``"stochastic_quantizer"``, ``"scaled_sign"``
    params : the codec's parameters (``levels`` and ``bucket_size`` for qsgd, ``bits`` and
        ``block_size`` for stochastic_quantizer, ``clip`` for terngrad); top_k and random_k
        take ``k`` or ``fraction``, the share of the model's D parameters they send
        (k = max(1, round(fraction D)))
    error_feedback : each client keeps the residual of what it has not sent (biased codecs,
        top_k and scaled_sign, need it to converge); refused for random_k, which is not
        contractive (error feedback's residuals would grow, Karimireddy et al. 2019 assume
        :math:`\lVert C(x) - x \rVert^2 \le (1 - \delta) \lVert x \rVert^2`)
    rotated : encode after a randomized Hadamard rotation, fresh each round and shared by
        the round's clients (one of :data:`ROTATABLE`)

    Examples
    --------
    >>> from fedkern.sim import Compression
    >>> Compression("stochastic_quantizer", {"bits": 8}).codec(1000)
    StochasticQuantizer(bits=8, block_size=256)
    >>> Compression("top_k", {"fraction": 0.01}).codec(1000)
    TopK(k=10)
    >>> Compression("qsgd", {"levels": 256})
    Traceback (most recent call last):
    ...
    fedkern._errors.FedkernValueError: compression.levels must be between 1 and 255 (levels are sent in at most 8 bits); got 256
    """

    name: str
    params: dict = dataclasses.field(default_factory=dict)
    error_feedback: bool = False
    rotated: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise FedkernValueError(f"compression.name must be one of {tuple(CODECS)}; got {self.name!r}")
        if not isinstance(self.params, dict):
            raise FedkernTypeError(f"compression.params must be a dict; got {type(self.params).__name__}")
        for flag in ("error_feedback", "rotated"):
            if not isinstance(getattr(self, flag), bool):
                raise FedkernTypeError(f"compression.{flag} must be True or False; got {getattr(self, flag)!r}")
        if self.error_feedback and self.name == "random_k":
            raise FedkernValueError("compression.error_feedback: not with random_k, whose d / k scaling makes it "
                                    "unbiased but not contractive (E ||C(x) - x||^2 = (d / k - 1) ||x||^2), so the "
                                    "residuals grow; error feedback is for biased codecs such as top_k and scaled_sign")
        if self.rotated and self.name not in ROTATABLE:
            raise FedkernValueError(f"compression.rotated: the rotation wraps an unbiased quantiser, one of "
                                    f"{ROTATABLE}; got {self.name!r}")
        self._build(None)       # every parameter is checked now; k against the length once it is known

    def _build(self, d: int | None) -> Codec:
        cls, params = CODECS[self.name], dict(self.params)
        if cls in _SPARSE:
            if ("k" in params) == ("fraction" in params):
                raise FedkernValueError(f"compression: {self.name} needs k or fraction (of the model's parameters)"
                                        f"{', not both' if 'k' in params else ''}")
            if "fraction" in params:
                fraction = check.real(params.pop("fraction"), "compression.fraction", low=0.0, low_inclusive=False,
                                      high=1.0)
                params["k"] = 1 if d is None else max(1, round(fraction * d))
        check.parameters(cls, params, f"compression {self.name!r}")
        try:
            codec = cls(**params)
        except (FedkernValueError, FedkernTypeError) as err:
            raise type(err)(f"compression.{err}") from None
        if d is not None and isinstance(codec, _SPARSE) and codec.k > d:
            raise FedkernValueError(f"compression.k: {codec.k} is more than the model's {d} parameters")
        return codec

    def codec(self, d: int, rotation_seed: int = 0) -> Codec:
        """The codec of a model of ``d`` parameters (wrapped in the rotation of
        ``rotation_seed`` when ``rotated``)."""
        codec = self._build(check.count(d, "d", low=1))
        return Rotated(codec, seed=rotation_seed) if self.rotated else codec


def encode(codec: Codec, rows: Sequence[np.ndarray], clients: Sequence[int], seeds: Sequence[int],
           residuals: dict | None, *, backend: str | None = None) -> tuple[list[Encoded], dict | None]:
    """The clients' messages: ``rows[j]`` of client ``clients[j]`` encoded with ``seeds[j]``.

    With error feedback (``residuals`` given: the residuals so far, by client id, left as
    they are) each client encodes its row plus its residual (none at first); returns the
    messages and these clients' new residuals, else the messages and None. The rows must
    be finite (the round rejects the others before).

    Examples
    --------
    >>> from fedkern import compress
    >>> from fedkern.sim import compression
    >>> rows = [np.array([1.0, 0.5], np.float32)]
    >>> messages, residuals = compression.encode(compress.TopK(1), rows, [7], [0], {})
    >>> messages[0].indices, residuals[7]
    (array([0], dtype=uint32), array([0. , 0.5]))
    """
    if residuals is None:
        return [codec.encode(row, int(seed), backend=backend) for row, seed in zip(rows, seeds)], None
    # a store of these clients alone: the caller's moves when it says so (and one thread
    # per chunk never writes into another's)
    feedback = ErrorFeedback(codec, {c: residuals[c] for c in clients if c in residuals})
    messages = [feedback.encode(client, row, int(seed), backend=backend)
                for row, client, seed in zip(rows, clients, seeds)]
    return messages, feedback.residuals
