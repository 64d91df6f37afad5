"""Backend registry: which kernels run an op, and on how many threads.

A backend is chosen, from the most to the least specific, by an op's ``backend=``
argument, the innermost ``with use_backend(name):`` block, ``set_backend(name)``, the
``FEDKERN_BACKEND`` environment variable, and finally ``"auto"``. ``"auto"`` picks the
first importable backend in :data:`AUTO_ORDER` for the op's family; the numpy
``"reference"`` backend always works.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

from ._errors import BackendUnavailableError, FedkernTypeError, FedkernValueError

NAMES = ("reference", "cython", "numba")
_PACKAGES = {"reference": "fedkern._reference", "cython": "fedkern._cython", "numba": "fedkern._numba"}

#: The order ``"auto"`` tries for a family with no entry of its own (a new family).
DEFAULT_ORDER = ("cython", "numba", "reference")
#: Backend tried first by ``"auto"``, per op family, or per ``"family.kernel"`` where one
#: kernel of a family is fastest elsewhere (fastest measured first, see README).
AUTO_ORDER = {
    "aggregate": ("cython", "numba", "reference"),
    "optim": ("cython", "numba", "reference"),
    "robust": ("cython", "numba", "reference"),
    "robust.meamed": ("numba", "cython", "reference"),
}

_global_backend = os.environ.get("FEDKERN_BACKEND", "auto")
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedkern_backend", default=None)
_modules: dict[tuple[str, str], ModuleType | BaseException] = {}


def _default_threads() -> int:
    configured = os.environ.get("FEDKERN_NUM_THREADS")
    if configured:
        try:
            threads = int(configured)
        except ValueError:
            threads = 0
        if threads < 1:
            raise FedkernValueError(f"FEDKERN_NUM_THREADS must be a positive integer; got {configured!r}")
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_num_threads = _default_threads()


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise FedkernTypeError(f"backend must be a string; got {type(name).__name__}")
    if name not in NAMES and name != "auto":
        choices = ", ".join(repr(n) for n in NAMES + ("auto",))
        raise FedkernValueError(f"unknown backend {name!r}; choose one of {choices}")
    return name


def get_backend() -> str:
    """The backend ops use when given no ``backend=`` (possibly ``"auto"``)."""
    return _scoped_backend.get() or _global_backend


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "reference", "cython", "numba" or "auto"."""
    global _global_backend
    _global_backend = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` as the default backend inside a ``with`` block (thread- and task-local).

    >>> updates = [np.ones(3), np.zeros(3)]
    >>> with fedkern.use_backend("numba"):
    ...     fedkern.weighted_mean(updates)
    array([0.5, 0.5, 0.5])
    """
    token = _scoped_backend.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def get_num_threads() -> int:
    """Number of threads the compiled backends use."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Set the threads used by both the Cython (OpenMP) and the Numba kernels.

    Results do not depend on it: kernels split work over coordinates and reduce over
    clients in a fixed order.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FedkernValueError(f"n must be a positive integer; got {n!r}")
    _num_threads = n


def cpu_flags() -> frozenset[str] | None:
    """The running CPU's feature flags as /proc/cpuinfo names them (None: not known here)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _check_cython_build() -> None:
    """Refuse Cython kernels compiled for instructions this CPU lacks (e.g. a build made on
    an AVX-512 machine, then used on one without): they would die of SIGILL, not raise."""
    build = importlib.import_module("fedkern._cython._build")
    flags = cpu_flags()
    missing = [name for name in build.ISA if flags is not None and name not in flags]
    if missing:
        raise ImportError(
            f"its kernels were compiled (-march=native) for a CPU with {', '.join(missing)}, which this CPU "
            f"lacks; reinstall fedkern on this machine (pip install --force-reinstall --no-cache-dir ...) "
            f"or build it with FEDKERN_PORTABLE=1"
        )


def _load(backend: str, family: str) -> ModuleType:
    key = (backend, family)
    if key not in _modules:
        try:
            if backend == "cython":
                _check_cython_build()
            _modules[key] = importlib.import_module(f"{_PACKAGES[backend]}.{family}")
        except ModuleNotFoundError as err:
            if backend == "cython" and err.name and err.name.startswith("fedkern._cython"):
                err = ImportError(f"{err.name} was not built (was there a C compiler when fedkern was installed?)")
            _modules[key] = err
        except Exception as err:  # numba missing or broken shows up here, once
            _modules[key] = err
    module = _modules[key]
    if isinstance(module, BaseException):
        raise BackendUnavailableError(f"the {backend} backend is not available: {module}") from module
    return module


def is_available(backend: str, family: str = "aggregate") -> bool:
    """Whether ``backend`` can run ops of ``family`` on this machine ("auto" always can)."""
    if _check_name(backend) == "auto":
        return True
    try:
        _load(backend, family)
    except BackendUnavailableError:
        return False
    return True


def _order(family: str, kernel: str | None) -> tuple[str, ...]:
    return AUTO_ORDER.get(f"{family}.{kernel}", AUTO_ORDER.get(family, DEFAULT_ORDER))


def resolve(family: str, backend: str | None = None, kernel: str | None = None) -> str:
    """Name of the concrete backend that will run ``kernel`` (or any kernel) of ``family``."""
    name = _check_name(backend if backend is not None else get_backend())
    if name != "auto":
        return name
    return next(b for b in _order(family, kernel) if is_available(b, family))


class Kernels:
    """The kernels of one family as a backend runs them.

    Each kernel comes from the chosen backend's module or, where that module lacks it (a
    kernel not yet written for that engine), from the next backend of the family's order
    that has it, and finally from the numpy reference, which has them all.
    """

    def __init__(self, family: str, backend: str, module: ModuleType):
        self.family = family
        self.backend = backend
        self._module = module

    def __getattr__(self, kernel: str):
        if kernel.startswith("_"):
            # not a kernel; also keeps copy/pickle probes from recursing before __init__ ran
            raise AttributeError(kernel)
        function = getattr(self._module, kernel, None)
        if function is not None:
            return function
        return self._fallback(kernel)

    def _fallback(self, kernel: str):
        for name in _order(self.family, kernel) + ("reference",):
            if name != self.backend and is_available(name, self.family):
                function = getattr(_load(name, self.family), kernel, None)
                if function is not None:
                    if name != "reference":
                        _load(name, "_runtime").use_threads(_num_threads)
                    return function
        raise AttributeError(f"no backend of the {self.family} family has a kernel {kernel!r}")

    def __reduce__(self):
        # a module does not pickle: a copy sent to another process (a process or Ray
        # executor's worker) loads the same concrete backend there, on that process's threads
        return kernels, (self.family, self.backend)

    def __repr__(self) -> str:
        return f"<fedkern kernels {self.family} on {self.backend}>"


def kernels(family: str, backend: str | None = None, kernel: str | None = None) -> Kernels:
    """The kernels of ``family`` for ``backend`` (``kernel``: the one kernel the caller will
    run, for a per-kernel ``"auto"`` order), with a per-kernel fallback, ready to run on the
    set threads."""
    name = resolve(family, backend, kernel)
    module = _load(name, family)  # an explicitly chosen backend that does not import raises here
    if name != "reference":
        _load(name, "_runtime").use_threads(_num_threads)
    return Kernels(family, name, module)
