"""Cython kernels of the built-in models of :mod:`fedkern.sim.models`.

Same kernels, arguments and math as ``fedkern._reference.models`` (a dense ReLU network
with layer widths ``sizes``, softmax cross-entropy, minibatch SGD with momentum, weight
decay and FedProx's proximal term); inputs are checked by the wrapper in
``fedkern.sim.models``. Parameters and inputs are read as float32, every operation runs in
float64, and the trained weights are rounded to float32 once.

Layout: each call copies the flat parameters (per layer ``W_l`` as (in, out) row-major,
then ``b_l``) into a float64 working vector with every output width padded to a multiple
of FK_LANES = 8 (zeros in the padding): row k of W_l and the bias are runs of whole
vectors. The momentum buffer and the start point share that layout, and so do the
activation rows. Padded lanes stay exactly zero: their weights, start point and gradient
are 0, so every step leaves them 0, and the loss reads only the real logits.

Speed without reassociation (results must not depend on fast-math flags, and setup.py
turns FMA contraction off): the loops are written in ``fk_v8``, eight float64 lanes with
element-wise add and multiply (C vector extensions, a plain loop elsewhere), each lane its
own sum in the scalar order, so the C compiler emits vector instructions and nothing else
changes. (Left to itself, GCC vectorised the loop over k of such sums as in-order
reductions, with permutes, slower than scalar.)

* forward: a tile of FK_BATCH_ROWS rows x 16 outputs, z[b, j:j+16] += a[b, k] W_l[k, j:j+16] for k
  in order, stays in registers; the bias is added after the sum, as the reference does;
* weight gradient and step, fused: a tile of up to FK_ROWS inputs x 16 outputs,
  g[k, j:j+16] += a[b, k] dz[b, j:j+16] for b in order, then the SGD step of those weights
  (a layer's input gradient is taken first, with its weights before the step);
* input gradient: da[b, k:k+8] = sum_j dz[b, j] W_l^T[j, k:k+8], j in order, from a
  transposed copy of W_l made before the step;
* softmax: exp(z - max z) by ``fk_exp``, eight lanes at a time over the whole batch
  (range reduction and a polynomial in plain adds and multiplies, within 1 ulp of libm's
  exp, the same bits everywhere), then e / sum e and the one-hot subtraction in vectors.

Summation orders differ from numpy's matmul (and fk_exp from numpy's exp by up to 1 ulp),
so results agree with the reference to float32 tolerance; they depend on the shapes only. The kernels are serial and release the
GIL: the simulator trains clients in parallel threads, one kernel call per client.
"""
from libc.math cimport log
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from libc.stdlib cimport free

