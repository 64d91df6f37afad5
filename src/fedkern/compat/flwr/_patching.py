"""Swapping fedkern's helpers into Flower: :func:`install`, :func:`uninstall`, :func:`patched`.

Every loaded Flower module that holds one of Flower's helpers gets the function of the
same name from :mod:`.legacy` or :mod:`.message`; the Message-API modules that call
``np.median`` inline get a stand-in for numpy whose ``median`` is fedkern's. Flower is
imported by :func:`install`, never at import time.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Callable

import numpy as np

from . import legacy, message
from ._layers import _compute_dtype, _median_layer, _split_clients


# --------------------------------------------------------------------------------------
# np.median as Flower's Message-API strategies call it
# --------------------------------------------------------------------------------------

def _median_like_numpy(a, axis=None, out=None, overwrite_input=False, keepdims=False):
    """``np.median`` with a fedkern fast path for ``axis=0`` over K same-shaped arrays.

    Every layer shape takes the fast path, 0-d layers included (stacked, they are a 1-D
    array), so NaN is ordered as +inf in every layer alike. As ``np.median``, a 0-d
    result is returned as a numpy scalar.
    """
    if axis == 0 and out is None and not keepdims:
        arrays = _split_clients(a)
        if arrays and len({x.shape for x in arrays}) == 1 and _compute_dtype(np.result_type(*arrays)) is not None:
            result = _median_layer(arrays)
            return result[()] if result.ndim == 0 else result
    return np.median(a, axis=axis, out=out, overwrite_input=overwrite_input, keepdims=keepdims)


class _NumpyWithFedkernMedian(types.ModuleType):
    """Stands in for ``numpy`` in a Flower module: everything is numpy's except ``median``."""

    def __init__(self):
        super().__init__("numpy")
        self.median = _median_like_numpy

    def __getattr__(self, name):
        return getattr(np, name)


# --------------------------------------------------------------------------------------
# install / uninstall / patched
# --------------------------------------------------------------------------------------

#: Flower module -> helper names it defines, replaced by fedkern's functions of those names.
_TARGETS = {
    "flwr.server.strategy.aggregate": (
        "aggregate", "aggregate_inplace", "aggregate_median", "aggregate_trimmed_avg", "aggregate_krum",
        "aggregate_bulyan", "weighted_loss_avg", "aggregate_qffl",
    ),
    "flwr.serverapp.strategy.strategy_utils": ("aggregate_arrayrecords",),
    "flwr.serverapp.strategy.multikrum": ("compute_distances", "select_multikrum"),
    "flwr.serverapp.strategy.bulyan": ("aggregate_n_closest_weights",),
    "flwr.serverapp.strategy.fedtrimmedavg": ("trim_mean",),
}
#: Strategy packages imported by install() so every module importing a helper is patched.
_PACKAGES = ("flwr.server.strategy", "flwr.serverapp.strategy")
#: Message-API modules that call ``np.median`` inline (FedMedian, Bulyan).
_NUMPY_MEDIAN_MODULES = ("flwr.serverapp.strategy.fedmedian", "flwr.serverapp.strategy.bulyan")

_lock = threading.RLock()
_depth = 0
_originals: dict[int, tuple[str, Callable]] = {}  # id(Flower's function) -> (name, function)
_numpy_proxy = _NumpyWithFedkernMedian()

#: Flower's helper name -> fedkern's function of that name (what install() puts in).
_OURS: dict[str, Callable] = {name: getattr(module, name) for module in (legacy, message) for name in module.__all__}


def _flwr_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "flwr" or name.startswith("flwr."))]


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _depth > 0


def install() -> None:
    """Make Flower's strategies aggregate with fedkern.

    Every loaded Flower module whose global is one of Flower's helpers (the defining
    module and each strategy module that did ``from .aggregate import aggregate``) gets
    fedkern's function of the same name; the Message-API FedMedian and Bulyan get an
    ``np`` whose ``median`` is fedkern's. Calls nest: each :func:`install` needs one
    :func:`uninstall`. Message-API ``Bulyan`` binds its selection rule when constructed,
    so construct it after installing. Raises ``ImportError`` when Flower is missing.
    """
    global _depth
    import importlib

    with _lock:
        if _depth:
            _depth += 1
            return
        try:
            for package in _PACKAGES:
                importlib.import_module(package)
            defining = {name: importlib.import_module(name) for name in _TARGETS}
        except ImportError as err:
            raise ImportError(f"fedkern.compat.flwr.install() needs Flower (pip install flwr): {err}") from err
        ours = _OURS
        for module_name, names in _TARGETS.items():
            for name in names:
                original = getattr(defining[module_name], name)
                if original is not ours[name]:
                    _originals[id(original)] = (name, original)
        for module in _flwr_modules():
            for attr, value in list(vars(module).items()):
                if callable(value) and id(value) in _originals and _originals[id(value)][1] is value:
                    setattr(module, attr, ours[_originals[id(value)][0]])
        for module_name in _NUMPY_MEDIAN_MODULES:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, "np", None) is np:
                module.np = _numpy_proxy
        _depth = 1


def uninstall() -> None:
    """Undo :func:`install`: every Flower module gets Flower's own helpers back."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth:
            return
        ours = _OURS
        by_name = {name: fn for name, fn in _originals.values()}
        for module in _flwr_modules():
            for attr, value in list(vars(module).items()):
                if attr in by_name and value is ours.get(attr):
                    setattr(module, attr, by_name[attr])
            if getattr(module, "np", None) is _numpy_proxy:
                module.np = np


@contextlib.contextmanager
def patched():
    """``with patched():`` Flower's strategies aggregate with fedkern inside the block."""
    install()
    try:
        yield
    finally:
        uninstall()
