"""One row per public op: what every test, benchmark and README table loops over.

A row names the op, its kernel family and the kernels it runs, builds example inputs for
any K, D and dtype, says how many bytes the op must move and which established
implementation (if any) it is measured against. From these rows come ``fedkern.__all__``,
the registry-driven tests (parity with the reference, no input mutated, thread-count
independence, ``out=``/``dtype=``, no bad input reaching a kernel), the cases of
``fedkern bench`` and ``benchmarks/``, and the README's benchmark tables.

Adding an op is its kernels in each backend, one public function, and one row here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import aggregate, optim, privacy, robust
from . import secagg
from . import compress

#: An op's example inputs: positional and keyword arguments, without ``backend``.
Example = tuple[tuple, dict]


@dataclass(frozen=True)
class Peer:
    """An established implementation the op is measured against, on the same data.

    ``make(stack)`` gets the float updates stacked into one (K, D) array (done before
    timing), or with ``stacked=False`` the op's positional arguments as they are (the
    encoded messages of a compression op), and returns a no-argument call; ``package`` is
    the optional package it needs.
    """

    name: str
    make: Callable[[Any], Callable[[], Any]]
    package: str | None = None
    stacked: bool = True


@dataclass(frozen=True)
class OpSpec:
    """One public op.

    Attributes
    ----------
    name : the public name (``fedkern.<name>``)
    family : kernel family (``fedkern._<backend>.<family>``)
    kernels : the family's kernels the op runs
    example : ``example(rng, k, d, dtype)`` -> (args, kwargs), inputs with K updates of D
        coordinates (or one D-vector, for ops on one vector)
    run : ``run(backend, *args, **kwargs)`` -> the op's result (default: call
        ``fedkern.<name>`` with ``backend=``)
    stateful : for an op that keeps state between calls (an optimizer's step),
        ``stateful(backend)`` builds one such callable: each test call gets a fresh one,
        the bench keeps one per backend, as a server does
    min_k : the smallest K the example accepts
    nbytes : ``nbytes(k, d)`` bytes of float32 data the op must move at least
    peer : the implementation ``fedkern bench`` compares with, if any
    mutates : argument positions the op documents to update in place
    out : the shape kind ``out=`` takes: "vector" (D,), "matrix" (K, D), or None
    ulps : agreement with the reference in units of the result dtype's eps, relative to
        the inputs' magnitude (0: bit-identical)
    per_update : whether the op takes K updates (False: one D-vector)
    streaming : whether it takes the K updates one at a time, validating each as it comes
        (so the good ones before a bad one legitimately reach the kernels)
    variants : named keyword arguments that ``fedkern bench`` runs, each as a case of its
        own, instead of the example's
    package : the optional package the op itself needs (its bench case is skipped without it)
    """

    name: str
    family: str
    kernels: tuple[str, ...]
    example: Callable[[np.random.Generator, int, int, np.dtype], Example]
    run: Callable[..., Any] | None = None
    stateful: Callable[[str | None], Callable[..., Any]] | None = None
    min_k: int = 1
    nbytes: Callable[[int, int], int] = lambda k, d: 4 * k * d + 4 * d
    peer: Peer | None = None
    mutates: tuple[int, ...] = ()
    out: str | None = "vector"
    ulps: float = 8.0
    per_update: bool = True
    streaming: bool = False
    variants: dict[str, dict] = field(default_factory=dict)
    package: str | None = None

    def __call__(self, backend: str | None, *args, **kwargs):
        if self.stateful is not None:
            return self.stateful(backend)(*args, **kwargs)
        if self.run is not None:
            return self.run(backend, *args, **kwargs)
        return _public(self.name)(*args, backend=backend, **kwargs)


def _public(name: str):
    for module in (aggregate, optim, robust, privacy):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(name)


# --------------------------------------------------------------------------- examples
def updates(rng: np.random.Generator, k: int, d: int, dtype) -> list[np.ndarray]:
    """K client updates as separate rows (what clients send), unit normal."""
    return [rng.standard_normal(d).astype(dtype) for _ in range(k)]


def _with_updates(**kwargs) -> Callable[[np.random.Generator, int, int, np.dtype], Example]:
    """An example of K updates plus fixed keyword arguments (values may be callables of K, D)."""

    def example(rng, k, d, dtype):
        return (updates(rng, k, d, dtype),), {key: value(k, d) if callable(value) else value
                                               for key, value in kwargs.items()}

    return example


def _byzantine(k: int, d: int) -> int:
    """f for a rule on K updates: a tenth of them, at least one where K allows."""
    return max(1, k // 10)


def _vector(rng, k, d, dtype):
    (row,) = updates(rng, 1, d, dtype)
    return row


def _accumulate_example(rng, k, d, dtype):
    return (np.zeros(d), _vector(rng, k, d, dtype), 0.5), {}


def _stream(backend, rows, weights) -> np.ndarray:
    """Accumulator: the updates added one at a time, then their float64 weighted mean."""
    acc = aggregate.Accumulator(max(len(rows[0]) if len(rows) else 0, 1), np.float64, backend=backend)
    for row, weight in zip(rows, weights):
        acc.add(row, weight)
    return acc.mean()


def _optimizer_example(rng, k, d, dtype):
    return (np.zeros(d, dtype), 1e-3 * _vector(rng, k, d, dtype)), {}


def _stack_syrk(stack: np.ndarray) -> Callable[[], Any]:
    return lambda: stack @ stack.T


def _trim_mean(stack: np.ndarray) -> Callable[[], Any]:
    from scipy.stats import trim_mean  # only this peer needs scipy

    return lambda: trim_mean(stack, 0.1, axis=0)


SYRK = Peer("BLAS syrk", _stack_syrk)


def _stack_gemv(stack: np.ndarray) -> Callable[[], Any]:
    """The weighted mean as BLAS computes it on the stacked updates: w @ X, float32
    weights (float64 ones would make numpy convert the whole stack first)."""
    k = stack.shape[0]
    w = (np.arange(1.0, k + 1) / (k * (k + 1) / 2)).astype(stack.dtype)
    return lambda: w @ stack


def _numpy_clip_sum(stack: np.ndarray) -> Callable[[], Any]:
    """Clip-and-sum as a numpy user writes it: norms, scales, one matrix-vector product."""
    clip = _clip(*stack.shape)

    def run():
        norms = np.linalg.norm(stack, axis=1)
        return (clip / np.maximum(norms, clip)) @ stack

    return run


def _numpy_noise(stack: np.ndarray) -> Callable[[], Any]:
    """Gaussian noise as a numpy user adds it: float32 normals from a Generator, then a sum."""
    x, rng = stack, np.random.default_rng(0)
    return lambda: x + rng.standard_normal(x.shape[0], dtype=x.dtype)


def _clip(k: int, d: int) -> float:
    """A clipping norm that clips about half the (unit-normal) example updates."""
    return float(np.sqrt(d))


def _noise_example(rng, k, d, dtype):
    return (_vector(rng, k, d, dtype), 0.5, 7), {}


def _optimizer_spec(cls: type, vectors: int) -> OpSpec:
    """A server optimizer's step; ``vectors``: D-vectors read plus written per step."""
    kernel = {optim.FedAvg: "accumulate", optim.FedAvgM: "momentum_step"}.get(cls, "adaptive_step")
    return OpSpec(f"{cls.__name__}.step", "optim", (kernel,),
                  _optimizer_example, stateful=lambda backend: cls(backend=backend).step, nbytes=lambda k, d: 4 * vectors * d,
                  mutates=(0,), out=None, ulps=0.0, per_update=False)


OPS: tuple[OpSpec, ...] = (
    OpSpec("weighted_sum", "aggregate", ("weighted_sum",),
           lambda rng, k, d, dtype: ((updates(rng, k, d, dtype), np.arange(1.0, k + 1)), {})),
    OpSpec("weighted_mean", "aggregate", ("weighted_sum",),
           lambda rng, k, d, dtype: ((updates(rng, k, d, dtype), np.arange(1.0, k + 1)), {}),
           peer=Peer("BLAS w @ X (stacked)", _stack_gemv)),
    OpSpec("accumulate", "aggregate", ("count_nonfinite", "accumulate"), _accumulate_example,
           nbytes=lambda k, d: 4 * d + 2 * 8 * d, mutates=(0,), out=None, per_update=False),
    OpSpec("l2_norms", "aggregate", ("l2_norms",), _with_updates(), nbytes=lambda k, d: 4 * k * d, out=None),
    OpSpec("clip_by_norm", "aggregate", ("clip_by_norm",),
           _with_updates(max_norm=lambda k, d: 0.5 * float(np.sqrt(d))),  # about half the rows clipped
           nbytes=lambda k, d: 2 * 4 * k * d, out="matrix"),
    OpSpec("Accumulator", "aggregate", ("count_nonfinite", "accumulate"),
           lambda rng, k, d, dtype: ((updates(rng, k, d, dtype), np.arange(1.0, k + 1)), {}),
           run=lambda backend, rows, weights: _stream(backend, rows, weights), out=None, streaming=True),
    _optimizer_spec(optim.FedAvg, 3),
    _optimizer_spec(optim.FedAvgM, 5),
    _optimizer_spec(optim.FedAdagrad, 7),
    _optimizer_spec(optim.FedAdam, 7),
    _optimizer_spec(optim.FedYogi, 7),
    OpSpec("median", "robust", ("trimmed_mean",), _with_updates(),
           peer=Peer("np.median", lambda stack: lambda: np.median(stack, axis=0)), ulps=0.0),
    OpSpec("trimmed_mean", "robust", ("trimmed_mean",), _with_updates(beta=0.1),
           peer=Peer("scipy.trim_mean", _trim_mean, "scipy")),
    OpSpec("meamed", "robust", ("meamed",), _with_updates(f=_byzantine), min_k=3),
    OpSpec("pairwise_sq_distances", "robust", ("exact_sq_distances", "gather_tile"), _with_updates(),
           nbytes=lambda k, d: 4 * k * d, peer=SYRK, out=None,
           variants={"gram": dict(method="gram"), "exact": dict(method="exact")}),
    OpSpec("krum", "robust", ("exact_sq_distances", "exact_sq_rows", "gather_tile", "weighted_sum"),
           _with_updates(f=_byzantine), min_k=5, peer=SYRK,
           variants={"auto": {}, "gram": dict(method="gram"), "exact": dict(method="exact")}),
    OpSpec("bulyan", "robust", ("exact_sq_distances", "exact_sq_rows", "gather_tile", "meamed"),
           _with_updates(f=_byzantine), min_k=7, peer=SYRK),
    # a fixed number of iterations, so every backend does the same work; three in the tests,
    # before Weiszfeld nears an update, where 1 / distance amplifies any rounding difference
    OpSpec("geometric_median", "robust", ("weighted_sum", "sq_distances_to"),
           _with_updates(maxiter=3, tol=0.0), ulps=64.0, variants={"maxiter=10": dict(maxiter=10)}),
    # from the origin, with a radius that clips about half the (unit-variance) updates
    OpSpec("centered_clipping", "robust", ("sq_distances_to", "weighted_sum"),
           lambda rng, k, d, dtype: ((updates(rng, k, d, dtype), np.zeros(d, dtype), float(np.sqrt(d))),
                                     dict(iterations=3))),
    OpSpec("nearest_neighbor_mixing", "robust", ("exact_sq_distances", "gather_tile"),
           _with_updates(f=_byzantine), min_k=3, out="matrix"),
    OpSpec("bucketing", "robust", ("weighted_sum",), _with_updates(s=2, seed=0), out=None),
    OpSpec("adaptive_clipping", "robust", ("l2_norms", "clip_by_norm"), _with_updates(f=_byzantine),
           min_k=3, out="matrix"),
    OpSpec("clip_and_accumulate", "privacy", ("clip_and_sum",), _with_updates(clip=_clip),
           peer=Peer("numpy norms + scaled sum", _numpy_clip_sum)),
    # the same bits on every backend: the stream is defined exactly, with no libm in it
    OpSpec("add_gaussian_noise", "privacy", ("count_nonfinite", "gaussian_noise"), _noise_example,
           nbytes=lambda k, d: 2 * 4 * d, peer=Peer("numpy Generator.standard_normal", _numpy_noise),
           ulps=0.0, per_update=False),
)


def _ring_of(dtype) -> int:
    """The ring a float dtype's example runs in: float32 -> uint32, float64 -> uint64."""
    return 32 if np.dtype(dtype) == np.float32 else 64


def _quantize_example(rng, k, d, dtype):
    return (_vector(rng, k, d, dtype), 2.0, 2**12, 7), dict(weight=3, bits=_ring_of(dtype))


def _ring_example(rng, k, d, dtype):
    ring = secagg.RING_DTYPES[_ring_of(dtype)]
    return rng.integers(0, np.iinfo(ring).max, d, dtype=ring, endpoint=True)


def _masks_example(rng, k, d, dtype):
    keys = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(max(k, 1))]
    return (_ring_example(rng, k, d, dtype), keys, [1 if i % 2 else -1 for i in range(len(keys))]), {}


