"""Philox4x32-10 as Numba functions inlined into kernels: the twin of ``ext/_philox.pxd``.

Other Numba kernel modules draw inside their own loops with
``from ._philox import philox_block, uniform53``; the stream these functions define is
documented in ``fedkern._reference.random``.

All integer arithmetic is in explicit ``np.uint64``, constants and shift counts included:
Numba types ``uint64 op int64`` as float64, which would silently drop low bits.
"""
import numpy as np
from numba import njit

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_1, _2, _3 = np.uint64(1), np.uint64(2), np.uint64(3)
_11, _21, _32 = np.uint64(11), np.uint64(21), np.uint64(32)
_TWO_TO_MINUS_53 = 2.0**-53


@njit(inline="always")
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The Philox4x32-10 bijection of the counter (c0, c1, c2, c3) under the key (k0, k1).

    Ten rounds of (x0, x1, x2, x3) <- (hi(M1 x2) ^ x1 ^ k0, lo(M1 x2), hi(M0 x0) ^ x3 ^ k1,
    lo(M0 x0)), the key growing by the Weyl constants mod 2**32 between rounds (Salmon et
    al., SC 2011). Words are held in uint64, so M x fits and its halves are a shift and a
    mask; arguments may be any unsigned integers, of which the low 32 bits count. Returns
    four np.uint32.
    """
    x0, x1, x2, x3 = (np.uint64(c0) & _MASK32, np.uint64(c1) & _MASK32,
                      np.uint64(c2) & _MASK32, np.uint64(c3) & _MASK32)
    key0, key1 = np.uint64(k0) & _MASK32, np.uint64(k1) & _MASK32
    for _ in range(10):
        p0 = _M0 * x0
        p1 = _M1 * x2
        x0, x1, x2, x3 = (p1 >> _32) ^ x1 ^ key0, p1 & _MASK32, (p0 >> _32) ^ x3 ^ key1, p0 & _MASK32
        key0 = (key0 + _W0) & _MASK32  # the bump after round 10 is unused
        key1 = (key1 + _W1) & _MASK32
    return np.uint32(x0), np.uint32(x1), np.uint32(x2), np.uint32(x3)


@njit(inline="always")
def philox_block(seed, stream, block):
    """Block ``block`` of stream ``stream`` under ``seed`` (all uint64): key (seed lo32, seed hi32),
    counter (block lo32, block hi32, stream lo32, stream hi32). Returns four np.uint32."""
    return philox4x32_10(block & _MASK32, block >> _32, stream & _MASK32, stream >> _32,
                         seed & _MASK32, seed >> _32)


@njit(inline="always")
def uniform53(lo, hi):
    """float64 in [0, 1): the top 53 bits of hi * 2**32 + lo, times 2**-53 (exact, no rounding)."""
    top53 = (np.uint64(hi) << _21) | (np.uint64(lo) >> _11)
    return np.float64(np.int64(top53)) * _TWO_TO_MINUS_53  # < 2**53: exact through int64
