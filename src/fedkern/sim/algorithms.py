r"""Federated algorithms: what a client does with the global model, given the run's settings.

An algorithm turns the run's :class:`~fedkern.sim.models.LocalTraining` into each
client's local objective. For FedAvg and FedProx the server side (aggregation rule and
server optimizer) is chosen separately, so they combine with any rule and optimizer.
FedNova and q-FFL replace the mean by their own combination of the round's updates
(:meth:`FedNova.combine`, :meth:`QFFL.combine`), which the round passes to the server
optimizer. SCAFFOLD keeps control variates per client (:class:`Scaffold`) and corrects every
local step with them. FBL (:class:`FBL`) adjusts each client's logits by its label prior
and weighs and samples the clients by their class-balanced mass. FedBuff is asynchronous
(:class:`FedBuff`, :class:`BufferedRun`): in :class:`~fedkern.sim.rounds.Simulation` a
round is one buffered server update.

Every server side works on flat parameter vectors; a delta is ``w_client - w_global``
and the returned step is added to the global model (``w += lr * step`` by the server
optimizer, ``lr = 1`` for the methods' own updates).

Examples
--------
>>> from fedkern.sim.algorithms import FedProx
>>> from fedkern.sim.models import LocalTraining
>>> FedProx(mu=1.0).local(LocalTraining(epochs=20)).mu
1.0
"""
from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from .. import _validate as check
from .._errors import FedkernValueError
from .history import History
from .models import LocalTraining
from .sampling import ByWeight


class FedAvg:
    r"""Local SGD on the client's own loss (McMahan et al., AISTATS 2017).

    Each client runs ``epochs`` passes of minibatch SGD from the global model
    :math:`w` and sends :math:`\Delta_i = w_i - w`.
    """

    name = "fedavg"
    #: True if the round hands the updates to :meth:`combine` instead of the aggregator
    combines_updates = False
    #: True if :meth:`combine` needs each client's loss at the global model
    needs_global_loss = False
    #: True if each client trains with a correction of its gradient (:meth:`Scaffold.correction`)
    corrects_clients = False
    #: True if the algorithm needs the clients' label counts (:meth:`FBL.fit`) before the first round
    uses_label_counts = False
    #: True if each client trains with adjusted logits (:meth:`FBL.logit_adjustment`)
    adjusts_logits = False
    #: True if a round is one buffered asynchronous server update (:class:`FedBuff`)
    asynchronous = False

    def local(self, base: LocalTraining) -> LocalTraining:
        """The local training settings every client of this algorithm uses."""
        return base

    def server_weights(self) -> np.ndarray | None:
        """Each client's weight in the server's mean, by client id (None: its data size)."""
        return None

    def sampler(self):
        """The sampler that draws this algorithm's cohorts instead of uniform sampling (None: the run's)."""
        return None

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