def _run(function):
    return lambda backend, *args, **kwargs: function(*args, backend=backend, **kwargs)


# secure aggregation: ring results, bit-identical on every backend
OPS += (
    OpSpec("ring_quantize", "secagg", ("count_nonfinite", "quantize"), _quantize_example, run=_run(secagg.ring_quantize),
           nbytes=lambda k, d: 2 * 4 * d, out=None, ulps=0.0, per_update=False),
    OpSpec("add_masks", "secagg", ("add_masks",), _masks_example, run=_run(secagg.add_masks),
           nbytes=lambda k, d: 4 * (k + 2) * d, out=None, ulps=0.0, per_update=False, package="cryptography"),
    OpSpec("ring_dequantize", "secagg", ("dequantize",),
           lambda rng, k, d, dtype: ((_ring_example(rng, k, d, dtype), 2.0, 2**12), {}), run=_run(secagg.ring_dequantize),
           nbytes=lambda k, d: 2 * 4 * d, ulps=0.0, per_update=False),
)


def _encoded_example(make_codec):
    """K updates, each encoded by ``make_codec(d)`` with its own seed, and weights 1 .. K."""

    def example(rng, k, d, dtype):
        codec = make_codec(d)
        return ([codec.encode(row, seed=i) for i, row in enumerate(updates(rng, k, d, dtype))],
                np.arange(1.0, k + 1)), {}

    return example


