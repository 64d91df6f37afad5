"""Issue 15's cross-device comparison: fedkern.sim on Ray against Flower's Ray simulation.

The workload: the FedProx generator's Synthetic(1,1) with 1000 devices, 100 a round,
1 local epoch (batch 10, lr 0.01), logistic regression trained by fedkern's compiled
kernel in both, so only the engines differ. Flower runs ``run_simulation`` with
``num_supernodes=1000`` and one CPU per client app (``workers`` of them at once); its
FedAvg samples 10% of the nodes a round. fedkern runs :class:`~fedkern.sim.RayExecutor`
with ``workers`` actors. Both times exclude start-up: Flower's from the ServerApp's first
round to its last, fedkern's per-round median after ``ray.init``. fedkern then runs
``--long`` more rounds and prints the resident memory (parent and actors) as it goes::

    python benchmarks/sim_flower_ray.py [--workers 2] [--rounds 10] [--long 500]
"""
import argparse
import os
import time

import numpy as np

from fedkern import datasets, sim

SETTINGS = dict(epochs=1, batch_size=10, lr=0.01)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flower_seconds_per_round(data, workers: int, rounds: int) -> float:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
    client_app, server_app = ClientApp(), ServerApp()
    elapsed = []

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        client = context.node_config["partition-id"]
        x, y = data.train.client(client)
        params = message.content["arrays"].to_numpy_ndarrays()[0]
        delta = np.empty_like(params)
        model.train(params, x, y, sim.LocalTraining(**SETTINGS), np.random.default_rng(client), delta)
        reply = RecordDict({"arrays": ArrayRecord([params + delta]), "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(reply, reply_to=message)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord([np.zeros(model.n_params, np.float32)])
        strategy = FedAvg(fraction_train=0.1, fraction_evaluate=0.0)
        start = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
        elapsed.append(time.perf_counter() - start)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=data.train.n_clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": workers}})
    return elapsed[0] / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--long", type=int, default=500)
    args = parser.parse_args()
    data = datasets.fedprox_synthetic(1.0, 1.0, n_clients=1000, seed=0)
    flower = flower_seconds_per_round(data, args.workers, args.rounds)
    print(f"Flower run_simulation, {args.workers} workers: {1e3 * flower:.0f} ms/round "
          f"(mean of {args.rounds} rounds)", flush=True)

    import ray
    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - start:.1f} s")
    model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
    with sim.RayExecutor(workers=args.workers) as executor:
        run = sim.Simulation(data, model, clients_per_round=100, local=sim.LocalTraining(**SETTINGS),
                             executor=executor, eval_every=10**6)
        times = []
        for _ in range(args.rounds):
            begin = time.perf_counter()
            run.step()
            times.append(time.perf_counter() - begin)
        fedkern = float(np.median(times))
        print(f"fedkern RayExecutor, {args.workers} actors: {1e3 * fedkern:.1f} ms/round "
              f"(median of {args.rounds}); Flower / fedkern: {flower / fedkern:.1f}x", flush=True)
        actors = [pid for pid, _ in ray.get([actor.where.remote() for actor in executor._actors])]
        for r in range(args.rounds, args.long):
            run.step()
            if (r + 1) in (50, 100, 200, args.long):
                print(f"round {r + 1}: RSS parent {rss_mib(os.getpid()):.0f} MiB, actors "
                      + ", ".join(f"{rss_mib(pid):.0f}" for pid in actors) + " MiB", flush=True)


if __name__ == "__main__":
    main()
