"""Numba kernels of the secure aggregation family: fixed-point quantisation into the ring,
masking with keystreams, decoding a ring sum.

Same kernels, arguments and bits as ``ext/secagg.pyx``; the quantisation is defined in
``fedkern._reference.secagg``. ``add_masks`` is serial: the protocol calls it on cache-sized
chunks from several Python threads at once (it releases the GIL), which a parallel Numba
kernel cannot be (the workqueue threading layer aborts on concurrent launches).
"""
import numpy as np
from numba import njit, prange

from .._blocks import CHUNK  # sizes, and why: fedkern/_blocks.py
from ._philox import philox_block
from ._runtime import KERNEL, row

_2 = np.uint64(2)


def quantize(x, clip: float, scale: float, weight: int, seed: int, stream: int, out) -> None:
    """out[j] = weight * floor(min(max(x[j], -clip), clip) * scale + u_j) in the ring of out's dtype."""
    _quantize(x, np.float64(clip), np.float64(scale), np.uint64(weight), np.uint64(seed), np.uint64(stream), out)


@njit(inline="always")
def _level(x, clip, scale, u):
    """floor(clipped x * scale + u) as a two's complement uint64."""
    v = min(max(np.float64(x), -clip), clip) * scale
    return np.uint64(np.int64(np.floor(v + u)))


@njit(**KERNEL)
def _quantize(x, clip, scale, weight, seed, stream, out):
    n = out.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        j0 = c * CHUNK                       # a multiple of 4: a chunk starts on a block of the stream
        j1 = min(j0 + CHUNK, n)
        for j in range(j0, j1, 4):
            words = philox_block(seed, stream, np.uint64(j) >> _2)
            for i in range(min(4, j1 - j)):
                u = np.float64(words[i]) * 2.0**-32
                out[j + i] = weight * _level(x[j + i], clip, scale, u)  # the store truncates to the ring


@njit(nogil=True, cache=True)
def _add_masks(out, start, pointers, first, signs):
    # four masks per pass over out: a quarter of its loads and stores (ring sums are exact,
    # so the grouping changes no bit)
    n, k = out.shape[0], pointers.shape[0]
    m = 0
    while m + 4 <= k:
        a, b = row(pointers, m, first)[start:start + n], row(pointers, m + 1, first)[start:start + n]
        c, e = row(pointers, m + 2, first)[start:start + n], row(pointers, m + 3, first)[start:start + n]
        sa, sb, sc, se = signs[m], signs[m + 1], signs[m + 2], signs[m + 3]
        for j in range(n):
            out[j] += sa * a[j] + sb * b[j] + sc * c[j] + se * e[j]
        m += 4
    while m < k:
        a, sa = row(pointers, m, first)[start:start + n], signs[m]
        for j in range(n):
            out[j] += sa * a[j]
        m += 1


def add_masks(out, start: int, masks, signs) -> None:
    """out[j] += sum_m signs[m] * masks[m][start + j] in the ring (signs: 1 or 2^bits - 1, i.e. -1)."""
    _add_masks(out, start, masks.pointers, masks.first, signs)


def dequantize(total, step: float, out) -> None:
    """out[j] = signed(total[j]) * step in float64, rounded once (values >= 2^(bits-1) are negative)."""
    _dequantize(total.view(np.int32 if total.dtype == np.uint32 else np.int64), np.float64(step), out)


@njit(**KERNEL)
def _dequantize(signed, step, out):
    for j in prange(out.shape[0]):
        out[j] = np.float64(signed[j]) * step
