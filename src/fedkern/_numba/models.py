"""Numba kernels of the built-in models of :mod:`fedkern.sim.models`.

One dense network covers both models: layer widths ``sizes = [F, h_1, ..., h_m, C]``
(``m = 0`` is multinomial logistic regression), ReLU after each hidden layer, softmax
cross-entropy on the output. The parameters are one flat float32 vector holding, layer
after layer, ``W_l`` (``sizes[l] x sizes[l + 1]``, row-major) then ``b_l``.

Precision: parameters and inputs are read as float32 and every operation runs in
float64 (the working copy of the weights, the momentum buffer, activations, gradients
and sums), rounded to float32 once at the end. ``fedkern._reference.models`` does the
same math in numpy, so the two backends differ only by float64 summation order.

The kernels are ``njit(cache=True, nogil=True)`` and serial: the simulator runs clients
in parallel threads, one kernel call per client, so the GIL must be released but a
parallel kernel would only fight for the cores. No fastmath: it would change results.
Scratch is allocated once per call, outside the step loop. Labels are compared, never
used as indices, so an out-of-range label cannot read out of bounds; the wrapper
rejects them anyway.
"""
import numpy as np
from numba import njit

KERNEL = dict(cache=True, nogil=True)


@njit(**KERNEL)
def _offsets(sizes):
    """Start of each layer's ``W_l`` in the parameter vector; the last entry is n_params."""
    layers = sizes.shape[0] - 1
    offsets = np.empty(layers + 1, np.int64)
    offsets[0] = 0
    for l in range(layers):
        offsets[l + 1] = offsets[l] + (sizes[l] + 1) * sizes[l + 1]
    return offsets


@njit(**KERNEL)
def _columns(sizes):
    """First column of each layer's activations in the (batch, sum(sizes)) scratch."""
    columns = np.empty(sizes.shape[0] + 1, np.int64)
    columns[0] = 0
    for l in range(sizes.shape[0]):
        columns[l + 1] = columns[l] + sizes[l]
    return columns


@njit(**KERNEL)
def _dot(a, w):
    """sum_k a[k] w[k] in four interleaved partial sums (k = 4i + lane), combined as
    (s0 + s1) + (s2 + s3), then the tail: four independent chains instead of one."""
    n = a.shape[0]
    n4 = n - n % 4
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for k in range(0, n4, 4):
        s0 += a[k] * w[k]
        s1 += a[k + 1] * w[k + 1]
        s2 += a[k + 2] * w[k + 2]
        s3 += a[k + 3] * w[k + 3]
    s = (s0 + s1) + (s2 + s3)
    for k in range(n4, n):
        s += a[k] * w[k]
    return s


@njit(**KERNEL)
def _layer(w, offsets, sizes, l):
    """Layer l's weights as an (out, in) matrix (the kernels' transposed layout) and bias."""
    n_in = sizes[l]
    n_out = sizes[l + 1]
    p = offsets[l]
    return w[p:p + n_out * n_in].reshape(n_out, n_in), w[p + n_out * n_in:offsets[l + 1]]


@njit(**KERNEL)
def _forward(w, sizes, offsets, columns, acts, nb):
    """Fill the activations of rows 0..nb-1 of ``acts`` from the input columns.

    Layer l: z_j = dot(a_{l-1}, W_l[:, j]) + b_j; ReLU on hidden layers; the output
    layer keeps the logits.
    """
    layers = sizes.shape[0] - 1
    for l in range(layers):
        weights, bias = _layer(w, offsets, sizes, l)
        for b in range(nb):
            a = acts[b, columns[l]:columns[l + 1]]
            z = acts[b, columns[l + 1]:columns[l + 2]]
            for j in range(sizes[l + 1]):
                z[j] = _dot(a, weights[j]) + bias[j]
                if l < layers - 1:
                    z[j] = max(z[j], 0.0)


@njit(**KERNEL)
def _softmax_rows(acts, c_out, y, rows, start, nb, scale, dz):
    """Cross-entropy of rows 0..nb-1 of the logits ``acts[:, c_out:]`` (summed, float64),
    whose labels are y[rows[start + b]], and, if ``scale`` is not 0,
    dz = scale * (softmax - onehot).

    Stable: loss = log(s) - (z_y - m) with m = max_j z_j and s = sum_j exp(z_j - m).
    """
    total = 0.0
    n_out = acts.shape[1] - c_out
    for b in range(nb):
        label = y[rows[start + b]]
        m = acts[b, c_out]
        for j in range(1, n_out):
            m = max(m, acts[b, c_out + j])
        s = 0.0
        for j in range(n_out):
            e = np.exp(acts[b, c_out + j] - m)
            dz[b, j] = e
            s += e
        total += np.log(s) - (acts[b, c_out + label] - m)
        if scale != 0.0:
            for j in range(n_out):
                dz[b, j] = scale * (dz[b, j] / s - (1.0 if j == label else 0.0))
    return total


