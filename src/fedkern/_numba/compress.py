"""Numba kernels of the compression family: block statistics, stochastic rounding, fused
decode-and-accumulate, scatter-add, random-k indices and the Walsh-Hadamard transform.

Same kernels, arguments and bits as ``ext/compress.pyx``; the codecs' bits are defined in
``fedkern._reference.compress``. Work is split over coordinate chunks of COMPRESS_CHUNK (a
multiple of 32: whole Philox blocks and whole bytes of codes and signs per chunk), and
each chunk adds the clients in index order, so no result depends on the thread count.

The hot loops index with unsigned integers: Numba gives every signed index a
negative-index fix-up, which keeps LLVM from vectorising the loop (the 8-bit decode loop
ran 3.6x faster unsigned, measured on one chunk).
"""
import numpy as np
from numba import njit, prange

from .._blocks import COMPRESS_CHUNK, FWHT_BLOCK, SCATTER_CHUNK  # sizes, and why: fedkern/_blocks.py
from ._philox import philox_block
from ._runtime import KERNEL, row

_32 = np.uint64(32)
_SCALE32 = 2.0**-32


def block_stats(x, block_size: int, stats) -> None:
    """stats[b] = (min, max, sum, sum x^2, sum |x|) of block b, sums in float64 in index order."""
    _block_stats(x, np.int64(block_size), stats)


@njit(**KERNEL)
def _block_stats(x, block_size, stats):
    d = x.shape[0]
    for b in prange(stats.shape[0]):
        j0 = b * block_size
        j1 = min(d, j0 + block_size)
        lo = hi = np.float64(x[j0])
        s = sq = ab = 0.0
        for j in range(j0, j1):
            v = np.float64(x[j])
            lo = min(lo, v)
            hi = max(hi, v)
            s += v
            sq += v * v
            ab += abs(v)
        stats[b, 0], stats[b, 1], stats[b, 2], stats[b, 3], stats[b, 4] = lo, hi, s, sq, ab


def quantize(x, offsets, steps, block_size: int, levels: int, bits: int, signed: bool, seed: int, stream: int,
             codes, signs) -> None:
    """Stochastic rounding of x onto offsets + steps * {0 .. levels} per block, packed."""
    _quantize(x, offsets, steps, np.int64(block_size), np.float64(levels), np.int64(bits), bool(signed),
              np.uint64(seed), np.uint64(stream), codes, signs)


@njit(inline="always")
def _round(v, off, step, levels, w):
    t = (v - off) / step if step > 0 else 0.0
    t = min(max(t, 0.0), levels)
    low = np.floor(t)
    return np.uint64(low + (1.0 if np.float64(w) * _SCALE32 < t - low else 0.0))


