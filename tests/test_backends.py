"""Backend selection, threads, the GIL and the CPU check of the compiled backends."""
import asyncio
import ctypes
import importlib
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fedkern
from fedkern import backends
from conftest import ALL_BACKENDS, FAST_BACKENDS

CHOICES = r"choose one of 'reference', 'cython', 'numba', 'auto'"
AGGREGATE = {name: importlib.import_module(f"fedkern._{name}.aggregate") for name in ALL_BACKENDS}
UPDATES = [np.ones(4, np.float32), np.arange(4, dtype=np.float32)]


@pytest.fixture
def ran(monkeypatch):
    """``ran()`` runs weighted_sum and returns the name of the backend whose kernel ran."""
    calls = []
    for name, module in AGGREGATE.items():
        def spy(*args, _name=name, _kernel=module.weighted_sum):
            calls.append(_name)
            return _kernel(*args)
        monkeypatch.setattr(module, "weighted_sum", spy)

    def run(**kwargs):
        calls.clear()
        np.testing.assert_array_equal(fedkern.weighted_sum(UPDATES, [1, 2], **kwargs), [1, 3, 5, 7])
        assert len(calls) == 1
        return calls[0]
    return run


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter with extra environment variables; return stdout."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("FEDKERN_")}
    result = subprocess.run([sys.executable, "-c", code], env={**environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- backend selection
def test_fast_backends_are_built():
    """CI builds both compiled backends; a silently missing one would skip half the tests."""
    for name in ("cython", "numba"):
        for family in ("aggregate", "optim"):
            assert backends.is_available(name, family), f"{name} {family} is not importable"
    assert fedkern.backends._load("cython", "_runtime").openmp_enabled()


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_backend_argument(name, ran):
    fedkern.set_backend("reference" if name != "reference" else "numba")
    assert ran(backend=name) == name


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_set_backend(name, ran):
    fedkern.set_backend(name)
    assert fedkern.get_backend() == name
    assert ran() == name


def test_precedence_argument_over_block_over_global(ran):
    fedkern.set_backend("reference")
    with fedkern.use_backend("numba"):
        assert ran() == "numba"
        assert ran(backend="cython") == "cython"
    assert ran() == "reference"


def test_use_backend_nests_and_restores(ran):
    fedkern.set_backend("reference")
    with fedkern.use_backend("numba"):
        with fedkern.use_backend("cython"):
            assert fedkern.get_backend() == "cython" and ran() == "cython"
        assert fedkern.get_backend() == "numba" and ran() == "numba"
    assert fedkern.get_backend() == "reference" and ran() == "reference"


def test_use_backend_restores_after_an_exception():
    fedkern.set_backend("reference")
    with pytest.raises(RuntimeError, match="boom"):
        with fedkern.use_backend("numba"):
            with fedkern.use_backend("cython"):
                raise RuntimeError("boom")
    assert fedkern.get_backend() == "reference"


def test_set_backend_inside_use_backend_takes_effect_after_the_block():
    with fedkern.use_backend("numba"):
        fedkern.set_backend("cython")
        assert fedkern.get_backend() == "numba"
    assert fedkern.get_backend() == "cython"


def test_use_backend_is_thread_local():
    fedkern.set_backend("reference")
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with fedkern.use_backend("numba"):
            seen["inside"] = fedkern.get_backend()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert entered.wait(10)
        assert fedkern.get_backend() == "reference"  # the worker's block is not ours
        with fedkern.use_backend("cython"):
            other = threading.Thread(target=lambda: seen.setdefault("other", fedkern.get_backend()))
            other.start()
            other.join()
    finally:
        release.set()
        thread.join()
    assert seen == {"inside": "numba", "other": "reference"}


def test_use_backend_is_task_local():
    async def task(name, seen):
        with fedkern.use_backend(name):
            await asyncio.sleep(0.01)  # the other task enters its block meanwhile
            seen[name] = fedkern.get_backend()

    async def main():
        seen = {}
        await asyncio.gather(task("numba", seen), task("cython", seen))
        return seen

    assert asyncio.run(main()) == {"numba": "numba", "cython": "cython"}


@pytest.mark.parametrize("entry", ["set_backend", "use_backend", "op", "is_available"])
@pytest.mark.parametrize("name", ["bogus", "Numba", "", "openmp"])
def test_unknown_backend_lists_choices(entry, name):
    before = fedkern.get_backend()
    with pytest.raises(fedkern.FedkernValueError, match=rf"unknown backend {name!r}; {CHOICES}"):
        if entry == "set_backend":
            fedkern.set_backend(name)
        elif entry == "use_backend":
            with fedkern.use_backend(name):
                pass
        elif entry == "op":
            fedkern.weighted_sum(UPDATES, [1, 1], backend=name)
        else:
            backends.is_available(name)
    assert fedkern.get_backend() == before


@pytest.mark.parametrize("name", [1, b"numba", ["numba"], True])
def test_non_string_backend(name):
    for call in (lambda: fedkern.set_backend(name), lambda: fedkern.use_backend(name).__enter__(),
                 lambda: fedkern.l2_norms(np.ones((1, 2)), backend=name)):
        with pytest.raises(fedkern.FedkernTypeError, match="backend must be a string"):
            call()
    with pytest.raises(fedkern.FedkernTypeError):
        fedkern.set_backend(None)


@pytest.mark.parametrize("family", ["aggregate", "optim"])
def test_auto_picks_the_first_available_in_auto_order(family):
    first = next(name for name in backends.AUTO_ORDER[family] if backends.is_available(name, family))
    assert backends.resolve(family, "auto") == first
    fedkern.set_backend("auto")
    assert backends.resolve(family) == first
    assert set(backends.AUTO_ORDER[family]) == set(backends.NAMES)
    assert backends.AUTO_ORDER[family][-1] == "reference"  # the fallback that always works


def test_auto_order_can_differ_for_one_kernel():
    """meamed's kernel has its own "auto" order (Numba measured faster for it)."""
    order = backends.AUTO_ORDER["robust.meamed"]
    first = next(name for name in order if backends.is_available(name, "robust"))
    assert backends.resolve("robust", "auto", "meamed") == first
    assert backends.resolve("robust", "auto", "trimmed_mean") == backends.resolve("robust", "auto")
    assert backends.resolve("robust", "cython", "meamed") == "cython"  # explicit wins


def test_auto_runs_the_resolved_backend(ran):
    assert ran(backend="auto") == backends.resolve("aggregate", "auto")


def test_auto_skips_an_unavailable_backend(monkeypatch, ran):
    """A backend that fails to import is skipped by "auto" and reported when asked for."""
    for name in backends.AUTO_ORDER["aggregate"][:-1]:
        assert ran(backend="auto") == name
        monkeypatch.setitem(backends._modules, (name, "aggregate"), ImportError("simulated: no compiler"))
        assert not backends.is_available(name)
        with pytest.raises(fedkern.BackendUnavailableError, match=f"the {name} backend is not available"):
            fedkern.weighted_sum(UPDATES, [1, 1], backend=name)
    assert ran(backend="auto") == "reference"


@pytest.mark.skipif("cython" not in ALL_BACKENDS, reason="the Cython backend is not built")
def test_cython_built_for_instructions_this_cpu_lacks_is_refused(monkeypatch, ran):
    """A -march=native build used on a CPU without its instruction sets (an AVX-512 build
    on an AVX2 machine) must be refused by name, not die of an illegal instruction."""
    build = backends._load("cython", "_build")
    monkeypatch.setattr(build, "ISA", ("avx2", "avx512f"))
    monkeypatch.setattr(backends, "_modules", {})
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert not backends.is_available("cython")
    with pytest.raises(fedkern.BackendUnavailableError, match="compiled .* for a CPU with avx512f, which this CPU lacks"):
        fedkern.weighted_sum(UPDATES, [1, 1], backend="cython")
    assert ran(backend="auto") == "numba"
    monkeypatch.setattr(backends, "_modules", {})
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    assert backends.is_available("cython")
    monkeypatch.setattr(backends, "_modules", {})
    monkeypatch.setattr(backends, "cpu_flags", lambda: None)  # flags unknown (not Linux): trust the build
    assert backends.is_available("cython")


def test_cpu_flags_are_read_from_the_os():
    flags = backends.cpu_flags()
    assert flags is None or (isinstance(flags, frozenset) and all(isinstance(f, str) for f in flags))


@pytest.mark.skipif("cython" not in ALL_BACKENDS, reason="the Cython backend is not built")
def test_a_cython_module_that_was_not_built_says_so(monkeypatch):
    monkeypatch.setattr(backends, "_modules", {})
    with pytest.raises(fedkern.BackendUnavailableError, match="fedkern._cython.no_such_family was not built"):
        backends._load("cython", "no_such_family")


def test_a_kernel_missing_from_a_backend_falls_back_to_the_next_then_the_reference(monkeypatch, ran):
    """A kernel not (yet) written for one engine runs on the next backend of the family's
    order, and finally on the reference; the other kernels stay on the chosen backend."""
    assert ran(backend="cython") == "cython"
    monkeypatch.delattr(AGGREGATE["cython"], "weighted_sum")
    assert ran(backend="cython") == "numba"
    assert backends.kernels("aggregate", "cython").l2_norms is AGGREGATE["cython"].l2_norms
    monkeypatch.delattr(AGGREGATE["numba"], "weighted_sum")
    assert ran(backend="cython") == "reference"
    assert ran(backend="auto") == "reference"


def test_a_family_without_an_auto_order_of_its_own_uses_the_default_order():
    assert "random" not in backends.AUTO_ORDER
    expected = next(b for b in backends.DEFAULT_ORDER if backends.is_available(b, "random"))
    assert backends.resolve("random", "auto") == expected
    out = np.empty(8, np.uint32)
    backends.kernels("random").random_bits(1, 2, 3, out)
    reference = np.empty(8, np.uint32)
    backends.kernels("random", "reference").random_bits(1, 2, 3, reference)
    np.testing.assert_array_equal(out, reference)


ENV_PROBE = """
import json, numpy as np, fedkern
from fedkern import backends
try:
    fedkern.weighted_sum([np.ones(3)], [1.0])
    outcome = "ok"
except fedkern.FedkernError as err:
    outcome = type(err).__name__ + ": " + str(err)
print(json.dumps({"backend": fedkern.get_backend(), "resolved": backends.resolve("aggregate", "auto"),
                  "threads": fedkern.get_num_threads(), "outcome": outcome}))
"""


@pytest.mark.parametrize("name", ["reference", "numba", "auto"])
def test_fedkern_backend_environment_variable(name):
    got = json.loads(run_python(ENV_PROBE.replace('resolve("aggregate", "auto")', 'resolve("aggregate")'),
                                FEDKERN_BACKEND=name))
    assert got["backend"] == name and got["outcome"] == "ok"
    assert got["resolved"] == (backends.resolve("aggregate", "auto") if name == "auto" else name)


def test_bad_fedkern_backend_environment_variable_is_not_ignored():
    code = "import fedkern\ntry:\n" + "".join("    " + line + "\n" for line in ENV_PROBE.splitlines()) + \
        "except fedkern.FedkernValueError as err:\n    print('import failed:', err)"
    out = run_python(code, FEDKERN_BACKEND="bogus")
    assert "unknown backend 'bogus'" in out


# --------------------------------------------------------------------------- threads
def test_num_threads_round_trip():
    for n in (1, 3, 1, 2):
        fedkern.set_num_threads(n)
        assert fedkern.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, 1.5, True, False, "2", None])