@njit(**KERNEL)
def _backward(w, sizes, offsets, columns, acts, nb, dz, da, grad):
    """grad = d(mean loss)/dw of the batch, given dz = d loss / d logits (already / nb).

    gW_l[:, j] = sum_b dz[b, j] a_{l-1}[b] and gb_l[j] = sum_b dz[b, j] (b in order);
    then da[b] = sum_j dz[b, j] W_l[:, j] (j in order) and dz = da * (a_{l-1} > 0) for
    the layer below (ReLU). Every inner loop is a contiguous axpy over the layer's inputs.
    """
    grad[:] = 0.0
    for l in range(sizes.shape[0] - 2, -1, -1):
        weights, _ = _layer(w, offsets, sizes, l)
        g_weights, g_bias = _layer(grad, offsets, sizes, l)
        n_in = sizes[l]
        for b in range(nb):
            a = acts[b, columns[l]:columns[l + 1]]
            for j in range(sizes[l + 1]):
                d = dz[b, j]
                g = g_weights[j]
                for k in range(n_in):
                    g[k] += d * a[k]
                g_bias[j] += d
        if l > 0:
            for b in range(nb):
                a = acts[b, columns[l]:columns[l + 1]]
                below = da[b, :n_in]
                below[:] = 0.0
                for j in range(sizes[l + 1]):
                    d = dz[b, j]
                    row = weights[j]
                    for k in range(n_in):
                        below[k] += d * row[k]
                for k in range(n_in):
                    if a[k] <= 0.0:
                        below[k] = 0.0
            dz, da = da, dz


@njit(**KERNEL)
def _to_kernel_layout(params, sizes, offsets, w):
    """w (float64) = params with each W_l transposed to (out, in); biases as they are."""
    for l in range(sizes.shape[0] - 1):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        p = offsets[l]
        for k in range(n_in):
            for j in range(n_out):
                w[p + j * n_in + k] = params[p + k * n_out + j]
        for i in range(p + n_in * n_out, offsets[l + 1]):
            w[i] = params[i]


@njit(**KERNEL)
def _from_kernel_layout(w, sizes, offsets, params):
    """The inverse of :func:`_to_kernel_layout`: params = w with each W_l back to (in, out)."""
    for l in range(sizes.shape[0] - 1):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        p = offsets[l]
        for k in range(n_in):
            for j in range(n_out):
                params[p + k * n_out + j] = w[p + j * n_in + k]
        for i in range(p + n_in * n_out, offsets[l + 1]):
            params[i] = w[i]


@njit(**KERNEL)
def _gather(x, order, start, nb, acts):
    """Input columns of ``acts`` = the batch's rows of x, in float64."""
    for b in range(nb):
        row = x[order[start + b]]
        for f in range(x.shape[1]):
            acts[b, f] = row[f]


@njit(**KERNEL)
def train(params, sizes, x, y, order, batch_size, lr, momentum, weight_decay, mu, delta_out):
    """Minibatch SGD from ``params``; delta_out = float32(w_final) - params; returns the sum
    over steps of each step's mean batch cross-entropy (taken before the step).

    ``order`` is (epochs, n): epoch e visits rows order[e] in batches of ``batch_size``,
    the last one smaller when batch_size does not divide n. Each step, with g the batch
    mean gradient: g += weight_decay w + mu (w - params); v = momentum v + g; w -= lr v.
    """
    n = x.shape[0]
    offsets = _offsets(sizes)
    columns = _columns(sizes)
    n_params = offsets[-1]
    widest = sizes[1:].max()
    batch = min(batch_size, n)
    acts = np.empty((batch, columns[-1]), np.float64)
    dz = np.empty((batch, widest), np.float64)
    da = np.empty((batch, widest), np.float64)
    grad = np.empty(n_params, np.float64)
    velocity = np.zeros(n_params, np.float64)
    start_w = np.empty(n_params, np.float64)
    _to_kernel_layout(params, sizes, offsets, start_w)
    w = start_w.copy()
    c_out = columns[-2]
    total = 0.0
    for e in range(order.shape[0]):
        for start in range(0, n, batch):
            nb = min(batch, n - start)
            _gather(x, order[e], start, nb, acts)
            _forward(w, sizes, offsets, columns, acts, nb)
            total += _softmax_rows(acts, c_out, y, order[e], start, nb, 1.0 / nb, dz) / nb
            _backward(w, sizes, offsets, columns, acts, nb, dz, da, grad)
            for i in range(n_params):
                g = grad[i] + weight_decay * w[i] + mu * (w[i] - start_w[i])
                velocity[i] = momentum * velocity[i] + g
                w[i] -= lr * velocity[i]
    _from_kernel_layout(w, sizes, offsets, grad)
    for i in range(n_params):
        delta_out[i] = np.float32(grad[i]) - params[i]
    return total


@njit(**KERNEL)
def evaluate(params, sizes, x, y, predictions):
    """Sum over rows of the cross-entropy; predictions[i] = argmax of row i's logits
    (the first maximum on ties). Rows go through in blocks of 256 to bound the scratch."""
    n = x.shape[0]
    offsets = _offsets(sizes)
    columns = _columns(sizes)
    block = min(256, n)
    acts = np.empty((block, columns[-1]), np.float64)
    scratch = np.empty((block, sizes[-1]), np.float64)
    w = np.empty(offsets[-1], np.float64)
    _to_kernel_layout(params, sizes, offsets, w)
    c_out = columns[-2]
    n_out = sizes[-1]
    identity = np.arange(n)
    total = 0.0
    for start in range(0, n, block):
        nb = min(block, n - start)
        _gather(x, identity, start, nb, acts)
        _forward(w, sizes, offsets, columns, acts, nb)
        total += _softmax_rows(acts, c_out, y, identity, start, nb, 0.0, scratch)
        for b in range(nb):
            best = 0
            for j in range(1, n_out):
                if acts[b, c_out + j] > acts[b, c_out + best]:
                    best = j
            predictions[start + b] = best
    return total
