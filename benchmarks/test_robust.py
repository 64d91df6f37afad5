"""pytest-benchmark suite of the robust rules, grouped by op and size."""
import pytest

from conftest import family_cases, run_case, run_peer


@pytest.mark.parametrize("case", family_cases("robust"))
def test_robust(benchmark, case, backend):
    run_case(benchmark, case, backend)


@pytest.mark.parametrize("case", family_cases("robust", with_peer=True))
def test_robust_peer(benchmark, case):
    run_peer(benchmark, case)
