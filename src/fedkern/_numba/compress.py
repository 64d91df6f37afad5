"""Numba kernels of the compression family: block statistics, stochastic rounding, fused
decode-and-accumulate, scatter-add, random-k indices and the Walsh-Hadamard transform.

Same kernels, arguments and bits as ``ext/compress.pyx``; the codecs' bits are defined in
``fedkern._reference.compress``. Work is split over coordinate chunks of COMPRESS_CHUNK (a
multiple of 32: whole Philox blocks and whole bytes of codes and signs per chunk; the fused
accumulate's are fedkern._tuning.sum_chunk's, sized to the L2), and each chunk adds the
clients in index order, so no result depends on the thread count.

The hot loops run over slices from 0 or index with unsigned integers: Numba gives a signed
index it cannot prove non-negative a negative-index fix-up, which keeps LLVM from
vectorising the loop (the 8-bit decode loop ran 3.6x faster unsigned, measured on one
chunk, and the scatter-add 2x).
"""
import numpy as np
from numba import njit, prange

from .._blocks import COMPRESS_CHUNK, FWHT_BLOCK, SCATTER_CHUNK  # sizes, and why: fedkern/_blocks.py
from .._tuning import fwht_panel, sum_chunk
from ._philox import philox_block
from ._runtime import KERNEL, row

_1, _2, _3, _4, _5, _7, _31, _32, _56 = (np.uint64(v) for v in (1, 2, 3, 4, 5, 7, 31, 32, 56))
_GATHER_BITS = np.uint64(0x0102040810204080)
_SCALE32 = 2.0**-32


def block_stats(x, block_size: int, stats) -> None:
    """stats[b] = (min, max, sum, sum x^2, sum |x|) of block b, sums in float64 in index order."""
    _block_stats(x, np.int64(block_size), stats)


@njit(**KERNEL)
def _block_stats(x, block_size, stats):
    d = x.shape[0]
    for b in prange(stats.shape[0]):
        j0 = b * block_size
        j1 = min(d, j0 + block_size)
        lo = hi = np.float64(x[j0])
        s = sq = ab = 0.0
        for j in range(j0, j1):
            v = np.float64(x[j])
            lo = min(lo, v)
            hi = max(hi, v)
            s += v
            sq += v * v
            ab += abs(v)
        stats[b, 0], stats[b, 1], stats[b, 2], stats[b, 3], stats[b, 4] = lo, hi, s, sq, ab


def quantize(x, offsets, steps, block_size: int, levels: int, bits: int, signed: bool, seed: int, stream: int,
             codes, signs) -> None:
    """Stochastic rounding of x onto offsets + steps * {0 .. levels} per block, packed."""
    _quantize(x, offsets, steps, np.int64(block_size), np.float64(levels), np.int64(bits), bool(signed),
              np.uint64(seed), np.uint64(stream), codes, signs)


