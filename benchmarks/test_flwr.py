"""pytest-benchmark: fedkern.compat.flwr side by side with Flower's own helpers.

The cases are ``fedkern.bench``'s (``fedkern bench --flwr`` runs the same): each helper
on a CNN-like list of float32 layers, per backend, and Flower's helper on the same data
as the peer, in one group per op and size. Sizes follow ``FEDKERN_BENCH_PROFILE``:
``quick`` (default, what CI runs with ``--benchmark-disable``): K = 10, D ~ 2e4;
``default``: K in {10, 100} x D ~ 1e6; ``full``: adds D ~ 1e7 for the helpers linear
in K x D. Flower's Krum and Bulyan are quadratic and cubic in K: at K = 100 they take
seconds to minutes per call.
"""
import os

import pytest

pytest.importorskip("flwr")

from conftest import run_case, run_peer  # noqa: E402
from fedkern.bench.flwr import FLWR_OPS, flwr_case  # noqa: E402

PROFILE = os.environ.get("FEDKERN_BENCH_PROFILE", "quick")
SIZES = {
    "quick": [(10, 20_000)],
    "default": [(10, 1_000_000), (100, 1_000_000)],
    "full": [(10, 1_000_000), (100, 1_000_000), (10, 10_000_000), (100, 10_000_000)],
}[PROFILE]
QUADRATIC = ("flwr.aggregate_krum", "flwr.select_multikrum", "flwr.aggregate_bulyan")
CASES = [pytest.param(flwr_case(op, k, d), id=f"{op}[K={k} D={d:.0e}]".replace("e+0", "e"))
         for k, d in SIZES for op in FLWR_OPS if not (op in QUADRATIC and d > 2_000_000)]


@pytest.mark.parametrize("case", CASES)
def test_flwr(benchmark, case, backend):
    run_case(benchmark, case, backend)


@pytest.mark.parametrize("case", CASES)
def test_flower_itself(benchmark, case):
    # Flower's quadratic helpers take seconds to minutes a call at K = 100: one round
    run_peer(benchmark, case, once=case.op in QUADRATIC and "K=100" in case.size)