cdef extern from *:
    """
    /* Eight float64 lanes, one element-wise operation at a time: each lane is its own sum,
       so results are those of the scalar loops whatever the vector width (the compiler
       splits a vector into the registers it has; contraction into FMA is off, setup.py). */
    #define FK_LANES 8
    /* Input rows per register tile of the weight step: FK_ROWS vectors of
       sums plus the loaded row stay in registers (16 on AVX2) and give the adds FK_ROWS
       independent chains, enough to cover their latency. (A size of the register tile of
       these helpers; src/fedkern/_blocks.py holds the block sizes of memory loops.) */
    #define FK_ROWS 4
    /* Batch rows per register tile of the forward pass: 5 x 2 vectors of sums (plus the two
       loaded) fit AVX-512's 32 registers and make the default batch of 10 two whole tiles;
       4 elsewhere. Any tile shape gives the same sums (each output's k loop is in order). */
    #if defined(__AVX512F__)
    #define FK_BATCH_ROWS 5
    #else
    #define FK_BATCH_ROWS 4
    #endif
    /* 1.5 2^52: x + FK_SHIFT - FK_SHIFT rounds x to an integer (|x| < 2^51), exactly. */
    #define FK_SHIFT 6755399441055744.0
    #include <string.h>
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
    /* Eight lanes are one AVX-512 register. */
    typedef double fk_v8 __attribute__((vector_size(FK_LANES * sizeof(double))));
    static inline fk_v8 fk_load(const double* p) { fk_v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
    static inline void fk_store(double* p, fk_v8 v) { __builtin_memcpy(p, &v, sizeof v); }
    static inline fk_v8 fk_zero(void) { fk_v8 v = {0.0}; return v; }
    static inline fk_v8 fk_splat(double s) { fk_v8 v = {s, s, s, s, s, s, s, s}; return v; }
    static inline fk_v8 fk_add(fk_v8 a, fk_v8 b) { return a + b; }
    static inline fk_v8 fk_mul(fk_v8 a, fk_v8 b) { return a * b; }
    static inline fk_v8 fk_div(fk_v8 a, fk_v8 b) { return a / b; }
    typedef long long fk_i8 __attribute__((vector_size(FK_LANES * sizeof(double))));
    static inline fk_i8 fk_lane_index(void) { fk_i8 i = {0, 1, 2, 3, 4, 5, 6, 7}; return i; }
    static inline fk_i8 fk_isplat(long long s) { fk_i8 v = {s, s, s, s, s, s, s, s}; return v; }
    /* x where a > 0, +0.0 elsewhere (a ReLU's derivative as a select) */
    static inline fk_v8 fk_where_positive(fk_v8 x, fk_v8 a) { return (fk_v8) ((fk_i8) x & (fk_i8) (a > fk_zero())); }
    /* a with lanes l >= count set to value */
    static inline fk_v8 fk_fill_from(fk_v8 a, long long count, double value) {
        fk_i8 keep = (fk_i8) (fk_lane_index() < fk_isplat(count));
        return (fk_v8) (((fk_i8) a & keep) | ((fk_i8) fk_splat(value) & ~keep));
    }
    /* value in lane l == lane (none if lane is not in 0..7), +0.0 elsewhere */
    static inline fk_v8 fk_onehot(long long lane, double value) { return (fk_v8) ((fk_i8) fk_splat(value) & (fk_i8) (fk_lane_index() == fk_isplat(lane))); }
    /* Lanes of a below lo become lo, above hi become hi; NaN stays NaN (the comparisons
       are false): a select on the comparison masks, no min/max whose NaN rule varies. */
    static inline fk_v8 fk_clamp(fk_v8 a, double lo, double hi) {
        fk_i8 low = (fk_i8) (a < fk_splat(lo)), high = (fk_i8) (a > fk_splat(hi));
        fk_i8 bits = ((fk_i8) a & ~(low | high)) | ((fk_i8) fk_splat(lo) & low) | ((fk_i8) fk_splat(hi) & high);
        return (fk_v8) bits;
    }
    /* a 2^n for integer-valued n in [-1076, 1023] and a in [0.5, 2] (NaN passes through):
       the two factors 2^floor(n/2), 2^(n - floor(n/2)) are normal doubles built from their
       exponent bits; the first product is exact, the second rounds once if subnormal. The
       integer n is read from the bits of n + 1.5 2^52 (exact, ulp 1), never converted, so
       a NaN lane cannot hit undefined behaviour. */
    static inline fk_v8 fk_scale(fk_v8 a, fk_v8 n) {
        fk_i8 k = (fk_i8) (n + fk_splat(FK_SHIFT)) - (fk_i8) fk_splat(FK_SHIFT);
        fk_i8 k1 = k >> 1, k2 = k - k1;
        return a * (fk_v8) ((k1 + 1023) << 52) * (fk_v8) ((k2 + 1023) << 52);
    }
    #elif defined(__GNUC__) || defined(__clang__)
    /* Without AVX-512, GCC 12 keeps a 64-byte vector in memory and builds it a lane at a
       time (scalar stores read back as one vector: store-forwarding stalls, 10x slower on
       Zen 3), so eight lanes are two halves of four, each one AVX register. */
    typedef double fk_v4 __attribute__((vector_size(4 * sizeof(double))));
    typedef long long fk_i4 __attribute__((vector_size(4 * sizeof(double))));
    typedef struct { fk_v4 lo, hi; } fk_v8;
    static inline fk_v8 fk_halves(fk_v4 lo, fk_v4 hi) { fk_v8 v; v.lo = lo; v.hi = hi; return v; }
    static inline fk_v4 fk_splat4(double s) { fk_v4 v = {s, s, s, s}; return v; }
    static inline fk_i4 fk_isplat4(long long s) { fk_i4 v = {s, s, s, s}; return v; }
    static inline fk_v4 fk_select4(fk_i4 mask, fk_v4 a, fk_v4 b) { return (fk_v4) (((fk_i4) a & mask) | ((fk_i4) b & ~mask)); }
    static inline fk_v8 fk_load(const double* p) {
        fk_v8 v; __builtin_memcpy(&v.lo, p, sizeof v.lo); __builtin_memcpy(&v.hi, p + 4, sizeof v.hi); return v;
    }
    static inline void fk_store(double* p, fk_v8 v) { __builtin_memcpy(p, &v.lo, sizeof v.lo); __builtin_memcpy(p + 4, &v.hi, sizeof v.hi); }
    static inline fk_v8 fk_zero(void) { return fk_halves(fk_splat4(0.0), fk_splat4(0.0)); }
    static inline fk_v8 fk_splat(double s) { return fk_halves(fk_splat4(s), fk_splat4(s)); }
    static inline fk_v8 fk_add(fk_v8 a, fk_v8 b) { return fk_halves(a.lo + b.lo, a.hi + b.hi); }
    static inline fk_v8 fk_mul(fk_v8 a, fk_v8 b) { return fk_halves(a.lo * b.lo, a.hi * b.hi); }
    static inline fk_v8 fk_div(fk_v8 a, fk_v8 b) { return fk_halves(a.lo / b.lo, a.hi / b.hi); }
    static inline fk_v8 fk_where_positive(fk_v8 x, fk_v8 a) {
        return fk_halves(fk_select4(a.lo > fk_splat4(0.0), x.lo, fk_splat4(0.0)), fk_select4(a.hi > fk_splat4(0.0), x.hi, fk_splat4(0.0)));
    }
    static inline fk_v8 fk_fill_from(fk_v8 a, long long count, double value) {
        fk_i4 lanes = {0, 1, 2, 3};
        return fk_halves(fk_select4(lanes < fk_isplat4(count), a.lo, fk_splat4(value)),
                         fk_select4(lanes + 4 < fk_isplat4(count), a.hi, fk_splat4(value)));
    }
    static inline fk_v8 fk_onehot(long long lane, double value) {
        fk_i4 lanes = {0, 1, 2, 3};
        return fk_halves(fk_select4(lanes == fk_isplat4(lane), fk_splat4(value), fk_splat4(0.0)),
                         fk_select4(lanes + 4 == fk_isplat4(lane), fk_splat4(value), fk_splat4(0.0)));
    }
    static inline fk_v4 fk_clamp4(fk_v4 a, double lo, double hi) {
        return fk_select4(a < fk_splat4(lo), fk_splat4(lo), fk_select4(a > fk_splat4(hi), fk_splat4(hi), a));
    }
    static inline fk_v8 fk_clamp(fk_v8 a, double lo, double hi) { return fk_halves(fk_clamp4(a.lo, lo, hi), fk_clamp4(a.hi, lo, hi)); }
    static inline fk_v4 fk_scale4(fk_v4 a, fk_v4 n) {
        fk_i4 k = (fk_i4) (n + fk_splat4(FK_SHIFT)) - (fk_i4) fk_splat4(FK_SHIFT);
        fk_i4 k1 = k >> 1, k2 = k - k1;
        return a * (fk_v4) ((k1 + 1023) << 52) * (fk_v4) ((k2 + 1023) << 52);
    }
    static inline fk_v8 fk_scale(fk_v8 a, fk_v8 n) { return fk_halves(fk_scale4(a.lo, n.lo), fk_scale4(a.hi, n.hi)); }
    #else
    typedef struct { double v[FK_LANES]; } fk_v8;
    static fk_v8 fk_load(const double* p) { fk_v8 r; int l; for (l = 0; l < FK_LANES; l++) r.v[l] = p[l]; return r; }
    static void fk_store(double* p, fk_v8 a) { int l; for (l = 0; l < FK_LANES; l++) p[l] = a.v[l]; }
    static fk_v8 fk_zero(void) { fk_v8 r = {{0.0}}; return r; }
    static fk_v8 fk_splat(double s) { fk_v8 r; int l; for (l = 0; l < FK_LANES; l++) r.v[l] = s; return r; }
    static fk_v8 fk_add(fk_v8 a, fk_v8 b) { int l; for (l = 0; l < FK_LANES; l++) a.v[l] += b.v[l]; return a; }
    static fk_v8 fk_mul(fk_v8 a, fk_v8 b) { int l; for (l = 0; l < FK_LANES; l++) a.v[l] *= b.v[l]; return a; }
    static fk_v8 fk_div(fk_v8 a, fk_v8 b) { int l; for (l = 0; l < FK_LANES; l++) a.v[l] /= b.v[l]; return a; }
    static fk_v8 fk_where_positive(fk_v8 x, fk_v8 a) { int l; for (l = 0; l < FK_LANES; l++) if (!(a.v[l] > 0.0)) x.v[l] = 0.0; return x; }
    static fk_v8 fk_fill_from(fk_v8 a, long long count, double value) { int l; for (l = 0; l < FK_LANES; l++) if (l >= count) a.v[l] = value; return a; }
    static fk_v8 fk_onehot(long long lane, double value) { fk_v8 r = {{0.0}}; if (lane >= 0 && lane < FK_LANES) r.v[lane] = value; return r; }
    static fk_v8 fk_clamp(fk_v8 a, double lo, double hi) {
        int l;
        for (l = 0; l < FK_LANES; l++) a.v[l] = a.v[l] < lo ? lo : (a.v[l] > hi ? hi : a.v[l]);
        return a;
    }
    static double fk_pow2(long long k) { unsigned long long bits = (unsigned long long) (k + 1023) << 52; double d; memcpy(&d, &bits, sizeof d); return d; }
    static fk_v8 fk_scale(fk_v8 a, fk_v8 n) {
        int l;
        for (l = 0; l < FK_LANES; l++) {
            double t = n.v[l] + FK_SHIFT, s = FK_SHIFT;
            long long bt, bs, k1, k2;
            memcpy(&bt, &t, sizeof t); memcpy(&bs, &s, sizeof s);
            k1 = (bt - bs) >> 1; k2 = (bt - bs) - k1;
            a.v[l] = a.v[l] * fk_pow2(k1) * fk_pow2(k2);
        }
        return a;
    }
    #endif
    /* exp(x) of each lane, for x <= 0 (what the softmax passes: z - max z), to about 1
       ulp; 0 below about -745.13 (and for -inf), NaN for NaN. Cody-Waite range reduction
       x = n ln2 + r, |r| <= ln2/2 (n ln2_hi is exact: ln2_hi has 32 significant bits,
       and x - n ln2_hi is exact), then the Taylor polynomial of degree 13 (its truncation
       error is below 0.05 ulp on that range), then the scaling by 2^n. Plain adds and
       multiplies in a fixed order: the same bits on every machine and build. */
    static inline fk_v8 fk_exp(fk_v8 x) {
        static const double inverse_factorial[12] = {
            1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
            1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
        fk_v8 n, r, p;
        int k;
        x = fk_clamp(x, -746.0, 709.0);  /* keeps n in fk_scale's range; exp(-746) rounds to 0 */
        n = fk_add(fk_add(fk_mul(x, fk_splat(1.4426950408889634)), fk_splat(FK_SHIFT)), fk_splat(-FK_SHIFT));
        r = fk_add(fk_add(x, fk_mul(n, fk_splat(-6.93147180369123816490e-01))), fk_mul(n, fk_splat(-1.90821492927058770002e-10)));
        p = fk_splat(inverse_factorial[11]);
        for (k = 10; k >= 0; k--)  /* p = 1/2! + r/3! + ... + r^11/13! */
            p = fk_add(fk_mul(p, r), fk_splat(inverse_factorial[k]));
        /* 1 + (r + r^2 p): the small part first, so its rounding error is far below 1 ulp */
        p = fk_add(fk_splat(1.0), fk_add(r, fk_mul(fk_mul(r, r), p)));
        return fk_scale(p, n);
    }
    """
    enum: FK_LANES, FK_ROWS, FK_BATCH_ROWS
    ctypedef struct fk_v8:
        pass
    fk_v8 fk_load(const double* p) noexcept nogil
    void fk_store(double* p, fk_v8 v) noexcept nogil
    fk_v8 fk_zero() noexcept nogil
    fk_v8 fk_splat(double s) noexcept nogil
    fk_v8 fk_add(fk_v8 a, fk_v8 b) noexcept nogil
    fk_v8 fk_mul(fk_v8 a, fk_v8 b) noexcept nogil
    fk_v8 fk_div(fk_v8 a, fk_v8 b) noexcept nogil
    fk_v8 fk_exp(fk_v8 x) noexcept nogil
    fk_v8 fk_fill_from(fk_v8 a, long long count, double value) noexcept nogil
    fk_v8 fk_where_positive(fk_v8 x, fk_v8 a) noexcept nogil
    fk_v8 fk_onehot(long long lane, double value) noexcept nogil
