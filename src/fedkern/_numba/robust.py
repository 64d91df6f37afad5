"""Numba kernels of the robust-aggregation family.

Same kernels, arguments and results as ``fedkern._reference.robust`` (the specification,
including NaN ordered as +inf). Rows are read through ``updates.pointers``, so a list
of arrays is never stacked.

Order statistics work on blocks of coordinates. A block's K rows are copied in long
contiguous runs, which the hardware prefetches well, into a scratch of the updates' own
dtype (exact; half the cache for float32). Most of the work then runs across the
block's coordinates in lockstep: sorting networks and counting passes make the same
operations for every coordinate, so they vectorise and never branch on the data, where
a quickselect per coordinate mispredicts about every other comparison.

Every result depends only on its own coordinate or on sums in a fixed order, never on
the number of threads.

Words used in names, as in ``ext/robust.pyx``: a *window* is a range of ranks lo .. hi-1
of a coordinate's sorted values and a *window mean* its mean (trimmed_mean and the median
are window means with a fixed window); *meamed* is the whole mean-around-the-median rule
(grow the window from the median, ``keep`` values, then take its mean). ``*_network``
kernels sort by one sorting network (trimmed_mean's pruned to its window and run over
slabs of NET_LANES coordinates, as ext/robust.pyx does; meamed's over a block's columns);
``_trimmed_mean_sampled`` finds ranks by sample and count, ``_meamed_columns`` selects
per coordinate.
"""
import functools
from collections import namedtuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .._blocks import (GATHER_BYTES, GATHER_MAX, GATHER_STEP, NET_LANES, NET_MAX_BYTES,  # sizes, and why:
                       NET_RUN_BYTES, NET_TILE_BYTES, NORM_BLOCK, NORM_LANES,  # fedkern/_blocks.py
                       PAIR_BLOCK_MAX, PAIR_BLOCK_STEP, PAIR_BYTES, PAIR_LANES_MAX_K, SELECT_SMALL,
                       SORT_ALL_MAX)
from ._runtime import KERNEL, row
from .aggregate import _sq_sum_partials  # the squared norms' loop, with the point subtracted


@intrinsic
def _trailing_zeros(typingctx, value):
    """Index of the lowest set bit of a nonzero uint64 (LLVM cttz)."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


@functools.lru_cache(maxsize=None)
def _batcher(n: int) -> np.ndarray:
    """Comparators of Batcher's odd-even merge sort of n values (any n, as ext/robust.pyx
    builds it), as (m, 2) indices: built once per n, read-only since every call shares it."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    network = np.array(pairs, np.int64).reshape(-1, 2)
    network.flags.writeable = False
    return network


