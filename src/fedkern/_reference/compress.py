r"""Reference kernels of the compression family, in plain numpy; the codecs' bits are defined here.

Kernels take validated inputs (see ``fedkern.compress``) and write into their buffers.
Every compiled backend gives the same bytes for the same seed (``quantize``,
``random_k_indices``, ``block_stats``, ``fwht`` are bit-exact) and the same sums bit for
bit (``accumulate_quantized`` and ``scatter_add`` do the sums of these kernels, in their
order).

**Stochastic rounding.** Coordinate ``j`` of a message encoded with ``seed`` uses word
``j`` of Philox stream ``ROUND_STREAM`` (``fedkern._reference.random``: word ``j % 4`` of
block ``j // 4``). With block ``b = j // block_size``, ``v = x_j`` (``|x_j|`` when signed)
in float64 and ``t = min(max((v - offset_b) / step_b, 0), levels)`` (``t = 0`` where
``step_b = 0``), the code is ``floor(t) + [w_j 2**-32 < t - floor(t)]``: its mean is
``t`` up to less than ``2**-32`` of a step. Clamping ``t`` is clipping ``x`` to the
quantiser's range, so a quantiser is unbiased for the clipped vector (and for ``x``
itself when the range covers it, as every codec but TernGrad's clipping makes sure).

**Packing.** ``bits`` in (1, 2, 4, 8): code ``j`` sits at bit ``(j bits) mod 8`` of byte
``(j bits) // 8`` (little-endian within a byte); sign ``j`` (1: negative) at bit ``j mod 8``
of byte ``j // 8``. Bits past the last coordinate are zero.

**Decoding** code ``c`` of block ``b``: ``offset_b + step_b c`` in float64, negated where
the sign bit is set.

**Random-k indices** (Floyd's algorithm, Bentley and Floyd, CACM 1987): for
``i = 0 .. k - 1`` with ``n = d - k + i + 1``, draw ``u`` = words ``2i + 1`` (high) and
``2i`` (low) of stream ``INDEX_STREAM``, ``t = floor(u n / 2**64)``; if ``t`` is already
chosen take ``n - 1`` instead. The k indices are returned sorted.

**Rotation signs** of a randomized Hadamard transform: ``s_j = -1`` where bit ``j mod 32``
of word ``j // 32`` of stream ``ROTATE_STREAM`` is set, else ``+1``.
"""
import numpy as np

from ._philox import blocks

ROUND_STREAM, INDEX_STREAM, ROTATE_STREAM = 0, 1, 2
#: block statistics, columns of ``stats``: min, max, sum, sum of squares, sum of |x|
STATS = 5


