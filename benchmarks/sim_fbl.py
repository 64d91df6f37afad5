"""The README's FBL table: Federated Balanced Learning against FedAvg, FedProx and SCAFFOLD,
and each FBL part alone, on IID and long-tailed label-skewed splits of offline data.

The long-tailed splits first keep n_c = n_max ratio^(-c / 9) training rows of class c
(``imbalance_ratio`` 10 or 100; the test set stays balanced), then give them to 20
clients by Dirichlet(0.1) label skew (``min_size`` 2, so the 100-fold tail of digits,
332 rows, can be split). The protocol is sim_niid.py's (multinomial logistic
regression, 10 of 20 clients per round, 30 rounds of 5 local epochs, batch 10, lr 0.1),
seeds 0 .. n - 1, each drawing its own split and run, shared by the methods. Prints one
markdown table per dataset: balanced accuracy (mean per-class recall on the test set)
mean (range), then worst-class accuracy and top-1 accuracy, means, all in %::

    python benchmarks/sim_fbl.py [--seeds 5] [--datasets digits mnist5k]
"""
import numpy as np

from sim_niid import final_record, print_tables

PARTITIONS = {
    "IID": {"name": "iid", "n_clients": 20},
    "Dirichlet(0.1), ratio 10": {"name": "dirichlet", "alpha": 0.1, "n_clients": 20, "min_size": 2,
                                 "imbalance_ratio": 10},
    "Dirichlet(0.1), ratio 100": {"name": "dirichlet", "alpha": 0.1, "n_clients": 20, "min_size": 2,
                                  "imbalance_ratio": 100},
}
METHODS = {
    "FedAvg": {"name": "fedavg"},
    "FedProx (mu = 0.01)": {"name": "fedprox", "mu": 0.01},
    "SCAFFOLD": {"name": "scaffold"},
    "FBL": {"name": "fbl"},
    "FBL: balanced loss only": {"name": "fbl", "balanced_weights": False, "balanced_sampling": False},
    "FBL: balanced weights only": {"name": "fbl", "balanced_loss": False, "balanced_sampling": False},
    "FBL: balanced sampling only": {"name": "fbl", "balanced_loss": False, "balanced_weights": False},
}
METRICS = ("balanced_accuracy", "worst_class_accuracy", "test_accuracy")


def cell(dataset: str, method: dict, partition: dict, seeds: range) -> str:
    records = [final_record(dataset, partition, method, seed) for seed in seeds]
    balanced, worst, top1 = (100 * np.array([r[m] for r in records]) for m in METRICS)
    return f"{balanced.mean():.1f} ({balanced.min():.1f}-{balanced.max():.1f}) / {worst.mean():.1f} / {top1.mean():.1f}"


def main() -> None:
    print_tables(__doc__.splitlines()[0], "method", METHODS, PARTITIONS, cell,
                 ": balanced (range) / worst-class / top-1 accuracy, %")


if __name__ == "__main__":
    main()
