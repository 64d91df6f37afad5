"""Decoding Flower's serialised arrays without a copy.

Flower serialises every array with ``np.save`` (``Parameters.tensors`` of the ``Ins/Res``
API, ``Array.data`` of the Message API) and decodes it with ``np.load``, which copies it.
The kernels only read, so :func:`_decode` returns a read-only view of the bytes instead.
"""
from __future__ import annotations

import functools
import io

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int] | None:
    """(dtype, shape, fortran_order, data offset) of a .npy header, or None if unusual."""
    stream = io.BytesIO(prefix)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return None
    except ValueError:
        return None
    if dtype.hasobject:
        return None
    return dtype, shape, fortran, stream.tell()


def _decode(data: bytes) -> np.ndarray:
    """A numpy array from ``np.save`` bytes, as a read-only view of ``data`` (no copy).

    Flower's ``np.load`` copies every array out of its buffer; the kernels only read, so a
    view suffices. Anything unusual (other .npy versions, object dtypes, truncated data)
    goes through ``np.load(allow_pickle=False)``, which raises as Flower would.
    """
    header = None
    if len(data) >= 12 and data[:6] == _NPY_MAGIC:
        size = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
        if size <= len(data):
            header = _npy_header(bytes(data[:size]))
    if header is not None:
        dtype, shape, fortran, offset = header
        count = int(np.prod(shape, dtype=np.int64))
        if offset + count * dtype.itemsize <= len(data):
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            return flat.reshape(shape, order="F" if fortran else "C")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_array(array) -> np.ndarray:
    """A Flower ``Array`` as a numpy array (zero-copy for numpy-serialised arrays)."""
    if getattr(array, "stype", None) == "numpy.ndarray" and isinstance(getattr(array, "data", None), bytes):
        return _decode(array.data)
    return array.numpy()


def _decode_record(record) -> list[np.ndarray]:
    """An ``ArrayRecord``'s arrays in key order, as ``ArrayRecord.to_numpy_ndarrays`` does."""
    return [_decode_array(value) for value in record.values()]
