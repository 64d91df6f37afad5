r"""Compressed client updates, decoded straight into the server's sum.

Upload bandwidth is the bottleneck of cross-device federated learning, so clients send
compressed updates. Compression libraries (GRACE, FLSim's channels, FedJAX's quantizers)
decode every message into a full float vector and then sum; :func:`accumulate` decodes
and weight-adds every message into one float64 accumulator in a single pass over the
compressed bytes, never building a decoded vector per client.

Codecs (each ``encode(x, seed=...) -> Encoded`` and ``decode(encoded, out=None)``):

* :class:`TopK`, :class:`RandomK`: sparsification (Stich, Cordonnier and Jaggi,
  "Sparsified SGD with Memory", NeurIPS 2018);
* :class:`QSGD` (Alistarh et al., NeurIPS 2017), :class:`TernGrad` (Wen et al., NeurIPS
  2017), :class:`StochasticQuantizer` (b-bit stochastic uniform quantisation per block):
  unbiased quantisers;
* :class:`ScaledSign` (Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019) and
  :func:`majority_vote` (Bernstein et al., "signSGD", ICML 2018);
* :class:`Rotated`: a randomized Hadamard rotation around any quantiser (Suresh et al.,
  "Distributed Mean Estimation with Limited Communication", ICML 2017; Vargaftik et al.,
  DRIVE, NeurIPS 2021), undone once after the sum;
* :class:`ErrorFeedback`: per-client residuals (Seide et al. 2014; Karimireddy et al. 2019).

The random draws (stochastic rounding, random-k's indices, rotation signs) come from
fedkern's counter-based Philox streams keyed by the message's seed: the same seed gives
the same bytes on every backend and thread count (exact definitions in
``fedkern._reference.compress``). Every :class:`Encoded` is checked against its codec
(codec, length, buffer sizes and dtypes, index range) before any kernel reads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import _validate as check
from ._errors import FedkernTypeError, FedkernValueError
from ._reference import compress as spec
from ._updates import DTypeLike, Updates, WeightsLike
from .backends import kernels

#: A seed: an int in [0, 2**64), or a Generator whose next 64 bits become one.
SeedLike = int | np.random.Generator

__all__ = ["Encoded", "Codec", "TopK", "RandomK", "QSGD", "TernGrad", "StochasticQuantizer", "ScaledSign",
           "Rotated", "ErrorFeedback", "accumulate", "majority_vote", "fwht"]

#: bytes a message spends on its seed (sent by every codec: random-k's indices, and the
#: server's check of a stochastic rounding, are regenerated from it)
SEED_BYTES = 8


def _seed(seed: SeedLike) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**64, dtype=np.uint64))
    return check.count(seed, "seed", high=2**64 - 1, why=" (a uint64, or pass a numpy.random.Generator)")


def _finite_vector(x, name: str = "x") -> np.ndarray:
    x = check.vector(x, name)
    _require_finite(bool(np.isfinite(x).all()), name)
    return x


def _require_finite(finite: bool, name: str = "x") -> None:
    if not finite:
        raise FedkernValueError(f"{name} holds NaN or inf (or values whose float64 sums overflow): "
                                f"it cannot be compressed")


@dataclass(frozen=True, eq=False)
class Encoded:
    """One client's compressed message: numpy buffers as they would go on the wire.

    Attributes
    ----------
    codec : the codec that made it (decoding checks it)
    d : length of the encoded vector
    seed : the message's seed (8 bytes on the wire)
    codes : uint8, packed integer levels; signs : uint8, bit-packed signs (1: negative)
    indices : uint32, sorted coordinate indices; values : float32, their values
    scales : float32, per-block scales; inner : the wrapped message (:class:`Rotated`)
    """

    codec: "Codec"
    d: int
    seed: int
    codes: np.ndarray | None = None
    signs: np.ndarray | None = None
    indices: np.ndarray | None = None
    values: np.ndarray | None = None
    scales: np.ndarray | None = None
    inner: "Encoded | None" = None

    @property
    def nbytes(self) -> int:
        """Exactly the bytes a client sends: its buffers plus the 8-byte seed."""
        if self.inner is not None:
            return self.inner.nbytes
        buffers = (self.codes, self.signs, self.indices, self.values, self.scales)
        return SEED_BYTES + sum(b.nbytes for b in buffers if b is not None)


def _buffer(enc: Encoded, name: str, dtype, size: int, where: str) -> None:
    buf = getattr(enc, name)
    if not isinstance(buf, np.ndarray):
        raise FedkernTypeError(f"{where}.{name} must be a numpy array; got {type(buf).__name__}")
    if buf.dtype != dtype or buf.ndim != 1 or buf.shape[0] != size or not buf.flags.c_contiguous:
        raise FedkernValueError(f"{where}.{name} must be a contiguous 1-D {np.dtype(dtype).name} array of "
                                f"{size} entries; got {buf.dtype} of shape {buf.shape} (corrupted message?)")


def _check_header(codec, enc, d: int | None, where: str) -> None:
    """``enc`` is an Encoded of ``codec`` (and of length ``d`` if given): what every codec's
    validate checks before its own buffers."""
    if not isinstance(enc, Encoded):
        raise FedkernTypeError(f"{where} must be a fedkern.compress.Encoded; got {type(enc).__name__}")
    if enc.codec != codec:
        raise FedkernValueError(f"{where} was encoded by {enc.codec!r}, not {codec!r}")
    if d is not None and enc.d != d:
        raise FedkernValueError(f"{where} has length {enc.d}; expected {d}")


class Codec:
    """Base of the codecs: validation of messages and the shared decode/accumulate paths."""

    #: which Encoded buffers the codec fills
    buffers: tuple[str, ...] = ()

    def encode(self, x: np.ndarray, seed: SeedLike = 0, *, backend: str | None = None) -> Encoded:
        raise NotImplementedError

    def sizes(self, d: int) -> dict[str, tuple[type, int]]:
        """buffer name -> (dtype, entries) of a message of length d."""
        raise NotImplementedError

    def bytes_per_coordinate(self, d: int) -> float:
        """Wire bytes per coordinate of a message of length d (seed included)."""
        return (SEED_BYTES + sum(np.dtype(t).itemsize * n for t, n in self.sizes(d).values())) / d

    def validate_group(self, group: list[Encoded], d: int, wheres: list[str], backend: str | None = None
                       ) -> list[Encoded]:
        """:meth:`validate` each message of ``group`` (``wheres`` name them in errors); return them."""
        return [self.validate(enc, d, where) for enc, where in zip(group, wheres)]

    def validate(self, enc, d: int | None = None, where: str = "encoded") -> Encoded:
        """Check ``enc`` is a whole message of this codec (of length ``d``); return it."""
        _check_header(self, enc, d, where)
        for name, (dtype, size) in self.sizes(enc.d).items():
            _buffer(enc, name, dtype, size, where)
        for name in {"codes", "signs", "indices", "values", "scales"} - set(self.sizes(enc.d)):
            if getattr(enc, name) is not None:
                raise FedkernValueError(f"{where}.{name} must be None for {self!r}")
        if enc.scales is not None and not np.isfinite(enc.scales).all():
            raise FedkernValueError(f"{where}.scales holds NaN or inf (corrupted message?)")
        return enc

    def decode(self, encoded: Encoded, out: np.ndarray | None = None, *, backend: str | None = None) -> np.ndarray:
        """The decoded vector (float32 unless ``out`` says otherwise), accumulated in float64."""
        enc = self.validate(encoded)
        result = check.out(out, (enc.d,), np.dtype(np.float32))
        self._accumulate([enc], np.ones(1), result, backend)
        return result

    def _accumulate(self, group: list[Encoded], weights: np.ndarray, out: np.ndarray, backend) -> None:
        """out = sum_i weights[i] decode(group[i]) (float32 or float64), accumulated in float64
        and rounded once, for validated messages."""
        raise NotImplementedError


# --------------------------------------------------------------------------- quantisers
_BITS = (1, 2, 4, 8)


def _bits_for(levels: int) -> int:
    return next(b for b in _BITS if (1 << b) > levels)


def _round_up32(v: np.ndarray) -> np.ndarray:
    """float32 values >= v (float64), the nearest ones."""
    r = v.astype(np.float32)
    return np.where(r.astype(np.float64) < v, np.nextafter(r, np.float32(np.inf)), r)


def _round_down32(v: np.ndarray) -> np.ndarray:
    r = v.astype(np.float32)
    return np.where(r.astype(np.float64) > v, np.nextafter(r, np.float32(-np.inf)), r)


class _Quantizer(Codec):
    """A codec of integer levels: offset_b + step_b * code per block, signs optional."""

    signed = False

    def _block(self, d: int) -> int:
        return d

    def _levels(self) -> int:
        raise NotImplementedError

    def _bits(self) -> int:
        return _bits_for(self._levels())

    def _nblocks(self, d: int) -> int:
        return -(-d // self._block(d))

    def _scales(self, stats: np.ndarray, d: int) -> np.ndarray:
        """The float32 scales sent, from the blocks' statistics."""
        raise NotImplementedError

    def _affine(self, scales: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, steps) in float64 per block, from the scales: encoder and decoder alike."""
        raise NotImplementedError

    def sizes(self, d):
        sizes = {"codes": (np.uint8, -(-d * self._bits() // 8)), "scales": (np.float32, self._nscales(d))}
        if self.signed:
            sizes["signs"] = (np.uint8, -(-d // 8))
        return sizes

    def _nscales(self, d: int) -> int:
        return self._nblocks(d)

    def encode(self, x, seed=0, *, backend=None):
        x = check.vector(x, "x")
        seed, d = _seed(seed), x.shape[0]
        block = self._block(d)
        ops = kernels("compress", backend, "quantize")
        stats = np.empty((self._nblocks(d), spec.STATS))
        kernels("compress", backend, "block_stats").block_stats(x, block, stats)
        _require_finite(bool(np.isfinite(stats[:, 4]).all()))  # sum |x| is finite iff every x is
        scales = self._scales(stats, d)
        offsets, steps = self._affine(scales, d)
        sizes = self.sizes(d)
        codes = np.empty(sizes["codes"][1], np.uint8)
        signs = np.empty(sizes["signs"][1], np.uint8) if self.signed else None
        ops.quantize(x, offsets, steps, block, self._levels(), self._bits(), self.signed, seed, spec.ROUND_STREAM,
                     codes, codes if signs is None else signs)
        return Encoded(self, d, seed, codes=codes, signs=signs, scales=scales)

    def _accumulate(self, group, weights, out, backend):
        d = group[0].d
        affine = [self._affine(e.scales, d) for e in group]
        codes = Updates([e.codes for e in group], None)
        signs = Updates([e.signs for e in group], None) if self.signed else codes
        kernels("compress", backend, "accumulate_quantized").accumulate_quantized(
            out, codes, signs, Updates([a[0] for a in affine], None), Updates([a[1] for a in affine], None),
            weights, self._block(d), self._bits(), self.signed)

    def variance(self, x: np.ndarray) -> float:
        """E ||decode(encode(x)) - x||^2 over the seeds: sum_j step_j^2 f_j (1 - f_j), f_j the
        fractional part of coordinate j's scaled value (and, for TernGrad, x clipped)."""
        x = _finite_vector(x)
        d = x.shape[0]
        stats = np.empty((self._nblocks(d), spec.STATS))
        kernels("compress", "reference").block_stats(x, self._block(d), stats)
        offsets, steps = self._affine(self._scales(stats, d), d)
        block = np.arange(d) // self._block(d)
        v = np.abs(x.astype(np.float64)) if self.signed else x.astype(np.float64)
        step = steps[block]
        t = np.clip(np.where(step > 0, (v - offsets[block]) / np.where(step > 0, step, 1), 0), 0, self._levels())
        f = t - np.floor(t)
        return float(np.sum(step**2 * f * (1 - f)))


