"""fedkern.compat.flwr's Message-API helpers (``flwr.serverapp.strategy``) against Flower's.

``aggregate_arrayrecords``, ``compute_distances``, ``select_multikrum``,
``aggregate_n_closest_weights`` and ``trim_mean`` on random replies, to the tolerance of
``helpers.assert_layers_close``; distances against exact ones (Flower's within its Gram-form
error bound), selections against the ones exact arithmetic admits. Skipped without Flower.
"""
import numpy as np
import pytest

from fedkern.compat import flwr as fk
from helpers import (
    ExactGeometry, assert_layers_close, closest_mean, contents, krum_selections, make_clients, make_results,
    max_abs, reply,
)

try:
    from flwr.serverapp.strategy import bulyan as flower_bulyan
    from flwr.serverapp.strategy import fedtrimmedavg as flower_trimmed
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    from flwr.serverapp.strategy import strategy_utils as flower_utils
    HAVE_FLOWER = True
except ImportError:
    HAVE_FLOWER = False

pytestmark = pytest.mark.skipif(not HAVE_FLOWER, reason="needs Flower (pip install flwr)")


# --------------------------------------------------------------------------- Message-API helpers vs Flower
@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_arrayrecords_matches_flower(k, dtype):
    rng = np.random.default_rng(60 + k)
    results = make_results(rng, k, dtype)
    records = contents(results)
    ours = fk.aggregate_arrayrecords(records, "num-examples")
    theirs = flower_utils.aggregate_arrayrecords(records, "num-examples")
    assert list(ours.keys()) == list(theirs.keys())
    assert_layers_close(ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), max_abs(results), k)


def test_aggregate_arrayrecords_float_weights_and_int_arrays():
    records = [reply(0, [np.array([1, 3]), np.ones(2, np.float32)], 0.25).content,
               reply(1, [np.array([5, 5]), np.zeros(2, np.float32)], 0.75).content]
    assert_layers_close(fk.aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays(),
                 flower_utils.aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays(), 5, 2)


@pytest.mark.parametrize("k", [1, 4, 15])
def test_compute_distances_exact(k):
    rng = np.random.default_rng(70 + k)
    results = make_results(rng, k, np.float64)
    records = [c["arrays"] for c in contents(results)]
    ours = fk.compute_distances(records)
    flat = np.array([np.concatenate([layer.ravel() for layer in params]) for params, _ in results])
    exact = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(ours, exact, rtol=1e-13, atol=0)  # two float64 sums of 32 positive terms
    assert ours.dtype == np.float64 and (np.diag(ours) == 0).all() and (ours == ours.T).all()
    # Flower's float64 Gram form is within its error bound of the exact distances
    g = ExactGeometry([params for params, _ in results])
    bound = np.array([[g.error(i, j, "gram") for j in range(k)] for i in range(k)])
    assert (np.abs(flower_multikrum.compute_distances(records) - ours) <= bound).all()


@pytest.mark.parametrize("k,f,m", [(1, 0, 1), (4, 1, 1), (10, 2, 4), (30, 3, 30), (50, 12, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_multikrum_matches_flower(k, f, m, dtype):
    # (4, 1, 1) scores each reply by its one nearest neighbour: the closest pair ties
    rng = np.random.default_rng(80 + k)
    results = make_results(rng, k, dtype)
    records = contents(results)
    exact, admissible = krum_selections([params for params, _ in results], f, m, "gram", ordered=True)
    index = {id(record): i for i, record in enumerate(records)}
    assert tuple(index[id(c)] for c in fk.select_multikrum(records, f, m)) == exact
    assert tuple(index[id(c)] for c in flower_multikrum.select_multikrum(records, f, m)) in admissible


@pytest.mark.parametrize("k,beta", [(1, 1), (5, 3), (8, 4), (8, 2), (21, 13)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_n_closest_weights_matches_flower(k, beta, dtype):
    rng = np.random.default_rng(90 + k)
    clients = make_clients(rng, k, dtype)
    median = [np.median(np.stack(layers), axis=0) for layers in zip(*clients)]
    other = make_clients(rng, 1, dtype)[0]
    for ref in (median, other):
        # the values closest to the reference, on data where rounding cannot change which
        expected = [closest_mean(list(layers), beta, r) for layers, r in zip(zip(*clients), ref)]
        assert_layers_close(fk.aggregate_n_closest_weights(ref, clients, beta), expected, 5, k)
        theirs = flower_bulyan.aggregate_n_closest_weights(ref, clients, beta)
        assert_layers_close([np.asarray(x) for x in theirs], expected, 5, k)


@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("cut", [0.0, 0.1, 0.25, 0.49])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trim_mean_matches_flower(k, cut, dtype):
    rng = np.random.default_rng(100 + k)
    for shape in [(k,), (k, 6), (k, 2, 3)]:
        array = rng.standard_normal(shape).astype(dtype)
        before = array.copy()
        assert_layers_close([fk.trim_mean(array, cut)], [flower_trimmed.trim_mean(array, cut)], 5, k)
        np.testing.assert_array_equal(array, before)
    with pytest.raises(ValueError):
        fk.trim_mean(array, 0.5)
