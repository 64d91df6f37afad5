"""pytest-benchmark suite of the compression family, grouped by op and size."""
import pytest

from conftest import family_cases, run_case


@pytest.mark.parametrize("case", family_cases("compress"))
def test_compress(benchmark, case, backend):
    run_case(benchmark, case, backend)
