"""Aggregation ops: every fast backend against the reference, the reference against
independent oracles, exact small examples, dtypes and ``out=``, thread-count
independence, no input mutation, and non-finite detection."""
import warnings
from fractions import Fraction
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fedkern
from helpers import assert_close_float64_sum

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# ---------------------------------------------------------------------------------------
# Inputs: hypothesis draws sizes, a seed and the kinds of rows/weights; numpy builds them.
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    k: int
    d: int
    seed: int
    layout: str   # "matrix": one (K, D) array; "list": K separate 1-D arrays
    rows: str     # "random", "duplicate" (tied rows), "zero" (zero rows), "ties" (rounded values)
    weights: str  # "float", "int" (Python ints), "int64" (np.int64 array), "huge", "tiny", "huge+tiny", "some zero"


# D: small (K > D is common), and sizes around and beyond CHUNK=2048 / NORM_BLOCK=8192.
SIZES = st.one_of(st.integers(1, 24), st.sampled_from([7, 2047, 2048, 2049, 4099, 8191, 8192, 8193, 16387, 20011]))
CASES = st.builds(
    Case,
    k=st.integers(1, 12),
    d=SIZES,
    seed=st.integers(0, 2**32 - 1),
    layout=st.sampled_from(["matrix", "list"]),
    rows=st.sampled_from(["random", "duplicate", "zero", "ties"]),
    weights=st.sampled_from(["float", "int", "int64", "huge", "tiny", "huge+tiny", "some zero"]),
)
EDGE_CASES = [
    Case(1, 1, 0, "matrix", "random", "float"),        # K = 1, D = 1
    Case(1, 1, 1, "list", "random", "int"),
    Case(12, 3, 2, "list", "duplicate", "huge"),       # K > D
    Case(2, 20011, 3, "list", "zero", "tiny"),         # D >> K, several chunks and norm blocks
    Case(5, 8193, 4, "matrix", "ties", "int64"),
    Case(4, 2049, 5, "matrix", "random", "huge+tiny"),
]


def property_test(test):
    """``@given(case=CASES)`` plus the edge cases as explicit examples."""
    test = given(case=CASES)(test)
    for case in EDGE_CASES:
        test = example(case=case)(test)
    return test


def make_matrix(case, dtype):
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.k, case.d)) * 10.0 ** rng.uniform(-3, 3, (case.k, 1))
    if case.rows == "duplicate":
        x[1::2] = x[0]
    elif case.rows == "zero":
        x[::2] = 0.0
    elif case.rows == "ties":
        x = np.round(x)
    return x.astype(dtype)


def as_layout(matrix, layout):
    """The same updates as a (K, D) array or as K separately allocated rows."""
    return matrix.copy() if layout == "matrix" else [row.copy() for row in matrix]


def make_updates(case, dtype):
    return as_layout(make_matrix(case, dtype), case.layout)


def make_weights(case, dtype):
    rng = np.random.default_rng(case.seed + 1)
    huge = 1e30 if dtype == F64 else 1e18
    w = rng.uniform(0.5, 2.0, case.k)
    kind = case.weights
    if kind == "int":
        w = [int(v) for v in rng.integers(0, 100, case.k)]
        w[0] += 1
        return w
    if kind == "int64":
        w = rng.integers(0, 100, case.k)
        w[-1] += 1
        return w
    if kind == "huge":
        return w * huge
    if kind == "tiny":
        return w * 1e-30
    if kind == "huge+tiny":
        return w * np.where(np.arange(case.k) % 2 == 0, huge, 1e-30)
    if kind == "some zero":
        w[1::2] = 0.0
    return w


def stack64(updates):
    return np.array([np.asarray(row, np.float64) for row in updates])


def sum_scale(updates, weights):
    """Per coordinate, the sum of |w_i x_ij|: the magnitude a weighted sum's error scales with."""
    return np.abs(np.asarray(weights, np.float64)) @ np.abs(stack64(updates))


def mean_weights(updates, weights):
    w = np.ones(len(updates)) if weights is None else np.asarray(weights, np.float64)
    return w / w.sum()


def assert_rows_equal(actual_rows, expected_rows):
    assert len(actual_rows) == len(expected_rows)
    for a, e in zip(actual_rows, expected_rows):
        assert np.array_equal(a, e)


