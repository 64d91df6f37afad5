r"""Reference kernels of the privacy family, in plain numpy; the normal stream is defined here.

Kernels take validated inputs (see ``fedkern._validate``) and write into their buffers.

**The normal stream.** Normal ``i`` of stream ``stream`` under ``seed`` is coordinate
``i % 2`` of the Box-Muller pair (Box and Muller, "A note on the generation of random
normal deviates", 1958) made of block ``p = i // 2`` of the Philox stream of
``fedkern._reference.random``, words (w0, w1, w2, w3)::

    k1 = top 52 bits of w1 * 2**32 + w0,   k2 = top 52 bits of w3 * 2**32 + w2
    r = sqrt(-2 log((2**52 - k1) 2**-52)),  theta = 2 pi k2 2**-52
    normal 2p = r cos(theta),  normal 2p + 1 = r sin(theta)

The radius's argument lies in [2**-52, 1], so the logarithm is finite and r <= 8.49.
(52 bits rather than 53: integers up to 2**52 convert to float64 by an or and a
subtraction, which vectorises where a vector int64 conversion does not exist, AVX2.)
Every backend must give the same bits, and libm's (or numpy's SIMD) ``log``, ``sin`` and
``cos`` differ between machines by an ulp, so the three are computed here from correctly
rounded adds, multiplies and divides in a fixed order (and the C build turns contraction
into FMA off):

* ``log``: the integer n = 2**52 - k1 converts to float64 exactly; its exponent bits give
  e and its mantissa m in [1, 2), halved (e + 1) when above sqrt 2; then
  log m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, by the odd series of atanh
  through s**21 (truncation below 1e-17 relative), and log = (e - 52) ln2 + log m with
  ln2 split in two (fdlibm's ln2_hi, ln2_lo) so (e - 52) ln2_hi is exact.
* ``cos``/``sin``: the top 3 bits of k2 are theta's octant q; the other 49 bits give the
  offset f in [0, 1) within it, exactly, and g = f (q even) or 1 - f (q odd), also exact;
  with x = g pi / 4 in [0, pi / 4], sin x and cos x by their Taylor series through x**15 and
  x**16 (truncation below 1e-16), then swapped and negated as q's quadrant says.

Noise is added in float64 and rounded once into the output's dtype, one coordinate at a
time: no float64 array of the vector's length is ever made by a compiled kernel.
"""
from math import factorial

import numpy as np

from ._philox import blocks

#: log: 1 / (2k + 1), k = 10 .. 0 (Horner order), the series of atanh(s) / s in s**2
LOG_SERIES = tuple(1 / (2 * k + 1) for k in range(10, -1, -1))
#: sin x / x and cos x in x**2, Horner order: (-1)**k / (2k + 1)!, (-1)**k / (2k)!
SIN_SERIES = tuple((-1) ** k / factorial(2 * k + 1) for k in range(7, -1, -1))
COS_SERIES = tuple((-1) ** k / factorial(2 * k) for k in range(8, -1, -1))
LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
SQRT2, QUARTER_PI = 1.4142135623730951, 0.7853981633974483
_TWO_52, _TWO_49 = np.uint64(1 << 52), np.uint64(1 << 49)
_MANTISSA, _ONE_BITS = np.uint64((1 << 52) - 1), np.uint64(0x3FF << 52)


def _horner(coefficients, y):
    p = np.full_like(y, coefficients[0])
    for c in coefficients[1:]:
        p = p * y + c
    return p


def _log_scaled(n: np.ndarray) -> np.ndarray:
    """log(n 2**-52) for uint64 integers 1 <= n <= 2**52, as the module docstring says."""
    bits = n.astype(np.float64).view(np.uint64)
    e = ((bits >> np.uint64(52)).astype(np.int64) - (1023 + 52)).astype(np.float64)
    m = ((bits & _MANTISSA) | _ONE_BITS).view(np.float64)
    high = m > SQRT2
    m = np.where(high, m * 0.5, m)
    e = np.where(high, e + 1.0, e)
    f = m - 1.0
    s = f / (2.0 + f)
    return e * LN2_HI + (e * LN2_LO + 2.0 * s * _horner(LOG_SERIES, s * s))


def _normal_pairs(seed: int, stream: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Normals 2p and 2p + 1 for the pairs p = first .. first + count - 1 of the stream."""
    words = blocks(seed, stream, first, count).astype(np.uint64)
    k1 = (words[:, 1] << np.uint64(20)) | (words[:, 0] >> np.uint64(12))
    k2 = (words[:, 3] << np.uint64(20)) | (words[:, 2] >> np.uint64(12))
    r = np.sqrt(-2.0 * _log_scaled(_TWO_52 - k1))
    octant, low = k2 >> np.uint64(49), k2 & (_TWO_49 - np.uint64(1))
    odd = (octant & np.uint64(1)).astype(bool)
    g = np.where(odd, _TWO_49 - low, low).astype(np.float64) * 2.0**-49
    x = g * QUARTER_PI
    x2 = x * x
    sin_x, cos_x = _horner(SIN_SERIES, x2) * x, _horner(COS_SERIES, x2)
    swap = ((octant + np.uint64(1)) & np.uint64(2)).astype(bool)
    sin_x, cos_x = np.where(swap, cos_x, sin_x), np.where(swap, sin_x, cos_x)
    sin_x = np.where((octant & np.uint64(4)).astype(bool), -sin_x, sin_x)
    cos_x = np.where(((octant + np.uint64(2)) & np.uint64(4)).astype(bool), -cos_x, cos_x)
    return r * cos_x, r * sin_x


def gaussian_noise(x: np.ndarray, std: float, seed: int, stream: int, start: int, out: np.ndarray) -> None:
    """out[j] = x[j] + std * normal(start + j), in float64, rounded once (``out`` may be ``x``)."""
    start, n = int(start), x.shape[0]
    skip = start % 2  # normals of the first pair before out[0]
    z0, z1 = _normal_pairs(seed, stream, start // 2, (skip + n + 1) // 2)
    normals = np.stack([z0, z1], axis=1).reshape(-1)[skip:skip + n]
    out[...] = x.astype(np.float64) + np.float64(std) * normals


def clip_and_sum(updates, clip: float, weights: np.ndarray, out: np.ndarray, norms: np.ndarray) -> None:
    """out = sum_i weights[i] min(1, clip / ||updates[i]||) updates[i] in float64; norms get the norms."""
    total = np.zeros(updates.d)
    for i, row in enumerate(updates):
        row64 = row.astype(np.float64)
        norms[i] = np.sqrt(np.dot(row64, row64))
        scale = clip / norms[i] if norms[i] > clip else 1.0
        total += (weights[i] * scale) * row64
    out[...] = total
