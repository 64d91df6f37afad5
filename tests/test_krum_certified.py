"""Certified selection: ``method="auto"`` Krum, Multi-Krum and Bulyan (and the Flower drop-in)
choose exactly what ``method="exact"`` chooses, on every input.

The target is the exact method on the same backend, bit for bit: the same indices in the
same order and the same result, never a tolerance. The inputs are built to be hard for
the Gram form: duplicated updates, updates one ulp apart, exact score ties, models far
from the origin, K at the minimum 2f + 3 (4f + 3), NaN and inf, overflowing magnitudes.
Also: the new kernel (exact rows) against the full exact matrix, the bounds against the
exact distances, how few rows the certified path recomputes on typical data, and an
input on which the Gram form provably picks wrongly while auto picks rightly.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import fedkern
from fedkern import _krum, robust
from fedkern import _validate as check
from fedkern import backends
from fedkern.backends import kernels

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# --------------------------------------------------------------------------- data
@st.composite
def hard_updates(draw, min_k=3, max_k=24):
    """(updates as a matrix or a list of rows, dtype), built for near-ties."""
    k = draw(st.integers(min_k, max_k))
    d = draw(st.sampled_from([1, 2, 5, 33, 300, 2049]))
    dtype = draw(st.sampled_from([F32, F64]))
    kind = draw(st.sampled_from(["normal", "ties", "far", "ulp", "scales", "nonfinite", "huge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "ties":  # small integers: many exactly equal distances and scores
        x = rng.integers(-1, 2, (k, d)).astype(dtype)
    elif kind == "far":  # a full model far from the origin, noise near its ulp
        x = (1e4 + 1e-3 * rng.standard_normal((k, d))).astype(dtype)
    elif kind == "ulp":  # copies of one update, each moved by 0-2 ulps in one coordinate
        x = np.tile(rng.standard_normal(d).astype(dtype), (k, 1))
        for i in range(k):
            j = rng.integers(d)
            for _ in range(rng.integers(0, 3)):
                x[i, j] = np.nextafter(x[i, j], dtype.type(np.inf))
    elif kind == "scales":  # updates of very different sizes
        x = (rng.standard_normal((k, d)) * 10.0 ** rng.integers(-6, 7, (k, 1))).astype(dtype)
    elif kind == "huge":  # squared distances overflow float64 (float32: the values are inf)
        with np.errstate(over="ignore"):
            x = (rng.standard_normal((k, d)) * 1e160).astype(dtype)
    else:
        x = rng.standard_normal((k, d)).astype(dtype)
    if kind == "nonfinite":
        for _ in range(rng.integers(1, k)):
            x[rng.integers(k), rng.integers(d)] = rng.choice([np.nan, np.inf, -np.inf])
    if draw(st.booleans()):  # duplicated updates: exact ties
        x[rng.integers(k, size=2)] = x[rng.integers(k)]
    return (list(x.copy()) if draw(st.booleans()) else x), dtype


@pytest.fixture
def certified_always(monkeypatch):
    """method="auto" certifies at every K (it is exact up to EXACT_MAX_K otherwise)."""
    monkeypatch.setattr(robust, "EXACT_MAX_K", 0)


def byzantine(k, f, most):
    """f as drawn, or at the most the rule allows (K at its minimum) when ``most``."""
    return most if f is None else min(f, most)


# --------------------------------------------------------------------------- the kernels
@pytest.mark.parametrize("k,d", [(1, 5), (2, 1), (3, 4097), (13, 2049), (40, 8193), (101, 300)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_exact_rows_are_the_exact_matrix_rows_bit_for_bit(k, d, dtype, any_backend):
    rng = np.random.default_rng(k * d)
    x = (1e3 + rng.standard_normal((k, d))).astype(dtype)
    x[rng.integers(k), rng.integers(d)] = np.nan
    rows = check.updates(list(x))
    module = kernels("robust", any_backend)
    full = np.empty((k, k))
    module.exact_sq_distances(rows, full)
    for idx in (np.arange(k), np.unique(rng.integers(0, k, 3)), np.array([k - 1, 0])[: min(k, 2)]):
        part = np.full((idx.size, k), -1.0)
        module.exact_sq_rows(rows, idx.astype(np.intp), part)
        np.testing.assert_array_equal(part, full[idx])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gather_tile_centres_into_a_float64_tile(dtype, any_backend):
    rng = np.random.default_rng(2)
    x = (1e4 + rng.standard_normal((5, 700))).astype(dtype)
    rows = check.updates(list(x))
    tile = np.empty((5, 300))
    kernels("robust", any_backend).gather_tile(rows, 350, True, tile)
    np.testing.assert_array_equal(tile, x[:, 350:650].astype(F64) - x[0, 350:650].astype(F64))
    kernels("robust", any_backend).gather_tile(rows, 350, False, tile)
    np.testing.assert_array_equal(tile, x[:, 350:650].astype(F64))


# --------------------------------------------------------------------------- the bounds
def exact_total(parts, backend):
    total = np.zeros((len(parts[0]), len(parts[0])))
    for part in parts:
        total += fedkern.pairwise_sq_distances(part, "exact", backend=backend)
    return total


@given(data=hard_updates(), parts=st.integers(1, 3))
def test_bounds_contain_the_exact_distances(data, parts, any_backend):
    updates, dtype = data
    x = np.asarray(updates)
    cuts = np.array_split(np.arange(x.shape[1]), parts)
    pieces = [np.ascontiguousarray(x[:, cut]) for cut in cuts if cut.size]
    bounds = robust._Certified([check.updates(p) for p in pieces], any_backend)
    exact = exact_total(pieces, any_backend)
    bad = ~np.isfinite(x).all(axis=1)
    np.testing.assert_array_equal(bounds.bad, bad)
    assert (bounds.lower <= exact).all() and (exact <= bounds.upper).all()
    good = np.flatnonzero(~bad)
    some = good[:3]
    np.testing.assert_array_equal(bounds.exact_rows(some)[:, good], exact[np.ix_(some, good)])


def test_bounds_are_tight_on_typical_data():
    rng = np.random.default_rng(3)
    x = (1.0 + 0.01 * rng.standard_normal((30, 20_000))).astype(np.float32)
    bounds = robust._Certified([check.updates(x)], None)
    exact = fedkern.pairwise_sq_distances(x, "exact")
    off = ~np.eye(30, dtype=bool)
    assert ((bounds.upper - bounds.lower)[off] < 1e-10 * exact[off]).all()
    assert bounds.rows_computed == 0


# --------------------------------------------------------------------------- auto is exact
@given(data=hard_updates(), f=st.one_of(st.none(), st.integers(0, 5)), m=st.integers(1, 24),
       weighted=st.booleans())
def test_krum_and_multikrum_auto_is_exact(data, f, m, weighted, any_backend, certified_always):
    updates, dtype = data
    k = len(updates)
    f = byzantine(k, f, (k - 3) // 2)
    m = min(m, k - f)
    weights = np.arange(1.0, k + 1) if weighted else None
    kwargs = dict(return_indices=True, check_finite=False, backend=any_backend, weights=weights)
    with np.errstate(invalid="ignore", over="ignore"):  # the reference's sums of NaN and inf rows
        exact, exact_idx = fedkern.krum(updates, f, m, method="exact", **kwargs)
        auto, auto_idx = fedkern.krum(updates, f, m, **kwargs)
    np.testing.assert_array_equal(auto_idx, exact_idx)
    np.testing.assert_array_equal(auto, exact)


@given(data=hard_updates(), f=st.one_of(st.none(), st.integers(0, 4)))
def test_bulyan_auto_is_exact(data, f, any_backend, certified_always):
    updates, dtype = data
    k = len(updates)
    f = byzantine(k, f, (k - 3) // 4)
    kwargs = dict(return_indices=True, check_finite=False, backend=any_backend)
    exact, exact_idx = fedkern.bulyan(updates, f, method="exact", **kwargs)
    auto, auto_idx = fedkern.bulyan(updates, f, **kwargs)
    np.testing.assert_array_equal(auto_idx, exact_idx)
    np.testing.assert_array_equal(auto, exact)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k,f", [(13, 5), (30, 4), (51, 12)])
def test_far_from_the_origin_auto_is_exact_at_the_default_threshold(k, f, dtype, any_backend):
    """K above EXACT_MAX_K: the certified path as shipped. All updates are 1e4 + noise at
    about float32's ulp there, so many coordinates tie and distances differ in few bits."""
    rng = np.random.default_rng(k)
    x = (1e4 + 1e-3 * rng.standard_normal((k, 3000))).astype(dtype)
    x[3] = x[7]  # an exact tie too
    for m in (1, 2, k - f):
        exact, exact_idx = fedkern.krum(x, f, m, method="exact", return_indices=True, backend=any_backend)
        auto, auto_idx = fedkern.krum(x, f, m, return_indices=True, backend=any_backend)
        np.testing.assert_array_equal(auto_idx, exact_idx)
        np.testing.assert_array_equal(auto, exact)
    f = (k - 3) // 4
    exact, exact_idx = fedkern.bulyan(x, f, method="exact", return_indices=True, backend=any_backend)
    auto, auto_idx = fedkern.bulyan(x, f, return_indices=True, backend=any_backend)
    np.testing.assert_array_equal(auto_idx, exact_idx)
    np.testing.assert_array_equal(auto, exact)


