"""fedkern.compat.flwr's ``Ins/Res`` helpers (``flwr.server.strategy.aggregate``) against Flower's.

Every function is compared with Flower's function of the same name on random inputs
(ragged layer lists with 0-d layers, float32/float64, K from 1 to 50, counts as int and
np.int64), to the tolerance of ``helpers.assert_layers_close``; Krum, Multi-Krum and Bulyan
selections against the ones exact arithmetic admits (``helpers.krum_selections``). Also:
the zero-copy decoding of Flower's serialised arrays, and 0-d and empty layers. Skipped
without Flower.
"""
import copy

import numpy as np
import pytest

from fedkern.compat import flwr as fk
from fedkern.compat.flwr._decode import _decode
from helpers import (
    assert_layers_close, bulyan_selections, bulyan_value, contents, fit_results, krum_selections, layers_are_close,
    make_clients, make_results, max_abs, weighted_value,
)

try:
    import flwr.server.strategy.aggregate as flower
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    HAVE_FLOWER = True
except ImportError:
    HAVE_FLOWER = False

pytestmark = pytest.mark.skipif(not HAVE_FLOWER, reason="needs Flower (pip install flwr)")


# --------------------------------------------------------------------------- helpers
def unchanged(results):
    return copy.deepcopy(results)


def assert_same_results(before, after):
    assert len(before) == len(after)
    for (p0, n0), (p1, n1) in zip(before, after):
        assert n0 == n1 and len(p0) == len(p1)
        for a, b in zip(p0, p1):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- legacy helpers vs Flower