def test_bad_num_threads(n):
    before = fedkern.get_num_threads()
    with pytest.raises(fedkern.FedkernValueError, match="n must be a positive integer"):
        fedkern.set_num_threads(n)
    assert fedkern.get_num_threads() == before


def test_num_threads_governs_openmp_and_numba():
    import numba

    runtime = backends._load("cython", "_runtime")
    for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        fedkern.set_num_threads(n)
        fedkern.weighted_sum(UPDATES, [1, 1], backend="cython")
        fedkern.weighted_sum(UPDATES, [1, 1], backend="numba")
        assert (runtime.max_threads(), numba.get_num_threads()) == (n, n)


@pytest.mark.parametrize("value", ["3", "1"])
def test_fedkern_num_threads_environment_variable(value):
    assert json.loads(run_python(ENV_PROBE, FEDKERN_NUM_THREADS=value))["threads"] == int(value)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_fedkern_num_threads_environment_variable(value):
    """A non-positive count must be rejected, not passed on to OpenMP and Numba."""
    code = ENV_PROBE.replace("fedkern.weighted_sum([np.ones(3)], [1.0])",
                             "fedkern.weighted_sum([np.ones(3)], [1.0], backend='numba')")
    code = "try:\n" + "".join("    " + line + "\n" for line in code.splitlines()) + \
        "except Exception as err:\n    print(json.dumps({'outcome': type(err).__name__ + ': ' + str(err)}))"
    got = json.loads(run_python("import json\n" + code, FEDKERN_NUM_THREADS=value))
    if got["outcome"] == "ok":
        assert got["threads"] >= 1
    else:
        assert got["outcome"].startswith("FedkernValueError") and "FEDKERN_NUM_THREADS" in got["outcome"]