def test_equal_scores_go_to_the_lower_index():
    """Points on a circle: every score is equal in exact arithmetic, so only rounding (the
    exact method's own) or the index decides; auto must agree with exact either way."""
    k = 16
    angles = 2 * np.pi * np.arange(k) / k
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 3.0
    for f in (0, 3, 6):
        for m in (1, 4):
            assert np.array_equal(fedkern.krum(x, f, m, return_indices=True)[1],
                                  fedkern.krum(x, f, m, method="exact", return_indices=True)[1])
    assert np.array_equal(fedkern.bulyan(x, 3, return_indices=True)[1],
                          fedkern.bulyan(x, 3, method="exact", return_indices=True)[1])


def test_nonfinite_updates_behave_as_with_exact(any_backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 500)).astype(np.float32)
    x[[2, 9], 7] = np.nan
    x[[4, 15, 16], 100] = np.inf
    exact_idx = fedkern.krum(x, 5, 6, method="exact", return_indices=True, backend=any_backend)[1]
    auto, auto_idx = fedkern.krum(x, 5, 6, return_indices=True, backend=any_backend)
    np.testing.assert_array_equal(auto_idx, exact_idx)
    assert not set(auto_idx.tolist()) & {2, 4, 9, 15, 16}
    x[:12, 0] = np.nan  # more bad updates than f: Multi-Krum of K - f must take some
    messages = []
    for method in ("exact", "auto"):
        with pytest.raises(fedkern.NonFiniteError) as raised:
            fedkern.krum(x, 5, 15, method=method, backend=any_backend)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
    exact_idx = fedkern.krum(x, 5, 15, method="exact", return_indices=True, check_finite=False)[1]
    np.testing.assert_array_equal(fedkern.krum(x, 5, 15, return_indices=True, check_finite=False)[1], exact_idx)
    x[:] = np.nan  # nothing finite
    assert np.array_equal(fedkern.bulyan(x, 4, return_indices=True, check_finite=False)[1],
                          fedkern.bulyan(x, 4, method="exact", return_indices=True, check_finite=False)[1])


