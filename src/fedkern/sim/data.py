"""Federated data in one buffer: every client is a slice (DESIGN.md section 6).

All clients' rows live in one (N, F) float32 matrix ``x`` and one (N,) int32 label vector
``y``, grouped by client. Client ``c`` owns rows ``offsets[c]:offsets[c + 1]`` (CSR row
pointers), so a million clients cost two integer arrays and no Python object per client;
:meth:`FederatedData.client` hands out zero-copy views.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._errors import FedkernTypeError, FedkernValueError
from .._validate import count

__all__ = ["FederatedData", "FederatedDataset"]

_INT32_MAX = int(np.iinfo(np.int32).max)


def _readonly(array: np.ndarray) -> np.ndarray:
    """A read-only view: the engine cannot change the data, and the caller's flags stay as they were."""
    if not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


def _features(x, name: str = "x") -> np.ndarray:
    """Validate a (N, F) real matrix; return it float32 C-contiguous (copied only if needed)."""
    array = np.asarray(x)
    if array.dtype.kind not in "biuf":
        raise FedkernTypeError(f"{name} must hold real numbers; got dtype {array.dtype}")
    if array.ndim != 2:
        raise FedkernValueError(f"{name} must be a 2-D (rows, features) array; got shape {array.shape}")
    if array.shape[1] == 0:
        raise FedkernValueError(f"{name} has no features (shape {array.shape}); need at least one column")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf and is reported below
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise FedkernValueError(f"{name} holds a NaN or infinity (in float32) in row {row}")
    return array


