r"""Federated algorithms: what a client does with the global model, given the run's settings.

An algorithm turns the run's :class:`~fedkern.sim.models.LocalTraining` into each
client's local objective. The server side (aggregation rule and server optimizer) is
chosen separately, so any algorithm combines with any rule and optimizer.

Examples
--------
>>> from fedkern.sim.algorithms import FedProx
>>> from fedkern.sim.models import LocalTraining
>>> FedProx(mu=1.0).local(LocalTraining(epochs=20)).mu
1.0
"""
from __future__ import annotations

import dataclasses

from .. import _validate as check
from .models import LocalTraining


class FedAvg:
    r"""Local SGD on the client's own loss (McMahan et al., AISTATS 2017).

    Each client runs ``epochs`` passes of minibatch SGD from the global model
    :math:`w` and sends :math:`\Delta_i = w_i - w`.
    """

    name = "fedavg"

    def local(self, base: LocalTraining) -> LocalTraining:
        """The local training settings every client of this algorithm uses."""
        return base

    def __repr__(self) -> str:
        return "FedAvg()"


class FedProx(FedAvg):
    r"""FedProx (Li et al., MLSys 2020): local SGD on :math:`f_i(v) + \frac{\mu}{2}\|v - w\|^2`.

    The proximal term keeps a client's model near the global model :math:`w`, which
    bounds the drift of clients that train many epochs on skewed data; stragglers'
    partial work is kept rather than dropped (see the round's ``stragglers``).

    Parameters
    ----------
    mu : proximal coefficient, >= 0 (mu = 0 is FedAvg)
    """

    name = "fedprox"

    def __init__(self, mu: float):
        self.mu = check.real(mu, "mu", low=0.0)

    def local(self, base: LocalTraining) -> LocalTraining:
        return dataclasses.replace(base, mu=self.mu)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu})"


#: Algorithms by config name.
ALGORITHMS: dict[str, type] = {"fedavg": FedAvg, "fedprox": FedProx}