# --------------------------------------------------------------------------- exact work done
@pytest.fixture
def exact_work(monkeypatch, any_backend):
    """Counts the exact rows the backend's kernels compute (the whole matrix counts K)."""
    module = backends._load(any_backend, "robust")
    counted = {"rows": 0, "matrices": 0}
    rows_kernel, matrix_kernel = module.exact_sq_rows, module.exact_sq_distances

    def rows(updates, indices, out):
        counted["rows"] += len(indices)
        rows_kernel(updates, indices, out)

    def matrix(updates, out):
        counted["matrices"] += 1
        matrix_kernel(updates, out)

    monkeypatch.setattr(module, "exact_sq_rows", rows)
    monkeypatch.setattr(module, "exact_sq_distances", matrix)
    return counted


def test_typical_data_needs_few_exact_rows(exact_work, any_backend):
    """Honest updates around a model plus far Byzantine ones: the bounds rank every update
    themselves; a duplicated update (an exact tie) costs its two rows, once."""
    rng = np.random.default_rng(5)
    k, f = 40, 4
    x = (0.5 + 0.01 * rng.standard_normal((k, 4000))).astype(np.float32)
    x[-f:] += 1.0
    for m in (1, 10):
        fedkern.krum(x, f, m, backend=any_backend)
    fedkern.bulyan(x, f, backend=any_backend)
    assert exact_work == {"rows": 0, "matrices": 0}
    x[11] = x[23]
    _, idx = fedkern.krum(x, f, return_indices=True, backend=any_backend)
    assert exact_work["matrices"] == 0 and exact_work["rows"] <= 2
    assert np.array_equal(idx, fedkern.krum(x, f, method="exact", return_indices=True, backend=any_backend)[1])


