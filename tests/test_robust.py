"""Robust aggregation: every backend against the reference, the reference against
independent oracles (numpy, scipy, brute force written plainly here), bad input, and
robustness under attack."""

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, strategies as st

import fedkern
from fedkern import _blocks
from helpers import assert_close_dtype_rtol

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# --------------------------------------------------------------------------- data
@st.composite
def robust_updates(draw, min_k=1, max_k=12, nonfinite=True):
    """(updates as a matrix or a list of rows, dtype); ties, huge spreads and non-finite values."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 70]))
    dtype = draw(st.sampled_from([F32, F64]))
    kind = draw(st.sampled_from(["normal", "ties", "offset", "nonfinite"] if nonfinite else ["normal", "ties", "offset"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "ties":
        values = rng.integers(-2, 3, (k, d)).astype(float)
    elif kind == "offset":  # a model far from the origin: the plain Gram form cancels badly here
        values = 1000.0 + rng.standard_normal((k, d))
    else:
        values = rng.standard_normal((k, d)) * 10.0 ** rng.integers(-3, 4)
    if kind == "nonfinite":
        for _ in range(draw(st.integers(1, 3))):
            values[rng.integers(k), rng.integers(d)] = rng.choice([np.nan, np.inf, -np.inf])
    matrix = values.astype(dtype)
    return (list(matrix.copy()) if draw(st.booleans()) else matrix), dtype


def stacked(updates):
    return np.array([np.asarray(row, np.float64) for row in updates])


def spread_sq(updates):
    """Squared diameter of the bounding box of the finite updates: the scale of a distance."""
    x = stacked(updates)
    x = x[np.isfinite(x).all(axis=1)]
    return float(np.sum(np.ptp(x, axis=0) ** 2)) if len(x) else 0.0


def scale_of(updates):
    x = np.abs(stacked(updates))
    return float(x[np.isfinite(x)].max(initial=1.0))


def exact_sq_distances(updates):
    x = stacked(updates)
    with np.errstate(invalid="ignore", over="ignore"):
        return ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)


def gram_error_bound(updates, dtype):
    """A bound on |gram - exact| for every pair of finite updates, whatever BLAS does.

    The Gram method centres the updates on a finite one, x_c, rounds y_i = x_i - x_c to the
    updates' dtype (relative error u), and sums y_i.y_j over tiles of at most d coordinates
    with BLAS, adding the tiles in float64. A dot product of d terms in any order, blocking
    or FMA use is within gamma_d sum |y_ik y_jk| <= gamma_d (|y_i|^2 + |y_j|^2) / 2 of the
    exact one, so sq_i + sq_j - 2 g_ij is within 2 gamma_d (|y_i|^2 + |y_j|^2) of the
    rounded updates' distance, which is within u (t + 2 |y_i|^2 + 2 |y_j|^2) of t. And
    |y_i|^2 <= spread_sq (x_i and x_c lie in the finite updates' bounding box). Doubled for
    second-order terms and float64's own roundings.
    """
    x = stacked(updates)
    u = np.finfo(dtype).eps / 2
    d = x.shape[1]
    gamma_d = d * u / (1 - d * u)
    t = exact_sq_distances(updates)
    t[~np.isfinite(t)] = 0.0  # pairs with a non-finite update are +inf (the diagonal 0): not bounded here
    return 2 * ((2 * gamma_d + 2 * u) * 2 * spread_sq(updates) + u * t)


def nnm_cut_is_ambiguous(updates, f):
    """Whether rounding could change some update's K - f nearest neighbours.

    Distances are float64 sums whose order differs between backends (and this test), by
    less than 1e-12 relative; a cut is ambiguous if an update just inside and one just
    outside are that close and their rows differ (identical rows mix to the same mean).
    Integer updates have exact distances: an equal pair is a true tie, broken by index by
    every implementation.
    """
    x = stacked(updates)
    k = len(x)
    d = exact_sq_distances(updates)
    exact = bool(np.all(x == np.round(x)) and np.abs(x).max() < 2 ** 20)
    for i in range(k):
        order = sorted(range(k), key=lambda l: (d[i, l], l))
        width = 1e-12 * d[i].max()
        for a in order[:k - f]:
            for b in order[k - f:]:
                if abs(d[i, a] - d[i, b]) <= width and not (exact and d[i, a] == d[i, b]) \
                        and not np.array_equal(x[a], x[b]):
                    return True
    return False


# --------------------------------------------------------------------------- backends vs reference
@given(data=robust_updates())
def test_median_matches_reference(data, fast_backend):
    updates, dtype = data
    expected = fedkern.median(updates, check_finite=False, backend="reference")
    actual = fedkern.median(updates, check_finite=False, backend=fast_backend)
    assert actual.dtype == dtype
    assert_close_dtype_rtol(actual, expected, dtype, scale_of(updates))


@given(data=robust_updates(), beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.49]))
def test_trimmed_mean_matches_reference(data, beta, fast_backend):
    updates, dtype = data
    expected = fedkern.trimmed_mean(updates, beta, check_finite=False, backend="reference")
    assert_close_dtype_rtol(fedkern.trimmed_mean(updates, beta, check_finite=False, backend=fast_backend),
                 expected, dtype, scale_of(updates))


@given(data=robust_updates(), f=st.integers(0, 5))
def test_meamed_matches_reference(data, f, fast_backend):
    updates, dtype = data
    f = min(f, (len(updates) - 1) // 2)
    expected = fedkern.meamed(updates, f, check_finite=False, backend="reference")
    assert_close_dtype_rtol(fedkern.meamed(updates, f, check_finite=False, backend=fast_backend),
                 expected, dtype, scale_of(updates))


@given(data=robust_updates(), method=st.sampled_from(["gram", "exact"]))
def test_pairwise_sq_distances_match_reference(data, method, fast_backend):
    updates, dtype = data
    expected = fedkern.pairwise_sq_distances(updates, method, backend="reference")
    actual = fedkern.pairwise_sq_distances(updates, method, backend=fast_backend)
    np.testing.assert_array_equal(np.isinf(actual), np.isinf(expected))
    finite = np.isfinite(expected)
    if method == "exact":  # float64 sums of <= 70 positive terms: within 70 float64 eps of the truth
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-12, atol=1e-300)
    else:  # gram: BLAS, whose rounding is its own; each is within the bound of the truth
        bound = gram_error_bound(updates, dtype)
        assert (np.abs(actual - expected)[finite] <= 2 * bound[finite]).all()


@given(data=robust_updates(min_k=3, nonfinite=False), f=st.integers(0, 3), m=st.integers(1, 12))
def test_krum_matches_reference(data, f, m, fast_backend):
    updates, dtype = data
    f = min(f, (len(updates) - 3) // 2)
    m = min(m, len(updates) - f)
    kwargs = dict(method="exact", return_indices=True)
    _, ref_idx = fedkern.krum(updates, f, m, backend="reference", **kwargs)
    got, got_idx = fedkern.krum(updates, f, m, backend=fast_backend, **kwargs)
    scores = np.array(brute_krum_scores(stacked(updates), f))
    # the same scores are chosen (indices may differ only between clients with tied scores)
    np.testing.assert_allclose(np.sort(scores[got_idx]), np.sort(scores[ref_idx]), rtol=1e-9, atol=1e-300)
    assert_close_dtype_rtol(got, stacked(updates)[got_idx].mean(axis=0), dtype, scale_of(updates))


@given(data=robust_updates(min_k=3, max_k=12, nonfinite=False), f=st.integers(0, 2))
def test_bulyan_matches_reference(data, f, fast_backend):
    updates, dtype = data
    f = min(f, (len(updates) - 3) // 4)
    ref, ref_idx = fedkern.bulyan(updates, f, method="exact", return_indices=True, backend="reference")
    got, got_idx = fedkern.bulyan(updates, f, method="exact", return_indices=True, backend=fast_backend)
    if (got_idx == ref_idx).all():  # exact distances tie identically unless rounding differs
        assert_close_dtype_rtol(got, ref, dtype, scale_of(updates))


@given(data=robust_updates(nonfinite=False))
def test_geometric_median_matches_reference(data, fast_backend):
    updates, dtype = data
    # tol=0 runs to maxiter unless the objective stops changing, which rounding may make
    # happen an iteration earlier or later: results are compared, not iteration counts
    ref = fedkern.geometric_median(updates, maxiter=20, tol=0.0, backend="reference")
    got = fedkern.geometric_median(updates, maxiter=20, tol=0.0, backend=fast_backend)
    np.testing.assert_allclose(got, ref, rtol=1e-4 if dtype == F32 else 1e-8, atol=1e-6 * scale_of(updates))


@given(data=robust_updates(), tau=st.sampled_from([1e-3, 1.0, 1e3]), iterations=st.integers(1, 3))
def test_centered_clipping_matches_reference(data, tau, iterations, fast_backend):
    updates, dtype = data
    center = np.zeros(stacked(updates).shape[1], dtype)
    expected = fedkern.centered_clipping(updates, center, tau, iterations, check_finite=False, backend="reference")
    actual = fedkern.centered_clipping(updates, center, tau, iterations, check_finite=False, backend=fast_backend)
    np.testing.assert_allclose(actual, expected, rtol=1e-5 if dtype == F32 else 1e-10,
                               atol=1e-5 * scale_of(updates))


@given(data=robust_updates(nonfinite=False), f=st.integers(0, 4))
def test_preaggregators_match_reference(data, f, fast_backend):
    updates, dtype = data
    f = min(f, (len(updates) - 1) // 2)
    for op, args in ((fedkern.nearest_neighbor_mixing, dict(f=f, method="exact")),
                     (fedkern.adaptive_clipping, dict(f=f)),
                     (fedkern.bucketing, dict(s=2, seed=3))):
        if op is fedkern.nearest_neighbor_mixing and nnm_cut_is_ambiguous(updates, f):
            continue  # backends sum distances in different orders: a near tie may go either way
        expected = op(updates, backend="reference", **args)
        actual = op(updates, backend=fast_backend, **args)
        assert actual.dtype == dtype
        np.testing.assert_allclose(actual, expected, rtol=1e-5 if dtype == F32 else 1e-11,
                                   atol=1e-6 * scale_of(updates))


#: K on both sides of every bound where an order-statistic kernel changes algorithm: Numba's
#: pruned network up to SORT_ALL_MAX, its sample sizes (16 / 32 / 64 at 192, 640), the
#: sorting networks' NET_MAX_BYTES (1024 float64, 2048 float32 values), a slab of NET_LANES.
PATH_KS = sorted({1, 2, 3, 31, 32, 33, _blocks.SORT_ALL_MAX, _blocks.SORT_ALL_MAX + 1, 191, 192, 639, 640,
                  _blocks.NET_MAX_BYTES // 8, _blocks.NET_MAX_BYTES // 8 + 1,
                  _blocks.NET_MAX_BYTES // 4, _blocks.NET_MAX_BYTES // 4 + 1})


@pytest.mark.parametrize("k", PATH_KS)
@pytest.mark.parametrize("kind", ["normal", "ties", "nonfinite"])
def test_order_statistics_match_reference_on_every_path(k, kind, dtype, fast_backend):
    """D = 45 covers a partial slab; the window ends and the median's two middle values
    fall in every band and tier the sampled path uses."""
    rng = np.random.default_rng(k)
    values = rng.integers(-3, 4, (k, 45)).astype(float) if kind == "ties" else rng.standard_normal((k, 45))
    if kind == "nonfinite":
        values[rng.integers(k, size=4), rng.integers(45, size=4)] = [np.nan, np.inf, -np.inf, np.nan]
    updates = list(values.astype(dtype))
    kw = dict(check_finite=False)
    np.testing.assert_array_equal(fedkern.median(updates, backend=fast_backend, **kw),
                                  fedkern.median(updates, backend="reference", **kw))
    for beta in (0.1, 0.3):
        expected = fedkern.trimmed_mean(updates, beta, backend="reference", **kw)
        assert_close_dtype_rtol(fedkern.trimmed_mean(updates, beta, backend=fast_backend, **kw), expected,
                                dtype, scale_of(updates))
    if k >= 3:
        expected = fedkern.meamed(updates, k // 4, backend="reference", **kw)
        assert_close_dtype_rtol(fedkern.meamed(updates, k // 4, backend=fast_backend, **kw), expected, dtype,
                                scale_of(updates))


def test_results_do_not_depend_on_the_thread_count(fast_backend):
    rng = np.random.default_rng(5)
    updates = list(rng.standard_normal((9, 20_011)).astype(np.float32))
    results = []
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        results.append([fedkern.median(updates, backend=fast_backend),
                        fedkern.trimmed_mean(updates, f=2, backend=fast_backend),
                        fedkern.meamed(updates, 3, backend=fast_backend),
                        fedkern.pairwise_sq_distances(updates, "exact", backend=fast_backend),
                        fedkern.geometric_median(updates, backend=fast_backend)])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_inputs_are_not_mutated(any_backend):
    rng = np.random.default_rng(6)
    matrix = rng.standard_normal((11, 50))
    matrix[2, 3] = np.nan
    before = matrix.copy()
    for call in (lambda: fedkern.median(matrix, check_finite=False, backend=any_backend),
                 lambda: fedkern.trimmed_mean(matrix, 0.2, check_finite=False, backend=any_backend),
                 lambda: fedkern.meamed(matrix, 2, check_finite=False, backend=any_backend),
                 lambda: fedkern.krum(matrix, 2, backend=any_backend),
                 lambda: fedkern.bulyan(matrix, 2, backend=any_backend),
                 lambda: fedkern.geometric_median(matrix, backend=any_backend),
                 lambda: fedkern.nearest_neighbor_mixing(matrix, 2, backend=any_backend),
                 lambda: fedkern.adaptive_clipping(matrix, 2, backend=any_backend),
                 lambda: fedkern.bucketing(matrix, 3, backend=any_backend)):
        call()
        np.testing.assert_array_equal(matrix, before)


# --------------------------------------------------------------------------- reference vs oracles
@given(data=robust_updates(nonfinite=False))
def test_median_is_numpy_median(data, any_backend):
    updates, dtype = data
    assert_close_dtype_rtol(fedkern.median(updates, backend=any_backend), np.median(stacked(updates), axis=0),
                 dtype, scale_of(updates))


@given(data=robust_updates(nonfinite=False), beta=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_trimmed_mean_is_scipy_trim_mean(data, beta, any_backend):
    updates, dtype = data
    assert_close_dtype_rtol(fedkern.trimmed_mean(updates, beta, backend=any_backend),
                 scipy.stats.trim_mean(stacked(updates), beta, axis=0), dtype, scale_of(updates))


def test_trimmed_mean_f_counts_values():
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    np.testing.assert_array_equal(fedkern.trimmed_mean(x, f=1), [3.0])
    np.testing.assert_array_equal(fedkern.trimmed_mean(x, f=2), [3.0])
    np.testing.assert_array_equal(fedkern.trimmed_mean(x, f=0), [22.0])


def brute_meamed(x, f):
    """Per coordinate: sort, then grow a window from the median, lower value first on ties."""
    k, d = x.shape
    result = np.empty(d)
    for j in range(d):
        column = sorted(x[:, j])
        median = 0.5 * (column[(k - 1) // 2] + column[k // 2])
        a = b = k // 2
        for _ in range(k - f):
            if a > 0 and (b == k or median - column[a - 1] <= column[b] - median):
                a -= 1
            else:
                b += 1
        result[j] = sum(column[a:b]) / (k - f)
    return result


@given(data=robust_updates(nonfinite=False), f=st.integers(0, 5))
def test_meamed_is_the_mean_of_the_values_closest_to_the_median(data, f, any_backend):
    updates, dtype = data
    x = stacked(updates)
    f = min(f, (len(x) - 1) // 2)
    result = fedkern.meamed(updates, f, backend=any_backend)
    assert_close_dtype_rtol(result, brute_meamed(x, f), dtype, scale_of(updates))
    # and every kept value is at least as close to the median as every dropped one
    median = np.median(x, axis=0)
    kept_distance = np.sort(np.abs(x - median), axis=0)[len(x) - f - 1] if f else None
    if f:
        assert np.all(np.abs(result - median) <= kept_distance * (1 + 1e-6) + 1e-12)


def test_meamed_ties_take_the_lower_value():
    # median 1; 0 and 2 are equally close: the lower one is kept
    np.testing.assert_array_equal(fedkern.meamed(np.array([[0.0], [1.0], [2.0]]), 1), [0.5])


@given(data=robust_updates(nonfinite=False))
def test_pairwise_distances_are_exact(data, any_backend):
    updates, dtype = data
    x = stacked(updates)
    expected = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(fedkern.pairwise_sq_distances(updates, "exact", backend=any_backend), expected,
                               rtol=1e-13, atol=1e-300)
    gram = fedkern.pairwise_sq_distances(updates, "gram", backend=any_backend)
    assert (gram >= 0).all() and (np.diag(gram) == 0).all() and (gram == gram.T).all()
    assert (np.abs(gram - expected) <= gram_error_bound(updates, dtype)).all()


def test_gram_distances_are_accurate_far_from_the_origin(any_backend):
    """The plain float32 Gram form (Flower's Message API uses it) keeps no digit of these
    distances on any machine; centring on an update keeps them to 1e-3, provably.

    x = 100 + 1e-3 N(0, 1) over d = 256 coordinates: |x|^2 and 2 x.y are sums of 256
    positive terms exactly >= 2^21 with room to spare, and any evaluation of them (any
    order, blocking, FMA) is within gamma_256 < 2e-5 relative, so every float32 result is
    >= 2^21, a multiple of 2^-2, and so is each plain-form distance (rounding a multiple of
    2^-2 gives one), while the true distances are below 2^-3: each is off by at least its
    own size. The centred form is within gram_error_bound, under 1e-3 of a distance here.
    """
    rng = np.random.default_rng(7)
    k, d = 6, 256
    x = (100.0 + 1e-3 * rng.standard_normal((k, d))).astype(np.float32)
    truth = exact_sq_distances(x)
    off = ~np.eye(k, dtype=bool)
    exact = fedkern.pairwise_sq_distances(x, "exact", backend=any_backend)
    np.testing.assert_allclose(exact, truth, rtol=1e-13)
    gram = fedkern.pairwise_sq_distances(x, "gram", backend=any_backend)
    bound = gram_error_bound(x, F32)
    assert (np.abs(gram - truth) <= bound).all() and (bound[off] < 1e-3 * truth[off]).all()
    naive = np.einsum("kd,kd->k", x, x)[:, None] + np.einsum("kd,kd->k", x, x)[None, :] - 2 * (x @ x.T)
    e = int(np.floor(np.log2(d * float(x.min()) ** 2 * (1 - 2 * d * 2.0 ** -24))))
    quantum = 2.0 ** (e - 23)
    assert quantum == 0.25 and truth.max() < quantum / 2  # the construction's premise
    assert (np.fmod(naive.astype(np.float64), quantum) == 0).all()
    assert (np.abs(naive - truth)[off] >= truth[off]).all()  # every plain-form distance 100% off


def test_auto_method_is_exact_for_small_k_and_gram_above(any_backend):
    """Which method ran shows in the result, whatever BLAS does: half the updates are small
    integers and half are M + small integers, M = 2^40. Exact distances of integers below
    2^53 are exact. The Gram form centres on one update, so the other cluster's centred
    coordinates y are all >= M - 6 > M/2 in size and of one sign per coordinate: its |y|^2
    and y_i.y_j are float64 sums of positive terms >= 2^78 in any order and tiling, hence
    multiples of 2^26, and so is each distance within that cluster (rounding a multiple of
    2^26 gives one), while the true ones are below 2^12."""
    rng = np.random.default_rng(16)
    big = 2.0 ** 40
    for k, gram in ((fedkern.robust.EXACT_MAX_K, False), (fedkern.robust.EXACT_MAX_K + 1, True)):
        steps = rng.integers(-3, 4, (k, 64))
        far = np.arange(k) >= k // 2
        x = steps + np.where(far, big, 0.0)[:, None]
        truth = ((steps[:, None, :] - steps[None, :, :]) ** 2).sum(axis=2)  # within a cluster, exact
        within = (far[:, None] == far[None, :]) & ~np.eye(k, dtype=bool)
        assert (truth[within] > 0).all() and truth.max() < 2 ** 12
        auto = fedkern.pairwise_sq_distances(x, backend=any_backend)
        exact = fedkern.pairwise_sq_distances(x, "exact", backend=any_backend)
        np.testing.assert_array_equal(exact[within], truth[within])
        if not gram:
            np.testing.assert_array_equal(auto, exact)
        else:
            wrong = auto != truth
            assert wrong[within & far[:, None]].all() or wrong[within & ~far[:, None]].all()


def brute_krum_scores(x, f):
    k = len(x)
    scores = []
    for i in range(k):
        distances = sorted(float(np.sum((x[i] - x[l]) ** 2)) for l in range(k) if l != i)
        scores.append(sum(distances[:k - f - 2]))
    return scores


@given(data=robust_updates(min_k=3, nonfinite=False), f=st.integers(0, 4), m=st.integers(1, 12))
def test_krum_is_brute_force_krum(data, f, m, any_backend):
    updates, dtype = data
    x = stacked(updates)
    f = min(f, (len(x) - 3) // 2)
    m = min(m, len(x) - f)
    scores = brute_krum_scores(x, f)
    result, indices = fedkern.krum(updates, f, m, method="exact", return_indices=True, backend=any_backend)
    assert len(indices) == m
    chosen = sorted(scores[i] for i in indices)
    assert np.allclose(chosen, sorted(scores)[:m], rtol=1e-9, atol=1e-300)  # the m best (up to ties)
    assert_close_dtype_rtol(result, x[indices].mean(axis=0), dtype, scale_of(updates))


def test_krum_ties_go_to_the_lower_index_and_weights_apply():
    x = np.array([[1.0], [1.0], [1.0], [5.0], [9.0]])
    result, indices = fedkern.krum(x, 1, return_indices=True)
    assert indices.tolist() == [0]
    result, indices = fedkern.krum(x, 1, m=2, weights=[1, 3, 1, 1, 1], return_indices=True)
    assert indices.tolist() == [0, 1]
    np.testing.assert_array_equal(result, [1.0])
    x = np.array([[0.0], [4.0], [1.0], [50.0], [60.0]])
    np.testing.assert_allclose(fedkern.krum(x, 1, m=2, weights=[1, 1, 3, 1, 1]), [0.75])


def brute_bulyan(x, f):
    k = len(x)
    remaining, selected = list(range(k)), []
    for _ in range(k - 2 * f):
        n = len(remaining)
        neighbours = max(n - f - 2, 0)
        scores = []
        for i in remaining:
            distances = sorted(float(np.sum((x[i] - x[l]) ** 2)) for l in remaining if l != i)
            scores.append(sum(distances[:neighbours]))
        best = remaining[int(np.argmin(scores))]
        selected.append(best)
        remaining.remove(best)
    return brute_meamed(x[selected], 2 * f), selected


@given(data=robust_updates(min_k=3, max_k=15, nonfinite=False), f=st.integers(0, 3))
def test_bulyan_is_brute_force_bulyan(data, f, any_backend):
    updates, dtype = data
    x = stacked(updates)
    f = min(f, (len(x) - 3) // 4)
    expected, expected_selected = brute_bulyan(x, f)
    result, selected = fedkern.bulyan(updates, f, method="exact", return_indices=True, backend=any_backend)
    if selected.tolist() == expected_selected:  # equal unless rounding breaks a near-tie differently
        assert_close_dtype_rtol(result, expected, dtype, scale_of(updates))
    assert len(selected) == len(x) - 2 * f and len(set(selected.tolist())) == len(selected)


@given(data=robust_updates(min_k=3, nonfinite=False))
def test_geometric_median_satisfies_the_optimality_condition(data, any_backend):
    """At the minimiser of sum_i ||z - x_i||, the unit vectors towards the points sum to ~0
    (for a z that is not one of the points)."""
    updates, _ = data
    x = stacked(updates)
    z, info = fedkern.geometric_median(updates, dtype=np.float64, nu=1e-12, maxiter=5000, tol=1e-15,
                                       return_info=True, backend=any_backend)
    distances = np.linalg.norm(x - z, axis=1)
    scale = max(np.linalg.norm(x - x.mean(axis=0), axis=1).max(), 1e-300)
    if distances.min() > 1e-3 * scale:
        gradient = ((z - x) / distances[:, None]).sum(axis=0)
        assert np.linalg.norm(gradient) < 1e-3 * len(x), info
    # and it does at least as well as the mean and as every data point (up to Weiszfeld's
    # slow approach of a median that is itself a data point)
    objective = lambda p: np.linalg.norm(x - p, axis=1).sum()
    assert objective(z) <= min(objective(x.mean(axis=0)), min(objective(p) for p in x)) * (1 + 1e-6) + 1e-12


def test_geometric_median_info_and_weights():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z, info = fedkern.geometric_median(x, return_info=True)
    np.testing.assert_allclose(z, [0.5, 0.5])
    assert info["converged"] and info["iterations"] >= 1 and info["objective"] == pytest.approx(np.sqrt(0.5))
    # a dominant weight pulls the median onto that point
    np.testing.assert_allclose(fedkern.geometric_median(x, weights=[100, 1, 1, 1], nu=1e-12, maxiter=2000,
                                                        tol=1e-14), [0, 0], atol=1e-6)
    _, info = fedkern.geometric_median(np.random.default_rng(0).standard_normal((9, 5)), maxiter=1, tol=0.0,
                                       return_info=True)
    assert info == dict(iterations=1, converged=False, objective=info["objective"])


def brute_centered_clipping(x, v, tau, iterations):
    v = v.astype(np.float64)
    for _ in range(iterations):
        step = np.zeros_like(v)
        for row in x:
            norm = np.linalg.norm(row - v)
            step += (row - v) * (min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / len(x)
    return v


@given(data=robust_updates(nonfinite=False), tau=st.sampled_from([1e-2, 1.0, 1e4]), iterations=st.integers(1, 3))
def test_centered_clipping_is_the_formula(data, tau, iterations, any_backend):
    updates, dtype = data
    x = stacked(updates)
    center = x[0].astype(dtype) * 0.5
    expected = brute_centered_clipping(x, center, tau, iterations)
    np.testing.assert_allclose(fedkern.centered_clipping(updates, center, tau, iterations, backend=any_backend),
                               expected, rtol=1e-5 if dtype == F32 else 1e-10, atol=1e-6 * scale_of(updates))


@given(data=robust_updates(nonfinite=False), f=st.integers(0, 5))
def test_nearest_neighbor_mixing_is_the_formula(data, f, any_backend):
    updates, dtype = data
    x = stacked(updates)
    f = min(f, (len(x) - 1) // 2)
    assume(not nnm_cut_is_ambiguous(updates, f))  # a near tie rounding may break either way
    expected = np.empty_like(x)
    for i in range(len(x)):
        distances = [float(np.sum((x[i] - x[l]) ** 2)) for l in range(len(x))]
        nearest = sorted(range(len(x)), key=lambda l: (distances[l], l))[:len(x) - f]
        expected[i] = x[nearest].mean(axis=0)
    result = fedkern.nearest_neighbor_mixing(updates, f, method="exact", backend=any_backend)
    assert result.shape == x.shape and result.dtype == dtype
    np.testing.assert_allclose(result, expected, rtol=1e-5 if dtype == F32 else 1e-11, atol=1e-6 * scale_of(updates))


@given(data=robust_updates(nonfinite=False), f=st.integers(0, 5))
def test_adaptive_clipping_is_the_formula(data, f, any_backend):
    updates, dtype = data
    x = stacked(updates)
    k = len(x)
    f = min(f, (k - 1) // 2)
    norms = np.linalg.norm(x, axis=1)
    clipped = int(np.floor(2 * f / k * (k - f)))
    threshold = np.sort(norms)[k - clipped - 1]
    expected = x * np.minimum(1.0, threshold / np.maximum(norms, 1e-300))[:, None] if clipped else x
    result, got_norms = fedkern.adaptive_clipping(updates, f, return_norms=True, backend=any_backend)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-12)
    np.testing.assert_allclose(result, expected, rtol=1e-5 if dtype == F32 else 1e-12, atol=1e-7 * scale_of(updates))


def test_bucketing_averages_seeded_buckets(any_backend):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((7, 5))
    result = fedkern.bucketing(x, 3, seed=42, backend=any_backend)
    order = np.random.default_rng(42).permutation(7)
    expected = [x[order[0:3]].mean(axis=0), x[order[3:6]].mean(axis=0), x[order[6:7]].mean(axis=0)]
    np.testing.assert_allclose(result, expected, rtol=1e-14)
    np.testing.assert_array_equal(result, fedkern.bucketing(x, 3, seed=np.random.default_rng(42), backend=any_backend))
    assert fedkern.bucketing(x, 1, seed=0).shape == (7, 5) and fedkern.bucketing(x, 10, seed=0).shape == (1, 5)


# --------------------------------------------------------------------------- non-finite updates
def test_nonfinite_updates_are_tolerated_up_to_the_breakdown_point(any_backend):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((11, 40))
    x[[1, 6]] = np.inf
    x[8, :5] = np.nan
    honest = np.delete(x, [1, 6, 8], axis=0)
    for result in (fedkern.median(x, backend=any_backend), fedkern.trimmed_mean(x, f=3, backend=any_backend),
                   fedkern.meamed(x, 3, backend=any_backend), fedkern.geometric_median(x, backend=any_backend)):
        assert np.isfinite(result).all()
    for method in ("gram", "exact"):
        _, chosen = fedkern.krum(x, 3, m=5, method=method, return_indices=True, backend=any_backend)
        assert not {1, 6, 8} & set(chosen.tolist())
        _, chosen = fedkern.bulyan(np.concatenate([x, honest[:4]]), 3, method=method, return_indices=True,
                                   backend=any_backend)
        assert not {1, 6, 8} & set(chosen.tolist())
    mixed = fedkern.nearest_neighbor_mixing(x, 3, backend=any_backend)
    assert np.isfinite(np.delete(mixed, [1, 6, 8], axis=0)).all() and np.isnan(mixed[[1, 6, 8]]).all()


@pytest.mark.parametrize("rows, f, finite_mean", [
    ([[1.0], [1.0], [1.0], [1.0], [np.inf]], 0, 1.0),  # K - f = 5 neighbours wanted, 4 finite
    ([[1.0], [2.0], [3.0], [np.inf], [np.inf]], 1, 2.0),  # more than f non-finite
    ([[1.0], [2.0], [3.0], [4.0], [np.nan]], 1, None),  # at most f: the K - f nearest are finite
])
def test_nnm_with_more_than_f_nonfinite_updates_averages_the_finite_neighbours(rows, f, finite_mean, any_backend):
    """Reported: the finite neighbours were summed but divided by K - f, shrinking the
    result toward zero ([0.8, 0.8, 0.8, 0.8] and 1.5 for the first two cases)."""
    x = np.array(rows)
    mixed = fedkern.nearest_neighbor_mixing(x, f, backend=any_backend)
    finite = np.isfinite(x).all(axis=1)
    assert np.isnan(mixed[~finite]).all()
    for i in np.flatnonzero(finite):
        others = np.flatnonzero(finite)
        nearest = sorted(others, key=lambda l: (abs(x[i, 0] - x[l, 0]), l))[:len(x) - f]
        assert mixed[i, 0] == x[nearest, 0].mean()
        if finite_mean is not None:
            assert mixed[i, 0] == finite_mean


def test_nonfinite_result_raises_naming_a_client(any_backend):
    x = np.ones((5, 4))
    x[2:, 1] = np.nan  # 3 of 5 values: past the median's breakdown point
    with pytest.raises(fedkern.NonFiniteError, match=r"updates\[2\]") as info:
        fedkern.median(x, backend=any_backend)
    assert info.value.client == 2
    assert np.isinf(fedkern.median(x, check_finite=False, backend=any_backend)[1])  # NaN ordered as +inf
    x = np.full((3, 2), np.nan)
    with pytest.raises(fedkern.NonFiniteError):
        fedkern.geometric_median(x, backend=any_backend)


def test_gram_survives_a_nonfinite_first_update(any_backend):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 30)).astype(np.float32)
    exact = fedkern.pairwise_sq_distances(x, "exact", backend=any_backend)
    x[0, 3] = np.nan
    gram = fedkern.pairwise_sq_distances(x, "gram", backend=any_backend)
    assert np.isinf(gram[0, 1:]).all() and np.isinf(gram[1:, 0]).all() and gram[0, 0] == 0
    assert (np.abs(gram[1:, 1:] - exact[1:, 1:]) <= gram_error_bound(x[1:], F32)).all()


# --------------------------------------------------------------------------- out=, dtype=
@pytest.mark.parametrize("op", ["median", "trimmed_mean", "meamed", "krum", "bulyan", "geometric_median"])
def test_out_and_dtype(op, any_backend):
    x = np.random.default_rng(11).standard_normal((12, 9)).astype(np.float32)
    call = {"median": lambda **kw: fedkern.median(x, **kw), "trimmed_mean": lambda **kw: fedkern.trimmed_mean(x, 0.1, **kw),
            "meamed": lambda **kw: fedkern.meamed(x, 2, **kw), "krum": lambda **kw: fedkern.krum(x, 2, **kw),
            "bulyan": lambda **kw: fedkern.bulyan(x, 2, **kw),
            "geometric_median": lambda **kw: fedkern.geometric_median(x, **kw)}[op]
    default = call(backend=any_backend)
    assert default.dtype == np.float32 and default.shape == (9,)
    out = np.empty(9, np.float64)
    assert call(out=out, backend=any_backend) is out
    wide = call(dtype=np.float64, backend=any_backend)
    np.testing.assert_array_equal(out, wide)
    np.testing.assert_allclose(wide, default, rtol=1e-6)
    with pytest.raises(fedkern.FedkernValueError, match="out has shape"):
        call(out=np.empty(8), backend=any_backend)


def test_preaggregator_out(any_backend):
    x = np.random.default_rng(12).standard_normal((7, 6))
    rows = [np.empty(6) for _ in range(7)]
    assert fedkern.nearest_neighbor_mixing(x, 2, out=rows, backend=any_backend) is rows
    np.testing.assert_allclose(np.array(rows), fedkern.nearest_neighbor_mixing(x, 2, backend=any_backend), rtol=1e-14)
    out = np.empty((7, 6))
    assert fedkern.adaptive_clipping(x, 2, out=out, backend=any_backend) is out


# --------------------------------------------------------------------------- bad input
X = np.random.default_rng(13).standard_normal((10, 4))
BAD = [
    (lambda: fedkern.trimmed_mean(X), "give exactly one of beta"),
    (lambda: fedkern.trimmed_mean(X, 0.1, f=1), "give exactly one of beta"),
    (lambda: fedkern.trimmed_mean(X, 0.5), r"beta must be < 0.5"),
    (lambda: fedkern.trimmed_mean(X, -0.1), r"beta must be >= 0"),
    (lambda: fedkern.trimmed_mean(X, f=5), r"f must be between 0 and 4 so that K - 2f >= 1"),
    (lambda: fedkern.meamed(X, 5), r"meamed needs at least 11 updates to tolerate f=5"),
    (lambda: fedkern.meamed(X, -1), r"f must be >= 0"),
    (lambda: fedkern.krum(X, 4), r"krum needs at least 11 updates to tolerate f=4"),
    (lambda: fedkern.krum(X, 1, m=0), r"m must be between 1 and 9"),
    (lambda: fedkern.krum(X, 1, m=10), r"m must be between 1 and 9"),
    (lambda: fedkern.krum(X, 1, method="fast"), r"method must be one of \('auto', 'gram', 'exact'\)"),
    (lambda: fedkern.krum(X, 1, m=2, weights=[0, 0] + [1] * 8, return_indices=True), None),
    (lambda: fedkern.krum(X, 1, weights=[1] * 9), r"weights has length 9 but there are 10 updates"),
    (lambda: fedkern.bulyan(X, 2), r"bulyan needs at least 11 updates to tolerate f=2"),
    (lambda: fedkern.geometric_median(X, nu=0), r"nu must be > 0"),
    (lambda: fedkern.geometric_median(X, maxiter=-1), r"maxiter must be >= 0"),
    (lambda: fedkern.geometric_median(X, weights=[-1] + [1] * 9), r"weights\[0\] is -1.0"),
    (lambda: fedkern.centered_clipping(X, np.zeros(3), 1.0), r"center has length 3; expected 4"),
    (lambda: fedkern.centered_clipping(X, np.zeros(4), 0.0), r"tau must be > 0"),
    (lambda: fedkern.centered_clipping(X, np.zeros(4), 1.0, iterations=0), r"iterations must be >= 1"),
    (lambda: fedkern.centered_clipping(X, np.full(4, np.nan), 1.0), r"center holds a non-finite value"),
    (lambda: fedkern.nearest_neighbor_mixing(X, 5), r"needs at least 11 updates"),
    (lambda: fedkern.bucketing(X, 0), r"s must be >= 1"),
    (lambda: fedkern.adaptive_clipping(X, 5), r"needs at least 11 updates"),
    (lambda: fedkern.median(X[:, ::2]), r"updates is not C-contiguous"),
    (lambda: fedkern.median([X[0], X[1][:3]]), r"updates\[1\] has length 3"),
    (lambda: fedkern.pairwise_sq_distances(X.astype(int)), r"updates has dtype int64"),
]


@pytest.mark.parametrize("call, pattern", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_a_clear_error(call, pattern):
    if pattern is None:  # a valid call: Multi-Krum may pick zero-weight clients only if m > their count
        call()
        return
    with pytest.raises((fedkern.FedkernValueError, fedkern.FedkernTypeError), match=pattern):
        call()


def test_bad_f_type():
    with pytest.raises(fedkern.FedkernTypeError, match="f must be an integer"):
        fedkern.krum(X, 1.0)
    with pytest.raises(fedkern.FedkernTypeError, match="f must be an integer"):
        fedkern.meamed(X, True)


# --------------------------------------------------------------------------- attacks
def test_attacks_follow_their_formulas():
    rng = np.random.default_rng(14)
    honest = rng.standard_normal((8, 6)).astype(np.float32)
    mean, std = honest.astype(np.float64).mean(axis=0), honest.astype(np.float64).std(axis=0)
    attacks = fedkern.attacks
    np.testing.assert_allclose(attacks.sign_flip(honest, 3), np.tile(-mean, (3, 1)), rtol=1e-6)
    np.testing.assert_allclose(attacks.ipm(honest, 2, tau=0.5), np.tile(-0.5 * mean, (2, 1)), rtol=1e-6)
    # Baruch et al.: n = 10, f = 2 -> s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10)
    assert attacks.alie_z(10, 2) == pytest.approx(scipy.stats.norm.ppf(0.6))
    np.testing.assert_allclose(attacks.alie(honest, 2), np.tile(mean + scipy.stats.norm.ppf(0.6) * std, (2, 1)),
                               rtol=1e-6)
    np.testing.assert_allclose(attacks.alie(honest, 2, z=3.0), np.tile(mean + 3.0 * std, (2, 1)), rtol=1e-6)
    noise = attacks.gaussian(honest, 4, mean=1.0, std=2.0, seed=0)
    np.testing.assert_array_equal(noise, attacks.gaussian(honest, 4, mean=1.0, std=2.0, seed=0))
    assert noise.shape == (4, 6) and noise.dtype == np.float32
    assert np.isinf(attacks.infinite(honest, 2)).all()
    for attack in (attacks.sign_flip, attacks.ipm, attacks.alie, attacks.infinite):
        assert attack(list(honest), 2).dtype == np.float32 and attack(honest, 0).shape == (0, 6)
    with pytest.raises(fedkern.FedkernValueError, match="no valid quantile"):
        attacks.alie_z(4, 3)


# --------------------------------------------------------------------------- robustness
ATTACKS = {
    "sign_flip": lambda h, f: fedkern.attacks.sign_flip(h, f),
    "ipm": lambda h, f: fedkern.attacks.ipm(h, f, tau=0.1),
    # Baruch's default z is built to move the median and trimmed mean further than the
    # mean; the regime tested here is a large z (an outlier the rules must reject)
    "alie_z10": lambda h, f: fedkern.attacks.alie(h, f, z=10.0),
    "gaussian": lambda h, f: fedkern.attacks.gaussian(h, f, std=10.0, seed=1),
    "infinite": lambda h, f: fedkern.attacks.infinite(h, f),
}
RULES = {
    "median": lambda x, f: fedkern.median(x),
    "trimmed_mean": lambda x, f: fedkern.trimmed_mean(x, f=f),
    "meamed": lambda x, f: fedkern.meamed(x, f),
    "krum": lambda x, f: fedkern.krum(x, f),
    "multi_krum": lambda x, f: fedkern.krum(x, f, m=len(x) - f),
    "bulyan": lambda x, f: fedkern.bulyan(x, f),
    "geometric_median": lambda x, f: fedkern.geometric_median(x),
    "centered_clipping": lambda x, f: fedkern.centered_clipping(x, fedkern.median(x), tau=0.5, iterations=3),
    "nnm_krum": lambda x, f: fedkern.krum(fedkern.nearest_neighbor_mixing(x, f), f),
    "bucketing_median": lambda x, f: fedkern.median(fedkern.bucketing(x, 2, seed=0)),
    "arc_trimmed_mean": lambda x, f: fedkern.trimmed_mean(fedkern.adaptive_clipping(x, f), f=f),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_robust_rules_beat_the_mean_under_attack(attack, any_backend):
    """16 honest clients N(1, 0.1^2) in D = 50 and 4 Byzantine ones (20%): every rule lands
    closer to the honest mean than the plain weighted mean does."""
    rng = np.random.default_rng(15)
    honest = (1.0 + 0.1 * rng.standard_normal((16, 50))).astype(np.float32)
    x = np.concatenate([honest, ATTACKS[attack](honest, 4)])
    target = honest.astype(np.float64).mean(axis=0)
    with np.errstate(all="ignore"):
        plain = np.linalg.norm(fedkern.weighted_mean(x, check_finite=False) - target)
    with fedkern.use_backend(any_backend):
        for name, rule in RULES.items():
            error = np.linalg.norm(rule(x, 4) - target)
            assert error < plain, f"{name} under {attack}: {error} >= mean's {plain}"


def test_alie_with_its_default_z_beats_order_statistics():
    """The attack works as its paper says: inside the honest spread it moves the median
    and Krum further from the honest mean than it moves the plain mean (README)."""
    rng = np.random.default_rng(15)
    honest = (1.0 + 0.1 * rng.standard_normal((16, 50))).astype(np.float32)
    x = np.concatenate([honest, fedkern.attacks.alie(honest, 4)])
    target = honest.astype(np.float64).mean(axis=0)
    plain = np.linalg.norm(fedkern.weighted_mean(x) - target)
    assert np.linalg.norm(fedkern.median(x) - target) > 2 * plain
    assert np.linalg.norm(fedkern.krum(x, 4) - target) > 2 * plain
