"""pytest-benchmark suite of the aggregation family, grouped by op and size."""
import pytest

from conftest import family_cases, run_case


@pytest.mark.parametrize("case", family_cases("aggregate"))
def test_aggregate(benchmark, case, backend):
    run_case(benchmark, case, backend)
