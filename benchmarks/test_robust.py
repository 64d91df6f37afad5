"""pytest-benchmark suite of the robust rules, grouped by op and size."""
import pytest

from conftest import family_cases, run_case, run_peer
from fedkern.bench import ROBUST_OPS


@pytest.mark.parametrize("case", family_cases(ROBUST_OPS))
def test_robust(benchmark, case, backend):
    run_case(benchmark, case, backend)


@pytest.mark.parametrize("case", [case for case in family_cases(ROBUST_OPS) if case.values[0].peer])
def test_robust_peer(benchmark, case):
    run_peer(benchmark, case)
