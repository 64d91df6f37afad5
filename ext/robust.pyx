"""Cython/OpenMP kernels of the robust-aggregation family.

Same kernels and arguments as ``fedkern._reference.robust``; inputs are validated by
``fedkern._validate`` and rows are read through ``updates.pointers``, so a sequence of
arrays is never stacked. Order statistics gather a block of coordinates at a time into a
per-thread tile (NaN stored as +inf, the shared ordering), reading the K rows once in
long runs, then sort the block with a pruned sorting network, many coordinates per SIMD
instruction (quickselect per coordinate for very large K). Each coordinate's result, and
each sum over a row, is computed in an order fixed by the data alone, so results do not
depend on the number of threads.

Words used in names: a *window* is a range of ranks lo .. hi-1 of one coordinate's sorted
values, and a *window mean* its mean (trimmed_mean and the median are window means with a
fixed window). *meamed* is the whole mean-around-the-median rule: grow the window from the
median, ``keep`` values, then take its mean. ``_column_*`` helpers work on one coordinate
copied out as float64 (quickselect), ``_tile_*`` ones on a tile sorted by network.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY, NAN
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memmove, memset

from _blocks cimport (CACHE_LINE, DIST_BLOCK, DIST_LANES, NET_LANES, NET_MAX_BYTES,  # sizes, and why:
                      NET_RUN_BYTES, NET_TILE_BYTES, NORM_BLOCK, SELECT_SMALL)  # src/fedkern/_blocks.py
from _fused cimport in_t, out_t, ref_t
from _openmp cimport fk_max_threads
from _scratch cimport scratch


# ---------------------------------------------------------------------------------------
# Selection and sorting in one coordinate's column, copied out of the tile as float64
# (for K beyond the networks; no NaN: gathered NaN is +inf)

cdef inline void _insertion_sort(double* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double x
    for i in range(1, n):
        x = v[i]
        j = i
        while j > 0 and v[j - 1] > x:
            v[j] = v[j - 1]
            j = j - 1
        v[j] = x


cdef inline void _sift_down(double* v, Py_ssize_t root, Py_ssize_t n) noexcept nogil:
    cdef double x = v[root]
    cdef Py_ssize_t child
    while True:
        child = 2 * root + 1
        if child >= n:
            break
        if child + 1 < n and v[child + 1] > v[child]:
            child = child + 1
        if not v[child] > x:
            break
        v[root] = v[child]
        root = child
    v[root] = x


cdef void _heapsort(double* v, Py_ssize_t n) noexcept nogil:
    """O(n log n) whatever the data: the fallback that bounds selection and sorting."""
    cdef Py_ssize_t i
    cdef double x
    i = n // 2
    while i > 0:
        i = i - 1
        _sift_down(v, i, n)
    i = n
    while i > 1:
        i = i - 1
        x = v[0]
        v[0] = v[i]
        v[i] = x
        _sift_down(v, 0, i)


cdef inline int _budget(Py_ssize_t n) noexcept nogil:
    """Partition rounds allowed before heapsort takes over (about 2 log2 n)."""
    cdef int bits = 0
    while n > 0:
        bits = bits + 1
        n = n >> 1
    return 2 * bits + 4


cdef inline double _pivot(const double* v, Py_ssize_t n, Py_ssize_t rank) noexcept nogil:
    """The value of a 5-sample nearest in relative rank to ``rank`` (n > SELECT_SMALL).

    Aiming at the wanted rank, rather than at the middle, leaves the wanted value close to
    an end of the remaining range, which the min / max scan of _select then finishes.
    """
    cdef double sample[5]
    cdef Py_ssize_t i
    for i in range(5):
        sample[i] = v[(2 * i + 1) * n // 10]
    _insertion_sort(sample, 5)
    return sample[rank * 5 // n]


cdef inline Py_ssize_t _partition(double* v, double* tmp, Py_ssize_t n, double pivot,
                                  Py_ssize_t* ngreater) noexcept nogil:
    """Three-way partition of v[0:n] into [< pivot | == pivot | > pivot]; return the count below.

    Branch-free (each value is written at both ends and only the matching count moves), so
    the loop never mispredicts on random data. Values equal to the pivot leave the range at
    once, so ties (common: clients sending zeros) cannot make selection quadratic. The
    equal band is refilled with the pivot: only the sign of a zero can change.
    """
    cdef Py_ssize_t i, nl = 0, ng = 0, last = n - 1
    cdef double x
    memcpy(tmp, v, n * sizeof(double))
    for i in range(n):
        x = tmp[i]
        v[nl] = x
        nl = nl + (x < pivot)
        v[last - ng] = x
        ng = ng + (x > pivot)
    for i in range(nl, n - ng):
        v[i] = pivot
    ngreater[0] = ng
    return nl


cdef void _select(double* v, double* tmp, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t kth) noexcept nogil:
    """Rearrange v[lo:hi] so that v[kth] holds its sorted value, smaller ones before it and
    larger ones after it (introselect; tmp holds hi - lo doubles)."""
    cdef int budget = _budget(hi - lo)
    cdef Py_ssize_t i, best, nl, ng
    cdef double x
    while True:
        if kth == lo or kth == hi - 1:
            best = kth
            if kth == lo:
                for i in range(lo + 1, hi):
                    if v[i] < v[best]:
                        best = i
            else:
                for i in range(lo, hi - 1):
                    if v[i] > v[best]:
                        best = i
            x = v[kth]
            v[kth] = v[best]
            v[best] = x
            return
        if hi - lo <= SELECT_SMALL:
            _insertion_sort(v + lo, hi - lo)
            return
        if budget == 0:
            _heapsort(v + lo, hi - lo)
            return
        budget = budget - 1
        nl = _partition(v + lo, tmp, hi - lo, _pivot(v + lo, hi - lo, kth - lo), &ng)
        if kth < lo + nl:
            hi = lo + nl
        elif kth >= hi - ng:
            lo = hi - ng
        else:
            return


cdef void _sort(double* v, double* tmp, Py_ssize_t n, int budget) noexcept nogil:
    """Sort v[0:n] ascending (introsort; recursion only into the smaller side)."""
    cdef Py_ssize_t nl, ng
    while n > SELECT_SMALL:
        if budget == 0:
            _heapsort(v, n)
            return
        budget = budget - 1
        nl = _partition(v, tmp, n, _pivot(v, n, n // 2), &ng)
        if nl < ng:
            _sort(v, tmp, nl, budget)
            v = v + (n - ng)
            n = ng
        else:
            _sort(v + (n - ng), tmp, ng, budget)
            n = nl
    _insertion_sort(v, n)



cdef inline double _column_window_mean(double* v, double* tmp, Py_ssize_t k, Py_ssize_t lo,
                                       Py_ssize_t hi) noexcept nogil:
    """Window mean of the column v[0:k]: the mean of its sorted values lo .. hi-1; v is reordered."""
    cdef Py_ssize_t i
    cdef double total = 0.0
    _select(v, tmp, 0, k, lo)
    if hi - 1 > lo:
        # v[lo] is now the least of v[lo:k], so rank hi-1 of v[0:k] is found in v[lo+1:k]
        _select(v, tmp, lo + 1, k, hi - 1)
    for i in range(lo, hi):
        total = total + v[i]
    return total / (hi - lo)


cdef inline double _meamed_sorted(const in_t* x, Py_ssize_t stride, Py_ssize_t k,
                                  Py_ssize_t keep) noexcept nogil:
    """The meamed rule (the reference's window grown from the median, then its mean), where
    x[i * stride] holds the sorted value i for every rank the window can read
    (k//2 - keep .. k//2 + keep - 1).

    The comparisons are exactly the reference's; the clamped reads let the step be
    branch-free. The sum runs in ascending order from 0.0, as the reference's does.
    """
    cdef Py_ssize_t a = k // 2, b = k // 2, step, i
    cdef double median = 0.5 * (<double> x[((k - 1) // 2) * stride] + <double> x[(k // 2) * stride])
    cdef double below, above, total = 0.0
    cdef bint lower
    for step in range(keep):
        below = x[max(a - 1, <Py_ssize_t> 0) * stride]
        above = x[min(b, k - 1) * stride]
        lower = (a > 0) & ((b == k) | (median - below <= above - median))
        a = a - lower
        b = b + 1 - lower
    for i in range(a, min(b, k)):
        total = total + x[i * stride]
    return total / keep


cdef inline double _meamed_column(double* v, double* tmp, Py_ssize_t k,
                                  Py_ssize_t keep) noexcept nogil:
    """The meamed rule on the column v[0:k]: select and sort the ranks the window can read,
    then _meamed_sorted; v is reordered."""
    cdef Py_ssize_t lo = max(<Py_ssize_t> 0, k // 2 - keep), hi = min(k, k // 2 + keep)
    if lo > 0:
        _select(v, tmp, 0, k, lo)
    if hi < k:
        _select(v, tmp, lo, k, hi - 1)
    _sort(v + lo, tmp, hi - lo, _budget(hi - lo))
    return _meamed_sorted(v, 1, k, keep)


cdef inline void _copy_column(const in_t* x, Py_ssize_t stride, Py_ssize_t k, double* column) noexcept nogil:
    """column[i] = x[i * stride] for i < k: one coordinate of a tile, as float64."""
    cdef Py_ssize_t i
    for i in range(k):
        column[i] = x[i * stride]

# ---------------------------------------------------------------------------------------
# Sorting networks over a tile: NET_LANES coordinates at once, in SIMD registers

cdef Py_ssize_t _batcher(Py_ssize_t n, Py_ssize_t* pairs) noexcept nogil:
    """Batcher's odd-even merge sort network on n wires (any n): store its comparators
    (a, b), a < b, in pairs (unless NULL) and return their number."""
    cdef Py_ssize_t p = 1, k, j, i, m = 0
    while p < n:
        k = p
        while k >= 1:
            j = k % p
            while j < n - k:
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        if pairs != NULL:
                            pairs[2 * m] = i + j
                            pairs[2 * m + 1] = i + j + k
                        m = m + 1
                j = j + 2 * k
            k = k // 2
        p = p * 2
    return m


cdef Py_ssize_t _prune(Py_ssize_t* pairs, Py_ssize_t m, Py_ssize_t n, Py_ssize_t lo, Py_ssize_t hi,
                       Py_ssize_t stride, char* live) noexcept nogil:
    """Keep only the comparators that feed wires lo .. hi-1 (for a median, ~80% of them),
    packed at the end of pairs as tile offsets; return the index of the first one kept."""
    cdef Py_ssize_t c, a, b, first = m
    memset(live, 0, n)
    memset(live + lo, 1, hi - lo)
    c = m
    while c > 0:
        c = c - 1
        a = pairs[2 * c]
        b = pairs[2 * c + 1]
        if live[a] or live[b]:
            live[a] = 1
            live[b] = 1
            first = first - 1
            pairs[2 * first] = a * stride
            pairs[2 * first + 1] = b * stride
    return first


cdef inline void _compare_swap(in_t* x, in_t* y) noexcept nogil:
    # min and max written as these exact comparisons compile to minps / maxps (no NaN here)
    cdef Py_ssize_t j
    cdef in_t a, b
    for j in range(NET_LANES):
        a = x[j]
        b = y[j]
        x[j] = a if a < b else b
        y[j] = a if a > b else b


cdef inline void _sort_lanes(in_t* tile, const Py_ssize_t* pairs, Py_ssize_t npairs) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(npairs):
        _compare_swap(tile + pairs[2 * c], tile + pairs[2 * c + 1])


cdef inline void _gather(const in_t** rows, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t n,
                         Py_ssize_t stride, in_t* tile) noexcept nogil:
    """tile[i * stride + j] = rows[i][j0 + j], NaN as +inf; lanes up to the next multiple
    of NET_LANES are zeroed so the network never reads undefined values."""
    cdef Py_ssize_t i, j, padded = (n + NET_LANES - 1) // NET_LANES * NET_LANES
    cdef const in_t* row
    cdef in_t* wire
    cdef in_t x
    for i in range(k):
        row = rows[i] + j0
        wire = tile + i * stride
        for j in range(n):
            x = row[j]
            wire[j] = <in_t> INFINITY if x != x else x
        for j in range(n, padded):
            wire[j] = 0


cdef Py_ssize_t* _pruned_network(Py_ssize_t k, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t stride,
                                 Py_ssize_t* npairs) except NULL:
    """Batcher's network on k wires, pruned to the comparators that feed wires lo .. hi-1,
    as pairs of tile offsets: a new buffer (free it) of 2 * npairs[0] entries."""
    cdef Py_ssize_t m = _batcher(k, NULL), first
    cdef Py_ssize_t* pairs = <Py_ssize_t*> scratch(2 * m * sizeof(Py_ssize_t))
    cdef char* live = <char*> scratch(k)
    _batcher(k, pairs)
    first = _prune(pairs, m, k, lo, hi, stride, live)
    free(live)
    npairs[0] = m - first
    memmove(pairs, pairs + 2 * first, 2 * npairs[0] * sizeof(Py_ssize_t))
    return pairs


cdef inline void _sort_tile(in_t* tile, Py_ssize_t n, const Py_ssize_t* pairs,
                            Py_ssize_t npairs) noexcept nogil:
    """Run the network over the tile's first n coordinates, NET_LANES at a time."""
    cdef Py_ssize_t jj = 0
    while jj < n:
        _sort_lanes(tile + jj, pairs, npairs)
        jj = jj + NET_LANES


cdef inline void _tile_window_means(const in_t* tile, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                                    Py_ssize_t n, out_t* out) noexcept nogil:
    """out[j] = window mean of lane j of a sorted tile: the mean of its wires lo .. hi-1,
    added in ascending order."""
    cdef double acc[NET_LANES]
    cdef const in_t* wire
    cdef Py_ssize_t s, i, j
    s = 0
    while s < n:
        wire = tile + lo * stride + s
        for j in range(NET_LANES):
            acc[j] = wire[j]
        for i in range(lo + 1, hi):
            wire = tile + i * stride + s
            for j in range(NET_LANES):
                acc[j] = acc[j] + wire[j]
        for j in range(min(<Py_ssize_t> NET_LANES, n - s)):
            out[s + j] = <out_t> (acc[j] / (hi - lo))
        s = s + NET_LANES


# ---------------------------------------------------------------------------------------
# The order-statistic kernels: trimmed_mean (and median) and meamed

cdef struct Tiling:
    Py_ssize_t width       # coordinates per block and tile: a multiple of NET_LANES
    Py_ssize_t stride      # elements from one wire (client) of a tile to the next
    Py_ssize_t nblocks     # blocks of width coordinates covering D
    Py_ssize_t per_thread  # bytes per thread: its tile, then a float64 column and the column's scratch


cdef inline Tiling _tiling(Py_ssize_t k, Py_ssize_t d, Py_ssize_t itemsize) noexcept nogil:
    """How K rows of D values of ``itemsize`` bytes are cut into tiles: each row read in
    runs of up to NET_RUN_BYTES, a tile within NET_TILE_BYTES, and a stride one cache line
    longer than the width so that the wires do not all map to the same L1 sets."""
    cdef Tiling t
    t.width = min(<Py_ssize_t> NET_TILE_BYTES // (k * itemsize), <Py_ssize_t> NET_RUN_BYTES // itemsize)
    t.width = max(<Py_ssize_t> NET_LANES, t.width // NET_LANES * NET_LANES)
    t.stride = t.width + CACHE_LINE // itemsize
    t.nblocks = (d + t.width - 1) // t.width
    t.per_thread = k * t.stride * itemsize + 2 * k * <Py_ssize_t> sizeof(double)
    return t


def trimmed_mean(updates, int lo, int hi, out) -> None:
    """out[j] = window mean of coordinate j: the mean of its sorted values lo .. hi-1 (the
    median when lo = (K-1)//2, hi = K//2 + 1), summed in float64 and rounded once."""
    _trimmed_mean(updates.pointers, updates.first, lo, hi, out)


def meamed(updates, int keep, out) -> None:
    """out[j] = mean of the ``keep`` values of coordinate j closest to its median, with
    exactly the reference's window-growing comparisons (ties go to the lower value)."""
    _meamed(updates.pointers, updates.first, keep, out)


cdef struct Plan:
    Tiling tiling
    bint network          # sort each tile by a network (else quickselect per column)
    Py_ssize_t npairs
    Py_ssize_t* pairs     # the network's comparators as tile offsets, or NULL
    char* tiles           # every thread's tile and column, one per_thread apart


cdef Plan _plan(Py_ssize_t k, Py_ssize_t d, Py_ssize_t itemsize, Py_ssize_t lo, Py_ssize_t hi,
                int nthreads) except *:
    """Tiles for ``nthreads`` and, up to NET_MAX_BYTES per coordinate, a network pruned to
    the ranks lo .. hi-1 (release with _release)."""
    cdef Plan plan
    plan.tiling = _tiling(k, d, itemsize)
    plan.network = k * itemsize <= NET_MAX_BYTES
    plan.npairs = 0
    plan.pairs = _pruned_network(k, lo, hi, plan.tiling.stride, &plan.npairs) if plan.network else NULL
    plan.tiles = NULL
    try:
        plan.tiles = <char*> scratch(nthreads * plan.tiling.per_thread + CACHE_LINE)
    except MemoryError:
        free(plan.pairs)
        raise
    return plan


cdef inline void _release(Plan* plan) noexcept nogil:
    free(plan.tiles)
    free(plan.pairs)


cdef inline in_t* _block_tile(const in_t** rows, Py_ssize_t k, Py_ssize_t j0, Py_ssize_t n,
                              const Plan* plan) noexcept nogil:
    """The calling thread's tile, holding coordinates j0 .. j0+n-1 of every row: sorted
    when the plan has a network; its float64 column for quickselect follows it."""
    cdef in_t* tile = <in_t*> (plan.tiles + threadid() * plan.tiling.per_thread)
    _gather(rows, k, j0, n, plan.tiling.stride, tile)
    if plan.network:
        _sort_tile(tile, n, plan.pairs, plan.npairs)
    return tile


def _trimmed_mean(const uintptr_t[::1] pointers, const in_t[::1] first, Py_ssize_t lo,
                  Py_ssize_t hi, out_t[::1] out):
    """A block of coordinates is gathered into a per-thread tile, one wire (client) per
    row, in the input dtype (min and max are exact in it). Up to NET_MAX_BYTES per
    coordinate, a sorting network pruned to the wires lo .. hi-1 sorts NET_LANES
    coordinates at once in SIMD registers: no branches, no worst case, ties cost nothing,
    and the window comes out sorted, so sums run in the reference's order. For more
    clients the network's K log^2 K work loses to quickselect on each coordinate's column.
    """
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0], b, j0, n, jj
    cdef int nthreads = fk_max_threads()
    cdef Plan plan
    cdef in_t* tile
    cdef double* column
    if hi <= lo:  # an empty window: the reference's mean is NaN
        out[:] = <out_t> NAN
        return
    plan = _plan(k, d, sizeof(in_t), lo, hi, nthreads)
    with nogil:
        # dynamic: quickselect's time depends on the data, and a block is ~0.1 ms of work
        for b in prange(plan.tiling.nblocks, schedule="dynamic", num_threads=nthreads):
            j0 = b * plan.tiling.width
            n = min(plan.tiling.width, d - j0)
            tile = _block_tile(rows, k, j0, n, &plan)
            column = <double*> (<char*> tile + k * plan.tiling.stride * sizeof(in_t))
            if plan.network:
                _tile_window_means(tile, plan.tiling.stride, lo, hi, n, &out[j0])
            else:
                for jj in range(n):
                    _copy_column(tile + jj, plan.tiling.stride, k, column)
                    out[j0 + jj] = <out_t> _column_window_mean(column, column + k, k, lo, hi)
        _release(&plan)


def _meamed(const uintptr_t[::1] pointers, const in_t[::1] first, Py_ssize_t keep, out_t[::1] out):
    """Tiles, networks and quickselect as in _trimmed_mean; the network is pruned to the
    ranks the window can read (K//2 - keep .. K//2 + keep - 1), which come out sorted, and
    the window is then grown from the median with the reference's comparisons."""
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0], b, j0, n, jj
    cdef int nthreads = fk_max_threads()
    cdef Plan plan
    cdef in_t* tile
    cdef double* column
    if keep <= 0:  # an empty window: the reference's mean is NaN
        out[:] = <out_t> NAN
        return
    plan = _plan(k, d, sizeof(in_t), max(<Py_ssize_t> 0, k // 2 - keep), min(k, k // 2 + keep), nthreads)
    with nogil:
        for b in prange(plan.tiling.nblocks, schedule="dynamic", num_threads=nthreads):
            j0 = b * plan.tiling.width
            n = min(plan.tiling.width, d - j0)
            tile = _block_tile(rows, k, j0, n, &plan)
            column = <double*> (<char*> tile + k * plan.tiling.stride * sizeof(in_t))
            if plan.network:
                for jj in range(n):
                    out[j0 + jj] = <out_t> _meamed_sorted(tile + jj, plan.tiling.stride, k, keep)
            else:
                for jj in range(n):
                    _copy_column(tile + jj, plan.tiling.stride, k, column)
                    out[j0 + jj] = <out_t> _meamed_column(column, column + k, k, keep)
        _release(&plan)


# ---------------------------------------------------------------------------------------
# Tiles and distances

def gather_tile(updates, Py_ssize_t j0, bint center, tile) -> None:
    """tile[i] = x_i[j0 : j0 + n], or x_i - x_0 there (in float64, rounded once into the
    tile's dtype) if ``center``; the tile is float32 or float64, whatever the updates are.

    Serial on purpose: a BLAS product follows each tile, and OpenMP threads left
    spinning after a parallel gather take the cores from BLAS's own threads (measured
    4x slower at K=100, D=1e6 than a serial gather).
    """
    _gather_tile(updates.pointers, updates.first, j0, center, tile)


cdef inline void _copy_run(const in_t* x, const in_t* base, bint center, out_t* dst,
                           Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    if center:
        for j in range(n):
            dst[j] = <out_t> (<double> x[j] - <double> base[j])
    elif sizeof(in_t) == sizeof(out_t):  # the same dtype
        memcpy(dst, x, n * sizeof(in_t))
    else:
        for j in range(n):
            dst[j] = <out_t> x[j]


def _gather_tile(const uintptr_t[::1] pointers, const in_t[::1] first, Py_ssize_t j0,
                 bint center, out_t[:, ::1] tile):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], n = tile.shape[1]
    cdef Py_ssize_t i
    with nogil:
        for i in range(k):
            _copy_run(rows[i] + j0, rows[0] + j0, center, &tile[i, 0], n)


cdef inline double _sq_diff(const in_t* x, const ref_t* y, Py_ssize_t n) noexcept nogil:
    """sum_j (x_j - y_j)^2 in float64, in DIST_LANES interleaved partial sums (a fixed order)."""
    cdef double s[DIST_LANES]
    cdef double t
    cdef Py_ssize_t j, u
    for u in range(DIST_LANES):
        s[u] = 0.0
    j = 0
    while j + DIST_LANES <= n:
        for u in range(DIST_LANES):
            t = <double> x[j + u] - <double> y[j + u]
            s[u] = s[u] + t * t
        j = j + DIST_LANES
    while j < n:
        t = <double> x[j] - <double> y[j]
        s[0] = s[0] + t * t
        j = j + 1
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))  # DIST_LANES = 8


cdef inline void _sq_diffs8(const in_t** rows, const double* y, Py_ssize_t j0, Py_ssize_t n,
                            double* out, Py_ssize_t out_stride) noexcept nogil:
    """out[r * out_stride] = _sq_diff(rows[r] + j0, y, n) for r < 8, bit for bit: the rows
    read in turn, 512 values at a time, so that each thread keeps eight read streams going
    (one row per task reached about 60% of the read bandwidth on Zen 3)."""
    cdef double s[8][DIST_LANES]
    cdef const in_t* x
    cdef double t
    cdef Py_ssize_t r, u, j, c, end = n - n % DIST_LANES
    for r in range(8):
        for u in range(DIST_LANES):
            s[r][u] = 0.0
    c = 0
    while c < end:
        for r in range(8):
            x = rows[r] + j0
            j = c
            while j < min(c + 512, end):
                for u in range(DIST_LANES):
                    t = <double> x[j + u] - y[j + u]
                    s[r][u] = s[r][u] + t * t
                j = j + DIST_LANES
        c = c + 512
    for r in range(8):
        x = rows[r] + j0
        for j in range(end, n):
            t = <double> x[j] - y[j]
            s[r][0] = s[r][0] + t * t
        out[r * out_stride] = (((s[r][0] + s[r][1]) + (s[r][2] + s[r][3]))
                               + ((s[r][4] + s[r][5]) + (s[r][6] + s[r][7])))  # DIST_LANES = 8


cdef void _pairs_block(const in_t** rows, Py_ssize_t i, Py_ssize_t j0, Py_ssize_t n,
                       double* out_row) noexcept nogil:
    """out_row[l] += block partial of ||x_i - x_l||^2 for l < i."""
    cdef Py_ssize_t l
    cdef const in_t* x = rows[i] + j0
    for l in range(i):
        out_row[l] = out_row[l] + _sq_diff(x, rows[l] + j0, n)


def exact_sq_distances(updates, double[:, ::1] out) -> None:
    """out[i, l] = sum_j (x_ij - x_lj)^2 in float64, without the cancellation of the Gram
    form; the diagonal is 0. Coordinate blocks run in order and each adds into out, so every pair is summed
    in a fixed order; within a block, rows are spread over threads."""
    _exact_sq_distances(updates.pointers, updates.first, out)


def _exact_sq_distances(const uintptr_t[::1] pointers, const in_t[::1] first, double[:, ::1] out):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t i, l, r, j0, n
    with nogil:
        for i in range(k):
            for l in range(i + 1):
                out[i, l] = 0.0
        j0 = 0
        while j0 < d:
            n = min(<Py_ssize_t> DIST_BLOCK, d - j0)
            # chunk 1: row i has i + 1 pairs, so interleaving rows balances the threads
            for r in prange(k, schedule="static", chunksize=1):
                _pairs_block(rows, r, j0, n, &out[r, 0])
            j0 = j0 + n
        for i in range(k):
            out[i, i] = 0.0
            for l in range(i):
                out[l, i] = out[i, l]


def exact_sq_rows(updates, const Py_ssize_t[::1] rows, double[:, ::1] out) -> None:
    """out[r, l] = sum_j (x_ij - x_lj)^2 for i = rows[r] and every l, and out[r, i] = 0:
    rows of exact_sq_distances, bit for bit. Each pair is summed as there: _sq_diff over the
    same DIST_BLOCK blocks, added in block order (a difference's sign does not change its
    square). Per block, the K rows are spread over threads and each is read once against
    every requested row, whose block stays in cache: len(rows) K D work, not K^2 D / 2."""
    _exact_sq_rows(updates.pointers, updates.first, rows, out)


def _exact_sq_rows(const uintptr_t[::1] pointers, const in_t[::1] first, const Py_ssize_t[::1] rows,
                   double[:, ::1] out):
    cdef const in_t** x = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0], c = rows.shape[0]
    cdef Py_ssize_t r, l, j0, n
    with nogil:
        for r in range(c):
            for l in range(k):
                out[r, l] = 0.0
        j0 = 0
        while j0 < d:
            n = min(<Py_ssize_t> DIST_BLOCK, d - j0)
            for l in prange(k, schedule="static"):
                for r in range(c):
                    out[r, l] = out[r, l] + _sq_diff(x[rows[r]] + j0, x[l] + j0, n)
            j0 = j0 + n
        for r in range(c):
            out[r, rows[r]] = 0.0


def sq_distances_to(updates, const double[::1] point, double[::1] out) -> None:
    """out[i] = sum_j (x_ij - point_j)^2 in float64: partial sums over fixed blocks in
    parallel, then added per row in block order."""
    _sq_distances_to(updates.pointers, updates.first, point, out)


def _sq_distances_to(const uintptr_t[::1] pointers, const in_t[::1] first,
                     const double[::1] point, double[::1] out):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK
    cdef double* partials = <double*> scratch(k * nblocks * sizeof(double))
    cdef Py_ssize_t t, i, b, j0
    cdef double total
    cdef Py_ssize_t groups = k // 8
    with nogil:
        # eight rows x one block per task, as the norms (ext/_rows.pxd), the rest a row each
        for t in prange(groups * nblocks, schedule="static"):
            i = 8 * (t // nblocks)
            j0 = (t % nblocks) * NORM_BLOCK
            _sq_diffs8(rows + i, &point[j0], j0, min(<Py_ssize_t> NORM_BLOCK, d - j0),
                       partials + i * nblocks + t % nblocks, nblocks)
        for t in prange((k - 8 * groups) * nblocks, schedule="static"):
            i = 8 * groups + t // nblocks
            j0 = (t % nblocks) * NORM_BLOCK
            partials[i * nblocks + t % nblocks] = _sq_diff(rows[i] + j0, &point[j0],
                                                           min(<Py_ssize_t> NORM_BLOCK, d - j0))
        for i in range(k):
            total = 0.0
            for b in range(nblocks):
                total = total + partials[i * nblocks + b]
            out[i] = total
    free(partials)
