"""What an executor adds to a round: Ray (and process) rounds against serial ones, on
training that does nothing, so that the difference is the executor's own cost.

100 clients a round of a model with D parameters whose ``train`` only zeroes its delta;
every round trains 16 chunks. The executors are measured one after the other, each alone
(an idle executor's actors and processes would load the cores the measured one uses):
every repetition runs one serial round, then one round of the executor (interleaved, so
that load from elsewhere falls on both alike); the table gives the median over the
repetitions of (executor round - serial round), and the run checks that every executor
ends with the serial bits. ``ray.init`` is timed on its own, with as many logical CPUs as
the largest executor has actors::

    python benchmarks/sim_executor_overhead.py [--workers 1 2 4 8] [--features 1000] [--rounds 40]
"""
import argparse
import os
import time

import numpy as np

from fedkern import sim
from fedkern.sim.models import Evaluation, TrainResult


class Idle:
    """A model whose training does nothing (its delta is zero)."""

    n_classes = 2

    def __init__(self, n_params: int):
        self.n_params = n_params

    def init(self, rng):
        return np.zeros(self.n_params, np.float32)

    def train(self, params, x, y, config, rng, delta_out):
        delta_out[:] = 0.0
        return TrainResult(loss=0.0, steps=1)

    def loss(self, params, x, y):
        return 0.0

    def evaluate(self, params, x, y):
        return Evaluation(loss=0.0, accuracy=0.0, recall=np.zeros(2), n=len(y))


def federation(n_clients: int = 200) -> sim.FederatedDataset:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(n_clients), rng.integers(3, 20, n_clients))
    x = rng.standard_normal((ids.size, 4)).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    train = sim.FederatedData.from_client_ids(x, y, ids, n_clients=n_clients, n_classes=2)
    return sim.FederatedDataset(train, sim.FederatedData(x[:20], y[:20], np.array([0, 20]), n_classes=2), "idle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - start:.1f} s", flush=True)
    data = federation()
    cpus = os.cpu_count()

    def make(executor):
        return sim.Simulation(data, Idle(args.features), clients_per_round=100, executor=executor, eval_every=10**6)

    executors = {f"ray, {w} actors": lambda w=w: sim.RayExecutor(workers=w) for w in args.workers}
    executors[f"processes({cpus})"] = lambda: sim.ProcessExecutor(workers=cpus)
    print(f"\nD = {args.features}, 100 clients a round in 16 chunks, median of {args.rounds} rounds\n")
    print("| executor | round minus serial round (median) | spread (25-75%) |")
    print("|---|---|---|")
    for name, executor in executors.items():
        serial, run, extra = make(None), make(executor()), []
        for r in range(args.rounds + 3):
            begin = time.perf_counter()
            serial.step()
            base = time.perf_counter() - begin
            begin = time.perf_counter()
            run.step()
            if r >= 3:                     # the first rounds warm the workers up
                extra.append(time.perf_counter() - begin - base)
        assert run.params.tobytes() == serial.params.tobytes(), name
        run.executor.close()
        low, mid, high = 1e3 * np.percentile(extra, [25, 50, 75])
        print(f"| {name} | {mid:.1f} ms | {low:.1f}-{high:.1f} ms |", flush=True)

if __name__ == "__main__":
    main()