@njit(**KERNEL)
def _quantize(x, offsets, steps, block_size, levels, bits, signed, seed, stream, codes, signs):
    d = x.shape[0]
    for c in prange((d + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK):
        for g0 in range(c * COMPRESS_CHUNK, min(d, (c + 1) * COMPRESS_CHUNK), 8):
            n = min(8, d - g0)
            packed = np.uint64(0)
            sign = np.uint64(0)
            q = np.uint64(g0 // 4)
            for half in range(2):
                w0, w1, w2, w3 = philox_block(seed, stream, q + np.uint64(half))
                for m in range(4):
                    i = 4 * half + m
                    if i < n:
                        j = g0 + i
                        b = j // block_size
                        v = np.float64(x[j])
                        if signed:
                            if v < 0:
                                sign |= np.uint64(1) << np.uint64(i)
                            v = abs(v)
                        w = w0 if m == 0 else (w1 if m == 1 else (w2 if m == 2 else w3))
                        packed |= _round(v, offsets[b], steps[b], levels, w) << np.uint64(i * bits)
            nbytes = (n * bits + 7) // 8
            base = (g0 * bits) // 8
            for m in range(nbytes):
                codes[base + m] = np.uint8((packed >> np.uint64(8 * m)) & np.uint64(0xFF))
            if signed:
                signs[g0 // 8] = np.uint8(sign)


def accumulate_quantized(out, codes, signs, offsets, steps, weights, block_size: int, bits: int,
                         signed: bool) -> None:
    """out[j] += sum_i weights[i] decode_i(j), clients in index order, in float64."""
    _accumulate_quantized(out, codes.pointers, codes.first, signs.pointers, signs.first, offsets.pointers,
                          offsets.first, steps.pointers, weights, np.int64(block_size), np.int64(bits), bool(signed))


@njit(**KERNEL)
def _accumulate_quantized(out, code_ptrs, code0, sign_ptrs, sign0, off_ptrs, off0, step_ptrs, weights, block_size,
                          bits, signed):
    d = out.shape[0]
    mask = (1 << bits) - 1
    per = 8 // bits
    for c in prange((d + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK):
        c0 = c * COMPRESS_CHUNK
        c1 = min(d, c0 + COMPRESS_CHUNK)
        for i in range(weights.shape[0]):
            codes = row(code_ptrs, i, code0)
            signs = row(sign_ptrs, i, sign0)
            offs = row(off_ptrs, i, off0)
            steps = row(step_ptrs, i, off0)
            w = weights[i]
            a = c0
            while a < c1:            # one block segment at a time: its offset and step are fixed
                b = a // block_size
                e = min(c1, (b + 1) * block_size)
                # w (off + step q) as (w off) + (w step) q, as the Cython kernel does
                off, step = w * offs[b], w * steps[b]
                if bits == 8 and not signed:     # a loop of its own, without the branch: it vectorises
                    for j in range(np.uint64(a), np.uint64(e)):
                        out[j] += off + step * np.float64(codes[j])
                else:
                    for j in range(a, e):
                        code = (codes[j // per] >> ((j % per) * bits)) & mask
                        v = off + step * np.float64(code)
                        if signed and (signs[j >> 3] >> (j & 7)) & 1:
                            v = -v
                        out[j] += v
                a = e


def scatter_add(out, indices, values, weights) -> None:
    """out[indices[i][m]] += weights[i] * values[i][m], clients in index order; each client's
    indices sorted and distinct (validated), so a chunk finds its range by bisection."""
    _scatter_add(out, indices.pointers, indices.first, values.pointers, values.first, weights)


@njit(**KERNEL)
def _scatter_add(out, idx_ptrs, idx0, val_ptrs, val0, weights):
    d = out.shape[0]
    for c in prange((d + SCATTER_CHUNK - 1) // SCATTER_CHUNK):
        c0 = np.uint32(c * SCATTER_CHUNK)
        c1 = np.uint32(min(d, (c + 1) * SCATTER_CHUNK))
        for i in range(weights.shape[0]):
            idx = row(idx_ptrs, i, idx0)
            vals = row(val_ptrs, i, val0)
            w = weights[i]
            m0 = np.searchsorted(idx, c0)
            m1 = np.searchsorted(idx, c1)
            for m in range(np.uint64(m0), np.uint64(m1)):
                out[idx[m]] += w * np.float64(vals[m])


def random_k_indices(seed: int, stream: int, d: int, k: int, mask, out) -> None:
    """out = the k sorted indices of Floyd's algorithm on the stream; mask: d zero bytes, zero again after."""
    _random_k_indices(np.uint64(seed), np.uint64(stream), np.int64(d), np.int64(k), mask, out)


@njit(cache=True, nogil=True)
def _random_k_indices(seed, stream, d, k, mask, out):
    for i in range(k):
        w0, w1, w2, w3 = philox_block(seed, stream, np.uint64(i // 2))
        lo, hi = (np.uint64(w0), np.uint64(w1)) if i % 2 == 0 else (np.uint64(w2), np.uint64(w3))
        n = np.uint64(d - k + i + 1)
        t = (hi * n + ((lo * n) >> _32)) >> _32
        if mask[t]:
            t = np.uint64(d - k + i)
        mask[t] = 1
        out[i] = np.uint32(t)
    out.sort()
    for i in range(k):
        mask[out[i]] = 0


def fwht(x) -> None:
    """x <- H x in place (unnormalised Walsh-Hadamard), stages h = 1, 2, 4, ... as the reference."""
    _fwht(x)


@njit(inline="always")
def _butterflies(x, j0, j1, h0, h1):
    h = h0
    while h < h1:
        for a in range(j0, j1, 2 * h):
            for j in range(a, a + h):
                u, v = x[j], x[j + h]
                x[j] = u + v
                x[j + h] = u - v
        h *= 2


@njit(**KERNEL)
def _fwht(x):
    n = x.shape[0]
    block = min(n, FWHT_BLOCK)
    for c in prange(n // block):      # stages within a block: the block stays in L1
        _butterflies(x, c * block, (c + 1) * block, 1, block)
    h = block
    while h < n:                       # the wider stages, one parallel pass each
        for p in prange(n // 2):
            a = (p // h) * 2 * h + p % h
            u, v = x[a], x[a + h]
            x[a] = u + v
            x[a + h] = u - v
        h *= 2