# ---------------------------------------------------------------------------------------
# Fast backends against the reference
# ---------------------------------------------------------------------------------------

@property_test
def test_weighted_sum_matches_reference(fast_backend, dtype, case):
    updates, weights = make_updates(case, dtype), make_weights(case, dtype)
    result = fedkern.weighted_sum(updates, weights, backend=fast_backend)
    expected = fedkern.weighted_sum(updates, weights, backend="reference")
    assert result.dtype == expected.dtype == dtype
    assert_close_float64_sum(result, expected, sum_scale(updates, weights), dtype)


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
@property_test
def test_weighted_mean_matches_reference(fast_backend, dtype, weighted, case):
    updates = make_updates(case, dtype)
    weights = make_weights(case, dtype) if weighted else None
    result = fedkern.weighted_mean(updates, weights, backend=fast_backend)
    expected = fedkern.weighted_mean(updates, weights, backend="reference")
    assert result.dtype == expected.dtype == dtype
    assert_close_float64_sum(result, expected, sum_scale(updates, mean_weights(updates, weights)), dtype)


@property_test
def test_accumulate_matches_reference(fast_backend, dtype, case):
    updates, weights = make_updates(case, dtype), make_weights(case, dtype)
    start = np.random.default_rng(case.seed + 2).standard_normal(case.d).astype(dtype)
    results = {}
    for backend in (fast_backend, "reference"):
        acc = start.copy()
        for row, weight in zip(updates, weights):
            assert fedkern.accumulate(acc, row, weight, backend=backend) is acc
        results[backend] = acc
    assert_close_float64_sum(results[fast_backend], results["reference"],
                 np.abs(start) + sum_scale(updates, weights), dtype)


@property_test
def test_l2_norms_match_reference(fast_backend, dtype, case):
    updates = make_updates(case, dtype)
    result = fedkern.l2_norms(updates, backend=fast_backend)
    expected = fedkern.l2_norms(updates, backend="reference")
    assert result.dtype == expected.dtype == dtype
    assert_close_float64_sum(result, expected, 0.0, dtype)


def clip_threshold(updates, seed):
    """A max_norm between some of the rows' norms, so some rows are clipped and some not."""
    norms = np.linalg.norm(stack64(updates), axis=1)
    factor = np.random.default_rng(seed + 3).uniform(0.1, 2.0)
    return float(np.median(norms) * factor) or 1.0


@pytest.mark.parametrize("mode", ["new", "return_norms", "in_place"])
@property_test
def test_clip_by_norm_matches_reference(fast_backend, dtype, mode, case):
    updates = make_updates(case, dtype)
    max_norm = clip_threshold(updates, case.seed)
    expected, expected_norms = fedkern.clip_by_norm(updates, max_norm, return_norms=True, backend="reference")
    if mode == "in_place":
        result = fedkern.clip_by_norm(updates, max_norm, out=updates, backend=fast_backend)
        assert result is updates
    elif mode == "return_norms":
        result, norms = fedkern.clip_by_norm(updates, max_norm, return_norms=True, backend=fast_backend)
        assert norms.dtype == F64
        assert_close_float64_sum(norms, expected_norms, 0.0, F64)
    else:
        result = fedkern.clip_by_norm(updates, max_norm, backend=fast_backend)
    assert all(row.dtype == dtype for row in result)
    assert_close_float64_sum(stack64(result), expected, np.abs(expected), dtype)


# ---------------------------------------------------------------------------------------
# The reference against independent oracles
# ---------------------------------------------------------------------------------------

@property_test
def test_reference_weighted_sum_is_weights_times_matrix(dtype, case):
    updates, weights = make_updates(case, dtype), make_weights(case, dtype)
    oracle = np.asarray(weights, np.float64) @ stack64(updates)
    assert np.allclose(oracle, np.einsum("k,kd->d", np.asarray(weights, np.float64), stack64(updates)))
    result = fedkern.weighted_sum(updates, weights, backend="reference")
    assert_close_float64_sum(result, oracle, sum_scale(updates, weights), dtype)


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
@property_test
def test_reference_weighted_mean_is_np_average(dtype, weighted, case):
    updates = make_updates(case, dtype)
    weights = make_weights(case, dtype) if weighted else None
    oracle = np.average(stack64(updates), axis=0, weights=None if weights is None else np.asarray(weights, np.float64))
    result = fedkern.weighted_mean(updates, weights, backend="reference")
    assert_close_float64_sum(result, oracle, sum_scale(updates, mean_weights(updates, weights)), dtype)