def _top_k(d: int):
    return compress.TopK(max(1, d // 100))


def _add_at(args):
    """numpy's unbuffered scatter-add of every client's weighted sparse values into one
    float64 sum, what a server without a fused kernel writes. Random-k's indices are given
    to it, drawn beforehand: fedkern's op draws them from the seeds inside the timing."""
    encoded, weights = args
    out = np.zeros(encoded[0].d)
    codec = encoded[0].codec
    if isinstance(codec, compress.RandomK):
        indices = [codec.indices(e.d, e.seed).astype(np.intp) for e in encoded]
        scale = encoded[0].d / codec.k
    else:
        indices, scale = [e.indices.astype(np.intp) for e in encoded], 1.0

    def call():
        out[:] = 0.0
        for index, e, w in zip(indices, encoded, weights):
            np.add.at(out, index, (w * scale) * e.values.astype(np.float64))
        return out

    return call


def _encode_8bit(backend, x, seed):
    """What one client sends of x, 8-bit in blocks of 256: its codes and scales."""
    encoded = compress.StochasticQuantizer(bits=8, block_size=256).encode(x, seed=seed, backend=backend)
    return encoded.codes, encoded.scales


def _encode_rotated_2bit(backend, x, seed):
    """What one client sends of x, randomly rotated and then 2-bit in blocks of 256."""
    encoded = compress.Rotated(compress.StochasticQuantizer(bits=2, block_size=256), seed=3).encode(
        x, seed=seed, backend=backend)
    return encoded.inner.codes, encoded.inner.scales


# compression: the fused decode-and-accumulate reads only the compressed bytes and writes
# the float32 result once (its float64 accumulator is a chunk in L2); an encode is counted
# on its float32 input, the figure its target names
OPS += (
    OpSpec("compress.encode", "compress", ("block_stats", "quantize"),
           lambda rng, k, d, dtype: ((_vector(rng, k, d, dtype), 5), {}), run=_encode_8bit,
           nbytes=lambda k, d: 4 * d, out=None, ulps=0.0, per_update=False),
    OpSpec("compress.encode/rotated", "compress", ("scale_by_signs", "fwht", "block_stats", "quantize"),
           lambda rng, k, d, dtype: ((_vector(rng, k, d, dtype), 5), {}), run=_encode_rotated_2bit,
           nbytes=lambda k, d: 4 * d, out=None, ulps=0.0, per_update=False),
    OpSpec("compress.accumulate", "compress", ("accumulate_quantized",),
           _encoded_example(lambda d: compress.StochasticQuantizer(bits=8, block_size=256)),
           run=_run(compress.accumulate), nbytes=lambda k, d: k * d + k * 8 * (d // 256) + 4 * d, ulps=0.0),
    OpSpec("compress.accumulate/top-k", "compress", ("scatter_add",), _encoded_example(_top_k),
           run=_run(compress.accumulate), nbytes=lambda k, d: 8 * k * max(1, d // 100) + 4 * d, ulps=0.0,
           peer=Peer("np.add.at", _add_at, stacked=False)),
    OpSpec("compress.accumulate/random-k", "compress", ("random_k_indices", "scatter_add"),
           _encoded_example(lambda d: compress.RandomK(max(1, d // 100))), run=_run(compress.accumulate),
           nbytes=lambda k, d: 4 * k * max(1, d // 100) + 4 * d, ulps=0.0,
           peer=Peer("np.add.at (indices given)", _add_at, stacked=False)),
)

BY_NAME = {spec.name: spec for spec in OPS}


def public_names() -> list[str]:
    """The public ops' names as ``fedkern`` exports them (a class for an optimizer's step)."""
    return sorted({spec.name.split(".")[0] for spec in OPS})
