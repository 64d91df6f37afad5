"""fedkern.compat.flwr against Flower's own helpers and strategies.

Every function is compared with Flower's function of the same name on random inputs
(ragged layer lists with 0-d layers, float32/float64, K from 1 to 50, counts as int and
np.int64). Tolerance (``assert_close``): dtypes and shapes equal, and
``|ours - flower| <= 8 * K * eps(dtype) * max(1, max |input|)``: Flower accumulates in the
layer's dtype, one rounding per client, where fedkern sums in float64 and rounds once.
Selections (Krum, Multi-Krum, Bulyan) must pick the same clients.

Each defect of Flower's helpers that fedkern fixes has a test showing Flower's function
misbehaving and fedkern's not (``test_defect_*``); the README table lists them. Flower
is optional: without it these tests are skipped, except the one that checks that the
module imports without Flower.
"""
import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fedkern
from fedkern.compat import flwr as fk


@pytest.fixture(autouse=True)
def _needs_flower(request):
    if "without_flower" not in request.node.name:
        pytest.importorskip("flwr")


try:
    import flwr.server.strategy as legacy_strategies
    import flwr.server.strategy.aggregate as flower
    import flwr.serverapp.strategy as message_strategies
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_proxy import ClientProxy
    from flwr.serverapp.strategy import bulyan as flower_bulyan
    from flwr.serverapp.strategy import fedtrimmedavg as flower_trimmed
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    from flwr.serverapp.strategy import strategy_utils as flower_utils
except ImportError:  # every test but the import one is skipped
    flower = None

SHAPES = [(3, 4), (), (5,), (2, 1, 3), (1,), (7,)]


# --------------------------------------------------------------------------- helpers
def make_clients(rng, k, dtype=np.float32, shapes=SHAPES, scale=1.0, center=0.0):
    return [[np.asarray(center + scale * rng.standard_normal(s)).astype(dtype) for s in shapes] for _ in range(k)]


def make_results(rng, k, dtype=np.float32, counts=int, **kw):
    clients = make_clients(rng, k, dtype, **kw)
    return [(c, counts(rng.integers(1, 500))) for c in clients]


def assert_close(ours, theirs, inputs_max=1.0, k=1):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = np.asarray(b)
        assert isinstance(a, np.ndarray)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        eps = np.finfo(a.dtype).eps if a.dtype.kind == "f" else 0
        np.testing.assert_allclose(a, b, rtol=0, atol=8 * k * eps * max(1.0, inputs_max))


def max_abs(results):
    return max(float(np.max(np.abs(layer))) if layer.size else 0.0 for params, _ in results for layer in params)