# --------------------------------------------------------------------------- the GIL
def gil_released_during(action, max_calls: int, deadline: float = 30.0) -> bool:
    """Whether another Python thread ran while ``action()`` was running.

    No timing is measured: with a switch interval far longer than the test, the calling
    thread is never made to hand the GIL over between bytecodes, so a helper thread that
    is waiting for it can run only while ``action`` has released it (or after the loop
    below, when the caller blocks). The helper records which of the two it was.
    """
    state, asked, answered = {"running": False}, threading.Event(), threading.Event()
    seen = []

    def helper():
        asked.wait()
        seen.append(state["running"])
        answered.set()

    thread = threading.Thread(target=helper, daemon=True)
    thread.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10 * deadline)
    try:
        state["running"] = True
        asked.set()
        start = time.monotonic()
        for _ in range(max_calls):  # a released GIL is taken by the helper within one call
            action()
            if answered.is_set() or time.monotonic() - start > deadline:
                break
        state["running"] = False
    finally:
        sys.setswitchinterval(interval)
    answered.wait(60)
    thread.join(60)
    return seen == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses libc's usleep")
def test_gil_probe_detects_a_call_holding_the_gil():
    """Control: ctypes.PyDLL calls keep the GIL, so the helper cannot run during them."""
    usleep = ctypes.PyDLL(None).usleep
    assert not gil_released_during(lambda: usleep(20_000), max_calls=5)
    assert gil_released_during(lambda: time.sleep(0.02), max_calls=1000)  # and sees a release


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_weighted_sum_releases_the_gil(name):
    rows = [np.ones(100_000, np.float32)] * 20
    weights = np.ones(20)
    fedkern.weighted_sum(rows, weights, backend=name)  # Numba compiles on the first call
    assert gil_released_during(lambda: fedkern.weighted_sum(rows, weights, backend=name), max_calls=10_000)