@pytest.mark.parametrize("k", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_matches_flower(k, dtype):
    rng = np.random.default_rng(k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    assert_layers_close(fk.aggregate(results), flower.aggregate(results), max_abs(results), k)
    assert_same_results(before, results)


def test_aggregate_np_int64_counts_match_flower_values():
    rng = np.random.default_rng(1)
    results = make_results(rng, 6, np.float64, counts=np.int64)
    assert_layers_close(fk.aggregate(results), flower.aggregate(results), max_abs(results), 6)


def test_aggregate_integer_layer_as_flower():
    results = [([np.array([1, 2], np.int64), np.ones(2, np.float32)], 1), ([np.array([4, 4], np.int64), np.zeros(2, np.float32)], 2)]
    assert_layers_close(fk.aggregate(results), flower.aggregate(results), 4, 2)


@pytest.mark.parametrize("k", [1, 4, 25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_inplace_matches_flower(k, dtype):
    rng = np.random.default_rng(10 + k)
    results = make_results(rng, k, dtype)
    fits = fit_results(results)
    ours = fk.aggregate_inplace(fits)
    assert_layers_close(ours, flower.aggregate_inplace(fit_results(results)), max_abs(results), k)
    assert all(a.flags.writeable for a in ours)
    assert_same_results(results, [(parameters_to_ndarrays(f.parameters), f.num_examples) for _, f in fits])


@pytest.mark.parametrize("k", [1, 2, 5, 12, 50])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_median_matches_flower(k, dtype):
    rng = np.random.default_rng(20 + k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    assert_layers_close(fk.aggregate_median(results), flower.aggregate_median(results), max_abs(results), 1)
    assert_same_results(before, results)


@pytest.mark.parametrize("k", [1, 3, 10, 29, 50])
@pytest.mark.parametrize("proportion", [0.0, 0.1, 0.29, 0.45])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_trimmed_avg_matches_flower(k, proportion, dtype):
    rng = np.random.default_rng(30 + k)
    results = make_results(rng, k, dtype)
    assert_layers_close(fk.aggregate_trimmed_avg(results, proportion), flower.aggregate_trimmed_avg(results, proportion),
                 max_abs(results), k)


def test_trimmed_floor_of_float_product():
    # 0.29 * 100 == 28.999999999999996: Flower cuts 28 per side, so must fedkern
    rng = np.random.default_rng(3)
    results = make_results(rng, 100, np.float64, shapes=[(4,)])
    assert_layers_close(fk.aggregate_trimmed_avg(results, 0.29), flower.aggregate_trimmed_avg(results, 0.29), 5, 100)
    with pytest.raises(ValueError):
        fk.aggregate_trimmed_avg(results, 0.5)


@pytest.mark.parametrize("k,f", [(1, 0), (2, 0), (5, 1), (10, 2), (30, 5), (50, 10)])
@pytest.mark.parametrize("to_keep", [0, 1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_krum_matches_flower(k, f, to_keep, dtype):
    # Krum returns the winner's layers, Multi-Krum the weighted mean of the to_keep best.
    # k = 2 is an exact tie (each client's one neighbour is the other): Flower's rounding
    # decides it, fedkern takes client 0.
    rng = np.random.default_rng(40 + k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    to_keep = min(to_keep, k)
    exact, admissible = krum_selections([params for params, _ in results], f, max(to_keep, 1), "difference")

    def value(selected):
        return [np.asarray(layer) for layer in results[min(selected)][0]] if to_keep == 0 else \
            weighted_value(results, selected)

    ours = fk.aggregate_krum(results, f, to_keep)
    assert_layers_close(ours, value(exact), max_abs(results), k)
    if to_keep == 0:
        assert all(np.array_equal(a, b) for a, b in zip(ours, results[min(exact)][0]))
    theirs = flower.aggregate_krum(results, f, to_keep)
    assert any(layers_are_close(theirs, value(selected), max_abs(results), k) for selected in admissible)
    assert_same_results(before, results)


def test_krum_ties_go_to_the_first_client():
    rng = np.random.default_rng(5)
    base = make_clients(rng, 4, np.float64)
    clients = [base[0], base[1], copy.deepcopy(base[1]), base[2], base[3], copy.deepcopy(base[1])]
    clients[1] = [layer + 0 for layer in clients[1]]
    results = [(c, i + 1) for i, c in enumerate(clients)]
    theirs = flower.aggregate_krum(results, 1, 0)
    ours = fk.aggregate_krum(results, 1, 0)
    assert_layers_close(ours, theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, clients[1]))
    # Multi-Krum: the three identical clients tie. Which two Flower keeps is up to its sort
    # (and rounding); the values are the same whichever, so only those are compared.
    assert_layers_close(fk.aggregate_krum(results, 1, 2), flower.aggregate_krum(results, 1, 2), 5, 6)
    # fedkern's order among them is its documented one: by index
    records = contents(results)
    assert [id(c) for c in fk.select_multikrum(records, 1, 3)] == [id(records[i]) for i in (1, 2, 5)]


@pytest.mark.parametrize("k,f", [(3, 0), (7, 1), (11, 2), (20, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_bulyan_matches_flower(k, f, dtype):
    # With f = 1 or 2 the last Krum rounds score each client by its one nearest neighbour,
    # so the closest pair always ties: Flower's rounding decides, fedkern takes the first.
    rng = np.random.default_rng(50 + k)
    results = make_results(rng, k, dtype)
    clients = [params for params, _ in results]
    before = unchanged(results)
    exact, admissible = bulyan_selections(clients, f, "difference", iterative=True)
    ours = fk.aggregate_bulyan(results, f, flower.aggregate_krum, to_keep=0)
    assert_same_results(before, results)
    assert_layers_close(ours, bulyan_value(clients, exact, f), max_abs(results), k)
    assert_layers_close(fk.aggregate_bulyan(results, f, fk.aggregate_krum), ours)
    theirs = flower.aggregate_bulyan(list(results), f, flower.aggregate_krum, to_keep=0)
    assert any(layers_are_close(theirs, bulyan_value(clients, selected, f), max_abs(results), k)
               for selected in admissible)
    with pytest.raises(ValueError):
        fk.aggregate_bulyan(results[: 4 * (f + 1) + 2], f + 1, flower.aggregate_krum, to_keep=0)
    with pytest.raises(ValueError):
        fk.aggregate_bulyan(results, f, flower.aggregate_median)


def test_weighted_loss_avg_matches_flower():
    rng = np.random.default_rng(6)
    for k in (1, 7, 50):
        results = [(int(rng.integers(1, 100)), float(rng.random())) for _ in range(k)]
        assert fk.weighted_loss_avg(results) == pytest.approx(flower.weighted_loss_avg(results), rel=1e-12)
    assert fk.weighted_loss_avg([(np.int64(3), np.float32(0.5)), (1, 1.5)]) == pytest.approx(0.75)


@pytest.mark.parametrize("k", [1, 5, 30])
def test_aggregate_qffl_matches_flower(k):
    rng = np.random.default_rng(7 + k)
    parameters = make_clients(rng, 1, np.float64)[0]
    deltas = make_clients(rng, k, np.float64)
    hs = [float(h) for h in rng.random(k) + 0.5]
    assert_layers_close(fk.aggregate_qffl(parameters, deltas, hs), flower.aggregate_qffl(parameters, deltas, hs), 10, k)
    p32, d32 = [p.astype(np.float32) for p in parameters], [[x.astype(np.float32) for x in d] for d in deltas]
    theirs = [np.asarray(x).astype(np.float32) for x in flower.aggregate_qffl(p32, d32, hs)]
    assert_layers_close(fk.aggregate_qffl(p32, d32, hs), theirs, 10, k)


# --------------------------------------------------------------------------- decoding and edge cases
def test_decode_is_a_zero_copy_view_and_matches_np_load():
    rng = np.random.default_rng(140)
    for array in [rng.standard_normal((3, 4)).astype(np.float32), np.array(2.5), np.arange(6, dtype=np.int16),
                  np.asfortranarray(rng.standard_normal((3, 2))), np.zeros((0, 3)), np.array([True, False])]:
        data = ndarrays_to_parameters([array]).tensors[0]
        decoded = _decode(data)
        np.testing.assert_array_equal(decoded, array)
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        if array.size:
            assert np.shares_memory(decoded, np.frombuffer(data, np.uint8))
    with pytest.raises(ValueError):
        _decode(ndarrays_to_parameters([np.ones(4)]).tensors[0][:-8])


def test_zero_d_and_empty_layers_are_kept():
    results = [([np.array(1.0, np.float32), np.zeros((0, 2), np.float32)], 1),
               ([np.array(3.0, np.float32), np.zeros((0, 2), np.float32)], 3)]
    for fn in (fk.aggregate, fk.aggregate_median, lambda r: fk.aggregate_trimmed_avg(r, 0.1),
               lambda r: fk.aggregate_krum(r, 0, 2)):
        out = fn(results)
        assert out[0].shape == () and out[0].dtype == np.float32
        assert out[1].shape == (0, 2)
    assert fk.aggregate(results)[0] == 2.5
    assert fk.aggregate([]) == []
