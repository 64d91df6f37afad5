"""The public API around the kernels: backend selection, threads, the GIL, buffers,
the streaming accumulator and the ``fedkern`` command."""
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


# --------------------------------------------------------------------------- Layout
LAYERS = [((3, 4), np.float32), ((5,), np.float32), ((), np.float32), ((2, 1, 3), np.float32), ((0, 2), np.float32)]


def make_layers(spec, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 10).astype(dtype) for shape, dtype in spec]


def test_layout_round_trip():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    assert (len(layout), layout.size, layout.dtype) == (5, 12 + 5 + 1 + 6, np.float32)
    flat = layout.flatten(layers)
    assert flat.shape == (layout.size,) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, np.concatenate([a.ravel() for a in layers]))
    views = layout.unflatten(flat)
    for view, layer in zip(views, layers):
        assert view.shape == layer.shape and view.dtype == flat.dtype
        np.testing.assert_array_equal(view, layer)


def test_unflatten_returns_views():
    layout = fedkern.Layout(make_layers(LAYERS))
    flat = np.zeros(layout.size, np.float32)
    views = layout.unflatten(flat)
    assert all(np.shares_memory(view, flat) for view in views if view.size)
    views[1][2] = 7.0
    views[2][...] = 9.0  # the 0-d layer
    views[3][1, 0, 2] = 5.0
    assert flat[12 + 2] == 7.0 and flat[12 + 5] == 9.0 and flat[12 + 5 + 1 + 5] == 5.0
    flat[0] = 3.0
    assert views[0][0, 0] == 3.0


def test_flatten_into_out():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    out = np.full(layout.size, np.nan, np.float64)
    assert layout.flatten(layers, out=out) is out
    np.testing.assert_array_equal(out, np.concatenate([a.ravel() for a in layers]))


@pytest.mark.parametrize("dtypes, expected", [
    ((np.float32, np.float64), np.float64),
    ((np.float32, np.int64), np.float32),
    ((np.int64, np.uint8), np.float32),
    ((np.float64, np.float32, np.int32), np.float64),
])
def test_layout_mixed_dtypes(dtypes, expected):
    layers = make_layers([((2, 2), dtype) for dtype in dtypes])
    layout = fedkern.Layout(layers)
    assert layout.dtype == expected
    for layer, view in zip(layers, layout.unflatten(layout.flatten(layers))):
        np.testing.assert_array_equal(view, layer.astype(expected))


def test_layout_dtype_option():
    layers = make_layers(LAYERS[:2])
    assert fedkern.Layout(layers, dtype=np.float64).flatten(layers).dtype == np.float64
    with pytest.raises(fedkern.FedkernTypeError, match="dtype"):
        fedkern.Layout(layers, dtype=np.int32)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda layout, layers: fedkern.Layout([]), fedkern.FedkernTypeError, "non-empty list"),
    (lambda layout, layers: fedkern.Layout(np.ones(3)), fedkern.FedkernTypeError, "non-empty list"),
    (lambda layout, layers: fedkern.Layout([np.ones(2, complex)]), fedkern.FedkernTypeError, r"arrays\[0\].*complex"),
    (lambda layout, layers: fedkern.Layout([np.ones(2), [1.0]]), fedkern.FedkernTypeError,
     r"arrays\[1\] must be a numpy array"),
    (lambda layout, layers: layout.flatten(layers[:-1]), fedkern.FedkernValueError, "arrays has 4 layers; the layout has 5"),
    (lambda layout, layers: layout.flatten(layers + layers[:1]), fedkern.FedkernValueError, "arrays has 6 layers"),
    (lambda layout, layers: layout.flatten([layers[0].T] + layers[1:]), fedkern.FedkernValueError,
     r"arrays\[0\] has shape \(4, 3\); the layout has \(3, 4\)"),
    (lambda layout, layers: layout.flatten(layers[:1] + [layers[1].astype(complex)] + layers[2:]),
     fedkern.FedkernTypeError, r"arrays\[1\] has dtype complex128"),
    (lambda layout, layers: layout.flatten(layers, out=np.empty(layout.size + 1)), fedkern.FedkernValueError,
     "out has shape"),
    (lambda layout, layers: layout.unflatten(np.zeros(layout.size - 1, np.float32)), fedkern.FedkernValueError,
     "flat has length 23; expected 24"),
    (lambda layout, layers: layout.unflatten(np.zeros((1, layout.size), np.float32)), fedkern.FedkernValueError,
     "flat must be 1-D"),
    (lambda layout, layers: layout.unflatten(np.zeros(2 * layout.size, np.float32)[::2]), fedkern.FedkernValueError,
     "flat is not C-contiguous"),
], ids=["empty", "array-not-list", "complex", "list-layer", "fewer-layers", "more-layers", "wrong-shape",
        "complex-in-flatten", "out-length", "flat-length", "flat-2-D", "flat-strided"])
