"""Tests every public op gets from its one row in ``fedkern._registry``: parity with the
reference on every backend and dtype, no input mutated (and read-only inputs accepted),
results independent of the thread count, ``out=``/``dtype=``, and no bad input reaching a
kernel of any family. The family test files test each op's own semantics in depth."""
import copy

import numpy as np
import pytest
from hypothesis import given, strategies as st

import fedkern
from fedkern import _registry, backends
from conftest import ALL_BACKENDS

OPS = [pytest.param(spec, id=spec.name) for spec in _registry.OPS]
MATRIX_OPS = [pytest.param(spec, id=spec.name) for spec in _registry.OPS if spec.per_update and not spec.streaming]
VECTOR_OPS = [pytest.param(spec, id=spec.name) for spec in _registry.OPS if not spec.per_update]
#: The ops whose K inputs are float updates (the compression ops read K encoded messages,
#: whose bad forms tests/test_compress.py sends).
FLOAT_UPDATE_OPS = [param for param in MATRIX_OPS if param.values[0].family != "compress"]
SIZES = st.one_of(st.integers(1, 40), st.sampled_from([2047, 2048, 2049, 4097, 8193]))


def example(spec, k, d, dtype, seed=0):
    return spec.example(np.random.default_rng(seed), max(k, spec.min_k), d, np.dtype(dtype))


def run(spec, backend, inputs):
    """The op on a private copy of its inputs (ops that update an argument in place get
    their own), as one array or a tuple of arrays."""
    args, kwargs = copy.deepcopy(inputs)
    return spec(backend, *args, **kwargs)


def arrays_in(value) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for item in value for a in arrays_in(item)]
    if isinstance(value, dict):
        return arrays_in(list(value.values()))
    return []


def magnitude(inputs) -> float:
    values = [np.abs(a[np.isfinite(a)]).max(initial=0.0) for a in arrays_in(inputs) if a.dtype.kind == "f"]
    return max([1.0, *values])


# --------------------------------------------------------------------------- the registry itself
def test_all_is_generated_from_the_registry():
    assert len(fedkern.__all__) == len(set(fedkern.__all__))
    for name in _registry.public_names():
        assert name in fedkern.__all__
    for name in fedkern.__all__:
        assert hasattr(fedkern, name), name


@pytest.mark.parametrize("spec", OPS)
def test_every_kernel_a_row_names_exists_in_every_backend(spec, any_backend):
    families = {spec.family, "aggregate"}
    modules = [backends._load(any_backend, family) for family in families]
    for kernel in spec.kernels:
        assert any(hasattr(module, kernel) for module in modules), f"{any_backend} has no {kernel}"


@pytest.mark.parametrize("spec", OPS)
def test_example_runs_on_the_smallest_k(spec):
    result = run(spec, "reference", example(spec, spec.min_k, 3, np.float64))
    assert all(np.isfinite(a).all() for a in arrays_in(result))