@dataclass(frozen=True)
class StochasticQuantizer(_Quantizer):
    r"""b-bit stochastic uniform quantisation per block of ``block_size`` coordinates.

    Block b is sent as its float32 minimum :math:`l_b` and step :math:`\Delta_b \ge
    (\max_b - l_b)/(2^b - 1)` and one b-bit level per coordinate, rounded up with
    probability equal to the remainder, so :math:`E[Q(x)] = x` (unbiased, e.g. Suresh et
    al. 2017) with variance :math:`\sum_j \Delta_{b(j)}^2 f_j (1 - f_j)`. Bytes per
    coordinate: b / 8 + 8 / block_size (+ 8 per message).

    Examples
    --------
    >>> from fedkern import compress
    >>> q = compress.StochasticQuantizer(bits=8, block_size=256)
    >>> enc = q.encode(np.linspace(-1, 1, 1024, dtype=np.float32), seed=3)
    >>> enc.nbytes
    1064
    >>> float(np.abs(q.decode(enc) - np.linspace(-1, 1, 1024)).max()) < 2 / 255
    True
    """

    bits: int = 8
    block_size: int = 256

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in _BITS:
            raise FedkernValueError(f"bits must be one of {_BITS}; got {self.bits!r}")
        check.count(self.block_size, "block_size", low=1)

    def _block(self, d):
        return self.block_size

    def _levels(self):
        return (1 << self.bits) - 1

    def _bits(self):
        return self.bits

    def _nscales(self, d):
        return 2 * self._nblocks(d)

    def _scales(self, stats, d):
        lo = _round_down32(stats[:, 0])
        step = _round_up32((stats[:, 1] - lo.astype(np.float64)) / self._levels())
        return np.concatenate([lo, step])

    def _affine(self, scales, d):
        nb = self._nblocks(d)
        return scales[:nb].astype(np.float64), scales[nb:].astype(np.float64)

    def validate(self, enc, d=None, where="encoded"):
        super().validate(enc, d, where)
        if (enc.scales[self._nblocks(enc.d):] < 0).any():
            raise FedkernValueError(f"{where}.scales holds a negative step (corrupted message?)")
        return enc


