# Philox4x32-10, the counter-based generator of Salmon, Moraes, Dror and Shaw, "Parallel
# random numbers: as easy as 1, 2, 3" (SC 2011), as inline C for the kernels of every
# family (random, privacy, compress, secagg): `from _philox cimport ...`.
#
# A block is a pure function of (seed, stream, block index), so a kernel draws the numbers
# of any coordinate range on any thread and gets the same bits as every other backend.
# The definitions (and the numpy oracle) are in fedkern._reference.random.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef struct Words4:
    # one output block of the generator: four 32-bit words
    uint32_t x[4]


cdef inline Words4 philox4x32_10(Words4 counter, uint32_t k0, uint32_t k1) noexcept nogil:
    """The Philox4x32-10 bijection of ``counter`` under the key (k0, k1).

    Ten rounds of (x0, x1, x2, x3) <- (hi(M1 x2) ^ x1 ^ k0, lo(M1 x2), hi(M0 x0) ^ x3 ^ k1,
    lo(M0 x0)) with M0 = 0xD2511F53, M1 = 0xCD9E8D57 and hi/lo the two halves of the
    64-bit product; the key is bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85),
    mod 2**32, between rounds.
    """
    # The words live in 64-bit variables and are masked only where a multiply reads them:
    # GCC then vectorises a loop over blocks in 64-bit lanes with no 32/64-bit shuffles
    # (about 20% faster). Higher bits never reach the low 32 bits that are kept.
    cdef uint64_t x0 = counter.x[0], x1 = counter.x[1], x2 = counter.x[2], x3 = counter.x[3]
    cdef uint64_t key0 = k0, key1 = k1, p0, p1
    cdef Words4 out
    cdef int r
    for r in range(10):
        p0 = (x0 & 0xFFFFFFFFU) * 0xD2511F53U  # 32 x 32 -> 64 bits: mulhi and mullo at once
        p1 = (x2 & 0xFFFFFFFFU) * 0xCD9E8D57U
        x0, x1, x2, x3 = (p1 >> 32) ^ x1 ^ key0, p1, (p0 >> 32) ^ x3 ^ key1, p0
        key0 = key0 + 0x9E3779B9U  # mod 2**32 in the kept bits (the last bump is dead code)
        key1 = key1 + 0xBB67AE85U
    out.x[0], out.x[1], out.x[2], out.x[3] = <uint32_t> x0, <uint32_t> x1, <uint32_t> x2, <uint32_t> x3
    return out


cdef inline Words4 philox_block(uint64_t seed, uint64_t stream, uint64_t block) noexcept nogil:
    """Block ``block`` of stream ``stream`` under ``seed``.

    Philox4x32-10 with key (seed lo32, seed hi32) and counter (block lo32, block hi32,
    stream lo32, stream hi32): 2**64 streams of 2**64 blocks per seed.
    """
    cdef Words4 counter
    counter.x[0], counter.x[1] = <uint32_t> block, <uint32_t> (block >> 32)
    counter.x[2], counter.x[3] = <uint32_t> stream, <uint32_t> (stream >> 32)
    return philox4x32_10(counter, <uint32_t> seed, <uint32_t> (seed >> 32))


cdef inline double uniform53(uint32_t lo, uint32_t hi) noexcept nogil:
    """A float64 in [0, 1) from the 64-bit draw hi * 2**32 + lo: its top 53 bits times 2**-53.

    The 53-bit integer converts to double exactly and scaling by a power of two is exact,
    so every backend gives the same bits; (0, 0) gives 0 and all ones give 1 - 2**-53.
    """
    # through int64: the value is < 2**53, and signed conversion is one instruction on x86-64
    return <double> <int64_t> ((<uint64_t> hi << 21) | (lo >> 11)) * (1.0 / 9007199254740992.0)


