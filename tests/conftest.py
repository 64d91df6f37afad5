"""Shared test settings: the backends under test and a hypothesis profile sized for CI."""
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fedkern
from fedkern import backends

settings.register_profile(
    "ci", max_examples=int(os.environ.get("FEDKERN_HYPOTHESIS_EXAMPLES", "25")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    # CI draws the same examples every run, so its verdict never rests on luck; elsewhere
    # hypothesis explores anew each run
    derandomize=os.environ.get("CI", "").lower() == "true",
)
settings.load_profile("ci")

# generated datasets are cached on disk: the tests keep theirs in a fresh directory (subprocesses
# inherit it), so a run never writes to the user's cache nor reads what an older version left there
os.environ["FEDKERN_DATA_CACHE"] = tempfile.mkdtemp(prefix="fedkern-test-data-")

#: Every backend this machine can run; CI builds all three, so a missing one fails there.
ALL_BACKENDS = [name for name in backends.NAMES if backends.is_available(name)]
FAST_BACKENDS = [name for name in ALL_BACKENDS if name != "reference"]
DTYPES = [np.float32, np.float64]


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    return request.param


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """Tests that change the default backend or thread count must not leak it."""
    backend, threads = fedkern.get_backend(), fedkern.get_num_threads()
    yield
    fedkern.set_backend(backend)
    fedkern.set_num_threads(threads)
