"""Issue 15's cross-device comparison: fedkern.sim on Ray against Flower's Ray simulation.

The workload: the FedProx generator's Synthetic(1,1) with 1000 devices, 100 a round,
1 local epoch (batch 10, lr 0.01), multinomial logistic regression trained by fedkern's
compiled kernel in both engines, from the same initial model, so only the engines
differ. Flower 1.42 runs ``run_simulation`` with 1000 supernodes, one CPU per ClientApp
and ``workers`` CPUs in all (so ``workers`` actors), its FedAvg sampling 10% of the
nodes a round (its ClientApp is in ``_flower_client.py``). fedkern runs
:class:`~fedkern.sim.RayExecutor` with ``workers`` actors on a Ray of ``workers`` CPUs.
Each engine starts a Ray of its own (``address="local"``), whatever else runs here.

Start-up is reported apart: Flower starts its ServerApp first, so Ray, its actor pool
and the actors' first load of the data all fall in its first round; fedkern's
``ray.init`` and its actors (building the simulation until every actor answers) are
timed before its first round. A round's time is, for Flower, the time between the
strategy's calls of ``evaluate_fn`` (made before the first round and after each), for
fedkern the time of ``Simulation.step``; each engine's figure is the median over its
rounds. fedkern then runs to ``--long`` rounds in all. The resident memory of the
driver and of each actor is printed for both, as RSS with its anonymous part (heap and
private pages) in brackets::

    python benchmarks/sim_flower_ray.py [--workers 2] [--rounds 20] [--long 500]
"""
import argparse
import logging
import os
import time

import numpy as np

from fedkern import sim

import _flower_client as flower

#: rounds after which the memory is read (and after the last)
RSS_ROUNDS = (1, 10, 50, 100, 200, 500, 1000, 2000)
COHORT = 100


def initial_params(data: sim.FederatedDataset) -> np.ndarray:
    """The initial model of a fedkern run with seed 0, given to Flower too."""
    return sim.Simulation(data, flower.model(), clients_per_round=COHORT, local=flower.LOCAL).params.copy()


def accuracy(params: np.ndarray, data: sim.FederatedDataset) -> float:
    """Test accuracy of ``params`` on every device's test rows."""
    return flower.model().evaluate(params, data.test.x, data.test.y).accuracy


def run_flower(workers: int, rounds: int, initial: np.ndarray) -> dict:
    """Flower's simulation: each round's seconds, train losses, memory rows and the final model."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    server_app, marks, driver, out = ServerApp(), [], [], {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())
        driver.append(flower.memory_mib(os.getpid()))

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=COHORT / flower.DEVICES, fraction_evaluate=0.0,
                          train_metrics_aggr_fn=flower.round_metrics)
        out["result"] = strategy.start(grid=grid, initial_arrays=ArrayRecord([initial]), num_rounds=rounds,
                                       evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=flower.app, num_supernodes=flower.DEVICES,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"address": "local", "num_cpus": workers}})
    result = out["result"]
    metrics = {r: result.train_metrics_clientapp[r] for r in range(1, rounds + 1)}
    pids = sorted({int(key[4:]) for m in metrics.values() for key in m if key.startswith("rss-")})
    rows = [memory_row(r, driver[r], [(metrics[r].get(f"rss-{p}", np.nan), metrics[r].get(f"anon-{p}", np.nan))
                                      for p in pids]) for r in metrics if r in RSS_ROUNDS or r == rounds]
    return {"seconds": np.diff(marks), "loss": [m["train-loss"] for m in metrics.values()], "rss": rows,
            "params": result.arrays.to_numpy_ndarrays()[0]}


def memory_row(r: int, driver: tuple[float, float], actors: list[tuple[float, float]]) -> str:
    """One row of a memory table: the round, then the driver's and each actor's RSS (anonymous part)."""
    return f"| {r} | " + " | ".join(f"{rss:.0f} ({anon:.0f})" for rss, anon in [driver, *actors]) + " |"


def actor_pids(ray, executor: sim.RayExecutor) -> list[int]:
    """Process ids of the executor's actors (waits until each answers)."""
    return [pid for pid, _ in ray.get([actor.where.remote() for actor in executor._actors])]