def _weighted_rows(deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The float64 sum of the rows of ``deltas`` (K x D) each times its weight."""
    return weights @ np.asarray(deltas, np.float64)


class FedNova(FedProx):
    r"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
    Federated Optimization", NeurIPS 2020): normalised averaging.

    Client i runs :math:`\tau_i` local steps (its own count: data sizes and stragglers'
    partial work differ) and sends :math:`\Delta_i = w_i - w`. Its update is divided by
    :math:`\|a_i\|_1`, the sum of the weights its local optimizer gives the gradients:

    * plain SGD: :math:`\|a_i\|_1 = \tau_i`;
    * heavy-ball momentum :math:`\rho`:
      :math:`\|a_i\|_1 = (\tau_i - \rho (1 - \rho^{\tau_i}) / (1 - \rho)) / (1 - \rho)`;
    * proximal term :math:`\mu` with local rate :math:`\eta`:
      :math:`\|a_i\|_1 = (1 - (1 - \eta\mu)^{\tau_i}) / (\eta\mu)`.

    With :math:`p_i` the clients' data shares, :math:`d_i = \Delta_i / \|a_i\|_1` and
    :math:`\tau_{eff} = \sum_i p_i \|a_i\|_1`, the step is :math:`\tau_{eff} \sum_i p_i d_i`.
    The paper gives :math:`a_i` for momentum or the proximal term, not both at once.

    Parameters
    ----------
    mu : proximal coefficient, >= 0

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import FedNova
    >>> from fedkern.sim.models import LocalTraining
    >>> nova = FedNova()
    >>> _ = nova.local(LocalTraining(lr=0.1))
    >>> nova.combine(np.array([[2.0], [1.0]]), np.array([1.0, 1.0]), np.array([4, 1]))  # a_1 = 4, a_2 = 1
    array([1.875], dtype=float32)
    """

    name = "fednova"
    combines_updates = True

    def __init__(self, mu: float = 0.0):
        super().__init__(mu)
        self._training: LocalTraining | None = None

    def local(self, base: LocalTraining) -> LocalTraining:
        if base.momentum and self.mu:
            raise FedkernValueError("algorithm: fednova normalises momentum or a proximal term (mu), not both")
        self._training = super().local(base)
        return self._training

    def norm_a(self, steps: np.ndarray) -> np.ndarray:
        """:math:`\\|a_i\\|_1` of clients that ran ``steps`` local steps each."""
        tau = np.asarray(steps, np.float64)
        rho, lr = self._training.momentum, self._training.lr
        if rho:
            return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)
        if self.mu:
            return (1.0 - (1.0 - lr * self.mu) ** tau) / (lr * self.mu)
        return tau

    def combine(self, deltas: np.ndarray, weights: np.ndarray, steps: np.ndarray,
                global_losses: np.ndarray | None = None, clients: np.ndarray | None = None) -> np.ndarray:
        """The server's step from the round's deltas, client weights and step counts."""
        if self._training is None:
            raise FedkernValueError("algorithm: call local() before combine() (it sets the local optimizer)")
        norms = self.norm_a(steps)
        if np.any(norms <= 0):
            raise FedkernValueError("steps: every combined client must have taken at least one local step")
        shares = np.asarray(weights, np.float64) / np.sum(weights)
        tau_eff = float(shares @ norms)
        return (tau_eff * _weighted_rows(deltas, shares / norms)).astype(np.float32)

    def __repr__(self) -> str:
        return f"FedNova(mu={self.mu})"


class QFFL(FedAvg):
    r"""q-FFL by q-FedAvg (Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in
    Federated Learning", ICLR 2020).

    The objective :math:`\sum_k p_k F_k^{q+1} / (q + 1)` weighs clients with a high loss
    more as q grows (q = 0 is FedAvg's). Each client k trains locally to
    :math:`\bar w_k` and reports its OWN loss :math:`F_k` at the global model w, on its
    own data. With L the Lipschitz constant of the gradients:

    .. math::
        \Delta_k = L (w - \bar w_k), \quad
        h_k = q F_k^{q-1} \|\Delta_k\|^2 + L F_k^q, \quad
        w \leftarrow w - \frac{\sum_k F_k^q \Delta_k}{\sum_k h_k}.

    One loss for every client (e.g. the server's, as Flower's ``QFedAvg`` evaluates)
    makes :math:`F_k^q` the same constant for all and cancels the reweighting.

    Parameters
    ----------
    q : fairness exponent, >= 0
    lipschitz : L, > 0 (the paper takes 1 / local learning rate)

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import QFFL
    >>> QFFL(q=0.0, lipschitz=1.0).combine(np.array([[1.0], [3.0]]), None, None, np.array([1.0, 4.0]))
    array([2.], dtype=float32)
    """

    name = "qffl"
    combines_updates = True
    needs_global_loss = True

    def __init__(self, q: float = 1.0, lipschitz: float = 1.0):
        self.q = check.real(q, "q", low=0.0)
        self.lipschitz = check.real(lipschitz, "lipschitz", low=0.0, low_inclusive=False)

    def combine(self, deltas: np.ndarray, weights, steps, global_losses: np.ndarray, clients=None) -> np.ndarray:
        """The server's step (``w += step``) from the deltas and each client's loss at w.

        ``weights``, ``steps`` and ``clients`` are not used: the losses do the weighting."""
        losses = np.asarray(global_losses, np.float64)
        if not np.all(np.isfinite(losses) & (losses > 0)):
            raise FedkernValueError("global_losses: q-FFL needs every client's loss at the global model finite and > 0")
        q, lipschitz = self.q, self.lipschitz
        scaled = lipschitz * -np.asarray(deltas, np.float64)            # Delta_k = L (w - w_k)
        powered = losses ** q
        h = q * losses ** (q - 1.0) * np.sum(scaled ** 2, axis=1) + lipschitz * powered
        return (-(powered @ scaled) / h.sum()).astype(np.float32)

    def __repr__(self) -> str:
        return f"QFFL(q={self.q}, lipschitz={self.lipschitz})"


