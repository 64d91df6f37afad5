"""The README's certified-Krum figures: ``method="auto"`` (the exact choice at Gram speed)
against ``"exact"`` and ``"gram"``, and the Flower drop-in's ``aggregate_krum`` against
Flower's own, at K = 100 x D = 1e6 float32.

Candidates are timed interleaved, one call each per round, and each prints its median,
min-max over the rounds and how many exact rows the certified path computed; every auto
choice is checked against the exact one. Flower's helper takes about 10 s a call, so the
Flower rows are optional (``--no-flower``)::

    python benchmarks/krum_certified.py [--rounds 5] [--no-flower] [--d 1000000]
"""
import argparse
import platform
import time

import numpy as np

import fedkern
from fedkern import robust
from fedkern.bench.cases import size_label
from fedkern.bench.flwr import flwr_results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def recording():
    """Record every robust._Certified built from now on (each counts its exact rows)."""
    built = []
    original = robust._Certified.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    robust._Certified.__init__ = init
    return built


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--d", type=int, default=1_000_000, help="coordinates (a smaller D for a quick try)")
    args = parser.parse_args()
    k, d, f = 100, args.d, 12
    rng = np.random.default_rng(0)
    x = (0.5 + 0.01 * rng.standard_normal((k, d))).astype(np.float32)
    results = flwr_results(k, d)
    from fedkern.compat import flwr as fk

    candidates = {
        "fedkern.krum auto": lambda: fedkern.krum(x, f, return_indices=True)[1],
        "fedkern.krum exact": lambda: fedkern.krum(x, f, method="exact", return_indices=True)[1],
        "fedkern.krum gram": lambda: fedkern.krum(x, f, method="gram", return_indices=True)[1],
        "fedkern.krum auto, m=10": lambda: fedkern.krum(x, f, 10, return_indices=True)[1],
        "fedkern.bulyan auto": lambda: fedkern.bulyan(x, f, return_indices=True)[1],
        "fedkern.bulyan exact": lambda: fedkern.bulyan(x, f, method="exact", return_indices=True)[1],
        "compat.flwr.aggregate_krum (13 layers)": lambda: fk.aggregate_krum(results, f, 0),
    }
    if not args.no_flower:
        import flwr
        import flwr.server.strategy.aggregate as flower

        candidates[f"flwr {flwr.__version__} aggregate_krum (13 layers)"] = lambda: flower.aggregate_krum(results, f, 0)
    certified = recording()
    times = {name: [] for name in candidates}
    rows = {name: [] for name in candidates}
    chosen = {}
    for _ in range(args.rounds):
        for name, call in candidates.items():
            before = len(certified)
            start = time.perf_counter()
            chosen[name] = call()
            times[name].append(time.perf_counter() - start)
            rows[name].append(sum(c.rows_computed for c in certified[before:]))
    assert np.array_equal(chosen["fedkern.krum auto"], chosen["fedkern.krum exact"])
    assert np.array_equal(chosen["fedkern.bulyan auto"], chosen["fedkern.bulyan exact"])
    print(f"{cpu_name()}, {fedkern.get_num_threads()} threads, {size_label(k, d)} float32, f={f}, "
          f"{args.rounds} interleaved rounds")
    print("| call | median | min-max | exact rows (certified path) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {np.median(ts) * 1e3:.1f} ms | {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} ms | "
              f"{max(rows[name])} |")
    flower_name = next((n for n in times if n.startswith("flwr")), None)
    if flower_name:
        ratio = np.median(times[flower_name]) / np.median(times["compat.flwr.aggregate_krum (13 layers)"])
        print(f"aggregate_krum: {ratio:.1f}x Flower")


if __name__ == "__main__":
    main()
