"""fedkern.sim: the federated learning loop on fedkern kernels (DESIGN.md section 6).

Pieces, each usable alone inside another simulator:

- :mod:`~fedkern.sim.data`: :class:`FederatedData` (one buffer, clients are slices);
  generators and loaders live in :mod:`fedkern.datasets`
- :mod:`~fedkern.sim.partition`: IID, Dirichlet label skew, shards, labels per client, quantity skew,
  long-tailed federations
- :mod:`~fedkern.sim.models`: logistic regression and an MLP trained by compiled kernels (Cython or Numba)
- :mod:`~fedkern.sim.sampling`: client samplers
- :mod:`~fedkern.sim.algorithms`: FedAvg, FedProx, FedNova, q-FFL, SCAFFOLD, Federated Balanced Learning
  (FBL) and FedBuff (asynchronous: a round is one server update of its
  :class:`~fedkern.sim.algorithms.BufferedRun`), all run by :class:`Simulation`
- :mod:`~fedkern.sim.rounds`: :class:`Simulation`, the round's stages and their settings
- :mod:`~fedkern.sim.privacy`: :class:`DifferentialPrivacy` (DP-FedAvg) and a run's privacy ledger
- :mod:`~fedkern.sim.secure`: :class:`SecureAggregation` (masked sums, Bonawitz et al. / SecAgg+)
- :mod:`~fedkern.sim.compression`: :class:`Compression` (compressed uploads, summed fused, error feedback)
- :mod:`~fedkern.sim.executors`: serial, thread, process and Ray executors (the same bits)
- :mod:`~fedkern.sim.checkpoint`, :mod:`~fedkern.sim.history`, :mod:`~fedkern.sim.config`
"""
from .compression import Compression
from .data import FederatedData, FederatedDataset
from .executors import ProcessExecutor, RayExecutor, SerialExecutor, ThreadExecutor
from .history import History
from .models import MLP, Evaluation, LocalTraining, LogisticRegression, Model, TrainResult
from .privacy import DifferentialPrivacy
from .secure import SecureAggregation
from .rounds import Aggregator, Attack, Dropout, Simulation, Stragglers

__all__ = ["Aggregator", "Attack", "Compression", "DifferentialPrivacy", "SecureAggregation", "Dropout", "Evaluation", "FederatedData",
           "FederatedDataset", "History", "LocalTraining", "LogisticRegression", "MLP", "Model", "ProcessExecutor", "RayExecutor", "SerialExecutor",
           "Simulation", "Stragglers", "ThreadExecutor", "TrainResult"]