@dataclass(frozen=True)
class QSGD(_Quantizer):
    r"""QSGD with s levels (Alistarh, Grubic, Li, Tomioka and Vojnovic, NeurIPS 2017).

    :math:`Q(x)_j = \lVert x \rVert_2 \operatorname{sign}(x_j) \xi_j / s` with
    :math:`\xi_j` the level :math:`s |x_j| / \lVert x \rVert_2` rounded up with
    probability equal to its remainder: unbiased, variance
    :math:`\sum_j (\lVert x \rVert / s)^2 f_j (1 - f_j)`. Sent: the norm (float32, per
    bucket of ``bucket_size`` coordinates, default the whole vector), one sign bit and a
    level of the smallest of 1, 2, 4, 8 bits holding 0 .. s per coordinate.

    Examples
    --------
    >>> from fedkern import compress
    >>> enc = compress.QSGD(levels=4).encode(np.array([3.0, -4.0], np.float32), seed=0)
    >>> compress.QSGD(levels=4).decode(enc)
    array([ 3.75, -3.75], dtype=float32)
    """

    levels: int = 16
    bucket_size: int | None = None
    signed = True

    def __post_init__(self):
        check.count(self.levels, "levels", low=1, high=255, why=" (levels are sent in at most 8 bits)")
        if self.bucket_size is not None:
            check.count(self.bucket_size, "bucket_size", low=1)

    def _block(self, d):
        return d if self.bucket_size is None else self.bucket_size

    def _levels(self):
        return self.levels

    def _scales(self, stats, d):
        return _round_up32(np.sqrt(stats[:, 3]))

    def _affine(self, scales, d):
        return np.zeros(scales.shape[0]), scales.astype(np.float64) / self.levels


