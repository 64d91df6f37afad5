"""Philox4x32-10 in plain numpy, elementwise over arrays of counters: the generator
behind ``fedkern._reference.random`` (whose docstring defines the stream)."""
import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # Weyl key increments: golden ratio, sqrt(3) - 1
_ROUNDS = 10


def philox4x32_10(counter, key):
    """The Philox4x32-10 bijection, elementwise over arrays of counters.

    Parameters
    ----------
    counter : four arrays (or ints) of 32-bit words (x0, x1, x2, x3)
    key : two 32-bit words (k0, k1)

    Returns
    -------
    tuple of four uint64 arrays holding the output words

    Notes
    -----
    Each of the ten rounds maps (x0, x1, x2, x3) to
    ``(hi(M1 x2) ^ x1 ^ k0, lo(M1 x2), hi(M0 x0) ^ x3 ^ k1, lo(M0 x0))``, hi and lo being
    the upper and lower 32 bits of the 64-bit product; between rounds the key grows by
    (W0, W1) mod 2**32.
    """
    x0, x1, x2, x3 = (np.asarray(x, dtype=np.uint64) for x in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for r in range(_ROUNDS):
        if r > 0:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        p0, p1 = _M0 * x0, _M1 * x2  # < 2**64: exact in uint64
        x0, x1, x2, x3 = (p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & _MASK32
    return x0, x1, x2, x3


def uniform53(lo, hi):
    """float64 in [0, 1) from two words: the top 53 bits of ``hi * 2**32 + lo``, times 2**-53.

    Integers below 2**53 convert to float64 exactly and the scaling is by a power of two,
    so the result has no rounding at all: (0, 0) gives 0.0, all ones give 1 - 2**-53.
    """
    top53 = (np.asarray(hi, dtype=np.uint64) << np.uint64(21)) | (np.asarray(lo, dtype=np.uint64) >> np.uint64(11))
    return top53.astype(np.float64) * 2.0**-53


def blocks(seed: int, stream: int, first: int, count: int) -> np.ndarray:
    """Blocks ``first .. first + count - 1`` of a stream, as a (count, 4) uint32 array."""
    block = np.uint64(first) + np.arange(count, dtype=np.uint64)
    seed, stream = int(seed), int(stream)
    words = philox4x32_10((block & _MASK32, block >> np.uint64(32), stream & 0xFFFFFFFF, stream >> 32),
                          (seed & 0xFFFFFFFF, seed >> 32))
    return np.stack(words, axis=1).astype(np.uint32)