def test_layout_errors(make, exc, pattern):
    layers = make_layers(LAYERS)
    with pytest.raises(exc, match=pattern):
        make(fedkern.Layout(layers), layers)


# --------------------------------------------------------------------------- UpdateMatrix
def test_update_matrix_rows_are_writable_views():
    matrix = fedkern.UpdateMatrix(3, 4)
    assert matrix.shape == (3, 4) and matrix.dtype == np.float32 and len(matrix) == 3
    assert matrix.array.flags.c_contiguous
    np.testing.assert_array_equal(matrix.weights, [1, 1, 1])
    matrix[1][:] = 5.0
    matrix[-1][2] = 7.0
    np.testing.assert_array_equal(matrix.array, [[0, 0, 0, 0], [5, 5, 5, 5], [0, 0, 7, 0]])


def test_update_matrix_set_copies_and_records_the_weight():
    matrix = fedkern.UpdateMatrix(2, 3, dtype=np.float64)
    update = np.array([1, 2, 3], np.int64)
    matrix.set(1, update, weight=30)
    update[0] = 100
    np.testing.assert_array_equal(matrix.array, [[0, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(matrix.weights, [1, 30])


def test_update_matrix_iterates_over_its_rows():
    """It has __len__ and __getitem__, so ``for row in matrix`` must stop after K rows."""
    matrix = fedkern.UpdateMatrix(2, 3)
    assert [row.shape for row in matrix] == [(3,), (3,)]


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda m: m[3], fedkern.FedkernValueError, "client index 3 is out of range for 3 clients"),
    (lambda m: m[-4], fedkern.FedkernValueError, "client index -4 is out of range"),
    (lambda m: m.set(3, np.ones(4)), fedkern.FedkernValueError, "client index 3"),
    (lambda m: m.set(True, np.ones(4)), fedkern.FedkernValueError, "client index True"),
    (lambda m: m.set(0, np.ones(5)), fedkern.FedkernValueError, r"update has shape \(5,\); expected \(4,\)"),
    (lambda m: m.set(0, np.ones((1, 4))), fedkern.FedkernValueError, r"update has shape \(1, 4\)"),
    (lambda m: m.set(0, np.ones(4, complex)), fedkern.FedkernTypeError, "update has dtype complex128"),
    (lambda m: m.set(0, np.ones(4), weight=-1), fedkern.FedkernValueError, "weight must be >= 0"),
    (lambda m: m.set(0, np.ones(4), weight=np.nan), fedkern.FedkernValueError, "weight must be finite"),
    (lambda m: fedkern.UpdateMatrix(0, 4), fedkern.FedkernValueError, "k must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, -1), fedkern.FedkernValueError, "d must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, 2.0), fedkern.FedkernValueError, "d must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, 2, dtype=np.int32), fedkern.FedkernTypeError, "dtype"),
])
def test_update_matrix_errors(call, exc, pattern):
    matrix = fedkern.UpdateMatrix(3, 4)
    before = matrix.array.copy(), matrix.weights.copy()
    with pytest.raises(exc, match=pattern):
        call(matrix)
    np.testing.assert_array_equal(matrix.array, before[0])
    np.testing.assert_array_equal(matrix.weights, before[1])


def test_weighted_mean_uses_the_matrix_weights(any_backend, dtype):
    matrix = fedkern.UpdateMatrix(3, 5, dtype=dtype)
    rng = np.random.default_rng(1)
    for i, weight in enumerate([10, 0, 30]):
        matrix.set(i, rng.standard_normal(5), weight=weight)
    mean = fedkern.weighted_mean(matrix, backend=any_backend)
    assert mean.dtype == dtype
    np.testing.assert_array_equal(mean, fedkern.weighted_mean(matrix.array, matrix.weights, backend=any_backend))
    np.testing.assert_allclose(mean, (matrix.array[0] * 10 + matrix.array[2] * 30) / 40, rtol=1e-6)
    np.testing.assert_array_equal(fedkern.weighted_mean(matrix, [1, 1, 1], backend=any_backend),
                                  fedkern.weighted_mean(matrix.array, backend=any_backend))
    matrix.weights[1] = -1
    with pytest.raises(fedkern.FedkernValueError, match=r"weights\[1\]"):
        fedkern.weighted_mean(matrix, backend=any_backend)


def test_layout_empty_updates():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    matrix = layout.empty_updates(4)
    assert isinstance(matrix, fedkern.UpdateMatrix) and matrix.shape == (4, layout.size)
    assert matrix.dtype == layout.dtype
    for i in range(4):
        layout.flatten(layers, out=matrix[i])
    for view, layer in zip(layout.unflatten(fedkern.weighted_mean(matrix)), layers):
        np.testing.assert_allclose(view, layer, rtol=1e-6)


