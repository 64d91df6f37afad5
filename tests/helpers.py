"""The one module of shared test helpers: tolerances, and the Flower tests' inputs and oracles.

Test files import it as ``from helpers import ...`` (tests/ is on ``sys.path``, as for
``from conftest import ...``). It imports no Flower at import time: the Flower helpers
import what they build when called, so any test file may use this module.

Tolerances, one function per meaning, each docstring saying exactly what it asserts:

* :func:`assert_layers_close` (and the predicate :func:`layers_are_close`): two lists of
  layers with equal dtypes and shapes, ``|ours - theirs| <= 8 * K * eps(dtype) *
  max(1, max |input|)``: the gap between Flower, which accumulates in the layer's dtype
  with one rounding per client, and fedkern, which sums in float64 and rounds once;
* :func:`assert_close_dtype_rtol`: one result against an oracle with a relative
  tolerance of the dtype's order and an absolute one proportional to the inputs' scale
  (the robust-family tests);
* :func:`assert_close_float64_sum`: a float64-accumulated sum rounded once to its dtype,
  per coordinate, NaN counting as a mismatch (the aggregate-family tests).

For the Flower tests: Flower-shaped inputs (:func:`make_results`, :func:`fit_results`,
:func:`contents`, ...), and selections (Krum, Multi-Krum, Bulyan, the closest values to a
median) checked against exact arithmetic: fedkern's must be the exact one, Flower's one
that its rounding can produce under any BLAS and CPU (:func:`krum_selections`); with the
data used both are the exact one except at exact ties. No assertion rests on how a peer
or BLAS rounds.
"""
import functools

import numpy as np


# --------------------------------------------------------------------------- tolerances
def assert_layers_close(ours, theirs, inputs_max=1.0, k=1):
    """Two lists of layers agree as fedkern and Flower must.

    Same length; every ``ours[i]`` is an ``np.ndarray`` of the same shape and dtype as
    ``np.asarray(theirs[i])``; and ``|ours - theirs| <= 8 * k * eps * max(1, inputs_max)``
    elementwise (``rtol=0``), with ``eps`` the machine epsilon of a float dtype and 0 for
    any other (integer layers must be equal); NaN matches NaN. ``k`` is the number of
    clients, ``inputs_max`` the largest ``|input|``: Flower rounds once per client in the
    layer's dtype, fedkern once in float64.
    """
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = np.asarray(b)
        assert isinstance(a, np.ndarray)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        eps = np.finfo(a.dtype).eps if a.dtype.kind == "f" else 0
        np.testing.assert_allclose(a, b, rtol=0, atol=8 * k * eps * max(1.0, inputs_max))


def layers_are_close(theirs, expected, inputs_max=1.0, k=1):
    """Whether two layer lists agree as :func:`assert_layers_close` requires (dtypes, shapes,
    values), except that no item of ``theirs`` needs to be an ``np.ndarray``."""
    if len(theirs) != len(expected):
        return False
    for a, b in zip(theirs, expected):
        a, b = np.asarray(a), np.asarray(b)
        eps = np.finfo(a.dtype).eps if a.dtype.kind == "f" else 0
        if a.shape != b.shape or a.dtype != b.dtype or \
                not np.allclose(a, b, rtol=0, atol=8 * k * eps * max(1.0, inputs_max)):
            return False
    return True


def assert_close_dtype_rtol(actual, expected, dtype, scale=1.0):
    """``actual`` is within a relative tolerance of ``dtype``'s order of ``expected``.

    ``np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)`` with
    ``rtol = 2e-6`` when ``dtype`` is float32 and ``1e-12`` otherwise: elementwise
    ``|actual - expected| <= rtol * scale + rtol * |expected|``; shapes equal (a scalar
    against every element is allowed), NaN matching NaN at the same positions and
    infinities matching infinities of the same sign. ``scale`` is the magnitude of the inputs (e.g.
    the largest finite ``|x|``), so results near 0 are held to ``rtol`` of it. Used by the
    robust rules' tests.
    """
    rtol = 2e-6 if np.dtype(dtype) == np.float32 else 1e-12
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_close_float64_sum(actual, expected, scale, dtype):
    """``actual`` ~ ``expected`` for a sum accumulated in float64 and rounded once to ``dtype``.

    Both are read as float64 and must have the same shape (no broadcasting). Elementwise,
    ``|actual - expected| <= rtol * |expected| + 1e-14 * scale + smallest_subnormal(dtype)``
    with ``rtol = 1e-6`` when ``dtype`` is float32 and ``1e-12`` otherwise; ``scale``
    (scalar or per coordinate) is the magnitude of the summed terms, e.g. ``sum_i |w_i x_ij|``.
    A NaN or an infinity anywhere in either counts as a mismatch (``inf - inf`` is NaN, and
    NaN is never within a tolerance); the message names how many values differ and the
    first. Used by the aggregation tests: backends and oracles agree to a few float64 ulps
    of ``scale`` before the final rounding, and a float32 result may then differ by one
    float32 ulp.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    rtol = 1e-6 if np.dtype(dtype) == np.float32 else 1e-12
    tol = rtol * np.abs(expected) + 1e-14 * np.asarray(scale) + np.finfo(dtype).smallest_subnormal
    bad = ~(np.abs(actual - expected) <= tol)  # NaN counts as a mismatch
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} values differ; first at {tuple(np.argwhere(bad)[0])}: "
        f"{actual[bad][0]!r} != {expected[bad][0]!r}"
    )


# --------------------------------------------------------------------------- Flower-shaped inputs
SHAPES = [(3, 4), (), (5,), (2, 1, 3), (1,), (7,)]


def make_clients(rng, k, dtype=np.float32, shapes=SHAPES, scale=1.0, center=0.0):
    return [[np.asarray(center + scale * rng.standard_normal(s)).astype(dtype) for s in shapes] for _ in range(k)]


def make_results(rng, k, dtype=np.float32, counts=int, **kw):
    clients = make_clients(rng, k, dtype, **kw)
    return [(c, counts(rng.integers(1, 500))) for c in clients]


def max_abs(results):
    return max(float(np.max(np.abs(layer))) if layer.size else 0.0 for params, _ in results for layer in params)


@functools.cache
def _client_proxy_class():
    from flwr.server.client_proxy import ClientProxy

    class StubClientProxy(ClientProxy):
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

    return StubClientProxy


def client_proxy(cid):
    """A ``ClientProxy`` (Flower's class) named ``cid`` whose methods raise: strategies only carry it."""
    return _client_proxy_class()(cid)


def fit_results(results):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    return [(client_proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), int(n), {}))
            for i, (params, n) in enumerate(results)]


def reply(i, arrays, n, extra_metrics=None):
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

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


def legacy_results(rng, k=7, dtype=np.float32, center=None):
    results = make_results(rng, k, dtype, shapes=[(4, 3), (3,), ()])
    if center is not None:
        results = [([c + x for c, x in zip(center, params)], n) for params, n in results]
    return results


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


#: Krum-family strategies: (f, clients kept; None for Bulyan) as test_flwr_patching's
#: LEGACY and MESSAGE configure them
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
