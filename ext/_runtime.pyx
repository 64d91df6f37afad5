"""Thread control for the Cython backend, the read kernel that measures bandwidth, the
block sizes this build was compiled with, and the ring sum of secure aggregation."""
from cython.parallel cimport prange

from _blocks cimport CHUNK, READ_BLOCK, READ_LANES, blocks
from _fused cimport ring_t
from _openmp cimport fk_max_threads, fk_openmp_enabled, fk_set_threads

#: The block, chunk and lane sizes compiled into the Cython kernels (from ext/_blocks.pxd,
#: generated from fedkern._blocks at build time), by name.
BLOCKS = blocks()


def openmp_enabled() -> bool:
    """Whether the extension was built with OpenMP."""
    return bool(fk_openmp_enabled())


def max_threads() -> int:
    """Threads the next parallel region of the calling thread will use."""
    return fk_max_threads()


def use_threads(int n) -> None:
    """Run this Python thread's next kernels on ``n`` OpenMP threads."""
    fk_set_threads(n)


cdef inline double _block_sum(const float* x, Py_ssize_t n) noexcept nogil:
    # READ_LANES independent partial sums in a fixed-size inner loop: the compiler turns
    # them into vector registers, so the adds keep up with memory and the loop is memory-bound.
    cdef float lanes[READ_LANES]
    cdef Py_ssize_t j, l
    cdef double total = 0.0
    for l in range(READ_LANES):
        lanes[l] = 0.0
    j = 0
    while j + READ_LANES <= n:
        for l in range(READ_LANES):
            lanes[l] = lanes[l] + x[j + l]
        j = j + READ_LANES
    while j < n:
        lanes[0] = lanes[0] + x[j]
        j = j + 1
    for l in range(READ_LANES):
        total = total + lanes[l]
    return total


def read_sum(const float[::1] values) -> float:
    """Sum a float32 array in one parallel pass, reading every byte once.

    Memory-bound by design: ``fedkern bench`` divides ``values.nbytes`` by its time to get
    the machine's read bandwidth.
    """
    cdef Py_ssize_t n = values.shape[0], nblocks = (n + READ_BLOCK - 1) // READ_BLOCK
    cdef Py_ssize_t b, j0
    cdef double total = 0.0
    if n == 0:
        return 0.0
    with nogil:
        for b in prange(nblocks, schedule="static"):
            j0 = b * READ_BLOCK
            total += _block_sum(&values[j0], min(<Py_ssize_t> READ_BLOCK, n - j0))
    return total


cdef inline void _ring_add(ring_t* acc, const ring_t* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + x[j]  # unsigned: wraps around modulo 2^32 or 2^64


def ring_sum(const ring_t[:, ::1] rows, ring_t[::1] out) -> None:
    """out[j] = sum_i rows[i, j] in the ring of the dtype (uint32: mod 2^32, uint64: mod 2^64).

    The building block of secure aggregation's unmasking: masks cancel only under exact
    wrap-around, which unsigned C arithmetic is. Parallel over CHUNK-coordinate chunks, rows
    added in order into a chunk of ``out`` that stays in L1 (any order gives the same ring
    sum). The caller validates: ``out.shape[0] == rows.shape[1]``, no overlap.
    """
    cdef Py_ssize_t k = rows.shape[0], d = out.shape[0]
    cdef Py_ssize_t c, i, j, j0, n
    with nogil:
        for c in prange((d + CHUNK - 1) // CHUNK, schedule="static"):
            j0 = c * CHUNK
            n = min(<Py_ssize_t> CHUNK, d - j0)
            for j in range(j0, j0 + n):
                out[j] = 0
            for i in range(k):
                _ring_add(&out[j0], &rows[i, j0], n)
