"""Cython/OpenMP kernels of the privacy family: clipped weighted sums and Gaussian noise.

Same kernels, arguments and bits as ``fedkern._reference.privacy``, where the normal
stream is defined. Client rows are read through ``updates.pointers``; rows go in groups
(fedkern._tuning.clip_group), norms then the weighted sum, so the sum's read of a group
comes from cache when it fits. Noise is a pure function of (seed, stream, index): pairs of
normals are split over threads with no effect on the bits.
"""
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdint cimport int64_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free
from libc.string cimport memset

from _blocks cimport NOISE_PAIRS, NORM_BLOCK  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t, out_t
from _openmp cimport fk_threads_for
from _philox cimport philox_words
from _rows cimport add_rows, block_sq_norm, block_sq_norms8
from _scratch cimport scratch

from fedkern._tuning import clip_group, sum_chunk

cdef extern from *:
    """
    #include <string.h>
    static inline uint64_t fk_bits(double x) { uint64_t b; memcpy(&b, &x, sizeof b); return b; }
    static inline double fk_double(uint64_t b) { double x; memcpy(&x, &b, sizeof x); return x; }
    /* constants of the normal transform, as macros: the compiler folds them */
    #define FK_LN2_HI 6.93147180369123816490e-01
    #define FK_LN2_LO 1.90821492927058770002e-10
    #define FK_SQRT2 1.4142135623730951
    #define FK_QUARTER_PI 0.7853981633974483
    """
    uint64_t fk_bits(double x) noexcept nogil
    double fk_double(uint64_t b) noexcept nogil
    double FK_LN2_HI, FK_LN2_LO, FK_SQRT2, FK_QUARTER_PI


def clip_and_sum(updates, double clip, const double[::1] weights, double[::1] out, double[::1] norms) -> None:
    """out = sum_i weights[i] min(1, clip / ||updates[i]||) updates[i] in float64; norms get the norms."""
    _clip_and_sum(updates.pointers, updates.first, clip, weights, sum_chunk(updates.d), out, norms)


