"""pytest-benchmark suite of the privacy family, grouped by op and size."""
import pytest

from conftest import family_cases, run_case


@pytest.mark.parametrize("case", family_cases("privacy"))
def test_privacy(benchmark, case, backend):
    run_case(benchmark, case, backend)
