"""Bad input: every documented error, with its class and a message naming the argument.

Validation happens in ``fedkern._validate`` before any kernel runs, so every backend must
raise the same error; the ``guarded`` fixture replaces the kernels of the backend under
test by a function that fails the test if it is ever called.
"""
import importlib
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedkern
from fedkern import FedkernError, FedkernTypeError, FedkernValueError

K, D = 3, 5  # K != D so that a shape mix-up cannot go unnoticed
F32, F64 = np.float32, np.float64
VE, TE = FedkernValueError, FedkernTypeError
UPDATE_OPS = ["weighted_sum", "weighted_mean", "l2_norms", "clip_by_norm"]
KERNELS = ["weighted_sum", "accumulate", "count_nonfinite", "l2_norms", "clip_by_norm"]


def good(k=K, d=D, dtype=F32):
    return np.arange(k * d, dtype=dtype).reshape(k, d)


def rows(*lengths, dtype=F32):
    return [np.ones(n, dtype) for n in lengths]


def read_only(array):
    array.flags.writeable = False
    return array


def run(op, updates, backend, **kwargs):
    """Call ``op`` with ``updates`` and valid values for its other required arguments."""
    if op == "weighted_sum":
        try:
            k = len(updates)
        except TypeError:
            k = 1
        return fedkern.weighted_sum(updates, kwargs.pop("weights", np.ones(k)), backend=backend, **kwargs)
    if op == "clip_by_norm":
        return fedkern.clip_by_norm(updates, kwargs.pop("max_norm", 1.0), backend=backend, **kwargs)
    return getattr(fedkern, op)(updates, backend=backend, **kwargs)


@pytest.fixture
def guarded(any_backend, monkeypatch):
    """``any_backend``, with kernels that fail the test if they run."""
    module = importlib.import_module(f"fedkern._{any_backend}.aggregate")

    def kernel_ran(*args, **kwargs):
        raise AssertionError(f"a {any_backend} kernel ran before the input was rejected")

    for name in KERNELS:
        monkeypatch.setattr(module, name, kernel_ran)
    return any_backend


def test_exception_hierarchy():
    assert issubclass(FedkernValueError, ValueError) and issubclass(FedkernValueError, FedkernError)
    assert issubclass(FedkernTypeError, TypeError) and issubclass(FedkernTypeError, FedkernError)
    assert issubclass(fedkern.NonFiniteError, FedkernValueError)
    assert issubclass(fedkern.BackendUnavailableError, ImportError)


def expect(exc, pattern):
    """pytest.raises for a fedkern error that must also be the matching builtin."""
    builtin = ValueError if issubclass(exc, ValueError) else TypeError
    assert issubclass(exc, builtin)
    return pytest.raises(exc, match=pattern)


# --------------------------------------------------------------------------- updates
BAD_DTYPES = [np.int32, np.int64, np.uint8, bool, np.float16, np.longdouble, np.complex64,
              np.complex128, object, ">f4", ">f8"]

