# Row loops shared by the families that sum or measure client rows (aggregate, privacy):
# `from _rows cimport add_rows, block_sq_norm, block_sq_norms8, sq_norm_partials, norms_from_partials`.
#
# Every sum runs in a fixed order, so results do not depend on the thread count: a
# weighted sum adds the rows in index order, a squared norm adds fixed NORM_BLOCK blocks
# in block order.
from cython.parallel cimport prange
from libc.math cimport sqrt

from _blocks cimport NORM_BLOCK, NORM_LANES  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t
from _openmp cimport fk_threads_for


cdef inline void _add_rows8(double* acc, const in_t** rows, const double* w, Py_ssize_t j0,
                            Py_ssize_t n) noexcept nogil:
    # Eight rows per pass over acc: eight read streams per thread keep the memory system
    # busier than four (measured on a Xeon with AVX-512: 15 -> 21 GB/s of the 24.5 a plain
    # read reaches, K=100 x D=1e6 on 2 threads), and an eighth of the accumulator traffic;
    # the same additions in the same order, so the result is unchanged.
    cdef const in_t* r0 = rows[0] + j0
    cdef const in_t* r1 = rows[1] + j0
    cdef const in_t* r2 = rows[2] + j0
    cdef const in_t* r3 = rows[3] + j0
    cdef const in_t* r4 = rows[4] + j0
    cdef const in_t* r5 = rows[5] + j0
    cdef const in_t* r6 = rows[6] + j0
    cdef const in_t* r7 = rows[7] + j0
    cdef double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7]
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = (((((((acc[j] + w0 * r0[j]) + w1 * r1[j]) + w2 * r2[j]) + w3 * r3[j]) + w4 * r4[j])
                  + w5 * r5[j]) + w6 * r6[j]) + w7 * r7[j]


cdef inline void _add_rows4(double* acc, const in_t* r0, const in_t* r1, const in_t* r2,
                            const in_t* r3, double w0, double w1, double w2, double w3,
                            Py_ssize_t n) noexcept nogil:
    # Four rows per pass over acc: a quarter of the accumulator loads and stores, and the
    # same additions in the same order as one row at a time, so the result is unchanged.
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = (((acc[j] + w0 * r0[j]) + w1 * r1[j]) + w2 * r2[j]) + w3 * r3[j]


cdef inline void _add_rows2(double* acc, const in_t* r0, const in_t* r1, double w0, double w1,
                            Py_ssize_t n) noexcept nogil:
    # the last two rows of a pass in one: K = 10 is one pass of eight and this, not three
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = (acc[j] + w0 * r0[j]) + w1 * r1[j]


