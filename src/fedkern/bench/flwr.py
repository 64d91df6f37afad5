"""Cases of the Flower drop-in: ``fedkern.compat.flwr`` beside Flower's own helpers.

Flower is imported only when a case is made, so listing the cases needs no Flower.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from .cases import Case, size_label


def cnn_shapes(d: int) -> list[tuple[int, ...]]:
    """Layer shapes of a small CNN (convolutions, biases, a dense layer sized to bring the
    total to about ``d``, a 0-d scalar): what Flower clients send."""
    convs = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,)]
    if d >= 200_000:
        convs += [(64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,)]
    head = [(10, 128), (10,), ()]
    used = sum(int(np.prod(s)) for s in convs + head) + 128
    return convs + [(max(1, (d - used) // 128), 128), (128,)] + head


def flwr_results(k: int, d: int, seed: int = 0) -> list[tuple[list[np.ndarray], int]]:
    """K clients' (float32 layer list, example count), as Flower's legacy helpers take them."""
    rng = np.random.default_rng(seed)
    shapes = cnn_shapes(d)
    return [([rng.standard_normal(s, dtype=np.float32) for s in shapes], int(rng.integers(1, 500)))
            for _ in range(k)]


FLWR_OPS = ("flwr.aggregate", "flwr.aggregate_inplace", "flwr.aggregate_arrayrecords", "flwr.aggregate_median",
            "flwr.aggregate_trimmed_avg", "flwr.aggregate_krum", "flwr.select_multikrum", "flwr.aggregate_bulyan")


def flwr_case(op: str, k: int, d: int) -> Case:
    """A helper of ``fedkern.compat.flwr`` on a CNN-like model; peer: Flower's own helper.

    Flower is imported only when the case is made, so listing the cases needs no Flower.
    """

    def make():
        build, ours, theirs = _flwr_calls(k)[op]
        data = build(flwr_results(k, d))

        def call(backend):
            with backends.use_backend(backend):
                return ours(data)

        call.peer = lambda: theirs(data)
        return call

    return Case(op, size_label(k, d), 4 * k * d, make, "flower", package="flwr")


def _flwr_calls(k: int) -> dict:
    """op: (input builder, fedkern call, Flower call), for K clients."""
    import flwr.server.strategy.aggregate as flower
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    from flwr.serverapp.strategy import strategy_utils as flower_utils

    from ..compat import flwr as fk

    f = max(1, (k - 3) // 8)  # Bulyan needs K >= 4f + 3

    def fit_results(results):
        return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(p), n, {})) for p, n in results]

    def contents(results):
        return [RecordDict({"arrays": ArrayRecord({f"l{j}": Array(a) for j, a in enumerate(p)}),
                            "metrics": MetricRecord({"num-examples": n})}) for p, n in results]

    def same(results):
        return results

    return {
        "flwr.aggregate": (same, fk.aggregate, flower.aggregate),
        "flwr.aggregate_inplace": (fit_results, fk.aggregate_inplace, flower.aggregate_inplace),
        "flwr.aggregate_arrayrecords": (contents, lambda c: fk.aggregate_arrayrecords(c, "num-examples"),
                                        lambda c: flower_utils.aggregate_arrayrecords(c, "num-examples")),
        "flwr.aggregate_median": (same, fk.aggregate_median, flower.aggregate_median),
        "flwr.aggregate_trimmed_avg": (same, lambda r: fk.aggregate_trimmed_avg(r, 0.2),
                                       lambda r: flower.aggregate_trimmed_avg(r, 0.2)),
        "flwr.aggregate_krum": (same, lambda r: fk.aggregate_krum(r, f, 0), lambda r: flower.aggregate_krum(r, f, 0)),
        "flwr.select_multikrum": (contents, lambda c: fk.select_multikrum(c, f, k // 2),
                                  lambda c: flower_multikrum.select_multikrum(c, f, k // 2)),
        # Flower's Bulyan pops the selected clients out of its argument: a fresh list each call
        "flwr.aggregate_bulyan": (same, lambda r: fk.aggregate_bulyan(r, f, fk.aggregate_krum),
                                  lambda r: flower.aggregate_bulyan(list(r), f, flower.aggregate_krum, to_keep=0)),
    }
