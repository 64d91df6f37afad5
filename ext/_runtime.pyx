"""Thread control for the Cython backend, and the read kernel that measures bandwidth."""
from cython.parallel cimport prange

from _openmp cimport fk_max_threads, fk_openmp_enabled, fk_set_threads

cdef enum:
    BLOCK = 65536


def openmp_enabled() -> bool:
    """Whether the extension was built with OpenMP."""
    return bool(fk_openmp_enabled())


def max_threads() -> int:
    """Threads the next parallel region of the calling thread will use."""
    return fk_max_threads()


def use_threads(int n) -> None:
    """Run this Python thread's next kernels on ``n`` OpenMP threads."""
    fk_set_threads(n)


cdef enum:
    LANES = 32


cdef inline double _block_sum(const float* x, Py_ssize_t n) noexcept nogil:
    # LANES independent partial sums in a fixed-size inner loop: the compiler turns them
    # into vector registers, so the adds keep up with memory and the loop is memory-bound.
    cdef float lanes[LANES]
    cdef Py_ssize_t j, l
    cdef double total = 0.0
    for l in range(LANES):
        lanes[l] = 0.0
    j = 0
    while j + LANES <= n:
        for l in range(LANES):
            lanes[l] = lanes[l] + x[j + l]
        j = j + LANES
    while j < n:
        lanes[0] = lanes[0] + x[j]
        j = j + 1
    for l in range(LANES):
        total = total + lanes[l]
    return total


def read_sum(const float[::1] values) -> float:
    """Sum a float32 array in one parallel pass, reading every byte once.

    Memory-bound by design: ``fedkern bench`` divides ``values.nbytes`` by its time to get
    the machine's read bandwidth.
    """
    cdef Py_ssize_t n = values.shape[0], nblocks = (n + BLOCK - 1) // BLOCK
    cdef Py_ssize_t b, j0
    cdef double total = 0.0
    if n == 0:
        return 0.0
    with nogil:
        for b in prange(nblocks, schedule="static"):
            j0 = b * BLOCK
            total += _block_sum(&values[j0], min(<Py_ssize_t> BLOCK, n - j0))
    return total