# --------------------------------------------------------------------------- every op x backend x dtype
@pytest.mark.parametrize("spec", OPS)
@given(k=st.integers(1, 12), d=SIZES, seed=st.integers(0, 2**32 - 1))
def test_matches_reference(spec, fast_backend, dtype, k, d, seed):
    inputs = example(spec, k, d, dtype, seed)
    result, expected = run(spec, fast_backend, inputs), run(spec, "reference", inputs)
    # in ulps of the larger of the inputs and the result (a norm grows with sqrt(D))
    scale = max(magnitude(inputs), magnitude(expected))
    tolerance = spec.ulps * np.finfo(dtype).eps * max(k, spec.min_k) * scale
    for got, want in zip(arrays_in(result), arrays_in(expected), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        if tolerance == 0:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("spec", OPS)
def test_results_do_not_depend_on_thread_count(spec, fast_backend):
    inputs = example(spec, 9, 3 * 4096 + 7, np.float32, seed=1)
    results = []
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        results.append(arrays_in(run(spec, fast_backend, inputs)))
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("spec", OPS)
def test_inputs_are_not_mutated_and_may_be_read_only(spec, any_backend, dtype):
    args, kwargs = example(spec, 7, 33, dtype, seed=2)
    before = copy.deepcopy((args, kwargs))
    for position, arg in enumerate(args):
        if position not in spec.mutates:
            for array in arrays_in(arg):
                array.flags.writeable = False  # Ray hands out read-only zero-copy arrays
    spec(any_backend, *args, **kwargs)
    for position, (arg, old) in enumerate(zip(args, before[0])):
        if position not in spec.mutates:
            for array, original in zip(arrays_in(arg), arrays_in(old), strict=True):
                np.testing.assert_array_equal(array, original)
    for array, original in zip(arrays_in(kwargs), arrays_in(before[1]), strict=True):
        np.testing.assert_array_equal(array, original)


@pytest.mark.parametrize("spec", [p for p in OPS if p.values[0].out])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_out_is_written_in_place_and_returned(spec, any_backend, dtype, out_dtype):
    args, kwargs = example(spec, 6, 21, dtype, seed=3)
    k = len(args[0])
    if spec.out == "vector":
        out = np.full(21, np.nan, out_dtype)
        expected = spec(any_backend, *args, dtype=out_dtype, **kwargs)
        assert expected.dtype == out_dtype
    else:  # a (K, D) result keeps the updates' dtype
        out = np.full((k, 21), np.nan, dtype)
        expected = spec(any_backend, *args, **kwargs)
    assert spec(any_backend, *args, out=out, **kwargs) is out
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------- the validation guard
def _bad_updates(dtype):
    good = [np.ones(5, dtype) for _ in range(8)]
    return {
        "ragged": good[:-1] + [np.ones(4, dtype)],
        "integer": [np.ones(5, np.int64)] * 8,
        "mixed dtypes": good[:-1] + [np.ones(5, np.float32 if dtype == np.float64 else np.float64)],
        "not contiguous": good[:-1] + [np.ones(10, dtype)[::2]],
        "3-d": np.ones((8, 5, 1), dtype),
        "empty": [],
        "not arrays": [[1.0] * 5] * 8,
    }


@pytest.fixture
def kernels_forbidden(monkeypatch):
    """Every kernel of every family and backend raises if it is reached."""
    # every module imported before any is patched: a module importing another's kernel
    # (robust uses aggregate's) would otherwise keep the forbidden one after the test
    modules = {(name, family): backends._load(name, family)
               for name in ALL_BACKENDS for family in ("aggregate", "optim", "robust")}
    for (name, family), module in modules.items():
        for attribute in dir(module):
            if not attribute.startswith("__") and callable(getattr(module, attribute)) and \
                    getattr(getattr(module, attribute), "__module__", "").startswith("fedkern."):
                monkeypatch.setattr(module, attribute, _forbidden(name, family, attribute))


def _forbidden(backend, family, kernel):
    def kernel_reached(*args, **kwargs):
        raise AssertionError(f"bad input reached {backend}.{family}.{kernel}")

    return kernel_reached


@pytest.mark.parametrize("spec", FLOAT_UPDATE_OPS)
@pytest.mark.parametrize("case", list(_bad_updates(np.float32)))
def test_bad_updates_never_reach_a_kernel(spec, case, kernels_forbidden, any_backend):
    args, kwargs = example(spec, 8, 5, np.float32)
    bad = _bad_updates(np.float32)[case]
    with pytest.raises(fedkern.FedkernError) as raised:
        spec(any_backend, bad, *args[1:], **kwargs)
    assert isinstance(raised.value, (ValueError, TypeError))
    assert "update" in str(raised.value)  # names the argument (the Accumulator: each update)


def _bad_vectors():
    return {
        "integer": np.ones(5, np.int64),
        "2-d": np.ones((5, 1)),
        "not contiguous": np.ones(10)[::2],
        "wrong length": np.ones(4),
        "a list": [1.0] * 5,
        "empty": np.ones(0),
    }


@pytest.mark.parametrize("spec", VECTOR_OPS)
@pytest.mark.parametrize("case", list(_bad_vectors()))
def test_a_bad_vector_never_reaches_a_kernel(spec, case, kernels_forbidden, any_backend):
    """The vector an op on one vector reads (accumulate's update, an optimizer's delta)."""
    args, kwargs = example(spec, 1, 5, np.float64)
    with pytest.raises(fedkern.FedkernError):
        spec(any_backend, args[0], _bad_vectors()[case], *args[2:], **kwargs)