cdef extern from *:
    """
    #if defined(__AVX2__)
    #include <immintrin.h>
    /* Four blocks of the generator in the 64-bit lanes of AVX2 vectors, the low 32 bits of
       a lane holding a word: one vpmuludq is the 32 x 32 -> 64-bit product of four lanes,
       where GCC's own vectorisation of philox4x32_10 emulates a 64 x 64-bit product with
       three (measured 2.5x slower than this). Bits above 32 never reach the kept words. */
    static inline void fk_philox_4blocks(__m256i block, uint64_t seed, uint64_t stream, uint32_t* out) {
        const __m256i lo = _mm256_set1_epi64x(0xFFFFFFFFu);
        const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
        __m256i x0 = _mm256_and_si256(block, lo), x1 = _mm256_srli_epi64(block, 32);
        __m256i x2 = _mm256_set1_epi64x(stream & 0xFFFFFFFFu), x3 = _mm256_set1_epi64x(stream >> 32);
        uint64_t k0 = seed & 0xFFFFFFFFu, k1 = seed >> 32;
        for (int r = 0; r < 10; r++) {
            __m256i p0 = _mm256_mul_epu32(x0, m0), p1 = _mm256_mul_epu32(x2, m1);
            x0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1), _mm256_set1_epi64x(k0));
            x2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3), _mm256_set1_epi64x(k1));
            x1 = p1;
            x3 = p0;
            k0 = (k0 + 0x9E3779B9u) & 0xFFFFFFFFu;
            k1 = (k1 + 0xBB67AE85u) & 0xFFFFFFFFu;
        }
        /* words (x0, x1) and (x2, x3) of each block as one 64-bit lane each, then the lanes
           of blocks 0 1 and 2 3 side by side: the four blocks' words in order */
        __m256i w01 = _mm256_or_si256(_mm256_and_si256(x0, lo), _mm256_slli_epi64(x1, 32));
        __m256i w23 = _mm256_or_si256(_mm256_and_si256(x2, lo), _mm256_slli_epi64(x3, 32));
        __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
        _mm256_storeu_si256((__m256i*) out, _mm256_permute2x128_si256(even, odd, 0x20));
        _mm256_storeu_si256((__m256i*) (out + 8), _mm256_permute2x128_si256(even, odd, 0x31));
    }
    #define FK_PHILOX_VECTOR 4
    #else
    #define FK_PHILOX_VECTOR 0
    #endif

    /* Blocks first .. first + n - 1 into out[0 .. 4n): four at a time where AVX2 is built in;
       the caller does the rest with philox_block. Returns the number of blocks done. */
    static inline Py_ssize_t fk_philox_blocks(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t n,
                                             uint32_t* out) {
    #if FK_PHILOX_VECTOR
        Py_ssize_t b = 0;
        __m256i block = _mm256_add_epi64(_mm256_set1_epi64x((long long) first), _mm256_set_epi64x(3, 2, 1, 0));
        for (; b + 4 <= n; b += 4) {
            fk_philox_4blocks(block, seed, stream, out + 4 * b);
            block = _mm256_add_epi64(block, _mm256_set1_epi64x(4));
        }
        return b;
    #else
        (void) seed; (void) stream; (void) first; (void) n; (void) out;
        return 0;
    #endif
    }
    """
    Py_ssize_t fk_philox_blocks(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t n,
                                uint32_t* out) noexcept nogil


cdef inline void philox_words(uint64_t seed, uint64_t stream, uint64_t first, Py_ssize_t n,
                              uint32_t* out) noexcept nogil:
    """out[4 b + w] = word w of block first + b of the stream, for b < n."""
    cdef Py_ssize_t b = fk_philox_blocks(seed, stream, first, n, out)
    cdef Words4 x
    while b < n:
        x = philox_block(seed, stream, first + <uint64_t> b)
        out[4 * b], out[4 * b + 1], out[4 * b + 2], out[4 * b + 3] = x.x[0], x.x[1], x.x[2], x.x[3]
        b = b + 1
