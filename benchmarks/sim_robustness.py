"""The README's robustness table: every aggregation rule against every attack, in fedkern.sim.

Digits (scikit-learn) split IID over 20 clients, all 20 train every round, 4 of them (20%)
Byzantine; multinomial logistic regression, 20 rounds of 2 local epochs. Prints a
markdown table of the final test accuracy, mean and range over the seeds::

    python benchmarks/sim_robustness.py [--seeds 3]
"""
import argparse
import time

import numpy as np

from fedkern import bench
from fedkern.sim import config

BASE = {"rounds": 20, "clients_per_round": 20, "local_epochs": 2, "batch_size": 10, "lr": 0.1, "eval_every": 20,
        "dataset": {"name": "digits"}, "partition": {"name": "iid", "n_clients": 20}}
F = 4
RULES = {
    "mean": {"name": "mean"},
    "median": {"name": "median"},
    "trimmed_mean(beta=0.2)": {"name": "trimmed_mean", "beta": 0.2},
    "meamed(f=4)": {"name": "meamed", "f": F},
    "krum(f=4)": {"name": "krum", "f": F},
    "multi-krum(f=4, m=10)": {"name": "krum", "f": F, "m": 10},
    "bulyan(f=4)": {"name": "bulyan", "f": F},
    "geometric_median": {"name": "geometric_median"},
}
ATTACKS = {
    "none": None,
    "sign_flip": {"name": "sign_flip"},
    "ipm(tau=0.1)": {"name": "ipm", "tau": 0.1},
    "ipm(tau=10)": {"name": "ipm", "tau": 10.0},
    "alie": {"name": "alie"},
    "gaussian(std=3)": {"name": "gaussian", "std": 3.0},
    "label_flip": {"name": "label_flip"},
}


def accuracy(rule: dict, attack: dict | None, seed: int) -> float:
    settings = {**BASE, "seed": seed, "aggregator": rule,
                "partition": {**BASE["partition"], "seed": seed}}
    if attack is not None:
        settings["attack"] = {**attack, "fraction": F / 20}
    simulation, resolved = config.build(settings)
    simulation.run(resolved["rounds"])
    return simulation.history.last("test_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"| rule | {' | '.join(ATTACKS)} |")
    print("|---|" + "---|" * len(ATTACKS))
    for label, rule in RULES.items():
        cells = []
        for attack in ATTACKS.values():
            values = 100 * np.array([accuracy(rule, attack, seed) for seed in range(args.seeds)])
            cells.append(f"{values.mean():.1f} ({values.min():.0f}-{values.max():.0f})")
        print(f"| {label} | {' | '.join(cells)} |", flush=True)
    print(f"\n{args.seeds} seeds, {time.perf_counter() - start:.0f} s on {bench.cpu_name()}")


if __name__ == "__main__":
    main()