from _philox cimport Words4, philox_block
from _scratch cimport scratch

#: Rows per block of ``evaluate``: bounds its scratch whatever the number of rows.
cdef Py_ssize_t EVAL_ROWS = 256


cdef inline Py_ssize_t _padded(Py_ssize_t n) noexcept nogil:
    return (n + FK_LANES - 1) // FK_LANES * FK_LANES


cdef inline Py_ssize_t _tiled(Py_ssize_t rows) noexcept nogil:
    """Rows of an activation block holding ``rows`` rows: a multiple of FK_BATCH_ROWS, so
    the forward pass's last row tile stays inside (its spare rows are zeroed once)."""
    return (rows + FK_BATCH_ROWS - 1) // FK_BATCH_ROWS * FK_BATCH_ROWS


cdef class _Net:
    """The shapes of one network and their offsets in the padded layout (all in doubles).

    Layer l reads n_in[l] = sizes[l] inputs and writes padded[l] = padded(sizes[l + 1])
    outputs; its W_l starts at weights[l], its bias at weights[l] + n_in[l] padded[l]."""
    cdef Py_ssize_t layers, n_params, widest
    cdef Py_ssize_t* n_in
    cdef Py_ssize_t* n_out
    cdef Py_ssize_t* padded
    cdef Py_ssize_t* weights   # offset of W_l in the padded vector; weights[layers] = length
    cdef Py_ssize_t* flat      # offset of W_l in the flat float32 parameters

    def __cinit__(self, const int64_t[::1] sizes):
        cdef Py_ssize_t l
        self.layers = sizes.shape[0] - 1
        self.n_in = <Py_ssize_t*> scratch(5 * (self.layers + 1) * sizeof(Py_ssize_t))
        self.n_out = self.n_in + self.layers + 1
        self.padded = self.n_out + self.layers + 1
        self.weights = self.padded + self.layers + 1
        self.flat = self.weights + self.layers + 1
        self.weights[0] = 0
        self.flat[0] = 0
        self.widest = 0
        for l in range(self.layers):
            self.n_in[l] = sizes[l]
            self.n_out[l] = sizes[l + 1]
            self.padded[l] = _padded(sizes[l + 1])
            self.weights[l + 1] = self.weights[l] + (self.n_in[l] + 1) * self.padded[l]
            self.flat[l + 1] = self.flat[l] + (self.n_in[l] + 1) * self.n_out[l]
            self.widest = max(self.widest, self.padded[l])
        self.n_params = self.flat[self.layers]

    def __dealloc__(self):
        free(self.n_in)