def test_many_ties_fall_back_to_the_whole_exact_matrix(exact_work, any_backend):
    x = np.zeros((20, 50))  # every score ties: all rows are needed, computed as one matrix
    assert fedkern.krum(x, 3, return_indices=True, backend=any_backend)[1].tolist() == [0]
    assert exact_work["matrices"] == 1 and exact_work["rows"] <= 20 // 2


# --------------------------------------------------------------------------- the bound matters
def gram_blind_updates():
    """An input where the Gram form provably sees no distance between the honest updates.

    Update 0 (Byzantine) is M = 2^40 in every coordinate, updates 1..12 are small integers
    (update 7 is 0, the true Krum winner). The Gram form centres on update 0, so the honest
    coordinates become y = delta - M, and every product (delta - M)(delta' - M) is
    M^2 - M (delta + delta') + delta delta': the first two terms a multiple of 2^40 near
    2^80, the last below 2^4, less than half an ulp there. Every rounding of a product or
    partial sum (any order, FMA or not, any tiling) therefore gives exactly the multiple of
    2^40, and all sums of those below 2^87 are exact: G_il = sum_j M^2 - M (delta_ij +
    delta_lj), and G_ii + G_ll - 2 G_il = 0 exactly for every honest pair. Their true
    distances are integers between 1 and 2^12.
    """
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, (13, 64)).astype(np.float64)
    x[0] = 2.0 ** 40
    x[7] = 0.0
    return x


def test_gram_picks_wrongly_where_auto_picks_rightly(any_backend):
    x = gram_blind_updates()
    honest = ~np.eye(13, dtype=bool)
    honest[0, :] = honest[:, 0] = False
    exact = fedkern.pairwise_sq_distances(x, "exact", backend=any_backend)
    assert (exact[honest] >= 1).all()
    assert (fedkern.pairwise_sq_distances(x, "gram", backend=any_backend)[honest] == 0).all()  # premise
    assert fedkern.krum(x, 1, method="exact", return_indices=True, backend=any_backend)[1].tolist() == [7]
    assert fedkern.krum(x, 1, method="gram", return_indices=True, backend=any_backend)[1].tolist() == [1]
    assert fedkern.krum(x, 1, return_indices=True, backend=any_backend)[1].tolist() == [7]


def test_a_bound_without_rounding_errors_is_caught(monkeypatch):
    """The containment test above would catch a bound that leaves out the rounding errors:
    on the Gram-blind input such 'bounds' exclude the exact distances."""
    x = gram_blind_updates()
    sound = robust._Certified([check.updates(x)], None)
    exact = fedkern.pairwise_sq_distances(x, "exact")
    assert (sound.lower <= exact).all() and (exact <= sound.upper).all()
    monkeypatch.setattr(robust, "_gamma", lambda m: 0.0)
    monkeypatch.setattr(_krum, "UNIT_ROUNDOFF", 0.0)
    unsound = robust._Certified([check.updates(x)], None)
    assert not (exact <= unsound.upper).all()


