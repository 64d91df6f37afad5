"""Thread control for the Numba backend, row access by address, and the read kernel."""
import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Options of every Numba kernel: parallel over coordinates, cached on disk so a new
#: process does not recompile, GIL released; no fastmath, which would change results.
KERNEL = dict(parallel=True, cache=True, nogil=True)
BLOCK = 65536


def use_threads(n: int) -> None:
    """Run this Python thread's next kernels on ``n`` Numba threads (at most its pool)."""
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


@intrinsic
def _address_as_pointer(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(inline="always")
def row(pointers, i, first):
    """Client row ``i`` as an array, read through its address like ``first``'s dtype and length."""
    return numba.carray(_address_as_pointer(pointers[i]), first.shape, first.dtype)


@njit(**KERNEL)
def read_sum(values):
    """Sum a float32 array in one parallel pass; see ``fedkern._cython._runtime.read_sum``."""
    n = values.shape[0]
    total = 0.0
    for b in prange((n + BLOCK - 1) // BLOCK):
        j0 = b * BLOCK
        j1 = min(j0 + BLOCK, n)
        s = np.zeros(4, np.float32)
        j = j0
        while j + 4 <= j1:
            s[0] += values[j]
            s[1] += values[j + 1]
            s[2] += values[j + 2]
            s[3] += values[j + 3]
            j += 4
        while j < j1:
            s[0] += values[j]
            j += 1
        total += (s[0] + s[1]) + (s[2] + s[3])
    return total
