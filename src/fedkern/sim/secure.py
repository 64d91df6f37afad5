r"""Secure aggregation of a simulated round: the server learns the cohort's sum and nothing else.

With ``Simulation(..., secure_aggregation=SecureAggregation(...))`` every round runs the
protocol of :mod:`fedkern.secagg` (Bonawitz et al., CCS 2017, on the full graph; SecAgg+,
Bell et al., CCS 2020, on a k-regular neighbour graph) between the round's selected
clients and the server: every selected client advertises keys and shares its secrets;
the clients that drop out (the run's ``dropout``) leave before sending their masked
input, and so do those whose update is not finite; the survivors quantise their update to
``levels`` fixed-point levels of [-clip, clip], weight it by an integer (their data size, or
1), mask it and send it; the server removes the masks with the survivors' shares and
takes the weighted mean. The model moves by that mean, which equals quantised FedAvg
over the survivors exactly (the masks cancel in the ring): only the quantisation differs
from plain FedAvg. A round with fewer survivors than the threshold learns nothing
(the server cannot unmask) and is skipped.

The rounding's randomness comes from the round's stream, so runs are reproducible; the
keys come from the operating system's entropy, as they must, and never change a result.
Each record holds the bytes the clients sent (``bytes_up``: masked vectors plus the
protocol's messages), the protocol's share of them (``secagg_bytes``) and the
protocol's wall time (``secagg_seconds``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import _validate as check
from .._errors import FedkernValueError
from .. import secagg

#: The graphs a round can run on: every pair of clients (Bonawitz), or k neighbours each (SecAgg+).
GRAPHS = ("full", "neighbours")
#: Bytes of a client's two advertised X25519 public keys.
_KEYS_BYTES = 64
#: Bytes of one Shamir share sent back in the unmask phase (a point of GF(2^521 - 1), as sent).
_SHARE_BYTES = 66


@dataclass(frozen=True)
class SecureAggregation:
    """How the rounds' updates are securely aggregated.

    Parameters
    ----------
    graph : "full" (every pair of clients masks) or "neighbours" (SecAgg+: ``neighbours``
        per client; a cohort too small for it falls back to the full graph)
    neighbours : k for the "neighbours" graph (even, >= 2)
    threshold : t, the survivors (and shares) needed to unmask; default a majority of a
        client's neighbourhood, n // 2 + 1 on the full graph, (k + 1) // 2 + 1 on SecAgg+'s
    clip, levels : the fixed-point encoding: coordinates clipped to [-clip, clip] and
        rounded stochastically to ``levels`` levels (:func:`fedkern.secagg.ring_quantize`)
    bits : the ring, 32 or 64; default the smallest that holds the sum
    weights : "size" (each update weighted by its client's data size, as FedAvg) or "equal"

    Examples
    --------
    >>> from fedkern.sim import SecureAggregation
    >>> SecureAggregation(graph="neighbours", neighbours=4).threshold_for(20)
    3
    """

    graph: str = "full"
    neighbours: int | None = None
    threshold: int | None = None
    clip: float = 1.0
    levels: int = 2**16
    bits: int | None = None
    weights: str = "size"

    def __post_init__(self) -> None:
        if self.graph not in GRAPHS:
            raise FedkernValueError(f"graph must be one of {GRAPHS}; got {self.graph!r}")
        if (self.graph == "neighbours") != (self.neighbours is not None):
            raise FedkernValueError("neighbours: set it (an even k >= 2) with graph='neighbours', and only then")
        if self.neighbours is not None and (check.count(self.neighbours, "neighbours", low=2) % 2):
            raise FedkernValueError(f"neighbours must be even (a k-regular Harary graph); got {self.neighbours}")
        if self.threshold is not None:
            check.count(self.threshold, "threshold", low=1)
        check.real(self.clip, "clip", low=0.0, low_inclusive=False)
        check.count(self.levels, "levels", low=2)
        if self.bits is not None and self.bits not in secagg.RING_DTYPES:
            raise FedkernValueError(f"bits must be one of {tuple(secagg.RING_DTYPES)}; got {self.bits!r}")
        if self.weights not in ("size", "equal"):
            raise FedkernValueError(f"weights must be 'size' or 'equal'; got {self.weights!r}")

    def neighbours_for(self, n: int) -> int | None:
        """k for a cohort of ``n`` (None: the full graph)."""
        return None if self.neighbours is None or self.neighbours >= n - 1 else self.neighbours

    def threshold_for(self, n: int) -> int:
        """t for a cohort of ``n`` clients."""
        k = self.neighbours_for(n)
        neighbourhood = n if k is None else k + 1
        return min(self.threshold or neighbourhood // 2 + 1, neighbourhood)

    def config(self, n: int, dim: int, max_weight: int, r: int) -> secagg.SecAggConfig:
        """The public parameters of round ``r`` with ``n`` selected clients."""
        bits = self.bits or secagg.ring_bits_needed(n, self.levels, max_weight)
        return secagg.SecAggConfig(n_clients=n, threshold=self.threshold_for(n), dim=dim, clip=self.clip,
                                   levels=self.levels, bits=bits, max_weight=max_weight,
                                   neighbours=self.neighbours_for(n), round=r, graph_seed=r)


def recoverable(config: secagg.SecAggConfig, survivors: list[int]) -> bool:
    """Whether the server can unmask when only ``survivors`` send their masked input: every
    client's secret (a survivor's self-mask seed, a dropped client's mask key) needs at
    least t shares among the survivors that hold one."""
    alive = set(survivors)
    return len(alive) >= config.threshold and all(
        len(config.holders_of(u) & alive) >= config.threshold for u in range(config.n_clients))


def secure_mean(settings: SecureAggregation, n: int, dim: int, survivors: list[int], rows: list[np.ndarray],
                weights: np.ndarray, seeds: np.ndarray, max_weight: int, r: int,
                backend: str | None = None) -> tuple[np.ndarray | None, dict]:
    """One round of the protocol among ``n`` selected clients (ids 0 .. n - 1).

    Client ``survivors[j]`` sends ``rows[j]`` with integer weight ``weights[j]`` (<=
    ``max_weight``) rounded with seed ``seeds[j]``; the others drop after sharing their
    keys. Returns the survivors' weighted mean (float32; None when it cannot be unmasked,
    see :func:`recoverable`, or the weights are all 0) and the round's ``bytes_up``,
    ``secagg_bytes`` and ``secagg_seconds``.
    """
    start = time.perf_counter()
    config = settings.config(n, dim, max_weight, r)
    clients = [secagg.Client(i, config) for i in range(n)]
    server = secagg.Server(config, backend=backend)
    advertised = [c.advertise_keys() for c in clients]
    keys = server.receive_keys(advertised)
    shared = [c.share_keys(keys[c.client_id]) for c in clients]
    routed = server.receive_shares(shared)
    protocol = _KEYS_BYTES * n + sum(len(ct) + len(m.commitment) for m in shared for ct in m.ciphertexts.values())
    alive = [int(i) for i in survivors]
    masked_bytes = len(alive) * (dim + 1) * config.dtype.itemsize
    stats = {"bytes_up": protocol + masked_bytes, "secagg_bytes": protocol}
    if not recoverable(config, alive):
        stats["secagg_seconds"] = time.perf_counter() - start
        return None, stats
    request = server.receive_masked([clients[i].masked_input(row, routed[i], weight=int(w), seed=int(s), backend=backend)
                                     for i, row, w, s in zip(alive, rows, weights, seeds)])
    responses = {i: clients[i].unmask(request) for i in alive}
    server.unmask(responses)
    share_bytes = _SHARE_BYTES * sum(len(shares) for shares in responses.values())
    stats["bytes_up"] += share_bytes
    stats["secagg_bytes"] += share_bytes
    mean = server.mean() if server.total_weight else None
    stats["secagg_seconds"] = time.perf_counter() - start
    return (None if mean is None else mean.astype(np.float32)), stats