# --------------------------------------------------------------------------- the Flower drop-in
def flower_clients(rng, k, kind):
    """Clients of several layers of several dtypes (float32, float64, float16, int, 0-d, empty)."""
    base = [rng.standard_normal((3, 40)).astype(np.float32), rng.standard_normal(7),
            rng.standard_normal(5).astype(np.float16), rng.integers(-2, 3, 6), np.array(0.5), np.zeros(0)]
    clients = []
    for i in range(k):
        layers = [layer.copy() for layer in base]
        if kind == "noise":
            layers[0] += (0.01 * rng.standard_normal((3, 40))).astype(np.float32)
            layers[1] += 0.01 * rng.standard_normal(7)
        elif kind == "far":
            layers[0] = (1e4 + 1e-3 * rng.standard_normal((3, 40))).astype(np.float32)
        elif kind == "ulp":
            j = rng.integers(40)
            layers[0][0, j] = np.nextafter(layers[0][0, j], np.float32(np.inf)) if i % 3 else layers[0][0, j]
        clients.append(layers)
    if kind == "nonfinite":
        clients[1 % k][0][0, 0] = np.nan
        clients[4 % k][1][2] = np.inf
    return clients


@pytest.mark.parametrize("kind", ["noise", "far", "ulp", "same", "nonfinite"])
@pytest.mark.parametrize("k,f", [(1, 0), (7, 1), (15, 3), (26, 5)])
def test_flower_selections_are_the_exact_ones(kind, k, f):
    from fedkern.compat.flwr import _layers, legacy

    rng = np.random.default_rng(k)
    clients = flower_clients(rng, k, kind)
    layers = _layers._layers_by_position(clients, "results")
    distances = _layers._sq_distances(layers)
    bad = _layers._nonfinite_clients(distances, layers)
    neighbours = _layers._num_closest(k, f)
    results = [(c, i + 1) for i, c in enumerate(clients)]
    if bad.all():  # one client, and it holds NaN
        with pytest.raises(fedkern.NonFiniteError):
            legacy.aggregate_krum(results, f, 0)
        return
    exact_order = _layers._krum_order(_krum.scores(distances, neighbours, bad), bad)
    for count in (1, 3, k + 1):
        np.testing.assert_array_equal(_layers._krum_selection(layers, neighbours, count), exact_order[:count])
    winner = legacy.aggregate_krum(results, f, 0)
    assert all(np.array_equal(a, b) for a, b in zip(winner, clients[exact_order[0]]))
    if k >= 4 * f + 3 and k - bad.sum() >= k - 2 * f:
        theta = k - 2 * f
        expected = _krum.bulyan_selection(k, theta, _krum.exact_best(
            distances, lambda n: _layers._num_closest(n, f), bad))
        bounds = _layers._certified(layers)
        got = _krum.bulyan_selection(k, theta, _krum.certified_best(
            bounds.lower, bounds.upper, bounds.exact_rows, lambda n: _layers._num_closest(n, f), bounds.bad))
        np.testing.assert_array_equal(got, expected)
        legacy.aggregate_bulyan(results, f, legacy.aggregate_krum)  # runs on the certified path


def test_flower_complex_layers_take_the_exact_path():
    from fedkern.compat.flwr import _layers, legacy

    rng = np.random.default_rng(8)
    clients = [[rng.standard_normal(4) + 1j * rng.standard_normal(4)] for _ in range(6)]
    assert _layers._certified(_layers._layers_by_position(clients, "results")) is None
    with np.errstate(all="ignore"), pytest.warns(np.exceptions.ComplexWarning):
        legacy.aggregate_krum([(c, 1) for c in clients], 1, 0)
