r"""Reference kernels of the secure aggregation family, in plain numpy: fixed-point
quantisation into an integer ring, masking with keystreams, and decoding a ring sum.

Kernels take validated inputs (see ``fedkern.secagg``) and write into their buffers. The
ring is Z / 2^32 (uint32) or Z / 2^64 (uint64): numpy's unsigned arithmetic wraps around,
which is exactly the ring's addition and multiplication.

**Quantisation.** Coordinate j of x becomes, with v = min(max(x_j, -clip), clip) * scale
(scale = Q / (2 clip), so v lies in [-Q/2, Q/2]) and u_j = w_j 2^-32 with w_j uint32 word
``j`` of the Philox stream (``fedkern._reference.random``; 32 bits are plenty for a
rounding decision and give four uniforms per Philox block, half the cost of 53-bit ones)::

    q_j = floor(v + u_j)            (an integer: floor(v) or floor(v) + 1, unbiased)
    out_j = weight * q_j  mod 2^bits (two's complement: a negative q wraps to 2^bits + q)

all in float64 with correctly rounded operations in this order, so every backend gives the
same bits.
"""
import numpy as np

from .random import random_bits


def quantize(x: np.ndarray, clip: float, scale: float, weight: int, seed: int, stream: int,
             out: np.ndarray) -> None:
    """out[j] = weight * floor(min(max(x[j], -clip), clip) * scale + u_j) in the ring of out's dtype."""
    words = np.empty(x.shape[0], np.uint32)
    random_bits(seed, stream, 0, words)
    u = words * 2.0**-32
    v = np.minimum(np.maximum(x.astype(np.float64), -clip), clip) * scale
    q = np.floor(v + u).astype(np.int64).view(np.uint64).astype(out.dtype)
    np.multiply(q, out.dtype.type(weight), out=out)


def add_masks(out: np.ndarray, start: int, masks, signs: np.ndarray) -> None:
    """out[j] += sum_m signs[m] * masks[m][start + j] in the ring (signs: 1 or 2^bits - 1, i.e. -1)."""
    n = out.shape[0]
    for m, row in enumerate(masks):
        out += signs[m] * row[start:start + n]


def dequantize(total: np.ndarray, step: float, out: np.ndarray) -> None:
    """out[j] = signed(total[j]) * step in float64, rounded once (values >= 2^(bits-1) are negative)."""
    signed = total.view(np.int32 if total.dtype == np.uint32 else np.int64)
    out[...] = signed.astype(np.float64) * step
