"""The one place where fedkern checks and normalises its inputs.

Every public op calls these helpers before any kernel runs, so compiled code only ever
sees contiguous, correctly typed buffers of the lengths it expects. The exceptions they
raise live in :mod:`fedkern._errors`, the kernel-input view they return in
:mod:`fedkern._updates`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np

from ._errors import FedkernTypeError, FedkernValueError, NonFiniteError
from ._updates import Updates, UpdatesSource

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name if dtype.isnative else dtype.str


def _check_float_dtype(dtype: np.dtype, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise FedkernTypeError(
            f"{name} has dtype {_dtype_name(dtype)}; fedkern works on float32 or float64 "
            f"(convert with .astype(np.float32))"
        )


def _check_contiguous(array: np.ndarray, name: str) -> None:
    if not array.flags.c_contiguous:
        raise FedkernValueError(
            f"{name} is not C-contiguous (strides {array.strides}); fedkern reads contiguous "
            f"buffers and never copies silently: pass np.ascontiguousarray({name})"
        )


def updates(obj, name: str = "updates") -> Updates:
    """Validate K client updates: a (K, D) array or a sequence of K 1-D arrays.

    Rules: K >= 1 and D >= 1; float32 or float64 with native byte order, one dtype for all
    rows; every row C-contiguous (non-contiguous input raises instead of being copied);
    every row of the same length D. A :class:`fedkern.UpdateMatrix` is accepted as its
    matrix.
    """
    if isinstance(obj, UpdatesSource):
        obj = obj.array
    if isinstance(obj, np.ndarray):
        if obj.ndim != 2:
            raise FedkernValueError(
                f"{name} must be a 2-D (K, D) array or a sequence of K 1-D arrays; "
                f"got an array with shape {obj.shape}"
            )
        if obj.shape[0] == 0 or obj.shape[1] == 0:
            raise FedkernValueError(f"{name} is empty (shape {obj.shape}); need K >= 1 clients and D >= 1 coordinates")
        _check_float_dtype(obj.dtype, name)
        _check_contiguous(obj, name)
        return Updates(None, obj)
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise FedkernTypeError(
            f"{name} must be a 2-D (K, D) array or a sequence of K 1-D arrays; got {type(obj).__name__}"
        )
    rows = tuple(obj)
    if not rows:
        raise FedkernValueError(f"{name} is empty; need at least one client update")
    for i, row in enumerate(rows):
        label = f"{name}[{i}]"
        if not isinstance(row, np.ndarray):
            raise FedkernTypeError(f"{label} must be a numpy array; got {type(row).__name__}")
        if row.ndim != 1:
            raise FedkernValueError(f"{label} must be 1-D; got shape {row.shape} (flatten it, e.g. with fedkern.Layout)")
        _check_float_dtype(row.dtype, label)
        if row.dtype != rows[0].dtype:
            raise FedkernTypeError(
                f"{label} has dtype {row.dtype} but {name}[0] has {rows[0].dtype}; all updates must share one dtype"
            )
        if row.shape[0] != rows[0].shape[0]:
            raise FedkernValueError(
                f"{label} has length {row.shape[0]} but {name}[0] has {rows[0].shape[0]}; all updates must have one length"
            )
        _check_contiguous(row, label)
    if rows[0].shape[0] == 0:
        raise FedkernValueError(f"{name} are empty (length 0); need D >= 1 coordinates")
    return Updates(rows, None)


def weights(obj, k: int, name: str = "weights") -> np.ndarray:
    """Validate K weights: 1-D, real, finite, >= 0 and not all zero. Returns float64."""
    if isinstance(obj, np.ndarray) and obj.dtype.kind not in "iuf":
        raise FedkernTypeError(f"{name} must be real numbers; got dtype {obj.dtype}")
    try:
        # No dtype= here: it would parse strings such as "1" as numbers.
        array = np.asarray(obj)
    except (TypeError, ValueError) as err:
        raise FedkernTypeError(f"{name} must be a 1-D sequence of real numbers: {err}") from None
    if array.dtype.kind not in "iuf":
        raise FedkernTypeError(f"{name} must be a 1-D sequence of real numbers; got {array.dtype} values")
    array = array.astype(np.float64)
    if array.ndim != 1:
        raise FedkernValueError(f"{name} must be 1-D; got shape {array.shape}")
    if array.shape[0] != k:
        raise FedkernValueError(f"{name} has length {array.shape[0]} but there are {k} updates")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise FedkernValueError(f"{name}[{bad[0]}] is {array[bad[0]]}; weights must be finite")
    bad = np.flatnonzero(array < 0)
    if bad.size:
        raise FedkernValueError(f"{name}[{bad[0]}] is {array[bad[0]]}; weights must be >= 0")
    if not array.any():
        raise FedkernValueError(f"{name} are all zero; at least one weight must be positive")
    return array


def result_dtype(dtype, default: np.dtype, name: str = "dtype") -> np.dtype:
    """Resolve a ``dtype=`` argument (None means ``default``) to float32 or float64."""
    if dtype is None:
        return default
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise FedkernTypeError(f"{name} must be a numpy dtype; got {dtype!r}") from None
    _check_float_dtype(resolved, name)
    return resolved


def out(obj, shape: tuple[int, ...], default: np.dtype, dtype=None, name: str = "out") -> np.ndarray:
    """Check ``obj`` as an output buffer of ``shape``, or allocate one.

    The result's dtype is ``dtype`` if given (``obj`` must then have it), else ``obj``'s
    own float dtype, else ``default``.
    """
    wanted = result_dtype(dtype, default) if obj is None or dtype is not None else None
    if obj is None:
        return np.empty(shape, wanted)
    if not isinstance(obj, np.ndarray):
        raise FedkernTypeError(f"{name} must be a numpy array; got {type(obj).__name__}")
    if obj.shape != shape:
        raise FedkernValueError(f"{name} has shape {obj.shape}; expected {shape}")
    if wanted is not None and obj.dtype != wanted:
        raise FedkernTypeError(f"{name} has dtype {_dtype_name(obj.dtype)} but dtype={wanted} was asked for")
    _check_float_dtype(obj.dtype, name)
    _check_contiguous(obj, name)
    if not obj.flags.writeable:
        raise FedkernValueError(f"{name} is read-only")
    return obj


def out_updates(obj, like: Updates, name: str = "out") -> Updates:
    """An output for a K x D result: a new matrix, or an array / K rows shaped like ``like``."""
    if obj is None:
        return Updates(None, np.empty((like.k, like.d), like.dtype))
    result = updates(obj, name)
    if (result.k, result.d) != (like.k, like.d):
        raise FedkernValueError(f"{name} holds {result.k} x {result.d} values; expected {like.k} x {like.d}")
    if result.dtype != like.dtype:
        raise FedkernTypeError(f"{name} has dtype {result.dtype}; expected {like.dtype}")
    for i, row in enumerate(result):
        if not row.flags.writeable:
            raise FedkernValueError(f"{name}[{i}] is read-only")
    return result


def vector(obj, name: str, length: int | None = None, writeable: bool = False) -> np.ndarray:
    """Validate a 1-D contiguous float32/float64 array (of ``length``, if given)."""
    if not isinstance(obj, np.ndarray):
        raise FedkernTypeError(f"{name} must be a numpy array; got {type(obj).__name__}")
    if obj.ndim != 1:
        raise FedkernValueError(f"{name} must be 1-D; got shape {obj.shape}")
    if obj.shape[0] == 0:
        raise FedkernValueError(f"{name} is empty")
    if length is not None and obj.shape[0] != length:
        raise FedkernValueError(f"{name} has length {obj.shape[0]}; expected {length}")
    _check_float_dtype(obj.dtype, name)
    _check_contiguous(obj, name)
    if writeable and not obj.flags.writeable:
        raise FedkernValueError(f"{name} is read-only but is updated in place")
    return obj


def count(obj, name: str, low: int = 0, high: int | None = None, why: str = "") -> int:
    """Validate an integer in [low, high] (a bool is not a count); ``why`` explains the bound."""
    if isinstance(obj, (bool, np.bool_)) or not isinstance(obj, (int, np.integer)):
        raise FedkernTypeError(f"{name} must be an integer; got {type(obj).__name__}")
    value = int(obj)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise FedkernValueError(f"{name} must be {bounds}{why}; got {value}")
    return value


def real(obj, name: str, *, low: float | None = None, low_inclusive: bool = True,
         high: float | None = None, high_inclusive: bool = True) -> float:
    """Validate a finite real scalar within optional bounds; return it as a float."""
    if isinstance(obj, (bool, np.bool_)) or not isinstance(obj, (int, float, np.integer, np.floating)):
        raise FedkernTypeError(f"{name} must be a real number; got {type(obj).__name__}")
    value = float(obj)
    if not math.isfinite(value):
        raise FedkernValueError(f"{name} must be finite; got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise FedkernValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}; got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise FedkernValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}; got {value}")
    return value


def raise_nonfinite(op: str, inputs: Updates | Sequence[np.ndarray], result: np.ndarray | None = None,
                    name: str = "updates") -> None:
    """Raise :class:`NonFiniteError` for the first input row holding NaN or inf.

    Called only after a kernel reported a non-finite value, so the extra scan runs on the
    error path alone. If every input is finite the result overflowed its dtype.
    """
    for i, row in enumerate(inputs):
        bad = np.flatnonzero(~np.isfinite(row))
        if bad.size:
            label = f"{name}[{i}]" if name == "updates" else name
            raise NonFiniteError(
                f"{op}: {label} holds a non-finite value ({row[bad[0]]} at index {bad[0]}); "
                f"drop that client or pass check_finite=False",
                client=i if name == "updates" else None, position=int(bad[0]),
            )
    position = None
    if result is not None:
        bad = np.flatnonzero(~np.isfinite(result))
        position = int(bad[0]) if bad.size else None
    raise NonFiniteError(
        f"{op}: every input is finite but the result overflows {result.dtype if result is not None else 'its dtype'}"
        f"{'' if position is None else f' at index {position}'}; use dtype=np.float64 or smaller weights",
        client=None, position=position,
    )


def parameters(function: Callable, params: dict, what: str, given: Sequence[str] = ()) -> None:
    """Check that ``function`` takes every keyword of ``params`` and gets each it requires.

    ``what`` names the thing being configured (e.g. ``"dataset 'digits'"``); ``given`` are
    the parameters the caller passes itself, which ``params`` may not set.
    """
    signature = inspect.signature(function).parameters
    accepted = [p for p in signature if p not in given]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise FedkernValueError(f"{what} takes no parameter {unknown[0]!r}; its parameters are {', '.join(accepted)}")
    missing = [p for p in accepted if signature[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise FedkernValueError(f"{what} needs parameter {missing[0]!r}")
