"""The kernels each family's backend modules provide, written down once.

Every backend module of a family (``fedkern._reference.<family>``,
``fedkern._cython.<family>``, ``fedkern._numba.<family>``) exposes exactly these
functions with these arguments; ``tests/test_contracts.py`` checks every importable one.
Kernels take validated inputs (``updates`` is a :class:`fedkern._updates.Updates`),
write into the buffers they are given and return nothing or a small count; they never
validate, allocate results or hold Python objects in their loops.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ._updates import Updates


class AggregateKernels(Protocol):
    def weighted_sum(self, updates: Updates, weights: np.ndarray, divisor: float, out: np.ndarray) -> int:
        """out = (sum_i weights[i] updates[i]) / divisor in float64, rounded once; returns the
        number of non-finite outputs."""

    def accumulate(self, acc: np.ndarray, update: np.ndarray, weight: float) -> None:
        """acc += weight * update, in float64."""

    def count_nonfinite(self, values: np.ndarray) -> int:
        """Number of NaN and infinite entries of a 1-D array."""

    def l2_norms(self, updates: Updates, norms: np.ndarray) -> None:
        """norms[i] = ||updates[i]||_2, float64."""

    def clip_by_norm(self, updates: Updates, max_norm: float, out: Updates, norms: np.ndarray) -> None:
        """out[i] = updates[i] min(1, max_norm / ||updates[i]||); norms get the norms."""


class OptimKernels(Protocol):
    def momentum_step(self, params: np.ndarray, delta: np.ndarray, momentum_buffer: np.ndarray, lr: float,
                      momentum: float) -> None:
        """m = momentum m + delta; params += lr m."""

    def adaptive_step(self, params: np.ndarray, delta: np.ndarray, m: np.ndarray, v: np.ndarray, lr: float,
                      beta1: float, beta2: float, tau: float, c1: float, c2: float, rule: int) -> None:
        """Reddi et al. (2021) Algorithm 2; ``rule`` 0 Adagrad, 1 Adam, 2 Yogi."""


class RobustKernels(Protocol):
    def trimmed_mean(self, updates: Updates, lo: int, hi: int, out: np.ndarray) -> None:
        """out[j] = mean of the order statistics lo .. hi-1 of coordinate j (NaN as +inf)."""

    def meamed(self, updates: Updates, keep: int, out: np.ndarray) -> None:
        """out[j] = mean of the ``keep`` values of coordinate j closest to its median."""

    def gather_tile(self, updates: Updates, j0: int, center: bool, tile: np.ndarray) -> None:
        """tile[i] = updates[i][j0:j0 + n] (minus updates[0][j0:j0 + n] when ``center``), in
        the tile's dtype (float32 or float64, whatever the updates')."""

    def exact_sq_distances(self, updates: Updates, out: np.ndarray) -> None:
        """out[i, l] = sum_j (x_ij - x_lj)^2 in float64; +inf where not finite."""

    def exact_sq_rows(self, updates: Updates, rows: np.ndarray, out: np.ndarray) -> None:
        """out[r, l] = exact_sq_distances' entry (rows[r], l), bit for bit, for every l
        (``rows``: intp indices); len(rows) K D work."""

    def sq_distances_to(self, updates: Updates, point: np.ndarray, out: np.ndarray) -> None:
        """out[i] = sum_j (x_ij - point_j)^2 in float64."""


class RandomKernels(Protocol):
    """The counter-based stream (Philox4x32-10) every randomised op draws from; its exact
    definition is in ``fedkern._reference.random``. Compiled kernels of other families
    draw inside their loops from the inline twins (``ext/_philox.pxd``,
    ``fedkern._numba._philox``)."""

    def philox4x32(self, counter: np.ndarray, key: np.ndarray, out: np.ndarray) -> None:
        """out[:4] = the Philox4x32-10 bijection of counter[:4] under key[:2]."""

    def random_bits(self, seed: int, stream: int, start: int, out: np.ndarray) -> None:
        """out[j] = uint32 word start + j of stream ``stream`` under ``seed``."""

    def random_uniform(self, seed: int, stream: int, start: int, out: np.ndarray) -> None:
        """out[j] = float64 uniform start + j in [0, 1) (53 random bits) of the stream."""


class PrivacyKernels(Protocol):
    """Clipped sums and Gaussian noise; the normal stream is defined in
    ``fedkern._reference.privacy``."""

    def clip_and_sum(self, updates: Updates, clip: float, weights: np.ndarray, out: np.ndarray,
                     norms: np.ndarray) -> None:
        """out = sum_i weights[i] min(1, clip / ||updates[i]||) updates[i] (float64 out); norms
        get the float64 norms."""

    def gaussian_noise(self, x: np.ndarray, std: float, seed: int, stream: int, start: int,
                       out: np.ndarray) -> None:
        """out[j] = x[j] + std * normal(start + j) of the stream, in float64, rounded once
        (``out`` may be ``x``)."""


class SecaggKernels(Protocol):
    """Secure aggregation's ring arithmetic; the quantisation is defined in
    ``fedkern._reference.secagg``. The ring is the uint32 or uint64 dtype of the output."""

    def quantize(self, x: np.ndarray, clip: float, scale: float, weight: int, seed: int, stream: int,
                 out: np.ndarray) -> None:
        """out[j] = weight * floor(min(max(x[j], -clip), clip) * scale + u_j) mod 2^bits, u_j
        uniform j of the Philox stream (seed, stream)."""

    def add_masks(self, out: np.ndarray, start: int, masks: Updates, signs: np.ndarray) -> None:
        """out[j] += sum_m signs[m] * masks[m][start + j] in the ring (serial: called on chunks
        from several threads)."""

    def dequantize(self, total: np.ndarray, step: float, out: np.ndarray) -> None:
        """out[j] = signed(total[j]) * step in float64, rounded once into out's dtype."""