BAD_UPDATES = [
    ("empty-list", lambda: [], VE, r"updates is empty"),
    ("empty-tuple", lambda: (), VE, r"updates is empty"),
    ("0xD", lambda: np.ones((0, D), F32), VE, r"updates is empty \(shape \(0, 5\)\)"),
    ("Kx0", lambda: np.ones((K, 0), F32), VE, r"updates is empty \(shape \(3, 0\)\)"),
    ("rows-of-length-0", lambda: rows(0, 0), VE, r"updates are empty"),
    ("ragged-longer", lambda: rows(D, D, D + 1), VE, r"updates\[2\] has length 6 but updates\[0\] has 5"),
    ("ragged-shorter", lambda: rows(D, D - 1, D), VE, r"updates\[1\] has length 4"),
    ("mixed-dtypes", lambda: [np.ones(D, F32), np.ones(D, F32), np.ones(D, F64)], TE,
     r"updates\[2\] has dtype float64 but updates\[0\] has float32"),
    *[(f"matrix-{np.dtype(dt).str}", lambda dt=dt: good().astype(dt), TE, r"updates has dtype .*float32 or float64")
      for dt in BAD_DTYPES],
    *[(f"rows-{np.dtype(dt).str}", lambda dt=dt: [np.ones(D, F32), np.ones(D).astype(dt)], TE,
       r"updates\[1\] has dtype .*float32 or float64") for dt in BAD_DTYPES],
    ("big-endian-named", lambda: good().astype(">f4"), TE, r"updates has dtype >f4"),
    ("0-D", lambda: np.ones((), F32), VE, r"updates must be a 2-D .* shape \(\)"),
    ("1-D", lambda: np.ones(D, F32), VE, r"updates must be a 2-D .* shape \(5,\)"),
    ("3-D", lambda: np.ones((2, K, D), F32), VE, r"updates must be a 2-D .* shape \(2, 3, 5\)"),
    ("2-D-row", lambda: [np.ones(D, F32), np.ones((1, D), F32)], VE, r"updates\[1\] must be 1-D"),
    ("0-D-row", lambda: [np.ones(D, F32), np.ones((), F32)], VE, r"updates\[1\] must be 1-D"),
    ("list-row", lambda: [np.ones(D, F32), [1.0] * D], TE, r"updates\[1\] must be a numpy array; got list"),
    ("nested-lists", lambda: [[1.0] * D] * K, TE, r"updates\[0\] must be a numpy array"),
    ("scalar-rows", lambda: list(np.ones(D, F32)), TE, r"updates\[0\] must be a numpy array"),
    ("int", lambda: 3, TE, r"updates must be .*; got int"),
    ("str", lambda: "abc", TE, r"updates must be .*; got str"),
    ("bytes", lambda: b"abc", TE, r"updates must be .*; got bytes"),
    ("dict", lambda: {0: np.ones(D, F32)}, TE, r"updates must be .*; got dict"),
    ("generator", lambda: (row for row in good()), TE, r"updates must be .*; got generator"),
    ("None", lambda: None, TE, r"updates must be .*; got NoneType"),
    ("strided-row", lambda: [np.ones(D, F32), np.ones(2 * D, F32)[::2]], VE, r"updates\[1\] is not C-contiguous"),
    ("reversed-row", lambda: [np.ones(D, F32), np.arange(D, dtype=F32)[::-1]], VE,
     r"updates\[1\] is not C-contiguous"),
    ("fortran-matrix", lambda: np.asfortranarray(good()), VE, r"updates is not C-contiguous"),
    ("transposed-matrix", lambda: good(D, K).T, VE, r"updates is not C-contiguous"),
    ("column-strided-matrix", lambda: good(K, 2 * D)[:, ::2], VE, r"updates is not C-contiguous"),
    ("row-strided-matrix", lambda: good(2 * K, D)[::2], VE, r"updates is not C-contiguous"),
]


@pytest.mark.parametrize("op", UPDATE_OPS)
@pytest.mark.parametrize("make, exc, pattern", [case[1:] for case in BAD_UPDATES],
                         ids=[case[0] for case in BAD_UPDATES])
def test_bad_updates(op, make, exc, pattern, guarded):
    with expect(exc, pattern):
        run(op, make(), guarded)


@pytest.mark.parametrize("op", UPDATE_OPS)
def test_non_contiguous_updates_are_never_copied_silently(op, guarded):
    """The documented message tells the caller how to copy explicitly."""
    with expect(VE, r"never copies silently: pass np\.ascontiguousarray\(updates\)"):
        run(op, np.asfortranarray(good()), guarded)