cdef inline void _add_row(double* acc, const in_t* row, double w, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        acc[j] = acc[j] + w * row[j]


cdef inline void add_rows(double* acc, const in_t** rows, const double* weights, Py_ssize_t k,
                          Py_ssize_t j0, Py_ssize_t n) noexcept nogil:
    """acc[j] += sum_i weights[i] rows[i][j0 + j] for j < n, rows added in index order: eight
    per pass over acc, then the rest in passes of four, two and one."""
    cdef Py_ssize_t i = 0
    while i + 8 <= k:
        _add_rows8(acc, rows + i, weights + i, j0, n)
        i = i + 8
    if i + 4 <= k:
        _add_rows4(acc, rows[i] + j0, rows[i + 1] + j0, rows[i + 2] + j0, rows[i + 3] + j0,
                   weights[i], weights[i + 1], weights[i + 2], weights[i + 3], n)
        i = i + 4
    if i + 2 <= k:
        _add_rows2(acc, rows[i] + j0, rows[i + 1] + j0, weights[i], weights[i + 1], n)
        i = i + 2
    if i < k:
        _add_row(acc, rows[i] + j0, weights[i], n)


cdef inline double block_sq_norm(const in_t* x, Py_ssize_t n) noexcept nogil:
    """Sum of squares of x[:n] in float64."""
    # NORM_LANES interleaved partial sums in a fixed-size inner loop: the compiler keeps
    # them in vector registers, so the loop keeps up with memory (four scalar sums did not)
    cdef double lanes[NORM_LANES]
    cdef double total = 0.0
    cdef Py_ssize_t j, l
    for l in range(NORM_LANES):
        lanes[l] = 0.0
    j = 0
    while j + NORM_LANES <= n:
        for l in range(NORM_LANES):
            lanes[l] = lanes[l] + <double> x[j + l] * x[j + l]
        j = j + NORM_LANES
    while j < n:
        lanes[0] = lanes[0] + <double> x[j] * x[j]
        j = j + 1
    for l in range(NORM_LANES):
        total = total + lanes[l]
    return total


cdef inline void block_sq_norms8(const in_t** rows, Py_ssize_t j0, Py_ssize_t n, double* out,
                                 Py_ssize_t out_stride) noexcept nogil:
    """out[r * out_stride] = sum of squares of rows[r][j0 : j0 + n] for r < 8: block_sq_norm's
    sums bit for bit, the eight rows read in turn, NORM_LANES values at a time, so that each
    thread keeps eight read streams going."""
    cdef double lanes[8][NORM_LANES]
    cdef const in_t* x
    cdef double total
    cdef Py_ssize_t j, l, r
    for r in range(8):
        for l in range(NORM_LANES):
            lanes[r][l] = 0.0
    j = 0
    while j + NORM_LANES <= n:
        for r in range(8):
            x = rows[r] + j0 + j
            for l in range(NORM_LANES):
                lanes[r][l] = lanes[r][l] + <double> x[l] * x[l]
        j = j + NORM_LANES
    for r in range(8):
        x = rows[r] + j0
        for l in range(j, n):
            lanes[r][0] = lanes[r][0] + <double> x[l] * x[l]
        total = 0.0
        for l in range(NORM_LANES):
            total = total + lanes[r][l]
        out[r * out_stride] = total


cdef inline void sq_norm_partials(const in_t** rows, Py_ssize_t nrows, Py_ssize_t d,
                                  double* partials) noexcept nogil:
    """partials[i * nblocks + b] = squared norm of block b of rows[i], in parallel.

    Tasks of eight rows x one block: eight read streams per thread keep the memory system
    busier than one (as add_rows' eight-row passes do; one row per task reached about 60%
    of the read bandwidth on Zen 3). The last nrows % 8 rows go a block per task.
    """
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK, groups = nrows // 8
    cdef Py_ssize_t t, i, b
    cdef int nthreads = fk_threads_for(nrows * d * <Py_ssize_t> sizeof(in_t))
    for t in prange(groups * nblocks, schedule="static", num_threads=nthreads):
        i = 8 * (t // nblocks)
        b = t % nblocks
        block_sq_norms8(rows + i, b * NORM_BLOCK, min(<Py_ssize_t> NORM_BLOCK, d - b * NORM_BLOCK),
                        partials + i * nblocks + b, nblocks)
    for t in prange((nrows - 8 * groups) * nblocks, schedule="static", num_threads=nthreads):
        i = 8 * groups + t // nblocks
        b = t % nblocks
        partials[i * nblocks + b] = block_sq_norm(rows[i] + b * NORM_BLOCK,
                                                  min(<Py_ssize_t> NORM_BLOCK, d - b * NORM_BLOCK))


cdef inline void norms_from_partials(const double* partials, Py_ssize_t nrows, Py_ssize_t nblocks,
                                     double* norms) noexcept nogil:
    """norms[i] = sqrt of the sum of row i's block partials, in block order."""
    cdef Py_ssize_t i, b
    cdef double total
    for i in range(nrows):
        total = 0.0
        for b in range(nblocks):
            total = total + partials[i * nblocks + b]
        norms[i] = sqrt(total)