cdef double* _aligned(void* block) noexcept nogil:
    """The first 64-byte boundary in ``block`` (allocated 64 bytes longer): whole vectors of
    a padded row then never straddle a cache line."""
    return <double*> ((<uintptr_t> block + 63) & ~(<uintptr_t> 63))


cdef inline Py_ssize_t _output_block(_Net net, Py_ssize_t rows, Py_ssize_t f, Py_ssize_t l) noexcept nogil:
    """Offset of layer l's (rows x padded[l]) output block in the activation scratch, after
    the input block (rows x f, its length padded so the blocks after it stay aligned);
    l = layers gives the scratch's length."""
    cdef Py_ssize_t i, offset = _padded(rows * f)
    for i in range(l):
        offset = offset + rows * net.padded[i]
    return offset


cdef inline Py_ssize_t _input_block(_Net net, Py_ssize_t rows, Py_ssize_t f, Py_ssize_t l) noexcept nogil:
    """Offset of the block layer l reads: the input for l = 0, else layer l - 1's output."""
    return 0 if l == 0 else _output_block(net, rows, f, l - 1)


cdef void _load(_Net net, const float* params, double* w) noexcept nogil:
    """w = params in the padded layout (float64), zeros in the padding."""
    cdef Py_ssize_t l, k, j, n_in, n_out, padded
    cdef const float* src
    cdef double* dst
    for l in range(net.layers):
        n_in, n_out, padded = net.n_in[l], net.n_out[l], net.padded[l]
        for k in range(n_in + 1):  # the bias is one more row
            src = params + net.flat[l] + k * n_out
            dst = w + net.weights[l] + k * padded
            for j in range(n_out):
                dst[j] = src[j]
            for j in range(n_out, padded):
                dst[j] = 0.0


cdef void _store_delta(_Net net, const double* w, const float* params, float* delta) noexcept nogil:
    """delta = float32(w) - params in the flat layout (a float32 subtraction)."""
    cdef Py_ssize_t l, k, j, n_in, n_out, padded
    cdef Py_ssize_t p
    for l in range(net.layers):
        n_in, n_out, padded = net.n_in[l], net.n_out[l], net.padded[l]
        for k in range(n_in + 1):
            p = net.flat[l] + k * n_out
            for j in range(n_out):
                delta[p + j] = <float> w[net.weights[l] + k * padded + j] - params[p + j]