# --------------------------------------------------------------------------- weights
BAD_WEIGHTS = [
    ("negative", [1, -1, 1], VE, r"weights\[1\] is -1\.0; weights must be >= 0"),
    ("nan", [1, 1, np.nan], VE, r"weights\[2\] is nan; weights must be finite"),
    ("inf", [np.inf, 1, 1], VE, r"weights\[0\] is inf; weights must be finite"),
    ("-inf", [1, -np.inf, 1], VE, r"weights\[1\] is -inf; weights must be finite"),
    ("all-zero", [0, 0, 0], VE, r"weights are all zero"),
    ("too-short", [1, 1], VE, r"weights has length 2 but there are 3 updates"),
    ("too-long", np.ones(4), VE, r"weights has length 4 but there are 3 updates"),
    ("scalar", 1.0, VE, r"weights must be 1-D; got shape \(\)"),
    ("2-D", np.ones((K, 1)), VE, r"weights must be 1-D; got shape \(3, 1\)"),
    ("complex-array", np.ones(K, complex), TE, r"weights must be real numbers; got dtype complex128"),
    ("complex-list", [1 + 1j, 1, 1], TE, r"weights must be a 1-D sequence of real numbers"),
    ("bool-array", np.ones(K, bool), TE, r"weights must be real numbers; got dtype bool"),
    ("string-list", ["a", "b", "c"], TE, r"weights must be a 1-D sequence of real numbers"),
    ("string-array", np.array(["1", "2", "3"]), TE, r"weights must be real numbers"),
    ("string", "abc", TE, r"weights must be a 1-D sequence of real numbers"),
    # Same data as "string-array" in a list: must not be parsed as numbers either.
    ("numeric-string-list", ["1", "2", "3"], TE, r"weights"),
]


@pytest.mark.parametrize("op", ["weighted_sum", "weighted_mean"])
@pytest.mark.parametrize("weights, exc, pattern", [case[1:] for case in BAD_WEIGHTS],
                         ids=[case[0] for case in BAD_WEIGHTS])
def test_bad_weights(op, weights, exc, pattern, guarded):
    with expect(exc, pattern):
        run(op, good(), guarded, weights=weights)


# --------------------------------------------------------------------------- out= and dtype=
BAD_OUT = [
    ("wrong-length", lambda n: np.empty(n + 1, F32), VE, r"out has shape \(\d+,\); expected \(\d+,\)"),
    ("2-D", lambda n: np.empty((1, n), F32), VE, r"out has shape \(1, \d+\)"),
    ("int32", lambda n: np.empty(n, np.int32), TE, r"out has dtype int32"),
    ("float16", lambda n: np.empty(n, np.float16), TE, r"out has dtype float16"),
    ("big-endian", lambda n: np.empty(n, ">f8"), TE, r"out has dtype >f8"),
    ("strided", lambda n: np.empty(2 * n, F32)[::2], VE, r"out is not C-contiguous"),
    ("read-only", lambda n: read_only(np.empty(n, F32)), VE, r"out is read-only"),
    ("list", lambda n: [0.0] * n, TE, r"out must be a numpy array; got list"),
]
RESULT_LENGTH = {"weighted_sum": D, "weighted_mean": D, "l2_norms": K}


@pytest.mark.parametrize("op", list(RESULT_LENGTH))
@pytest.mark.parametrize("make, exc, pattern", [case[1:] for case in BAD_OUT], ids=[case[0] for case in BAD_OUT])
def test_bad_out(op, make, exc, pattern, guarded):
    with expect(exc, pattern):
        run(op, good(), guarded, out=make(RESULT_LENGTH[op]))


@pytest.mark.parametrize("op", list(RESULT_LENGTH))
@pytest.mark.parametrize("out_dtype, dtype", [(F32, F64), (F64, F32)])
def test_dtype_conflicting_with_out(op, out_dtype, dtype, guarded):
    out = np.empty(RESULT_LENGTH[op], out_dtype)
    with expect(TE, rf"out has dtype {np.dtype(out_dtype).name} but dtype={np.dtype(dtype).name} was asked for"):
        run(op, good(), guarded, out=out, dtype=dtype)


@pytest.mark.parametrize("op", list(RESULT_LENGTH))
@pytest.mark.parametrize("dtype, exc, pattern", [
    (np.int32, TE, r"dtype has dtype int32"),
    (np.float16, TE, r"dtype has dtype float16"),
    (np.complex128, TE, r"dtype has dtype complex128"),
    ("not-a-dtype", TE, r"dtype must be a numpy dtype; got 'not-a-dtype'"),
], ids=["int32", "float16", "complex128", "not-a-dtype"])
def test_bad_dtype(op, dtype, exc, pattern, guarded):
    with expect(exc, pattern):
        run(op, good(), guarded, dtype=dtype)


