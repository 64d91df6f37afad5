"""Numba kernels of the built-in models of :mod:`fedkern.sim.models`.

One dense network covers both models: layer widths ``sizes = [F, h_1, ..., h_m, C]``
(``m = 0`` is multinomial logistic regression), ReLU after each hidden layer, softmax
cross-entropy on the output. The parameters are one flat float32 vector holding, layer
after layer, ``W_l`` (``sizes[l] x sizes[l + 1]``, row-major) then ``b_l``; the kernels
copy them once per call into a float64 working vector with each ``W_l`` transposed to
(out, in), so that every row W_l[j, :] is contiguous over the layer's inputs.

Precision: parameters and inputs are read as float32 and every operation runs in
float64 (the working copy of the weights, the momentum buffer, activations, gradients
and sums), rounded to float32 once at the end. ``fedkern._reference.models`` does the
same math in numpy, so the two backends differ only by float64 summation order.
float32 scratch was not used: the loops below are bound by their count and overheads,
not by the width of the data.

Speed (a batch is tiny: 10 rows x 60 features in FedProx's protocols, so loop
overheads, not arithmetic, decide):

* every buffer is a flat 1-D array indexed by explicit arithmetic and allocated once
  per call; no array view is made inside a loop, and the loop helpers are inlined
  (``inline="always"``): views and calls between compiled functions update reference
  counts with atomic operations;
* indices are uint64: Numba maps a negative signed index to ``i + len``, and that select
  makes the addresses non-affine, so LLVM then either keeps a loop scalar or uses
  gathers and scatters. (uint64 mixed with int64 is float64 in Numba, and with an int
  literal int64, so constants in index expressions are written ``np.uint64(c)``);
* the backward loops are axpys over a layer's inputs, gW_l[j, :] += dz[b, j] a[b, :]
  and da[b, :] += dz[b, j] W_l[j, :]: contiguous, one independent sum per element, so
  LLVM vectorises them without reassociating anything;
* the forward pass is a reduction per output, z[b, j] = a[b, :] . W_l[j, :], which
  cannot vectorise without reassociation (no fastmath: results must not depend on
  flags), so it runs in four interleaved partial sums, two outputs per loop for more
  independent chains;
* the step is one fused contiguous loop over the parameters.

The kernels are ``njit(cache=True, nogil=True)`` and serial: the simulator runs clients
in parallel threads, one kernel call per client, so the GIL must be released but a
parallel kernel would only fight for the cores. Labels are compared, never used as
indices, so an out-of-range label cannot read out of bounds; the wrapper rejects them
anyway.
"""
import numpy as np
from numba import njit

from ._philox import philox_block

KERNEL = dict(cache=True, nogil=True)
#: The loop helpers are inlined into the kernels: a call between compiled functions
#: passes every array as a struct and updates its reference count (atomic operations).
HELPER = dict(KERNEL, inline="always")


@njit(**KERNEL)
def _offsets(dims):
    """Start of each layer's ``W_l`` in the parameter vector (uint64); the last entry is
    n_params. ``dims`` are the layer widths as uint64."""
    layers = dims.shape[0] - 1
    offsets = np.zeros(layers + 1, np.uint64)
    for l in range(layers):
        offsets[l + 1] = offsets[l] + (dims[l] + np.uint64(1)) * dims[l + 1]
    return offsets


@njit(**KERNEL)
def _blocks(dims, batch):
    """Start of each layer's (batch, dims[l]) activation block in the flat scratch
    ``acts`` (uint64): row b of layer l starts at blocks[l] + b dims[l]. The last entry
    is the scratch's length."""
    blocks = np.zeros(dims.shape[0] + 1, np.uint64)
    for l in range(dims.shape[0]):
        blocks[l + 1] = blocks[l] + batch * dims[l]
    return blocks


@njit(**KERNEL)
def _to_kernel_layout(params, dims, offsets, w):
    """w (float64) = params with each W_l transposed to (out, in); biases as they are."""
    for l in range(dims.shape[0] - 1):
        n_in = dims[l]
        n_out = dims[l + 1]
        p = offsets[l]
        for k in range(n_in):
            for j in range(n_out):
                w[p + j * n_in + k] = params[p + k * n_out + j]
        for i in range(p + n_in * n_out, offsets[l + 1]):
            w[i] = params[i]


