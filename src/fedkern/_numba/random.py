"""Numba kernels of the random family: Philox4x32-10 streams into caller buffers.

Same kernels, arguments and bits as ``ext/random.pyx``; the stream is defined in
``fedkern._reference.random``, the inline generator is ``fedkern._numba._philox``. The hot
loops store through unsigned indices: Numba then emits no negative-index wraparound, and
LLVM vectorises the loop over blocks (three times faster than with a signed index).
"""
import numpy as np
from numba import njit, prange

from ._philox import philox4x32_10, philox_block, uniform53
from ._runtime import KERNEL

_1, _2, _3 = np.uint64(1), np.uint64(2), np.uint64(3)  # uint64, or Numba computes indices in float64

def philox4x32(counter, key, out) -> None:
    """out[:4] = Philox4x32-10(counter[:4], key[:2]): the bijection on one block."""
    _philox4x32(counter, key, out)


@njit(cache=True, nogil=True)
def _philox4x32(counter, key, out):
    out[0], out[1], out[2], out[3] = philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1])


def random_bits(seed: int, stream: int, start: int, out) -> None:
    """out[j] = word start + j of stream ``stream`` under ``seed``: word i % 4 of block i // 4."""
    # np.uint64 here: Numba would type a Python int below 2**63 as int64
    _random_bits(np.uint64(seed), np.uint64(stream), np.uint64(start), out)


@njit(inline="always")
def _bits_block(seed, stream, first, b, skip, out):
    """Block first + b holds words 4b - skip .. 4b - skip + 3 of out; keep those inside it."""
    x = philox_block(seed, stream, first + np.uint64(b))
    for w in range(4):
        j = 4 * b - skip + w
        if 0 <= j < out.shape[0]:
            out[j] = x[w]


@njit(**KERNEL)
def _random_bits(seed, stream, start, out):
    n = out.shape[0]
    if n == 0:
        return
    first = start >> _2                 # the block holding out[0]
    skip = np.int64(start & _3)         # its words before out[0]
    # blocks full0 .. full1 - 1 lie inside out (the bounds are computed before the loop: a
    # conditional among prange's arguments keeps Numba from parallelising it)
    full0 = min(skip, 1)
    full1 = (skip + n) >> 2
    for b in prange(full0, full1):
        x0, x1, x2, x3 = philox_block(seed, stream, first + np.uint64(b))
        j = np.uint64(4 * b - skip)  # unsigned: see the module docstring
        out[j], out[j + _1], out[j + _2], out[j + _3] = x0, x1, x2, x3
    # the (at most two) blocks cut by an end of out
    if skip:
        _bits_block(seed, stream, first, 0, skip, out)
    if (skip + n) & 3 and full1 >= full0:  # a cut last block, unless it is block 0
        _bits_block(seed, stream, first, full1, skip, out)


def random_uniform(seed: int, stream: int, start: int, out) -> None:
    """out[j] = uniform start + j of stream ``stream`` under ``seed``, made of words 2i, 2i + 1."""
    _random_uniform(np.uint64(seed), np.uint64(stream), np.uint64(start), out)


@njit(inline="always")
def _uniform_block(seed, stream, first, b, skip, out):
    """Block first + b holds uniforms 2b - skip and 2b - skip + 1 of out; keep those inside it."""
    x0, x1, x2, x3 = philox_block(seed, stream, first + np.uint64(b))
    j = 2 * b - skip
    if 0 <= j < out.shape[0]:
        out[j] = uniform53(x0, x1)
    if 0 <= j + 1 < out.shape[0]:
        out[j + 1] = uniform53(x2, x3)


@njit(**KERNEL)
def _random_uniform(seed, stream, start, out):
    n = out.shape[0]
    if n == 0:
        return
    first = start >> _1                 # the block holding out[0]
    skip = np.int64(start & _1)         # its uniforms before out[0]
    full0 = min(skip, 1)                # blocks full0 .. full1 - 1 lie inside out
    full1 = (skip + n) >> 1
    for b in prange(full0, full1):
        x0, x1, x2, x3 = philox_block(seed, stream, first + np.uint64(b))
        j = np.uint64(2 * b - skip)  # unsigned: see the module docstring
        out[j], out[j + _1] = uniform53(x0, x1), uniform53(x2, x3)
    if skip:
        _uniform_block(seed, stream, first, 0, skip, out)
    if (skip + n) & 1 and full1 >= full0:  # a cut last block, unless it is block 0
        _uniform_block(seed, stream, first, full1, skip, out)