# --------------------------------------------------------------------------- clip_by_norm
@pytest.mark.parametrize("max_norm, exc, pattern", [
    (0, VE, r"max_norm must be > 0\.0; got 0\.0"),
    (-1.5, VE, r"max_norm must be > 0\.0; got -1\.5"),
    (np.nan, VE, r"max_norm must be finite"),
    (np.inf, VE, r"max_norm must be finite"),
    (-np.inf, VE, r"max_norm must be finite"),
    ("1.0", TE, r"max_norm must be a real number; got str"),
    (None, TE, r"max_norm must be a real number; got NoneType"),
    (True, TE, r"max_norm must be a real number; got bool"),
    (1 + 0j, TE, r"max_norm must be a real number; got complex"),
    (np.ones(1), TE, r"max_norm must be a real number; got ndarray"),
])
def test_clip_bad_max_norm(max_norm, exc, pattern, guarded):
    with expect(exc, pattern):
        fedkern.clip_by_norm(good(), max_norm, backend=guarded)


BAD_CLIP_OUT = [
    ("wider-matrix", lambda: np.empty((K, D + 1), F32), VE, r"out holds 3 x 6 values; expected 3 x 5"),
    ("fewer-rows", lambda: rows(D, D), VE, r"out holds 2 x 5 values; expected 3 x 5"),
    ("ragged-rows", lambda: rows(D, D, D - 1), VE, r"out\[2\] has length 4"),
    ("float64", lambda: np.empty((K, D), F64), TE, r"out has dtype float64; expected float32"),
    ("int32", lambda: np.empty((K, D), np.int32), TE, r"out has dtype int32"),
    ("read-only-matrix", lambda: read_only(np.empty((K, D), F32)), VE, r"out\[0\] is read-only"),
    ("read-only-row", lambda: [np.empty(D, F32), read_only(np.empty(D, F32)), np.empty(D, F32)], VE,
     r"out\[1\] is read-only"),
    ("strided-matrix", lambda: np.empty((K, 2 * D), F32)[:, ::2], VE, r"out is not C-contiguous"),
    ("1-D", lambda: np.empty(K * D, F32), VE, r"out must be a 2-D"),
    ("int", lambda: 5, TE, r"out must be a 2-D .*; got int"),
]


@pytest.mark.parametrize("make, exc, pattern", [case[1:] for case in BAD_CLIP_OUT],
                         ids=[case[0] for case in BAD_CLIP_OUT])
def test_clip_bad_out(make, exc, pattern, guarded):
    with expect(exc, pattern):
        fedkern.clip_by_norm(good(), 1.0, out=make(), backend=guarded)


# --------------------------------------------------------------------------- accumulate
def zeros(n=D, dtype=F64):
    return np.zeros(n, dtype)