cdef inline void _dense_tile(const double* W, Py_ssize_t n_in, Py_ssize_t padded, const double* a,
                             Py_ssize_t a_stride, double* z, bint relu, Py_ssize_t J) noexcept nogil:
    """z[r, :J*8] = a[r, :n_in] W[:, :J*8] + bias (then max(., 0) if ``relu``) for rows
    r < FK_BATCH_ROWS: FK_BATCH_ROWS x J vectors of sums in registers (J <= 2, a constant
    once inlined), each output summed over k in order. W, z point at the tile's first
    column. (Always FK_BATCH_ROWS rows: with the row count a parameter too, GCC kept the
    sums in memory.)"""
    cdef fk_v8 acc[2 * FK_BATCH_ROWS]
    cdef fk_v8 row0, row1
    cdef double v
    cdef Py_ssize_t k, r, l
    for r in range(FK_BATCH_ROWS * J):
        acc[r] = fk_zero()
    for k in range(n_in):
        row0 = fk_load(W + k * padded)
        if J == 2:
            row1 = fk_load(W + k * padded + FK_LANES)
        for r in range(FK_BATCH_ROWS):
            acc[J * r] = fk_add(acc[J * r], fk_mul(fk_splat(a[r * a_stride + k]), row0))
            if J == 2:
                acc[J * r + 1] = fk_add(acc[J * r + 1], fk_mul(fk_splat(a[r * a_stride + k]), row1))
    for r in range(FK_BATCH_ROWS):
        for l in range(J):  # the bias
            fk_store(z + r * padded + l * FK_LANES, fk_add(acc[J * r + l], fk_load(W + n_in * padded + l * FK_LANES)))
        if relu:
            for l in range(J * FK_LANES):
                v = z[r * padded + l]
                z[r * padded + l] = v if v > 0.0 else 0.0


cdef inline void _dense(const double* W, Py_ssize_t n_in, Py_ssize_t padded, const double* a,
                        Py_ssize_t a_stride, double* z, Py_ssize_t nb, bint relu) noexcept nogil:
    """One layer for rows 0..nb-1 (z rows have stride ``padded``, a rows ``a_stride``), in
    tiles of FK_BATCH_ROWS rows, 16 outputs per tile, then 8. The last tile may run past
    nb into the blocks' spare rows (``_tiled``): their outputs are computed, never read."""
    cdef Py_ssize_t b = 0, j
    while b < nb:
        j = 0
        while j + 2 * FK_LANES <= padded:
            _dense_tile(W + j, n_in, padded, a + b * a_stride, a_stride, z + b * padded + j, relu, 2)
            j = j + 2 * FK_LANES
        if j < padded:
            _dense_tile(W + j, n_in, padded, a + b * a_stride, a_stride, z + b * padded + j, relu, 1)
        b = b + FK_BATCH_ROWS


cdef void _forward(_Net net, const double* w, double* acts, Py_ssize_t f, Py_ssize_t rows,
                   Py_ssize_t nb) noexcept nogil:
    """Every layer of rows 0..nb-1 of the input block; the last output block holds the
    logits (no ReLU)."""
    cdef Py_ssize_t l
    for l in range(net.layers):
        _dense(w + net.weights[l], net.n_in[l], net.padded[l], acts + _input_block(net, rows, f, l),
               f if l == 0 else net.padded[l - 1], acts + _output_block(net, rows, f, l), nb,
               l < net.layers - 1)


cdef inline double _row_max(const double* z, Py_ssize_t n_out) noexcept nogil:
    """max_j z[j] over the real outputs (the first of the NaN-free comparisons)."""
    cdef double m = z[0]
    cdef Py_ssize_t j
    for j in range(n_out):
        m = z[j] if z[j] > m else m
    return m


cdef void _shifted_exp(const double* logits, Py_ssize_t n_out, Py_ssize_t padded, Py_ssize_t nb,
                       double* e) noexcept nogil:
    """e[b, j] = exp(z[b, j] - m_b), m_b = max_j z[b, j], for rows b < nb; +0.0 in the padding.
    All the rows' shifted logits first, then one pass of fk_exp over the block: its vectors
    are independent, so the CPU overlaps their long dependency chains (a row at a time,
    the polynomial's latency set the pace). The padding goes through the exp as 0 and is
    cleared after it: an exp that underflows costs a microcode assist on x86 (a subnormal
    or zero product), so it must not happen in every row's padding."""
    cdef fk_v8 shift
    cdef Py_ssize_t b, j, i
    for b in range(nb):
        shift = fk_splat(-_row_max(logits + b * padded, n_out))
        j = 0
        while j < padded:
            i = b * padded + j
            fk_store(e + i, fk_fill_from(fk_add(fk_load(logits + i), shift), n_out - j, 0.0))
            j = j + FK_LANES
    for b in range(nb):
        j = 0
        while j < padded:
            i = b * padded + j
            fk_store(e + i, fk_fill_from(fk_exp(fk_load(e + i)), n_out - j, 0.0))
            j = j + FK_LANES


