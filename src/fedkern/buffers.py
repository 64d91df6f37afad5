"""Buffers: a model's list of layer arrays <-> one flat vector, and a preallocated K x D.

Kernels work on one contiguous vector per client; models are lists of layers. A
:class:`Layout` records the layers' shapes once, flattens any list with those shapes into
one buffer and hands back zero-copy layer views of a flat result. An
:class:`UpdateMatrix` preallocates the K x D matrix a round needs, so clients (or
deserialisers) write their rows in place and nothing is stacked later.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _validate as check
from ._updates import DTypeLike, UpdatesSource


class Layout:
    """Shapes, dtypes and offsets of a list of layer arrays inside one flat vector.

    Parameters
    ----------
    arrays : sequence of numpy arrays (any shapes, 0-d included)
        The model's layers; only their shapes and dtypes are recorded.
    dtype : float32 or float64, optional
        Dtype of flat buffers; default: float64 if any layer is float64, else float32.

    Examples
    --------
    >>> layers = [np.ones((2, 3), np.float32), np.zeros(4, np.float32)]
    >>> layout = fedkern.Layout(layers)
    >>> flat = layout.flatten(layers)                 # one (10,) float32 vector
    >>> w, b = layout.unflatten(flat)                 # views into flat, shapes (2, 3) and (4,)
    """

    def __init__(self, arrays: Sequence[np.ndarray], dtype: DTypeLike = None):
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence) or not arrays:
            raise check.FedkernTypeError("arrays must be a non-empty list of numpy arrays (a model's layers)")
        for i, array in enumerate(arrays):
            if not isinstance(array, (np.ndarray, np.generic)):  # a numpy scalar is a 0-d layer
                raise check.FedkernTypeError(f"arrays[{i}] must be a numpy array; got {type(array).__name__}")
            if array.dtype.kind not in "biuf":
                raise check.FedkernTypeError(f"arrays[{i}] has dtype {array.dtype}; layers must be real numbers")
        self.shapes = tuple(array.shape for array in arrays)
        self.dtypes = tuple(array.dtype for array in arrays)
        self.sizes = tuple(int(array.size) for array in arrays)
        self.offsets = tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))
        self.size = sum(self.sizes)
        default = np.float64 if np.dtype(np.float64) in self.dtypes else np.float32
        self.dtype = check.result_dtype(dtype, np.dtype(default))

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"Layout({len(self)} layers, size={self.size}, dtype={self.dtype})"

    def flatten(self, arrays: Sequence[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """Copy ``arrays`` (same shapes as the layout) into one flat vector, ``out`` if given."""
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
            raise check.FedkernTypeError("arrays must be a list of numpy arrays")
        if len(arrays) != len(self):
            raise check.FedkernValueError(f"arrays has {len(arrays)} layers; the layout has {len(self)}")
        flat = check.out(out, (self.size,), self.dtype, self.dtype if out is None else None)
        for i, (array, shape, offset, size) in enumerate(zip(arrays, self.shapes, self.offsets, self.sizes)):
            array = np.asarray(array)
            if array.shape != shape:
                raise check.FedkernValueError(f"arrays[{i}] has shape {array.shape}; the layout has {shape}")
            if array.dtype.kind not in "biuf":
                raise check.FedkernTypeError(f"arrays[{i}] has dtype {array.dtype}; layers must be real numbers")
            flat[offset:offset + size] = array.reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        """Layer-shaped views into ``flat`` (no copy; they share ``flat``'s dtype and memory)."""
        flat = check.vector(flat, "flat", length=self.size)
        return [flat[offset:offset + size].reshape(shape)
                for offset, size, shape in zip(self.offsets, self.sizes, self.shapes)]

    def empty_updates(self, k: int) -> "UpdateMatrix":
        """A preallocated :class:`UpdateMatrix` for ``k`` clients of this layout."""
        return UpdateMatrix(k, self.size, self.dtype)


class UpdateMatrix(UpdatesSource):
    """A preallocated K x D update matrix with per-client row views and weights.

    Pass it anywhere updates are accepted; ``weighted_mean(matrix)`` uses its weights.

    Parameters
    ----------
    k, d : number of clients and of coordinates
    dtype : float32 (default) or float64

    Attributes
    ----------
    array : the (K, D) C-contiguous matrix
    weights : (K,) float64 weights, 1 until set

    Examples
    --------
    >>> updates = fedkern.UpdateMatrix(2, 3)
    >>> updates.set(0, np.ones(3, np.float32), weight=10)
    >>> updates[1][:] = 4.0                # a client writes its row in place
    >>> updates.weights[1] = 30
    >>> fedkern.weighted_mean(updates)
    array([3.25, 3.25, 3.25], dtype=float32)
    """

    def __init__(self, k: int, d: int, dtype: DTypeLike = np.float32):
        for name, value in (("k", k), ("d", d)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise check.FedkernValueError(f"{name} must be a positive integer; got {value!r}")
        self.array = np.zeros((int(k), int(d)), check.result_dtype(dtype, np.dtype(np.float32)))
        self.weights = np.ones(int(k))

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        """Row ``i`` as a writable view."""
        return self.array[self._index(i)]

    def __iter__(self):
        return iter(self.array)

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise check.FedkernValueError(f"client index {i!r} is out of range for {len(self)} clients")
        return int(i) % len(self)

    def set(self, i: int, update: np.ndarray, weight: float = 1.0) -> None:
        """Copy client ``i``'s 1-D update into its row and record its weight (>= 0)."""
        i = self._index(i)
        update = np.asarray(update)
        if update.shape != (self.array.shape[1],):
            raise check.FedkernValueError(f"update has shape {update.shape}; expected ({self.array.shape[1]},)")
        if update.dtype.kind not in "iuf":
            raise check.FedkernTypeError(f"update has dtype {update.dtype}; expected real numbers")
        self.weights[i] = check.real(weight, "weight", low=0.0)
        self.array[i] = update
