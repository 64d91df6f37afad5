"""Cython/OpenMP kernels of the secure aggregation family: fixed-point quantisation into
the ring, masking with keystreams, decoding a ring sum.

Same kernels, arguments and bits as ``fedkern._reference.secagg``, where the quantisation
is defined. Unsigned C arithmetic wraps around, which is the ring's arithmetic.
``add_masks`` runs serially with the GIL released: the protocol calls it on cache-sized
chunks from several Python threads, each chunk's keystreams just written by OpenSSL.
"""
from cython.parallel cimport prange
from libc.math cimport floor
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uintptr_t

from _blocks cimport CHUNK  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t, out_t, ring_t
from _openmp cimport fk_threads_for
from _philox cimport Words4, philox_block


cdef inline uint64_t _level(double x, double clip, double scale, double u) noexcept nogil:
    """floor(clipped x * scale + u) as a two's complement uint64."""
    cdef double v = min(max(x, -clip), clip) * scale
    return <uint64_t> <int64_t> floor(v + u)


def quantize(x, double clip, double scale, uint64_t weight, uint64_t seed, uint64_t stream, out) -> None:
    """out[j] = weight * floor(min(max(x[j], -clip), clip) * scale + u_j) in the ring of out's dtype."""
    _quantize(x, clip, scale, weight, seed, stream, out)


def _quantize(const in_t[::1] x, double clip, double scale, uint64_t weight, uint64_t seed, uint64_t stream,
              ring_t[::1] out):
    cdef Py_ssize_t n = out.shape[0], c, i, j, j0, j1
    cdef Words4 w
    cdef ring_t wr = <ring_t> weight
    with nogil:
        for c in prange((n + CHUNK - 1) // CHUNK, schedule="static",
                        num_threads=fk_threads_for(n * <Py_ssize_t> 16)):
            j0 = c * CHUNK          # a multiple of 4: a chunk starts on a block of the stream
            j1 = min(j0 + CHUNK, n)
            j = j0
            while j < j1:
                w = philox_block(seed, stream, <uint64_t> j >> 2)
                for i in range(min(4, j1 - j)):
                    out[j + i] = wr * <ring_t> _level(x[j + i], clip, scale, w.x[i] * (1.0 / 4294967296.0))
                j = j + 4


def add_masks(out, Py_ssize_t start, masks, signs) -> None:
    """out[j] += sum_m signs[m] * masks[m][start + j] in the ring (signs: 1 or 2^bits - 1, i.e. -1)."""
    _add_masks(out, start, masks.pointers, signs)


def _add_masks(ring_t[::1] out, Py_ssize_t start, const uintptr_t[::1] pointers, const ring_t[::1] signs):
    # four masks per pass over out: a quarter of its loads and stores (ring sums are exact,
    # so the grouping changes no bit)
    cdef Py_ssize_t n = out.shape[0], k = pointers.shape[0], m = 0, j
    cdef const ring_t* a
    cdef const ring_t* b
    cdef const ring_t* c
    cdef const ring_t* e
    cdef ring_t sa, sb, sc, se
    with nogil:
        while m + 4 <= k:
            a, b = (<const ring_t*> pointers[m]) + start, (<const ring_t*> pointers[m + 1]) + start
            c, e = (<const ring_t*> pointers[m + 2]) + start, (<const ring_t*> pointers[m + 3]) + start
            sa, sb, sc, se = signs[m], signs[m + 1], signs[m + 2], signs[m + 3]
            for j in range(n):
                out[j] = out[j] + sa * a[j] + sb * b[j] + sc * c[j] + se * e[j]
            m = m + 4
        while m < k:
            a, sa = (<const ring_t*> pointers[m]) + start, signs[m]
            for j in range(n):
                out[j] = out[j] + sa * a[j]
            m = m + 1


def dequantize(total, double step, out) -> None:
    """out[j] = signed(total[j]) * step in float64, rounded once (values >= 2^(bits-1) are negative)."""
    _dequantize(total, step, out)


def _dequantize(const ring_t[::1] total, double step, out_t[::1] out):
    cdef Py_ssize_t n = out.shape[0], j
    cdef double v
    with nogil:
        for j in prange(n, schedule="static", num_threads=fk_threads_for(n * <Py_ssize_t> 12)):
            if ring_t is uint32_t:
                v = <double> <int32_t> total[j]
            else:
                v = <double> <int64_t> total[j]
            out[j] = <out_t> (v * step)