# --------------------------------------------------------------------------- Accumulator
def client_updates(dtype, k=6, d=1000, seed=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d).astype(dtype) for _ in range(k)], rng.uniform(0, 100, k)


def test_accumulator_matches_weighted_sum_and_mean(any_backend, dtype):
    updates, weights = client_updates(dtype)
    acc = fedkern.Accumulator(updates[0].size, dtype=dtype, backend=any_backend)
    for update, weight in zip(updates, weights):
        acc.add(update, weight)
    assert acc.count == len(updates) and acc.total_weight == pytest.approx(weights.sum(), rel=1e-15)
    # documented: exactly the sum weighted_sum computes over the same updates in that order
    np.testing.assert_array_equal(acc.sum(), fedkern.weighted_sum(updates, weights, backend=any_backend))
    mean = acc.mean()
    assert mean.dtype == dtype
    expected = fedkern.weighted_mean(updates, weights, backend=any_backend)
    np.testing.assert_allclose(mean, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-13)


def test_accumulator_reset():
    updates, weights = client_updates(np.float32, k=2, d=4)
    acc = fedkern.Accumulator(4)
    acc.add(updates[0], 3.0)
    acc.reset()
    assert (acc.count, acc.total_weight) == (0, 0.0)
    np.testing.assert_array_equal(acc.sum(), np.zeros(4))
    with pytest.raises(fedkern.FedkernValueError, match="no update with positive weight"):
        acc.mean()
    acc.add(updates[1], 2.0)
    np.testing.assert_allclose(acc.mean(), updates[1], rtol=1e-7)


def test_accumulator_mean_needs_a_positive_weight():
    acc = fedkern.Accumulator(3)
    with pytest.raises(fedkern.FedkernValueError, match=r"Accumulator\.mean: no update with positive weight"):
        acc.mean()
    acc.add(np.ones(3, np.float32), 0)
    assert acc.count == 1
    with pytest.raises(fedkern.FedkernValueError, match="no update with positive weight"):
        acc.mean()


def test_accumulator_dtypes_and_out():
    acc = fedkern.Accumulator(3, dtype=np.float64)
    acc.add(np.array([1, 2, 3], np.float32), 1.0)
    acc.add(np.array([3, 2, 1], np.float64), 3.0)
    assert acc.sum().dtype == acc.mean().dtype == np.float64
    np.testing.assert_array_equal(acc.sum(), [10, 8, 6])
    out = np.empty(3, np.float32)
    assert acc.mean(out=out) is out
    np.testing.assert_array_equal(out, [2.5, 2, 1.5])
    assert fedkern.Accumulator(3).mean.__self__.dtype == np.float32  # default
    with pytest.raises(fedkern.FedkernValueError, match="out has shape"):
        acc.mean(out=np.empty(4))
    with pytest.raises(fedkern.FedkernValueError, match="out is read-only"):
        acc.sum(out=np.zeros(3)[::1].view().__array__().copy().setflags(write=False) or _read_only(3))


def _read_only(n):
    array = np.zeros(n)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("d", [0, -1, True, 2.0, "3"])
def test_accumulator_bad_d(d):
    with pytest.raises(fedkern.FedkernValueError, match="d must be a positive integer"):
        fedkern.Accumulator(d)


@pytest.mark.parametrize("update, weight, exc, pattern", [
    (np.ones(4, np.float32), 1.0, fedkern.FedkernValueError, "update has length 4; expected 3"),
    (np.ones(3, np.int64), 1.0, fedkern.FedkernTypeError, "update has dtype int64"),
    (np.ones(3, np.float32), -2.0, fedkern.FedkernValueError, "weight must be >= 0"),
    (np.ones(3, np.float32), np.nan, fedkern.FedkernValueError, "weight must be finite"),
    (np.array([1, np.inf, 1], np.float32), 1.0, fedkern.NonFiniteError, r"Accumulator\.add: update holds"),
])
def test_accumulator_rejects_leave_it_unchanged(update, weight, exc, pattern, any_backend):
    acc = fedkern.Accumulator(3, backend=any_backend)
    acc.add(np.ones(3, np.float32), 2.0)
    with pytest.raises(exc, match=pattern):
        acc.add(update, weight)
    assert (acc.count, acc.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(acc.sum(), [2, 2, 2])


# --------------------------------------------------------------------------- CLI
def test_cli_info():
    result = subprocess.run([sys.executable, "-m", "fedkern.cli", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.lower()
    for word in ("cython", "numba", "reference", "openmp", "threads", fedkern.__version__):
        assert word in text, f"{word!r} missing from `fedkern info`:\n{result.stdout}"
