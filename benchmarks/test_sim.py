"""pytest-benchmark: rounds of the simulator's workloads, per model backend and executor.

``fedkern bench --sim`` runs the whole workloads (all rounds, first-round latency, memory);
here one group per workload times its rounds, from the same builders
(:mod:`fedkern.bench.sim`). Sizes follow ``FEDKERN_BENCH_PROFILE``: ``quick`` (default,
what CI runs with ``--benchmark-disable``): FedProx's Synthetic(1,1) with 2 local epochs,
20 cross-device clients with 5 a round, 3 rounds each; any other profile: the issue's
sizes (20 local epochs; 1000 clients, 100 a round), rounds calibrated by pytest-benchmark.
"""
import os

import pytest

from fedkern.bench import SimSizes
from fedkern.bench import sim as simbench
from fedkern.sim import SerialExecutor, ThreadExecutor

PROFILE = os.environ.get("FEDKERN_BENCH_PROFILE", "quick")
QUICK = PROFILE == "quick"
SIZES = SimSizes(fedprox_epochs=2, device_clients=20, device_per_round=5) if QUICK else SimSizes()
#: Rounds per benchmark in the quick profile (None: pytest-benchmark decides).
ROUNDS = 3 if QUICK else None
#: (model backend, executor) of each candidate: every compiled model backend on both executors, the reference.
CANDIDATES = [pytest.param(backend, executor, id=f"{backend}-{executor}")
              for backend in simbench.compiled_backends() for executor in ("serial", "threads")]
CANDIDATES.append(pytest.param("reference", "serial", id="reference-serial"))


@pytest.fixture(scope="module")
def fedprox_data():
    return simbench.fedprox_data(SIZES)


@pytest.fixture(scope="module")
def device_data():
    return simbench.device_data(SIZES)


@pytest.fixture
def executor(request):
    """The candidate's executor (``request.param`` names it), closed after the test."""
    executor = ThreadExecutor(SIZES.workers) if request.param == "threads" else SerialExecutor()
    yield executor
    executor.close()


def run_rounds(benchmark, group, simulation):
    """Benchmark ``simulation.step`` after one round that compiles the kernels (or loads their cache)."""
    benchmark.group = group
    simulation.step()
    if ROUNDS:
        benchmark.pedantic(simulation.step, rounds=ROUNDS, iterations=1)
    else:
        benchmark(simulation.step)


@pytest.mark.parametrize("model_backend, executor", CANDIDATES, indirect=["executor"])
def test_fedprox_round(benchmark, fedprox_data, model_backend, executor):
    """FedProx's protocol: 10 of 30 devices, 20 epochs (quick: 2), test accuracy every round."""
    simulation = simbench.simulation(fedprox_data, SIZES.fedprox_per_round, SIZES.fedprox_epochs,
                                     backend=model_backend, executor=executor)
    run_rounds(benchmark, "fedprox round", simulation)


@pytest.mark.parametrize("model_backend, executor", CANDIDATES, indirect=["executor"])
def test_cross_device_round(benchmark, device_data, model_backend, executor):
    """Cross-device: 100 of 1000 clients (quick: 5 of 20), 1 epoch, no evaluation."""
    simulation = simbench.simulation(device_data, SIZES.device_per_round, 1, backend=model_backend, executor=executor,
                                     eval_every=simbench.NEVER)
    run_rounds(benchmark, "cross-device round", simulation)


@pytest.mark.parametrize("executor", ["serial", "threads"], indirect=True)
def test_no_op_round(benchmark, device_data, executor):
    """The cross-device round with clients that send zeros: the engine's own cost."""
    simulation = simbench.simulation(device_data, SIZES.device_per_round, 1, executor=executor,
                                     client_update=simbench.no_op_update, eval_every=simbench.NEVER)
    run_rounds(benchmark, "no-op round", simulation)