def _labels(y, n_rows: int, name: str = "y") -> np.ndarray:
    """Validate N non-negative integer labels (integral floats allowed); return them int32."""
    array = np.asarray(y)
    if array.dtype.kind not in "biuf":
        raise FedkernTypeError(f"{name} must hold integer labels; got dtype {array.dtype}")
    if array.ndim != 1 or array.shape[0] != n_rows:
        raise FedkernValueError(f"{name} must be 1-D with one label per row ({n_rows}); got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int32)
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise FedkernValueError(f"{name} must hold integer labels; got non-integral or non-finite floats")
    low, high = array.min(), array.max()
    if low < 0:
        raise FedkernValueError(f"{name} must hold labels >= 0; got {low}")
    if high > _INT32_MAX:
        raise FedkernValueError(f"{name} holds label {high}, above the int32 range")
    return np.ascontiguousarray(array, dtype=np.int32)


def _n_classes(n_classes, y: np.ndarray, name: str = "n_classes") -> int:
    """Default the class count to max(y) + 1, else check every label lies below it."""
    if n_classes is None:
        if y.size == 0:
            raise FedkernValueError(f"{name} cannot be inferred from zero labels; pass {name}")
        return int(y.max()) + 1
    value = count(n_classes, name, low=1)
    if y.size and int(y.max()) >= value:
        raise FedkernValueError(f"labels must lie in [0, {name}={value}); got label {int(y.max())}")
    return value


def _offsets(offsets, n_rows: int, name: str = "offsets") -> np.ndarray:
    """Validate CSR row pointers: int, 0 first, non-decreasing, N last; return them int64."""
    array = np.asarray(offsets)
    if array.dtype.kind not in "iu":
        raise FedkernTypeError(f"{name} must hold integers; got dtype {array.dtype}")
    if array.ndim != 1 or array.shape[0] < 2:
        raise FedkernValueError(f"{name} must be 1-D with n_clients + 1 >= 2 entries; got shape {array.shape}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array[0] != 0 or array[-1] != n_rows:
        raise FedkernValueError(f"{name} must start at 0 and end at the row count {n_rows}; "
                                f"got {array[0]} ... {array[-1]}")
    steps = np.diff(array)
    if (steps < 0).any():
        at = int(np.flatnonzero(steps < 0)[0])
        raise FedkernValueError(f"{name} must be non-decreasing; {name}[{at + 1}] < {name}[{at}]")
    return array


def _index_array(obj, name: str) -> np.ndarray:
    """A 1-D integer array (a list of ints is accepted; an empty list is an empty index)."""
    array = np.asarray(obj)
    if array.size == 0 and array.ndim == 1:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise FedkernTypeError(f"{name} must hold integer row indices; got dtype {array.dtype}")
    if array.ndim != 1:
        raise FedkernValueError(f"{name} must be 1-D; got shape {array.shape}")
    return array.astype(np.int64, copy=False)


class FederatedData:
    """All clients' rows in one buffer; client ``c`` owns rows ``offsets[c]:offsets[c+1]``.

    Parameters
    ----------
    x : array_like, shape (N, F)
        Features; stored float32 C-contiguous (copied only if it is not already), finite.
    y : array_like, shape (N,)
        Integer labels >= 0 (floats with no fractional part are accepted); stored int32.
    offsets : array_like of int, shape (n_clients + 1,)
        Row pointers: ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == N``. Equal
        neighbours make an empty client, which is allowed.
    n_classes : int, optional
        Number of classes; defaults to ``y.max() + 1``. Every label must lie below it.

    Notes
    -----
    The stored arrays are read-only views, so no stage of a simulation can change the
    data by accident (label flipping builds a new object with :meth:`with_labels`).

    Examples
    --------
    >>> from fedkern.sim.data import FederatedData
    >>> data = FederatedData(np.arange(10.0).reshape(5, 2), [0, 1, 1, 0, 2], [0, 2, 2, 5])
    >>> data.n_clients, len(data), data.sizes.tolist()
    (3, 5, [2, 0, 3])
    >>> data.client(2)[1].tolist()
    [1, 0, 2]
    >>> data.label_counts().tolist()
    [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    n_classes: int

    def __init__(self, x, y, offsets, n_classes: int | None = None):
        features = _features(x)
        labels = _labels(y, features.shape[0])
        self._set(features, labels, _offsets(offsets, features.shape[0]), _n_classes(n_classes, labels))

    def _set(self, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, n_classes: int) -> None:
        self.x, self.y, self.offsets = _readonly(x), _readonly(y), _readonly(offsets)
        self.n_classes = n_classes
        self._sizes = _readonly(np.diff(offsets))
        self._label_counts: np.ndarray | None = None

    @classmethod
    def _trusted(cls, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, n_classes: int) -> FederatedData:
        """Build from arrays already validated and converted (no second pass over x)."""
        data = cls.__new__(cls)
        data._set(x, y, offsets, n_classes)
        return data

    @property
    def n_clients(self) -> int:
        """Number of clients (some may be empty)."""
        return self.offsets.shape[0] - 1

    @property
    def n_features(self) -> int:
        """Number of feature columns F."""
        return self.x.shape[1]

    @property
    def sizes(self) -> np.ndarray:
        """Rows per client, ``np.diff(offsets)`` (int64, read-only)."""
        return self._sizes

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (f"FederatedData(n_clients={self.n_clients}, rows={len(self)}, "
                f"n_features={self.n_features}, n_classes={self.n_classes})")

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero-copy views ``(x[a:b], y[a:b])`` of client ``c``'s rows, 0 <= c < n_clients."""
        c = count(c, "c", low=0, high=self.n_clients - 1, why=" (a client index)")
        start, stop = self.offsets[c], self.offsets[c + 1]
        return self.x[start:stop], self.y[start:stop]

    def label_counts(self) -> np.ndarray:
        """Rows of each class per client, shape (n_clients, n_classes) int64; computed once."""
        if self._label_counts is None:
            owner = np.repeat(np.arange(self.n_clients, dtype=np.int64), self._sizes)
            flat = np.bincount(owner * self.n_classes + self.y, minlength=self.n_clients * self.n_classes)
            self._label_counts = _readonly(flat.reshape(self.n_clients, self.n_classes))
        return self._label_counts

    def with_labels(self, y) -> FederatedData:
        """The same features and clients with new labels (e.g. flipped), in [0, n_classes)."""
        labels = _labels(y, len(self))
        return type(self)._trusted(self.x, labels, self.offsets, _n_classes(self.n_classes, labels))

    @classmethod
    def from_client_ids(cls, x, y, client_ids, n_clients: int | None = None,
                        n_classes: int | None = None) -> FederatedData:
        """Group rows by the client id of each row (a stable sort keeps each client's row order).

        ``client_ids`` holds one integer in [0, n_clients) per row; ``n_clients`` defaults to
        ``client_ids.max() + 1``, and clients with no row are empty.

        Examples
        --------
        >>> from fedkern.sim.data import FederatedData
        >>> data = FederatedData.from_client_ids(np.eye(4), [0, 1, 2, 3], [1, 0, 1, 0])
        >>> data.offsets.tolist(), data.y.tolist()
        ([0, 2, 4], [1, 3, 0, 2])
        """
        features = _features(x)
        labels = _labels(y, features.shape[0])
        ids = _index_array(client_ids, "client_ids")
        if ids.shape[0] != features.shape[0]:
            raise FedkernValueError(f"client_ids must have one id per row ({features.shape[0]}); got {ids.shape[0]}")
        if ids.size and ids.min() < 0:
            raise FedkernValueError(f"client_ids must be >= 0; got {int(ids.min())}")
        top = int(ids.max()) + 1 if ids.size else 0
        if n_clients is None:
            if top == 0:
                raise FedkernValueError("n_clients cannot be inferred from zero rows; pass n_clients")
            n_clients = top
        n_clients = count(n_clients, "n_clients", low=max(1, top),
                          why=f" (client_ids go up to {top - 1})" if top else "")
        order = np.argsort(ids, kind="stable")
        offsets = np.zeros(n_clients + 1, dtype=np.int64)
        np.cumsum(np.bincount(ids, minlength=n_clients), out=offsets[1:])
        return cls._trusted(features[order], labels[order], offsets, _n_classes(n_classes, labels))

    @classmethod
    def from_partition(cls, x, y, partition: Sequence[np.ndarray], n_classes: int | None = None) -> FederatedData:
        """Gather rows ``partition[c]`` (in that order) into client ``c``.

        The index arrays need not cover every row (uncovered rows are left out), but no
        row may appear twice. Labels outside the partition still count when inferring
        ``n_classes``, so train splits keep the dataset's class count.

        Examples
        --------
        >>> from fedkern.sim.data import FederatedData
        >>> data = FederatedData.from_partition(np.eye(4), [0, 1, 2, 3], [np.array([3, 1]), np.array([0])])
        >>> data.y.tolist(), data.sizes.tolist(), data.n_classes
        ([3, 1, 0], [2, 1], 4)
        """
        features = _features(x)
        labels = _labels(y, features.shape[0])
        if isinstance(partition, np.ndarray) or not isinstance(partition, Sequence):
            raise FedkernTypeError(f"partition must be a sequence of per-client index arrays; "
                                   f"got {type(partition).__name__}")
        if len(partition) == 0:
            raise FedkernValueError("partition is empty; need at least one client")
        parts = [_index_array(part, f"partition[{c}]") for c, part in enumerate(partition)]
        order = np.concatenate(parts)
        n_rows = features.shape[0]
        if order.size and (order.min() < 0 or order.max() >= n_rows):
            bad = int(order[(order < 0) | (order >= n_rows)][0])
            raise FedkernValueError(f"partition holds row index {bad}, outside [0, {n_rows})")
        times = np.bincount(order, minlength=n_rows)
        if order.size and times.max() > 1:
            raise FedkernValueError(f"partition gives row {int(np.argmax(times))} to more than one place; "
                                    f"a row belongs to one client once")
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([part.shape[0] for part in parts], out=offsets[1:])
        return cls._trusted(features[order], labels[order], offsets, _n_classes(n_classes, labels))


@dataclass(frozen=True)
class FederatedDataset:
    """A federated train set, its test set and a name.

    ``test`` holds either one client (a central test set) or one part per train client,
    with the same features and the same ``n_classes`` as ``train``.
    """

    train: FederatedData
    test: FederatedData
    name: str

    def __post_init__(self) -> None:
        for field in ("train", "test"):
            if not isinstance(getattr(self, field), FederatedData):
                raise FedkernTypeError(f"{field} must be a FederatedData; got {type(getattr(self, field)).__name__}")
        if not isinstance(self.name, str):
            raise FedkernTypeError(f"name must be a str; got {type(self.name).__name__}")
        train, test = self.train, self.test
        if test.n_features != train.n_features:
            raise FedkernValueError(f"test has {test.n_features} features but train has {train.n_features}")
        if test.n_classes != train.n_classes:
            raise FedkernValueError(f"test has n_classes={test.n_classes} but train has {train.n_classes}; "
                                    f"build both with the same n_classes")
        if test.n_clients not in (1, train.n_clients):
            raise FedkernValueError(f"test must have 1 client (central) or one per train client "
                                    f"({train.n_clients}); got {test.n_clients}")