@dataclass(frozen=True)
class TernGrad(_Quantizer):
    r"""TernGrad (Wen, Xu, Yan, Wu, Wang, Chen and Li, NeurIPS 2017): levels -s, 0, s.

    x is first clipped to :math:`\pm c\,\sigma` (``clip`` = c, the paper's 2.5; None: no
    clipping), then :math:`Q(x)_j = s \operatorname{sign}(x_j) b_j` with
    :math:`s = \max_j |x_j|` and :math:`b_j \sim` Bernoulli(:math:`|x_j| / s`): unbiased
    for the *clipped* vector, variance :math:`\sum_j s |x_j| - x_j^2` (x clipped). Sent: s
    (float32) and 2 bits per coordinate.

    Examples
    --------
    >>> from fedkern import compress
    >>> t = compress.TernGrad(clip=None)
    >>> t.decode(t.encode(np.array([1.0, -1.0, 0.0], np.float32), seed=0))
    array([ 1., -1.,  0.], dtype=float32)
    """

    clip: float | None = 2.5

    def __post_init__(self):
        if self.clip is not None:
            check.real(self.clip, "clip", low=0.0, low_inclusive=False)

    def _levels(self):
        return 2

    def _scales(self, stats, d):
        s = max(abs(stats[0, 0]), abs(stats[0, 1]))
        if self.clip is not None:
            mean = stats[0, 2] / d
            sigma = math.sqrt(max(stats[0, 3] / d - mean * mean, 0.0))
            s = min(s, self.clip * sigma)
        return _round_up32(np.array([s]))

    def _affine(self, scales, d):
        s = scales.astype(np.float64)
        return -s, s


@dataclass(frozen=True)
class ScaledSign(_Quantizer):
    r"""Scaled sign (Karimireddy, Rebjock, Stich and Jaggi, "Error Feedback Fixes SignSGD
    and other Gradient Compression Schemes", ICML 2019): :math:`C(x) = \frac{\lVert x
    \rVert_1}{d} \operatorname{sign}(x)`, one bit per coordinate plus a float32 scale.
    Biased (deterministic): use it with :class:`ErrorFeedback`, or aggregate the signs
    alone by :func:`majority_vote`. sign(0) is +1.

    Examples
    --------
    >>> from fedkern import compress
    >>> s = compress.ScaledSign()
    >>> s.decode(s.encode(np.array([1.0, -3.0], np.float32)))
    array([ 2., -2.], dtype=float32)
    """

    def _levels(self):
        return 1

    def _scales(self, stats, d):
        return _round_up32(np.array([stats[0, 4] / d]))

    def _affine(self, scales, d):
        s = scales.astype(np.float64)
        return -s, 2.0 * s

    def encode(self, x, seed=0, *, backend=None):
        x = check.vector(x, "x")
        d, seed = x.shape[0], _seed(seed)
        stats = np.empty((1, spec.STATS))
        kernels("compress", backend, "block_stats").block_stats(x, d, stats)
        _require_finite(bool(np.isfinite(stats[0, 4])))
        codes = np.packbits(x >= 0, bitorder="little")  # deterministic: no draw
        return Encoded(self, d, seed, codes=codes, scales=self._scales(stats, d))

    def variance(self, x):
        raise FedkernValueError("ScaledSign is deterministic (and biased): it has no sampling variance")


