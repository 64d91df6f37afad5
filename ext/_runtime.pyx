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


def read_sum(const float[::1] values) -> float:
    """Sum a float32 array in one parallel pass, reading every byte once.

    Memory-bound by design: ``fedkern bench`` divides ``values.nbytes`` by its time to get
    the machine's read bandwidth. Four independent float32 partial sums per block keep the
    adds off the critical path.
    """
    cdef Py_ssize_t n = values.shape[0], nblocks = (n + BLOCK - 1) // BLOCK
    cdef Py_ssize_t b, j, j0, j1
    cdef float s0, s1, s2, s3
    cdef double total = 0.0
    with nogil:
        for b in prange(nblocks, schedule="static"):
            j0 = b * BLOCK
            j1 = min(j0 + BLOCK, n)
            s0 = 0; s1 = 0; s2 = 0; s3 = 0
            j = j0
            while j + 4 <= j1:
                s0 = s0 + values[j]
                s1 = s1 + values[j + 1]
                s2 = s2 + values[j + 2]
                s3 = s3 + values[j + 3]
                j = j + 4
            while j < j1:
                s0 = s0 + values[j]
                j = j + 1
            total += (s0 + s1) + (s2 + s3)
    return total
