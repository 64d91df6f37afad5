"""The defects of Flower's aggregation helpers that fedkern.compat.flwr fixes.

Each test shows Flower's function misbehaving and fedkern's not (``test_defect_*``); the
README's "Use with Flower" table lists them. Tolerances and oracles are those of
``helpers`` (``assert_layers_close``, ``robust_outcomes``). Skipped without Flower.
"""
import warnings

import numpy as np
import pytest

import fedkern
from fedkern.compat import flwr as fk
from helpers import (
    assert_layers_close, contents, fit_results, layers_are_close, legacy_results, make_results, max_abs,
    robust_outcomes,
)

try:
    import flwr.server.strategy as legacy_strategies
    import flwr.server.strategy.aggregate as flower
    from flwr.common import parameters_to_ndarrays
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    HAVE_FLOWER = True
except ImportError:
    HAVE_FLOWER = False

pytestmark = pytest.mark.skipif(not HAVE_FLOWER, reason="needs Flower (pip install flwr)")


# --------------------------------------------------------------------------- Flower's defects, fixed
@pytest.mark.parametrize("k", [2, 3, 7, 16])
def test_aggregate_of_integer_layers_is_flowers_exactly(k):
    """Reported: fedkern multiplied by pre-normalised weights w_i / W, so integer layers
    came out 1 ulp off in most coordinates where Flower's float64 sum(w_i x_i) / W is
    exact. Both now divide the same sequential float64 sum once."""
    rng = np.random.default_rng(k)
    results = [([rng.integers(-1000, 1000, size=(4, 5)), rng.integers(0, 50, size=3)], int(rng.integers(1, 500)))
               for _ in range(k)]
    for ours, theirs in zip(fk.aggregate(results), flower.aggregate(results), strict=True):
        assert ours.dtype == theirs.dtype == np.float64
        np.testing.assert_array_equal(ours, theirs)


def test_defect_aggregate_inplace_zeroes_integer_layers():
    results = [([np.array(100, np.int64), np.ones(2, np.float32)], 30),
               ([np.array(300, np.int64), np.zeros(2, np.float32)], 10)]
    theirs = flower.aggregate_inplace(fit_results(results))
    assert theirs[0] == 0  # Flower: num_batches_tracked multiplied by a factor cast to int 0
    ours = fk.aggregate_inplace(fit_results(results))
    assert ours[0].dtype == np.int64 and ours[0] == 150
    assert_layers_close(ours[1:], theirs[1:])


def _with_bad_client(rng, k, bad_value, index):
    results = make_results(rng, k, np.float32, shapes=[(6,), (2, 2)])
    results[index][0][0][3] = bad_value
    return results


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_defect_krum_selects_a_nonfinite_client(bad_value):
    rng = np.random.default_rng(130)
    results = _with_bad_client(rng, 6, bad_value, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = flower.aggregate_krum(results, 1, 0)
        their_multi = flower.aggregate_krum(results, 1, 6)
    ours = fk.aggregate_krum(results, 1, 0)
    assert all(np.isfinite(layer).all() for layer in ours)
    assert all(np.isfinite(layer).all() for layer in fk.aggregate_krum(results, 1, 6))
    assert not all(np.isfinite(layer).all() for layer in their_multi)
    if bad_value != bad_value:  # NaN: Flower's argmin picks the NaN score, i.e. the bad client
        assert not all(np.isfinite(layer).all() for layer in theirs)


def test_defect_message_multikrum_selects_a_nan_client():
    # Two NaN replies. A NaN reply's squared norm is NaN, so its row and column of Flower's
    # distances are NaN whatever BLAS does with the dot products; np.argsort puts NaN last,
    # so every reply's num_closest = 4 nearest include a NaN one and every score is NaN.
    # Flower's ranking is then only the order np.argsort gives equal NaN keys (unspecified
    # by numpy: reply 0 on the machines tested), and nothing keeps the NaN replies out.
    rng = np.random.default_rng(131)
    results = _with_bad_client(rng, 6, np.nan, 0)
    results[2][0][0][1] = np.nan
    records = contents(results)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distances = flower_multikrum.compute_distances([r["arrays"] for r in records])
        scores = [np.sum(row[np.argsort(row)[1:5]]) for row in distances]  # select_multikrum's scores
        theirs = flower_multikrum.select_multikrum(records, 0, 5)
    assert np.isnan(scores).all()
    assert any(c is records[0] or c is records[2] for c in theirs)  # 5 of 6, in whatever order
    ours = fk.select_multikrum(records, 0, 1)
    assert ours[0] is not records[0] and ours[0] is not records[2]
    assert [id(c) for c in fk.select_multikrum(records, 0, 5)] == \
        [id(c) for c in fk.select_multikrum(records, 0, 6)]  # only the 4 finite replies, ever
    assert len(fk.select_multikrum(records, 0, 6)) == 4


def test_defect_bulyan_fails_on_a_nan_client():
    rng = np.random.default_rng(132)
    results = _with_bad_client(rng, 7, np.nan, 2)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="reference weights"):
        warnings.simplefilter("ignore")
        flower.aggregate_bulyan(list(results), 1, flower.aggregate_krum, to_keep=0)
    ours = fk.aggregate_bulyan(results, 1, flower.aggregate_krum, to_keep=0)
    assert all(np.isfinite(layer).all() for layer in ours)
    clean = [r for i, r in enumerate(results) if i != 2]
    # the bad client is never selected: the result only depends on the others
    selected_from_clean = fk.aggregate_bulyan(clean + [clean[0]], 1, fk.aggregate_krum)
    assert all(np.isfinite(layer).all() for layer in selected_from_clean)
    with pytest.raises(fedkern.NonFiniteError):
        fk.aggregate_bulyan(_with_bad_client(rng, 7, np.nan, 0)[:1] * 3 + results[3:], 1, fk.aggregate_krum)