BAD_ACCUMULATE = [
    ("acc-read-only", lambda: (read_only(zeros()), rows(D)[0], 1.0), VE, r"acc is read-only"),
    ("length-mismatch", lambda: (zeros(), rows(D + 1)[0], 1.0), VE, r"update has length 6; expected 5"),
    ("acc-2-D", lambda: (np.zeros((1, D)), rows(D)[0], 1.0), VE, r"acc must be 1-D; got shape \(1, 5\)"),
    ("acc-empty", lambda: (zeros(0), rows(0)[0], 1.0), VE, r"acc is empty"),
    ("acc-int64", lambda: (zeros(dtype=np.int64), rows(D)[0], 1.0), TE, r"acc has dtype int64"),
    ("acc-float16", lambda: (zeros(dtype=np.float16), rows(D)[0], 1.0), TE, r"acc has dtype float16"),
    ("acc-list", lambda: ([0.0] * D, rows(D)[0], 1.0), TE, r"acc must be a numpy array; got list"),
    ("acc-strided", lambda: (zeros(2 * D)[::2], rows(D)[0], 1.0), VE, r"acc is not C-contiguous"),
    ("update-int", lambda: (zeros(), np.ones(D, np.int64), 1.0), TE, r"update has dtype int64"),
    ("update-2-D", lambda: (zeros(), np.ones((1, D), F32), 1.0), VE, r"update must be 1-D"),
    ("update-strided", lambda: (zeros(), rows(2 * D)[0][::2], 1.0), VE, r"update is not C-contiguous"),
    ("weight-negative", lambda: (zeros(), rows(D)[0], -1.0), VE, r"weight must be >= 0\.0; got -1\.0"),
    ("weight-nan", lambda: (zeros(), rows(D)[0], np.nan), VE, r"weight must be finite; got nan"),
    ("weight-inf", lambda: (zeros(), rows(D)[0], np.inf), VE, r"weight must be finite; got inf"),
    ("weight-str", lambda: (zeros(), rows(D)[0], "2"), TE, r"weight must be a real number; got str"),
    ("weight-bool", lambda: (zeros(), rows(D)[0], True), TE, r"weight must be a real number; got bool"),
]


@pytest.mark.parametrize("make, exc, pattern", [case[1:] for case in BAD_ACCUMULATE],
                         ids=[case[0] for case in BAD_ACCUMULATE])
def test_bad_accumulate(make, exc, pattern, guarded):
    acc, update, weight = make()
    before = np.array(acc, copy=True)
    with expect(exc, pattern):
        fedkern.accumulate(acc, update, weight, backend=guarded)
    np.testing.assert_array_equal(acc, before)


# --------------------------------------------------------------------------- fuzz
FUZZ_DTYPES = [bool, np.int8, np.int64, np.uint8, np.float16, np.float32, np.float64, np.complex64, object, ">f8"]
VALID_DTYPES = [np.float32, np.float64] * 4  # weighting, so that some draws are valid and get checked


@st.composite
def arbitrary_updates(draw):
    ndim = draw(st.sampled_from([2, 0, 1, 2, 3, 2]))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 0, 4]), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(VALID_DTYPES + FUZZ_DTYPES)))
    layout = draw(st.sampled_from(["c", "c", "list", "list", "strided", "reversed", "fortran"]))
    fill = draw(st.sampled_from(["normal", "normal", "huge", "nan", "inf"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base_shape = shape[:-1] + (2 * shape[-1],) if layout == "strided" and shape else shape
    values = rng.standard_normal(base_shape) * (1e30 if fill == "huge" else 1.0)
    if fill in ("nan", "inf") and values.size:
        values.flat[rng.integers(values.size)] = np.nan if fill == "nan" else np.inf
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        array = values.astype(dtype)
    if shape and layout == "strided":
        array = array[..., ::2]
    elif shape and layout == "reversed":
        array = array[::-1]
    elif layout == "fortran":
        array = np.asfortranarray(array)
    return list(array) if layout == "list" and shape else array


@given(updates=arbitrary_updates(), op=st.sampled_from(["weighted_mean", "l2_norms"]))
def test_fuzzed_updates_return_or_raise_fedkern_errors(updates, op, any_backend):
    try:
        result = getattr(fedkern, op)(updates, backend=any_backend)
    except FedkernError:
        return
    matrix = np.asarray(updates)  # only reached for valid K x D float input
    assert matrix.ndim == 2 and matrix.dtype in (np.float32, np.float64) and matrix.dtype.isnative
    k, d = matrix.shape
    assert result.shape == ((d,) if op == "weighted_mean" else (k,)) and result.dtype == matrix.dtype
    wide = matrix.astype(np.float64)
    expected = wide.mean(axis=0) if op == "weighted_mean" else np.sqrt((wide * wide).sum(axis=1))
    tol = 1e-6 if matrix.dtype == np.float32 else 1e-13  # atol: cancellation in the mean
    np.testing.assert_allclose(result, expected, rtol=tol, atol=tol * np.abs(wide).max())
