"""Benchmark settings: sizes come from the profiles of ``fedkern.bench``.

``FEDKERN_BENCH_PROFILE`` picks them: "quick" (default, what CI runs with
``--benchmark-disable`` so the suite cannot rot), "default", "full" (the keys of
``fedkern.bench.PROFILES``).
"""
import os

import pytest

from fedkern import backends, bench

PROFILE = os.environ.get("FEDKERN_BENCH_PROFILE", "quick")
BACKENDS = [name for name in backends.NAMES if backends.is_available(name)]


def family_cases(family, with_peer=False):
    """This profile's cases of one kernel family (with a peer only, if asked), as pytest params."""
    return [pytest.param(case, id=case.name) for case in bench.cases(PROFILE)
            if case.family == family and (case.peer or not with_peer)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


_built = {}


def _call(case):
    """The case's call; data is built once per case and shared by its backends and peer."""
    if case.name not in _built:
        _built.clear()  # keep one case's data in memory at a time
        _built[case.name] = case.make()
    return _built[case.name]


def run_case(benchmark, case, backend):
    """Benchmark ``case`` on ``backend``."""
    benchmark.group = case.name
    benchmark.extra_info["bytes"] = case.nbytes
    benchmark(_call(case), backend)


def run_peer(benchmark, case, once=False):
    """Benchmark the case's peer implementation (np.median, BLAS SYRK, Flower, ...) in its group."""
    call = _call(case)
    if not hasattr(call, "peer"):
        pytest.skip(f"peer {case.peer} needs {case.peer_package} ({bench.INSTALL_HINTS[case.peer_package]})")
    benchmark.group = case.name
    benchmark.extra_info["bytes"] = case.nbytes
    if once:
        benchmark.pedantic(call.peer, rounds=1, iterations=1)
    else:
        benchmark(call.peer)