@njit(**KERNEL)
def _from_kernel_layout(w, dims, offsets, params):
    """The inverse of :func:`_to_kernel_layout`, rounding: params = float32(w) with each
    W_l back to (in, out)."""
    for l in range(dims.shape[0] - 1):
        n_in = dims[l]
        n_out = dims[l + 1]
        p = offsets[l]
        for k in range(n_in):
            for j in range(n_out):
                params[p + k * n_out + j] = w[p + j * n_in + k]
        for i in range(p + n_in * n_out, offsets[l + 1]):
            params[i] = w[i]


@njit(**HELPER)
def _gather(x, rows, start, nb, acts):
    """Input block of ``acts`` = the rows rows[start:start + nb] of x, in float64."""
    n_features = np.uint64(x.shape[1])
    for b in range(nb):
        row = rows[start + b]
        for f in range(n_features):
            acts[b * n_features + f] = x[row, f]


@njit(**HELPER)
def _dot(u, pu, v, pv, n):
    """sum_k u[pu + k] v[pv + k] in four interleaved partial sums (k = 4i + lane),
    combined as (s0 + s1) + (s2 + s3), then the tail: four independent chains instead
    of one (a reduction does not vectorise without fastmath)."""
    n4 = n - n % np.uint64(4)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for i in range(np.uint64(0), n4, np.uint64(4)):
        s0 += u[pu + i] * v[pv + i]
        s1 += u[pu + i + np.uint64(1)] * v[pv + i + np.uint64(1)]
        s2 += u[pu + i + np.uint64(2)] * v[pv + i + np.uint64(2)]
        s3 += u[pu + i + np.uint64(3)] * v[pv + i + np.uint64(3)]
    s = (s0 + s1) + (s2 + s3)
    for k in range(n4, n):
        s += u[pu + k] * v[pv + k]
    return s


@njit(**HELPER)
def _dot2(u, pu, v, pv, pv2, n):
    """(u . v[pv:], u . v[pv2:]) over n entries, each summed exactly as :func:`_dot` does,
    in one loop: eight independent chains instead of four, and u read once."""
    n4 = n - n % np.uint64(4)
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    t0 = 0.0
    t1 = 0.0
    t2 = 0.0
    t3 = 0.0
    for i in range(np.uint64(0), n4, np.uint64(4)):
        u0 = u[pu + i]
        u1 = u[pu + i + np.uint64(1)]
        u2 = u[pu + i + np.uint64(2)]
        u3 = u[pu + i + np.uint64(3)]
        s0 += u0 * v[pv + i]
        s1 += u1 * v[pv + i + np.uint64(1)]
        s2 += u2 * v[pv + i + np.uint64(2)]
        s3 += u3 * v[pv + i + np.uint64(3)]
        t0 += u0 * v[pv2 + i]
        t1 += u1 * v[pv2 + i + np.uint64(1)]
        t2 += u2 * v[pv2 + i + np.uint64(2)]
        t3 += u3 * v[pv2 + i + np.uint64(3)]
    s = (s0 + s1) + (s2 + s3)
    t = (t0 + t1) + (t2 + t3)
    for k in range(n4, n):
        s += u[pu + k] * v[pv + k]
        t += u[pu + k] * v[pv2 + k]
    return s, t


@njit(**HELPER)
def _dense(w, pw, n_in, n_out, acts, src, dst, nb, relu):
    """One layer for rows 0..nb-1: z[b, j] = dot(a[b], W_l[:, j]) + b_j, then max(z, 0)
    if ``relu``. a is acts[src:] and z acts[dst:], both (nb, width) row-major; W_l is
    (out, in) at w[pw] and b_l follows it. Outputs go in pairs (:func:`_dot2`), the
    last one alone when n_out is odd."""
    pb = pw + n_in * n_out
    pairs = n_out - n_out % np.uint64(2)
    for b in range(nb):
        a = src + b * n_in
        z = dst + b * n_out
        for j in range(np.uint64(0), pairs, np.uint64(2)):
            s, t = _dot2(acts, a, w, pw + j * n_in, pw + (j + np.uint64(1)) * n_in, n_in)
            acts[z + j] = s + w[pb + j]
            acts[z + j + np.uint64(1)] = t + w[pb + j + np.uint64(1)]
        if pairs < n_out:
            last = n_out - np.uint64(1)
            acts[z + last] = _dot(acts, a, w, pw + last * n_in, n_in) + w[pb + last]
        if relu:
            for j in range(n_out):
                acts[z + j] = max(acts[z + j], 0.0)


