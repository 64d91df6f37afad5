"""pytest-benchmark: fedkern.compat.flwr side by side with Flower's own helpers.

Each op runs on the same data as ``fedkern`` and as ``flower``, in one benchmark group
per op and size, so ``pytest benchmarks/test_flwr.py`` prints the two medians together.
Models are CNN-like lists of float32 layers (convolutions, biases, a large dense layer,
a 0-d scalar). Sizes follow ``FEDKERN_BENCH_PROFILE``:

* ``quick`` (default, what CI runs with ``--benchmark-disable``): K = 10, D ~ 2e4;
* ``default``: K in {10, 100} x D ~ 1e6 (Flower's Krum takes ~15 s and its Bulyan
  several minutes at K = 100: they run once);
* ``full``: adds D ~ 1e7 for the helpers that are linear in K x D.

Targets (same-run ratio of medians, Flower / fedkern): aggregate, aggregate_inplace and
aggregate_arrayrecords >= 5x; median and trimmed mean >= 20x; Krum >= 50x; Bulyan
>= 100x at K = 100 x 1e6.
"""
import os

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

import flwr.server.strategy.aggregate as flower  # noqa: E402
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters  # noqa: E402
from flwr.serverapp.strategy import multikrum as flower_multikrum  # noqa: E402
from flwr.serverapp.strategy import strategy_utils as flower_utils  # noqa: E402

from fedkern.compat import flwr as fk  # noqa: E402

PROFILE = os.environ.get("FEDKERN_BENCH_PROFILE", "quick")
SIZES = {
    "quick": [(10, 20_000)],
    "default": [(10, 1_000_000), (100, 1_000_000)],
    "full": [(10, 1_000_000), (100, 1_000_000), (10, 10_000_000), (100, 10_000_000)],
}.get(PROFILE, [(10, 20_000)])
#: Ops whose Flower version is quadratic in K (Krum) or cubic (Bulyan): not run at D ~ 1e7.
QUADRATIC = ("krum", "select_multikrum", "bulyan")
#: A Flower call slower than this many K x D multiply-adds per second runs only once.
SLOW_FLOWER = ("krum", "select_multikrum", "bulyan", "median", "trimmed")


def cnn_shapes(d: int) -> list[tuple[int, ...]]:
    """Layer shapes of a small CNN whose dense layer brings the total to about ``d``."""
    convs = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,)]
    if d >= 200_000:
        convs += [(64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,)]
    head = [(10, 128), (10,), ()]
    used = sum(int(np.prod(s)) for s in convs + head) + 128
    return convs + [(max(1, (d - used) // 128), 128), (128,)] + head


def make_results(k: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = cnn_shapes(d)
    return [([rng.standard_normal(s, dtype=np.float32) for s in shapes], int(rng.integers(1, 500))) for _ in range(k)]


def as_fit_results(results):
    return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), n, {})) for params, n in results]


def as_contents(results):
    return [RecordDict({"arrays": ArrayRecord({f"l{j}": Array(a) for j, a in enumerate(params)}),
                        "metrics": MetricRecord({"num-examples": n})}) for params, n in results]


def byzantine(k: int) -> int:
    return max(1, (k - 3) // 8)  # Bulyan needs K >= 4f + 3; leave room


OPS = {
    # op: (input builder, fedkern call, Flower call)
    "aggregate": (lambda r: r, fk.aggregate, flower.aggregate),
    "aggregate_inplace": (as_fit_results, fk.aggregate_inplace, flower.aggregate_inplace),
    "aggregate_arrayrecords": (as_contents, lambda c: fk.aggregate_arrayrecords(c, "num-examples"),
                               lambda c: flower_utils.aggregate_arrayrecords(c, "num-examples")),
    "median": (lambda r: r, fk.aggregate_median, flower.aggregate_median),
    "trimmed": (lambda r: r, lambda r: fk.aggregate_trimmed_avg(r, 0.2), lambda r: flower.aggregate_trimmed_avg(r, 0.2)),
    "krum": (lambda r: r, lambda r: fk.aggregate_krum(r, byzantine(len(r)), 0),
             lambda r: flower.aggregate_krum(r, byzantine(len(r)), 0)),
    "select_multikrum": (as_contents, lambda c: fk.select_multikrum(c, byzantine(len(c)), len(c) // 2),
                         lambda c: flower_multikrum.select_multikrum(c, byzantine(len(c)), len(c) // 2)),
    # Flower's Bulyan pops the selected clients out of its argument: give it a fresh list each call
    "bulyan": (lambda r: r, lambda r: fk.aggregate_bulyan(r, byzantine(len(r)), fk.aggregate_krum),
               lambda r: flower.aggregate_bulyan(list(r), byzantine(len(r)), flower.aggregate_krum, to_keep=0)),
}

CASES = [pytest.param(op, k, d, impl, id=f"{op}-K{k}-D{d:.0e}-{impl}".replace("e+0", "e"))
         for k, d in SIZES for op in OPS for impl in ("fedkern", "flower")
         if not (op in QUADRATIC and d > 2_000_000)]

_data = {}


def _inputs(op, k, d):
    key = (op, k, d)
    if key not in _data:
        _data.clear()  # one case's data in memory at a time
        _data[key] = OPS[op][0](make_results(k, d))
    return _data[key]


@pytest.mark.parametrize("op,k,d,impl", CASES)
def test_flwr(benchmark, op, k, d, impl):
    data = _inputs(op, k, d)
    call = OPS[op][1] if impl == "fedkern" else OPS[op][2]
    benchmark.group = f"{op} K={k} D={d:.0e}"
    benchmark.extra_info["bytes"] = 4 * k * d
    if impl == "flower" and op in SLOW_FLOWER and k * d >= 10**8:
        benchmark.pedantic(call, args=(data,), rounds=1, iterations=1)
    else:
        benchmark(call, data)
