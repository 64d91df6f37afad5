r"""The round: sample, broadcast, train locally, attack, filter, aggregate, step, evaluate.

:class:`Simulation` runs federated learning on a :class:`~fedkern.sim.data.FederatedDataset`
with a :class:`~fedkern.sim.models.Model`, one round after another. Each round is a
fixed pipeline of stages, each using fedkern's public ops:

1. **sample**: the online clients with data are the candidates; a sampler picks
   ``clients_per_round`` of them.
2. **faults**: each selected client independently drops out (its update never arrives)
   with probability ``dropout.rate``; a fraction ``stragglers.fraction`` straggles and
   either trains fewer epochs (``"partial"``, FedProx's semantics: a random
   1..E-1 epochs, as ``randint(1, E)`` in FedProx's code) or is dropped (``"drop"``, as
   FedAvg in the FedProx paper). Clients the executor loses (past its deadline, or on a
   worker that died twice: :class:`~fedkern.sim.executors.Lost`) count as dropouts too.
3. **broadcast and local training** on the executor: every arriving client trains
   from the same read-only copy of the global model on its own slice of the data and
   produces :math:`\Delta_i = w_i - w`. Byzantine clients train on flipped labels
   (``label_flip``) or send an attack built from the honest updates
   (:mod:`fedkern.attacks`).
4. **fault detection**: updates holding NaN or infinity are rejected, and with
   ``reject_norm_ratio = r`` so is every update whose norm exceeds r times the median
   norm of the round's finite updates. Rejected updates are counted.
5. **aggregate**: ``mean`` streams the deltas into float64 partial sums (an
   :class:`fedkern.Accumulator`-style sum per chunk, see :mod:`fedkern.sim.executors`)
   and never holds K x D; a robust rule (or an update attack, or the norm filter, which
   need every row) fills a preallocated :class:`fedkern.UpdateMatrix`. With fewer than
   ``dropout.quorum`` accepted updates the round is skipped and recorded as such.
6. **server step** with any :class:`fedkern.ServerOptimizer` on the aggregate, then
   **evaluate** the global model on the test data every ``eval_every`` rounds.

With ``privacy=`` (:class:`~fedkern.sim.privacy.DifferentialPrivacy`) the round is
DP-FedAvg (McMahan et al., ICLR 2018): the cohort is drawn as the accountant assumes
(Poisson or fixed size), every update is clipped as it is summed (central mode: one
fused clip-and-sum kernel per chunk; local mode: each client clips and noises its own),
the server adds Gaussian noise to the sum (central) and divides by the expected cohort
size, even when no update arrived; each round is accounted, and its epsilon recorded.

With ``compression=`` (:class:`~fedkern.sim.compression.Compression`) each client encodes
its update (after its local noise, if any) with a codec of :mod:`fedkern.compress`, with
or without error feedback, and the server decodes and weight-adds all the round's messages
in one fused pass (:func:`fedkern.compress.accumulate`), never one message alone.

Randomness: the model's initialisation, the Byzantine clients, each round's sampling and
faults and each client's training draw from separate streams, each a Philox4x32
counter-based generator keyed by (seed, stream, round, client) (:func:`stream`), so a
run depends only on its seed, not on the executor, the thread count or a restart from a
checkpoint. Privacy noise comes from :func:`fedkern.privacy.add_gaussian_noise`'s
counter-based normal stream under the run's seed, its stream number built the same way
(:func:`noise_stream`): per (round, client) for local noise, and two server slots per
round for the noise on the sum and on adaptive clipping's count. Compression's message
seeds (one per selected client) and rotation seed are the round stream's next draws after
the faults.

Examples
--------
>>> from fedkern import datasets, sim
>>> data = datasets.fedprox_synthetic(1.0, 1.0, n_clients=10, seed=0)
>>> model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
>>> run = sim.Simulation(data, model, clients_per_round=5, local=sim.LocalTraining(epochs=2), seed=0)
>>> history = run.run(rounds=3)
>>> [record["round"] for record in history]
[1, 2, 3]
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
import warnings
from typing import Callable, Sequence

import numpy as np

from .. import _validate as check
from .. import attacks as attack_rules
from .. import aggregate, backends, compress, optim, robust
from .. import privacy as dp
from .._errors import FedkernValueError, NonFiniteError
from .._updates import Updates
from ..buffers import UpdateMatrix
from . import checkpoint
from . import compression as compressing
from .algorithms import BufferedRun, FedAvg
from .compression import Compression
from .data import FederatedDataset
from .executors import Lost, SerialExecutor, chunks
from .history import History
from .models import LocalTraining, Model, TrainResult
from .privacy import DifferentialPrivacy, RunPrivacy
from .secure import SecureAggregation, secure_mean
from .sampling import Poisson, Uniform, online

#: The kinds of random stream of a run (the first part of a stream's key); privacy noise
#: numbers its streams with the last kind.
STREAM_INIT, STREAM_ROUND, STREAM_CLIENT, STREAM_NOISE = 0, 1, 2, 3
#: Rounds and clients that fit in a stream's key.
MAX_ROUNDS, MAX_CLIENTS = 1 << 30, 1 << 32
#: The server's noise streams of a round take the last two client slots: the noise on the
#: sum of clipped updates, and the noise on adaptive clipping's count.
SERVER_NOISE, SERVER_COUNT = MAX_CLIENTS - 1, MAX_CLIENTS - 2

#: ``client_update(model, params, x, y, config, rng, delta_out) -> TrainResult``: a
#: client's local work. The default is ``model.train``; pass your own to change it.
ClientUpdate = Callable[[Model, np.ndarray, np.ndarray, np.ndarray, LocalTraining, np.random.Generator, np.ndarray],
                        TrainResult]


def _key(seed: int, kind: int, r: int, client: int, out: np.ndarray | None = None) -> np.ndarray:
    """The 128-bit Philox key of a stream, as two uint64 words (written into ``out`` if given)."""
    out = np.empty(2, np.uint64) if out is None else out
    out[0], out[1] = seed, (kind << 62) | (r << 32) | client
    return out


def stream(seed: int, kind: int, r: int = 0, client: int = 0) -> np.random.Generator:
    """The generator of one random stream of a run, e.g. ``stream(seed, STREAM_CLIENT, round, client)``.

    Philox4x32-10 with the 128-bit key (seed, kind, round, client) and counter 0: Philox
    is a keyed bijection of its counter, so distinct keys give independent streams, and
    a stream is rebuilt from its key alone (no state to save, none shared by threads).
    """
    return np.random.Generator(np.random.Philox(key=_key(seed, kind, r, client)))


def noise_stream(r: int, slot: int) -> int:
    """The stream number of privacy noise in round ``r`` for a client (or a server slot).

    The second word of :func:`_key` with kind :data:`STREAM_NOISE`, passed with the run's
    seed to :func:`fedkern.privacy.add_gaussian_noise` (a Philox4x32 stream of its own).
    """
    return int(_key(0, STREAM_NOISE, r, slot)[1])


class _ClientStreams(threading.local):
    """One reusable generator per thread, rekeyed per client: a new Generator costs about
    four times as much as resetting the state of one, and this runs once per client."""

    def __init__(self):
        self.bits = np.random.Philox(0)
        self.generator = np.random.Generator(self.bits)
        self.key = np.zeros(2, np.uint64)
        # the state of a freshly keyed Philox: counter 0, nothing buffered; only the key changes
        self.state = {"bit_generator": "Philox", "state": {"counter": np.zeros(4, np.uint64), "key": self.key},
                      "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}

    def get(self, seed: int, r: int, client: int) -> np.random.Generator:
        _key(seed, STREAM_CLIENT, r, client, out=self.key)
        self.bits.state = self.state
        return self.generator


_streams = _ClientStreams()


class _ChunkRows(threading.local):
    """Each thread's buffer for the deltas of the chunk it trains, kept across chunks and
    rounds: a fresh (chunk, D) array per chunk would fault in its pages every time. Its
    first n rows come with their kernel view (:class:`Updates`), made once per n."""

    array: np.ndarray | None = None
    views: dict[int, Updates]

    def get(self, n: int, d: int) -> Updates:
        if self.array is None or self.array.shape[1] != d or self.array.shape[0] < n:
            self.array = np.empty((n, d), np.float32)
            self.views = {}
        view = self.views.get(n)
        if view is None:
            view = self.views[n] = Updates(None, self.array[:n])
        return view


_chunk_rows = _ChunkRows()


def _train(model, params, x, y, config, rng, delta_out, **correction):
    return model.train(params, x, y, config, rng, delta_out, **correction)


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class Dropout:
    """Clients whose update never arrives.

    Parameters
    ----------
    rate : probability that a selected client drops out, in [0, 1)
    quorum : the round is skipped (and recorded) when fewer updates are accepted
    """

    rate: float = 0.0
    quorum: int = 1

    def __post_init__(self):
        check.real(self.rate, "dropout.rate", low=0.0, high=1.0, high_inclusive=False)
        check.count(self.quorum, "dropout.quorum", low=1)


@dataclasses.dataclass(frozen=True)
class Stragglers:
    """Clients that cannot finish their local epochs.

    Parameters
    ----------
    fraction : probability that a selected client straggles, in [0, 1]
    mode : ``"partial"`` (train a random 1..E-1 epochs and send that, as FedProx) or
        ``"drop"`` (the update is discarded, as FedAvg in the FedProx paper)
    """

    fraction: float = 0.0
    mode: str = "partial"

    def __post_init__(self):
        check.real(self.fraction, "stragglers.fraction", low=0.0, high=1.0)
        if self.mode not in ("partial", "drop"):
            raise FedkernValueError(f"stragglers.mode must be 'partial' or 'drop'; got {self.mode!r}")


#: Attacks that replace a Byzantine client's update, by name (all in :mod:`fedkern.attacks`).
UPDATE_ATTACKS = ("sign_flip", "ipm", "alie", "gaussian", "infinite")
#: Attacks on the data: the Byzantine client trains honestly on labels c -> C - 1 - c.
DATA_ATTACKS = ("label_flip",)


@dataclasses.dataclass(frozen=True)
class Attack:
    """Byzantine clients: who they are and what they send.

    Parameters
    ----------
    name : one of :data:`UPDATE_ATTACKS` (they see every honest update of the round, an
        omniscient attacker, and send ``fedkern.attacks.<name>(honest, f, **params)``) or
        ``"label_flip"``
    fraction : the fraction of all clients that are Byzantine (drawn once per run) ...
    clients : ... or their ids
    params : the attack's parameters (e.g. ``tau`` for ``ipm``, ``z`` for ``alie``)
    """

    name: str
    fraction: float = 0.0
    clients: tuple[int, ...] = ()
    params: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in UPDATE_ATTACKS + DATA_ATTACKS:
            raise FedkernValueError(f"attack.name must be one of {UPDATE_ATTACKS + DATA_ATTACKS}; got {self.name!r}")
        check.real(self.fraction, "attack.fraction", low=0.0, high=1.0)
        if self.fraction and self.clients:
            raise FedkernValueError("attack: give fraction or clients, not both")
        if self.name == "label_flip" and self.params:
            raise FedkernValueError(f"attack label_flip takes no parameters; got {sorted(self.params)}")

    @property
    def on_updates(self) -> bool:
        return self.name in UPDATE_ATTACKS

    def byzantine(self, n_clients: int, rng: np.random.Generator) -> np.ndarray:
        """The run's Byzantine mask over all clients."""
        mask = np.zeros(n_clients, bool)
        if self.clients:
            ids = np.asarray(self.clients)
            if ids.min() < 0 or ids.max() >= n_clients:
                raise FedkernValueError(f"attack.clients must be client ids in [0, {n_clients}); got {list(self.clients)}")
            mask[ids] = True
        else:
            mask[rng.choice(n_clients, size=round(self.fraction * n_clients), replace=False)] = True
        return mask

    def forge(self, honest: Sequence[np.ndarray], f: int, rng: np.random.Generator) -> np.ndarray:
        """The f malicious updates, built from the round's honest ones."""
        params = dict(self.params, seed=rng) if self.name == "gaussian" else self.params
        return getattr(attack_rules, self.name)(honest, f, **params)


