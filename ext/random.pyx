"""Cython/OpenMP kernels of the random family: Philox4x32-10 streams into caller buffers.

Same kernels, arguments and bits as ``fedkern._reference.random``, where the stream is
defined. The generator itself is inline C in ``_philox.pxd``, which other families cimport.
Every output depends only on (seed, stream, its index), so blocks of the generator are
split over threads (``prange``, static schedule, GIL released) with no effect on the bits.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint32_t, uint64_t

from _philox cimport Words4, philox4x32_10, philox_block, uniform53


def philox4x32(const uint32_t[::1] counter, const uint32_t[::1] key, uint32_t[::1] out) -> None:
    """out[:4] = Philox4x32-10(counter[:4], key[:2]): the bijection on one block."""
    cdef Words4 ctr
    cdef Py_ssize_t w
    for w in range(4):
        ctr.x[w] = counter[w]
    ctr = philox4x32_10(ctr, key[0], key[1])
    for w in range(4):
        out[w] = ctr.x[w]


cdef inline void _bits_block(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t b,
                             Py_ssize_t skip, uint32_t[::1] out) noexcept nogil:
    # block first + b holds words 4b - skip ... 4b - skip + 3 of out; keep those inside it
    cdef Words4 x = philox_block(seed, stream, first + <uint64_t> b)
    cdef Py_ssize_t w, j
    for w in range(4):
        j = 4 * b - skip + w
        if 0 <= j < out.shape[0]:
            out[j] = x.x[w]


def random_bits(uint64_t seed, uint64_t stream, uint64_t start, uint32_t[::1] out) -> None:
    """out[j] = word start + j of stream ``stream`` under ``seed``: word i % 4 of block i // 4."""
    cdef Py_ssize_t n = out.shape[0]
    cdef uint64_t first = start >> 2                        # the block holding out[0]
    cdef Py_ssize_t skip = <Py_ssize_t> (start & 3)         # its words before out[0]
    cdef Py_ssize_t full0 = min(skip, 1), full1 = (skip + n) >> 2  # blocks full0 .. full1 - 1 lie inside out
    cdef Py_ssize_t b, j
    cdef Words4 x
    if n == 0:
        return
    with nogil:
        for b in prange(full0, full1, schedule="static"):
            x = philox_block(seed, stream, first + <uint64_t> b)
            j = 4 * b - skip
            out[j], out[j + 1], out[j + 2], out[j + 3] = x.x[0], x.x[1], x.x[2], x.x[3]
        # the (at most two) blocks cut by an end of out
        if skip:
            _bits_block(seed, stream, first, 0, skip, out)
        if (skip + n) & 3 and full1 >= full0:  # a cut last block, unless it is block 0
            _bits_block(seed, stream, first, full1, skip, out)


cdef inline void _uniform_block(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t b,
                                Py_ssize_t skip, double[::1] out) noexcept nogil:
    # block first + b holds uniforms 2b - skip and 2b - skip + 1 of out; keep those inside it
    cdef Words4 x = philox_block(seed, stream, first + <uint64_t> b)
    cdef Py_ssize_t j = 2 * b - skip
    if 0 <= j < out.shape[0]:
        out[j] = uniform53(x.x[0], x.x[1])
    if 0 <= j + 1 < out.shape[0]:
        out[j + 1] = uniform53(x.x[2], x.x[3])


def random_uniform(uint64_t seed, uint64_t stream, uint64_t start, double[::1] out) -> None:
    """out[j] = uniform start + j of stream ``stream`` under ``seed``, made of words 2i, 2i + 1."""
    cdef Py_ssize_t n = out.shape[0]
    cdef uint64_t first = start >> 1                        # the block holding out[0]
    cdef Py_ssize_t skip = <Py_ssize_t> (start & 1)         # its uniforms before out[0]
    cdef Py_ssize_t full0 = min(skip, 1), full1 = (skip + n) >> 1  # blocks full0 .. full1 - 1 lie inside out
    cdef Py_ssize_t b, j
    cdef Words4 x
    if n == 0:
        return
    with nogil:
        for b in prange(full0, full1, schedule="static"):
            x = philox_block(seed, stream, first + <uint64_t> b)
            j = 2 * b - skip
            out[j], out[j + 1] = uniform53(x.x[0], x.x[1]), uniform53(x.x[2], x.x[3])
        if skip:
            _uniform_block(seed, stream, first, 0, skip, out)
        if (skip + n) & 1 and full1 >= full0:  # a cut last block, unless it is block 0
            _uniform_block(seed, stream, first, full1, skip, out)
