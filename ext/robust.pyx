"""Cython/OpenMP kernels of the robust-aggregation family.

Same kernels and arguments as ``fedkern._reference.robust``; inputs are validated by
``fedkern._validate`` and rows are read through ``updates.pointers``, so a sequence of
arrays is never stacked. Order statistics gather a block of coordinates at a time into a
per-thread tile (NaN stored as +inf, the shared ordering), reading the K rows once in
long runs, then sort the block with a pruned sorting network, many coordinates per SIMD
instruction (quickselect per coordinate for very large K). Each coordinate's result, and
each sum over a row, is computed in an order fixed by the data alone, so results do not
depend on the number of threads.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY, NAN
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from _fused cimport in_t, out_t
from _openmp cimport fk_max_threads


ctypedef fused ref_t:
    float
    double

cdef enum:
    SMALL = 16             # ranges this short are finished by insertion sort
    NET_LANES = 32         # coordinates sorted together by one pass of a sorting network
    NET_MAX_BYTES = 8192   # networks up to K = 2048 float32 / 1024 float64 clients
    MAX_TILE_BYTES = 1 << 19  # per-thread tile: stays in L2 while the network runs over it
    MAX_RUN_BYTES = 2048   # bytes of a row read per tile (long runs keep prefetchers busy)
    DIST_BLOCK = 2048      # coordinates per block of exact_sq_distances: the block's rows stay in L2
    NORM_BLOCK = 8192      # coordinates per partial sum of sq_distances_to
    LANES = 8              # independent partial sums: the compiler keeps them in vector registers


cdef void* _scratch(Py_ssize_t nbytes) except NULL:
    cdef void* buffer = malloc(nbytes if nbytes > 0 else 1)
    if buffer == NULL:
        raise MemoryError()
    return buffer


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
    """The value of a 5-sample nearest in relative rank to ``rank`` (n > SMALL).

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
        if hi - lo <= SMALL:
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
    while n > SMALL:
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


cdef inline double _window_mean(double* v, double* tmp, Py_ssize_t k, Py_ssize_t lo,
                                Py_ssize_t hi) noexcept nogil:
    """Mean of the sorted values lo .. hi-1 of v[0:k]; v is reordered."""
    cdef Py_ssize_t i
    cdef double total = 0.0
    _select(v, tmp, 0, k, lo)
    if hi - 1 > lo:
        # v[lo] is now the least of v[lo:k], so rank hi-1 of v[0:k] is found in v[lo+1:k]
        _select(v, tmp, lo + 1, k, hi - 1)
    for i in range(lo, hi):
        total = total + v[i]
    return total / (hi - lo)