cdef inline double _row_loss(const double* z, const double* e, Py_ssize_t n_out, int32_t label,
                             double* sum_e) noexcept nogil:
    """Cross-entropy log(sum_j exp(z_j - m)) - (z_label - m), m = max z, given the row's
    e = exp(z - m) of ``_shifted_exp``; their sum, j in order, goes to ``sum_e``."""
    cdef double total = 0.0
    cdef Py_ssize_t j
    for j in range(n_out):
        total = total + e[j]
    sum_e[0] = total
    # checked, so that a bad label cannot read out of bounds
    return log(total) - (z[label] - _row_max(z, n_out) if 0 <= label < n_out else 0.0)


cdef double _softmax_grad(_Net net, const double* logits, const int32_t* y, const int64_t* rows,
                          Py_ssize_t nb, double* dz) noexcept nogil:
    """Mean loss of the batch; dz[b, :] = (softmax - onehot(label)) / nb, padding zero, in
    the reference's order: p = e / sum e, p_label - 1, times 1/nb (an exact + 0.0 in the
    other lanes)."""
    cdef Py_ssize_t l = net.layers - 1, n_out = net.n_out[l], padded = net.padded[l]
    cdef Py_ssize_t b, j
    cdef double total = 0.0, sum_e
    cdef fk_v8 scale = fk_splat(1.0 / nb), sums
    cdef double* d
    cdef int32_t label
    _shifted_exp(logits, n_out, padded, nb, dz)
    for b in range(nb):
        d = dz + b * padded
        label = y[rows[b]]
        total = total + _row_loss(logits + b * padded, d, n_out, label, &sum_e)
        sums = fk_splat(sum_e)
        j = 0
        while j < padded:
            fk_store(d + j, fk_mul(fk_add(fk_div(fk_load(d + j), sums), fk_onehot(label - j, -1.0)), scale))
            j = j + FK_LANES
    return total / nb


cdef struct _Sgd:
    double lr, momentum, weight_decay, mu
    # where SCAFFOLD's correction lies from the start weights, in doubles (0: no correction):
    # a fixed distance in the training block, so the step finds it from W0 alone
    Py_ssize_t correction


cdef inline void _step(double* W, double* V, const double* W0, fk_v8 g, _Sgd h) noexcept nogil:
    """One vector of the SGD step given its gradient sum g: g += weight_decay w +
    mu (w - w0) (+ the correction c - c_i); v = momentum v + g; w -= lr v."""
    cdef fk_v8 w = fk_load(W), v
    # w - w0 as w + (-1) w0 and w - lr v as w + (-lr) v: exact rewrites of the
    # subtractions (negation is exact), so the helpers need no subtraction
    cdef fk_v8 d = fk_add(fk_mul(fk_splat(h.weight_decay), w),
                          fk_mul(fk_splat(h.mu), fk_add(w, fk_mul(fk_splat(-1.0), fk_load(W0)))))
    g = fk_add(g, d)
    if h.correction:
        g = fk_add(g, fk_load(W0 + h.correction))
    v = fk_add(fk_mul(fk_splat(h.momentum), fk_load(V)), g)
    fk_store(V, v)
    fk_store(W, fk_add(w, fk_mul(fk_splat(-h.lr), v)))


cdef inline void _update_tile(double* W, double* V, const double* W0, Py_ssize_t padded, const double* a,
                              Py_ssize_t a_stride, const double* dz, Py_ssize_t nb, _Sgd h,
                              Py_ssize_t R, Py_ssize_t J) noexcept nogil:
    """The SGD step of weight rows r < R, columns :J*8 (R <= FK_ROWS, J <= 2, constants once
    inlined) with gradient g[r, :] = sum_b a[b, r] dz[b, :], b in order: R x J vectors of
    sums in registers, each a[b, r] loaded once for its J vectors. W, V, W0 and dz point at
    the tile's first column."""
    cdef fk_v8 acc[2 * FK_ROWS]
    cdef fk_v8 d0, d1, s
    cdef Py_ssize_t b, r, l
    for r in range(R * J):
        acc[r] = fk_zero()
    for b in range(nb):
        d0 = fk_load(dz + b * padded)
        if J == 2:
            d1 = fk_load(dz + b * padded + FK_LANES)
        for r in range(R):
            s = fk_splat(a[b * a_stride + r])
            acc[J * r] = fk_add(acc[J * r], fk_mul(s, d0))
            if J == 2:
                acc[J * r + 1] = fk_add(acc[J * r + 1], fk_mul(s, d1))
    for r in range(R):
        for l in range(J):
            _step(W + r * padded + l * FK_LANES, V + r * padded + l * FK_LANES, W0 + r * padded + l * FK_LANES,
                  acc[J * r + l], h)


cdef inline void _update_rows(double* W, double* V, const double* W0, Py_ssize_t padded, const double* a,
                              Py_ssize_t a_stride, const double* dz, Py_ssize_t nb, _Sgd h,
                              Py_ssize_t R) noexcept nogil:
    """The SGD step of weight rows r < R of a layer, 16 columns per tile, then 8."""
    cdef Py_ssize_t j = 0
    while j + 2 * FK_LANES <= padded:
        _update_tile(W + j, V + j, W0 + j, padded, a, a_stride, dz + j, nb, h, R, 2)
        j = j + 2 * FK_LANES
    if j < padded:
        _update_tile(W + j, V + j, W0 + j, padded, a, a_stride, dz + j, nb, h, R, 1)