class Scaffold(FedAvg):
    r"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML 2020): control variates correct the clients' drift.

    The server keeps a variate c, each client i its own c_i (0 until it first trains),
    kept across rounds. Client i trains from the global model x with the corrected
    gradient :math:`g_i(y) - c_i + c` (:meth:`correction` is the :math:`c - c_i` added to
    every step) for K steps of rate :math:`\eta_l`, and updates its variate by option II:

    .. math::
        c_i^+ = c_i - c + \frac{x - y_i}{K \eta_l}, \qquad \Delta c_i = c_i^+ - c_i.

    With S the round's clients out of N and :math:`\Delta y_i = y_i - x`, the server steps

    .. math::
        x \leftarrow x + \eta_g \frac{1}{|S|} \sum_{i \in S} \Delta y_i, \qquad
        c \leftarrow c + \frac{|S|}{N} \frac{1}{|S|} \sum_{i \in S} \Delta c_i.

    In :class:`~fedkern.sim.rounds.Simulation` (``{name = "scaffold"}`` in a config) each
    client's local SGD adds the correction to every step's gradient (the built-in models'
    ``train(..., correction=)``), K is its own step count (a straggler's partial work
    counts as run), the mean over the round's arrived clients is unweighted, as in the
    paper, and the server optimizer applies the step. A client without data sends a zero
    update and keeps its variate. The variates belong to the run: they are checkpointed
    with it (:meth:`state`, :meth:`restore`), and :meth:`start` resets them.

    Parameters
    ----------
    global_lr : :math:`\eta_g`, > 0

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import Scaffold
    >>> scaffold = Scaffold(global_lr=1.0)
    >>> scaffold.start(n_params=1, n_clients=4)
    >>> dc = scaffold.client_update(0, np.array([-0.5], np.float32), steps=5, lr=0.1)   # c_0 = 0.5/0.5
    >>> scaffold.server_step(np.array([[-0.5]]), dc[None, :])
    array([-0.5], dtype=float32)
    >>> scaffold.server_variate                                                        # 1/4 of Delta c
    array([0.25])
    """

    name = "scaffold"
    combines_updates = True
    corrects_clients = True

    def __init__(self, global_lr: float = 1.0):
        self.global_lr = check.real(global_lr, "global_lr", low=0.0, low_inclusive=False)
        self.server_variate: np.ndarray | None = None
        self.client_variates: dict[int, np.ndarray] = {}
        self.n_clients = 0
        self._lr: float | None = None

    def local(self, base: LocalTraining) -> LocalTraining:
        if base.momentum:
            raise FedkernValueError("algorithm: scaffold's option II variate assumes plain local SGD; "
                                    "set the local momentum to 0")
        self._lr = base.lr
        return base

    def start(self, n_params: int, n_clients: int) -> None:
        """Zero variates for a federation of ``n_clients`` and models of ``n_params``."""
        self.n_clients = check.count(n_clients, "n_clients", low=1)
        self.server_variate = np.zeros(check.count(n_params, "n_params", low=1))
        self.client_variates = {}

    def _client_variate(self, client: int) -> np.ndarray:
        return self.client_variates.get(client, np.zeros_like(self.server_variate))

    def correction(self, client: int) -> np.ndarray:
        """:math:`c - c_i`, added to each local gradient of ``client`` (float32, as the kernels' inputs)."""
        return (self.server_variate - self._client_variate(client)).astype(np.float32)

    def client_update(self, client: int, delta: np.ndarray, steps: int, lr: float) -> np.ndarray:
        """Option II: store ``client``'s new variate after its ``steps`` steps of rate ``lr``
        gave ``delta = y_i - x``; return :math:`\\Delta c_i`."""
        steps = check.count(steps, "steps", low=1)
        lr = check.real(lr, "lr", low=0.0, low_inclusive=False)
        old = self._client_variate(client)
        new = old - self.server_variate - np.asarray(delta, np.float64) / (steps * lr)
        self.client_variates[client] = new
        return new - old

    def server_step(self, deltas: np.ndarray, variate_deltas: np.ndarray) -> np.ndarray:
        """Update c from the round's :math:`\\Delta c_i`; return the model's step
        :math:`\\eta_g` mean(:math:`\\Delta y_i`) (rows of ``deltas``)."""
        deltas, variate_deltas = np.asarray(deltas, np.float64), np.asarray(variate_deltas, np.float64)
        if deltas.shape != variate_deltas.shape or deltas.ndim != 2:
            raise FedkernValueError(f"variate_deltas must have the shape of deltas {deltas.shape}; "
                                    f"got {variate_deltas.shape}")
        cohort = deltas.shape[0]
        self.server_variate = self.server_variate + cohort / self.n_clients * variate_deltas.mean(axis=0)
        return (self.global_lr * deltas.mean(axis=0)).astype(np.float32)

    def combine(self, deltas: np.ndarray, weights, steps: np.ndarray, global_losses=None,
                clients: np.ndarray | None = None) -> np.ndarray:
        """The round's server side: every arrived client's new variate (in cohort order),
        then :meth:`server_step`. ``weights`` are not used (the paper's mean is unweighted)."""
        if self._lr is None or clients is None:
            raise FedkernValueError("algorithm: scaffold needs local() and each row's client before combine()")
        variate_deltas = np.zeros((len(clients), self.server_variate.size))
        for row, (client, delta, taken) in enumerate(zip(clients, deltas, steps)):
            if taken:                                     # a client without data keeps its variate
                variate_deltas[row] = self.client_update(int(client), delta, int(taken), self._lr)
        return self.server_step(deltas, variate_deltas)

    def state(self) -> dict[str, np.ndarray]:
        """The variates as checkpoint arrays (clients in id order)."""
        ids = sorted(self.client_variates)
        rows = [self.client_variates[c] for c in ids]
        return {"scaffold.server": self.server_variate, "scaffold.clients": np.array(ids, np.int64),
                "scaffold.variates": np.stack(rows) if rows else np.zeros((0, self.server_variate.size))}

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state`'s arrays (e.g. read back by :func:`fedkern.sim.checkpoint.load`)."""
        self.server_variate = np.array(arrays["scaffold.server"], np.float64)
        self.client_variates = {int(c): np.array(row, np.float64)
                                for c, row in zip(arrays["scaffold.clients"], arrays["scaffold.variates"])}

    def __repr__(self) -> str:
        return f"Scaffold(global_lr={self.global_lr})"


class FedBuff(FedAvg):
    r"""FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous
    Aggregation", AISTATS 2022): asynchronous clients, buffered server updates.

    ``concurrency`` clients train at once, each from the model version current when it
    started and for a random delay. An arriving update :math:`\Delta_i` with staleness
    :math:`\tau_i` (server updates since its client started) goes into a buffer; once it
    holds K updates the server steps and empties it:

    .. math::
        w \leftarrow w + \eta_g \frac{1}{K} \sum_{i=1}^{K} (1 + \tau_i)^{-a} \Delta_i.

    :class:`BufferedRun` simulates the clients and delays; a "round" is one server
    update. :class:`~fedkern.sim.rounds.Simulation` runs it so (``{name = "fedbuff"}`` in a
    config): clients are drawn uniformly from those with data and train the run's model
    one at a time, in dispatch order; the run's executor, server optimizer and faults do
    not apply (it refuses settings that would need them).

    Parameters
    ----------
    buffer_size : K, >= 1
    concurrency : clients in flight, >= 1
    staleness_exponent : a, >= 0 (0: no staleness discount)
    server_lr : :math:`\eta_g`, > 0
    mean_delay : mean of the exponential client delays, > 0 (simulated time units)

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import FedBuff
    >>> FedBuff(buffer_size=2).server_step(np.array([[3.0], [1.0]]), np.array([3, 0]))   # (0.5 * 3 + 1) / 2
    array([1.25], dtype=float32)
    """

    name = "fedbuff"
    asynchronous = True

    def __init__(self, buffer_size: int = 10, concurrency: int = 20, staleness_exponent: float = 0.5,
                 server_lr: float = 1.0, mean_delay: float = 1.0):
        self.buffer_size = check.count(buffer_size, "buffer_size", low=1)
        self.concurrency = check.count(concurrency, "concurrency", low=1)
        self.staleness_exponent = check.real(staleness_exponent, "staleness_exponent", low=0.0)
        self.server_lr = check.real(server_lr, "server_lr", low=0.0, low_inclusive=False)
        self.mean_delay = check.real(mean_delay, "mean_delay", low=0.0, low_inclusive=False)

    def staleness_weight(self, staleness: np.ndarray) -> np.ndarray:
        """:math:`(1 + \\tau)^{-a}` for each update's staleness."""
        return (1.0 + np.asarray(staleness, np.float64)) ** -self.staleness_exponent

    def server_step(self, deltas: np.ndarray, staleness: np.ndarray) -> np.ndarray:
        """The model's step from a full buffer: rows of ``deltas`` and their staleness."""
        return (self.server_lr / self.buffer_size
                * _weighted_rows(deltas, self.staleness_weight(staleness))).astype(np.float32)

    def __repr__(self) -> str:
        return (f"FedBuff(buffer_size={self.buffer_size}, concurrency={self.concurrency}, "
                f"staleness_exponent={self.staleness_exponent}, server_lr={self.server_lr}, "
                f"mean_delay={self.mean_delay})")


class BufferedRun:
    """FedBuff's asynchronous run as a discrete-event simulation, deterministic under a seed.

    Dispatch j (the j-th client started) draws its client and its delay from its own
    Philox stream keyed by (seed, j), and trains at once on the model version current
    then (its update arrives ``delay`` later; until then the model it trained on is what
    it would have seen). The first ``concurrency`` dispatches happen at the first
    :meth:`step`. Arrivals are processed in (time, dispatch) order and each frees
    a slot that the next dispatch fills, after the server update if that arrival filled
    the buffer. Training is called in dispatch order, so the run
    depends only on the seed, never on threads or timing. After each step,
    :attr:`arrived` holds the buffer's (clients, losses).

    Parameters
    ----------
    fedbuff : the :class:`FedBuff` settings
    train : ``train(client, params, rng) -> delta`` or ``-> (delta, loss)``: a client's
        local work (params is read-only; rng is the dispatch's stream, after its client and
        delay); the loss, if given, is kept with the update (:attr:`arrived`)
    params : the initial global model (copied, float32)
    n_clients : the federation's size (clients are drawn uniformly)
    seed : the run's seed

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import BufferedRun, FedBuff
    >>> targets = np.arange(4.0)
    >>> run = BufferedRun(FedBuff(buffer_size=2, concurrency=3), lambda c, w, rng: (targets[c] - w) / 2,
    ...                   np.zeros(1, np.float32), n_clients=4, seed=0)
    >>> [record["round"] for record in run.run(3)]
    [1, 2, 3]
    """

    def __init__(self, fedbuff: FedBuff, train, params: np.ndarray, *, n_clients: int, seed: int = 0):
        if not isinstance(fedbuff, FedBuff):
            raise check.FedkernTypeError(f"fedbuff must be a FedBuff; got {type(fedbuff).__name__}")
        self.fedbuff, self.train = fedbuff, train
        self.params = np.array(params, np.float32)
        self.n_clients = check.count(n_clients, "n_clients", low=1)
        self.seed = check.count(seed, "seed", high=(1 << 64) - 1)
        self.clock, self.version, self.dispatched = 0.0, 0, 0
        # a heap by (arrival, dispatch) of (arrival, dispatch, client, version, loss, delta)
        self.in_flight: list[tuple[float, int, int, int, float, np.ndarray]] = []
        self.history = History()      # one record per server update, with its staleness figures
        self.arrived = (np.zeros(0, np.int64), np.zeros(0))

    def _dispatch(self) -> None:
        j = self.dispatched
        rng = np.random.Generator(np.random.Philox(key=np.array([self.seed, j], np.uint64)))
        client = int(rng.integers(self.n_clients))
        delay = float(rng.exponential(self.fedbuff.mean_delay))
        view = self.params.copy()
        view.flags.writeable = False
        result = self.train(client, view, rng)
        delta, loss = result if isinstance(result, tuple) else (result, np.nan)
        delta = np.asarray(delta, np.float32)
        if delta.shape != self.params.shape:
            raise FedkernValueError(f"train returned shape {delta.shape} for client {client}; "
                                    f"expected {self.params.shape}")
        heapq.heappush(self.in_flight, (self.clock + delay, j, client, self.version, float(loss), delta))
        self.dispatched = j + 1

    def step(self) -> dict:
        """Process arrivals until the buffer is full, then update the model: one round."""
        while self.dispatched < self.fedbuff.concurrency:
            self._dispatch()
        buffer, staleness, clients, losses = [], [], [], []
        while len(buffer) < self.fedbuff.buffer_size:
            self.clock, _, client, started, loss, delta = heapq.heappop(self.in_flight)
            buffer.append(delta)
            staleness.append(self.version - started)
            clients.append(client)
            losses.append(loss)
            if len(buffer) < self.fedbuff.buffer_size:
                self._dispatch()      # the freed slot's next client gets the model as it is now
        staleness = np.array(staleness, np.int64)
        self.arrived = (np.array(clients, np.int64), np.array(losses))
        self.params += self.fedbuff.server_step(np.stack(buffer), staleness)
        self.version += 1
        self._dispatch()              # the last arrival's slot: the new client gets the new model
        record = {"round": self.version, "time": self.clock, "staleness_mean": float(staleness.mean()),
                  "staleness_max": int(staleness.max())}
        self.history.append(record)
        return record

    def run(self, rounds: int) -> History:
        """Run server updates until ``rounds`` are done; return the history."""
        while self.version < check.count(rounds, "rounds"):
            self.step()
        return self.history

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Checkpoint arrays and JSON metadata (for :func:`fedkern.sim.checkpoint.save`):
        the model, the clients in flight with their losses and updates, the clock (between
        rounds the buffer is empty)."""
        flight = sorted(self.in_flight, key=lambda item: item[:2])
        arrays = {"params": self.params,
                  "fedbuff.arrival": np.array([f[0] for f in flight], np.float64),
                  "fedbuff.flight": np.array([f[1:4] for f in flight], np.int64).reshape(-1, 3),
                  "fedbuff.flight_losses": np.array([f[4] for f in flight], np.float64),
                  "fedbuff.flight_deltas": (np.stack([f[5] for f in flight]) if flight
                                            else np.zeros((0, self.params.size), np.float32))}
        meta = {"clock": self.clock, "version": self.version, "dispatched": self.dispatched,
                "seed": self.seed, "history": self.history.records}
        return arrays, meta

    def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Continue from :meth:`state`'s output, for the same settings and seed."""
        if meta["seed"] != self.seed or arrays["params"].shape != self.params.shape:
            raise FedkernValueError("checkpoint was written by a FedBuff run with another seed or model")
        self.params = np.array(arrays["params"], np.float32)
        self.in_flight = [(float(t), int(j), int(c), int(v), float(loss), np.array(delta))
                          for t, (j, c, v), loss, delta in zip(arrays["fedbuff.arrival"], arrays["fedbuff.flight"],
                                                               arrays["fedbuff.flight_losses"],
                                                               arrays["fedbuff.flight_deltas"])]
        heapq.heapify(self.in_flight)
        self.clock, self.version, self.dispatched = meta["clock"], meta["version"], meta["dispatched"]
        self.history = History(meta["history"])


class FBL(FedAvg):
    r"""Federated Balanced Learning: FedAvg against class imbalance inside clients and across them.

    Label skew makes each client's data imbalanced (client i holds :math:`n_{ic}` rows of
    class c), and a long-tailed federation makes the sum :math:`N_c = \sum_i n_{ic}`
    imbalanced too; FedAvg then fits the frequent classes and neglects the rare ones.
    FBL targets the *balanced* risk, every class weighted alike, with three parts (each
    can be switched off, for an ablation):

    1. **balanced loss** (``balanced_loss``): client i trains on logit-adjusted
       cross-entropy, :math:`-\log \mathrm{softmax}(z + \tau \log \pi_i)_y`, with
       :math:`\pi_{ic} = (n_{ic} + 1) / (n_i + C)` its own label prior (add-one smoothed, so
       an absent class gets a large negative shift and the client's steps hardly push it
       down); predictions use the plain logits z. This is Balanced Softmax (Ren et al.,
       NeurIPS 2020) and the logit-adjusted loss (Menon et al., ICLR 2021) with the
       client's prior, as FedLC calibrates each client's logits by its label counts
       (Zhang et al., ICML 2022).
    2. **balanced weights** (``balanced_weights``): the server weighs client i by its
       class-balanced mass :math:`m_i = \sum_c n_{ic} / N_c` (the share of each class it
       holds, summed) instead of :math:`n_i`: the weighting of the balanced empirical risk
       :math:`\frac{1}{C} \sum_c \frac{1}{N_c} \sum_i \sum_{(x, y = c) \in i} \ell`,
       as class-balanced losses reweight by inverse class frequency (Cui et al., CVPR
       2019), here over clients. On a balanced federation :math:`m_i \propto n_i`: FedAvg's.
    3. **balanced sampling** (``balanced_sampling``): the cohort is drawn without
       replacement with probability :math:`\propto m_i`, so clients holding rare classes
       take part more often, the aim of class-imbalance-aware client selection (Yang et
       al., "Federated Learning with Class Imbalance Reduction", EUSIPCO 2021). It replaces
       uniform sampling (:class:`~fedkern.sim.sampling.ByWeight`).

    The server learns each client's label counts (as FedLC and class-aware selection
    assume); the local objective is the only part a client computes itself.

    Parameters
    ----------
    balanced_loss, balanced_weights, balanced_sampling : bool, each part on or off
    tau : the logit adjustment's scale, >= 0 (1: Balanced Softmax)

    Examples
    --------
    >>> import numpy as np
    >>> from fedkern.sim.algorithms import FBL
    >>> fbl = FBL()
    >>> fbl.fit(np.array([[90, 10], [10, 0]]))     # two clients, two classes; N = (100, 10)
    >>> fbl.server_weights()                          # 90/100 + 10/10, 10/100 + 0
    array([1.9, 0.1])
    >>> np.round(np.exp(fbl.logit_adjustment(1)), 3)  # (10 + 1, 0 + 1) / 12
    array([0.917, 0.083], dtype=float32)
    """

    name = "fbl"
    uses_label_counts = True

    def __init__(self, balanced_loss: bool = True, balanced_weights: bool = True, balanced_sampling: bool = True,
                 tau: float = 1.0):
        for flag, value in (("balanced_loss", balanced_loss), ("balanced_weights", balanced_weights),
                            ("balanced_sampling", balanced_sampling)):
            if not isinstance(value, (bool, np.bool_)):
                raise check.FedkernTypeError(f"{flag} must be true or false; got {value!r}")
        self.balanced_loss, self.balanced_weights = bool(balanced_loss), bool(balanced_weights)
        self.balanced_sampling = bool(balanced_sampling)
        self.tau = check.real(tau, "tau", low=0.0)
        self.adjusts_logits = self.balanced_loss
        self.mass: np.ndarray | None = None
        self._adjustments: np.ndarray | None = None

    def fit(self, label_counts: np.ndarray) -> None:
        """Take the federation's (n_clients, n_classes) label counts: the masses and priors."""
        counts = np.asarray(label_counts)
        if counts.ndim != 2 or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise FedkernValueError("label_counts must be a 2-D array of counts >= 0 (clients x classes)")
        counts = counts.astype(np.float64)
        totals = counts.sum(axis=0)
        self.mass = (counts / np.maximum(totals, 1.0)).sum(axis=1)
        prior = (counts + 1.0) / (counts.sum(axis=1, keepdims=True) + counts.shape[1])
        self._adjustments = (self.tau * np.log(prior)).astype(np.float32)

    def _fitted(self) -> None:
        if self.mass is None:
            raise FedkernValueError("algorithm: call fbl.fit(label_counts) first")

    def logit_adjustment(self, client: int) -> np.ndarray:
        r""":math:`\tau \log \pi_i` of ``client``, added to its logits in training (float32)."""
        self._fitted()
        return self._adjustments[client]

    def server_weights(self) -> np.ndarray | None:
        self._fitted()
        return self.mass if self.balanced_weights else None

    def sampler(self):
        self._fitted()
        return ByWeight(self.mass) if self.balanced_sampling else None

    def __repr__(self) -> str:
        return (f"FBL(balanced_loss={self.balanced_loss}, balanced_weights={self.balanced_weights}, "
                f"balanced_sampling={self.balanced_sampling}, tau={self.tau})")


#: Algorithms by config name.
ALGORITHMS: dict[str, type] = {"fedavg": FedAvg, "fedprox": FedProx, "fednova": FedNova, "qffl": QFFL,
                               "scaffold": Scaffold, "fedbuff": FedBuff, "fbl": FBL}