def _words(seed: int, stream: int, n: int) -> np.ndarray:
    """Words 0 .. n - 1 of a stream, uint64."""
    return blocks(seed, stream, 0, (n + 3) // 4).reshape(-1)[:n].astype(np.uint64)


def block_stats(x: np.ndarray, block_size: int, stats: np.ndarray) -> None:
    """stats[b] = (min, max, sum, sum x^2, sum |x|) of block b, sums in float64 in index order."""
    v = x.astype(np.float64)
    for b in range(stats.shape[0]):
        s = v[b * block_size:(b + 1) * block_size]
        stats[b, 0], stats[b, 1] = s.min(), s.max()
        # cumsum adds in index order, as the compiled loops do (sum would add pairwise)
        stats[b, 2], stats[b, 3], stats[b, 4] = np.cumsum(s)[-1], np.cumsum(s * s)[-1], np.cumsum(np.abs(s))[-1]


def _pack(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """out = codes (each < 2**bits) packed ``8 // bits`` to a byte, little-endian."""
    per = 8 // bits
    padded = np.zeros(out.shape[0] * per, np.uint8)
    padded[:codes.shape[0]] = codes
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out[:] = np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1)


def _unpack(packed: np.ndarray, bits: int, d: int) -> np.ndarray:
    """The first d codes of ``packed``, uint8."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return ((packed[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:d]


def quantize(x: np.ndarray, offsets: np.ndarray, steps: np.ndarray, block_size: int, levels: int, bits: int,
             signed: bool, seed: int, stream: int, codes: np.ndarray, signs: np.ndarray) -> None:
    """Stochastic rounding of x onto ``offsets + steps * {0 .. levels}`` per block (module docstring)."""
    d = x.shape[0]
    v = x.astype(np.float64)
    if signed:
        _pack((v < 0).astype(np.uint8), 1, signs)
        v = np.abs(v)
    block = np.arange(d) // block_size
    step = steps[block]
    t = np.where(step > 0, (v - offsets[block]) / np.where(step > 0, step, 1.0), 0.0)
    t = np.minimum(np.maximum(t, 0.0), float(levels))
    low = np.floor(t)
    up = _words(seed, stream, d).astype(np.float64) * 2.0**-32 < t - low
    _pack((low + up).astype(np.uint8), bits, codes)


def accumulate_quantized(out: np.ndarray, codes, signs, offsets, steps, weights: np.ndarray, block_size: int,
                         bits: int, signed: bool) -> None:
    """out = sum_i weights[i] decode_i, clients in index order, in float64, rounded once.

    A client's coordinate j in block b decodes to +-(off + step q): the kernels add
    (w off) + (w step) q, negated where the sign bit is set. Unsigned codes start every
    coordinate at the block's offsets summed over the clients, sum_i (w_i off_i), and then
    add only the (w_i step_i) q_i, in index order; these are the sums every backend does.
    """
    d = out.shape[0]
    block = np.arange(d) // block_size
    if signed:
        total = np.zeros(d)
    else:
        base = np.zeros(offsets[0].shape[0])
        for i in range(weights.shape[0]):
            base += weights[i] * offsets[i]
        total = base[block]
    for i in range(weights.shape[0]):
        v = (weights[i] * steps[i])[block] * _unpack(codes[i], bits, d)
        if signed:
            v = (weights[i] * offsets[i])[block] + v
            v = np.where(_unpack(signs[i], 1, d).astype(bool), -v, v)
        total += v
    out[...] = total


def scatter_add(out: np.ndarray, indices, values, weights: np.ndarray) -> None:
    """out = sum_i weights[i] scatter(indices[i], values[i]), clients in index order (indices
    of a client distinct), in float64, rounded once."""
    total = np.zeros(out.shape[0])
    for i in range(weights.shape[0]):
        total[indices[i].astype(np.intp)] += weights[i] * values[i].astype(np.float64)
    out[...] = total


def check_sparse(indices, values, d: int, bad: np.ndarray) -> None:
    """bad[i] = 1 if client i's indices are not strictly increasing and below d, or its
    values not all finite, else 0 (buffers of validated dtypes and lengths)."""
    for i in range(bad.shape[0]):
        idx = indices[i].astype(np.int64)
        bad[i] = bool((idx.shape[0] and idx[-1] >= d) or (np.diff(idx) <= 0).any()
                      or not np.isfinite(values[i]).all())


def _floyd_draws(seed: int, stream: int, d: int, k: int) -> np.ndarray:
    """t_i = floor(u_i n_i / 2**64), n_i = d - k + i + 1 (exact in uint64, by 32-bit halves)."""
    w = _words(seed, stream, 2 * k)
    lo, hi = w[0::2], w[1::2]
    n = np.arange(d - k + 1, d + 1, dtype=np.uint64)
    return (hi * n + ((lo * n) >> np.uint64(32))) >> np.uint64(32)


def random_k_indices(seeds: np.ndarray, stream: int, d: int, k: int, out: np.ndarray) -> None:
    """out[i] = the k sorted indices Floyd's algorithm draws under seeds[i] (module docstring)."""
    for i, seed in enumerate(seeds.tolist()):
        chosen = set()
        for m, t in enumerate(_floyd_draws(seed, stream, d, k).tolist()):
            chosen.add(d - k + m if t in chosen else t)
        out[i] = np.sort(np.fromiter(chosen, np.int64, k))


def scale_by_signs(y: np.ndarray, seed: int, stream: int, scale: float) -> None:
    """y[j] *= -scale where bit j % 32 of word j // 32 of the stream is set, else scale."""
    n = y.shape[0]
    words = _words(seed, stream, (n + 31) // 32).astype(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:n]   # little-endian words
    y *= np.where(bits.astype(bool), -scale, scale)


def fwht(x: np.ndarray) -> None:
    """x <- H x in place (unnormalised Walsh-Hadamard, len(x) a power of two), stages h = 1, 2, 4, ..."""
    n, h = x.shape[0], 1
    while h < n:
        y = x.reshape(-1, 2, h)
        a, b = y[:, 0, :].copy(), y[:, 1, :].copy()
        y[:, 0, :] = a + b
        y[:, 1, :] = a - b
        h *= 2