class _Proxy(ClientProxy if flower is not None else object):
    """The smallest real ClientProxy: strategies only carry it along."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def fit_results(results):
    return [(_Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), int(n), {}))
            for i, (params, n) in enumerate(results)]


def reply(i, arrays, n, extra_metrics=None):
    content = RecordDict({
        "arrays": ArrayRecord({f"layer{j}": Array(np.asarray(a)) for j, a in enumerate(arrays)}),
        "metrics": MetricRecord({"num-examples": n, **(extra_metrics or {})}),
    })
    metadata = Metadata(run_id=1, message_id=f"reply{i}", src_node_id=i + 1, dst_node_id=0,
                        reply_to_message_id=f"ins{i}", group_id="1", created_at=0.0, ttl=3600.0,
                        message_type=MessageType.TRAIN)
    return Message(metadata=metadata, content=content)


def contents(results):
    return [reply(i, params, int(n)).content for i, (params, n) in enumerate(results)]


def unchanged(results):
    return copy.deepcopy(results)


def assert_same_results(before, after):
    assert len(before) == len(after)
    for (p0, n0), (p1, n1) in zip(before, after):
        assert n0 == n1 and len(p0) == len(p1)
        for a, b in zip(p0, p1):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- import
def test_compat_imports_without_flower():
    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import numpy as np\n"
        "from fedkern.compat import flwr as fk\n"
        "out = fk.aggregate([([np.ones(2, np.float32)], 1), ([np.zeros(2, np.float32)], 3)])\n"
        "assert out[0].tolist() == [0.25, 0.25], out\n"
        "try:\n"
        "    fk.install()\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('install() without Flower must raise ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- legacy helpers vs Flower
@pytest.mark.parametrize("k", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_matches_flower(k, dtype):
    rng = np.random.default_rng(k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    assert_close(fk.aggregate(results), flower.aggregate(results), max_abs(results), k)
    assert_same_results(before, results)


def test_aggregate_np_int64_counts_match_flower_values():
    rng = np.random.default_rng(1)
    results = make_results(rng, 6, np.float64, counts=np.int64)
    assert_close(fk.aggregate(results), flower.aggregate(results), max_abs(results), 6)


def test_aggregate_integer_layer_as_flower():
    results = [([np.array([1, 2], np.int64), np.ones(2, np.float32)], 1), ([np.array([4, 4], np.int64), np.zeros(2, np.float32)], 2)]
    assert_close(fk.aggregate(results), flower.aggregate(results), 4, 2)


@pytest.mark.parametrize("k", [1, 4, 25])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_inplace_matches_flower(k, dtype):
    rng = np.random.default_rng(10 + k)
    results = make_results(rng, k, dtype)
    fits = fit_results(results)
    ours = fk.aggregate_inplace(fits)
    assert_close(ours, flower.aggregate_inplace(fit_results(results)), max_abs(results), k)
    assert all(a.flags.writeable for a in ours)
    assert_same_results(results, [(parameters_to_ndarrays(f.parameters), f.num_examples) for _, f in fits])


@pytest.mark.parametrize("k", [1, 2, 5, 12, 50])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_median_matches_flower(k, dtype):
    rng = np.random.default_rng(20 + k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    assert_close(fk.aggregate_median(results), flower.aggregate_median(results), max_abs(results), 1)
    assert_same_results(before, results)


@pytest.mark.parametrize("k", [1, 3, 10, 29, 50])
@pytest.mark.parametrize("proportion", [0.0, 0.1, 0.29, 0.45])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_trimmed_avg_matches_flower(k, proportion, dtype):
    rng = np.random.default_rng(30 + k)
    results = make_results(rng, k, dtype)
    assert_close(fk.aggregate_trimmed_avg(results, proportion), flower.aggregate_trimmed_avg(results, proportion),
                 max_abs(results), k)


def test_trimmed_floor_of_float_product():
    # 0.29 * 100 == 28.999999999999996: Flower cuts 28 per side, so must fedkern
    rng = np.random.default_rng(3)
    results = make_results(rng, 100, np.float64, shapes=[(4,)])
    assert_close(fk.aggregate_trimmed_avg(results, 0.29), flower.aggregate_trimmed_avg(results, 0.29), 5, 100)
    with pytest.raises(ValueError):
        fk.aggregate_trimmed_avg(results, 0.5)


@pytest.mark.parametrize("k,f", [(1, 0), (2, 0), (5, 1), (10, 2), (30, 5), (50, 10)])
@pytest.mark.parametrize("to_keep", [0, 1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_krum_matches_flower(k, f, to_keep, dtype):
    rng = np.random.default_rng(40 + k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    to_keep = min(to_keep, k)
    assert_close(fk.aggregate_krum(results, f, to_keep), flower.aggregate_krum(results, f, to_keep),
                 max_abs(results), k)
    assert_same_results(before, results)


def test_krum_ties_go_to_the_first_client():
    rng = np.random.default_rng(5)
    base = make_clients(rng, 4, np.float64)
    clients = [base[0], base[1], copy.deepcopy(base[1]), base[2], base[3], copy.deepcopy(base[1])]
    clients[1] = [layer + 0 for layer in clients[1]]
    results = [(c, i + 1) for i, c in enumerate(clients)]
    theirs = flower.aggregate_krum(results, 1, 0)
    ours = fk.aggregate_krum(results, 1, 0)
    assert_close(ours, theirs)
    assert all(np.array_equal(a, b) for a, b in zip(ours, clients[1]))
    # Multi-Krum: the three identical clients tie; the first two by index are kept, as in Flower
    assert_close(fk.aggregate_krum(results, 1, 2), flower.aggregate_krum(results, 1, 2), 5, 6)


@pytest.mark.parametrize("k,f", [(3, 0), (7, 1), (11, 2), (20, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_bulyan_matches_flower(k, f, dtype):
    rng = np.random.default_rng(50 + k)
    results = make_results(rng, k, dtype)
    before = unchanged(results)
    ours = fk.aggregate_bulyan(results, f, flower.aggregate_krum, to_keep=0)
    assert_same_results(before, results)
    theirs = flower.aggregate_bulyan(list(results), f, flower.aggregate_krum, to_keep=0)
    assert_close(ours, theirs, max_abs(results), k)
    assert_close(fk.aggregate_bulyan(results, f, fk.aggregate_krum), theirs, max_abs(results), k)
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
    assert_close(fk.aggregate_qffl(parameters, deltas, hs), flower.aggregate_qffl(parameters, deltas, hs), 10, k)
    p32, d32 = [p.astype(np.float32) for p in parameters], [[x.astype(np.float32) for x in d] for d in deltas]
    theirs = [np.asarray(x).astype(np.float32) for x in flower.aggregate_qffl(p32, d32, hs)]
    assert_close(fk.aggregate_qffl(p32, d32, hs), theirs, 10, k)


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
    assert_close(ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays(), max_abs(results), k)


def test_aggregate_arrayrecords_float_weights_and_int_arrays():
    records = [reply(0, [np.array([1, 3]), np.ones(2, np.float32)], 0.25).content,
               reply(1, [np.array([5, 5]), np.zeros(2, np.float32)], 0.75).content]
    assert_close(fk.aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays(),
                 flower_utils.aggregate_arrayrecords(records, "num-examples").to_numpy_ndarrays(), 5, 2)


@pytest.mark.parametrize("k", [1, 4, 15])
def test_compute_distances_exact(k):
    rng = np.random.default_rng(70 + k)
    results = make_results(rng, k, np.float64)
    records = [c["arrays"] for c in contents(results)]
    ours = fk.compute_distances(records)
    flat = np.array([np.concatenate([layer.ravel() for layer in params]) for params, _ in results])
    exact = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(ours, exact, rtol=1e-13, atol=0)
    assert ours.dtype == np.float64 and (np.diag(ours) == 0).all() and (ours == ours.T).all()
    np.testing.assert_allclose(ours, flower_multikrum.compute_distances(records), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k,f,m", [(1, 0, 1), (4, 1, 1), (10, 2, 4), (30, 3, 30), (50, 12, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_multikrum_matches_flower(k, f, m, dtype):
    rng = np.random.default_rng(80 + k)
    records = contents(make_results(rng, k, dtype))
    ours = fk.select_multikrum(records, f, m)
    theirs = flower_multikrum.select_multikrum(records, f, m)
    assert [id(c) for c in ours] == [id(c) for c in theirs]


@pytest.mark.parametrize("k,beta", [(1, 1), (5, 3), (8, 4), (8, 2), (21, 13)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aggregate_n_closest_weights_matches_flower(k, beta, dtype):
    rng = np.random.default_rng(90 + k)
    clients = make_clients(rng, k, dtype)
    median = [np.median(np.stack(layers), axis=0) for layers in zip(*clients)]
    other = make_clients(rng, 1, dtype)[0]
    for ref in (median, other):
        ours = fk.aggregate_n_closest_weights(ref, clients, beta)
        theirs = flower_bulyan.aggregate_n_closest_weights(ref, clients, beta)
        assert_close(ours, theirs, 5, k)


@pytest.mark.parametrize("k", [1, 4, 17])
@pytest.mark.parametrize("cut", [0.0, 0.1, 0.25, 0.49])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trim_mean_matches_flower(k, cut, dtype):
    rng = np.random.default_rng(100 + k)
    for shape in [(k,), (k, 6), (k, 2, 3)]:
        array = rng.standard_normal(shape).astype(dtype)
        before = array.copy()
        assert_close([fk.trim_mean(array, cut)], [flower_trimmed.trim_mean(array, cut)], 5, k)
        np.testing.assert_array_equal(array, before)
    with pytest.raises(ValueError):
        fk.trim_mean(array, 0.5)


# --------------------------------------------------------------------------- strategies, with and without patched()
def _params(rng, dtype=np.float32):
    return make_clients(rng, 1, dtype, shapes=[(4, 3), (3,), ()])[0]


def _legacy_results(rng, k=7, dtype=np.float32, center=None):
    results = make_results(rng, k, dtype, shapes=[(4, 3), (3,), ()])
    if center is not None:
        results = [([c + x for c, x in zip(center, params)], n) for params, n in results]
    return results


LEGACY = {
    "FedAvg": lambda init: legacy_strategies.FedAvg(),
    "FedAvg-copy": lambda init: legacy_strategies.FedAvg(inplace=False),
    "FedAvgM": lambda init: legacy_strategies.FedAvgM(initial_parameters=init, server_momentum=0.9),
    "FedAdam": lambda init: legacy_strategies.FedAdam(initial_parameters=init),
    "FedYogi": lambda init: legacy_strategies.FedYogi(initial_parameters=init),
    "FedAdagrad": lambda init: legacy_strategies.FedAdagrad(initial_parameters=init),
    "FedProx": lambda init: legacy_strategies.FedProx(proximal_mu=0.1),
    "FedMedian": lambda init: legacy_strategies.FedMedian(),
    "FedTrimmedAvg": lambda init: legacy_strategies.FedTrimmedAvg(beta=0.2),
    "Krum": lambda init: legacy_strategies.Krum(num_malicious_clients=1),
    "MultiKrum": lambda init: legacy_strategies.Krum(num_malicious_clients=1, num_clients_to_keep=3),
    "Bulyan": lambda init: legacy_strategies.Bulyan(num_malicious_clients=1, to_keep=0),
}


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_strategy_same_with_and_without_patch(name):
    rng = np.random.default_rng(110)
    init = _params(rng)
    rounds = [_legacy_results(rng) for _ in range(2)]

    def run():
        strategy = LEGACY[name](ndarrays_to_parameters(init))
        outputs = []
        for server_round, results in enumerate(rounds, start=1):
            params, _ = strategy.aggregate_fit(server_round, fit_results(results), [])
            outputs.append(parameters_to_ndarrays(params))
        return outputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = run()
        with fk.patched():
            assert legacy_strategies.fedavg.aggregate is fk.aggregate
            assert legacy_strategies.bulyan.aggregate_bulyan is fk.aggregate_bulyan
            ours = run()
    assert legacy_strategies.fedavg.aggregate is flower.aggregate
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_legacy_qfedavg_and_evaluate_same_with_and_without_patch():
    rng = np.random.default_rng(111)
    init = _params(rng, np.float64)
    results = _legacy_results(rng, dtype=np.float64, center=init)
    evaluations = [(int(rng.integers(1, 50)), float(rng.random())) for _ in range(5)]

    def run():
        strategy = legacy_strategies.QFedAvg(evaluate_fn=lambda rnd, params, config: (0.5, {}))
        strategy.pre_weights = [p.copy() for p in init]
        params, _ = strategy.aggregate_fit(1, fit_results(results), [])
        from flwr.common import EvaluateRes
        loss, _ = legacy_strategies.FedAvg().aggregate_evaluate(
            1, [(_Proxy(str(i)), EvaluateRes(Status(Code.OK, ""), loss, n, {})) for i, (n, loss) in enumerate(evaluations)], [])
        return parameters_to_ndarrays(params), loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = run()
        with fk.patched():
            ours = run()
    assert ours[1] == pytest.approx(theirs[1], rel=1e-12)
    for a, b in zip(ours[0], theirs[0]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


MESSAGE = {
    "FedAvg": lambda: message_strategies.FedAvg(),
    "FedAvgM": lambda: message_strategies.FedAvgM(server_momentum=0.9),
    "FedAdam": lambda: message_strategies.FedAdam(),
    "FedYogi": lambda: message_strategies.FedYogi(),
    "FedAdagrad": lambda: message_strategies.FedAdagrad(),
    "FedProx": lambda: message_strategies.FedProx(),
    "FedMedian": lambda: message_strategies.FedMedian(),
    "FedTrimmedAvg": lambda: message_strategies.FedTrimmedAvg(beta=0.2),
    "Krum": lambda: message_strategies.Krum(num_malicious_nodes=1),
    "MultiKrum": lambda: message_strategies.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    "Bulyan": lambda: message_strategies.Bulyan(num_malicious_nodes=1),
}


@pytest.mark.parametrize("name", list(MESSAGE))
def test_message_strategy_same_with_and_without_patch(name):
    rng = np.random.default_rng(120)
    init = _params(rng)
    rounds = [_legacy_results(rng, k=9, center=init) for _ in range(2)]

    def run():
        strategy = MESSAGE[name]()
        global_model = ArrayRecord({f"layer{j}": Array(np.asarray(a)) for j, a in enumerate(init)})
        if isinstance(strategy, message_strategies.FedAvgM):  # keeps the global model (set by configure_train)
            strategy.current_arrays = global_model
        elif hasattr(strategy, "current_arrays"):  # the FedOpt family keeps it as numpy arrays
            strategy.current_arrays = {key: array.numpy() for key, array in global_model.items()}
        outputs = []
        for server_round, results in enumerate(rounds, start=1):
            replies = [reply(i, params, int(n), {"loss": float(i)}) for i, (params, n) in enumerate(results)]
            arrays, metrics = strategy.aggregate_train(server_round, replies)
            outputs.append((arrays.to_numpy_ndarrays(), dict(metrics)))
        return outputs

    theirs = run()
    with fk.patched():
        assert flower_utils.aggregate_arrayrecords is fk.aggregate_arrayrecords
        assert message_strategies.fedavg.aggregate_arrayrecords is fk.aggregate_arrayrecords
        assert message_strategies.fedmedian.np.median is not np.median
        ours = run()
    assert message_strategies.fedavg.aggregate_arrayrecords is flower_utils.aggregate_arrayrecords
    assert message_strategies.fedmedian.np is np
    for (a, ma), (b, mb) in zip(ours, theirs):
        assert ma == pytest.approx(mb)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_install_nests_and_restores():
    originals = {name: getattr(flower, name) for name in ("aggregate", "aggregate_krum", "aggregate_bulyan")}
    fk.install()
    fk.install()
    assert fk.installed() and flower.aggregate is fk.aggregate
    assert legacy_strategies.krum.aggregate_krum is fk.aggregate_krum
    assert flower_multikrum.select_multikrum is fk.select_multikrum
    assert flower_trimmed.trim_mean is fk.trim_mean
    fk.uninstall()
    assert fk.installed() and flower.aggregate is fk.aggregate
    fk.uninstall()
    fk.uninstall()  # extra uninstall is harmless
    assert not fk.installed()
    for name, original in originals.items():
        assert getattr(flower, name) is original
    assert legacy_strategies.fedavgm.aggregate is originals["aggregate"]
    assert flower_multikrum.select_multikrum is not fk.select_multikrum
    with pytest.raises(RuntimeError), fk.patched():
        raise RuntimeError
    assert not fk.installed() and flower.aggregate is originals["aggregate"]


# --------------------------------------------------------------------------- Flower's defects, fixed
def test_defect_aggregate_inplace_zeroes_integer_layers():
    results = [([np.array(100, np.int64), np.ones(2, np.float32)], 30),
               ([np.array(300, np.int64), np.zeros(2, np.float32)], 10)]
    theirs = flower.aggregate_inplace(fit_results(results))
    assert theirs[0] == 0  # Flower: num_batches_tracked multiplied by a factor cast to int 0
    ours = fk.aggregate_inplace(fit_results(results))
    assert ours[0].dtype == np.int64 and ours[0] == 150
    assert_close(ours[1:], theirs[1:])


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
    # Two NaN replies: every Flower score is NaN, and np.argsort keeps reply 0, a NaN one.
    rng = np.random.default_rng(131)
    results = _with_bad_client(rng, 6, np.nan, 0)
    results[2][0][0][1] = np.nan
    records = contents(results)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = flower_multikrum.select_multikrum(records, 0, 1)
    assert theirs[0] is records[0]
    ours = fk.select_multikrum(records, 0, 1)
    assert ours[0] is not records[0] and ours[0] is not records[2]
    assert len(fk.select_multikrum(records, 0, 6)) == 4  # only finite replies are ever selected


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
    # Honest updates of a model far from the origin: float32 Gram distances lose every
    # digit (|x|^2 ~ 1e8, distances ~ 1e-2), go negative and make Flower keep the outlier.
    rng = np.random.default_rng(0)
    k, d = 7, 1000
    center = np.full(d, 300.0, np.float32)
    honest = [center + np.float32(0.003) * rng.standard_normal(d).astype(np.float32) for _ in range(k - 1)]
    outlier = center + np.float32(0.02) * rng.standard_normal(d).astype(np.float32)
    clients = honest[:3] + [outlier] + honest[3:]
    records = contents([([c], 1) for c in clients])
    theirs = flower_multikrum.compute_distances([r["arrays"] for r in records])
    assert (theirs < 0).any()
    ours = fk.compute_distances([r["arrays"] for r in records])
    assert (ours >= 0).all() and ours[3].sum() > ours[0].sum()
    their_choice = flower_multikrum.select_multikrum(records, 1, 1)[0]
    our_choice = fk.select_multikrum(records, 1, 1)[0]
    assert their_choice is records[3]  # the outlier
    assert our_choice is not records[3]


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
    assert_close(ours, [np.asarray(x).astype(np.float32) for x in flower.aggregate(results)], max_abs(results), 4)


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
    assert_close(fk.aggregate_krum(results, 0, 5), everyone, max_abs(results), 4)


def test_defect_bulyan_strategy_default_arguments():
    rng = np.random.default_rng(138)
    results = _legacy_results(rng)
    with pytest.raises(TypeError):  # Flower's Bulyan() calls aggregate_krum without to_keep
        legacy_strategies.Bulyan(num_malicious_clients=1).aggregate_fit(1, fit_results(results), [])
    with fk.patched():
        params, _ = legacy_strategies.Bulyan(num_malicious_clients=1).aggregate_fit(1, fit_results(results), [])
    assert_close(parameters_to_ndarrays(params), flower.aggregate_bulyan(list(results), 1, flower.aggregate_krum, to_keep=0),
                 max_abs(results), 7)


def test_defect_all_zero_counts_give_nan():
    results = [([np.ones(2)], 0), ([np.zeros(2)], 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(flower.aggregate(results)[0]).all()
    with pytest.raises(ValueError, match="all zero"):
        fk.aggregate(results)


# --------------------------------------------------------------------------- decoding and edge cases
def test_decode_is_a_zero_copy_view_and_matches_np_load():
    rng = np.random.default_rng(140)
    for array in [rng.standard_normal((3, 4)).astype(np.float32), np.array(2.5), np.arange(6, dtype=np.int16),
                  np.asfortranarray(rng.standard_normal((3, 2))), np.zeros((0, 3)), np.array([True, False])]:
        data = ndarrays_to_parameters([array]).tensors[0]
        decoded = fk._decode(data)
        np.testing.assert_array_equal(decoded, array)
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        if array.size:
            assert np.shares_memory(decoded, np.frombuffer(data, np.uint8))
    with pytest.raises(ValueError):
        fk._decode(ndarrays_to_parameters([np.ones(4)]).tensors[0][:-8])


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