def run_fedkern(data: sim.FederatedDataset, workers: int, rounds: int, long: int) -> dict:
    """fedkern on Ray: ray.init and actor start-up seconds, the first ``rounds`` rounds'
    seconds, train losses and final model, and memory rows up to round ``long``."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
    begin = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    out = {"ray_init": time.perf_counter() - begin}
    try:
        with sim.RayExecutor(workers=workers) as executor:
            begin = time.perf_counter()
            run = sim.Simulation(data, flower.model(), clients_per_round=COHORT, local=flower.LOCAL,
                                 executor=executor, eval_every=10**6)
            pids = actor_pids(ray, executor)
            out["startup"], out["seconds"], out["rss"] = time.perf_counter() - begin, [], []
            for r in range(1, long + 1):
                record = run.step()
                if r <= rounds:
                    out["seconds"].append(record["seconds"])
                if r == rounds:
                    out["params"] = run.params.copy()
                if r in RSS_ROUNDS or r == long:
                    out["rss"].append(memory_row(r, flower.memory_mib(os.getpid()),
                                                 [flower.memory_mib(p) for p in pids]))
            out["loss"] = run.history.column("train_loss")[:rounds].tolist()
    finally:
        ray.shutdown()
    return out


def memory_table(title: str, rows: list[str], workers: int) -> None:
    """Print a memory table in markdown."""
    print(f"\n{title}, MiB: RSS (anonymous part)\n")
    print("| round | driver | " + " | ".join(f"actor {i + 1}" for i in range(workers)) + " |")
    print("|---|---|" + "---|" * workers)
    print("\n".join(rows))


def report(args, data, fl: dict, fk: dict) -> None:
    """Print the comparison and the memory tables in markdown."""
    f, k = float(np.median(fl["seconds"])), float(np.median(fk["seconds"]))
    print(f"\n{args.workers} workers, {args.rounds} rounds each; fedkern's start-up: ray.init {fk['ray_init']:.1f} s, "
          f"actors {fk['startup']:.1f} s (Flower's is in its first round)\n")
    print("| engine | median round | first round | fastest | slowest | train loss, mean of the rounds | "
          f"round {args.rounds} | test accuracy after {args.rounds} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in (("Flower run_simulation", fl), ("fedkern RayExecutor", fk)):
        s = np.asarray(res["seconds"]) * 1e3
        print(f"| {name} | {np.median(s):.1f} ms | {s[0]:.1f} ms | {s.min():.1f} ms | {s.max():.1f} ms | "
              f"{np.mean(res['loss']):.3f} | {res['loss'][-1]:.3f} | {accuracy(res['params'], data):.3f} |")
    print(f"\nFlower / fedkern, median round: {f / k:.1f}x")
    memory_table(f"Flower, {args.rounds} rounds", fl["rss"], args.workers)
    memory_table(f"fedkern, {max(args.long, args.rounds)} rounds", fk["rss"], args.workers)


def load_text(load: tuple[float, float, float]) -> str:
    """A load average as text."""
    return ", ".join(f"{v:.2f}" for v in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of each engine")
    parser.add_argument("--long", type=int, default=500, help="fedkern's rounds in all, for the RSS table")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    data = flower.federation()
    load = os.getloadavg()
    fl = run_flower(args.workers, args.rounds, initial_params(data))
    fk = run_fedkern(data, args.workers, args.rounds, max(args.long, args.rounds))
    report(args, data, fl, fk)
    print(f"\nload average (1, 5, 15 min): {load_text(load)} before, {load_text(os.getloadavg())} after")


if __name__ == "__main__":
    main()
