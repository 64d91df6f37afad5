"""Cython/OpenMP kernels of the compression family: block statistics, stochastic rounding,
fused decode-and-accumulate, scatter-add, random-k indices and the Walsh-Hadamard transform.

Same kernels, arguments and bits as ``fedkern._reference.compress``, where the codecs'
bits are defined. Work is split over coordinate chunks of COMPRESS_CHUNK (a multiple of
32: whole Philox blocks and whole bytes of codes and signs per chunk; the fused
accumulate's chunks are fedkern._tuning.sum_chunk's, sized to the L2), each chunk adding
the clients in index order, so no result depends on the thread count. Client buffers are
read through ``Updates.pointers``; callers have validated every size and index.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport fabs, floor
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from _blocks cimport COMPRESS_CHUNK, FWHT_BLOCK, SCATTER_CHUNK  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t, out_t
from _openmp cimport fk_threads_for
from _philox cimport philox_words
from _scratch cimport scratch

from fedkern._tuning import fwht_panel, sum_chunk


def block_stats(x, Py_ssize_t block_size, double[:, ::1] stats) -> None:
    """stats[b] = (min, max, sum, sum x^2, sum |x|) of block b, sums in float64 in index order."""
    _block_stats(x, block_size, stats)


def _block_stats(const in_t[::1] x, Py_ssize_t block_size, double[:, ::1] stats):
    cdef Py_ssize_t d = x.shape[0], b, j, j1
    cdef double lo, hi, s, sq, ab, v
    with nogil:
        for b in prange(stats.shape[0], schedule="static", num_threads=fk_threads_for(d * sizeof(in_t))):
            j1 = min(d, (b + 1) * block_size)
            lo = x[b * block_size]
            hi = lo
            s = 0.0
            sq = 0.0
            ab = 0.0
            for j in range(b * block_size, j1):
                v = x[j]
                lo = v if v < lo else lo
                hi = v if v > hi else hi
                s = s + v
                sq = sq + v * v
                ab = ab + fabs(v)
            stats[b, 0] = lo
            stats[b, 1] = hi
            stats[b, 2] = s
            stats[b, 3] = sq
            stats[b, 4] = ab


cdef inline void _round_segment(const in_t* x, Py_ssize_t n, double off, double step, double levels, bint signed,
                                uint32_t* level) noexcept nogil:
    """level[j] <- the stochastic rounding of x[j] onto off + step * {0 .. levels}, given the
    word level[j] holds: floor(t) + [word 2^-32 < t - floor(t)] for t = (|x| - off) / step."""
    cdef Py_ssize_t j
    cdef double v, t, low
    if step <= 0:
        memset(level, 0, n * sizeof(uint32_t))
        return
    for j in range(n):
        v = fabs(x[j]) if signed else x[j]
        t = (v - off) / step
        t = t if t > 0.0 else 0.0
        t = t if t < levels else levels
        low = floor(t)
        level[j] = <uint32_t> low + (1 if <double> level[j] * (1.0 / 4294967296.0) < t - low else 0)


cdef inline void _pack_codes(const uint32_t* level, Py_ssize_t nbytes, int per, int bits,
                             uint8_t* out) noexcept nogil:
    """out[m] = level[m per] | level[m per + 1] << bits | ... (per codes to a byte)."""
    cdef Py_ssize_t m
    cdef int s
    cdef uint32_t byte
    for m in range(nbytes):
        byte = 0
        for s in range(per):
            byte = byte | (level[m * per + s] << (s * bits))
        out[m] = <uint8_t> byte


cdef inline void _pack_signs(const in_t* x, Py_ssize_t n, uint8_t* flags, uint8_t* out) noexcept nogil:
    """out = the sign bits of x (set where x < 0), eight to a byte, the last byte padded with 0;
    flags: scratch of n bytes rounded up to whole eights.

    The flags are bytes 0 or 1; eight of them, as a little-endian uint64, are gathered into
    its top byte by one multiply: bit 56 - 7 s of the constant moves byte s to bit 56 + s,
    and no two partial products meet there (a loop of eight compares and shifts per byte
    ran 20x slower)."""
    cdef Py_ssize_t j, m
    cdef uint64_t eight
    for j in range(n):
        flags[j] = x[j] < 0
    for j in range(n, (n + 7) // 8 * 8):
        flags[j] = 0
    for m in range((n + 7) // 8):
        memcpy(&eight, flags + 8 * m, 8)
        out[m] = <uint8_t> ((eight * 0x0102040810204080ULL) >> 56)


def quantize(x, const double[::1] offsets, const double[::1] steps, Py_ssize_t block_size, int levels, int bits,
             bint signed, uint64_t seed, uint64_t stream, uint8_t[::1] codes, uint8_t[::1] signs) -> None:
    """Stochastic rounding of x onto offsets + steps * {0 .. levels} per block, packed."""
    _quantize(x, offsets, steps, block_size, levels, bits, signed, seed, stream, codes, signs)


def _quantize(const in_t[::1] x, const double[::1] offsets, const double[::1] steps, Py_ssize_t block_size,
              int levels, int bits, bint signed, uint64_t seed, uint64_t stream, uint8_t[::1] codes,
              uint8_t[::1] signs):
    cdef Py_ssize_t d = x.shape[0], c, g0, g1, a, e, b, nbytes
    cdef int nthreads = fk_threads_for(d * <Py_ssize_t> 16)
    # a chunk's words, then its levels written over them: COMPRESS_CHUNK is a multiple of 32,
    # so every chunk's codes are whole bytes within it
    cdef uint32_t* words = <uint32_t*> scratch(nthreads * COMPRESS_CHUNK * sizeof(uint32_t))
    cdef uint32_t* level
    with nogil:
        for c in prange((d + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK, schedule="static", num_threads=nthreads):
            level = words + threadid() * COMPRESS_CHUNK
            g0 = c * COMPRESS_CHUNK
            g1 = min(d, g0 + COMPRESS_CHUNK)
            # a pass per step, each a loop the compiler vectorises: the words, the levels over
            # them, the packing (one loop doing all three, 8 coordinates at a time, ran 5x slower)
            philox_words(seed, stream, <uint64_t> (g0 // 4), (g1 - g0 + 3) // 4, level)
            a = g0
            while a < g1:            # one block segment at a time: its offset and step are fixed
                b = a // block_size
                e = min(g1, (b + 1) * block_size)
                _round_segment(&x[a], e - a, offsets[b], steps[b], levels, signed, level + (a - g0))
                a = e
            nbytes = ((g1 - g0) * bits + 7) // 8
            memset(level + (g1 - g0), 0, (nbytes * 8 // bits - (g1 - g0)) * sizeof(uint32_t))  # padding codes
            if bits == 8:            # a literal codes-per-byte each, so the inner loop unrolls
                _pack_codes(level, nbytes, 1, 8, &codes[g0])
            elif bits == 4:
                _pack_codes(level, nbytes, 2, 4, &codes[g0 // 2])
            elif bits == 2:
                _pack_codes(level, nbytes, 4, 2, &codes[g0 // 4])
            else:
                _pack_codes(level, nbytes, 8, 1, &codes[g0 // 8])
            if signed:                # the levels are packed: their buffer holds the sign flags
                _pack_signs(&x[g0], g1 - g0, <uint8_t*> level, &signs[g0 // 8])
    free(words)


def accumulate_quantized(out, codes, signs, offsets, steps, const double[::1] weights, Py_ssize_t block_size,
                         int bits, bint signed) -> None:
    """out = sum_i weights[i] decode_i, clients in index order, accumulated in float64 and
    rounded once (see fedkern._reference.compress for the order of the sums)."""
    _accumulate_quantized(out, codes.pointers, signs.pointers, offsets.pointers, steps.pointers, weights,
                          codes.first.shape[0], block_size, bits, signed)


def _accumulate_quantized(out_t[::1] out, const uintptr_t[::1] cp, const uintptr_t[::1] sp,
                          const uintptr_t[::1] op, const uintptr_t[::1] tp, const double[::1] weights,
                          Py_ssize_t nbytes, Py_ssize_t block_size, int bits, bint signed):
    """Chunks of fedkern._tuning.sum_chunk coordinates (a power of two, so a chunk's codes
    are whole bytes), each summed in a thread's float64 accumulator, which stays in L2 while
    each client's codes stream through in runs of that length (runs of 4096 bytes,
    COMPRESS_CHUNK, took 1.7x as long on an AVX-512 Xeon: each run restarts the
    prefetchers), then rounded into out once: no D-sized float64 buffer. Codes of fewer
    bits, and signs, are unpacked to a byte per coordinate first, a chunk of a client at a
    time, so every add is the same vector loop."""
    cdef Codes rows
    rows.codes = <const uint8_t**> &cp[0]
    rows.signs = <const uint8_t**> &sp[0]
    rows.offsets = <const double**> &op[0]
    rows.steps = <const double**> &tp[0]
    rows.weights = &weights[0]
    rows.block_size = block_size
    rows.bits = bits
    cdef Py_ssize_t d = out.shape[0], k = weights.shape[0]
    cdef Py_ssize_t chunk = sum_chunk(d), c, c0, n, j, stride = 2 * chunk + 2, byte_stride = chunk + 8
    cdef int nthreads = fk_threads_for(k * nbytes + d * <Py_ssize_t> sizeof(out_t))
    # per thread: the chunk's accumulator and its blocks' summed offsets (at most chunk + 1);
    # four clients' unpacked codes (signed: one client's codes and signs)
    cdef double* sums = <double*> scratch(nthreads * stride * sizeof(double))
    cdef uint8_t* unpacked = <uint8_t*> scratch(nthreads * 4 * byte_stride)
    cdef double* acc
    cdef uint8_t* own
    with nogil:
        for c in prange((d + chunk - 1) // chunk, schedule="static", num_threads=nthreads):
            acc = sums + threadid() * stride
            own = unpacked + threadid() * 4 * byte_stride
            c0 = c * chunk
            n = min(chunk, d - c0)
            if signed:
                memset(acc, 0, n * sizeof(double))
                _add_signed(acc, &rows, k, c0, c0 + n, own, byte_stride)
            else:
                _start_at_offsets(acc, acc + chunk, &rows, k, c0, c0 + n)
                _add_unsigned(acc, &rows, k, c0, c0 + n, own, byte_stride)
            for j in range(n):
                out[c0 + j] = <out_t> acc[j]
    free(sums)
    free(unpacked)


cdef struct Codes:
    # the clients' messages, by row: packed codes and signs, per-block offsets and steps
    const uint8_t** codes
    const uint8_t** signs
    const double** offsets
    const double** steps
    const double* weights
    Py_ssize_t block_size
    int bits


cdef inline void _start_at_offsets(double* acc, double* base, const Codes* rows, Py_ssize_t k, Py_ssize_t c0,
                                   Py_ssize_t c1) noexcept nogil:
    """acc[j - c0] = sum_i weights[i] offsets[i][b], b = j // block_size, in index order.

    Unsigned codes decode to off + step q: the offsets are summed once per block (a pass
    per client over a chunk's few blocks), so the coordinates only add the (w step) q."""
    cdef Py_ssize_t bs = rows.block_size, b0 = c0 // bs, nb = (c1 - 1) // bs + 1 - b0, i, b, j, a, e
    cdef const double* off
    cdef double w
    memset(base, 0, nb * sizeof(double))
    for i in range(k):
        off = rows.offsets[i] + b0
        w = rows.weights[i]
        for b in range(nb):
            base[b] = base[b] + w * off[b]
    a = c0
    while a < c1:
        b = a // bs
        e = min(c1, (b + 1) * bs)
        for j in range(a - c0, e - c0):
            acc[j] = base[b - b0]
        a = e


cdef inline void _add_unsigned(double* acc, const Codes* rows, Py_ssize_t k, Py_ssize_t c0, Py_ssize_t c1,
                               uint8_t* own, Py_ssize_t byte_stride) noexcept nogil:
    """acc[j - c0] += sum_i (weights[i] steps[i][b]) q_i(j), four clients per pass: four read
    streams per thread and a quarter of the accumulator's loads and stores (2.3x the speed
    of a client per pass). Every coordinate still adds the clients one at a time in index
    order."""
    cdef Py_ssize_t i = 0, a, e, b, j, bs = rows.block_size
    cdef const uint8_t* x0
    cdef const uint8_t* x1
    cdef const uint8_t* x2
    cdef const uint8_t* x3
    cdef double s0, s1, s2, s3
    while i + 4 <= k:
        x0 = _codes_at(rows, i, c0, c1, own)
        x1 = _codes_at(rows, i + 1, c0, c1, own + byte_stride)
        x2 = _codes_at(rows, i + 2, c0, c1, own + 2 * byte_stride)
        x3 = _codes_at(rows, i + 3, c0, c1, own + 3 * byte_stride)
        a = c0
        while a < c1:                   # one block segment at a time: its steps are fixed
            b = a // bs
            e = min(c1, (b + 1) * bs)
            s0, s1 = rows.weights[i] * rows.steps[i][b], rows.weights[i + 1] * rows.steps[i + 1][b]
            s2, s3 = rows.weights[i + 2] * rows.steps[i + 2][b], rows.weights[i + 3] * rows.steps[i + 3][b]
            for j in range(a - c0, e - c0):
                acc[j] = (((acc[j] + s0 * <double> x0[j]) + s1 * <double> x1[j]) + s2 * <double> x2[j]) + s3 * <double> x3[j]
            a = e
        i = i + 4
    while i < k:
        x0 = _codes_at(rows, i, c0, c1, own)
        a = c0
        while a < c1:
            b = a // bs
            e = min(c1, (b + 1) * bs)
            s0 = rows.weights[i] * rows.steps[i][b]
            for j in range(a - c0, e - c0):
                acc[j] = acc[j] + s0 * <double> x0[j]
            a = e
        i = i + 1


cdef inline void _add_signed(double* acc, const Codes* rows, Py_ssize_t k, Py_ssize_t c0, Py_ssize_t c1,
                             uint8_t* own, Py_ssize_t byte_stride) noexcept nogil:
    """acc[j - c0] += sum_i +-((weights[i] offsets[i][b]) + (weights[i] steps[i][b]) q_i(j)),
    the sign bit of coordinate j choosing, a client per pass."""
    cdef Py_ssize_t i, a, e, b, j, bs = rows.block_size
    cdef const uint8_t* q
    cdef uint8_t* negative = own + byte_stride
    cdef double off, step
    for i in range(k):
        q = _codes_at(rows, i, c0, c1, own)
        _unpack(rows.signs[i] + c0 // 8, (c1 - c0 + 7) // 8, 1, negative)
        a = c0
        while a < c1:
            b = a // bs
            e = min(c1, (b + 1) * bs)
            off = rows.weights[i] * rows.offsets[i][b]
            step = rows.weights[i] * rows.steps[i][b]
            for j in range(a - c0, e - c0):
                # times +-1, exactly the negation, without a branch
                acc[j] = acc[j] + (off + step * <double> q[j]) * (1.0 - 2.0 * <double> negative[j])
            a = e


cdef inline const uint8_t* _codes_at(const Codes* rows, Py_ssize_t i, Py_ssize_t c0, Py_ssize_t c1,
                                     uint8_t* own) noexcept nogil:
    """Client i's codes of coordinates c0 .. c1 (c0 a multiple of 8), a byte each: its own
    bytes for 8-bit codes, else unpacked into ``own``."""
    if rows.bits == 8:
        return rows.codes[i] + c0
    _unpack(rows.codes[i] + c0 * rows.bits // 8, ((c1 - c0) * rows.bits + 7) // 8, rows.bits, own)
    return own


cdef inline void _unpack(const uint8_t* packed, Py_ssize_t nbytes, int bits, uint8_t* out) noexcept nogil:
    """out[per m + s] = (packed[m] >> (s bits)) & mask, per = 8 / bits codes to a byte (a
    literal per each, so the inner loop unrolls)."""
    if bits == 4:
        _unpack_codes(packed, nbytes, 2, 4, out)
    elif bits == 2:
        _unpack_codes(packed, nbytes, 4, 2, out)
    else:
        _unpack_codes(packed, nbytes, 8, 1, out)


cdef inline void _unpack_codes(const uint8_t* packed, Py_ssize_t nbytes, int per, int bits,
                               uint8_t* out) noexcept nogil:
    cdef Py_ssize_t m
    cdef int s
    cdef uint8_t mask = (1 << bits) - 1
    for m in range(nbytes):
        for s in range(per):
            out[m * per + s] = (packed[m] >> (s * bits)) & mask


cdef inline Py_ssize_t _bisect(const uint32_t* idx, Py_ssize_t n, uint32_t value) noexcept nogil:
    """The first m with idx[m] >= value (idx sorted)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if idx[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def scatter_add(out, indices, values, const double[::1] weights) -> None:
    """out = sum_i weights[i] scatter(indices[i], values[i]), clients in index order, in
    float64 and rounded once; each client's indices sorted and distinct (validated), so a
    chunk finds its range by bisection."""
    _scatter_add(out, indices.pointers, values.pointers, weights, indices.first.shape[0])


def _scatter_add(out_t[::1] out, const uintptr_t[::1] ip, const uintptr_t[::1] vp, const double[::1] weights,
                 Py_ssize_t n):
    """A chunk of SCATTER_CHUNK coordinates at a time in a thread's float64 accumulator (in
    L2), zeroed, added into and rounded into out: out is written once and never read."""
    cdef const uint32_t** idx_rows = <const uint32_t**> &ip[0]
    cdef const float** val_rows = <const float**> &vp[0]
    cdef Py_ssize_t d = out.shape[0], k = weights.shape[0], c, c0, c1, i, m, m1, j
    cdef int nthreads = fk_threads_for(k * n * <Py_ssize_t> 8 + d * <Py_ssize_t> sizeof(out_t))
    cdef double* buffers = <double*> scratch(nthreads * SCATTER_CHUNK * sizeof(double))
    cdef double* acc
    cdef const uint32_t* idx
    cdef const float* vals
    cdef double w
    with nogil:
        for c in prange((d + SCATTER_CHUNK - 1) // SCATTER_CHUNK, schedule="static", num_threads=nthreads):
            acc = buffers + threadid() * SCATTER_CHUNK
            c0 = c * SCATTER_CHUNK
            c1 = min(d, c0 + SCATTER_CHUNK)
            memset(acc, 0, (c1 - c0) * sizeof(double))
            for i in range(k):
                idx = idx_rows[i]
                vals = val_rows[i]
                w = weights[i]
                m = _bisect(idx, n, <uint32_t> c0)
                m1 = _bisect(idx, n, <uint32_t> c1)
                while m < m1:
                    acc[idx[m] - c0] = acc[idx[m] - c0] + w * <double> vals[m]
                    m = m + 1
            for j in range(c1 - c0):
                out[c0 + j] = <out_t> acc[j]
    free(buffers)


def check_sparse(indices, values, Py_ssize_t d, uint8_t[::1] bad) -> None:
    """bad[i] = 1 where client i's indices are not strictly increasing and below d, or its
    values not all finite, else 0: a client per task, each loop counting without a branch
    (so it vectorises) over buffers whose lengths were validated."""
    cdef const uintptr_t[::1] ip = indices.pointers, vp = values.pointers
    cdef const uint32_t** idx_rows = <const uint32_t**> &ip[0]
    cdef const float** val_rows = <const float**> &vp[0]
    cdef Py_ssize_t k = bad.shape[0], n = indices.first.shape[0], i, m, wrong
    cdef const uint32_t* idx
    cdef const float* vals
    with nogil:
        for i in prange(k, schedule="static", num_threads=fk_threads_for(k * n * <Py_ssize_t> 8)):
            idx = idx_rows[i]
            vals = val_rows[i]
            wrong = 0
            for m in range(1, n):
                wrong = wrong + (idx[m] <= idx[m - 1])
            for m in range(n):
                wrong = wrong + (vals[m] - vals[m] != 0)   # NaN and inf give NaN, never 0
            bad[i] = wrong > 0 or (n > 0 and idx[n - 1] >= d)


def random_k_indices(const uint64_t[::1] seeds, uint64_t stream, Py_ssize_t d, Py_ssize_t k,
                     uint32_t[:, ::1] out) -> None:
    """out[i] = the k sorted indices of Floyd's algorithm on the stream under seeds[i], a
    message per task. Each thread marks its draws in a bitmap of d bits (an eighth of the
    memory a byte mask takes to miss in), cleared again after each message, and sorts them
    by radix, not qsort (6x faster at k = 10^4: numbers below 2^32 in two or three passes
    of 11 bits)."""
    cdef Py_ssize_t nmsgs = seeds.shape[0], nbytes = (d + 7) // 8, nwords = 4 * ((k + 1) // 2), i
    cdef int nthreads = fk_threads_for(nmsgs * (k * <Py_ssize_t> 64 + nbytes))
    cdef uint8_t* bitmaps
    cdef uint32_t* spares
    if k == 0 or nmsgs == 0:
        return
    bitmaps = <uint8_t*> scratch(nthreads * nbytes)
    # per thread: the radix sort's k, and the draws' Philox words (two a draw, whole blocks)
    spares = <uint32_t*> scratch(nthreads * (k + nwords) * sizeof(uint32_t))
    memset(bitmaps, 0, nthreads * nbytes)
    with nogil:
        for i in prange(nmsgs, schedule="static", num_threads=nthreads):
            _floyd(seeds[i], stream, d, k, bitmaps + threadid() * nbytes, spares + threadid() * (k + nwords) + k,
                   &out[i, 0])
            _radix_sort(&out[i, 0], spares + threadid() * (k + nwords), k, <uint32_t> (d - 1))
    free(bitmaps)
    free(spares)


cdef inline void _floyd(uint64_t seed, uint64_t stream, Py_ssize_t d, Py_ssize_t k, uint8_t* bitmap,
                        uint32_t* words, uint32_t* out) noexcept nogil:
    """out = Floyd's k draws (unsorted); bitmap: d zero bits, zero again after; words:
    scratch for the draws' Philox blocks, drawn first in vector lanes (philox_words)."""
    cdef Py_ssize_t i
    cdef uint64_t lo, hi, n, t
    philox_words(seed, stream, 0, (k + 1) // 2, words)   # draw i: words 2 i and 2 i + 1
    for i in range(k):
        lo = words[2 * i]
        hi = words[2 * i + 1]
        n = <uint64_t> (d - k + i + 1)
        t = (hi * n + ((lo * n) >> 32)) >> 32
        if (bitmap[t >> 3] >> (t & 7)) & 1:
            t = <uint64_t> (d - k + i)
        bitmap[t >> 3] = bitmap[t >> 3] | (1 << (t & 7))
        out[i] = <uint32_t> t
    for i in range(k):
        bitmap[out[i] >> 3] = 0


cdef inline void _radix_sort(uint32_t* keys, uint32_t* spare, Py_ssize_t n, uint32_t top) noexcept nogil:
    """keys[:n] (each <= top) in ascending order: least significant 11 bits first, as many
    passes as top has digits; spare: n scratch."""
    cdef Py_ssize_t counts[2048]
    cdef Py_ssize_t i, total, c
    cdef int shift = 0
    cdef uint32_t* source = keys
    cdef uint32_t* target = spare
    cdef uint32_t* swap
    while True:
        memset(counts, 0, sizeof(counts))
        for i in range(n):
            counts[(source[i] >> shift) & 2047] += 1
        total = 0
        for i in range(2048):             # each digit's first position
            c = counts[i]
            counts[i] = total
            total = total + c
        for i in range(n):
            target[counts[(source[i] >> shift) & 2047]] = source[i]
            counts[(source[i] >> shift) & 2047] += 1
        source, target = target, source
        shift = shift + 11
        if shift >= 32 or (top >> shift) == 0:
            break
    if source != keys:
        memcpy(keys, source, n * sizeof(uint32_t))


def scale_by_signs(double[::1] y, uint64_t seed, uint64_t stream, double scale) -> None:
    """y[j] *= -scale where bit j % 32 of word j // 32 of the stream is set, else scale: a chunk
    of COMPRESS_CHUNK coordinates (whole Philox blocks of 128 bits) per task."""
    cdef Py_ssize_t n = y.shape[0], c, g0, j
    cdef int nthreads = fk_threads_for(n * <Py_ssize_t> 16)
    cdef uint32_t* words = <uint32_t*> scratch(nthreads * (COMPRESS_CHUNK // 32) * sizeof(uint32_t))
    cdef uint32_t* own
    with nogil:
        for c in prange((n + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK, schedule="static", num_threads=nthreads):
            own = words + threadid() * (COMPRESS_CHUNK // 32)
            g0 = c * COMPRESS_CHUNK
            philox_words(seed, stream, <uint64_t> (g0 // 128), (min(n - g0, <Py_ssize_t> COMPRESS_CHUNK) + 127) // 128,
                         own)
            for j in range(min(n - g0, <Py_ssize_t> COMPRESS_CHUNK)):
                # times +-scale: (1 - 2 bit) scale is exactly one of them, and no branch
                y[g0 + j] = y[g0 + j] * ((1.0 - 2.0 * <double> ((own[j >> 5] >> (j & 31)) & 1)) * scale)
    free(words)


cdef inline void _butterflies(double* x, Py_ssize_t n) noexcept nogil:
    """x[:n] <- H x[:n] (n a power of two, in L1): stages h = 1, 2, 4, ... in order, the first
    two as one radix-4 step per group of four (loops of one or two butterflies do not
    vectorise), which does each coordinate's additions in the same order."""
    cdef Py_ssize_t h, a, j
    cdef double u, v, s0, d0, s1, d1
    if n == 2:
        u, v = x[0], x[1]
        x[0], x[1] = u + v, u - v
        return
    for a in range(0, n - 3, 4):
        s0, d0 = x[a] + x[a + 1], x[a] - x[a + 1]
        s1, d1 = x[a + 2] + x[a + 3], x[a + 2] - x[a + 3]
        x[a], x[a + 1], x[a + 2], x[a + 3] = s0 + s1, d0 + d1, s0 - s1, d0 - d1
    h = 4
    while h < n:
        a = 0
        while a < n:
            for j in range(a, a + h):
                u = x[j]
                v = x[j + h]
                x[j] = u + v
                x[j + h] = u - v
            a = a + 2 * h
        h = h * 2


cdef inline void _row_butterflies(double* panel, Py_ssize_t rows, Py_ssize_t width) noexcept nogil:
    """The stages pairing rows r and r + h of a rows x width panel, h = 1, 2, 4, ... in order."""
    cdef Py_ssize_t h = 1, a, r, q
    cdef double* top
    cdef double* bottom
    cdef double u, v
    while h < rows:
        a = 0
        while a < rows:
            for r in range(a, a + h):
                top = panel + r * width
                bottom = top + h * width
                for q in range(width):
                    u = top[q]
                    v = bottom[q]
                    top[q] = u + v
                    bottom[q] = u - v
            a = a + 2 * h
        h = h * 2


def fwht(double[::1] x) -> None:
    """x <- H x in place (unnormalised Walsh-Hadamard), stages h = 1, 2, 4, ... as the reference:
    those within a block of FWHT_BLOCK in L1, a block per task; the wider ones, which pair
    whole blocks, on panels of fedkern._tuning.fwht_panel columns copied out of every block
    (two passes over memory in all, not one per stage)."""
    cdef Py_ssize_t n = x.shape[0], block = min(n, <Py_ssize_t> FWHT_BLOCK), rows = n // block
    cdef Py_ssize_t width = min(block, <Py_ssize_t> fwht_panel(n)), c, p, r
    cdef int nthreads = fk_threads_for(n * <Py_ssize_t> 8)
    cdef double* panels = <double*> scratch(nthreads * rows * width * sizeof(double))
    cdef double* panel
    with nogil:
        if n > 1:
            for c in prange(rows, schedule="static", num_threads=nthreads):
                _butterflies(&x[c * block], block)
        if rows > 1:
            for p in prange(block // width, schedule="static", num_threads=nthreads):
                panel = panels + threadid() * rows * width
                for r in range(rows):
                    memcpy(panel + r * width, &x[r * block + p * width], width * sizeof(double))
                _row_butterflies(panel, rows, width)
                for r in range(rows):
                    memcpy(&x[r * block + p * width], panel + r * width, width * sizeof(double))
    free(panels)