class CompressKernels(Protocol):
    """Codecs' hot loops; their bits are defined in ``fedkern._reference.compress``. Lists
    of client buffers come as ``Updates`` (row pointers, never stacked)."""

    def block_stats(self, x: np.ndarray, block_size: int, stats: np.ndarray) -> None:
        """stats[b] = (min, max, sum, sum x^2, sum |x|) of block b of x, float64 sums in index order."""

    def quantize(self, x: np.ndarray, offsets: np.ndarray, steps: np.ndarray, block_size: int, levels: int,
                 bits: int, signed: bool, seed: int, stream: int, codes: np.ndarray, signs: np.ndarray) -> None:
        """codes = stochastic rounding of x (|x| when signed) onto offsets + steps * {0 .. levels}
        per block, packed ``bits`` to a code; signs = bit-packed signs (when signed)."""

    def accumulate_quantized(self, out: np.ndarray, codes: Updates, signs: Updates, offsets: Updates,
                             steps: Updates, weights: np.ndarray, block_size: int, bits: int,
                             signed: bool) -> None:
        """out[j] = sum_i weights[i] (+-)(offsets[i][b] + steps[i][b] code_i(j)), b = j // block_size,
        clients in index order, in float64 (the order: ``fedkern._reference.compress``), rounded
        once into out (float32 or float64)."""

    def scatter_add(self, out: np.ndarray, indices: Updates, values: Updates, weights: np.ndarray) -> None:
        """out = sum_i weights[i] values[i] scattered to indices[i], clients in index order (indices
        sorted, distinct), in float64, rounded once into out (float32 or float64)."""

    def check_sparse(self, indices: Updates, values: Updates, d: int, bad: np.ndarray) -> None:
        """bad[i] = 1 where client i's indices are not strictly increasing and below d, or its
        values not all finite, else 0 (uint8; buffers of validated dtypes and lengths)."""

    def scale_by_signs(self, y: np.ndarray, seed: int, stream: int, scale: float) -> None:
        """y[j] *= -scale where bit j % 32 of word j // 32 of the stream is set, else scale (float64 y)."""

    def random_k_indices(self, seeds: np.ndarray, stream: int, d: int, k: int, out: np.ndarray) -> None:
        """out[i] = the k sorted uint32 indices Floyd's algorithm draws from the stream under
        seeds[i] (uint64 seeds, a (K, k) out)."""

    def fwht(self, x: np.ndarray) -> None:
        """x <- H x in place: the unnormalised Walsh-Hadamard transform, len(x) a power of two."""


class ModelsKernels(Protocol):
    """The simulator's model training (``fedkern.sim.models``): a dense ReLU network with
    layer widths ``sizes`` (no hidden layer: multinomial logistic regression)."""

    def shuffle(self, seed: np.uint64, order: np.ndarray) -> None:
        """order[e] = epoch e's Fisher-Yates permutation of 0 .. n - 1 on stream e of ``seed``."""

    def train(self, params: np.ndarray, sizes: np.ndarray, x: np.ndarray, y: np.ndarray, order: np.ndarray,
              batch_size: int, lr: float, momentum: float, weight_decay: float, mu: float,
              correction: np.ndarray | None, delta_out: np.ndarray) -> float:
        """Minibatch SGD from params over the row order (epochs, n), ``correction`` (float32
        like params, or None) added to every gradient; delta_out = w_final - params; returns
        the sum of the steps' mean batch losses."""

    def evaluate(self, params: np.ndarray, sizes: np.ndarray, x: np.ndarray, y: np.ndarray,
                 predictions: np.ndarray) -> float:
        """Summed cross-entropy over the rows; predictions[i] = argmax of row i's logits."""


#: family -> the Protocol its backend modules implement.
CONTRACTS: dict[str, type] = {"aggregate": AggregateKernels, "optim": OptimKernels, "robust": RobustKernels,
                              "random": RandomKernels, "privacy": PrivacyKernels, "models": ModelsKernels}

CONTRACTS["secagg"] = SecaggKernels
CONTRACTS["compress"] = CompressKernels


def kernel_names(family: str) -> tuple[str, ...]:
    """The kernels of ``family``, in the order its contract lists them."""
    return tuple(name for name in vars(CONTRACTS[family]) if not name.startswith("_"))
