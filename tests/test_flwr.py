"""fedkern.compat.flwr against Flower's own helpers and strategies.

Every function is compared with Flower's function of the same name on random inputs
(ragged layer lists with 0-d layers, float32/float64, K from 1 to 50, counts as int and
np.int64). Tolerance (``assert_close``): dtypes and shapes equal, and
``|ours - flower| <= 8 * K * eps(dtype) * max(1, max |input|)``: Flower accumulates in the
layer's dtype, one rounding per client, where fedkern sums in float64 and rounds once.
Selections (Krum, Multi-Krum, Bulyan, the closest values to a median) are checked against
exact arithmetic: fedkern's must be the exact one, Flower's one that its rounding can
produce under any BLAS and CPU (``krum_selections``); with the data used both are the
exact one except at exact ties. No assertion rests on how a peer or BLAS rounds.

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


def is_close(theirs, expected, inputs_max=1.0, k=1):
    """Whether two layer lists agree as assert_close requires (dtypes, shapes, values)."""
    if len(theirs) != len(expected):
        return False
    for a, b in zip(theirs, expected):
        a, b = np.asarray(a), np.asarray(b)
        eps = np.finfo(a.dtype).eps if a.dtype.kind == "f" else 0
        if a.shape != b.shape or a.dtype != b.dtype or \
                not np.allclose(a, b, rtol=0, atol=8 * k * eps * max(1.0, inputs_max)):
            return False
    return True


# --------------------------------------------------------------------------- selections rounding cannot change
# Flower computes Krum distances in the model's dtype, the Message API in the Gram form
# through BLAS, so its rounding, and with it any near-tie, depends on the BLAS kernel and
# the CPU. A selection is therefore never compared with Flower's directly. From the exact
# distances (integer arithmetic on the inputs' exact values) and a bound on the error of
# ANY evaluation of Flower's formula, a client is an admissible pick among the candidates
# if its exact score minus its bound does not exceed the least exact score plus bound:
# Flower's pick (the least computed score) always is one. Flower's result must be the
# result of an admissible selection; fedkern's must be the result of the exact selection
# (ties to the lower index), which the same bounds for float64 arithmetic show it makes.
# When no two scores are within the bounds (the usual case) both are the exact one.

UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float64): 2.0 ** -53}


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u). A sum or dot product of n terms evaluated in any
    order (sequential, pairwise, blocked, with FMA or wider registers) is within
    gamma_n * sum |terms| of the exact one."""
    return n * u / (1 - n * u)