cdef inline void _update_layer(double* W, double* V, const double* W0, Py_ssize_t n_in, Py_ssize_t padded,
                               const double* a, Py_ssize_t a_stride, const double* dz, Py_ssize_t nb,
                               _Sgd h) noexcept nogil:
    """The SGD step of one layer (weights in tiles of FK_ROWS input rows, then the bias,
    whose gradient is sum_b dz[b, :]: the same loop with a = 1)."""
    cdef double one = 1.0
    cdef Py_ssize_t k = 0, o
    while k + FK_ROWS <= n_in:
        o = k * padded
        _update_rows(W + o, V + o, W0 + o, padded, a + k, a_stride, dz, nb, h, FK_ROWS)
        k = k + FK_ROWS
    while k < n_in:
        o = k * padded
        _update_rows(W + o, V + o, W0 + o, padded, a + k, a_stride, dz, nb, h, 1)
        k = k + 1
    o = n_in * padded
    _update_rows(W + o, V + o, W0 + o, padded, &one, 0, dz, nb, h, 1)


cdef void _transpose(const double* W, Py_ssize_t n_in, Py_ssize_t padded, Py_ssize_t n_out,
                     Py_ssize_t in_padded, double* WT) noexcept nogil:
    """WT[j, k] = W[k, j] (rows j < n_out of stride in_padded), zeros for k in n_in ..
    in_padded: the layout in which the input gradient is a sum of whole vectors."""
    cdef Py_ssize_t j, k
    for j in range(n_out):
        for k in range(n_in):
            WT[j * in_padded + k] = W[k * padded + j]
        for k in range(n_in, in_padded):
            WT[j * in_padded + k] = 0.0


cdef inline void _backprop(const double* WT, Py_ssize_t n_out, const double* a, Py_ssize_t a_stride,
                           const double* dz, Py_ssize_t padded, Py_ssize_t nb, double* da) noexcept nogil:
    """da[b, k] = (sum_j dz[b, j] W[k, j]) * (a[b, k] > 0), j in order, given WT = W^T of
    ``_transpose``: the gradient at the ReLU output a that fed this layer, zeros in its
    padding (a's padding is 0; da rows have stride a_stride). Eight k at a time, a vector
    of sums over the real outputs j (a horizontal sum per k would cost more than the
    sums themselves); the mask is a select, not a branch, since a > 0 about half the
    time, at random."""
    cdef fk_v8 acc
    cdef const double* d
    cdef Py_ssize_t b, k, j
    for b in range(nb):
        d = dz + b * padded
        k = 0
        while k < a_stride:
            acc = fk_mul(fk_splat(d[0]), fk_load(WT + k))
            for j in range(1, n_out):
                acc = fk_add(acc, fk_mul(fk_splat(d[j]), fk_load(WT + j * a_stride + k)))
            fk_store(da + b * a_stride + k, fk_where_positive(acc, fk_load(a + b * a_stride + k)))
            k = k + FK_LANES


cdef void _backward_step(_Net net, double* w, double* velocity, const double* start, const double* acts,
                         Py_ssize_t f, Py_ssize_t rows, Py_ssize_t nb, double* dz, double* da, double* WT,
                         _Sgd h) noexcept nogil:
    """The SGD step of every layer, from the top, given dz = d(mean loss)/d logits: layer l's
    input gradient is taken (with its weights before the step, transposed into WT) before
    its step; dz and da swap roles at each layer."""
    cdef Py_ssize_t l, stride, o
    cdef const double* a
    cdef double* swap
    for l in range(net.layers - 1, -1, -1):
        stride = f if l == 0 else net.padded[l - 1]
        a = acts + _input_block(net, rows, f, l)
        o = net.weights[l]
        if l > 0:
            _transpose(w + o, net.n_in[l], net.padded[l], net.n_out[l], stride, WT)
            _backprop(WT, net.n_out[l], a, stride, dz, net.padded[l], nb, da)
        _update_layer(w + o, velocity + o, start + o, net.n_in[l], net.padded[l], a, stride, dz, nb, h)
        if l > 0:
            swap = dz
            dz = da
            da = swap


cdef Py_ssize_t _transposed_length(_Net net) noexcept nogil:
    """Doubles of the largest W^T that ``_backprop`` reads (layers 1 .. layers - 1)."""
    cdef Py_ssize_t l, length = 0
    for l in range(1, net.layers):
        length = max(length, net.n_out[l] * net.padded[l - 1])
    return length


cdef void _gather(const float* x, Py_ssize_t f, const int64_t* rows, Py_ssize_t nb, double* a) noexcept nogil:
    cdef Py_ssize_t b, k
    cdef const float* src
    for b in range(nb):
        src = x + rows[b] * f
        for k in range(f):
            a[b * f + k] = src[k]


def shuffle(uint64_t seed, int64_t[:, ::1] order) -> None:
    """order[e] = epoch e's Fisher-Yates permutation of 0 .. n - 1; see
    ``fedkern._reference.models.shuffle`` (the same words of the same streams)."""
    cdef Py_ssize_t n = order.shape[1], e, i, j
    cdef uint64_t b, bound, m, low
    cdef int used
    cdef Words4 words
    cdef int64_t* row
    if n == 0:
        return
    with nogil:
        for e in range(order.shape[0]):
            row = &order[e, 0]
            for i in range(n):
                row[i] = i
            b, used = 0, 4
            for i in range(n - 1, 0, -1):
                bound = i + 1
                while True:
                    if used == 4:
                        words = philox_block(seed, e, b)
                        b, used = b + 1, 0
                    m = words.x[used] * bound
                    used = used + 1
                    low = m & 0xFFFFFFFFU
                    # the rejection rule of Lemire's method: low < 2**32 mod bound (tested
                    # only when low < bound, which it implies, to skip the division)
                    if low >= bound or low >= (<uint64_t> 1 << 32) % bound:
                        break
                j = <Py_ssize_t> (m >> 32)
                row[i], row[j] = row[j], row[i]


