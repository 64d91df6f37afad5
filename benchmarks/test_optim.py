"""pytest-benchmark suite of the server optimizers, grouped by optimizer and size."""
import pytest

from conftest import family_cases, run_case


@pytest.mark.parametrize("case", family_cases("optim"))
def test_optimizer_step(benchmark, case, backend):
    run_case(benchmark, case, backend)