@property_test
def test_reference_l2_norms_are_np_linalg_norm(dtype, case):
    updates = make_updates(case, dtype)
    oracle = [np.linalg.norm(np.asarray(row, np.float64)) for row in updates]
    assert_close_float64_sum(fedkern.l2_norms(updates, backend="reference"), oracle, 0.0, dtype)


@property_test
def test_reference_clip_by_norm_is_the_formula(dtype, case):
    updates = make_updates(case, dtype)
    max_norm = clip_threshold(updates, case.seed)
    result, norms = fedkern.clip_by_norm(updates, max_norm, return_norms=True, backend="reference")
    for row, clipped, norm in zip(updates, result, norms):
        row64 = np.asarray(row, np.float64)
        true_norm = np.linalg.norm(row64)
        assert_close_float64_sum(norm, true_norm, 0.0, F64)
        expected = row64 * (max_norm / true_norm) if true_norm > max_norm else row64
        assert_close_float64_sum(clipped, expected, np.abs(expected), dtype)
        clipped_norm = np.linalg.norm(np.asarray(clipped, np.float64))
        assert clipped_norm <= max_norm * (1 + 1e-6)
        if true_norm < max_norm * (1 - 1e-12):
            assert np.array_equal(clipped, row)  # within the bound: untouched, bit for bit
        elif true_norm > max_norm * (1 + 1e-12):
            assert clipped_norm == pytest.approx(max_norm, rel=1e-6)


@property_test
def test_accumulate_is_weighted_sum_in_arrival_order(any_backend, dtype, case):
    """Into a float64 accumulator, the same float64 operations in the same order: bit-exact."""
    updates, weights = make_updates(case, dtype), make_weights(case, dtype)
    acc = np.zeros(case.d)
    for row, weight in zip(updates, weights):
        fedkern.accumulate(acc, row, weight, backend=any_backend)
    assert np.array_equal(acc, fedkern.weighted_sum(updates, weights, dtype=F64, backend=any_backend))


@property_test
def test_accumulator_sum_and_mean_match_weighted_sum_and_mean(any_backend, dtype, case):
    updates, weights = make_updates(case, dtype), make_weights(case, dtype)
    acc = fedkern.Accumulator(case.d, dtype=dtype, backend=any_backend)
    for row, weight in zip(updates, weights):
        acc.add(row, weight)
    assert acc.count == case.k
    assert acc.total_weight == pytest.approx(float(np.sum(np.asarray(weights, np.float64))), rel=1e-12)
    # Documented: the sum is exactly the one weighted_sum computes.
    assert np.array_equal(acc.sum(), fedkern.weighted_sum(updates, weights, backend=any_backend))
    # Both divide the same float64 sum once, but by totals summed in different orders (a
    # running total here, numpy's pairwise sum there): equal to an ulp, not bit for bit.
    mean = acc.mean()
    assert mean.dtype == dtype
    expected = fedkern.weighted_mean(updates, weights, backend=any_backend)
    assert_close_float64_sum(mean, expected, sum_scale(updates, mean_weights(updates, weights)), dtype)


# ---------------------------------------------------------------------------------------
# Small examples with exact answers (every backend)
# ---------------------------------------------------------------------------------------