#: Rules that reduce the rows to one vector, by name (all public fedkern ops).
RULES = ("mean", "median", "trimmed_mean", "meamed", "krum", "bulyan", "geometric_median", "centered_clipping")
#: Pre-aggregation steps that map the rows to new rows before the rule.
PRE_RULES = ("nearest_neighbor_mixing", "bucketing", "adaptive_clipping")
_TAKE_F = ("meamed", "krum", "bulyan", "nearest_neighbor_mixing", "adaptive_clipping")


class Aggregator:
    """A fedkern rule by name, with its parameters, as the round's aggregation stage.

    Parameters
    ----------
    name : one of :data:`RULES`; ``"mean"`` is the weighted mean (FedAvg)
    weights : ``"size"`` (each client's number of training examples, FedAvg's n_k) or
        ``"equal"``; used by ``mean`` and ``geometric_median``
    pre : optional pre-aggregation, a dict with ``name`` (one of :data:`PRE_RULES`) and its
        parameters; ``f`` is taken from the rule's when not given
    **params : the rule's parameters (e.g. ``f=2`` for ``krum``, ``beta=0.1`` for
        ``trimmed_mean``); ``centered_clipping`` is centred on the previous round's
        aggregate

    Examples
    --------
    >>> from fedkern.sim import Aggregator
    >>> Aggregator("krum", f=1).validate(clients=5)
    >>> Aggregator("krum", f=2).validate(clients=5)
    Traceback (most recent call last):
    ...
    fedkern._errors.FedkernValueError: aggregator: krum needs at least 7 updates to tolerate f=2 Byzantine clients; got 5
    """

    def __init__(self, name: str = "mean", *, weights: str = "size", pre: dict | None = None, **params):
        if name not in RULES:
            raise FedkernValueError(f"aggregator.name must be one of {RULES}; got {name!r}")
        if weights not in ("size", "equal"):
            raise FedkernValueError(f"aggregator.weights must be 'size' or 'equal'; got {weights!r}")
        self.name, self.weights, self.params = name, weights, params
        self.pre = None
        if pre is not None:
            pre = dict(pre)
            pre_name = pre.pop("name", None)
            if pre_name not in PRE_RULES:
                raise FedkernValueError(f"aggregator.pre.name must be one of {PRE_RULES}; got {pre_name!r}")
            if pre_name in _TAKE_F and "f" not in pre:
                if "f" not in params:
                    raise FedkernValueError(f"aggregator.pre: {pre_name} needs f (give aggregator.f or pre.f)")
                pre["f"] = params["f"]
            self.pre = (pre_name, pre)

    @property
    def streaming(self) -> bool:
        """True if the rule needs only a running sum (the plain weighted mean)."""
        return self.name == "mean" and self.pre is None

    def validate(self, clients: int) -> None:
        """Raise now if the rule cannot run on ``clients`` updates (wrong parameters, K too small for f)."""
        rows = np.zeros((clients, 2), np.float32)
        try:
            self(list(rows), np.ones(clients), np.zeros(2, np.float32), np.random.default_rng(0))
        except (TypeError, ValueError) as err:
            raise FedkernValueError(f"aggregator: {err}") from None

    def __call__(self, rows: list[np.ndarray], weights: np.ndarray, previous: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Aggregate the accepted rows (weights: their data sizes) into one float32 vector."""
        if self.pre is not None:
            pre_name, pre_params = self.pre
            seeded = dict(pre_params, seed=rng) if pre_name == "bucketing" else pre_params
            rows = list(getattr(robust, pre_name)(rows, **seeded))
            # pre-aggregated rows no longer belong to one client each
            weights = np.ones(len(rows))
        w = weights if self.weights == "size" else np.ones(len(rows))
        if self.name == "mean":
            return aggregate.weighted_mean(rows, w)
        if self.name == "geometric_median":
            return robust.geometric_median(rows, w, **self.params)
        if self.name == "centered_clipping":
            return robust.centered_clipping(rows, previous, **self.params)
        return getattr(robust, self.name)(rows, **self.params)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        pre = f", pre={self.pre[0]!r}" if self.pre else ""
        return f"Aggregator({self.name!r}, weights={self.weights!r}{pre}{extra})"


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class _Chunk:
    """What training one chunk of the cohort returns to the round."""

    partial: np.ndarray | None      # float64 weighted sum of the accepted deltas (streaming; None: none)
    weight: float                   # their total weight
    loss: np.ndarray                # each client's mean local loss (nan if it did not train)
    steps: np.ndarray
    accepted: np.ndarray            # bool, False for a rejected (non-finite) update
    unclipped: int = 0              # central DP: accepted updates within the clipping norm
    messages: list | None = None    # compression: the accepted updates' Encoded messages ...
    message_weights: np.ndarray | None = None    # ... their weights
    residuals: dict | None = None   # error feedback: the chunk's clients' new residuals


def _clipped_sum(kernel, rows: Updates, clip: float) -> tuple[np.ndarray | None, np.ndarray, int]:
    """Central DP's float64 sum of the finite rows, each clipped to ``clip`` (None if none is
    finite), the accepted (finite) mask, and how many accepted rows had norm <= clip."""
    total, norms = np.empty(rows.d), np.empty(rows.k)
    kernel.clip_and_sum(rows, clip, np.ones(rows.k), total, norms)
    accepted = np.isfinite(norms)
    if not accepted.all():
        # noise must never hide a NaN or inf: drop those rows and sum the others again
        kept = np.flatnonzero(accepted)
        if not kept.size:
            return None, accepted, 0
        kernel.clip_and_sum(rows.subset(kept), clip, np.ones(kept.size), total, np.empty(kept.size))
    return total, accepted, int(np.count_nonzero(norms[accepted] <= clip))


class Simulation:
    """Federated learning, one round after another, on fedkern's kernels.

    Parameters
    ----------
    data : the federated dataset (``data.test`` is evaluated on all its rows)
    model : a :class:`~fedkern.sim.models.Model` (built-in or your own)
    clients_per_round : clients selected each round
    local : the local training settings (epochs, batch size, learning rate, ...)
    algorithm : :class:`~fedkern.sim.algorithms.FedAvg` (default), ``FedProx``, or ``FedNova``
        / ``QFFL`` / ``Scaffold``, which replace the mean (they need the ``mean``
        aggregator, and no privacy, secure aggregation, compression or update attack;
        ``Scaffold`` also a model whose ``train`` takes ``correction=``); ``FBL`` (its
        balanced loss needs a model whose ``train`` takes ``logit_adjustment=``); or
        ``FedBuff``, whose rounds are buffered asynchronous server updates
    sampler : a :mod:`~fedkern.sim.sampling` sampler (default uniform)
    availability : each client's probability of being online in a round (scalar or per client)
    aggregator : an :class:`Aggregator` or a rule name (default ``"mean"``)
    server_optimizer : a :class:`fedkern.ServerOptimizer` (default ``FedAvg(lr=1)``: w += mean delta)
    attack, dropout, stragglers : faults (default none)
    reject_norm_ratio : reject updates whose norm exceeds this multiple of the round's median
    executor : a :mod:`~fedkern.sim.executors` executor (default serial)
    client_update : replaces ``model.train`` as the clients' local work (see :data:`ClientUpdate`)
    seed : the run's seed
    eval_every : evaluate the test data every this many rounds (and after the last)
    backend : fedkern backend for the aggregation kernels (None: the global choice)
    privacy : :class:`~fedkern.sim.privacy.DifferentialPrivacy` settings (default none):
        DP-FedAvg, unweighted (every client weight 1, whatever ``aggregator.weights``
        says). It needs the ``mean`` aggregator without pre-aggregation, every client
        online (``availability`` 1), no norm filter and ``dropout.quorum`` 1; its
        ``sampling`` decides the sampler (``Poisson`` or ``Uniform``, the default for it)
    secure_aggregation : :class:`~fedkern.sim.secure.SecureAggregation` settings (default
        none): the server learns only the survivors' quantised weighted mean; needs the
        ``mean`` aggregator without pre-aggregation or norm filter, and no privacy
    compression : :class:`~fedkern.sim.compression.Compression` settings (default none):
        clients send compressed updates, the server sums them fused; needs the ``mean``
        aggregator without pre-aggregation or norm filter, and neither secure aggregation
        nor central privacy (local privacy is fine: see :mod:`fedkern.sim.compression`)
    """

    def __init__(self, data: FederatedDataset, model: Model, *, clients_per_round: int,
                 local: LocalTraining | None = None, algorithm: FedAvg | None = None, sampler=None,
                 availability: float | np.ndarray = 1.0, aggregator: Aggregator | str = "mean",
                 server_optimizer: optim.ServerOptimizer | None = None, attack: Attack | None = None,
                 dropout: Dropout | None = None, stragglers: Stragglers | None = None,
                 reject_norm_ratio: float | None = None, executor=None, client_update: ClientUpdate | None = None,
                 seed: int = 0, eval_every: int = 1, backend: str | None = None,
                 privacy: DifferentialPrivacy | None = None, secure_aggregation: SecureAggregation | None = None,
                 compression: Compression | None = None):
        if not isinstance(data, FederatedDataset):
            raise check.FedkernTypeError(f"data must be a FederatedDataset; got {type(data).__name__}")
        self.data, self.model = data, model
        self.train_data = data.train
        if data.train.n_clients > MAX_CLIENTS:
            raise FedkernValueError(f"data has {data.train.n_clients} clients; at most {MAX_CLIENTS} fit a stream key")
        n_with_data = int(np.count_nonzero(self.train_data.sizes))
        self.clients_per_round = check.count(clients_per_round, "clients_per_round", low=1, high=n_with_data,
                                             why=f" (the number of clients with training data is {n_with_data})")
        self.algorithm = algorithm or FedAvg()
        self.local = self.algorithm.local(local or LocalTraining())
        if self.algorithm.uses_label_counts:
            self.algorithm.fit(self.train_data.label_counts())
        poisson = isinstance(privacy, DifferentialPrivacy) and privacy.sampling == "poisson"
        self.sampler = self._sampler(sampler) or (Poisson() if poisson else Uniform())
        weights = self.algorithm.server_weights()
        #: each client's weight in the server's mean (its data size unless the algorithm says)
        self.client_weights = (self.train_data.sizes.astype(np.float64) if weights is None
                               else np.asarray(weights, np.float64))
        if hasattr(self.sampler, "validate"):
            self.sampler.validate(self.clients_per_round)
        self.availability = self._availability(availability)
        self.aggregator = Aggregator(aggregator) if isinstance(aggregator, str) else aggregator
        self.aggregator.validate(self.clients_per_round)
        self.optimizer = server_optimizer or optim.FedAvg(lr=1.0)
        self.attack, self.dropout, self.stragglers = attack, dropout or Dropout(), stragglers or Stragglers()
        self.reject_norm_ratio = None if reject_norm_ratio is None else check.real(
            reject_norm_ratio, "reject_norm_ratio", low=1.0)
        self.executor = executor or SerialExecutor()
        self.client_update = client_update or _train
        self.seed = check.count(seed, "seed", high=(1 << 64) - 1)
        self.eval_every = check.count(eval_every, "eval_every", low=1)
        if backend is not None:
            backends.resolve("aggregate", backend)     # a misspelt backend fails now, not in round 1
        self.backend = backend
        self.privacy = self._privacy(privacy, n_with_data)
        self.secure = self._secure(secure_aggregation, n_with_data)
        self.compression = self._compression(compression, model.n_params)
        self._check_algorithm()
        #: FedBuff's run (made at its first round) and the ids of the clients it draws from
        self._buffered: BufferedRun | None = None
        self._with_data = np.flatnonzero(self.train_data.sizes)
        #: error feedback's residual (float64) of every client that has sent, by client id
        self.residuals: dict[int, np.ndarray] = {}
        self.needs_rows = (not self.aggregator.streaming or self.reject_norm_ratio is not None
                           or self.algorithm.combines_updates
                           or (attack is not None and attack.on_updates) or self.secure is not None)

        self.params = np.ascontiguousarray(model.init(stream(self.seed, STREAM_INIT, 0)), np.float32)
        if self.params.shape != (model.n_params,):
            raise FedkernValueError(f"model.init returned shape {self.params.shape}; expected ({model.n_params},)")
        self.byzantine = (attack.byzantine(self.train_data.n_clients, stream(self.seed, STREAM_INIT, 1))
                          if attack else np.zeros(self.train_data.n_clients, bool))
        self.previous = np.zeros_like(self.params)   # the last aggregate (centered clipping's centre)
        if self.algorithm.corrects_clients:          # SCAFFOLD's variates, zero at the start of a run
            self.algorithm.start(model.n_params, self.train_data.n_clients)
        self.round = 0
        self.history = History()
        self._matrix: UpdateMatrix | None = None
        self._last_round = 0      # run() evaluates its last round whatever eval_every says
        self._clip_kernel = backends.kernels("privacy", backend, "clip_and_sum") if self.privacy else None
        self._local_by_epochs = {self.local.epochs: self.local}
        self.executor.start(self)

    def _sampler(self, sampler):
        """The given sampler, or the algorithm's in place of uniform sampling (FBL's)."""
        own = self.algorithm.sampler()
        if own is None:
            return sampler
        if sampler is not None and not isinstance(sampler, Uniform):
            raise FedkernValueError(f"sampler: {self.algorithm.name} draws its cohorts itself ({own!r}); "
                                    f"got {sampler!r}")
        return own

    def _check_algorithm(self) -> None:
        """Refuse an algorithm the round cannot run, or one that combines the updates
        itself (FedNova, q-FFL) with a stage that would hide them."""
        algorithm = self.algorithm
        if algorithm.asynchronous:
            self._check_asynchronous()
        if algorithm.corrects_clients:
            if not getattr(self.model, "takes_correction", False):
                raise FedkernValueError(f"model: {algorithm.name} corrects every local step, so the model's train() "
                                        f"must take correction= (and set takes_correction = True)")
        if algorithm.adjusts_logits and not getattr(self.model, "takes_logit_adjustment", False):
            raise FedkernValueError(f"model: {algorithm.name} adjusts every client's logits, so the model's train() "
                                    f"must take logit_adjustment= (and set takes_logit_adjustment = True)")
        if (algorithm.corrects_clients or algorithm.adjusts_logits) and self.client_update is not _train:
            raise FedkernValueError(f"client_update: not with {algorithm.name}, which passes each client's "
                                    f"{'correction' if algorithm.corrects_clients else 'logit adjustment'} "
                                    f"to the model's train()")
        if algorithm.server_weights() is not None:
            if self.secure is not None:
                raise FedkernValueError(f"secure_aggregation: needs integer client weights; {algorithm.name}'s "
                                        f"class-balanced weights are not (set balanced_weights to false)")
            if self.privacy is not None:
                raise FedkernValueError(f"privacy: DP-FedAvg weighs every client 1, which would drop "
                                        f"{algorithm.name}'s class-balanced weights (set balanced_weights to false)")
        if not algorithm.combines_updates:
            return
        if not self.aggregator.streaming:
            raise FedkernValueError(f"aggregator: {algorithm.name} combines the updates itself, so it needs the "
                                    f"'mean' aggregator without pre-aggregation; got {self.aggregator!r}")
        others = {"privacy": self.privacy, "secure_aggregation": self.secure, "compression": self.compression,
                  "attack": self.attack if self.attack is not None and self.attack.on_updates else None}
        for key, setting in others.items():
            if setting is not None:
                raise FedkernValueError(f"{key}: not with {algorithm.name}, which needs every client's own update "
                                        f"and step count")

    def _check_asynchronous(self) -> None:
        """Refuse what a buffered asynchronous run (FedBuff) does not do: it trains one
        client at a time as they arrive and steps the model itself."""
        name = self.algorithm.name
        others = {"privacy": self.privacy, "secure_aggregation": self.secure, "compression": self.compression,
                  "attack": self.attack, "reject_norm_ratio": self.reject_norm_ratio,
                  "dropout": self.dropout.rate or None, "stragglers": self.stragglers.fraction or None}
        for key, setting in others.items():
            if setting is not None:
                raise FedkernValueError(f"{key}: not with {name}, whose clients arrive one by one into its buffer")
        if not self.aggregator.streaming or self.aggregator.weights != "size":
            raise FedkernValueError(f"aggregator: {name} averages its buffer itself; got {self.aggregator!r}")
        if not (isinstance(self.optimizer, optim.FedAvg) and self.optimizer.lr == 1.0):
            raise FedkernValueError(f"server_optimizer: {name} steps the model with its own server_lr; "
                                    f"leave the server optimizer at fedavg with lr 1")
        if not isinstance(self.sampler, Uniform) or np.any(self.availability != 1.0):
            raise FedkernValueError(f"sampler: {name} draws its clients uniformly as slots free up; "
                                    f"got {self.sampler!r} with availability {self.availability}")

    def _train_buffered(self, index: int, params: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """FedBuff's local work: the ``index``-th client with data trains from ``params``."""
        client = int(self._with_data[index])
        delta = np.empty_like(params)
        result = self.client_update(self.model, params, *self.train_data.client(client), self.local, rng, delta)
        return delta, result.loss

    def _buffered_step(self) -> dict:
        """One FedBuff round: arrivals until the buffer is full, then one server update."""
        start = time.perf_counter()
        if self._buffered is None:
            self._buffered = BufferedRun(self.algorithm, self._train_buffered, self.params,
                                         n_clients=self._with_data.size, seed=self.seed)
        dispatched = self._buffered.dispatched
        buffered = self._buffered.step()
        self.params[...] = self._buffered.params
        self.round = buffered["round"]
        indices, loss = self._buffered.arrived
        k = indices.size
        no = np.zeros(k, bool)
        record = self._record(self.round, k, k, no, ~no, no, no, loss,
                              self.train_data.sizes[self._with_data[indices]].astype(np.float64), False, no)
        # the models sent down this round: one to each freed slot's next client
        sent = self._buffered.dispatched - dispatched
        record.update(buffered, dispatched=sent, bytes_down=sent * self.params.nbytes, epsilon=math.inf,
                      clip=math.inf, secagg_bytes=0, secagg_seconds=0.0, seconds=time.perf_counter() - start)
        self.history.append(record)
        return record

    def _secure(self, settings: SecureAggregation | None, population: int) -> SecureAggregation | None:
        """The secure aggregation settings, once the others are known to fit them; sets the
        integer weights' public bound (the largest data size, or 1)."""
        if settings is None:
            return None
        if not isinstance(settings, SecureAggregation):
            raise check.FedkernTypeError(f"secure_aggregation must be a SecureAggregation; got {type(settings).__name__}")
        if not self.aggregator.streaming:
            raise FedkernValueError(f"aggregator: secure aggregation reveals only the sum, so it needs the 'mean' "
                                    f"aggregator without pre-aggregation; got {self.aggregator!r}")
        if self.reject_norm_ratio is not None:
            raise FedkernValueError("reject_norm_ratio: not with secure aggregation (the server sees no update)")
        if self.privacy is not None:
            raise FedkernValueError("privacy: differential privacy and secure aggregation are not combined yet")
        self._max_weight = int(self.train_data.sizes.max()) if settings.weights == "size" else 1
        largest = population if isinstance(self.sampler, Poisson) else self.clients_per_round
        try:       # the ring must hold the largest cohort's sum: fail now, not in some round
            settings.config(largest, 1, self._max_weight, 0)
        except FedkernValueError as err:
            raise FedkernValueError(f"secure_aggregation: {err}") from None
        return settings

    def _compression(self, settings: Compression | None, d: int) -> Compression | None:
        """The compression settings, once the others are known to fit them (the reasons
        for each refusal: :mod:`fedkern.sim.compression`)."""
        if settings is None:
            return None
        if not isinstance(settings, Compression):
            raise check.FedkernTypeError(f"compression must be a Compression; got {type(settings).__name__}")
        if self.secure is not None:
            raise FedkernValueError("secure_aggregation: not with compression (masked sums need one fixed-point "
                                    "encoding for all clients, secure_aggregation.levels; a codec's per-client "
                                    "scales and indices cannot be summed under masks)")
        if self.privacy is not None and self.privacy.central:
            raise FedkernValueError("privacy: central differential privacy is not combined with compression (the "
                                    "server would decode each message to clip it, and a decoded message is not "
                                    "bounded by the clip); local privacy is: each client noises, then encodes")
        if not self.aggregator.streaming:
            raise FedkernValueError(f"aggregator: compressed messages are decoded straight into one sum, never into "
                                    f"rows, so compression needs the 'mean' aggregator without pre-aggregation; "
                                    f"got {self.aggregator!r}")
        if self.reject_norm_ratio is not None:
            raise FedkernValueError("reject_norm_ratio: not with compression (the server decodes no update alone, "
                                    "so it has no norm to compare)")
        settings.codec(d)     # k larger than the model fails now, not in round 1
        return settings

    def _round_codec(self, rng: np.random.Generator, k: int) -> tuple[compress.Codec, np.ndarray]:
        """The round's codec and the message seeds of its ``k`` selected clients, drawn from
        the round's stream (the seeds first, then a rotated codec's shared rotation seed)."""
        seeds = rng.integers(0, 2**64, size=k, dtype=np.uint64)
        rotation = int(rng.integers(0, 2**64, dtype=np.uint64)) if self.compression.rotated else 0
        return self.compression.codec(self.params.shape[0], rotation), seeds

    def _secure_round(self, rows: np.ndarray, arrives: np.ndarray, sizes: np.ndarray, r: int,
                      rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray, dict]:
        """The round's mean through the secure aggregation protocol among the selected
        clients: those that did not arrive, or whose update is not finite, drop out after
        sharing their keys. Returns the mean (None: not enough survivors), the accepted
        mask over the arrived clients and the protocol's figures."""
        accepted = self._screen(rows) if rows.shape[0] else np.zeros(0, bool)
        kept = np.flatnonzero(accepted)
        survivors = np.flatnonzero(arrives)[kept]
        seeds = rng.integers(0, 2**63, size=arrives.size)   # every selected client's, in a fixed order
        weights = (sizes[kept] if self.secure.weights == "size" else np.ones(kept.size)).astype(np.int64)
        delta, stats = secure_mean(self.secure, arrives.size, self.params.shape[0], survivors.tolist(),
                                   [rows[i] for i in kept], weights, seeds[survivors], self._max_weight, r,
                                   self.backend)
        return delta, accepted, stats

    def _availability(self, availability):
        n = self.train_data.n_clients
        if np.ndim(availability) == 0:
            return check.real(availability, "availability", low=0.0, low_inclusive=False, high=1.0)
        values = np.asarray(availability, np.float64)
        if values.shape != (n,) or not np.all((values >= 0) & (values <= 1)):
            raise FedkernValueError(f"availability must be one probability or {n} probabilities in [0, 1]")
        return values

    def _privacy(self, settings: DifferentialPrivacy | None, population: int) -> RunPrivacy | None:
        """The run's privacy ledger, once the other settings are known to fit its accounting."""
        if settings is None:
            return None
        if not isinstance(settings, DifferentialPrivacy):
            raise check.FedkernTypeError(f"privacy must be a DifferentialPrivacy; got {type(settings).__name__}")
        sampler = Poisson if settings.sampling == "poisson" else Uniform
        if not isinstance(self.sampler, sampler):
            raise FedkernValueError(f"sampler: privacy.sampling={settings.sampling!r} is accounted for "
                                    f"{sampler.__name__} sampling; got {self.sampler!r}")
        if not self.aggregator.streaming:
            raise FedkernValueError(f"aggregator: differential privacy needs the 'mean' aggregator without "
                                    f"pre-aggregation (DP-FedAvg's clipped mean); got {self.aggregator!r}")
        if np.ndim(self.availability) or self.availability < 1:
            raise FedkernValueError("availability: must be 1 with differential privacy (offline clients "
                                    "would change the sampling the accountant assumes)")
        if self.reject_norm_ratio is not None:
            raise FedkernValueError("reject_norm_ratio: not with differential privacy (the filter depends on "
                                    "the other clients' norms, so one client's influence is not bounded by the clip)")
        if self.dropout.quorum > 1:
            raise FedkernValueError("dropout.quorum: must be 1 with differential privacy (skipping a round "
                                    "would reveal how many updates arrived)")
        if self.train_data.n_clients > SERVER_COUNT:
            raise FedkernValueError(f"data has {self.train_data.n_clients} clients; with differential privacy "
                                    f"at most {SERVER_COUNT} leave the server its noise streams")
        return RunPrivacy(settings, population, self.clients_per_round)

    # ------------------------------------------------------------------ stages
    def _select(self, rng: np.random.Generator) -> np.ndarray:
        sizes = self.train_data.sizes
        candidates = online(rng, sizes, self.availability)
        loss = self._client_losses if self.sampler.needs_loss else None
        return np.sort(self.sampler.select(rng, self.clients_per_round, candidates, sizes, loss))

    def _client_losses(self, clients: np.ndarray) -> np.ndarray:
        """The global model's loss on each client's training data (for power-of-choice)."""
        return np.array([self.model.loss(self.params, *self.train_data.client(int(c))) for c in clients])

    def _faults(self, rng: np.random.Generator, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(arrives, epochs, straggles) for the k selected clients, in one fixed order of draws."""
        epochs = np.full(k, self.local.epochs)
        drops = rng.random(k) < self.dropout.rate
        straggles = (rng.random(k) < self.stragglers.fraction) & ~drops
        partial_epochs = rng.integers(1, max(self.local.epochs, 2), size=k)
        if self.stragglers.mode == "partial":
            epochs[straggles] = partial_epochs[straggles]
        else:
            drops |= straggles
        return ~drops, epochs, straggles

    def _config(self, epochs: int) -> LocalTraining:
        config = self._local_by_epochs.get(epochs)
        if config is None:
            config = self._local_by_epochs[epochs] = dataclasses.replace(self.local, epochs=int(epochs))
        return config

    def train_chunk(self, positions: range, plan: dict) -> _Chunk:
        """Train the clients at ``positions`` of the round's cohort (runs on an executor's worker).

        Each client writes its delta into a row: of the round's update matrix when the rule
        needs every row, else of this chunk's own buffer, which is reduced to one float64
        weighted sum of its finite rows before the chunk returns (with compression: whose
        finite rows the clients encode, their messages returned).
        """
        begin, end = positions.start, positions.stop
        matrix = plan["rows"]
        view = None if matrix is not None else _chunk_rows.get(end - begin, self.params.shape[0])
        rows = matrix[begin:end] if matrix is not None else view.matrix
        loss, steps = np.full(end - begin, math.nan), np.zeros(end - begin, np.int64)
        data, r, update, params = self.train_data, plan["round"], self.client_update, plan["params"]
        offsets, top_label = data.offsets, data.n_classes - 1
        # Python ints: indexing them costs less than numpy scalars, once per client
        clients, epochs = plan["clients"][begin:end].tolist(), plan["epochs"][begin:end].tolist()
        trains, flips = plan["trains"][begin:end].tolist(), plan["flips"][begin:end].tolist()
        local_noise, corrections, adjustments = plan["local_noise"], plan["corrections"], plan["adjustments"]
        extra: dict[str, np.ndarray] = {}       # the algorithm's per-client inputs to the model's train()
        for j in range(end - begin):
            if not trains[j]:
                continue
            c = clients[j]
            first, last = offsets[c], offsets[c + 1]
            y = data.y[first:last]
            if flips[j]:
                y = top_label - y
            if corrections is not None:
                extra["correction"] = corrections[begin + j]
            if adjustments is not None:
                extra["logit_adjustment"] = adjustments[begin + j]
            result = update(self.model, params, data.x[first:last], y, self._config(epochs[j]),
                            _streams.get(self.seed, r, c), rows[j], **extra)
            loss[j], steps[j] = result.loss, result.steps
            if local_noise is not None:
                self._noise_locally(rows[j], local_noise, r, c)
        if matrix is not None:
            return _Chunk(None, 0.0, loss, steps, np.ones(end - begin, bool))
        if plan["codec"] is not None:
            return self._encode_chunk(rows, begin, end, plan, loss, steps)
        if plan["clip"] is not None:
            partial, accepted, unclipped = _clipped_sum(self._clip_kernel, view, plan["clip"])
            return _Chunk(partial, float(accepted.sum()), loss, steps, accepted, unclipped)
        weights = plan["weights"][begin:end]
        partial = np.empty(self.params.shape[0])
        accepted = np.ones(end - begin, bool)
        # the kernel itself, without the API's checks: the rows and weights are this
        # round's own buffers (float32 and float64, contiguous, of the right shapes)
        if plan["sum_kernels"].weighted_sum(view, weights, 1.0, partial):
            # some update holds NaN or inf (a float64 sum of finite float32 rows cannot
            # overflow): find them by their norms and sum the others again
            accepted = np.isfinite(aggregate.l2_norms(rows, dtype=np.float64, check_finite=False,
                                                      backend=self.backend))
            weights = weights[accepted]
            kept = [rows[i] for i in np.flatnonzero(accepted)]
            partial = aggregate.weighted_sum(kept, weights, dtype=np.float64, check_finite=False,
                                             backend=self.backend) if kept else None
        return _Chunk(partial, float(weights.sum()), loss, steps, accepted)

    def _encode_chunk(self, rows: np.ndarray, begin: int, end: int, plan: dict, loss: np.ndarray,
                      steps: np.ndarray) -> _Chunk:
        """The chunk's clients encode their finite updates (a non-finite one is rejected
        before: no codec can encode it)."""
        accepted = np.isfinite(aggregate.l2_norms(rows, dtype=np.float64, check_finite=False, backend=self.backend))
        kept = np.flatnonzero(accepted)
        messages, weights, residuals = self._encode([rows[i] for i in kept], begin + kept, plan)
        return _Chunk(None, float(weights.sum()), loss, steps, accepted, messages=messages, message_weights=weights,
                      residuals=residuals)

    def _encode(self, rows: list[np.ndarray], positions: np.ndarray,
                plan: dict) -> tuple[list[compress.Encoded], np.ndarray, dict | None]:
        """Messages, weights and new residuals of the clients at cohort ``positions``, whose
        updates are ``rows``."""
        messages, residuals = compressing.encode(plan["codec"], rows, plan["clients"][positions].tolist(),
                                                 plan["codec_seeds"][positions], plan["residuals"],
                                                 backend=self.backend)
        return messages, plan["weights"][positions], residuals

    def _noise_locally(self, row: np.ndarray, noise: tuple[float, float], r: int, client: int) -> None:
        """Local DP: clip a client's delta to C and add N(0, (zC)^2) from its own stream, in place."""
        clip, z = noise
        try:
            dp.local_dp_update(row, clip, z, self.seed, stream=noise_stream(r, client), out=row, backend=self.backend)
        except NonFiniteError:
            pass      # sent as it is, so that the round rejects it: noise must never hide a NaN

    def _rows(self, n: int) -> np.ndarray:
        # a Poisson cohort may outgrow clients_per_round: the matrix grows with it
        if self._matrix is None or self._matrix.array.shape[0] < n:
            self._matrix = UpdateMatrix(max(n, self.clients_per_round), self.params.shape[0])
        return self._matrix.array[:n]

    def _combine(self, rows: np.ndarray, weights: np.ndarray, steps: np.ndarray, clients: np.ndarray) -> np.ndarray:
        """FedNova's, q-FFL's or SCAFFOLD's step from the accepted rows, with each client's
        loss at the global model (on its own training data) when the algorithm needs it."""
        losses = self._client_losses(clients) if self.algorithm.needs_global_loss else None
        weights = weights if self.aggregator.weights == "size" else np.ones(weights.size)
        return self.algorithm.combine(rows, weights, steps, losses, clients)

    def _screen(self, rows: np.ndarray) -> np.ndarray:
        """Accepted rows: finite, and within reject_norm_ratio x the median norm if set."""
        norms = aggregate.l2_norms(rows, dtype=np.float64, check_finite=False, backend=self.backend)
        accepted = np.isfinite(norms)
        if self.reject_norm_ratio is not None and accepted.any():
            accepted &= norms <= self.reject_norm_ratio * np.median(norms[accepted])
        return accepted

    # ------------------------------------------------------------------ one round
    def step(self) -> dict:
        """Run the next round; return its history record (also appended to :attr:`history`).

        Raises :class:`~fedkern.FedkernValueError` instead if the round would pass the
        privacy budget of ``on_budget="stop"`` (:meth:`run` stops before it).
        """
        start = time.perf_counter()
        r = self.round + 1
        if r >= MAX_ROUNDS:
            raise FedkernValueError(f"round {r}: at most {MAX_ROUNDS - 1} rounds fit a stream key")
        refused = self._budget_stop(1)
        if refused:
            raise FedkernValueError(refused)
        if self.algorithm.asynchronous:
            return self._buffered_step()
        rng = stream(self.seed, STREAM_ROUND, r)
        selected = self._select(rng)
        arrives, epochs, straggles = self._faults(rng, selected.size)
        clients = selected[arrives]
        n = clients.size
        byzantine = self.byzantine[clients]
        forged = byzantine & bool(self.attack and self.attack.on_updates)
        sizes = self.train_data.sizes[clients].astype(np.float64)
        weights = self.client_weights[clients]
        private = self.privacy
        plan = {"round": r, "clients": clients, "epochs": epochs[arrives], "trains": ~forged,
                "costs": sizes * epochs[arrives] * ~forged,
                "flips": byzantine & bool(self.attack and not self.attack.on_updates),
                "weights": np.ones(n) if private or self.aggregator.weights == "equal" else weights,
                "rows": self._rows(n) if self.needs_rows and n else None,
                "sum_kernels": backends.kernels("aggregate", self.backend, "weighted_sum"),
                "clip": private.clip if private and private.central else None,
                "local_noise": (private.clip, private.value_multiplier) if private and not private.central else None,
                "corrections": (np.stack([self.algorithm.correction(c) for c in clients.tolist()])
                                if self.algorithm.corrects_clients and n else None),
                "adjustments": (np.stack([self.algorithm.logit_adjustment(c) for c in clients.tolist()])
                                if self.algorithm.adjusts_logits and n else None)}
        plan["codec"] = plan["codec_seeds"] = plan["residuals"] = None
        if self.compression is not None:
            plan["codec"], seeds = self._round_codec(rng, selected.size)
            plan["codec_seeds"] = seeds[arrives]
            if self.compression.error_feedback:
                plan["residuals"] = {c: self.residuals[c] for c in clients.tolist() if c in self.residuals}
        plan["params"] = broadcast = self.params.copy()
        broadcast.flags.writeable = False     # no client can change what the others receive

        results, lost = self._results(plan, n)
        forged &= ~lost
        cat = (lambda name: np.concatenate([getattr(c, name) for c in results])) if results else (
            lambda name: np.zeros(0))
        loss, accepted = cat("loss"), cat("accepted").astype(bool)
        delta, total, unclipped = None, None, sum(c.unclipped for c in results)
        secure = sent = None
        rows = plan["rows"]
        if rows is not None:
            honest = [rows[i] for i in np.flatnonzero(~forged & ~lost)]
            if forged.any() and honest:
                rows[forged] = self.attack.forge(honest, int(forged.sum()), rng)
        if self.compression is not None:
            total, weight, accepted, sent = self._compressed_sum(plan, results, accepted)
            if total is None and private:       # local DP: nothing arrived, the mean is still over m
                total = np.zeros(self.params.shape[0])
            elif total is not None and not private:
                delta = (total / weight).astype(np.float32)
        elif self.secure is not None and rows is None:    # nobody arrived: keys went round, no mean
            delta, accepted, secure = self._secure_round(np.zeros((0, self.params.shape[0]), np.float32), arrives,
                                                         sizes, r, rng)
        elif rows is not None:
            if private:
                total, accepted, unclipped = self._private_rows(rows, plan["clip"])
            elif self.secure is not None:
                delta, accepted, secure = self._secure_round(rows, arrives, sizes, r, rng)
            else:
                accepted = self._screen(rows)
                if accepted.sum() >= self.dropout.quorum:
                    kept = np.flatnonzero(accepted)
                    if self.algorithm.combines_updates:
                        delta = self._combine(rows[kept], weights[kept], cat("steps")[kept], clients[kept])
                    else:
                        delta = self.aggregator([rows[i] for i in kept], weights[kept], self.previous, rng)
        elif private or accepted.sum() >= self.dropout.quorum:
            total = np.zeros(self.params.shape[0])
            for chunk in results:      # in chunk order: the same bits on every executor
                if chunk.partial is not None:
                    total += chunk.partial
            if not private:
                delta = (total / sum(c.weight for c in results)).astype(np.float32)
        if private:
            clip = private.clip
            delta, epsilon = self._release(total, r, unclipped, int(accepted.sum()))
        if delta is not None:
            self.optimizer.step(self.params, delta)
            self.previous = np.asarray(delta, np.float32)
        self.round = r
        record = self._record(r, selected.size, n, straggles, accepted, forged, byzantine, loss, sizes, delta is None,
                              lost)
        record["epsilon"], record["clip"] = (epsilon, clip) if private else (math.inf, math.inf)
        record["secagg_bytes"], record["secagg_seconds"] = 0, 0.0
        if secure is not None:
            record.update(secure)
        if sent is not None:
            record["bytes_up"] = sent
        record["seconds"] = time.perf_counter() - start
        self.history.append(record)
        return record

    def _results(self, plan: dict, n: int) -> tuple[list[_Chunk], np.ndarray]:
        """The round's chunks trained on the executor, and the mask of the clients it lost
        (past its deadline, or on a worker that died twice). A lost chunk's clients count as
        dropouts: they send nothing, and their rows of the update matrix are NaN, so that
        every rule and screen rejects them (:meth:`_record` does not count them rejected)."""
        items = chunks(n) if n else []
        results = list(self.executor.run(plan, items))
        lost = np.zeros(n, bool)
        for j, (item, result) in enumerate(zip(items, results)):
            if isinstance(result, Lost):
                size = len(item)
                results[j] = _Chunk(None, 0.0, np.full(size, math.nan), np.zeros(size, np.int64), np.zeros(size, bool),
                                    messages=[], message_weights=np.zeros(0), residuals={})
                lost[item.start:item.stop] = True
                if plan["rows"] is not None:
                    plan["rows"][item.start:item.stop] = np.nan
        return results, lost

    def _compressed_sum(self, plan: dict, results: list[_Chunk],
                        accepted: np.ndarray) -> tuple[np.ndarray | None, float, np.ndarray, int]:
        """The fused float64 weighted sum of the round's messages (None below the quorum),
        their total weight, the accepted mask and the bytes sent. The chunks encoded as they
        trained; an update attack needed every row, so those are encoded here, after the
        forging. The senders' residuals move into the store, in cohort order."""
        rows = plan["rows"]
        if rows is not None:
            accepted = self._screen(rows)       # the finite ones: no norm filter with compression
            kept = np.flatnonzero(accepted)
            messages, weights, residuals = self._encode([rows[i] for i in kept], kept, plan)
            updates = [residuals]
        else:
            messages = [m for chunk in results for m in chunk.messages]
            weights = np.concatenate([chunk.message_weights for chunk in results]) if results else np.zeros(0)
            updates = [chunk.residuals for chunk in results]
        if plan["residuals"] is not None:
            for residuals in updates:
                self.residuals.update(residuals)
        sent = sum(m.nbytes for m in messages)
        if not messages or len(messages) < self.dropout.quorum:
            return None, 0.0, accepted, sent
        return compress.accumulate(messages, weights, backend=self.backend), float(weights.sum()), accepted, sent

    def _private_rows(self, rows: np.ndarray, clip: float | None) -> tuple[np.ndarray, np.ndarray, int]:
        """DP's sum of the round's matrix rows (an attack needed them all): clipped by the
        server (central, ``clip`` given) or as the clients sent them (local); non-finite
        rows rejected. Returns the float64 sum, the accepted mask and the unclipped count."""
        if clip is not None:
            total, accepted, unclipped = _clipped_sum(self._clip_kernel, Updates(None, rows), clip)
            return (np.zeros(rows.shape[1]) if total is None else total), accepted, unclipped
        accepted = self._screen(rows)
        kept = [rows[i] for i in np.flatnonzero(accepted)]
        total = aggregate.weighted_sum(kept, np.ones(len(kept)), dtype=np.float64, check_finite=False,
                                       backend=self.backend) if kept else np.zeros(rows.shape[1])
        return total, accepted, 0

    def _release(self, total: np.ndarray, r: int, unclipped: int, counted: int) -> tuple[np.ndarray, float]:
        """DP-FedAvg's server side: noise the sum (central), divide it by the expected cohort
        size (a fixed denominator, McMahan et al. 2018), then account the round."""
        private = self.privacy
        if private.central:
            dp.add_gaussian_noise(total, private.value_std, self.seed, stream=noise_stream(r, SERVER_NOISE),
                                  out=total, backend=self.backend)
        delta = (total / private.expected_clients).astype(np.float32)
        epsilon = private.end_round(unclipped, counted, self.seed, noise_stream(r, SERVER_COUNT))
        if private.settings.on_budget == "warn" and private.over(epsilon) and not private.warned:
            private.warned = True
            warnings.warn(f"round {r}: epsilon {epsilon:.4g} (delta {private.settings.delta:g}) passed "
                          f"privacy.max_epsilon = {private.settings.max_epsilon:g}", stacklevel=3)
        return delta, epsilon

    def _budget_stop(self, ahead: int) -> str:
        """Why a privacy budget of ``on_budget="stop"`` refuses the round ``ahead`` rounds from
        now (``""``: it does not)."""
        private = self.privacy
        if private is None or private.settings.on_budget != "stop":
            return ""
        epsilon = private.next_epsilon(ahead)
        if not private.over(epsilon):
            return ""
        return (f"privacy budget: round {self.round + ahead} would take epsilon to {epsilon:.4g} (delta "
                f"{private.settings.delta:g}), past privacy.max_epsilon = {private.settings.max_epsilon:g}")

    def _record(self, r, n_selected, n_sent, straggles, accepted, forged, byzantine, loss, sizes, skipped,
                lost) -> dict:
        """The round's record; ``n_sent`` clients did not drop out, of whom the executor ``lost`` some."""
        trained = accepted & ~forged & np.isfinite(loss)
        arrived = int(n_sent - lost.sum())
        evaluation = self.evaluate() if (r % self.eval_every == 0 or r == self._last_round) else None
        param_bytes = self.params.nbytes
        return {
            "round": r,
            "train_loss": float(np.average(loss[trained], weights=sizes[trained])) if trained.any() else math.nan,
            "test_loss": evaluation.loss if evaluation else math.nan,
            "test_accuracy": evaluation.accuracy if evaluation else math.nan,
            "balanced_accuracy": evaluation.balanced_accuracy if evaluation else math.nan,
            "worst_class_accuracy": evaluation.worst_class_accuracy if evaluation else math.nan,
            "selected": int(n_selected), "arrived": arrived, "dropped": int(n_selected - arrived),
            "lost": int(lost.sum()),
            "stragglers": int(straggles.sum()), "rejected": int((~accepted & ~lost).sum()),
            "byzantine": int(byzantine.sum()), "skipped": bool(skipped),
            "bytes_up": arrived * param_bytes, "bytes_down": int(n_selected * param_bytes),
            "bytes_up_uncompressed": arrived * param_bytes,
        }

    def evaluate(self):
        """The global model's :class:`~fedkern.sim.models.Evaluation` on all test rows."""
        test = self.data.test
        return self.model.evaluate(self.params, test.x, test.y)

    # ------------------------------------------------------------------ many rounds
    def run(self, rounds: int, *, checkpoint_path=None, checkpoint_every: int = 0,
            progress: Callable[[dict], None] | None = None) -> History:
        """Run until ``rounds`` rounds are done (counting rounds already run, e.g. before a resume).

        With ``checkpoint_path``, a checkpoint is written atomically every
        ``checkpoint_every`` rounds and after the last one; ``progress`` is called with
        each round's record. A privacy budget with ``on_budget="stop"`` ends the run before
        the first round that would pass it (that round does not run); the last round run
        is then evaluated and checkpointed, and ``history.stopped`` says why.
        """
        rounds = check.count(rounds, "rounds", low=0)
        checkpoint_every = check.count(checkpoint_every, "checkpoint_every")
        self._last_round = rounds
        while self.round < rounds:
            self.history.stopped = self._budget_stop(1)
            if self.history.stopped:
                break
            if self._budget_stop(2):
                self._last_round = self.round + 1      # the last round that runs: evaluate it
            record = self.step()
            if progress is not None:
                progress(record)
            if checkpoint_path is not None and (
                    self.round == self._last_round or (checkpoint_every and self.round % checkpoint_every == 0)):
                self.save(checkpoint_path)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        """Write the run's state (parameters, optimizer state, round, history, privacy
        ledger, error feedback's residuals) atomically."""
        arrays = {"params": self.params, "previous": self.previous}
        arrays.update({f"optimizer.{name}": value for name, value in self.optimizer.state.items()})
        meta = {"round": self.round, "optimizer_t": self.optimizer.t, "seed": self.seed,
                "n_params": int(self.params.shape[0]), "history": self.history.records,
                "stopped": self.history.stopped}
        if self.privacy is not None:
            private_arrays, private_meta = self.privacy.state()
            arrays.update(private_arrays)
            meta.update(private_meta)
        if self.algorithm.corrects_clients:
            arrays.update(self.algorithm.state())
        if self._buffered is not None:
            buffered_arrays, buffered_meta = self._buffered.state()
            arrays.update({k: v for k, v in buffered_arrays.items() if k != "params"})
            meta["fedbuff"] = {k: v for k, v in buffered_meta.items() if k != "history"}
        if self.compression is not None and self.compression.error_feedback:
            ids = sorted(self.residuals)
            arrays["compression.clients"] = np.array(ids, np.int64)
            arrays["compression.residuals"] = (np.stack([self.residuals[c] for c in ids]) if ids
                                               else np.zeros((0, self.params.shape[0])))
        checkpoint.save(path, arrays, meta)

    def restore(self, path) -> None:
        """Continue from a checkpoint written by :meth:`save` for the same settings."""
        arrays, meta = checkpoint.load(path)
        if meta["seed"] != self.seed or meta["n_params"] != self.params.shape[0]:
            raise FedkernValueError(f"checkpoint {str(path)!r} was written by a run with another seed or model")
        if self.privacy is not None:
            self.privacy.restore(arrays, meta, meta["round"])
        elif "privacy.rdp" in arrays:
            raise FedkernValueError(f"checkpoint {str(path)!r} was written by a run with differential privacy")
        feedback = self.compression is not None and self.compression.error_feedback
        if feedback != ("compression.residuals" in arrays):
            raise FedkernValueError(f"checkpoint {str(path)!r} was written by a run "
                                    f"{'without' if feedback else 'with'} error feedback")
        if feedback:
            self.residuals = dict(zip(arrays["compression.clients"].tolist(), arrays["compression.residuals"]))
        if self.algorithm.corrects_clients != ("scaffold.server" in arrays):
            raise FedkernValueError(f"checkpoint {str(path)!r} was written by a run "
                                    f"{'without' if self.algorithm.corrects_clients else 'with'} SCAFFOLD's variates")
        if self.algorithm.corrects_clients:
            self.algorithm.restore(arrays)
        if ("fedbuff" in meta) != (self.algorithm.asynchronous and meta["round"] > 0):
            raise FedkernValueError(f"checkpoint {str(path)!r} was written by a run "
                                    f"{'with' if 'fedbuff' in meta else 'without'} FedBuff")
        if "fedbuff" in meta:
            self._buffered = BufferedRun(self.algorithm, self._train_buffered, arrays["params"],
                                         n_clients=self._with_data.size, seed=self.seed)
            self._buffered.restore(arrays, {**meta["fedbuff"], "history": []})
        self.params[...] = arrays["params"]
        self.previous = arrays["previous"]
        self.optimizer.state = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer.")}
        self.optimizer.t = meta["optimizer_t"]
        self.round = meta["round"]
        self.history = History(meta["history"], stopped=meta.get("stopped", ""))

    def close(self) -> None:
        """Release the executor's workers."""
        self.executor.close()

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
