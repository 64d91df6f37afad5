"""Cython/OpenMP kernels of the aggregation family.

Same kernels and arguments as ``fedkern._reference.aggregate``; inputs are validated by
``fedkern._validate``. Client rows are read through ``updates.pointers`` (one address per
row), so a sequence of arrays is never stacked. Work is split over coordinates in
fixed-size chunks and every sum over clients or over a row runs in a fixed order, so
results do not depend on the number of threads.
"""
from cython.parallel cimport prange, threadid
from libc.math cimport frexp, isfinite
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free

from _blocks cimport NORM_BLOCK  # sizes, and why: src/fedkern/_blocks.py
from _fused cimport in_t, out_t
from _openmp cimport fk_threads_for
from _rows cimport add_rows, norms_from_partials, sq_norm_partials
from _scratch cimport scratch

from fedkern._tuning import group_bytes, sum_chunk


def weighted_sum(updates, const double[::1] weights, double divisor, out) -> int:
    """out = (sum_i weights[i] * updates[i]) / divisor; return the number of non-finite outputs."""
    return _weighted_sum(updates.pointers, updates.first, weights, divisor, sum_chunk(updates.d), out)


def _weighted_sum(const uintptr_t[::1] pointers, const in_t[::1] first,
                  const double[::1] weights, double divisor, Py_ssize_t chunk, out_t[::1] out):
    """Per chunk of coordinates (fedkern._tuning.sum_chunk), the rows added into a thread's
    float64 accumulator in index order, then divided and rounded once."""
    # dividing by a power of two is multiplying by its exact reciprocal, and much cheaper
    cdef int exponent
    cdef bint by_reciprocal = frexp(divisor, &exponent) == 0.5
    cdef double reciprocal = 1.0 / divisor
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nchunks = (d + chunk - 1) // chunk
    cdef int nthreads = fk_threads_for(k * d * <Py_ssize_t> sizeof(in_t))
    cdef double* accumulators = <double*> scratch(nthreads * chunk * sizeof(double))
    cdef double* acc
    cdef out_t value
    cdef Py_ssize_t c, j, j0, n, nonfinite = 0
    with nogil:
        for c in prange(nchunks, schedule="static", num_threads=nthreads):
            acc = accumulators + threadid() * chunk
            j0 = c * chunk
            n = min(chunk, d - j0)
            for j in range(n):
                acc[j] = 0.0
            add_rows(acc, rows, &weights[0], k, j0, n)
            for j in range(n):
                # the float64 sum is divided, then rounded once
                value = <out_t> (acc[j] * reciprocal if by_reciprocal else acc[j] / divisor)
                out[j0 + j] = value
                if not isfinite(value):
                    nonfinite += 1
    free(accumulators)
    return nonfinite


def accumulate(acc, update, double weight) -> None:
    """acc += weight * update, computed in float64."""
    _accumulate(acc, update, weight)


def _accumulate(out_t[::1] acc, const in_t[::1] update, double weight):
    cdef Py_ssize_t j, d = acc.shape[0]
    cdef int nthreads = fk_threads_for(d * <Py_ssize_t> (sizeof(in_t) + sizeof(out_t)))
    with nogil:
        for j in prange(d, schedule="static", num_threads=nthreads):
            acc[j] = <out_t> (acc[j] + weight * update[j])


def count_nonfinite(values) -> int:
    """Number of NaN and infinite entries of a 1-D array."""
    return _count_nonfinite(values)


def _count_nonfinite(const in_t[::1] values):
    cdef Py_ssize_t j, d = values.shape[0], count = 0
    cdef int nthreads = fk_threads_for(d * <Py_ssize_t> sizeof(in_t))
    with nogil:
        for j in prange(d, schedule="static", num_threads=nthreads):
            if not isfinite(values[j]):
                count += 1
    return count


def l2_norms(updates, double[::1] norms) -> None:
    """norms[i] = sqrt(sum_j updates[i, j]**2), in float64."""
    _l2_norms(updates.pointers, updates.first, norms)


def _l2_norms(const uintptr_t[::1] pointers, const in_t[::1] first, double[::1] norms):
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK
    cdef double* partials = <double*> scratch(k * nblocks * sizeof(double))
    with nogil:
        sq_norm_partials(<const in_t**> &pointers[0], k, d, partials)
        norms_from_partials(partials, k, nblocks, &norms[0])
    free(partials)


def clip_by_norm(updates, double max_norm, out, double[::1] norms) -> None:
    """out[i] = updates[i] * min(1, max_norm / ||updates[i]||); norms get the norms.

    Rows are processed in groups of about fedkern._tuning.group_bytes(), norms then scaling, so the
    second read of a group comes from cache when it fits.
    """
    _clip_by_norm(updates.pointers, updates.first, max_norm, out.pointers, norms)


def _clip_by_norm(const uintptr_t[::1] pointers, const in_t[::1] first, double max_norm,
                  const uintptr_t[::1] out_pointers, double[::1] norms):
    cdef const in_t** rows = <const in_t**> &pointers[0]
    cdef in_t** out_rows = <in_t**> &out_pointers[0]
    cdef Py_ssize_t k = pointers.shape[0], d = first.shape[0]
    cdef Py_ssize_t nblocks = (d + NORM_BLOCK - 1) // NORM_BLOCK
    cdef Py_ssize_t group = max(1, group_bytes() // (d * <Py_ssize_t> sizeof(in_t)))
    cdef double* partials = <double*> scratch(min(group, k) * nblocks * sizeof(double))
    cdef double* scales = <double*> scratch(min(group, k) * sizeof(double))
    cdef Py_ssize_t g0, g, i, t, j, j0, n
    cdef double scale
    with nogil:
        g0 = 0
        while g0 < k:
            g = min(group, k - g0)
            sq_norm_partials(rows + g0, g, d, partials)
            norms_from_partials(partials, g, nblocks, &norms[g0])
            for i in range(g):
                scales[i] = max_norm / norms[g0 + i] if norms[g0 + i] > max_norm else 1.0
            for t in prange(g * nblocks, schedule="static", num_threads=fk_threads_for(g * d * <Py_ssize_t> sizeof(in_t))):
                i = t // nblocks
                j0 = (t % nblocks) * NORM_BLOCK
                n = min(<Py_ssize_t> NORM_BLOCK, d - j0)
                scale = scales[i]
                for j in range(j0, j0 + n):
                    out_rows[g0 + i][j] = <in_t> (scale * rows[g0 + i][j])
            g0 = g0 + g
    free(partials)
    free(scales)