@njit(**HELPER)
def _forward(w, dims, offsets, blocks, acts, nb):
    """Fill the activation blocks of rows 0..nb-1 from the input block; the last block
    holds the logits (no ReLU)."""
    layers = dims.shape[0] - 1
    for l in range(layers):
        _dense(w, offsets[l], dims[l], dims[l + 1], acts, blocks[l], blocks[l + 1], nb, l < layers - 1)


@njit(**HELPER)
def _softmax_rows(acts, src, n_out, y, rows, start, nb, scale, dz):
    """Cross-entropy of rows 0..nb-1 of the logits block acts[src:] (summed, float64),
    whose labels are y[rows[start + b]], and, if ``scale`` is not 0,
    dz[b, :] = scale (softmax - onehot) as an (nb, n_out) block.

    Stable: loss = log(s) - (z_y - m) with m = max_j z_j and s = sum_j exp(z_j - m).
    """
    total = 0.0
    for b in range(nb):
        label = y[rows[start + b]]
        z = src + b * n_out
        d = b * n_out
        m = acts[z]
        for j in range(n_out):
            m = max(m, acts[z + j])
        s = 0.0
        z_label = 0.0
        for j in range(n_out):
            shifted = acts[z + j] - m
            if j == label:
                z_label = shifted
            e = np.exp(shifted)
            dz[d + j] = e
            s += e
        total += np.log(s) - z_label
        if scale != 0.0:
            # one division per row; dz[d + label] gets its -scale below
            ratio = scale / s
            for j in range(n_out):
                dz[d + j] *= ratio
            for j in range(n_out):
                if j == label:
                    dz[d + j] -= scale
    return total


@njit(**HELPER)
def _layer_gradient(pw, n_in, n_out, acts, src, nb, dz, grad):
    """gW_l[j, :] = sum_b dz[b, j] a[b, :] and gb_l[j] = sum_b dz[b, j] (b in order), into
    grad at W_l's offset pw ((out, in) layout); a is the (nb, n_in) block acts[src:]."""
    pb = pw + n_in * n_out
    for i in range(pw, pb + n_out):
        grad[i] = 0.0
    for b in range(nb):
        a = src + b * n_in
        for j in range(n_out):
            d = dz[b * n_out + j]
            g = pw + j * n_in
            # an axpy over the layer's inputs: contiguous, independent, vectorised
            for k in range(n_in):
                grad[g + k] += d * acts[a + k]
            grad[pb + j] += d


@njit(**HELPER)
def _backprop(w, pw, n_in, n_out, acts, src, nb, dz, da):
    """da[b, :] = (sum_j dz[b, j] W_l[j, :]) * (a[b, :] > 0) (j in order): the gradient at
    the ReLU output a (the (nb, n_in) block acts[src:]) that fed layer l."""
    for b in range(nb):
        below = b * n_in
        for k in range(n_in):
            da[below + k] = 0.0
        for j in range(n_out):
            d = dz[b * n_out + j]
            row = pw + j * n_in
            for k in range(n_in):
                da[below + k] += d * w[row + k]
        for k in range(n_in):
            if acts[src + below + k] <= 0.0:
                da[below + k] = 0.0


@njit(**HELPER)
def _backward(w, dims, offsets, blocks, acts, nb, dz, da, grad):
    """grad = d(mean loss)/dw of the batch, given dz = d loss / d logits (already / nb),
    layer by layer from the top; the two scratch buffers swap roles at each layer."""
    for l in range(dims.shape[0] - 2, -1, -1):
        _layer_gradient(offsets[l], dims[l], dims[l + 1], acts, blocks[l], nb, dz, grad)
        if l > 0:
            _backprop(w, offsets[l], dims[l], dims[l + 1], acts, blocks[l], nb, dz, da)
            dz, da = da, dz


@njit(**HELPER)
def _step(w, grad, velocity, start_w, lr, momentum, weight_decay, mu, shift):
    """One SGD step on every parameter, one fused contiguous loop:
    g += weight_decay w + mu (w - start_w) (+ shift, unless it is empty); v = momentum v + g;
    w -= lr v."""
    shifted = shift.shape[0] > 0
    for i in range(w.shape[0]):
        g = grad[i] + weight_decay * w[i] + mu * (w[i] - start_w[i])
        if shifted:
            g += shift[i]
        v = momentum * velocity[i] + g
        velocity[i] = v
        w[i] -= lr * v


_MASK32, _TWO_TO_32 = np.uint64(0xFFFFFFFF), np.uint64(1 << 32)
_1, _32 = np.uint64(1), np.uint64(32)


