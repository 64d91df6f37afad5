"""Thread control for the Numba backend, row access by address, the read kernel, and the
ring sum of secure aggregation."""
import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._blocks import CHUNK, READ_BLOCK, READ_LANES  # sizes, and why: fedkern/_blocks.py

#: Options of every Numba kernel: parallel over coordinates, cached on disk so a new
#: process does not recompile, GIL released; no fastmath, which would change results.
KERNEL = dict(parallel=True, cache=True, nogil=True)


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
    for b in prange((n + READ_BLOCK - 1) // READ_BLOCK):
        j0 = b * READ_BLOCK
        j1 = min(j0 + READ_BLOCK, n)
        lanes = np.zeros(READ_LANES, np.float32)  # independent sums: LLVM keeps them in registers
        j = j0
        while j + READ_LANES <= j1:
            for l in range(READ_LANES):
                lanes[l] += values[j + l]
            j += READ_LANES
        while j < j1:
            lanes[0] += values[j]
            j += 1
        block = 0.0
        for l in range(READ_LANES):
            block += lanes[l]
        total += block
    return total


@njit(**KERNEL)
def ring_sum(rows, out):
    """out[j] = sum_i rows[i, j] in the ring of the dtype (uint32: mod 2^32, uint64: mod 2^64);
    see ``fedkern._cython._runtime.ring_sum``. Numba widens uint32 sums to 64 bits and the
    store truncates them, which is the same wrap-around."""
    k = rows.shape[0]
    d = out.shape[0]
    for c in prange((d + CHUNK - 1) // CHUNK):
        j0 = c * CHUNK
        j1 = min(j0 + CHUNK, d)
        for j in range(j0, j1):
            out[j] = 0
        for i in range(k):
            x = rows[i]
            for j in range(j0, j1):
                out[j] += x[j]
