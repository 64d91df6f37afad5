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