@given(k=st.integers(1, 40), d=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_weighted_mean_divides_the_exact_sum_once(any_backend, dtype, k, d, seed):
    """Integer updates and weights small enough that every float64 product and partial sum
    is exact: the result must be the correctly rounded quotient sum / total, rounded once
    more into the output dtype. Multiplying by pre-normalised weights w_i / W rounds every
    term and fails this (e.g. the mean of two 7s weighted 1 and 2 came out 6.999999999999999)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**20), 2**20, size=(k, d)).astype(dtype)
    w = rng.integers(0, 1000, size=k)
    w[rng.integers(k)] += 1  # not all zero
    total = int(w.sum())
    exact = [float(Fraction(int(w @ x[:, j].astype(np.int64)), total)) for j in range(d)]
    result = fedkern.weighted_mean(list(x), w, backend=any_backend)
    np.testing.assert_array_equal(result, np.array(exact).astype(dtype))
    same = np.full((k, d), 7.0, dtype)
    np.testing.assert_array_equal(fedkern.weighted_mean(same, w, backend=any_backend), same[0])


@pytest.mark.parametrize("total", [1, 2, 64, 1024, 3, 1000])
def test_weighted_mean_by_a_power_of_two_total_is_the_same_division(any_backend, dtype, total):
    """Kernels multiply by the reciprocal of a power-of-two total (exact, and cheaper than
    dividing) and divide by any other: both must equal the correctly rounded quotient."""
    rng = np.random.default_rng(total)
    x = rng.integers(-(2**20), 2**20, size=(3, 4099)).astype(dtype)
    w = np.array([total - 2 * (total // 3), total // 3, total // 3]) if total >= 3 else np.array([total, 0, 0])
    exact = [float(Fraction(int(w @ x[:, j].astype(np.int64)), total)) for j in range(x.shape[1])]
    np.testing.assert_array_equal(fedkern.weighted_mean(x, w, backend=any_backend), np.array(exact).astype(dtype))

def test_exact_small_examples(any_backend, dtype):
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    kw = dict(backend=any_backend)
    assert fedkern.weighted_mean(x, [1, 3], **kw).tolist() == [2.5, 3.5]
    assert fedkern.weighted_mean(x, **kw).tolist() == [2.0, 3.0]
    assert fedkern.weighted_mean(list(x), np.array([0, 5]), **kw).tolist() == [3.0, 4.0]
    assert fedkern.weighted_sum(x, [2, 1], **kw).tolist() == [5.0, 8.0]
    assert fedkern.weighted_sum([np.ones(3, dtype), np.arange(3, dtype=dtype)], [1, 2], **kw).tolist() == [1.0, 3.0, 5.0]
    assert fedkern.l2_norms(np.array([[3, 4], [0, 0], [5, 12]], dtype), **kw).tolist() == [5.0, 0.0, 13.0]
    clipped = fedkern.clip_by_norm(np.array([[6, 8], [0.5, 0.25], [0, 0]], dtype), 5.0, **kw)
    assert clipped.tolist() == [[3.0, 4.0], [0.5, 0.25], [0.0, 0.0]]
    acc = np.array([1.0, 1.0, 1.0], dtype)
    assert fedkern.accumulate(acc, np.array([1, 2, 3], dtype), 2, **kw).tolist() == [3.0, 5.0, 7.0]
    streaming = fedkern.Accumulator(4, dtype=dtype, backend=any_backend)
    streaming.add(np.ones(4, dtype), 30)
    streaming.add(np.zeros(4, dtype), 10)
    assert streaming.mean().tolist() == [0.75] * 4
    assert streaming.sum().tolist() == [30.0] * 4
    assert (streaming.count, streaming.total_weight) == (2, 40.0)


# ---------------------------------------------------------------------------------------
# Result dtype and out=
# ---------------------------------------------------------------------------------------

def sample_updates(dtype, k=4, d=2051, seed=0, layout="matrix"):
    return as_layout(np.random.default_rng(seed).standard_normal((k, d)).astype(dtype), layout)


REDUCTIONS = {
    "weighted_sum": lambda updates, **kw: fedkern.weighted_sum(updates, np.arange(1.0, len(updates) + 1), **kw),
    "weighted_mean": lambda updates, **kw: fedkern.weighted_mean(updates, np.arange(1.0, len(updates) + 1), **kw),
    "l2_norms": lambda updates, **kw: fedkern.l2_norms(updates, **kw),
}


@pytest.mark.parametrize("op", list(REDUCTIONS))
@pytest.mark.parametrize("layout", ["matrix", "list"])
def test_result_dtype_follows_input_or_dtype_argument(any_backend, dtype, op, layout):
    updates = sample_updates(dtype, layout=layout)
    reduce = REDUCTIONS[op]
    assert reduce(updates, backend=any_backend).dtype == dtype
    other = F32 if dtype == F64 else F64
    result = reduce(updates, dtype=other, backend=any_backend)
    assert result.dtype == other
    exact = reduce(as_layout(stack64(updates), layout), backend="reference")  # float64 inputs hold the same values
    assert_close_float64_sum(result, exact, np.abs(exact) + 1.0, other)


@pytest.mark.parametrize("op", list(REDUCTIONS))
@pytest.mark.parametrize("out_dtype", [F32, F64], ids=["out32", "out64"])
def test_out_is_written_in_place_and_returned(any_backend, dtype, op, out_dtype):
    updates = sample_updates(dtype)
    reduce = REDUCTIONS[op]
    expected = reduce(updates, dtype=out_dtype, backend=any_backend)
    out = np.full(expected.shape, np.nan, out_dtype)
    assert reduce(updates, out=out, backend=any_backend) is out
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("layout", ["matrix", "list"])
def test_clip_by_norm_out_is_written_in_place_and_returned(any_backend, dtype, layout):
    updates = sample_updates(dtype)
    expected = fedkern.clip_by_norm(updates, 30.0, backend=any_backend)
    assert isinstance(expected, np.ndarray) and expected.dtype == dtype
    out = as_layout(np.full(updates.shape, np.nan, dtype), layout)
    assert fedkern.clip_by_norm(updates, 30.0, out=out, backend=any_backend) is out
    assert_rows_equal(out, expected)


def test_clip_by_norm_of_zero_rows_passes_them_silently(any_backend, dtype):
    updates = np.zeros((3, 10), dtype)
    updates[1] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "divide by zero" from computing max_norm / 0
        clipped = fedkern.clip_by_norm(updates, 0.5, backend=any_backend)
    assert np.array_equal(clipped[[0, 2]], updates[[0, 2]])
    assert np.linalg.norm(clipped[1]) == pytest.approx(0.5, rel=1e-6)


def test_accumulator_out_is_written_in_place_and_returned(any_backend, dtype):
    acc = fedkern.Accumulator(5, dtype=dtype, backend=any_backend)
    acc.add(np.arange(5, dtype=dtype), 2.0)
    for method in (acc.sum, acc.mean):
        out = np.empty(5, F64)
        assert method(out=out) is out
        assert np.array_equal(out, method().astype(F64))


@pytest.mark.parametrize("acc_dtype", [F32, F64], ids=["acc32", "acc64"])
def test_accumulate_mixed_dtypes_match_reference(any_backend, dtype, acc_dtype):
    update = sample_updates(dtype, k=1, d=5000)[0]
    start = np.random.default_rng(1).standard_normal(5000).astype(acc_dtype)
    acc, expected = start.copy(), start.astype(F64) + 0.3 * update.astype(F64)
    assert fedkern.accumulate(acc, update, 0.3, backend=any_backend) is acc
    assert acc.dtype == acc_dtype
    assert np.array_equal(acc, expected.astype(acc_dtype))  # one rounding of the float64 result


# ---------------------------------------------------------------------------------------
# Thread-count independence
# ---------------------------------------------------------------------------------------

def run_every_op(updates, max_norm, backend):
    weights = np.linspace(0.5, 3.0, len(updates))
    acc = np.linspace(-1.0, 1.0, updates.shape[1]).astype(updates.dtype)
    for row, weight in zip(updates, weights):
        fedkern.accumulate(acc, row, weight, backend=backend)
    clipped, norms = fedkern.clip_by_norm(updates, max_norm, return_norms=True, backend=backend)
    return {
        "weighted_sum": fedkern.weighted_sum(updates, weights, backend=backend),
        "weighted_sum_list": fedkern.weighted_sum(list(updates), weights, backend=backend),
        "l2_norms": fedkern.l2_norms(updates, backend=backend),
        "clip_by_norm": clipped,
        "clip_norms": norms,
        "accumulate": acc,
    }


def test_results_do_not_depend_on_thread_count(fast_backend, dtype):
    rng = np.random.default_rng(3)
    d = 50_001  # 25 chunks, 7 norm blocks per row
    updates = (rng.standard_normal((7, d)) * np.linspace(0.5, 1.5, 7)[:, None]).astype(dtype)
    max_norm = np.sqrt(d)  # rows 0-2 are within it, rows 4-6 get clipped
    results = {}
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        results[threads] = run_every_op(updates, max_norm, fast_backend)
    assert 0 < (results[1]["clip_norms"] > max_norm).sum() < 7
    for op, result in results[1].items():
        assert np.array_equal(result, results[2][op]), op


# ---------------------------------------------------------------------------------------
# Inputs are never mutated
# ---------------------------------------------------------------------------------------

OPS = {
    "weighted_sum": lambda updates, weights, backend: fedkern.weighted_sum(updates, weights, backend=backend),
    "weighted_mean": lambda updates, weights, backend: fedkern.weighted_mean(updates, weights, backend=backend),
    "weighted_mean_unweighted": lambda updates, weights, backend: fedkern.weighted_mean(updates, backend=backend),
    "l2_norms": lambda updates, weights, backend: fedkern.l2_norms(updates, backend=backend),
    "clip_by_norm": lambda updates, weights, backend: fedkern.clip_by_norm(updates, 10.0, return_norms=True, backend=backend),
    "accumulate": lambda updates, weights, backend: fedkern.accumulate(np.zeros(updates[0].shape[0]), updates[1], weights[1], backend=backend),
    "Accumulator.add": lambda updates, weights, backend: fedkern.Accumulator(updates[0].shape[0], backend=backend).add(updates[2], weights[2]),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("layout", ["matrix", "list"])
def test_inputs_are_not_mutated(any_backend, dtype, op, layout):
    updates = sample_updates(dtype, k=5, d=3001, layout=layout)
    weights = np.array([1.0, 2.0, 0.0, 3.5, 1.0])
    updates_before, weights_before = [row.copy() for row in updates], weights.copy()
    row_objects = list(updates)
    OPS[op](updates, weights, any_backend)
    assert_rows_equal(updates, updates_before)
    assert np.array_equal(weights, weights_before)
    if layout == "list":
        assert len(updates) == len(row_objects) and all(a is b for a, b in zip(updates, row_objects))


# ---------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------

# (K, D, layout, bad (client, position) pairs); the error names the first bad client and
# its first bad position. Positions lie in later chunks / norm blocks too.
NONFINITE_CASES = [
    (1, 1, "matrix", [(0, 0)]),
    (3, 5000, "list", [(2, 4500)]),
    (4, 20000, "matrix", [(1, 16390), (1, 19999), (3, 0)]),
    (5, 3000, "list", [(3, 2999), (4, 10)]),
]
NONFINITE = pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
CASE_IDS = ["K1D1", "chunk2", "block3", "last"]

FAILING_OPS = {
    "weighted_sum": lambda updates, **kw: fedkern.weighted_sum(updates, np.ones(len(updates)), **kw),
    "weighted_mean": lambda updates, **kw: fedkern.weighted_mean(updates, [2] * len(updates), **kw),
    "l2_norms": lambda updates, **kw: fedkern.l2_norms(updates, **kw),
    "clip_by_norm": lambda updates, **kw: fedkern.clip_by_norm(updates, 1.0, **kw),
}


def poisoned_updates(dtype, k, d, layout, bad, value):
    matrix = np.random.default_rng(7).standard_normal((k, d)).astype(dtype)
    for i, j in bad:
        matrix[i, j] = value
    return as_layout(matrix, layout)


@pytest.mark.parametrize("op", list(FAILING_OPS))
@pytest.mark.parametrize("k, d, layout, bad", NONFINITE_CASES, ids=CASE_IDS)
@NONFINITE
def test_nonfinite_update_raises_naming_client_and_position(any_backend, dtype, op, k, d, layout, bad, value):
    updates = poisoned_updates(dtype, k, d, layout, bad, value)
    with pytest.raises(fedkern.NonFiniteError) as info:
        FAILING_OPS[op](updates, backend=any_backend)
    assert (info.value.client, info.value.position) == min(bad)


@pytest.mark.parametrize("k, d, layout, bad", NONFINITE_CASES, ids=CASE_IDS)
@NONFINITE
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * (max_norm / inf)
def test_check_finite_false_returns_the_nonfinite_result(any_backend, dtype, k, d, layout, bad, value):
    updates = poisoned_updates(dtype, k, d, layout, bad, value)
    i, j = min(bad)
    kw = dict(check_finite=False, backend=any_backend)
    assert not np.isfinite(FAILING_OPS["weighted_sum"](updates, **kw)[j])
    assert not np.isfinite(FAILING_OPS["weighted_mean"](updates, **kw)[j])
    assert not np.isfinite(FAILING_OPS["l2_norms"](updates, **kw)[i])
    clipped, norms = fedkern.clip_by_norm(updates, 1.0, return_norms=True, **kw)
    assert not np.isfinite(norms[i]) and not np.isfinite(clipped[i][j])
    finite_rows = [r for r in range(k) if r not in {c for c, _ in bad}]
    assert np.isfinite(norms[finite_rows]).all()


@NONFINITE
def test_accumulate_rejects_nonfinite_update_and_leaves_acc_unchanged(any_backend, dtype, value):
    acc = np.linspace(-1.0, 1.0, 5000).astype(dtype)
    before = acc.copy()
    update = np.ones(5000, dtype)
    update[4321] = value
    with pytest.raises(fedkern.NonFiniteError) as info:
        fedkern.accumulate(acc, update, 2.0, backend=any_backend)
    assert info.value.position == 4321
    assert np.array_equal(acc, before)
    fedkern.accumulate(acc, update, 2.0, check_finite=False, backend=any_backend)
    assert not np.isfinite(acc[4321])


@NONFINITE
def test_accumulator_rejects_nonfinite_update_and_stays_unchanged(any_backend, dtype, value):
    acc = fedkern.Accumulator(5000, dtype=dtype, backend=any_backend)
    acc.add(np.full(5000, 1.0, dtype), 3)
    acc.add(np.full(5000, 2.0, dtype), 1)
    sum_before, mean_before = acc.sum(), acc.mean()
    bad = np.zeros(5000, dtype)
    bad[17] = value
    with pytest.raises(fedkern.NonFiniteError) as info:
        acc.add(bad, 5)
    assert info.value.position == 17
    assert (acc.count, acc.total_weight) == (2, 4.0)
    assert np.array_equal(acc.sum(), sum_before) and np.array_equal(acc.mean(), mean_before)
    acc.add(np.zeros(5000, dtype), 4)  # still usable
    assert np.array_equal(acc.mean(), np.full(5000, 0.625, dtype))


OVERFLOWS = [  # finite inputs whose result does not fit its dtype
    ("float32 sum", lambda b: fedkern.weighted_sum(np.full((2, 3), 3e38, F32), [1, 1], backend=b), 0),
    ("float32 sum, one coordinate", lambda b: fedkern.weighted_sum(np.array([[1.0, 3e38], [2.0, 3e38]], F32), [1, 1], backend=b), 1),
    ("float64 sum", lambda b: fedkern.weighted_sum(np.full((2, 3), 1e308), [1, 1], backend=b), 0),
    ("float64 rows, dtype=float32", lambda b: fedkern.weighted_sum(np.full((1, 3), 1e39), [1], dtype=F32, backend=b), 0),
    ("float64 sum, list input", lambda b: fedkern.weighted_sum([np.full(3, 1e308)] * 2, np.array([1, 1]), backend=b), 0),
]


@pytest.mark.parametrize("compute, position", [case[1:] for case in OVERFLOWS], ids=[case[0] for case in OVERFLOWS])
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_result_overflow_raises_without_naming_a_client(any_backend, compute, position):
    with pytest.raises(fedkern.NonFiniteError) as info:
        compute(any_backend)
    assert info.value.client is None
    assert info.value.position == position


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_l2_norms_float32_overflow_raises(any_backend):
    """Every input is finite but the float32 norm (4.2e38) overflows: like weighted_sum,
    check_finite must raise NonFiniteError(client=None) rather than return inf."""
    updates = np.full((2, 2), 3e38, F32)
    updates[1] = 1.0
    with pytest.raises(fedkern.NonFiniteError) as info:
        fedkern.l2_norms(updates, backend=any_backend)
    assert info.value.client is None
    assert np.isinf(fedkern.l2_norms(updates, check_finite=False, backend=any_backend)[0])