class ExactGeometry:
    """Exact squared distances between K clients' updates, and bounds on a peer's error.

    The inputs are read exactly, as integers over a common power-of-two denominator, so
    distances, norms and Krum scores are exact integers and an exact tie is a tie.
    ``error(i, j, how)`` bounds |computed - exact| for the squared distance of clients i
    and j computed in the inputs' dtype (unit roundoff u) over d coordinates by

    * ``"difference"``, legacy Flower's ``np.linalg.norm(x - y) ** 2``: d roundings of the
      differences, a dot product, a sqrt and a square: gamma_{d+5} t;
    * ``"gram"``, Message-API Flower's ``|x|^2 + |y|^2 - 2 x.y``: the two norms, their sum
      and the dot product (2 |x.y| <= |x|^2 + |y|^2) are each within gamma_{d+1}
      (|x|^2 + |y|^2) of the exact ones, and the result is rounded once more:
      2 gamma_{d+1} (|x|^2 + |y|^2) + u t;
    * ``"fedkern"``: float64 differences and sums, gamma_{d+5} t with float64's u;

    each doubled for the second-order terms.
    """

    def __init__(self, clients):
        flat = [np.concatenate([np.asarray(layer).ravel() for layer in layers]) for layers in clients]
        self.dtype = np.result_type(*flat)
        self.k, self.d = len(flat), flat[0].size
        ratios = [[float(v).as_integer_ratio() for v in row] for row in flat]
        den = max([q for row in ratios for _, q in row], default=1)
        ints = [[p * (den // q) for p, q in row] for row in ratios]
        self.den2 = den * den
        self.t = [[sum((a - b) ** 2 for a, b in zip(xi, xj)) for xj in ints] for xi in ints]
        self.norms = [sum(a * a for a in xi) for xi in ints]

    def value(self, integer):
        return integer / self.den2  # correctly rounded

    def error(self, i, j, how):
        t = self.value(self.t[i][j])
        if how == "gram":
            u = UNIT_ROUNDOFF[self.dtype]
            return 2 * (2 * gamma(self.d + 1, u) * self.value(self.norms[i] + self.norms[j]) + u * t)
        u = UNIT_ROUNDOFF[np.dtype(np.float64)] if how == "fedkern" else UNIT_ROUNDOFF[self.dtype]
        return 2 * gamma(self.d + 5, u) * t

    def krum(self, candidates, f, how):
        """Exact Krum scores of ``candidates`` among themselves and bounds on a computed score.

        A computed score sums the s = max(1, n - f - 2) smallest computed distances after
        the least one (the client itself): each order statistic of a row moves no more than
        the row's entries, at most beta_i = max_j error(i, j), and the sum (float64 for
        legacy Flower and fedkern, the dtype for the Message API) adds gamma_s of it.
        """
        s = max(1, len(candidates) - f - 2)
        u = UNIT_ROUNDOFF[self.dtype if how == "gram" else np.dtype(np.float64)]
        scores, bounds = {}, {}
        for i in candidates:
            scores[i] = sum(sorted(self.t[i][j] for j in candidates if j != i)[:s])
            beta = max(self.error(i, j, how) for j in candidates)
            bounds[i] = s * beta + 2 * gamma(s, u) * (self.value(scores[i]) + s * beta)
        return scores, bounds

    def admissible(self, scores, bounds, candidates):
        best = min(self.value(scores[j]) + bounds[j] for j in candidates)
        return [i for i in candidates if self.value(scores[i]) - bounds[i] <= best]

    def exact_pick(self, candidates, f, how):
        """The exact Krum winner (lower index on ties), checking that fedkern's float64
        rounding cannot pick another: only exact ties are within fedkern's bounds."""
        scores, _ = self.krum(candidates, f, how)
        _, fk_bounds = self.krum(candidates, f, "fedkern")
        pick = min(candidates, key=lambda i: (scores[i], i))
        tied = {i for i in candidates if scores[i] == scores[pick]}
        assert set(self.admissible(scores, fk_bounds, candidates)) == tied, "a near tie for fedkern: other data"
        return pick


def krum_selections(clients, f, m, how, ordered=False):
    """(the exact Multi-Krum selection of m clients, every selection ``how`` admits).

    Scores are computed once over all clients and the m least kept: the computed order
    takes, m times, the least computed score among the clients left, an admissible pick.
    A selection is a tuple (``ordered``, best first) or a frozenset.
    """
    g = ExactGeometry(clients)
    m = min(m, g.k)
    everyone = list(range(g.k))
    scores, bounds = g.krum(everyone, f, how)
    _, fk_bounds = g.krum(everyone, f, "fedkern")
    exact = sorted(everyone, key=lambda i: (scores[i], i))[:m]
    for p, pick in enumerate(exact):  # fedkern's float64 rounding cannot reorder them
        rest = [i for i in everyone if i not in exact[:p]]
        tied = {i for i in rest if scores[i] == scores[pick]}
        assert set(g.admissible(scores, fk_bounds, rest)) == tied, "a near tie for fedkern: use other data"
    outcomes, seen = set(), set()

    def walk(prefix, rest):
        key = tuple(prefix) if ordered else frozenset(prefix)
        if key in seen:
            return
        seen.add(key)
        if len(prefix) == m:
            outcomes.add(key)
            return
        for i in g.admissible(scores, bounds, rest):
            walk(prefix + [i], [j for j in rest if j != i])
        assert len(seen) < 20_000, "too many near ties to enumerate: use other data"

    walk([], everyone)
    return (tuple(exact) if ordered else frozenset(exact)), outcomes


def bulyan_selections(clients, f, how, iterative):
    """(fedkern's exact Bulyan selection, every selection ``how`` admits), as frozensets.

    Legacy Flower (``iterative``) picks theta = K - 2f clients one Krum at a time among
    those left, scores recomputed over them; the Message API keeps the theta least scores
    of one Multi-Krum. Which clients are left is all that a later pick depends on.
    """
    g = ExactGeometry(clients)
    theta = g.k - 2 * f
    if not iterative:
        return krum_selections(clients, f, theta, how)
    everyone = list(range(g.k))
    exact = []
    for _ in range(theta):
        exact.append(g.exact_pick([i for i in everyone if i not in exact], f, how))
    outcomes, seen = set(), set()

    def walk(chosen):
        if chosen in seen:
            return
        seen.add(chosen)
        if len(chosen) == theta:
            outcomes.add(chosen)
            return
        rest = [i for i in everyone if i not in chosen]
        scores, bounds = g.krum(rest, f, how)
        for i in g.admissible(scores, bounds, rest):
            walk(chosen | {i})

    walk(frozenset())
    return frozenset(exact), outcomes


def closest_mean(layers, beta, ref=None):
    """Per coordinate, the mean of the ``beta`` values closest to ``ref`` (default: their
    median), in the layers' dtype, checking that rounding cannot change which values.

    A peer's reference (the median is an order statistic or a rounded midpoint) and its
    |x - ref| are each within 2u max(|x|, |ref|) of the exact ones, so the beta-th and
    (beta+1)-th exact distances must be more than 8u max(|x|, |ref|) apart, unless every
    value whose side of the cut could change is the same value.
    """
    dtype = np.result_type(*layers)
    x = np.stack([np.asarray(layer, np.float64).ravel() for layer in layers])
    center = np.median(x, axis=0) if ref is None else np.asarray(ref, np.float64).ravel()
    dist = np.abs(x - center)
    order = np.argsort(dist, axis=0, kind="stable")
    if beta < len(x):
        ranked = np.take_along_axis(dist, order, axis=0)
        slack = 4 * UNIT_ROUNDOFF[np.dtype(dtype)] * np.maximum(np.abs(x).max(axis=0), np.abs(center))
        lo, hi = ranked[beta - 1], ranked[beta]
        near = (dist >= lo - 2 * slack) & (dist <= hi + 2 * slack)
        same = np.where(near, x, np.inf).min(axis=0) == np.where(near, x, -np.inf).max(axis=0)
        assert ((hi - lo > 2 * slack) | same).all(), "a near tie at the cut: use other data"
    mean = np.take_along_axis(x, order[:beta], axis=0).mean(axis=0)
    return mean.reshape(np.shape(layers[0])).astype(dtype)


def bulyan_value(clients, selected, f):
    """Bulyan's result for a selection: per coordinate, the mean of the theta - 2f selected
    values closest to their median."""
    beta = len(selected) - 2 * f
    chosen = [clients[i] for i in sorted(selected)]
    return [closest_mean(list(layers), beta) for layers in zip(*chosen)]


def weighted_value(results, selected):
    """The example-weighted mean of the selected clients' layers, in their dtype."""
    n = np.array([float(results[i][1]) for i in selected])
    out = []
    for layers in zip(*[results[i][0] for i in selected]):
        x = np.stack([np.asarray(layer, np.float64) for layer in layers])
        out.append((np.tensordot(n, x, axes=1) / n.sum()).astype(np.result_type(*layers)))
    return out


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
    assert_close(ours, value(exact), max_abs(results), k)
    if to_keep == 0:
        assert all(np.array_equal(a, b) for a, b in zip(ours, results[min(exact)][0]))
    theirs = flower.aggregate_krum(results, f, to_keep)
    assert any(is_close(theirs, value(selected), max_abs(results), k) for selected in admissible)
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
    # Multi-Krum: the three identical clients tie. Which two Flower keeps is up to its sort
    # (and rounding); the values are the same whichever, so only those are compared.
    assert_close(fk.aggregate_krum(results, 1, 2), flower.aggregate_krum(results, 1, 2), 5, 6)
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
    assert_close(ours, bulyan_value(clients, exact, f), max_abs(results), k)
    assert_close(fk.aggregate_bulyan(results, f, fk.aggregate_krum), ours)
    theirs = flower.aggregate_bulyan(list(results), f, flower.aggregate_krum, to_keep=0)
    assert any(is_close(theirs, bulyan_value(clients, selected, f), max_abs(results), k)
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
        assert_close(fk.aggregate_n_closest_weights(ref, clients, beta), expected, 5, k)
        theirs = flower_bulyan.aggregate_n_closest_weights(ref, clients, beta)
        assert_close([np.asarray(x) for x in theirs], expected, 5, k)


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


#: Krum-family strategies: (f, clients kept; None for Bulyan) as configured below
LEGACY_ROBUST = {"Krum": (1, 0), "MultiKrum": (1, 3), "Bulyan": (1, None)}
MESSAGE_ROBUST = {"Krum": (1, 1), "MultiKrum": (1, 3), "Bulyan": (1, None)}


def robust_outcomes(api, name, results):
    """(fedkern's exact result, every result Flower's rounding admits) for one round of a
    Krum-family strategy: lists of layers, with the Message API (layers, loss) pairs where
    loss is the example-weighted mean of the selected replies' losses (reply i's is i)."""
    f, keep = (LEGACY_ROBUST if api == "legacy" else MESSAGE_ROBUST)[name]
    clients = [params for params, _ in results]
    how = "difference" if api == "legacy" else "gram"
    if keep is None:
        exact, admissible = bulyan_selections(clients, f, how, iterative=api == "legacy")
    else:
        exact, admissible = krum_selections(clients, f, max(keep, 1), how)

    def value(selected):  # Krum's is the one client's layers
        return bulyan_value(clients, selected, f) if keep is None else weighted_value(results, selected)

    def loss(selected):
        return sum(results[i][1] * i for i in selected) / sum(results[i][1] for i in selected)

    if api == "legacy":
        return value(exact), [value(selected) for selected in admissible]
    return (value(exact), loss(exact)), [(value(selected), loss(selected)) for selected in admissible]


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
            assert_close(a, exact, 4, len(results))
            assert any(is_close(b, value, 4, len(results)) for value in admissible)
        elif name == "FedTrimmedAvg":  # a mean of 5 values, rounded once by each
            assert_close(a, b, 4, len(results))
        else:  # exact aggregates: the same bits
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)


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
            assert_close(a, exact, 8, len(results))
            assert ma["loss"] == pytest.approx(exact_loss, rel=1e-12)
            assert any(is_close(b, value, 8, len(results)) and mb["loss"] == pytest.approx(loss, rel=1e-12)
                       for value, loss in admissible)
            continue
        assert ma == pytest.approx(mb)
        if name == "FedTrimmedAvg":  # a mean of 7 values, rounded once by each
            assert_close(a, b, 8, len(results))
        else:  # exact aggregates: the same bits
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)


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
    result = fk._median_like_numpy(zero_d, axis=0)
    assert np.ndim(result) == 0 and not isinstance(result, np.ndarray) and np.isfinite(result)


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
    exact, admissible = robust_outcomes("legacy", "Bulyan", results)
    assert_close(parameters_to_ndarrays(params), exact, max_abs(results), 7)
    theirs = flower.aggregate_bulyan(list(results), 1, flower.aggregate_krum, to_keep=0)
    assert any(is_close(theirs, value, max_abs(results), 7) for value in admissible)


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
