"""The kernel-input view of K client updates, and the base of fedkern's own containers."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


class UpdatesSource:
    """Base of fedkern's containers of K updates (:class:`fedkern.UpdateMatrix`): ops read
    their (K, D) ``array`` as the updates and their ``weights`` when given none."""

    array: np.ndarray
    weights: np.ndarray


class Updates:
    """K client updates of D coordinates, validated.

    Holds either a (K, D) C-contiguous matrix or K separate 1-D contiguous rows, never a
    stacked copy of the rows. ``pointers`` holds the address of each row, so compiled
    kernels can read a sequence exactly as they read a matrix; the object keeps every
    row alive while a kernel runs.
    """

    __slots__ = ("rows", "matrix", "k", "d", "dtype", "pointers", "first")

    def __init__(self, rows: Sequence[np.ndarray] | None, matrix: np.ndarray | None):
        self.rows = rows
        self.matrix = matrix
        if matrix is not None:
            self.k, self.d = matrix.shape
            self.first = matrix[0]
            # Not matrix.strides[0]: numpy calls a one-row matrix C-contiguous whatever that
            # stride is (even negative); a contiguous row is always d * itemsize apart.
            stride = np.uintp(self.d * matrix.itemsize)
            self.pointers = np.uintp(matrix.ctypes.data) + np.arange(self.k, dtype=np.uintp) * stride
        else:
            self.k, self.d = len(rows), rows[0].shape[0]
            self.first = rows[0]
            self.pointers = np.fromiter((row.ctypes.data for row in rows), np.uintp, self.k)
        self.dtype = self.first.dtype

    def __len__(self) -> int:
        return self.k

    def __getitem__(self, i: int) -> np.ndarray:
        return self.matrix[i] if self.matrix is not None else self.rows[i]

    def __iter__(self):
        return iter(self.matrix if self.matrix is not None else self.rows)

    def subset(self, indices) -> "Updates":
        """The rows at ``indices`` (in that order), read in place like the others."""
        return Updates([self[int(i)] for i in indices], None)


#: What every op accepts as K client updates.
UpdatesLike = np.ndarray | Sequence[np.ndarray] | UpdatesSource
#: K finite weights >= 0, not all zero (a list, an array, ...).
WeightsLike = npt.ArrayLike
#: A result dtype: float32 or float64 (None: the updates' dtype).
DTypeLike = npt.DTypeLike
#: A seed: an int, None (fresh entropy) or a numpy Generator.
SeedLike = int | np.random.Generator | None
#: An ``out=`` for a (K, D) result: an array, K writable rows, or None.
OutUpdates = np.ndarray | Sequence[np.ndarray] | None
