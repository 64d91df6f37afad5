"""fedkern.compat.flwr's install() / uninstall() / patched(): Flower's own strategies on fedkern.

Each strategy of both API generations runs the same rounds with and without
``patched()``: exact aggregates must give Flower's bits, the rest agree to the tolerance
of ``helpers.assert_layers_close`` or are checked against the selections exact arithmetic
admits (``helpers.robust_outcomes``). Also: install() nests and restores, the ``np.median``
stand-in, and the package imports without Flower (the one test that runs without it).
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fedkern.compat import flwr as fk
from fedkern.compat.flwr._patching import _median_like_numpy
from helpers import (
    LEGACY_ROBUST, MESSAGE_ROBUST, assert_layers_close, client_proxy, fit_results, layers_are_close, legacy_results,
    make_clients, reply, robust_outcomes,
)

try:
    import flwr.server.strategy as legacy_strategies
    import flwr.server.strategy.aggregate as flower
    import flwr.serverapp.strategy as message_strategies
    from flwr.app import Array, ArrayRecord
    from flwr.common import Code, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.serverapp.strategy import fedtrimmedavg as flower_trimmed
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    from flwr.serverapp.strategy import strategy_utils as flower_utils
    HAVE_FLOWER = True
except ImportError:  # every test but the import one is skipped
    HAVE_FLOWER = False

needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="needs Flower (pip install flwr)")


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


# --------------------------------------------------------------------------- strategies, with and without patched()
# The strategies' updates lie on the grid 2^-10 (|x| <= 4; the Message API's, centred on
# the global model, <= 8) and their example counts sum to 512. Then Flower's float32
# weighted mean is exact: each n x (or x * n/512) has at most 22 significant bits, every
# partial sum is a multiple of 2^-10 (2^-19) below 2^13 and the division is by a power of
# two; fedkern's float64 sum, rounded once, is exact too. Both give the same bits, so the
# FedAvg family, and the server optimisers after it (Flower's code either way), must agree
# bit for bit on any machine. Krum, Multi-Krum and Bulyan are checked round by round
# against the selections rounding cannot change (krum_selections, bulyan_selections).
GRID = 2.0 ** -10
STRATEGY_SHAPES = [(4, 3), (3,), ()]


def _grid_params(rng):
    return [np.clip(np.round(rng.standard_normal(shape) / GRID) * GRID, -4, 4).astype(np.float32)
            for shape in STRATEGY_SHAPES]


def _grid_results(rng, k=7, center=None):
    counts = 1 + rng.multinomial(512 - k, np.full(k, 1 / k))
    results = []
    for n in counts:
        params = _grid_params(rng)
        if center is not None:
            params = [np.asarray(c + x) for c, x in zip(center, params)]
        results.append((params, int(n)))
    return results


def _params(rng, dtype=np.float32):
    return make_clients(rng, 1, dtype, shapes=[(4, 3), (3,), ()])[0]


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


@needs_flower
@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_strategy_same_with_and_without_patch(name):
    rng = np.random.default_rng(110)
    init = _grid_params(rng)
    rounds = [_grid_results(rng) for _ in range(2)]

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
    for results, a, b in zip(rounds, ours, theirs):
        if name in LEGACY_ROBUST:
            exact, admissible = robust_outcomes("legacy", name, results)
            assert_layers_close(a, exact, 4, len(results))
            assert any(layers_are_close(b, value, 4, len(results)) for value in admissible)
        elif name == "FedTrimmedAvg":  # a mean of 5 values, rounded once by each
            assert_layers_close(a, b, 4, len(results))
        else:  # exact aggregates: the same bits
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)


@needs_flower
def test_legacy_qfedavg_and_evaluate_same_with_and_without_patch():
    rng = np.random.default_rng(111)
    init = _params(rng, np.float64)
    results = legacy_results(rng, dtype=np.float64, center=init)
    evaluations = [(int(rng.integers(1, 50)), float(rng.random())) for _ in range(5)]

    def run():
        strategy = legacy_strategies.QFedAvg(evaluate_fn=lambda rnd, params, config: (0.5, {}))
        strategy.pre_weights = [p.copy() for p in init]
        params, _ = strategy.aggregate_fit(1, fit_results(results), [])
        from flwr.common import EvaluateRes
        loss, _ = legacy_strategies.FedAvg().aggregate_evaluate(
            1, [(client_proxy(str(i)), EvaluateRes(Status(Code.OK, ""), loss, n, {})) for i, (n, loss) in enumerate(evaluations)], [])
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


@needs_flower
@pytest.mark.parametrize("name", list(MESSAGE))
def test_message_strategy_same_with_and_without_patch(name):
    rng = np.random.default_rng(120)
    init = _grid_params(rng)
    rounds = [_grid_results(rng, k=9, center=init) for _ in range(2)]

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
    for results, (a, ma), (b, mb) in zip(rounds, ours, theirs):
        if name in MESSAGE_ROBUST:
            (exact, exact_loss), admissible = robust_outcomes("message", name, results)
            assert_layers_close(a, exact, 8, len(results))
            assert ma["loss"] == pytest.approx(exact_loss, rel=1e-12)
            assert any(layers_are_close(b, value, 8, len(results)) and mb["loss"] == pytest.approx(loss, rel=1e-12)
                       for value, loss in admissible)
            continue
        assert ma == pytest.approx(mb)
        if name == "FedTrimmedAvg":  # a mean of 7 values, rounded once by each
            assert_layers_close(a, b, 8, len(results))
        else:  # exact aggregates: the same bits
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)


@needs_flower
@pytest.mark.parametrize("k", [5, 6])
def test_message_fedmedian_orders_nan_as_inf_in_every_layer_0d_too(k):
    # FedMedian calls np.median(np.stack(layers), axis=0); with install() every layer must
    # take fedkern's median, where NaN is ordered as +inf (README, "Non-finite updates"),
    # so one NaN client poisons no layer. A 0-d layer stacks to a 1-D array (iterating it
    # gives numpy scalars, not arrays): it must not fall back to np.median.
    rng = np.random.default_rng(121)
    clients = [[rng.standard_normal((2, 3)).astype(np.float32), np.asarray(rng.standard_normal(), np.float32),
                rng.standard_normal(4).astype(np.float32)] for _ in range(k)]
    for layer in clients[1]:
        layer[...] = np.nan
    replies = [reply(i, params, 10 + i) for i, params in enumerate(clients)]
    with fk.patched():
        arrays, _ = message_strategies.FedMedian().aggregate_train(1, replies)
    for j, layer in enumerate(arrays.to_numpy_ndarrays()):
        stacked = np.stack([params[j] for params in clients])
        # NaN as +inf: with one NaN of k the middle values are finite clients' (exact order
        # statistics, or for even k their midpoint, rounded once by both)
        expected = np.median(np.where(np.isnan(stacked), np.inf, stacked), axis=0)
        assert layer.shape == stacked.shape[1:] and layer.dtype == np.float32
        assert np.isfinite(layer).all()
        np.testing.assert_array_equal(layer, expected)
    # the stand-in for np.median itself: a 0-d result is a numpy scalar, as np.median's
    zero_d = np.stack([params[1] for params in clients])
    result = _median_like_numpy(zero_d, axis=0)
    assert np.ndim(result) == 0 and not isinstance(result, np.ndarray) and np.isfinite(result)


@needs_flower
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
