"""Numba kernels of the privacy family: clipped weighted sums and Gaussian noise.

Same kernels, arguments and bits as ``ext/privacy.pyx``; the normal stream is defined in
``fedkern._reference.privacy``, whose series coefficients these kernels read (Numba
freezes module globals at compile time). Rows go in groups (fedkern._tuning.clip_group),
norms then the weighted sum, so the sum's read of a group comes from cache when it fits.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._blocks import NORM_BLOCK  # sizes, and why: fedkern/_blocks.py
from .._tuning import clip_group, sum_chunk
from .._reference.privacy import COS_SERIES, LN2_HI, LN2_LO, LOG_SERIES, QUARTER_PI, SIN_SERIES, SQRT2
from ._philox import philox_block
from ._runtime import KERNEL
from .aggregate import _add_rows, _norms_from_partials, _sq_sum_partials

_1, _12, _20, _49, _52 = np.uint64(1), np.uint64(12), np.uint64(20), np.uint64(49), np.uint64(52)
_TWO_49, _TWO_52 = np.uint64(1 << 49), np.uint64(1 << 52)
_MANTISSA, _ONE_BITS = np.uint64((1 << 52) - 1), np.uint64(0x3FF << 52)
_MAGIC = np.uint64(0x4330000000000000)  # the bits of 2.0**52
_2, _4 = np.uint64(2), np.uint64(4)


@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float64, as a uint64 (a bitcast: no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.uint64(types.float64), codegen


@intrinsic
def _double(typingctx, bits):
    """The float64 whose IEEE bits are ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.uint64), codegen


def clip_and_sum(updates, clip: float, weights, out, norms) -> None:
    """out = sum_i weights[i] min(1, clip / ||updates[i]||) updates[i] in float64; norms get the norms."""
    group = clip_group(updates.k, updates.d, updates.dtype.itemsize)
    partials = np.empty((min(group, updates.k), (updates.d + NORM_BLOCK - 1) // NORM_BLOCK))
    for g0 in range(0, updates.k, group):
        g = min(group, updates.k - g0)
        _sq_sum_partials(updates.pointers, updates.first, None, g0, g, partials)
        _norms_from_partials(partials, g, norms, g0)
        group_norms = norms[g0:g0 + g]
        # clip / norm only above the bound: a zero row keeps its weight
        scaled = weights[g0:g0 + g] * np.where(group_norms > clip, clip / np.maximum(group_norms, clip), 1.0)
        _add_group(updates.pointers, updates.first, g0, scaled, sum_chunk(updates.d), out)


@njit(**KERNEL)
def _add_group(pointers, first, row0, weights, chunk, out):
    """out[j] += the group's weighted rows from row0 on; the first group (row0 = 0) zeroes
    each chunk of out first, in cache, rather than in a pass over out of its own."""
    d = first.shape[0]
    for c in prange((d + chunk - 1) // chunk):
        j0 = c * chunk
        acc = out[j0:j0 + min(chunk, d - j0)]
        if row0 == 0:
            acc[:] = 0.0
        _add_rows(acc, pointers, first, row0, weights, j0)


@njit(inline="always")
def _horner(coefficients, y):
    p = coefficients[0]
    for c in coefficients[1:]:
        p = p * y + c
    return p


@njit(inline="always")
def _exact_double(n):
    """n <= 2**52 (uint64) as a float64, exactly, by an or and a subtraction: the int64
    conversion has no AVX2 vector instruction and would keep the loop scalar."""
    return _double(n | _MAGIC) - 4503599627370496.0


@njit(inline="always")
def _log_scaled(n):
    """log(n 2**-52) for an integer 1 <= n <= 2**52 (uint64)."""
    bits = _bits(_exact_double(n))
    e = _exact_double(bits >> _52) - 1075.0
    m = _double((bits & _MANTISSA) | _ONE_BITS)
    if m > SQRT2:
        m = m * 0.5
        e = e + 1.0
    f = m - 1.0
    s = f / (2.0 + f)
    return e * LN2_HI + (e * LN2_LO + 2.0 * s * _horner(LOG_SERIES, s * s))


@njit(inline="always")
def _normal_pair(seed, stream, pair):
    """Normals 2 pair and 2 pair + 1 of the stream (Box-Muller on block ``pair``)."""
    w0, w1, w2, w3 = philox_block(seed, stream, pair)
    k1 = (np.uint64(w1) << _20) | (np.uint64(w0) >> _12)
    k2 = (np.uint64(w3) << _20) | (np.uint64(w2) >> _12)
    r = np.sqrt(-2.0 * _log_scaled(_TWO_52 - k1))
    octant, low = k2 >> _49, k2 & (_TWO_49 - _1)
    g = _exact_double(_TWO_49 - low if octant & _1 else low) * 2.0**-49
    x = g * QUARTER_PI
    x2 = x * x
    sin_x, cos_x = _horner(SIN_SERIES, x2) * x, _horner(COS_SERIES, x2)
    if (octant + _1) & _2:
        sin_x, cos_x = cos_x, sin_x
    if octant & _4:
        sin_x = -sin_x
    if (octant + _2) & _4:
        cos_x = -cos_x
    return r * cos_x, r * sin_x


def gaussian_noise(x, std: float, seed: int, stream: int, start: int, out) -> None:
    """out[j] = x[j] + std * normal(start + j), in float64, rounded once (``out`` may be ``x``)."""
    _gaussian_noise(x, np.float64(std), np.uint64(seed), np.uint64(stream), np.uint64(start), out)


@njit(inline="always")
def _noise_pair(x, out, std, seed, stream, first, p, skip):
    """Pair first + p holds normals 2p - skip and 2p - skip + 1 of out; keep those inside it."""
    z0, z1 = _normal_pair(seed, stream, first + np.uint64(p))
    j = 2 * p - skip
    if 0 <= j < out.shape[0]:
        out[j] = np.float64(x[j]) + std * z0
    if 0 <= j + 1 < out.shape[0]:
        out[j + 1] = np.float64(x[j + 1]) + std * z1


@njit(**KERNEL)
def _gaussian_noise(x, std, seed, stream, start, out):
    n = out.shape[0]
    if n == 0:
        return
    first = start >> _1                 # the pair holding out[0]
    skip = np.int64(start & _1)         # its normals before out[0]
    full0 = min(skip, 1)                # pairs full0 .. full1 - 1 lie inside out
    full1 = (skip + n) >> 1
    for p in prange(full0, full1):
        z0, z1 = _normal_pair(seed, stream, first + np.uint64(p))
        j = np.uint64(2 * p - skip)     # unsigned: no negative-index wraparound in the loop
        out[j] = np.float64(x[j]) + std * z0
        out[j + _1] = np.float64(x[j + _1]) + std * z1
    if skip:
        _noise_pair(x, out, std, seed, stream, first, 0, skip)
    if (skip + n) & 1 and full1 >= full0:  # a cut last pair, unless it is pair 0
        _noise_pair(x, out, std, seed, stream, first, full1, skip)