@njit(**KERNEL)
def shuffle(seed, order):
    """order[e] = epoch e's Fisher-Yates permutation; see ``fedkern._reference.models.shuffle``
    (the same words of the same streams, so the same permutations)."""
    key = np.uint64(seed)
    n = order.shape[1]
    block = np.empty(4, np.uint64)
    for e in range(order.shape[0]):
        row = order[e]
        for i in range(n):
            row[i] = i
        stream, b, used = np.uint64(e), np.uint64(0), 4
        for i in range(n - 1, 0, -1):
            bound = np.uint64(i + 1)
            while True:
                if used == 4:
                    block[0], block[1], block[2], block[3] = philox_block(key, stream, b)
                    b += _1
                    used = 0
                m = block[used] * bound
                used += 1
                low = m & _MASK32
                if low >= bound or low >= _TWO_TO_32 % bound:
                    break
            j = np.int64(m >> _32)
            row[i], row[j] = row[j], row[i]


@njit(**KERNEL)
def train(params, sizes, x, y, order, batch_size, lr, momentum, weight_decay, mu, correction, delta_out):
    """Minibatch SGD from ``params``; delta_out = float32(w_final) - params; returns the sum
    over steps of each step's mean batch cross-entropy (taken before the step).

    ``order`` is (epochs, n): epoch e visits rows order[e] in batches of ``batch_size``,
    the last one smaller when batch_size does not divide n. Each step, with g the batch
    mean gradient: g += weight_decay w + mu (w - params) (+ correction, a float32 vector
    like params, or None: SCAFFOLD's c - c_i); v = momentum v + g; w -= lr v.
    """
    dims = sizes.astype(np.uint64)
    n = np.uint64(x.shape[0])
    batch = min(np.uint64(batch_size), n)
    offsets = _offsets(dims)
    blocks = _blocks(dims, batch)
    n_params = offsets[-1]
    widest = dims[1:].max()
    acts = np.empty(blocks[-1], np.float64)
    dz = np.empty(batch * widest, np.float64)
    da = np.empty(batch * widest, np.float64)
    grad = np.empty(n_params, np.float64)
    velocity = np.zeros(n_params, np.float64)
    start_w = np.empty(n_params, np.float64)
    _to_kernel_layout(params, dims, offsets, start_w)
    shift = np.empty(np.uint64(0) if correction is None else n_params, np.float64)
    if correction is not None:       # pruned at compile time when it is None
        _to_kernel_layout(correction, dims, offsets, shift)
    w = start_w.copy()
    logits = blocks[-2]
    n_out = dims[-1]
    total = 0.0
    for e in range(order.shape[0]):
        rows = order[e]
        for start in range(np.uint64(0), n, batch):
            nb = min(batch, n - start)
            _gather(x, rows, start, nb, acts)
            _forward(w, dims, offsets, blocks, acts, nb)
            total += _softmax_rows(acts, logits, n_out, y, rows, start, nb, 1.0 / nb, dz) / nb
            _backward(w, dims, offsets, blocks, acts, nb, dz, da, grad)
            _step(w, grad, velocity, start_w, lr, momentum, weight_decay, mu, shift)
    _from_kernel_layout(w, dims, offsets, grad)
    for i in range(n_params):
        delta_out[i] = np.float32(grad[i]) - params[i]
    return total


@njit(**KERNEL)
def evaluate(params, sizes, x, y, predictions):
    """Sum over rows of the cross-entropy; predictions[i] = argmax of row i's logits
    (the first maximum on ties). Rows go through in blocks of 256 to bound the scratch."""
    dims = sizes.astype(np.uint64)
    n = np.uint64(x.shape[0])
    block = min(np.uint64(256), n)
    offsets = _offsets(dims)
    blocks = _blocks(dims, block)
    acts = np.empty(blocks[-1], np.float64)
    n_out = dims[-1]
    scratch = np.empty(block * n_out, np.float64)
    w = np.empty(offsets[-1], np.float64)
    _to_kernel_layout(params, dims, offsets, w)
    logits = blocks[-2]
    identity = np.arange(x.shape[0])
    total = 0.0
    for start in range(np.uint64(0), n, block):
        nb = min(block, n - start)
        _gather(x, identity, start, nb, acts)
        _forward(w, dims, offsets, blocks, acts, nb)
        total += _softmax_rows(acts, logits, n_out, y, identity, start, nb, 0.0, scratch)
        for b in range(nb):
            z = logits + b * n_out
            best = np.uint64(0)
            for j in range(n_out):
                if acts[z + j] > acts[z + best]:
                    best = j
            predictions[start + b] = best
    return total