# --------------------------------------------------------------------------- sparsifiers
def _k(k: int, d: int, who: str) -> int:
    if k > d:
        raise FedkernValueError(f"{who}: k = {k} is larger than the vector's length {d}")
    return k


@dataclass(frozen=True)
class TopK(Codec):
    r"""Top-k sparsification: the k coordinates of largest magnitude, as float32 values and
    uint32 indices (Stich et al. 2018; Aji and Heafield 2017). Ties go to the lower index;
    the indices are sent sorted. Biased: use it with :class:`ErrorFeedback`. Bytes: 8 k + 8.

    Examples
    --------
    >>> from fedkern import compress
    >>> enc = compress.TopK(2).encode(np.array([0.5, -3.0, 1.0, 2.0], np.float32))
    >>> enc.indices, enc.values
    (array([1, 3], dtype=uint32), array([-3.,  2.], dtype=float32))
    """

    k: int

    def __post_init__(self):
        check.count(self.k, "k", low=1)

    def sizes(self, d):
        return {"indices": (np.uint32, self.k), "values": (np.float32, self.k)}

    def encode(self, x, seed=0, *, backend=None):
        x = _finite_vector(x)
        seed, d = _seed(seed), x.shape[0]
        k = _k(self.k, d, "TopK")
        a = np.abs(x)
        threshold = np.partition(a, d - k)[d - k]            # the k-th largest magnitude
        above = np.flatnonzero(a > threshold)
        ties = np.flatnonzero(a == threshold)[:k - above.shape[0]]
        indices = np.sort(np.concatenate([above, ties])).astype(np.uint32)
        return Encoded(self, d, seed, indices=indices, values=x[indices].astype(np.float32))

    def validate(self, enc, d=None, where="encoded"):
        super().validate(enc, d, where)
        _k(self.k, enc.d, "TopK")
        idx = enc.indices
        if idx.shape[0] and (int(idx[-1]) >= enc.d or (idx.shape[0] > 1 and not (idx[1:] > idx[:-1]).all())):
            raise FedkernValueError(f"{where}.indices must be strictly increasing and below {enc.d} "
                                    f"(corrupted message?)")
        if not np.isfinite(enc.values).all():
            raise FedkernValueError(f"{where}.values holds NaN or inf (corrupted message?)")
        return enc

    def validate_group(self, group, d, wheres, backend=None):
        """The buffers' layout message by message, their contents in one compiled pass over
        all of them (a seventh of the time of numpy's checks, message by message, at K = 100
        x 1% of 1M); a bad message is then checked alone, for its precise error."""
        for enc, where in zip(group, wheres):
            Codec.validate(self, enc, d, where)
            _k(self.k, enc.d, "TopK")
        bad = np.zeros(len(group), np.uint8)
        kernels("compress", backend, "check_sparse").check_sparse(
            Updates([e.indices for e in group], None), Updates([e.values for e in group], None), d, bad)
        for i in np.flatnonzero(bad):
            self.validate(group[i], d, wheres[i])
            raise FedkernValueError(f"{wheres[i]} is corrupted")   # unreachable unless the checks disagree
        return group

    def _accumulate(self, group, weights, out, backend):
        kernels("compress", backend, "scatter_add").scatter_add(
            out, Updates([e.indices for e in group], None), Updates([e.values for e in group], None), weights)


