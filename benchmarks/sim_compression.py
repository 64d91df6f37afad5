"""The README's compression table: test accuracy against bytes up for every codec, in fedkern.sim.

Two tasks, multinomial logistic regression, FedAvg (server lr 1), no faults:

* Synthetic(1,1) (the FedProx generator, 30 devices), 10 devices per round, 200 rounds
  (the FedProx paper's) of 5 local epochs (its 20 do not fit the time), batch 10, lr 0.01;
* digits (scikit-learn) split IID over 20 clients, 10 per round, 30 rounds of 5 local
  epochs, batch 10, lr 0.1 (the README's learning-quality protocol).

Every codec runs with its standard settings, the same for both tasks; each seed draws its
own data (the Synthetic devices, the digits split) and run, shared by all codecs, so the
difference to uncompressed FedAvg is paired. Prints one markdown table per task: final
test accuracy in % (mean and range over the seeds), its paired difference to uncompressed
FedAvg (mean and sample standard deviation), the bytes the clients sent over the run
(``bytes_up``, mean over the seeds) and how many times fewer than float32 updates.
``--rounds digits=100`` runs a task longer, ``--codecs`` only some rows (the
uncompressed baseline always runs)::

    python benchmarks/sim_compression.py [--seeds 5] [--rounds TASK=N ...] [--codecs LABEL ...]
"""
import argparse
import time

import numpy as np

from fedkern import bench
from fedkern.sim import config

TASKS = {
    "Synthetic(1,1)": {"rounds": 200, "clients_per_round": 10, "local_epochs": 5, "batch_size": 10, "lr": 0.01,
                       "dataset": {"name": "fedprox_synthetic", "alpha": 1.0, "beta": 1.0, "n_clients": 30}},
    "digits": {"rounds": 30, "clients_per_round": 10, "local_epochs": 5, "batch_size": 10, "lr": 0.1,
               "dataset": {"name": "digits"}, "partition": {"name": "iid", "n_clients": 20}},
}
CODECS = {
    "uncompressed (float32)": None,
    "8-bit stochastic, blocks of 256": {"name": "stochastic_quantizer", "bits": 8},
    "2-bit stochastic, blocks of 256": {"name": "stochastic_quantizer", "bits": 2},
    "2-bit stochastic, rotated": {"name": "stochastic_quantizer", "bits": 2, "rotated": True},
    "QSGD, s = 15 (4-bit + sign)": {"name": "qsgd", "levels": 15},
    "TernGrad (clip 2.5 sigma)": {"name": "terngrad"},
    "scaled sign + EF": {"name": "scaled_sign", "error_feedback": True},
    "top-1% + EF": {"name": "top_k", "fraction": 0.01, "error_feedback": True},
    "top-1%, no EF": {"name": "top_k", "fraction": 0.01},
    "random-10%": {"name": "random_k", "fraction": 0.1},
}


def run(task: dict, codec: dict | None, seed: int) -> tuple[float, float, float]:
    """(final test accuracy, total bytes up, total bytes as float32 updates) of one run."""
    settings = {**task, "seed": seed, "eval_every": task["rounds"], "executor": {"name": "threads", "workers": 2},
                "dataset": {**task["dataset"], "seed": seed}}
    if "partition" in task:
        settings["partition"] = {**task["partition"], "seed": seed}
    if codec is not None:
        settings["compression"] = codec
    simulation, resolved = config.build(settings)
    history = simulation.run(resolved["rounds"])
    simulation.close()
    return (history.last("test_accuracy"), history.column("bytes_up").sum(),
            history.column("bytes_up_uncompressed").sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", nargs="*", default=[], metavar="TASK=N",
                        help=f"a task's rounds, e.g. digits=100 (tasks: {', '.join(TASKS)})")
    parser.add_argument("--codecs", nargs="*", choices=list(CODECS), metavar="LABEL",
                        help="the rows to run, by label (default all)")
    args = parser.parse_args()
    rounds = dict(item.split("=", 1) for item in args.rounds)
    if not set(rounds) <= set(TASKS):
        parser.error(f"--rounds: tasks are {', '.join(TASKS)}; got {', '.join(sorted(set(rounds) - set(TASKS)))}")
    codecs = {label: codec for label, codec in CODECS.items()
              if codec is None or args.codecs is None or label in args.codecs}
    start = time.perf_counter()
    for name, task in TASKS.items():
        task = {**task, "rounds": int(rounds.get(name, task["rounds"]))}
        print(f"\n{name}, {task['rounds']} rounds, seeds 0-{args.seeds - 1}\n")
        print("| codec | test accuracy % | vs uncompressed | bytes up | x fewer bytes |")
        print("|---|---|---|---|---|")
        baseline = None
        for label, codec in codecs.items():
            results = np.array([run(task, codec, seed) for seed in range(args.seeds)])
            accuracy = 100 * results[:, 0]
            baseline = accuracy if baseline is None else baseline
            difference = accuracy - baseline
            spread = difference.std(ddof=1) if args.seeds > 1 else 0.0
            print(f"| {label} | {accuracy.mean():.1f} ({accuracy.min():.1f}-{accuracy.max():.1f}) | "
                  f"{difference.mean():+.1f} ± {spread:.1f} | {results[:, 1].mean() / 1e6:.3g} MB | "
                  f"{results[:, 2].sum() / results[:, 1].sum():.1f} |", flush=True)
    print(f"\n{args.seeds} seeds, {time.perf_counter() - start:.0f} s on {bench.cpu_name()}")


if __name__ == "__main__":
    main()