def _block(rows: int, itemsize: int) -> int:
    """Coordinates per gathered block of ``rows`` rows: a multiple of GATHER_STEP, about
    GATHER_BYTES of values, at most GATHER_MAX."""
    return max(GATHER_STEP, min(GATHER_MAX, GATHER_BYTES // (rows * itemsize)) // GATHER_STEP * GATHER_STEP)


def _sorting(updates):
    """Rows (K padded to a power of two), sorting network and block for sorting columns."""
    size = 1 << max(0, (updates.k - 1).bit_length())
    return size, _batcher(size), _block(size, updates.dtype.itemsize)


def _sample_network(k: int) -> np.ndarray:
    """The network sorting a sample of 15, 31 or 63 values (plus +inf padding): bands
    between adjacent samples then hold about K/8 .. K/32 values."""
    return _batcher(16 if k < 192 else 32 if k < 640 else 64)


# -- order statistics ------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _gather(pointers, first, j0, n, values):
    """values[i, :n] = x_i[j0 : j0 + n], NaN as +inf, in the updates' own dtype (exact).

    Rows are copied in long contiguous runs, which the hardware prefetches well.
    """
    inf = values.dtype.type(np.inf)
    for i in range(pointers.shape[0]):
        x = row(pointers, i, first)[j0:j0 + n]
        y = values[i]
        for j in range(n):
            v = x[j]
            y[j] = v if v == v else inf


@njit(cache=True, nogil=True)
def _insertion_sort(v, lo, hi):
    for t in range(lo + 1, hi):
        x = v[t]
        s = t
        while s > lo and v[s - 1] > x:
            v[s] = v[s - 1]
            s -= 1
        v[s] = x


@njit(cache=True, nogil=True)
def _heapsort(v, lo, hi):
    """Sort v[lo:hi] in O(n log n) whatever the input (numba's own sort is slow to compile)."""
    n = hi - lo
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(v, lo, start, n)
    for end in range(n - 1, 0, -1):
        x = v[lo]
        v[lo] = v[lo + end]
        v[lo + end] = x
        _sift_down(v, lo, 0, end)


@njit(cache=True, nogil=True)
def _sift_down(v, lo, root, n):
    x = v[lo + root]
    child = 2 * root + 1
    while child < n:
        if child + 1 < n and v[lo + child + 1] > v[lo + child]:
            child += 1
        if not v[lo + child] > x:
            break
        v[lo + root] = v[lo + child]
        root = child
        child = 2 * root + 1
    v[lo + root] = x


@njit(cache=True, nogil=True)
def _select(v, lo, hi, k):
    """Reorder v[lo:hi] so that v[k] has rank k, with no larger value before it, no smaller after.

    Quickselect with a median-of-3 pivot and a branch-free Lomuto partition (the
    comparisons of random data are unpredictable, so branches would cost more than the
    extra stores). When few values fall below the pivot, as with many ties, a second pass
    splits off the values equal to it, so equal values cannot stall the loop. After about
    2 log2(n) rounds the rest is sorted, bounding adversarial inputs at O(n log n).
    """
    budget = 8
    n = hi - lo
    while n > 1:
        budget += 2
        n >>= 1
    while hi - lo > SELECT_SMALL:
        if k == lo or k == hi - 1:  # an extreme: one scan
            best = k
            if k == lo:
                for t in range(lo + 1, hi):
                    if v[t] < v[best]:
                        best = t
            else:
                for t in range(lo, hi - 1):
                    if v[t] > v[best]:
                        best = t
            x = v[k]
            v[k] = v[best]
            v[best] = x
            return
        budget -= 1
        if budget == 0:
            _heapsort(v, lo, hi)
            return
        a = v[lo]
        b = v[(lo + hi) >> 1]
        c = v[hi - 1]
        pivot = max(min(a, b), min(max(a, b), c))
        i = lo  # v[lo:i] < pivot <= v[i:t]
        for t in range(lo, hi):
            x = v[t]
            v[t] = v[i]
            v[i] = x
            i += x < pivot
        if k < i:
            hi = i  # excludes the pivot's value, so the range shrinks
        elif 4 * (hi - i) > 3 * (hi - lo):
            m = i  # v[i:m] == pivot < v[m:t]; nonempty, so the range shrinks
            for t in range(i, hi):
                x = v[t]
                v[t] = v[m]
                v[m] = x
                m += x <= pivot
            if k < m:
                return
            lo = m
        else:
            lo = i
    _insertion_sort(v, lo, hi)


@njit(cache=True, nogil=True)
def _sort_samples(values, n, rows, network, samples):
    """samples[q, j] = q-th smallest of the sampled rows of column j (the last row is +inf)."""
    for q in range(rows.shape[0]):
        x = values[rows[q]]
        y = samples[q]
        for j in range(n):
            y[j] = x[j]
    samples[samples.shape[0] - 1, :n] = np.inf
    _network_sort(samples, n, network)


@njit(cache=True, nogil=True)
def _count_below(values, n, pivot, count):
    """count[j] = #(x_ij < pivot[j]) over i; four rows per sweep of the counts.

    Counts are kept in the values' float type (exact below 2^24), as wide as the values,
    so a vector of comparisons adds straight into a vector of counts.
    """
    k = values.shape[0]
    one = values.dtype.type(1)
    zero = values.dtype.type(0)
    for j in range(n):
        count[j] = zero
    i = 0
    while i + 4 <= k:
        x0 = values[i]
        x1 = values[i + 1]
        x2 = values[i + 2]
        x3 = values[i + 3]
        for j in range(n):
            p = pivot[j]
            count[j] += (((one if x0[j] < p else zero) + (one if x1[j] < p else zero))
                         + ((one if x2[j] < p else zero) + (one if x3[j] < p else zero)))
        i += 4
    while i < k:
        x0 = values[i]
        for j in range(n):
            count[j] += one if x0[j] < pivot[j] else zero
        i += 1


@njit(cache=True, nogil=True)
def _bracket(values, n, samples, r, lo, clo, chi, pivot, count):
    """Per column j, adjacent sorted samples q_lo <= x_(r) < q_hi with hi = lo + 1.

    Binary search over the samples (index -1 and S stand for -inf and +inf) keeping
    clo = #(x < q_lo) <= r < chi = #(x < q_hi); each step is one counting pass over the
    block, all columns at once.
    """
    for j in range(n):
        lo[j] = -1
        clo[j] = 0
        chi[j] = values.shape[0]
    span = samples.shape[0]  # hi - lo, a power of two
    while span > 1:
        span >>= 1
        for j in range(n):
            pivot[j] = samples[lo[j] + span, j]
        _count_below(values, n, pivot, count)
        for j in range(n):
            c = np.int64(count[j])
            below = c <= r
            lo[j] = lo[j] + span if below else lo[j]
            clo[j] = c if below else clo[j]
            chi[j] = chi[j] if below else c


@njit(cache=True, nogil=True)
def _band_masks(values, n, samples, lo, lower, upper, masks):
    """Bit i of masks[i // 32, j] is set when q_lo <= x_ij < q_hi (column j's band)."""
    s = samples.shape[0] - 1
    for j in range(n):
        lower[j] = samples[lo[j], j] if lo[j] >= 0 else -np.inf
        upper[j] = samples[lo[j] + 1, j] if lo[j] + 1 < s else np.nan  # NaN: no upper bound
    masks[:, :n] = 0
    for i in range(values.shape[0]):
        x = values[i]
        bits = masks[i >> 5]
        shift = np.uint32(i & 31)
        for j in range(n):
            inside = (x[j] >= lower[j]) & (not (x[j] >= upper[j]))
            bits[j] |= np.uint32(inside) << shift


@njit(cache=True, nogil=True)
def _network_sort(rows, n, network):
    """Sort rows[:, j] for j < n: a sorting network, the same comparisons for every column."""
    for t in range(network.shape[0]):
        a = rows[network[t, 0]]
        b = rows[network[t, 1]]
        for j in range(n):
            x = a[j]
            z = b[j]
            a[j] = min(x, z)
            b[j] = max(x, z)


@njit(cache=True, nogil=True)
def _extract(values, j, masks, dest, col):
    """dest[:m, col] = column j's band values (the set bits of masks[:, j]), +inf below."""
    m = 0
    for w in range(0, masks.shape[0], 2):  # 64 rows at a time
        bits = np.uint64(masks[w, j])
        if w + 1 < masks.shape[0]:
            bits |= np.uint64(masks[w + 1, j]) << np.uint64(32)
        while bits != 0:
            dest[m, col] = values[w * 32 + np.int64(_trailing_zeros(bits)), j]
            m += 1
            bits &= bits - np.uint64(1)
    for e in range(m, dest.shape[0]):
        dest[e, col] = np.inf


#: The scratch arrays of _ranks for one gathered block (``block`` columns, K rows), by name;
#: made once per block by _rank_scratch and reused for both ranks.
_RankScratch = namedtuple("_RankScratch", [
    "lo",     # per column: index of the sample just below the rank (-1 stands for -inf)
    "clo",    # per column: #(x < that sample)
    "chi",    # per column: #(x < the next sample)
    "pivot",  # per column: the sample a counting pass compares with
    "count",  # per column: that pass's count (in the values' dtype)
    "lower",  # per column: the band's lower bound
    "upper",  # per column: the band's upper bound (NaN: none)
    "masks",  # (ceil(K / 32), block) uint32: bit i says whether row i is in the band
    "lanes",  # (3 * block,): the column each tier matrix's column holds
    "band",   # (K, 1): a band too wide for the tiers, selected on its own
    "tiers",  # three (16 | 32 | 64, block) matrices: bands by size, one column each
])


@njit(cache=True, nogil=True)
def _rank_scratch(k, block, values):
    dtype = values.dtype
    return _RankScratch(
        lo=np.empty(block, np.int64), clo=np.empty(block, np.int64), chi=np.empty(block, np.int64),
        pivot=np.empty(block, dtype), count=np.empty(block, dtype),
        lower=np.empty(block, dtype), upper=np.empty(block, dtype),
        masks=np.empty(((k + 31) // 32, block), np.uint32), lanes=np.empty(3 * block, np.int64),
        band=np.empty((k, 1), dtype),
        tiers=(np.empty((16, block), dtype), np.empty((32, block), dtype), np.empty((64, block), dtype)))


@njit(cache=True, nogil=True)
def _ranks(values, n, samples, r1, r2, networks, work, first_out, second_out):
    """first_out[j] = x_(r1) and second_out[j] = x_(r2) of column j, for r1 <= r2 <= r1 + 1.

    Both lie in r1's band, or r2 is the first rank past it, whose value is the band's
    upper sample (a sample is a value). Bands go by size into matrices of 16, 32 or 64
    rows (padded with +inf), each sorted by one network for all its columns at once;
    the rare larger band is selected on its own. ``work`` is a _RankScratch.
    """
    clo, chi, upper, lanes, band, tiers = work.clo, work.chi, work.upper, work.lanes, work.band, work.tiers
    _bracket(values, n, samples, r1, work.lo, clo, chi, work.pivot, work.count)
    _band_masks(values, n, samples, work.lo, work.lower, upper, work.masks)
    used = np.zeros(3, np.int64)  # columns of each tier's matrix in use
    for j in range(n):
        m = chi[j] - clo[j]
        tier = 0 if m <= 16 else 1 if m <= 32 else 2 if m <= 64 else 3
        col = used[tier] if tier < 3 else 0
        _extract(values, j, work.masks, tiers[tier] if tier < 3 else band, col)
        if tier < 3:
            lanes[tier * n + col] = j
            used[tier] += 1
            continue
        v = band[:, 0]
        _select(v, 0, m, r1 - clo[j])
        if r2 > r1 and r2 - clo[j] < m:
            _select(v, r1 - clo[j] + 1, m, r2 - clo[j])
        first_out[j] = v[r1 - clo[j]]
        second_out[j] = v[r2 - clo[j]] if r2 - clo[j] < m else upper[j]
    for tier in range(3):
        bands = tiers[tier]
        _network_sort(bands, used[tier], networks[tier])
        for c in range(used[tier]):
            j = lanes[tier * n + c]
            o2 = r2 - clo[j]
            first_out[j] = bands[r1 - clo[j], c]
            x = bands[min(o2, bands.shape[0] - 1), c]
            second_out[j] = x if o2 < chi[j] - clo[j] else upper[j]


def trimmed_mean(updates, lo: int, hi: int, out) -> None:
    """out[j] = window mean of coordinate j: the mean of its sorted values x_(lo) .. x_(hi-1)
    (also the median)."""
    if hi <= lo:  # an empty window: the reference's mean is NaN
        out[:] = np.nan
        return
    if updates.k <= SORT_ALL_MAX:
        width = _tile_width(updates.k, updates.dtype.itemsize)
        _trimmed_mean_network(updates.pointers, updates.first, lo, hi, width,
                              _pruned_network(updates.k, lo, hi), numba.get_num_threads(), out)
        return
    network = _sample_network(updates.k)
    s = network.max()  # samples; the network's last input is +inf padding
    rows = (np.arange(s) * 2 + 1) * updates.k // (2 * s)
    _trimmed_mean_sampled(updates.pointers, updates.first, lo, hi, _block(updates.k, updates.dtype.itemsize),
                          rows, network, (_batcher(16), _batcher(32), _batcher(64)), out)


def _tile_width(k: int, itemsize: int) -> int:
    """Coordinates per block of the pruned network: rows read in runs of up to NET_RUN_BYTES,
    the block's tile within NET_TILE_BYTES, a multiple of NET_LANES (ext/robust.pyx's rule)."""
    width = min(NET_TILE_BYTES // (k * itemsize), NET_RUN_BYTES // itemsize)
    return max(NET_LANES, width // NET_LANES * NET_LANES)


@functools.lru_cache(maxsize=None)
def _pruned_network(k: int, lo: int, hi: int) -> np.ndarray:
    """Batcher's network on k wires, pruned to the comparators that feed wires lo .. hi-1
    (a comparator is kept when a later kept one, or the output, reads one of its wires),
    as (m, 2) offsets of its two wires in a slab of NET_LANES values per wire: the
    comparators ext/robust.pyx runs. Read-only, since every call shares it."""
    live = np.zeros(k, bool)
    live[lo:hi] = True
    kept = []
    for a, b in _batcher(k)[::-1]:
        if live[a] or live[b]:
            live[a] = live[b] = True
            kept.append((a * NET_LANES, b * NET_LANES))
    network = np.array(kept[::-1], np.int64).reshape(-1, 2)
    network.flags.writeable = False
    return network


@intrinsic
def _compare_swap(typingctx, slab, a, b):
    """slab.flat[a : a + NET_LANES] = elementwise min, slab.flat[b : b + NET_LANES] = max.

    One LLVM vector of NET_LANES values, which LLVM splits into the machine's registers
    (four AVX2, two AVX-512): its loop vectoriser leaves a compare-exchange of two rows
    of one array scalar, since it cannot prove them distinct. min is ``x < y ? x : y`` and
    max ``x > y ? x : y``, as in ext/robust.pyx (NaN never reaches a network).
    """
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        vector = ir.VectorType(context.get_data_type(signature.args[0].dtype), NET_LANES)
        px = builder.bitcast(builder.gep(data, [args[1]]), vector.as_pointer())
        py = builder.bitcast(builder.gep(data, [args[2]]), vector.as_pointer())
        x = builder.load(px, align=4)
        y = builder.load(py, align=4)
        # An empty asm hides that the stores go where the loads came from: otherwise LLVM
        # stores only the lanes that change, as masked stores (microcoded, slow on AMD).
        opaque = ir.FunctionType(px.type, [px.type])
        qx = builder.asm(opaque, "", "=r,0", [px], side_effect=False)
        qy = builder.asm(opaque, "", "=r,0", [py], side_effect=False)
        builder.store(builder.select(builder.fcmp_ordered("<", x, y), x, y), qx, align=4)
        builder.store(builder.select(builder.fcmp_ordered(">", x, y), x, y), qy, align=4)
        return context.get_dummy_value()

    return types.void(slab, a, b), codegen


@njit(**KERNEL)
def _trimmed_mean_network(pointers, first, lo, hi, width, network, nthreads, out):
    """Up to SORT_ALL_MAX clients, as ext/robust.pyx does: each block of ``width``
    coordinates is gathered into slabs of NET_LANES coordinates (a slab holds every
    client's values of its coordinates, wire by wire), a network pruned to the wires
    lo .. hi-1 sorts each slab, and wires lo .. hi-1 are summed in ascending order, exactly
    as the reference does. Each of the ``nthreads`` tasks keeps one tile for its run of
    blocks (a block's result is its own, so the split does not change it)."""
    d = first.shape[0]
    nblocks = (d + width - 1) // width
    per_thread = (nblocks + nthreads - 1) // nthreads
    for t in prange(nthreads):
        tile = np.empty((width // NET_LANES, pointers.shape[0], NET_LANES), first.dtype)
        total = np.empty(NET_LANES)
        for b in range(t * per_thread, min(nblocks, (t + 1) * per_thread)):
            j0 = b * width
            n = min(width, d - j0)
            _gather_slabs(pointers, first, j0, n, tile)
            for s in range((n + NET_LANES - 1) // NET_LANES):
                slab = tile[s]
                for c in range(network.shape[0]):
                    _compare_swap(slab, network[c, 0], network[c, 1])
                for l in range(NET_LANES):
                    total[l] = slab[lo, l]
                for i in range(lo + 1, hi):
                    wire = slab[i]
                    for l in range(NET_LANES):
                        total[l] += wire[l]
                for l in range(min(NET_LANES, n - s * NET_LANES)):
                    out[j0 + s * NET_LANES + l] = total[l] / (hi - lo)


@njit(cache=True, nogil=True)
def _gather_slabs(pointers, first, j0, n, tile):
    """tile[s, i, l] = x_i[j0 + s * NET_LANES + l], NaN as +inf, zero past n: rows read in
    runs of n, so the prefetchers follow every row."""
    inf = tile.dtype.type(np.inf)
    zero = tile.dtype.type(0)
    for i in range(pointers.shape[0]):
        x = row(pointers, i, first)[j0:j0 + n]
        for s in range((n + NET_LANES - 1) // NET_LANES):
            wire = tile[s, i]
            m = min(NET_LANES, n - s * NET_LANES)
            for l in range(m):
                v = x[s * NET_LANES + l]
                wire[l] = v if v == v else inf
            for l in range(m, NET_LANES):
                wire[l] = zero


@njit(**KERNEL)
def _trimmed_mean_sampled(pointers, first, lo, hi, block, rows, network, band_networks, out):
    """Order statistics by sample, count and band, a block of coordinates at a time.

    The K rows of a block are gathered contiguously. For all its coordinates at once, a
    sorting network orders a fixed sample of the K values and counting passes find the
    two adjacent samples around x_(lo) (and x_(hi-1)); only the few values between them
    (about K/8) are then sorted, again by networks across coordinates. Kept
    values strictly between x_(lo) and x_(hi-1) are summed in client order, then the
    copies of those two.
    """
    d = first.shape[0]
    for b in prange((d + block - 1) // block):
        _trimmed_block(pointers, first, lo, hi, b * block, min(block, d - b * block), block, rows,
                       network, band_networks, out)


@njit(cache=True, nogil=True)
def _trimmed_block(pointers, first, lo, hi, j0, n, block, rows, network, band_networks, out):
    k = pointers.shape[0]
    wide = hi - lo > 2  # else the kept values are x_(lo) and maybe x_(lo+1)
    values = np.empty((k, block), first.dtype)
    samples = np.empty((network.max() + 1, block), first.dtype)
    low = np.empty(block, first.dtype)
    high = np.empty(block, first.dtype)
    work = _rank_scratch(k, block, values)
    _gather(pointers, first, j0, n, values)
    _sort_samples(values, n, rows, network, samples)
    for step in range(2 if wide else 1):  # one call site: compiles once
        r = lo if step == 0 else hi - 1
        first_out = low if step == 0 else high
        _ranks(values, n, samples, r, r if wide else hi - 1, band_networks, work, first_out,
               first_out if wide else high)
    if not wide:
        for j in range(n):
            out[j0 + j] = (np.float64(low[j]) + np.float64(high[j])) / 2 if hi - lo == 2 else low[j]
        return
    _window_mean_between(values, n, lo, hi, low, high, out[j0:j0 + n])


@njit(cache=True, nogil=True)
def _window_mean_between(values, n, lo, hi, low, high, out):
    """out[j] = window mean of column j given its ends low[j] = x_(lo), high[j] = x_(hi-1):
    the values strictly between them summed in client order, then the copies of the ends."""
    total = np.zeros(n)
    below = np.zeros(n, np.int64)
    under = np.zeros(n, np.int64)
    for i in range(values.shape[0]):
        x = values[i]
        for j in range(n):
            v = np.float64(x[j])
            total[j] += v if (low[j] < v) & (v < high[j]) else 0.0
    for i in range(values.shape[0]):
        x = values[i]
        for j in range(n):
            below[j] += x[j] <= low[j]
            under[j] += x[j] < high[j]
    for j in range(n):
        a = np.float64(low[j])
        z = np.float64(high[j])
        if a == z:
            out[j] = a
        else:
            # copies of x_(lo) hold ranks lo .. below-1, of x_(hi-1) ranks under .. hi-1
            out[j] = ((total[j] + a * (below[j] - lo)) + z * (hi - under[j])) / (hi - lo)


def meamed(updates, keep: int, out) -> None:
    """out[j] = mean of the ``keep`` values of coordinate j closest to its median.

    Makes exactly the reference's window comparisons (ties go to the lower value) and
    sums the window in ascending order, so every backend picks the same window.
    """
    if updates.k * updates.dtype.itemsize > NET_MAX_BYTES:  # the bound of ext/robust.pyx
        _meamed_columns(updates.pointers, updates.first, keep, _block(updates.k, updates.dtype.itemsize), out)
        return
    size, network, block = _sorting(updates)
    _meamed_network(updates.pointers, updates.first, keep, block, network, size, out)


@njit(**KERNEL)
def _meamed_network(pointers, first, keep, block, network, size, out):
    """Sort a block's columns with one network (padded to ``size`` rows with +inf), then
    grow every column's window and sum it in lockstep, as the reference does for all
    coordinates at once: same clamped reads, same order, zeros outside the window."""
    k = pointers.shape[0]
    d = first.shape[0]
    for c in prange((d + block - 1) // block):
        j0 = c * block
        n = min(block, d - j0)
        values = np.empty((size, block), first.dtype)
        a = np.empty(block, np.int64)
        b = np.empty(block, np.int64)
        median = np.empty(block)
        total = np.zeros(block)
        _gather(pointers, first, j0, n, values)
        values[k:, :n] = np.inf
        _network_sort(values, n, network)
        for j in range(n):
            a[j] = b[j] = k // 2
            median[j] = 0.5 * (np.float64(values[(k - 1) // 2, j]) + np.float64(values[k // 2, j]))
        for _ in range(keep):
            for j in range(n):
                below = np.float64(values[max(a[j] - 1, 0), j])
                above = np.float64(values[min(b[j], k - 1), j])
                lower = (a[j] > 0) & ((b[j] == k) | (median[j] - below <= above - median[j]))
                a[j] -= lower
                b[j] += not lower
        for t in range(k):
            x = values[t]
            for j in range(n):
                total[j] += np.float64(x[j]) if (a[j] <= t) & (t < b[j]) else 0.0
        for j in range(n):
            out[j0 + j] = total[j] / keep


@njit(**KERNEL)
def _meamed_columns(pointers, first, keep, block, out):
    """For K * itemsize > NET_MAX_BYTES: per coordinate, select ranks K//2 - keep .. K//2 + keep - 1
    (the only ones the window reads) and sort them."""
    k = pointers.shape[0]
    d = first.shape[0]
    first_rank = max(0, k // 2 - keep)
    end_rank = min(k, k // 2 + keep)
    for c in prange((d + block - 1) // block):
        j0 = c * block
        n = min(block, d - j0)
        values = np.empty((k, block), first.dtype)
        v = np.empty(k)
        _gather(pointers, first, j0, n, values)
        for j in range(n):
            for i in range(k):
                v[i] = values[i, j]
            if first_rank > 0:
                _select(v, 0, k, first_rank)
            if end_rank < k:
                _select(v, first_rank, k, end_rank - 1)
            _heapsort(v, first_rank, end_rank)
            median = 0.5 * (v[(k - 1) // 2] + v[k // 2])
            a = b = k // 2
            for _ in range(keep):
                if a > 0 and (b == k or median - v[a - 1] <= v[b] - median):
                    a -= 1
                else:
                    b += 1
            total = 0.0
            for t in range(a, min(b, k)):  # b > k only if keep > K
                total += v[t]
            out[j0 + j] = total / keep


# -- distances -------------------------------------------------------------------------

def gather_tile(updates, j0: int, center: bool, tile) -> None:
    """tile[i] = x_i[j0 : j0 + n], minus x_0[j0 : j0 + n] in float64 if ``center``, in the
    tile's dtype (float32 or float64, whatever the updates').

    Serial on purpose: a BLAS product follows each tile, and threads left spinning after
    a parallel gather take the cores from BLAS's own threads (measured 4x slower at
    K=100, D=1e6 than a serial gather).
    """
    _gather_tile(updates.pointers, updates.first, j0, center, tile)


@njit(cache=True, nogil=True)
def _gather_tile(pointers, first, j0, center, tile):
    k, n = tile.shape
    x0 = row(pointers, 0, first)[j0:j0 + n]
    for i in range(k):
        x = row(pointers, i, first)[j0:j0 + n]
        y = tile[i]
        if center:
            for j in range(n):
                y[j] = np.float64(x[j]) - np.float64(x0[j])
        else:
            for j in range(n):
                y[j] = x[j]


def exact_sq_distances(updates, out) -> None:
    """out[i, l] = sum_j (x_ij - x_lj)^2 in float64, without the Gram form's cancellation."""
    kernel = _exact_sq_distances_in_lanes if updates.k <= PAIR_LANES_MAX_K else _exact_sq_distances
    kernel(updates.pointers, updates.first, _pair_block(updates), out)


def _pair_block(updates) -> int:
    """Coordinates per block of exact_sq_distances (and of exact_sq_rows: the same sums)."""
    block = PAIR_BYTES // (updates.dtype.itemsize * updates.k)
    return max(PAIR_BLOCK_STEP, min(PAIR_BLOCK_MAX, block) // PAIR_BLOCK_STEP * PAIR_BLOCK_STEP)


@njit(**KERNEL)
def _exact_sq_distances(pointers, first, block, out):
    """Per block of coordinates, all rows go into a tile with a coordinate's K values
    contiguous; row i's sums with every l < i then run in vector lanes over l.

    The tile stays in cache while every pair reads it, so each update is read from
    memory once. Each pair's block sum runs over j in order (four terms at a time) and
    blocks are added in order, so the result does not depend on the thread count. Task
    t takes rows t and K-1-t, K-1 pairs in all, so threads stay balanced, and fills the
    same two rows of the next block's tile: one parallel region per block.
    """
    k = pointers.shape[0]
    d = first.shape[0]
    nblocks = (d + block - 1) // block
    tiles = np.empty((2, block, k), first.dtype)  # exact: converted when read
    partial = np.empty((k, k))
    out[:, :] = 0.0
    for i in range(k):
        _tile_row(pointers, first, i, 0, min(block, d), tiles[0])
    for b in range(nblocks):
        j0 = b * block
        n = min(block, d - j0)
        n_next = min(block, d - j0 - block)
        for t in prange((k + 1) // 2):
            _row_pairs(tiles[b % 2], n, t, partial, out)
            if n_next > 0:
                _tile_row(pointers, first, t, j0 + block, n_next, tiles[(b + 1) % 2])
            if k - 1 - t != t:
                _row_pairs(tiles[b % 2], n, k - 1 - t, partial, out)
                if n_next > 0:
                    _tile_row(pointers, first, k - 1 - t, j0 + block, n_next, tiles[(b + 1) % 2])
    _symmetric(out)


@njit(**KERNEL)
def _exact_sq_distances_in_lanes(pointers, first, block, out):
    """K <= PAIR_LANES_MAX_K: per block of coordinates, task t sums the pairs of rows t and
    K-1-t (K-1 pairs, so threads stay balanced) with every lower row, each pair along the
    block in vector lanes (:func:`_pair_sum`); the block's rows stay in cache meanwhile.
    Blocks are added in order, so the result does not depend on the thread count."""
    k = pointers.shape[0]
    d = first.shape[0]
    out[:, :] = 0.0
    for b in range((d + block - 1) // block):
        j0 = np.uint64(b * block)
        n = min(block, d - b * block)
        for t in prange((k + 1) // 2):
            lanes = np.empty(NORM_LANES)
            _lower_pairs(pointers, first, t, j0, n, lanes, out)
            if k - 1 - t != t:
                _lower_pairs(pointers, first, k - 1 - t, j0, n, lanes, out)
    _symmetric(out)


@njit(cache=True, nogil=True)
def _symmetric(out):
    """The upper triangle from the lower one; a zero diagonal."""
    for i in range(out.shape[0]):
        out[i, i] = 0.0  # as the reference's, even for a row holding inf or NaN
        for l in range(i):
            out[l, i] = out[i, l]


@njit(cache=True, nogil=True)
def _lower_pairs(pointers, first, i, j0, n, lanes, out):
    """out[i, l] += the block's sum of (x_i - x_l)^2, for every l < i."""
    x = row(pointers, i, first)
    for l in range(i):
        out[i, l] += _pair_sum(x, row(pointers, l, first), j0, n, lanes)


@njit(inline="always")
def _pair_sum(x, y, j0, n, lanes):
    """sum of (x_j - y_j)^2 over j0 <= j < j0 + n (j0 unsigned) in float64, in NORM_LANES
    interleaved lanes added in lane order (as the norms); ``lanes`` is scratch. Symmetric in
    x and y bit for bit: a difference's sign does not change its square."""
    lanes[:] = 0.0
    m, width = np.uint64(n), np.uint64(NORM_LANES)
    j = np.uint64(0)
    while j + width <= m:
        for u in range(width):
            e = np.float64(x[j0 + j + u]) - np.float64(y[j0 + j + u])
            lanes[u] += e * e
        j += width
    for t in range(j0 + j, j0 + m):
        e = np.float64(x[t]) - np.float64(y[t])
        lanes[0] += e * e
    total = 0.0
    for u in range(NORM_LANES):
        total += lanes[u]
    return total


@njit(cache=True, nogil=True)
def _tile_row(pointers, first, i, j0, n, tile):
    """tile[j, i] = x_i[j0 + j]."""
    x = row(pointers, i, first)[j0:j0 + n]
    for j in range(n):
        tile[j, i] = x[j]


@njit(cache=True, nogil=True)
def _row_pairs(tile, n, i, partial, out):
    """out[i, :i] += sum over the tile's n coordinates of (x_i - x_l)^2, for every l < i."""
    p = partial[i, :i]
    for l in range(i):
        p[l] = 0.0
    j = 0
    while j + 4 <= n:
        t0 = tile[j]
        t1 = tile[j + 1]
        t2 = tile[j + 2]
        t3 = tile[j + 3]
        y0 = np.float64(t0[i])
        y1 = np.float64(t1[i])
        y2 = np.float64(t2[i])
        y3 = np.float64(t3[i])
        for l in range(i):
            e0 = y0 - np.float64(t0[l])
            e1 = y1 - np.float64(t1[l])
            e2 = y2 - np.float64(t2[l])
            e3 = y3 - np.float64(t3[l])
            p[l] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
        j += 4
    while j < n:
        t0 = tile[j]
        y0 = np.float64(t0[i])
        for l in range(i):
            e0 = y0 - np.float64(t0[l])
            p[l] += e0 * e0
        j += 1
    o = out[i, :i]
    for l in range(i):
        o[l] += p[l]


def exact_sq_rows(updates, rows, out) -> None:
    """out[r, l] = sum_j (x_ij - x_lj)^2 for i = rows[r] and every l, and out[r, i] = 0:
    rows of exact_sq_distances, bit for bit (the same blocks, the same sum per block)."""
    _exact_sq_rows(updates.pointers, updates.first, _pair_block(updates), updates.k <= PAIR_LANES_MAX_K, rows,
                   out)


@njit(**KERNEL)
def _exact_sq_rows(pointers, first, block, in_lanes, rows, out):
    """Per block, the K rows are spread over threads; each is read once against every
    requested row, whose block stays in cache. A pair's block sum is the one
    exact_sq_distances takes at this K: :func:`_pair_sum` (``in_lanes``) or _row_pairs'
    (four terms at a time from the block's start, the tail one by one); blocks added in order."""
    k = pointers.shape[0]
    d = first.shape[0]
    c = rows.shape[0]
    out[:, :] = 0.0
    for b in range((d + block - 1) // block):
        j0 = b * block
        n = min(block, d - j0)
        for l in prange(k):
            lanes = np.empty(NORM_LANES)
            y = row(pointers, l, first)
            for r in range(c):
                x = row(pointers, rows[r], first)
                out[r, l] += _pair_sum(x, y, np.uint64(j0), n, lanes) if in_lanes else _pair_sum4(x, y, j0, n)
    for r in range(c):
        out[r, rows[r]] = 0.0


@njit(inline="always")
def _pair_sum4(x, y, j0, n):
    """sum of (x_j - y_j)^2 over j0 <= j < j0 + n in float64, four terms at a time in order:
    _row_pairs' sum of one pair."""
    p = 0.0
    j = j0
    while j + 4 <= j0 + n:
        e0 = np.float64(x[j]) - np.float64(y[j])
        e1 = np.float64(x[j + 1]) - np.float64(y[j + 1])
        e2 = np.float64(x[j + 2]) - np.float64(y[j + 2])
        e3 = np.float64(x[j + 3]) - np.float64(y[j + 3])
        p += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
        j += 4
    while j < j0 + n:
        e0 = np.float64(x[j]) - np.float64(y[j])
        p += e0 * e0
        j += 1
    return p


def sq_distances_to(updates, point, out) -> None:
    """out[i] = sum_j (x_ij - point_j)^2 in float64: block partials in parallel, then in order."""
    partials = np.empty((updates.k, (updates.d + NORM_BLOCK - 1) // NORM_BLOCK))
    _sq_sum_partials(updates.pointers, updates.first, point, 0, updates.k, partials)
    _sum_partials(partials, out)


@njit(cache=True, nogil=True)
def _sum_partials(partials, out):
    for i in range(partials.shape[0]):
        total = 0.0
        for b in range(partials.shape[1]):
            total += partials[i, b]
        out[i] = total
