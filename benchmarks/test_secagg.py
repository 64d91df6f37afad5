"""pytest-benchmark suite of the secure aggregation family, grouped by op and size."""
import pytest

from conftest import family_cases, run_case


@pytest.mark.parametrize("case", family_cases("secagg"))
def test_secagg(benchmark, case, backend):
    run_case(benchmark, case, backend)
