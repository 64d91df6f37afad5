"""The README's privacy table: DP-FedAvg's test accuracy against epsilon, in fedkern.sim.

Synthetic-IID (the FedProx generator, 1000 devices), central DP-FedAvg with Poisson
sampling at q = 0.05 (50 clients expected per round), 60 rounds of 2 local epochs,
multinomial logistic regression, server momentum 0.9 (McMahan et al. 2018 use server
momentum too). For each epsilon at delta = 1e-5 the noise multiplier is calibrated so that
the 60th round reaches it (inf: no noise, clipping only). Clipping is fixed at C or
adaptive (Andrew et al. 2021; the default quantile 0.5, learning rate 0.2 and count noise
m / 20, starting from C). Prints a markdown table of the final test accuracy, mean and
range over the seeds (each seed draws its own data and run)::

    python benchmarks/sim_privacy.py [--seeds 3]
"""
import argparse
import time

import numpy as np

from fedkern import bench
from fedkern.sim import config

BASE = {"rounds": 60, "clients_per_round": 50, "local_epochs": 2, "batch_size": 10, "lr": 0.05, "eval_every": 60,
        "dataset": {"name": "fedprox_synthetic", "alpha": 0.0, "beta": 0.0, "iid": True, "n_clients": 1000},
        "server_optimizer": {"name": "fedavgm", "lr": 1.0, "momentum": 0.9},
        "executor": {"name": "threads", "workers": 2}}
DELTA = 1e-5
EPSILONS = (1.0, 2.0, 8.0, None)        # None: no noise (epsilon = inf)
CLIPPING = {
    "fixed C = 0.3": {"clip": 0.3},
    "fixed C = 1": {"clip": 1.0},
    "adaptive from C = 1": {"clip": 1.0, "adaptive": True},
}


def accuracy(clipping: dict, epsilon: float | None, seed: int) -> float:
    noise = {"target_epsilon": epsilon} if epsilon is not None else {"noise_multiplier": 0.0}
    settings = {**BASE, "seed": seed, "dataset": {**BASE["dataset"], "seed": seed},
                "privacy": {"name": "central", "delta": DELTA, **clipping, **noise}}
    simulation, resolved = config.build(settings)
    simulation.run(resolved["rounds"])
    return simulation.history.last("test_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    labels = [f"epsilon = {eps:g}" if eps is not None else "epsilon = inf" for eps in EPSILONS]
    print(f"| clipping | {' | '.join(labels)} |")
    print("|---|" + "---|" * len(EPSILONS))
    for label, clipping in CLIPPING.items():
        cells = []
        for epsilon in EPSILONS:
            values = 100 * np.array([accuracy(clipping, epsilon, seed) for seed in range(args.seeds)])
            cells.append(f"{values.mean():.1f} ({values.min():.0f}-{values.max():.0f})")
        print(f"| {label} | {' | '.join(cells)} |", flush=True)
    print(f"\ndelta = {DELTA:g}, {args.seeds} seeds, {time.perf_counter() - start:.0f} s on {bench.cpu_name()}")


if __name__ == "__main__":
    main()
