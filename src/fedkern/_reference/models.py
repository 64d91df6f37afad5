"""Reference kernels of the built-in models of :mod:`fedkern.sim.models`, in plain numpy.

The same dense network and the same math as ``fedkern._numba.models`` (see there for
the parameter layout): float32 parameters and inputs, every operation in float64, the
final weights rounded to float32 once. Only the float64 summation order differs
(numpy's matmul against the Numba loops), so the backends agree to float32 tolerance.
"""
import numpy as np

from ._philox import blocks

_MASK32 = (1 << 32) - 1


def _words(seed: int, stream: int, chunk: int):
    """The uint32 words of a stream in order, as Python ints, drawn ``chunk`` blocks at a time."""
    first = 0
    while True:
        yield from blocks(seed, stream, first, chunk).reshape(-1).tolist()
        first += chunk


def _below(bound: int, words) -> int:
    """A uniform integer in [0, bound), 1 <= bound < 2**32, from the words: Lemire's
    multiply-shift with rejection ("Fast random integer generation in an interval", ACM
    TOMACS 2019). m = word * bound; its low 32 bits below 2**32 mod bound are rejected
    (drawing again), which makes m >> 32 exactly uniform."""
    m = next(words) * bound
    if m & _MASK32 < bound:
        threshold = (1 << 32) % bound
        while m & _MASK32 < threshold:
            m = next(words) * bound
    return m >> 32


def shuffle(seed, order):
    """order[e] = epoch e's permutation of 0 .. n - 1: Fisher-Yates from the identity,
    i = n - 1 down to 1 swapping i with j = below(i + 1), the words from stream e of
    ``seed`` (``fedkern._reference.random``), in order."""
    epochs, n = order.shape
    for e in range(epochs):
        words = _words(int(seed), e, max(1, n // 4 + 1))
        row = list(range(n))
        for i in range(n - 1, 0, -1):
            j = _below(i + 1, words)
            row[i], row[j] = row[j], row[i]
        order[e] = row


def _layers(w, sizes):
    """[(W_l as (in, out), b_l)] views into the flat vector ``w``."""
    layers, p = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        weights = w[p:p + n_in * n_out].reshape(n_in, n_out)
        layers.append((weights, w[p + n_in * n_out:p + (n_in + 1) * n_out]))
        p += (n_in + 1) * n_out
    return layers


def _forward(w, sizes, a):
    """Activations [a_0 = input, a_1, ..., logits] of the rows ``a`` (float64)."""
    acts = [a]
    layers = _layers(w, sizes)
    for l, (weights, bias) in enumerate(layers):
        z = acts[-1] @ weights + bias
        acts.append(np.maximum(z, 0.0) if l < len(layers) - 1 else z)
    return acts


def _softmax_loss(logits, y):
    """Per-row cross-entropy log(sum_j exp(z_j - m)) - (z_y - m), and softmax, m = max z."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1)
    rows = np.arange(len(y))
    return np.log(total) - shifted[rows, y], exp / total[:, None]


def _backward(w, sizes, acts, dz):
    """Gradient (flat, float64) given dz = d loss / d logits of the batch."""
    grad = np.empty_like(w)
    layers = _layers(w, sizes)
    g_layers = _layers(grad, sizes)
    for l in range(len(layers) - 1, -1, -1):
        g_weights, g_bias = g_layers[l]
        g_weights[...] = acts[l].T @ dz
        g_bias[...] = dz.sum(axis=0)
        if l > 0:
            dz = (dz @ layers[l][0].T) * (acts[l] > 0.0)
    return grad


def _gradient(params, sizes, x, y):
    """d/dparams of the mean cross-entropy over all rows of x, float64 (test helper for
    the finite-difference check; not a kernel of the Numba backend)."""
    w = params.astype(np.float64)
    acts = _forward(w, sizes, x.astype(np.float64))
    _, probs = _softmax_loss(acts[-1], y)
    probs[np.arange(len(y)), y] -= 1.0
    return _backward(w, sizes, acts, probs / len(y))


def train(params, sizes, x, y, order, batch_size, lr, momentum, weight_decay, mu, correction, delta_out):
    """Minibatch SGD from ``params``; see ``fedkern._numba.models.train``."""
    n = x.shape[0]
    shift = None if correction is None else correction.astype(np.float64)
    start_w = params.astype(np.float64)
    w = start_w.copy()
    velocity = np.zeros_like(w)
    batch = min(batch_size, n)
    total = 0.0
    for rows in order:
        for start in range(0, n, batch):
            idx = rows[start:start + batch]
            labels = y[idx]
            acts = _forward(w, sizes, x[idx].astype(np.float64))
            losses, probs = _softmax_loss(acts[-1], labels)
            total += losses.sum() / len(idx)
            probs[np.arange(len(idx)), labels] -= 1.0
            g = _backward(w, sizes, acts, probs * (1.0 / len(idx)))
            g += weight_decay * w + mu * (w - start_w)
            if shift is not None:
                g += shift
            velocity = momentum * velocity + g
            w -= lr * velocity
    delta_out[...] = w.astype(np.float32) - params
    return total


def evaluate(params, sizes, x, y, predictions):
    """Summed cross-entropy over the rows; predictions = argmax of the logits (first on ties)."""
    if x.shape[0] == 0:
        return 0.0
    logits = _forward(params.astype(np.float64), sizes, x.astype(np.float64))[-1]
    predictions[...] = logits.argmax(axis=1)
    return float(_softmax_loss(logits, y)[0].sum())
