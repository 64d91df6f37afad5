"""NIID-Bench's own protocol on one label per client: FedAvg, FedProx and FedNova.

NIID-Bench (Li, Diao, Chen and He, ICDE 2022) trains 10 parties, all of them every
round, for 50 rounds of 10 local epochs (batch 64, SGD with lr 0.01 and momentum 0.9),
and reports that with one label per party FedProx and FedNova beat FedAvg. This script
runs that protocol in fedkern.sim on offline data, with the model closest to its CNN
that fedkern.sim has, a ReLU MLP with one hidden layer of 200; each seed draws its own
split and run, shared by the algorithms. Prints final test accuracy in %, mean (range)
(about 70 s a run on MNIST-5k on a 2-core VM)::

    python benchmarks/sim_niid_protocol.py [--seeds 5] [--datasets mnist5k]
"""
from sim_niid import ALGORITHMS, accuracy_cell, print_tables

PROTOCOL = {"rounds": 50, "clients_per_round": 10, "local_epochs": 10, "batch_size": 64, "lr": 0.01,
            "momentum": 0.9, "model": {"name": "mlp", "hidden": [200]}}
ONE_LABEL = {"name": "label_quantity", "n_clients": 10, "labels_per_client": 1}
ROWS = {name: ALGORITHMS[name] for name in ("FedAvg", "FedProx (mu = 0.01)", "FedNova")}


def main() -> None:
    columns = {"1 label per client, NIID-Bench's protocol, MLP 200": (ONE_LABEL, PROTOCOL)}
    print_tables(__doc__.splitlines()[0], "algorithm", ROWS, columns, accuracy_cell, "")


if __name__ == "__main__":
    main()