@dataclass(frozen=True)
class RandomK(Codec):
    r"""Random-k sparsification, scaled to be unbiased: :math:`C(x)_j = \frac{d}{k} x_j`
    on k coordinates drawn without replacement from the message's seed, 0 elsewhere.

    Only the k float32 values and the seed are sent: the server draws the same indices
    (Floyd's algorithm on the Philox stream, ``fedkern._reference.compress``).
    :math:`E[C(x)] = x`, variance :math:`(d/k - 1) \lVert x \rVert^2`. GRACE's random-k
    sends :math:`x_j` unscaled, which is biased (its mean is :math:`(k/d)\,x`).
    Bytes: 4 k + 8.

    Examples
    --------
    >>> from fedkern import compress
    >>> r = compress.RandomK(2)
    >>> enc = r.encode(np.array([1.0, 2.0, 3.0, 4.0], np.float32), seed=5)
    >>> enc.nbytes, int(np.count_nonzero(r.decode(enc)))
    (16, 2)
    """

    k: int

    def __post_init__(self):
        check.count(self.k, "k", low=1)

    def sizes(self, d):
        return {"values": (np.float32, self.k)}

    def indices(self, d: int, seed: int, *, backend: str | None = None) -> np.ndarray:
        """The k sorted uint32 indices of a message of length d under ``seed``."""
        return self._indices(d, [seed], backend)[0]

    def _indices(self, d: int, seeds: list[int], backend) -> np.ndarray:
        """Row i: the indices under seeds[i], all drawn in one kernel call (in parallel)."""
        _k(self.k, d, "RandomK")
        out = np.empty((len(seeds), self.k), np.uint32)
        kernels("compress", backend, "random_k_indices").random_k_indices(
            np.array(seeds, np.uint64), spec.INDEX_STREAM, d, self.k, out)
        return out

    def encode(self, x, seed=0, *, backend=None):
        x = _finite_vector(x)
        seed = _seed(seed)
        idx = self.indices(x.shape[0], seed, backend=backend)
        return Encoded(self, x.shape[0], seed, values=x[idx].astype(np.float32))

    def validate(self, enc, d=None, where="encoded"):
        super().validate(enc, d, where)
        _k(self.k, enc.d, "RandomK")
        check.count(enc.seed, f"{where}.seed", high=2**64 - 1)
        if not np.isfinite(enc.values).all():
            raise FedkernValueError(f"{where}.values holds NaN or inf (corrupted message?)")
        return enc

    def _accumulate(self, group, weights, out, backend):
        d = group[0].d
        indices = self._indices(d, [e.seed for e in group], backend)
        kernels("compress", backend, "scatter_add").scatter_add(
            out, Updates(None, indices), Updates([e.values for e in group], None), weights * (d / self.k))

    def variance(self, x: np.ndarray) -> float:
        """E ||C(x) - x||^2 = (d / k - 1) ||x||^2."""
        x = _finite_vector(x).astype(np.float64)
        return float((x.shape[0] / self.k - 1.0) * np.dot(x, x))