def test_defect_gram_distances_change_the_krum_choice():
    # Flower's Message-API distances are the float32 Gram form |x|^2 + |y|^2 - 2 x.y. For a
    # model far from the origin they keep no digit of the true distances, on ANY machine.
    # Here d = 64 coordinates are M + n/16 (M = 7168, integers |n| <= 16), all float32
    # values, and every true squared distance t_ij = sum (n_i - n_j)^2 / 256 lies in
    # (0, u/2) with u = 256. Why no summation order, blocking, FMA or wider accumulator in
    # BLAS (or numpy) can change that: |x_i|^2 and 2 x_i.x_j are sums of 64 positive terms
    # whose exact values are >= d (M - 1)^2 > 1.5 * 2^31, and any evaluation of such a sum
    # is within a relative gamma_64 < 4e-6 of it, so the float32 results n_i, n_j, g_ij are
    # all >= 2^e with e = 31, and every float32 >= 2^e is a multiple of u = 2^(e - 23).
    # D_ij = n_i + n_j - g_ij combines multiples of u, and rounding a multiple of u to float32
    # gives a multiple of u (below 2^(e+1) = 2^24 u it is representable; at or above, floats
    # are spaced by multiples of u), fused or not. So every D_ij is a multiple of u while
    # 0 < t_ij < u/2: each off-diagonal D_ij is <= 0 or >= u > 2 t_ij, off by at least t_ij.
    # fedkern's distances need no rounding here (differences are multiples of 1/16, squares
    # and sums multiples of 1/256 below 2^13, in float32 or float64 alike), so they equal
    # t_ij, and its Krum ranking is the exact one: there is nothing for rounding to flip.
    rng = np.random.default_rng(0)
    k, d, big, q = 7, 64, 7168.0, 16
    steps = [rng.integers(-3, 4, d) for _ in range(k - 1)]
    steps.insert(3, rng.choice([-16, 16], d))  # client 3 is the outlier
    clients = [(big + np.asarray(n, np.float64) / q).astype(np.float32) for n in steps]
    assert all(np.array_equal(c.astype(np.float64), big + n / q) for c, n in zip(clients, steps))
    units = np.array([[int(((a - b) ** 2).sum()) for b in steps] for a in steps])  # t_ij * 256, exact
    exact = units / q**2
    smallest = big - max(np.abs(n).max() for n in steps) / q
    e = int(np.floor(np.log2(d * smallest**2 * (1 - 2 * d * 2.0**-24))))
    u = 2.0 ** (e - 23)
    off = ~np.eye(k, dtype=bool)
    assert u == 256 and (exact[off] > 0).all() and exact.max() < u / 2  # the construction's premise

    records = contents([([c], 1) for c in clients])
    arrays = [r["arrays"] for r in records]
    theirs = flower_multikrum.compute_distances(arrays)
    assert theirs.dtype == np.float32  # Flower computes in the model's dtype
    assert (np.fmod(theirs.astype(np.float64), u) == 0).all()
    assert (np.abs(theirs.astype(np.float64) - exact)[off] >= exact[off]).all()  # every distance >= 100% off

    ours = fk.compute_distances(arrays)
    np.testing.assert_array_equal(ours, exact)
    num_closest = k - 1 - 2
    scores = [sum(sorted(units[i][j] for j in range(k) if j != i)[:num_closest]) for i in range(k)]
    ranking = sorted(range(k), key=lambda i: (scores[i], i))
    assert ranking[-1] == 3  # exactly, the outlier scores worst
    assert [id(c) for c in fk.select_multikrum(records, 1, k)] == [id(records[i]) for i in ranking]
    assert fk.select_multikrum(records, 1, 1)[0] is records[ranking[0]]