def _clip_and_sum(const uintptr_t[::1] pointers, const in_t[::1] first, double clip,
                  const double[::1] weights, Py_ssize_t chunk, double[::1] out, double[::1] norms):
    # One parallel region for the whole op, its steps separated by the worksharing loops'
    # barriers: on a loaded machine each new region can wait a scheduler time slice for
    # its threads, and a group-by-group op would open three per group.
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK, nchunks = (d + chunk - 1) // chunk
    cdef Py_ssize_t group = clip_group(k, d, sizeof(in_t))
    cdef double* partials = <double*> scratch(min(group, k) * nblocks * sizeof(double))
    cdef double* scaled = <double*> scratch(min(group, k) * sizeof(double))
    cdef int nthreads = fk_threads_for(k * d * <Py_ssize_t> sizeof(in_t))
    cdef Py_ssize_t g0, g, g8, i, b, t, c, j0
    cdef double total
    with nogil, parallel(num_threads=nthreads):
        g0 = 0
        while g0 < k:       # every thread walks the groups; the loops inside share the work
            g = min(group, k - g0)
            g8 = g // 8 * 8  # eight rows per task, as sq_norm_partials (ext/_rows.pxd) and why
            for t in prange(g8 // 8 * nblocks, schedule="static"):
                i = 8 * (t // nblocks)
                b = t % nblocks
                block_sq_norms8(rows + g0 + i, b * NORM_BLOCK, min(<Py_ssize_t> NORM_BLOCK, d - b * NORM_BLOCK),
                                partials + i * nblocks + b, nblocks)
            for t in prange((g - g8) * nblocks, schedule="static"):
                i = g8 + t // nblocks
                b = t % nblocks
                partials[i * nblocks + b] = block_sq_norm(rows[g0 + i] + b * NORM_BLOCK,
                                                          min(<Py_ssize_t> NORM_BLOCK, d - b * NORM_BLOCK))
            for i in prange(g, schedule="static"):
                total = 0.0
                for b in range(nblocks):   # in block order, as every norm kernel
                    total = total + partials[i * nblocks + b]
                norms[g0 + i] = sqrt(total)
                # clip / norm only above the bound: a zero row keeps its weight
                scaled[i] = weights[g0 + i] * (clip / norms[g0 + i] if norms[g0 + i] > clip else 1.0)
            for c in prange(nchunks, schedule="static"):
                j0 = c * chunk
                if g0 == 0:     # zeroed here, in cache, not in a pass over out of its own
                    memset(&out[j0], 0, min(chunk, d - j0) * sizeof(double))
                add_rows(&out[j0], rows + g0, scaled, g, j0, min(chunk, d - j0))
            g0 = g0 + g
    free(partials)
    free(scaled)


# The normal transform; its definition and the reasons for each step are in
# fedkern._reference.privacy (the series' coefficients are the same correctly rounded
# quotients of exact integers).


cdef inline double _exact_double(uint64_t n) noexcept nogil:
    """n <= 2^52 as a float64, exactly: 2^52 + n has n as its mantissa bits (n = 2^52 sets the
    exponent's low bit, which is 2^53). AVX2 has no vector int64 -> double conversion; this
    is an or and a subtraction, so the loops using it still vectorise."""
    return fk_double(n | 0x4330000000000000ULL) - 4503599627370496.0


cdef inline double _log_scaled(uint64_t n) noexcept nogil:
    """log(n 2^-52) for an integer 1 <= n <= 2^52."""
    cdef uint64_t bits = fk_bits(_exact_double(n))
    cdef double e = _exact_double(bits >> 52) - (1023.0 + 52.0)
    cdef double m = fk_double((bits & 0xFFFFFFFFFFFFFULL) | 0x3FF0000000000000ULL)
    cdef bint high = m > FK_SQRT2
    cdef double f, s, s2, p
    # selects, not branches, here and below: the loop over pairs then vectorises
    m = m * 0.5 if high else m
    e = e + 1.0 if high else e
    f = m - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    p = 1.0 / 21.0
    p = p * s2 + 1.0 / 19.0
    p = p * s2 + 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return e * FK_LN2_HI + (e * FK_LN2_LO + 2.0 * s * p)


cdef inline void _normal_pairs(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t count,
                               double* z) noexcept nogil:
    """z[2p], z[2p + 1] = normals 2 (first + p) and 2 (first + p) + 1 of the stream, p < count
    (Box-Muller on Philox block first + p); count <= NOISE_PAIRS."""
    cdef uint32_t w[4 * NOISE_PAIRS]
    cdef uint64_t k1, k2, octant, low
    cdef double r, g, x, x2, sin_x, cos_x, c, s
    cdef Py_ssize_t p
    # the blocks first, in vector lanes (philox_words): 1.3x faster than a block per pair
    # drawn inside the loop, which GCC vectorises with emulated 64-bit products
    philox_words(seed, stream, first, count, w)
    for p in range(count):
        k1 = (<uint64_t> w[4 * p + 1] << 20) | (w[4 * p] >> 12)
        k2 = (<uint64_t> w[4 * p + 3] << 20) | (w[4 * p + 2] >> 12)
        r = sqrt(-2.0 * _log_scaled((<uint64_t> 1 << 52) - k1))
        octant = k2 >> 49
        low = k2 & ((<uint64_t> 1 << 49) - 1)
        g = _exact_double(((<uint64_t> 1 << 49) - low) if octant & 1 else low) * (1.0 / 562949953421312.0)
        x = g * FK_QUARTER_PI
        x2 = x * x
        sin_x = -1.0 / 1307674368000.0
        sin_x = sin_x * x2 + 1.0 / 6227020800.0
        sin_x = sin_x * x2 - 1.0 / 39916800.0
        sin_x = sin_x * x2 + 1.0 / 362880.0
        sin_x = sin_x * x2 - 1.0 / 5040.0
        sin_x = sin_x * x2 + 1.0 / 120.0
        sin_x = sin_x * x2 - 1.0 / 6.0
        sin_x = (sin_x * x2 + 1.0) * x
        cos_x = 1.0 / 20922789888000.0
        cos_x = cos_x * x2 - 1.0 / 87178291200.0
        cos_x = cos_x * x2 + 1.0 / 479001600.0
        cos_x = cos_x * x2 - 1.0 / 3628800.0
        cos_x = cos_x * x2 + 1.0 / 40320.0
        cos_x = cos_x * x2 - 1.0 / 720.0
        cos_x = cos_x * x2 + 1.0 / 24.0
        cos_x = cos_x * x2 - 0.5
        cos_x = cos_x * x2 + 1.0
        s = cos_x if (octant + 1) & 2 else sin_x
        c = sin_x if (octant + 1) & 2 else cos_x
        z[2 * p] = r * (-c if (octant + 2) & 4 else c)
        z[2 * p + 1] = r * (-s if octant & 4 else s)


cdef inline void _add_noise(const in_t* x, out_t* out, Py_ssize_t n, double std, uint64_t seed,
                            uint64_t stream, uint64_t first, Py_ssize_t skip, Py_ssize_t p0,
                            Py_ssize_t count) noexcept nogil:
    """Pairs first + p0 .. first + p0 + count - 1 into out (normal i of out[j] is j + skip of
    the pairs from ``first``): coordinates outside 0 .. n - 1 are skipped."""
    cdef double z[2 * NOISE_PAIRS]
    cdef Py_ssize_t j, j0 = 2 * p0 - skip, lo, hi
    _normal_pairs(seed, stream, first + <uint64_t> p0, count, z)
    lo = max(j0, 0)
    hi = min(j0 + 2 * count, n)
    for j in range(lo, hi):
        out[j] = <out_t> (x[j] + std * z[j - j0])


def gaussian_noise(x, double std, uint64_t seed, uint64_t stream, uint64_t start, out) -> None:
    """out[j] = x[j] + std * normal(start + j), in float64, rounded once."""
    _gaussian_noise(x, std, seed, stream, start, out)


def _gaussian_noise(const in_t[::1] x, double std, uint64_t seed, uint64_t stream, uint64_t start, out_t[::1] out):
    cdef Py_ssize_t n = x.shape[0]
    cdef uint64_t first = start >> 1                    # the pair holding out[0]
    cdef Py_ssize_t skip = <Py_ssize_t> (start & 1)     # its normals before out[0]
    cdef Py_ssize_t npairs = (skip + n + 1) >> 1
    cdef Py_ssize_t ntasks = (npairs + NOISE_PAIRS - 1) // NOISE_PAIRS, t
    if n == 0:
        return
    with nogil:
        for t in prange(ntasks, schedule="static", num_threads=fk_threads_for(n * <Py_ssize_t> 64)):
            _add_noise(&x[0], &out[0], n, std, seed, stream, first, skip, t * NOISE_PAIRS,
                       min(<Py_ssize_t> NOISE_PAIRS, npairs - t * NOISE_PAIRS))