# --------------------------------------------------------------------------- rotation
def fwht(x: np.ndarray, *, backend: str | None = None) -> np.ndarray:
    r"""The unnormalised fast Walsh-Hadamard transform :math:`H x`, in place on a float64
    vector whose length is a power of two (:math:`H H = n I`).

    Examples
    --------
    >>> from fedkern import compress
    >>> compress.fwht(np.array([1.0, 0.0, 0.0, 0.0]))
    array([1., 1., 1., 1.])
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float64 or x.ndim != 1 or not x.flags.c_contiguous:
        raise FedkernTypeError("x must be a contiguous 1-D float64 numpy array")
    n = x.shape[0]
    if n == 0 or n & (n - 1):
        raise FedkernValueError(f"x's length must be a power of two; got {n}")
    if not x.flags.writeable:
        raise FedkernValueError("x is read-only but is transformed in place")
    kernels("compress", backend, "fwht").fwht(x)
    return x


@dataclass(frozen=True)
class Rotated(Codec):
    r"""A quantiser applied after a randomized Hadamard rotation (Suresh, Yu, Kumar and
    McMahan, ICML 2017; Vargaftik et al., DRIVE, NeurIPS 2021).

    :math:`y = H S x / \sqrt n` (x zero-padded to the next power of two n, S diagonal
    random signs from the shared ``seed``, H the Walsh-Hadamard matrix) spreads the
    vector's energy evenly, so a quantiser's range shrinks; ``codec`` encodes y. The
    rotation is linear and shared by all clients, so :func:`accumulate` sums the rotated
    decodes and rotates back *once*: :math:`\sum_i w_i S H \hat y_i / \sqrt n`. Unbiased
    when ``codec`` is; its variance is ``codec``'s on y (the rotation is orthonormal).

    Examples
    --------
    >>> from fedkern import compress
    >>> r = compress.Rotated(compress.StochasticQuantizer(bits=8), seed=1)
    >>> x = np.linspace(-1, 1, 1000).astype(np.float32)
    >>> float(np.abs(r.decode(r.encode(x, seed=2)) - x).max()) < 0.05
    True
    """

    codec: Codec
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.codec, _Quantizer) or isinstance(self.codec, ScaledSign):
            raise FedkernTypeError(f"codec must be an unbiased quantiser (QSGD, TernGrad, StochasticQuantizer); "
                                   f"got {self.codec!r}")
        check.count(self.seed, "seed", high=2**64 - 1)

    @staticmethod
    def padded(d: int) -> int:
        return 1 << max(0, (d - 1).bit_length())

    def sizes(self, d):
        return self.codec.sizes(self.padded(d))

    def validate(self, enc, d=None, where="encoded"):
        _check_header(self, enc, d, where)
        self.codec.validate(enc.inner, self.padded(enc.d), f"{where}.inner")
        return enc

    def signs(self, n: int, *, backend: str | None = None) -> np.ndarray:
        """The rotation's signs s_j = -1 where bit j % 32 of word j // 32 of Philox stream
        ROTATE_STREAM under ``seed`` is set, else +1 (float64, length n)."""
        return self._scale_by_signs(np.ones(n), 1.0, backend)

    def _scale_by_signs(self, y: np.ndarray, scale: float, backend) -> np.ndarray:
        """y <- S y scale, in place: the signs drawn in the kernel, never stored."""
        kernels("compress", backend, "scale_by_signs").scale_by_signs(y, self.seed, spec.ROTATE_STREAM, scale)
        return y

    def rotate(self, x: np.ndarray, *, backend: str | None = None) -> np.ndarray:
        """y = H S x / sqrt(n), float64 of the padded length n."""
        n = self.padded(x.shape[0])
        y = np.zeros(n)
        y[:x.shape[0]] = x
        self._scale_by_signs(y, 1.0, backend)
        fwht(y, backend=backend)
        y *= 1.0 / math.sqrt(n)
        return y

    def encode(self, x, seed=0, *, backend=None):
        x = _finite_vector(x)
        seed = _seed(seed)
        inner = self.codec.encode(self.rotate(x, backend=backend), seed, backend=backend)
        return Encoded(self, x.shape[0], seed, inner=inner)

    def _accumulate(self, group, weights, out, backend):
        n = self.padded(group[0].d)
        rotated = np.empty(n)
        self.codec._accumulate([e.inner for e in group], weights, rotated, backend)
        fwht(rotated, backend=backend)                      # the inverse, once for all clients
        self._scale_by_signs(rotated, 1.0 / math.sqrt(n), backend)
        out[...] = rotated[:out.shape[0]]

    def variance(self, x: np.ndarray) -> float:
        return self.codec.variance(self.rotate(_finite_vector(x), backend="reference"))


# --------------------------------------------------------------------------- aggregation
def _messages(encoded_list: Sequence[Encoded], weights: WeightsLike | None, backend: str | None
              ) -> tuple[list[Encoded], np.ndarray, dict, int]:
    """The validated messages, weights, message indices by codec, and length."""
    if isinstance(encoded_list, Encoded) or not isinstance(encoded_list, Sequence) or len(encoded_list) == 0:
        raise FedkernTypeError("encoded_list must be a non-empty sequence of fedkern.compress.Encoded")
    first = encoded_list[0]
    if not isinstance(first, Encoded) or not isinstance(first.codec, Codec):
        raise FedkernTypeError(f"encoded_list[0] must be a fedkern.compress.Encoded; got {type(first).__name__}")
    d = first.d
    msgs = list(encoded_list)
    groups: dict[Codec, list[int]] = {}                 # by codec, in order of first appearance
    for i, e in enumerate(msgs):
        if not isinstance(e, Encoded) or not isinstance(e.codec, Codec):
            first.codec.validate(e, d, f"encoded_list[{i}]")   # raises the error naming it
        groups.setdefault(e.codec, []).append(i)
    for codec, members in groups.items():
        codec.validate_group([msgs[i] for i in members], d, [f"encoded_list[{i}]" for i in members], backend)
    w = np.ones(len(msgs)) if weights is None else check.weights(weights, len(msgs))
    return msgs, w, groups, d


def accumulate(encoded_list: Sequence[Encoded], weights: WeightsLike | None = None, out: np.ndarray | None = None,
               *, dtype: DTypeLike = None, backend: str | None = None) -> np.ndarray:
    r"""The weighted sum of the decoded messages, decoded straight into one accumulator.

    :math:`s = \sum_i w_i\, \mathrm{decode}(e_i)`, accumulated in float64 and rounded once:
    each kernel reads only the compressed bytes, coordinate chunk by chunk (in parallel),
    adding the clients in list order into a chunk-sized float64 accumulator that it rounds
    into the result, so no decoded vector is built per client, no D-sized float64 buffer
    is needed for a float32 result, and the result does not depend on the thread count.
    Messages of several codecs are summed codec by codec (in order of first appearance);
    :class:`Rotated` messages are rotated back once, after their sum. Equals decoding each message and calling
    :func:`fedkern.weighted_sum`, to float rounding.

    Parameters
    ----------
    encoded_list : sequence of K :class:`Encoded` of one length D
    weights : K finite numbers >= 0, not all zero (default all ones)
    out : (D,) float32 or float64 array, optional, overwritten and returned
    dtype : result dtype when ``out`` is not given (default float64)

    Examples
    --------
    >>> from fedkern import compress
    >>> q = compress.StochasticQuantizer(bits=8)
    >>> msgs = [q.encode(np.full(4, v, np.float32), seed=i) for i, v in enumerate([1.0, 3.0])]
    >>> compress.accumulate(msgs, weights=[0.5, 0.5])
    array([2., 2., 2., 2.])
    """
    msgs, w, groups, d = _messages(encoded_list, weights, backend)
    result = check.out(out, (d,), np.dtype(np.float64), dtype)
    if len(groups) == 1:                # the kernels round their float64 sums into result once
        next(iter(groups))._accumulate(msgs, w, result, backend)
        return result
    total, part = np.empty(d), np.empty(d)
    for n, (codec, members) in enumerate(groups.items()):
        codec._accumulate([msgs[i] for i in members], np.ascontiguousarray(w[members]), part if n else total,
                          backend)
        if n:
            total += part
    result[...] = total
    return result


def majority_vote(encoded_list: Sequence[Encoded], weights: WeightsLike | None = None, *,
                  backend: str | None = None) -> np.ndarray:
    r"""signSGD's majority vote over :class:`ScaledSign` messages (Bernstein, Zhao,
    Azizzadenesheli and Anandkumar, ICLR 2019): :math:`\operatorname{sign}(\sum_i w_i
    \operatorname{sign}(x_i))` as float32 in {-1, 0, +1} (0 on a tie); scales are ignored.

    Examples
    --------
    >>> from fedkern import compress
    >>> s = compress.ScaledSign()
    >>> votes = [s.encode(np.array(v, np.float32)) for v in ([1, -1], [2, -1], [-1, 1])]
    >>> compress.majority_vote(votes)
    array([ 1., -1.], dtype=float32)
    """
    msgs, w, _, d = _messages(encoded_list, weights, backend)
    if any(not isinstance(e.codec, ScaledSign) for e in msgs):
        raise FedkernValueError("majority_vote takes ScaledSign messages only")
    total = np.empty(d)
    codes = Updates([e.codes for e in msgs], None)
    unit = Updates([np.array([-1.0]) for _ in msgs], None), Updates([np.array([2.0]) for _ in msgs], None)
    kernels("compress", backend, "accumulate_quantized").accumulate_quantized(total, codes, codes, *unit, w, d, 1,
                                                                             False)
    return np.sign(total).astype(np.float32)


@dataclass
class ErrorFeedback:
    r"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019): each client keeps the
    part of its updates the codec has not sent yet.

    For client c with residual :math:`e_c` (float64, zero at first):
    :math:`p = g + e_c`, send :math:`C(p)`, then :math:`e_c \leftarrow p - \mathrm{decode}(C(p))`,
    with exactly the decode the server computes. So :math:`\sum_t \mathrm{decode}(C(p_t))
    + e_c = \sum_t g_t` up to the float64 rounding of those two operations, with none at all
    whenever the values share a float64 grid (e.g. float32 updates with top-k).

    Examples
    --------
    >>> from fedkern import compress
    >>> ef = compress.ErrorFeedback(compress.TopK(1))
    >>> enc = ef.encode(0, np.array([1.0, 0.5], np.float32))
    >>> ef.residual(0)
    array([0. , 0.5])
    """

    codec: Codec
    residuals: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.codec, Codec):
            raise FedkernTypeError(f"codec must be a fedkern.compress codec; got {type(self.codec).__name__}")

    def residual(self, client) -> np.ndarray | None:
        """Client ``client``'s residual (float64), or None before its first message."""
        return self.residuals.get(client)

    def encode(self, client, g: np.ndarray, seed: SeedLike = 0, *, backend: str | None = None) -> Encoded:
        """Encode g plus the client's residual; keep what was not sent as the new residual."""
        g = _finite_vector(g, "g")
        e = self.residuals.get(client)
        if e is not None and e.shape != g.shape:
            raise FedkernValueError(f"g has length {g.shape[0]}; client {client!r}'s residual has {e.shape[0]}")
        p = g.astype(np.float64) if e is None else g + e
        enc = self.codec.encode(p, seed, backend=backend)
        sent = self.codec.decode(enc, out=np.empty(p.shape[0]), backend=backend)
        self.residuals[client] = p - sent
        return enc
