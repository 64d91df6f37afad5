"""Numba kernels of the aggregation family.

Same kernels, arguments and summation order as ``ext/aggregate.pyx`` (see there): rows
are read through ``updates.pointers``, work is split over coordinates in fixed chunks,
and every reduction runs in a fixed order, so results do not depend on thread count.
"""
import math

import numpy as np
from numba import njit, prange

from .._blocks import NORM_BLOCK, NORM_LANES  # sizes, and why: fedkern/_blocks.py
from .._tuning import group_bytes, sum_chunk
from ._runtime import KERNEL, row


def weighted_sum(updates, weights, divisor, out) -> int:
    """out = (sum_i weights[i] * updates[i]) / divisor; return the number of non-finite outputs."""
    # dividing by a power of two is multiplying by its exact reciprocal, and much cheaper
    by_reciprocal = math.frexp(divisor)[0] == 0.5
    return _weighted_sum(updates.pointers, updates.first, weights, np.float64(divisor), by_reciprocal,
                         sum_chunk(updates.d), out)


@njit(**KERNEL)
def _weighted_sum(pointers, first, weights, divisor, by_reciprocal, chunk, out):
    """Per chunk of coordinates (fedkern._tuning.sum_chunk), the rows added into a float64
    accumulator in index order, then divided and rounded once."""
    reciprocal = 1.0 / divisor
    d = first.shape[0]
    nonfinite = 0
    for c in prange((d + chunk - 1) // chunk):
        j0 = c * chunk
        n = min(chunk, d - j0)
        acc = np.zeros(n)
        _add_rows(acc, pointers, first, 0, weights, j0)
        # the choice outside the loops, the count in a loop of its own: LLVM vectorises
        # these three loops, not the one loop doing all (1.1-1.2x at K = 10 x D = 1e7)
        part = out[j0:j0 + n]
        if by_reciprocal:
            for j in range(n):
                part[j] = acc[j] * reciprocal
        else:
            for j in range(n):
                part[j] = acc[j] / divisor
        bad = 0
        for j in range(n):
            bad += not np.isfinite(part[j])
        nonfinite += bad
    return nonfinite


@njit(inline="always")
def _add_rows(acc, pointers, first, row0, weights, j0):
    """acc[j] += sum_i weights[i] x[row0 + i][j0 + j] for j < len(acc), rows added in index
    order (eight per pass over acc, then the rest in passes of four, two and one: more read
    streams per thread keep memory busier, and fewer accumulator loads and stores; the same
    sums, as ``ext/_rows.pxd``)."""
    n, k = acc.shape[0], weights.shape[0]
    i = 0
    while i + 8 <= k:
        x0 = row(pointers, row0 + i, first)[j0:j0 + n]
        x1 = row(pointers, row0 + i + 1, first)[j0:j0 + n]
        x2 = row(pointers, row0 + i + 2, first)[j0:j0 + n]
        x3 = row(pointers, row0 + i + 3, first)[j0:j0 + n]
        x4 = row(pointers, row0 + i + 4, first)[j0:j0 + n]
        x5 = row(pointers, row0 + i + 5, first)[j0:j0 + n]
        x6 = row(pointers, row0 + i + 6, first)[j0:j0 + n]
        x7 = row(pointers, row0 + i + 7, first)[j0:j0 + n]
        w0, w1, w2, w3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
        w4, w5, w6, w7 = weights[i + 4], weights[i + 5], weights[i + 6], weights[i + 7]
        for j in range(n):
            acc[j] = (((((((acc[j] + w0 * x0[j]) + w1 * x1[j]) + w2 * x2[j]) + w3 * x3[j]) + w4 * x4[j])
                      + w5 * x5[j]) + w6 * x6[j]) + w7 * x7[j]
        i += 8
    if i + 4 <= k:
        x0 = row(pointers, row0 + i, first)[j0:j0 + n]
        x1 = row(pointers, row0 + i + 1, first)[j0:j0 + n]
        x2 = row(pointers, row0 + i + 2, first)[j0:j0 + n]
        x3 = row(pointers, row0 + i + 3, first)[j0:j0 + n]
        w0, w1, w2, w3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
        for j in range(n):
            acc[j] = (((acc[j] + w0 * x0[j]) + w1 * x1[j]) + w2 * x2[j]) + w3 * x3[j]
        i += 4
    if i + 2 <= k:
        x0 = row(pointers, row0 + i, first)[j0:j0 + n]
        x1 = row(pointers, row0 + i + 1, first)[j0:j0 + n]
        w0, w1 = weights[i], weights[i + 1]
        for j in range(n):
            acc[j] = (acc[j] + w0 * x0[j]) + w1 * x1[j]
        i += 2
    if i < k:
        x = row(pointers, row0 + i, first)[j0:j0 + n]
        w = weights[i]
        for j in range(n):
            acc[j] += w * x[j]


def accumulate(acc, update, weight: float) -> None:
    """acc += weight * update, computed in float64."""
    _accumulate(acc, update, np.float64(weight))


@njit(**KERNEL)
def _accumulate(acc, update, weight):
    for j in prange(acc.shape[0]):
        acc[j] = acc[j] + weight * np.float64(update[j])


@njit(**KERNEL)
def count_nonfinite(values) -> int:
    """Number of NaN and infinite entries of a 1-D array."""
    count = 0
    for j in prange(values.shape[0]):
        if not np.isfinite(values[j]):
            count += 1
    return count


@njit(cache=True, nogil=True)
def _block_sq_sums(pointers, first, point, i0, rows, j0, n, lanes, out):
    """out[r] = sum_j (x_{i0+r}[j0 + j] - point[j0 + j])^2 over j < n, for r < rows; with
    ``point=None`` the squared norms (Numba compiles that case without the subtraction).

    The rows are read in turn, NORM_LANES values at a time, so that a task of eight rows
    keeps eight read streams going; each row sums in NORM_LANES interleaved float64 lanes
    (as ``ext/_rows.pxd``'s norms), indexed unsigned: Numba's negative-index fix-up of a
    signed index stops LLVM from vectorising the loop over the lanes. ``lanes`` is a
    (rows, NORM_LANES) scratch.
    """
    lanes[:, :] = 0.0
    m, width, start = np.uint64(n), np.uint64(NORM_LANES), np.uint64(j0)
    j = np.uint64(0)
    while j + width <= m:
        for r in range(rows):
            x = row(pointers, i0 + r, first)
            sums = lanes[r]
            if point is None:
                for l in range(width):
                    v = np.float64(x[start + j + l])
                    sums[l] += v * v
            else:
                for l in range(width):
                    e = np.float64(x[start + j + l]) - point[start + j + l]
                    sums[l] += e * e
        j += width
    for r in range(rows):
        x = row(pointers, i0 + r, first)
        sums = lanes[r]
        for t in range(start + j, start + m):
            e = np.float64(x[t]) if point is None else np.float64(x[t]) - point[t]
            sums[0] += e * e
        total = 0.0
        for l in range(NORM_LANES):
            total += sums[l]
        out[r] = total


@njit(**KERNEL)
def _sq_sum_partials(pointers, first, point, row0, nrows, partials):
    """partials[i, b] = sum over block b of (x_{row0+i} - point)^2 (of x^2 with ``point=None``),
    in parallel: tasks of eight rows x one block, eight read streams per thread (one row
    per task reached about 60% of the read bandwidth on Zen 3); the last nrows % 8 rows a
    block per task."""
    d = first.shape[0]
    nblocks = partials.shape[1]
    groups = nrows // 8
    for t in prange(groups * nblocks):
        i = 8 * (t // nblocks)
        j0 = (t % nblocks) * NORM_BLOCK
        lanes = np.empty((8, NORM_LANES))
        _block_sq_sums(pointers, first, point, row0 + i, 8, j0, min(NORM_BLOCK, d - j0), lanes,
                       partials[i:i + 8, t % nblocks])
    for t in prange((nrows - 8 * groups) * nblocks):
        i = 8 * groups + t // nblocks
        j0 = (t % nblocks) * NORM_BLOCK
        lanes = np.empty((1, NORM_LANES))
        _block_sq_sums(pointers, first, point, row0 + i, 1, j0, min(NORM_BLOCK, d - j0), lanes,
                       partials[i:i + 1, t % nblocks])


@njit(cache=True, nogil=True)
def _norms_from_partials(partials, nrows, norms, row0):
    for i in range(nrows):
        total = 0.0
        for b in range(partials.shape[1]):
            total += partials[i, b]
        norms[row0 + i] = np.sqrt(total)


def _nblocks(d: int) -> int:
    return (d + NORM_BLOCK - 1) // NORM_BLOCK


def l2_norms(updates, norms) -> None:
    """norms[i] = sqrt(sum_j updates[i, j]**2), in float64."""
    partials = np.empty((updates.k, _nblocks(updates.d)))
    _sq_sum_partials(updates.pointers, updates.first, None, 0, updates.k, partials)
    _norms_from_partials(partials, updates.k, norms, 0)


def clip_by_norm(updates, max_norm: float, out, norms) -> None:
    """out[i] = updates[i] * min(1, max_norm / ||updates[i]||); norms get the norms.

    Rows go in groups of about fedkern._tuning.group_bytes(), norms then scaling, so the second read
    of a group comes from cache when it fits.
    """
    group = max(1, group_bytes() // (updates.d * updates.dtype.itemsize))
    partials = np.empty((min(group, updates.k), _nblocks(updates.d)))
    for g0 in range(0, updates.k, group):
        g = min(group, updates.k - g0)
        _sq_sum_partials(updates.pointers, updates.first, None, g0, g, partials)
        _norms_from_partials(partials, g, norms, g0)
        # c / max(n, c) is 1 for rows within the bound (zero rows too) and c / n above it
        scales = max_norm / np.maximum(norms[g0:g0 + g], max_norm)
        _scale_rows(updates.pointers, updates.first, out.pointers, out.first, g0, scales)


@njit(**KERNEL)
def _scale_rows(pointers, first, out_pointers, out_first, row0, scales):
    d = first.shape[0]
    nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK
    for t in prange(scales.shape[0] * nblocks):
        i = t // nblocks
        j0 = (t % nblocks) * NORM_BLOCK
        n = min(NORM_BLOCK, d - j0)
        # the block as slices from 0: indexed from j0 in the whole rows, LLVM's vector loop
        # ran at a third of this speed on Zen 4 (74 against 22 ms at K = 100 x D = 1e6)
        x = row(pointers, row0 + i, first)[j0:j0 + n]
        y = row(out_pointers, row0 + i, out_first)[j0:j0 + n]
        scale = scales[i]
        for j in range(n):
            y[j] = scale * np.float64(x[j])