@njit(inline="always")
def _chunk_words(seed, stream, g0, n):
    """Words g0 .. g0 + n - 1 of the stream (g0 a multiple of 4) as uint32, in a buffer of
    whole bytes of codes for any bits (a multiple of 8 long, at least n)."""
    words = np.empty((n + 7) // 8 * 8, np.uint32)
    first = np.uint64(g0 // 4)
    for b in range(np.uint64(0), np.uint64((n + 3) // 4)):
        j = b * _4
        words[j], words[j + _1], words[j + _2], words[j + _3] = philox_block(seed, stream, first + b)
    return words


@njit(inline="always")
def _round_segment(x, off, step, levels, signed, level):
    """level[j] <- the stochastic rounding of x[j] onto off + step * {0 .. levels}, given the
    word level[j] holds: floor(t) + [word 2^-32 < t - floor(t)] for t = (|x| - off) / step."""
    if step > 0:
        for j in range(np.uint64(0), np.uint64(x.shape[0])):
            v = np.float64(x[j])
            v = abs(v) if signed else v
            t = min(max((v - off) / step, 0.0), levels)
            low = np.floor(t)
            level[j] = np.uint32(low) + np.uint32(np.float64(level[j]) * _SCALE32 < t - low)
    else:
        level[:] = 0


@njit(inline="always")
def _pack_codes(level, nbytes, per, bits, out):
    """out[m] = level[m per] | level[m per + 1] << bits | ... (per codes to a byte)."""
    for m in range(np.uint64(0), np.uint64(nbytes)):
        byte = np.uint32(0)
        for s in range(per):
            byte |= level[m * np.uint64(per) + np.uint64(s)] << np.uint32(s * bits)
        out[m] = np.uint8(byte)


@njit(inline="always")
def _gather_bits(flags, out):
    """out[m] = flags[8 m] | flags[8 m + 1] << 1 | ... | flags[8 m + 7] << 7, flags 0 or 1.

    Eight flags are the bytes of a little-endian uint64, which one multiply gathers into
    its top byte: bit 56 - 7 s of the constant moves byte s to bit 56 + s, and no two
    partial products meet there. A loop of eight shifts per byte ran 15x slower."""
    eights = flags.view(np.uint64)
    for m in range(np.uint64(0), np.uint64(out.shape[0])):
        out[m] = np.uint8((eights[m] * _GATHER_BITS) >> _56)


@njit(inline="always")
def _pack_bits(level, nbytes, out):
    """Levels of one bit, eight to a byte."""
    flags = np.empty(level.shape[0], np.uint8)
    for j in range(np.uint64(0), np.uint64(level.shape[0])):
        flags[j] = np.uint8(level[j])
    _gather_bits(flags, out[:nbytes])


@njit(inline="always")
def _pack_signs(x, out):
    """out = the sign bits of x (set where x < 0), eight to a byte, the last byte padded with 0."""
    n = x.shape[0]
    flags = np.zeros((n + 7) // 8 * 8, np.uint8)
    for j in range(np.uint64(0), np.uint64(n)):
        flags[j] = np.uint8(x[j] < 0)
    _gather_bits(flags, out[:(n + 7) // 8])


@njit(**KERNEL)
def _quantize(x, offsets, steps, block_size, levels, bits, signed, seed, stream, codes, signs):
    d = x.shape[0]
    for c in prange((d + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK):
        g0 = c * COMPRESS_CHUNK
        g1 = min(d, g0 + COMPRESS_CHUNK)
        # a pass per step, each a loop LLVM vectorises: the chunk's words, the levels written
        # over them, the packing (one loop doing all three, 8 coordinates at a time, ran 5x slower)
        level = _chunk_words(seed, stream, g0, g1 - g0)
        a = g0
        while a < g1:                # one block segment at a time: its offset and step are fixed
            b = a // block_size
            e = min(g1, (b + 1) * block_size)
            _round_segment(x[a:e], offsets[b], steps[b], levels, signed, level[a - g0:e - g0])
            a = e
        level[g1 - g0:] = 0          # the padding codes of a last, partial byte
        nbytes = ((g1 - g0) * bits + 7) // 8
        out = codes[(g0 * bits) // 8:]
        if bits == 8:                # a literal codes-per-byte each, so the inner loop unrolls
            _pack_codes(level, nbytes, 1, 8, out)
        elif bits == 4:
            _pack_codes(level, nbytes, 2, 4, out)
        elif bits == 2:
            _pack_codes(level, nbytes, 4, 2, out)
        else:
            _pack_bits(level, nbytes, out)
        if signed:
            _pack_signs(x[g0:g1], signs[g0 // 8:])


def accumulate_quantized(out, codes, signs, offsets, steps, weights, block_size: int, bits: int,
                         signed: bool) -> None:
    """out = sum_i weights[i] decode_i, clients in index order, in float64 and rounded once;
    chunks of fedkern._tuning.sum_chunk coordinates in a float64 accumulator each, codes of
    fewer bits and signs unpacked to bytes first, the sums of ``fedkern._reference.compress``
    (as ext/compress.pyx, and why)."""
    _accumulate_quantized(out, codes.pointers, codes.first, signs.pointers, signs.first, offsets.pointers,
                          offsets.first, steps.pointers, weights, np.int64(block_size),
                          np.int64(sum_chunk(out.shape[0])), np.int64(bits), bool(signed))


@njit(**KERNEL)
def _accumulate_quantized(out, code_ptrs, code0, sign_ptrs, sign0, off_ptrs, off0, step_ptrs, weights, block_size,
                          chunk, bits, signed):
    d = out.shape[0]
    for c in prange((d + chunk - 1) // chunk):
        c0 = c * chunk
        c1 = min(d, c0 + chunk)
        own = np.empty((4, chunk + 8), np.uint8)   # four clients' unpacked codes (signed: one's codes, signs)
        if signed:
            acc = np.zeros(c1 - c0)
            _add_signed(acc, code_ptrs, code0, sign_ptrs, sign0, off_ptrs, off0, step_ptrs, weights, block_size, c0,
                        bits, own)
        else:
            acc = _start_at_offsets(off_ptrs, off0, weights, block_size, c0, c1)
            _add_unsigned(acc, code_ptrs, code0, step_ptrs, off0, weights, block_size, c0, bits, own)
        out[c0:c1] = acc


@njit(inline="always")
def _start_at_offsets(off_ptrs, off0, weights, block_size, c0, c1):
    """A chunk's accumulator, each coordinate at its block's offsets summed over the clients
    in index order (unsigned codes decode to off + step q; as ext/compress.pyx)."""
    b0 = c0 // block_size
    nb = (c1 - 1) // block_size + 1 - b0
    base = np.zeros(nb)
    for i in range(weights.shape[0]):
        off = row(off_ptrs, i, off0)[b0:b0 + nb]
        w = weights[i]
        for b in range(nb):
            base[b] += w * off[b]
    acc = np.empty(c1 - c0)
    a = c0
    while a < c1:
        b = a // block_size
        e = min(c1, (b + 1) * block_size)
        acc[a - c0:e - c0] = base[b - b0]
        a = e
    return acc


@njit(inline="always")
def _add_unsigned(acc, code_ptrs, code0, step_ptrs, off0, weights, block_size, c0, bits, own):
    """acc += sum_i (w_i step_i) q_i, four clients per pass, each coordinate adding them one
    at a time in index order (as ext/compress.pyx's _add_unsigned, and why)."""
    c1 = c0 + acc.shape[0]
    k = weights.shape[0]
    i = 0
    while i + 4 <= k:
        x0 = _codes_at(code_ptrs, code0, i, c0, c1, bits, own[0])
        x1 = _codes_at(code_ptrs, code0, i + 1, c0, c1, bits, own[1])
        x2 = _codes_at(code_ptrs, code0, i + 2, c0, c1, bits, own[2])
        x3 = _codes_at(code_ptrs, code0, i + 3, c0, c1, bits, own[3])
        a = c0
        while a < c1:                # one block segment at a time: its steps are fixed
            b = a // block_size
            e = min(c1, (b + 1) * block_size)
            s0, s1 = _step(weights, step_ptrs, off0, i, b), _step(weights, step_ptrs, off0, i + 1, b)
            s2, s3 = _step(weights, step_ptrs, off0, i + 2, b), _step(weights, step_ptrs, off0, i + 3, b)
            # slices from 0: plain streams LLVM vectorises (as aggregate._scale_rows)
            y0, y1, y2, y3 = x0[a - c0:e - c0], x1[a - c0:e - c0], x2[a - c0:e - c0], x3[a - c0:e - c0]
            y = acc[a - c0:e - c0]
            for j in range(e - a):
                y[j] = (((y[j] + s0 * np.float64(y0[j])) + s1 * np.float64(y1[j])) + s2 * np.float64(y2[j])
                        ) + s3 * np.float64(y3[j])
            a = e
        i += 4
    while i < k:
        x0 = _codes_at(code_ptrs, code0, i, c0, c1, bits, own[0])
        a = c0
        while a < c1:
            b = a // block_size
            e = min(c1, (b + 1) * block_size)
            s0 = _step(weights, step_ptrs, off0, i, b)
            y0 = x0[a - c0:e - c0]
            y = acc[a - c0:e - c0]
            for j in range(e - a):
                y[j] += s0 * np.float64(y0[j])
            a = e
        i += 1


@njit(inline="always")
def _step(weights, step_ptrs, off0, i, b):
    """Client i's block b step times its weight."""
    return weights[i] * row(step_ptrs, i, off0)[b]


@njit(inline="always")
def _add_signed(acc, code_ptrs, code0, sign_ptrs, sign0, off_ptrs, off0, step_ptrs, weights, block_size, c0, bits,
                own):
    """acc += sum_i +-((w_i off_i) + (w_i step_i) q_i), the sign bit choosing, a client per pass."""
    c1 = c0 + acc.shape[0]
    negative = own[1]
    for i in range(weights.shape[0]):
        q = _codes_at(code_ptrs, code0, i, c0, c1, bits, own[0])
        _unpack(row(sign_ptrs, i, sign0)[c0 // 8:(c1 + 7) // 8], 1, negative)
        a = c0
        while a < c1:
            b = a // block_size
            e = min(c1, (b + 1) * block_size)
            off = weights[i] * row(off_ptrs, i, off0)[b]
            step = _step(weights, step_ptrs, off0, i, b)
            y, qa, na = acc[a - c0:e - c0], q[a - c0:e - c0], negative[a - c0:e - c0]   # slices from 0, as above
            for j in range(e - a):
                # times +-1, exactly the negation, without a branch
                y[j] += (off + step * np.float64(qa[j])) * (1.0 - 2.0 * np.float64(na[j]))
            a = e


@njit(inline="always")
def _codes_at(code_ptrs, code0, i, c0, c1, bits, own):
    """Client i's codes of coordinates c0 .. c1 (c0 a multiple of 8), a byte each: a view of
    its own bytes for 8-bit codes, else unpacked into ``own``."""
    codes = row(code_ptrs, i, code0)
    if bits == 8:
        return codes[c0:c1]
    _unpack(codes[c0 * bits // 8:((c1 - c0) * bits + 7) // 8 + c0 * bits // 8], bits, own)
    return own[:c1 - c0]


@njit(inline="always")
def _unpack(packed, bits, out):
    """out[per m + s] = (packed[m] >> (s bits)) & mask, per = 8 / bits codes to a byte (a
    literal per each, so the inner loop unrolls)."""
    if bits == 4:
        _unpack_codes(packed, 2, 4, out)
    elif bits == 2:
        _unpack_codes(packed, 4, 2, out)
    else:
        _unpack_codes(packed, 8, 1, out)


@njit(inline="always")
def _unpack_codes(packed, per, bits, out):
    mask = (1 << bits) - 1
    for m in range(packed.shape[0]):
        for s in range(per):
            out[m * per + s] = (packed[m] >> (s * bits)) & mask


def scatter_add(out, indices, values, weights) -> None:
    """out = sum_i weights[i] scatter(indices[i], values[i]), clients in index order, in
    float64 and rounded once; a chunk at a time in a float64 accumulator (as ext/compress.pyx)."""
    _scatter_add(out, indices.pointers, indices.first, values.pointers, values.first, weights)


@njit(**KERNEL)
def _scatter_add(out, idx_ptrs, idx0, val_ptrs, val0, weights):
    d = out.shape[0]
    for c in prange((d + SCATTER_CHUNK - 1) // SCATTER_CHUNK):
        c0 = c * SCATTER_CHUNK
        c1 = min(d, c0 + SCATTER_CHUNK)
        acc = np.zeros(c1 - c0)
        base = np.uint64(c0)         # unsigned offsets: no negative-index wrap test per add (2x faster)
        for i in range(weights.shape[0]):
            idx = row(idx_ptrs, i, idx0)
            vals = row(val_ptrs, i, val0)
            w = weights[i]
            m0 = np.searchsorted(idx, np.uint32(c0))
            m1 = np.searchsorted(idx, np.uint32(c1))
            for m in range(np.uint64(m0), np.uint64(m1)):
                acc[np.uint64(idx[m]) - base] += w * np.float64(vals[m])
        out[c0:c1] = acc


def check_sparse(indices, values, d: int, bad) -> None:
    """bad[i] = 1 where client i's indices are not strictly increasing and below d, or its
    values not all finite, else 0 (a client per task, as ext/compress.pyx)."""
    _check_sparse(indices.pointers, indices.first, values.pointers, values.first, np.int64(d), bad)


@njit(**KERNEL)
def _check_sparse(idx_ptrs, idx0, val_ptrs, val0, d, bad):
    n = idx0.shape[0]
    for i in prange(bad.shape[0]):
        idx = row(idx_ptrs, i, idx0)
        vals = row(val_ptrs, i, val0)
        wrong = 0
        for m in range(np.uint64(1), np.uint64(n)):
            wrong += idx[m] <= idx[m - _1]
        for m in range(np.uint64(0), np.uint64(n)):
            wrong += vals[m] - vals[m] != 0          # NaN and inf give NaN, never 0
        bad[i] = wrong > 0 or (n > 0 and np.int64(idx[n - 1]) >= d)


def random_k_indices(seeds, stream: int, d: int, k: int, out) -> None:
    """out[i] = the k sorted indices of Floyd's algorithm on the stream under seeds[i], a
    message per task, in a bitmap of d bits and sorted by radix (as ext/compress.pyx, and why)."""
    _random_k_indices(seeds, np.uint64(stream), np.int64(d), np.int64(k), out)


@njit(**KERNEL)
def _random_k_indices(seeds, stream, d, k, out):
    for i in prange(seeds.shape[0]):
        bitmap = np.zeros((d + 7) // 8, np.uint8)
        _floyd(seeds[i], stream, d, k, bitmap, out[i])
        _radix_sort(out[i], np.uint32(d - 1))


@njit(inline="always")
def _floyd(seed, stream, d, k, bitmap, out):
    """out = Floyd's k draws (unsorted) under seed; bitmap: d zero bits. The Philox words
    first, two a draw (as ext/compress.pyx)."""
    words = _chunk_words(seed, stream, 0, 2 * k)
    for i in range(k):
        lo, hi = np.uint64(words[2 * i]), np.uint64(words[2 * i + 1])
        n = np.uint64(d - k + i + 1)
        t = (hi * n + ((lo * n) >> _32)) >> _32
        if (bitmap[t >> _3] >> (t & _7)) & 1:
            t = np.uint64(d - k + i)
        bitmap[t >> _3] |= np.uint8(1 << (t & _7))
        out[i] = np.uint32(t)


@njit(inline="always")
def _radix_sort(keys, top):
    """keys (each <= top) in ascending order: least significant 11 bits first, as many passes
    as top has digits (as ext/compress.pyx)."""
    source, target = keys, np.empty_like(keys)
    shift = np.uint32(0)
    while True:
        counts = np.zeros(2048, np.int64)
        for x in source:
            counts[(x >> shift) & 2047] += 1
        total = 0
        for c in range(2048):            # each digit's first position
            total, counts[c] = total + counts[c], total
        for x in source:
            digit = (x >> shift) & 2047
            target[counts[digit]] = x
            counts[digit] += 1
        source, target = target, source
        shift += np.uint32(11)
        if shift >= 32 or (top >> shift) == 0:
            break
    if source is not keys:
        keys[:] = source


def scale_by_signs(y, seed: int, stream: int, scale: float) -> None:
    """y[j] *= -scale where bit j % 32 of word j // 32 of the stream is set, else scale (a chunk
    of COMPRESS_CHUNK coordinates per task, as ext/compress.pyx)."""
    _scale_by_signs(y, np.uint64(seed), np.uint64(stream), np.float64(scale))


@njit(**KERNEL)
def _scale_by_signs(y, seed, stream, scale):
    n = y.shape[0]
    for c in prange((n + COMPRESS_CHUNK - 1) // COMPRESS_CHUNK):
        g0 = c * COMPRESS_CHUNK
        m = min(n - g0, COMPRESS_CHUNK)
        words = _chunk_words(seed, stream, g0 // 32, (m + 31) // 32)
        part = y[g0:g0 + m]
        for j in range(np.uint64(0), np.uint64(m)):
            # times +-scale: (1 - 2 bit) scale is exactly one of them, and no branch
            part[j] *= (1.0 - 2.0 * np.float64((words[j >> _5] >> (j & _31)) & _1)) * scale


def fwht(x) -> None:
    """x <- H x in place (unnormalised Walsh-Hadamard), stages h = 1, 2, 4, ... as the reference:
    within blocks of FWHT_BLOCK, then the wider ones on panels of fedkern._tuning.fwht_panel
    columns (as ext/compress.pyx, and why)."""
    _fwht(x, np.int64(fwht_panel(x.shape[0])))


@njit(inline="always")
def _butterflies(y):
    """y <- H y (len(y) a power of two, in L1): stages h = 1, 2, 4, ... in order, the first two
    as one radix-4 step per group of four (as ext/compress.pyx)."""
    n = y.shape[0]
    if n == 2:
        u, v = y[0], y[1]
        y[0], y[1] = u + v, u - v
        return
    for g in range(n // 4):
        a = 4 * g
        s0, d0 = y[a] + y[a + 1], y[a] - y[a + 1]
        s1, d1 = y[a + 2] + y[a + 3], y[a + 2] - y[a + 3]
        y[a], y[a + 1], y[a + 2], y[a + 3] = s0 + s1, d0 + d1, s0 - s1, d0 - d1
    h = 4
    while h < n:
        for a in range(0, n, 2 * h):
            top, bottom = y[a:a + h], y[a + h:a + 2 * h]     # slices from 0: plain streams
            for j in range(h):
                u, v = top[j], bottom[j]
                top[j] = u + v
                bottom[j] = u - v
        h *= 2


@njit(inline="always")
def _row_butterflies(panel):
    """The stages pairing rows r and r + h of a panel, h = 1, 2, 4, ... in order."""
    rows, width = panel.shape
    h = 1
    while h < rows:
        for a in range(0, rows, 2 * h):
            for r in range(a, a + h):
                top, bottom = panel[r], panel[r + h]
                for q in range(width):
                    u, v = top[q], bottom[q]
                    top[q] = u + v
                    bottom[q] = u - v
        h *= 2


@njit(**KERNEL)
def _fwht(x, width):
    n = x.shape[0]
    block = min(n, FWHT_BLOCK)
    rows = n // block
    width = min(width, block)
    if n > 1:
        for c in prange(rows):         # stages within a block: the block stays in L1
            _butterflies(x[c * block:(c + 1) * block])
    if rows > 1:
        blocks = x.reshape(rows, block)
        for p in prange(block // width):   # the wider stages on a panel of every block's columns
            panel = blocks[:, p * width:(p + 1) * width].copy()
            _row_butterflies(panel)
            blocks[:, p * width:(p + 1) * width] = panel