def test_defect_legacy_bulyan_empties_the_callers_list():
    rng = np.random.default_rng(134)
    results = make_results(rng, 7, np.float32)
    mine = list(results)
    fk.aggregate_bulyan(mine, 1, flower.aggregate_krum, to_keep=0)
    assert len(mine) == 7
    flower.aggregate_bulyan(mine, 1, flower.aggregate_krum, to_keep=0)
    assert len(mine) == 7 - 5  # Flower popped theta = K - 2f clients out of it


def test_defect_mismatched_shapes_broadcast():
    results = [([np.ones((3, 1), np.float32)], 1), ([np.ones((1, 3), np.float32)], 1)]
    assert flower.aggregate(results)[0].shape == (3, 3)  # silently broadcast
    for fn in (fk.aggregate, fk.aggregate_median):
        with pytest.raises(ValueError, match=r"layer 0 of results\[1\] has shape \(1, 3\)"):
            fn(results)
    with pytest.raises(ValueError, match="layers"):
        fk.aggregate([([np.ones(2)], 1), ([np.ones(2), np.ones(1)], 1)])


def test_defect_np_int64_counts_change_the_dtype():
    rng = np.random.default_rng(135)
    results = make_results(rng, 4, np.float32, counts=np.int64)
    assert all(np.asarray(x).dtype == np.float64 for x in flower.aggregate(results))
    ours = fk.aggregate(results)
    assert all(x.dtype == np.float32 for x in ours)
    assert_layers_close(ours, [np.asarray(x).astype(np.float32) for x in flower.aggregate(results)], max_abs(results), 4)


def test_defect_float16_overflows():
    results = [([np.full(3, 200.0, np.float16)], 300), ([np.full(3, 400.0, np.float16)], 100)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isinf(flower.aggregate(results)[0]).all()  # 60000 + 40000 overflows float16
    ours = fk.aggregate(results)[0]
    assert ours.dtype == np.float16 and (ours == 250.0).all()


def test_defect_median_poisoned_by_one_nan():
    rng = np.random.default_rng(136)
    results = _with_bad_client(rng, 5, np.nan, 1)
    assert np.isnan(flower.aggregate_median(results)[0][3])
    ours = fk.aggregate_median(results)
    assert np.isfinite(ours[0]).all()
    finite = np.stack([params[0] for i, (params, _) in enumerate(results) if i != 1])
    assert finite[:, 3].min() <= ours[0][3] <= finite[:, 3].max()


def test_defect_qffl_returns_float64_for_float32_parameters():
    parameters = [np.ones(3, np.float32)]
    deltas = [[np.full(3, 0.5, np.float32)], [np.full(3, 1.5, np.float32)]]
    assert flower.aggregate_qffl(parameters, deltas, [1.0, 1.0])[0].dtype == np.float64
    ours = fk.aggregate_qffl(parameters, deltas, [1.0, 1.0])[0]
    assert ours.dtype == np.float32 and (ours == 0.0).all()


def test_defect_multikrum_to_keep_above_k():
    rng = np.random.default_rng(137)
    results = make_results(rng, 4, np.float64)
    everyone = flower.aggregate(results)
    theirs = flower.aggregate_krum(results, 0, 5)  # keeps 5 - 4 = 1 client
    assert not all(np.allclose(a, b) for a, b in zip(theirs, everyone))
    assert_layers_close(fk.aggregate_krum(results, 0, 5), everyone, max_abs(results), 4)


def test_defect_bulyan_strategy_default_arguments():
    rng = np.random.default_rng(138)
    results = legacy_results(rng)
    with pytest.raises(TypeError):  # Flower's Bulyan() calls aggregate_krum without to_keep
        legacy_strategies.Bulyan(num_malicious_clients=1).aggregate_fit(1, fit_results(results), [])
    with fk.patched():
        params, _ = legacy_strategies.Bulyan(num_malicious_clients=1).aggregate_fit(1, fit_results(results), [])
    exact, admissible = robust_outcomes("legacy", "Bulyan", results)
    assert_layers_close(parameters_to_ndarrays(params), exact, max_abs(results), 7)
    theirs = flower.aggregate_bulyan(list(results), 1, flower.aggregate_krum, to_keep=0)
    assert any(layers_are_close(theirs, value, max_abs(results), 7) for value in admissible)


def test_defect_all_zero_counts_give_nan():
    results = [([np.ones(2)], 0), ([np.zeros(2)], 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(flower.aggregate(results)[0]).all()
    with pytest.raises(ValueError, match="all zero"):
        fk.aggregate(results)