cdef inline double _near_median_sorted(const in_t* x, Py_ssize_t stride, Py_ssize_t k,
                                      Py_ssize_t keep) noexcept nogil:
    """The reference's window around the median, where x[i * stride] holds the sorted value i
    for every rank the window can read (k//2 - keep .. k//2 + keep - 1).

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


cdef inline double _mean_near_median(double* v, double* tmp, Py_ssize_t k,
                                     Py_ssize_t keep) noexcept nogil:
    """_near_median_sorted on v[0:k] after selecting and sorting the ranks it can read."""
    cdef Py_ssize_t lo = max(<Py_ssize_t> 0, k // 2 - keep), hi = min(k, k // 2 + keep)
    if lo > 0:
        _select(v, tmp, 0, k, lo)
    if hi < k:
        _select(v, tmp, lo, k, hi - 1)
    _sort(v + lo, tmp, hi - lo, _budget(hi - lo))
    return _near_median_sorted(v, 1, k, keep)


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


cdef inline void _window_means(const in_t* tile, Py_ssize_t stride, Py_ssize_t lo, Py_ssize_t hi,
                               Py_ssize_t n, out_t* out) noexcept nogil:
    """out[j] = mean of sorted wires lo .. hi-1 of lane j, added in ascending order."""
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


def trimmed_mean(updates, int lo, int hi, out) -> None:
    """out[j] = mean of the sorted values lo .. hi-1 of coordinate j (the median when
    lo = (K-1)//2, hi = K//2 + 1), summed in float64 and rounded once."""
    _order_statistic(updates.pointers, updates.first, lo, hi, 0, out)


def mean_around_median(updates, int keep, out) -> None:
    """out[j] = mean of the ``keep`` values of coordinate j closest to its median, with
    exactly the reference's window-growing comparisons (ties go to the lower value)."""
    _order_statistic(updates.pointers, updates.first, 0, 0, keep, out)


def _order_statistic(const uintptr_t[::1] pointers, const in_t[::1] first, Py_ssize_t lo,
                     Py_ssize_t hi, Py_ssize_t keep, out_t[::1] out):
    """Shared driver: keep > 0 means mean_around_median, else trimmed_mean(lo, hi).

    A block of coordinates is gathered into a per-thread tile, one wire (client) per
    row, in the input dtype (min and max are exact in it). Up to NET_MAX_BYTES per
    coordinate, a sorting network pruned to the wires the result reads sorts NET_LANES
    coordinates at once in SIMD registers: no branches, no worst case, ties cost nothing,
    and the window comes out sorted, so sums run in the reference's order. For more
    clients the network's K log^2 K work loses to quickselect on each coordinate's column.
    """
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef bint network = k * <Py_ssize_t> sizeof(in_t) <= NET_MAX_BYTES
    # tile width: a multiple of NET_LANES, rows read in runs of up to 2 KB; the stride adds
    # a cache line so that wires do not all map to the same L1 sets
    cdef Py_ssize_t width = min(<Py_ssize_t> MAX_TILE_BYTES // (k * <Py_ssize_t> sizeof(in_t)),
                                <Py_ssize_t> MAX_RUN_BYTES // <Py_ssize_t> sizeof(in_t))
    width = max(<Py_ssize_t> NET_LANES, width // NET_LANES * NET_LANES)
    cdef Py_ssize_t stride = width + 64 // <Py_ssize_t> sizeof(in_t)
    cdef Py_ssize_t nblocks = (d + width - 1) // width
    cdef Py_ssize_t wlo = lo, whi = hi, m, first_pair = 0, npairs = 0
    cdef Py_ssize_t* pairs = NULL
    cdef char* live
    cdef int nthreads = fk_max_threads()
    # per thread: the tile (a multiple of 64 bytes), then a column and its scratch
    cdef Py_ssize_t per_thread = k * stride * sizeof(in_t) + 2 * k * sizeof(double)
    cdef char* scratch
    cdef in_t* tile
    cdef double* column
    cdef double value
    cdef Py_ssize_t b, j0, n, jj, i
    if keep > 0:
        wlo = max(<Py_ssize_t> 0, k // 2 - keep)
        whi = min(k, k // 2 + keep)
    if hi <= lo and keep <= 0:  # an empty window: the reference's mean is NaN
        out[:] = <out_t> NAN
        return
    if network:
        m = _batcher(k, NULL)
        pairs = <Py_ssize_t*> _scratch(2 * m * sizeof(Py_ssize_t))
        live = <char*> _scratch(k)
        _batcher(k, pairs)
        first_pair = _prune(pairs, m, k, wlo, whi, stride, live)
        npairs = m - first_pair
        free(live)
    scratch = <char*> _scratch(nthreads * per_thread + 64)
    with nogil:
        # dynamic: quickselect's time depends on the data, and a block is ~0.1 ms of work
        for b in prange(nblocks, schedule="dynamic", num_threads=nthreads):
            tile = <in_t*> (scratch + threadid() * per_thread)
            column = <double*> (<char*> tile + k * stride * sizeof(in_t))
            j0 = b * width
            n = min(width, d - j0)
            _gather(rows, k, j0, n, stride, tile)
            if network:
                jj = 0
                while jj < n:
                    _sort_lanes(tile + jj, pairs + 2 * first_pair, npairs)
                    jj = jj + NET_LANES
                if keep > 0:
                    for jj in range(n):
                        out[j0 + jj] = <out_t> _near_median_sorted(tile + jj, stride, k, keep)
                else:
                    _window_means(tile, stride, lo, hi, n, &out[j0])
            else:
                for jj in range(n):
                    for i in range(k):
                        column[i] = tile[i * stride + jj]
                    if keep > 0:
                        value = _mean_near_median(column, column + k, k, keep)
                    else:
                        value = _window_mean(column, column + k, k, lo, hi)
                    out[j0 + jj] = <out_t> value
    free(scratch)
    free(pairs)


# ---------------------------------------------------------------------------------------
# Tiles and distances

def gather_tile(updates, Py_ssize_t j0, bint center, tile) -> None:
    """tile[i] = x_i[j0 : j0 + n], or x_i - x_0 there (in float64, rounded once) if ``center``.

    Serial on purpose: a BLAS product follows each tile, and OpenMP threads left
    spinning after a parallel gather take the cores from BLAS's own threads (measured
    4x slower at K=100, D=1e6 than a serial gather).
    """
    _gather_tile(updates.pointers, updates.first, j0, center, tile)


cdef inline void _copy_run(const in_t* x, const in_t* base, bint center, in_t* dst,
                           Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    if center:
        for j in range(n):
            dst[j] = <in_t> (<double> x[j] - <double> base[j])
    else:
        memcpy(dst, x, n * sizeof(in_t))


def _gather_tile(const uintptr_t[::1] pointers, const in_t[::1] first, Py_ssize_t j0,
                 bint center, in_t[:, ::1] tile):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], n = tile.shape[1]
    cdef Py_ssize_t i
    with nogil:
        for i in range(k):
            _copy_run(rows[i] + j0, rows[0] + j0, center, &tile[i, 0], n)


cdef inline double _sq_diff(const in_t* x, const ref_t* y, Py_ssize_t n) noexcept nogil:
    """sum_j (x_j - y_j)^2 in float64, in LANES interleaved partial sums (a fixed order)."""
    cdef double s[LANES]
    cdef double t
    cdef Py_ssize_t j, u
    for u in range(LANES):
        s[u] = 0.0
    j = 0
    while j + LANES <= n:
        for u in range(LANES):
            t = <double> x[j + u] - <double> y[j + u]
            s[u] = s[u] + t * t
        j = j + LANES
    while j < n:
        t = <double> x[j] - <double> y[j]
        s[0] = s[0] + t * t
        j = j + 1
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


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


def sq_distances_to(updates, const double[::1] point, double[::1] out) -> None:
    """out[i] = sum_j (x_ij - point_j)^2 in float64: partial sums over fixed blocks in
    parallel, then added per row in block order."""
    _sq_distances_to(updates.pointers, updates.first, point, out)


def _sq_distances_to(const uintptr_t[::1] pointers, const in_t[::1] first,
                     const double[::1] point, double[::1] out):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK
    cdef double* partials = <double*> _scratch(k * nblocks * sizeof(double))
    cdef Py_ssize_t t, i, b, j0
    cdef double total
    with nogil:
        for t in prange(k * nblocks, schedule="static"):
            j0 = (t % nblocks) * NORM_BLOCK
            partials[t] = _sq_diff(rows[t // nblocks] + j0, &point[j0],
                                   min(<Py_ssize_t> NORM_BLOCK, d - j0))
        for i in range(k):
            total = 0.0
            for b in range(nblocks):
                total = total + partials[i * nblocks + b]
            out[i] = total
    free(partials)
