r"""Client selection: which clients train in a round.

A sampler picks ``m`` distinct clients out of the round's candidates (the clients with
data that are online). Every sampler takes the round's :class:`numpy.random.Generator`,
so a run's selections depend only on its seed and the round number.

Examples
--------
>>> from fedkern.sim import sampling
>>> rng = np.random.default_rng(0)
>>> sizes = np.array([10, 0, 30, 5, 80])
>>> candidates = sampling.online(rng, sizes, availability=1.0)
>>> candidates                          # client 1 has no data, so it is never a candidate
array([0, 2, 3, 4])
>>> sampling.Uniform().select(rng, 2, candidates, sizes).shape
(2,)
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .._errors import FedkernValueError
from .. import _validate as check

#: ``loss(clients) -> losses``: the current global model's local loss on each client.
LossFunction = Callable[[np.ndarray], np.ndarray]


class Sampler(Protocol):
    """What the round needs from a client sampler (implement it to plug in your own)."""

    #: True if :meth:`select` needs ``loss`` (the round then passes it).
    needs_loss: bool

    def select(self, rng: np.random.Generator, m: int, candidates: np.ndarray, sizes: np.ndarray,
               loss: LossFunction | None = None) -> np.ndarray:
        """Return ``min(m, len(candidates))`` distinct client ids drawn from ``candidates``.

        A sampler may also define ``validate(m)``, called once before the first round. A
        sampler whose cohort size varies (:class:`Poisson`) returns any number of distinct ids.
        """


def online(rng: np.random.Generator, sizes: np.ndarray, availability: float | np.ndarray = 1.0) -> np.ndarray:
    """Ids of the clients with data that are online this round.

    ``availability`` is each client's probability of being online (one number for all, or
    one per client); each client's coin is drawn independently every round.
    """
    has_data = sizes > 0
    if np.ndim(availability) == 0 and float(availability) >= 1.0:
        return np.flatnonzero(has_data)
    return np.flatnonzero(has_data & (rng.random(sizes.shape[0]) < availability))


class Uniform:
    """Uniformly at random without replacement (McMahan et al. 2017, FedAvg)."""

    needs_loss = False

    def select(self, rng, m, candidates, sizes, loss=None):
        return rng.choice(candidates, size=min(m, candidates.size), replace=False)

    def __repr__(self) -> str:
        return "Uniform()"


class BySize:
    """Without replacement, with probability proportional to each client's data size.

    As in Li et al. (2020, FedProx), who sample by the fraction of data each device holds.
    """

    needs_loss = False

    def select(self, rng, m, candidates, sizes, loss=None):
        return _by_size(rng, min(m, candidates.size), candidates, sizes)

    def __repr__(self) -> str:
        return "BySize()"


def _by_size(rng, m, candidates, sizes):
    p = sizes[candidates].astype(np.float64)
    return rng.choice(candidates, size=m, replace=False, p=p / p.sum())


class ByWeight:
    """Without replacement, with probability proportional to a fixed weight per client.

    :class:`BySize` with any weights: FBL's sampling draws by each client's class-balanced
    mass (:class:`fedkern.sim.algorithms.FBL`). Candidates of weight 0 are drawn only once
    every positive one is in.

    Parameters
    ----------
    weights : (n_clients,) non-negative finite weights, indexed by client id

    Examples
    --------
    >>> from fedkern.sim import sampling
    >>> rng = np.random.default_rng(0)
    >>> sampling.ByWeight([0.0, 1.0, 0.0, 3.0]).select(rng, 2, np.arange(4), np.ones(4)).tolist()
    [3, 1]
    """

    needs_loss = False

    def __init__(self, weights):
        weights = np.array(weights, np.float64)
        if weights.ndim != 1 or not np.all(np.isfinite(weights) & (weights >= 0)):
            raise FedkernValueError("weights must be a 1-D array of finite weights >= 0")
        self.weights = weights

    def select(self, rng, m, candidates, sizes, loss=None):
        if candidates.size and candidates.max() >= self.weights.size:
            raise FedkernValueError(f"ByWeight has weights for {self.weights.size} clients; "
                                    f"got client {int(candidates.max())}")
        m = min(m, candidates.size)
        positive = candidates[self.weights[candidates] > 0]
        if positive.size < m:        # rng.choice cannot draw more than the positive weights
            rest = np.setdiff1d(candidates, positive)
            return np.concatenate([positive, rng.choice(rest, size=m - positive.size, replace=False)])
        p = self.weights[positive]
        return rng.choice(positive, size=m, replace=False, p=p / p.sum())

    def __repr__(self) -> str:
        return f"ByWeight({self.weights.size} clients)"


class PowerOfChoice:
    r"""Power-of-choice (Cho, Wang and Joshi, AISTATS 2022): bias selection to high loss.

    Draws ``d`` candidates without replacement with probability proportional to data
    size, evaluates the current global model's loss on each, and keeps the ``m`` with the
    highest loss (:math:`d \ge m`; ``d = m`` is sampling by size).

    Parameters
    ----------
    d : number of candidates whose loss is evaluated each round
    """

    needs_loss = True

    def __init__(self, d: int):
        self.d = check.count(d, "d", low=1)

    def validate(self, m: int) -> None:
        """Raise unless ``m`` clients per round can be kept out of ``d`` candidates."""
        if self.d < m:
            raise FedkernValueError(f"power_of_choice needs d >= clients_per_round; got d={self.d} < {m}")

    def select(self, rng, m, candidates, sizes, loss=None):
        if loss is None:
            raise FedkernValueError("PowerOfChoice.select needs loss (the global model's loss on each client)")
        self.validate(m)
        drawn = _by_size(rng, min(self.d, candidates.size), candidates, sizes)
        losses = np.asarray(loss(drawn), np.float64)
        # stable sort on the negated loss: ties keep the draw order, so the choice is reproducible
        return drawn[np.argsort(-losses, kind="stable")[: min(m, drawn.size)]]

    def __repr__(self) -> str:
        return f"PowerOfChoice(d={self.d})"


class Poisson:
    r"""Each candidate joins independently with probability :math:`q = m / N`.

    N counts the clients with data, so the expected cohort is m when every client is
    online; its size varies from round to round and may be 0. This is the sampling that
    the Poisson-subsampled Gaussian mechanism of DP-FedAvg assumes (McMahan et al.,
    "Learning Differentially Private Recurrent Language Models", ICLR 2018; Mironov,
    Talwar and Zhang 2019); a fixed-size cohort is accounted differently.

    Examples
    --------
    >>> from fedkern.sim import sampling
    >>> rng = np.random.default_rng(0)
    >>> sizes = np.ones(1000)
    >>> [sampling.Poisson().select(rng, 10, np.arange(1000), sizes).size for _ in range(4)]
    [11, 17, 6, 8]
    """

    needs_loss = False

    def select(self, rng, m, candidates, sizes, loss=None):
        q = m / np.count_nonzero(sizes)
        return candidates[rng.random(candidates.size) < q]

    def __repr__(self) -> str:
        return "Poisson()"


#: Samplers by config name.
SAMPLERS: dict[str, type] = {"uniform": Uniform, "by_size": BySize, "power_of_choice": PowerOfChoice,
                             "poisson": Poisson}
