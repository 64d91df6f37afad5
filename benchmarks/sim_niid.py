"""The README's NIID-Bench table: FedAvg, FedProx, FedNova and SCAFFOLD on IID and label-skewed splits.

NIID-Bench (Li, Diao, Chen and He, ICDE 2022) found that with one label per client
(#C = 1) FedAvg suffers most and the methods built for heterogeneity (FedProx, FedNova,
SCAFFOLD) can do better, while on IID data they all agree. This script measures the
same comparison in fedkern.sim on offline data: multinomial logistic regression, 20
clients, 10 per round, 30 rounds of 5 local epochs, batch 10, lr 0.1 (the README's
learning-quality protocol), for each partition and algorithm over seeds 0 .. n - 1 (each
seed draws its own split and run, shared by the algorithms, so differences are paired).
The last three columns add unequal local work, which FedNova's normalisation is built
for: half the selected clients are stragglers that run 1-4 of their 5 epochs; or the
classes are of unequal sizes (``imbalance_ratio``: the largest class holds 1.24 times the
rows of the smallest, as in the MNIST that NIID-Bench split, or 2 times), so that a client
of a larger class takes more local steps.
Prints one markdown table per dataset: final test accuracy in %, mean (range)::

    python benchmarks/sim_niid.py [--seeds 5] [--datasets digits mnist5k]
"""
import argparse
import time

import numpy as np

from fedkern.sim import config

PROTOCOL = {"rounds": 30, "clients_per_round": 10, "local_epochs": 5, "batch_size": 10, "lr": 0.1}
ONE_LABEL = {"name": "label_quantity", "n_clients": 20, "labels_per_client": 1}
#: column: (partition, settings added to the protocol)
SETTINGS = {
    "IID": ({"name": "iid", "n_clients": 20}, {}),
    "2 labels per client": ({"name": "label_quantity", "n_clients": 20, "labels_per_client": 2}, {}),
    "1 label per client": (ONE_LABEL, {}),
    # unequal local work: each selected client is a straggler with probability 1/2 and then
    # runs 1-4 of its 5 epochs (FedNova's setting of heterogeneous local steps)
    "1 label, half stragglers": (ONE_LABEL, {"stragglers": {"fraction": 0.5, "mode": "partial"}}),
    # unequal clients: class sizes spread as MNIST's are (6742 / 5421 = 1.24), and twice
    # that, so each one-label client's local steps follow its class's size
    "1 label, classes 1.24:1": ({**ONE_LABEL, "imbalance_ratio": 1.24}, {}),
    "1 label, classes 2:1": ({**ONE_LABEL, "imbalance_ratio": 2.0}, {}),
}
ALGORITHMS = {
    "FedAvg": {"name": "fedavg"},
    "FedProx (mu = 0.01)": {"name": "fedprox", "mu": 0.01},
    "FedNova": {"name": "fednova"},
    "SCAFFOLD": {"name": "scaffold"},
}


def final_record(dataset: str, partition: dict, algorithm: dict, seed: int, **extra) -> dict:
    """The last round's history record of one run of the protocol and ``extra`` settings
    (shared by sim_fbl.py)."""
    settings = {**PROTOCOL, **extra, "seed": seed, "eval_every": PROTOCOL["rounds"], "dataset": {"name": dataset},
                "partition": {**partition, "seed": seed}, "algorithm": algorithm}
    simulation, resolved = config.build(settings)
    history = simulation.run(resolved["rounds"])
    simulation.close()
    return history.records[-1]


def accuracy(dataset: str, partition: dict, algorithm: dict, seed: int, **extra) -> float:
    return 100 * final_record(dataset, partition, algorithm, seed, **extra)["test_accuracy"]


def print_tables(description: str, heading: str, rows: dict, columns: dict, cell, what: str) -> None:
    """Parse ``--seeds`` and ``--datasets``, then print one markdown table per dataset:
    a row per entry of ``rows``, a column per entry of ``columns``, each cell
    ``cell(dataset, row, column, seeds)`` (shared by sim_fbl.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    args = parser.parse_args()
    start = time.perf_counter()
    for dataset in args.datasets:
        print(f"\n{dataset}, seeds 0-{args.seeds - 1}{what}\n")
        print(f"| {heading} | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for label, row in rows.items():
            cells = [cell(dataset, row, column, range(args.seeds)) for column in columns.values()]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


def accuracy_cell(dataset: str, algorithm: dict, setting: tuple[dict, dict], seeds: range) -> str:
    partition, extra = setting
    results = np.array([accuracy(dataset, partition, algorithm, seed, **extra) for seed in seeds])
    return f"{results.mean():.1f} ({results.min():.1f}-{results.max():.1f})"


def main() -> None:
    print_tables(__doc__.splitlines()[0], "algorithm", ALGORITHMS, SETTINGS, accuracy_cell, "")


if __name__ == "__main__":
    main()