def train(const float[::1] params, const int64_t[::1] sizes, const float[:, ::1] x, const int32_t[::1] y,
          const int64_t[:, ::1] order, Py_ssize_t batch_size, double lr, double momentum,
          double weight_decay, double mu, const float[::1] correction, float[::1] delta_out) -> float:
    """Minibatch SGD from ``params`` over the row order (epochs, n); delta_out =
    float32(w_final) - params; returns the sum over steps of each step's mean batch
    cross-entropy (taken before the step); ``correction`` (like params, or None) is added
    to every gradient. See ``fedkern._reference.models.train``."""
    cdef _Net net = _Net(sizes)
    cdef Py_ssize_t n = x.shape[0], f = x.shape[1], epochs = order.shape[0]
    cdef Py_ssize_t rows = min(batch_size, n), tiled = _tiled(rows)
    cdef Py_ssize_t p = net.weights[net.layers]
    cdef Py_ssize_t n_acts = _output_block(net, tiled, f, net.layers)
    cdef Py_ssize_t n_dz = _padded(rows * net.widest)
    cdef Py_ssize_t n_wt = _transposed_length(net)
    cdef void* block = scratch((4 * p + n_acts + 2 * n_dz + n_wt + 8) * sizeof(double))
    cdef double* w = _aligned(block)
    cdef double* start_w = w + p
    cdef double* velocity = start_w + p
    cdef double* shift = velocity + p             # start_w + 2p: _Sgd.correction
    cdef double* dz = shift + p
    cdef double* da = dz + n_dz
    cdef double* acts = da + n_dz
    cdef double* logits = acts + _output_block(net, tiled, f, net.layers - 1)
    cdef double* WT = acts + n_acts
    cdef _Sgd h = _Sgd(lr, momentum, weight_decay, mu, 0 if correction is None else 2 * p)
    cdef double total = 0.0
    cdef Py_ssize_t e, s, nb, i
    cdef const int64_t* batch
    with nogil:
        _load(net, &params[0], start_w)
        if h.correction:
            _load(net, &correction[0], shift)
        for i in range(p):
            w[i] = start_w[i]
            velocity[i] = 0.0
        for i in range(n_acts):  # the rows past a batch's end stay finite
            acts[i] = 0.0
        for e in range(epochs):
            s = 0
            while s < n:
                nb = min(rows, n - s)
                batch = &order[e, s]
                _gather(&x[0, 0], f, batch, nb, acts)
                _forward(net, w, acts, f, tiled, nb)
                total = total + _softmax_grad(net, logits, &y[0], batch, nb, dz)
                _backward_step(net, w, velocity, start_w, acts, f, tiled, nb, dz, da, WT, h)
                s = s + nb
        _store_delta(net, w, &params[0], &delta_out[0])
    free(block)
    return total


def evaluate(const float[::1] params, const int64_t[::1] sizes, const float[:, ::1] x, const int32_t[::1] y,
             int64_t[::1] predictions) -> float:
    """Summed cross-entropy over the rows; predictions[i] = argmax of row i's logits (the
    first maximum on ties). Rows go through in blocks of EVAL_ROWS to bound the scratch."""
    cdef Py_ssize_t n = x.shape[0], f = x.shape[1]
    if n == 0:
        return 0.0
    cdef _Net net = _Net(sizes)
    cdef Py_ssize_t rows = min(EVAL_ROWS, n), tiled = _tiled(rows)
    cdef Py_ssize_t p = net.weights[net.layers], last = net.layers - 1
    cdef Py_ssize_t n_out = net.n_out[last], padded = net.padded[last]
    cdef Py_ssize_t n_acts = _output_block(net, tiled, f, net.layers)
    cdef void* block = scratch((p + rows * padded + n_acts + 8) * sizeof(double))
    cdef double* w = _aligned(block)
    cdef double* e = w + p
    cdef double* acts = e + rows * padded
    cdef double* logits = acts + _output_block(net, tiled, f, last)
    cdef double* z
    cdef double total = 0.0, sum_e
    cdef Py_ssize_t s, nb, b, j, best
    with nogil:
        _load(net, &params[0], w)
        for b in range(n_acts):  # the rows past a block's end stay finite
            acts[b] = 0.0
        s = 0
        while s < n:
            nb = min(rows, n - s)
            for b in range(nb):
                for j in range(f):
                    acts[b * f + j] = x[s + b, j]
            _forward(net, w, acts, f, tiled, nb)
            _shifted_exp(logits, n_out, padded, nb, e)
            for b in range(nb):
                z = logits + b * padded
                total = total + _row_loss(z, e + b * padded, n_out, y[s + b], &sum_e)
                best = 0
                for j in range(n_out):
                    if z[j] > z[best]:
                        best = j
                predictions[s + b] = best
            s = s + nb
    free(block)
    return total


def _exp(const double[::1] x, double[::1] out) -> None:
    """out = fk_exp(x), the softmax's exponential (for the tests: its accuracy against
    libm's exp); len(x) must be a multiple of FK_LANES = 8."""
    cdef Py_ssize_t i = 0
    if x.shape[0] % FK_LANES or out.shape[0] != x.shape[0]:
        raise ValueError("x and out must have the same length, a multiple of 8")
    with nogil:
        while i < x.shape[0]:
            fk_store(&out[i], fk_exp(fk_load(&x[i])))
            i = i + FK_LANES
