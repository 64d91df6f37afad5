"""The benchmark cases: every registry row at the sizes of a profile, in one table.

``PROFILES`` is the one list of profiles: ``fedkern bench`` takes its flags from it and
``benchmarks/`` its sizes. A profile with :class:`SimSizes` times the simulator's
workloads (:mod:`fedkern.bench.sim`) instead of the ops.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from .. import _registry
from .._errors import FedkernValueError
from .._registry import OpSpec
from .._validate import count

#: Largest K x D float32 matrix the full grid builds (larger cells of the grid are skipped).
FULL_GRID_BYTES = 8 << 30


@dataclass(frozen=True)
class Case:
    """One op at one size: ``make()`` builds its data and returns ``call(backend)``.

    ``call.peer``, when set, is a no-argument call of the peer implementation named
    ``peer`` on the same data. ``peer_package`` is the optional package the peer comes
    from and ``package`` one the whole case needs: when it is not installed, the peer
    (or the case) is skipped with a note saying how to add it.
    """

    op: str
    size: str
    nbytes: int
    make: Callable[[], Callable[[str], object]]
    peer: str | None = None
    peer_package: str | None = None
    package: str | None = None
    family: str = ""

    @property
    def name(self) -> str:
        return f"{self.op}[{self.size}]"


@dataclass(frozen=True)
class SimSizes:
    """Sizes of the simulator's workloads (:mod:`fedkern.bench.sim`); the defaults are the issue's.

    FedProx's protocol (Li et al. 2020: Synthetic(1,1), 30 devices, 10 a round, 20 local
    epochs) runs ``fedprox_rounds`` rounds per candidate and its numpy reference model
    ``reference_rounds``; the cross-device run (``device_clients`` clients,
    ``device_per_round`` a round, 1 epoch) ``device_rounds``, and with a no-op client
    ``no_op_rounds``; the memory run builds ``scale_clients`` x ``scale_rows`` rows and
    reads the RSS after each of ``scale_rounds``. Thread executors get ``workers`` threads.
    """

    fedprox_clients: int = 30
    fedprox_per_round: int = 10
    fedprox_epochs: int = 20
    fedprox_rounds: int = 200
    reference_rounds: int = 3
    device_clients: int = 1000
    device_per_round: int = 100
    device_rounds: int = 30
    no_op_rounds: int = 100
    scale_clients: int = 100_000
    scale_rows: int = 20
    scale_per_round: int = 100
    scale_rounds: tuple[int, int] = (10, 1000)
    workers: int = 2

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name != "scale_rounds":    # reference_rounds = 0 skips the reference model
                count(getattr(self, field.name), field.name, low=0 if field.name == "reference_rounds" else 1)
        early, late = self.scale_rounds
        if not 1 <= early < late:
            raise FedkernValueError(f"scale_rounds must be two round counts 1 <= early < late; got {self.scale_rounds}")


@dataclass(frozen=True)
class ScalingSizes:
    """The grid of ``fedkern bench --scaling`` (:mod:`fedkern.bench.scaling`): ``ops`` at every
    K of ``ks`` x D of ``ds``; ops in ``by_method`` are timed per method, the others per
    compiled backend. ``exponents`` says how an op's work grows with K (K^e x D; 1 unless
    listed), from which a cell's time is predicted and the cell skipped when that exceeds
    ``max_seconds``; a cell whose updates exceed ``memory_fraction`` of the memory is
    skipped too. ``budget`` is the seconds of repeated calls per candidate and cell.
    """

    ops: tuple[str, ...] = ("weighted_mean", "median", "krum", "geometric_median")
    ks: tuple[int, ...] = (10, 100, 1000)
    ds: tuple[int, ...] = (100_000, 1_000_000, 10_000_000)
    by_method: tuple[str, ...] = ("krum",)
    exponents: dict[str, int] = field(default_factory=lambda: {"krum": 2})
    max_seconds: float = 120.0
    memory_fraction: float = 0.5
    budget: float = 1.0

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in _registry.BY_NAME]
        if unknown:
            raise FedkernValueError(f"ops must name registry ops; got {unknown}")
        for name in ("ks", "ds"):
            for value in getattr(self, name):
                count(value, name, low=1)
        if not 0 < self.memory_fraction <= 1:
            raise FedkernValueError(f"memory_fraction must be in (0, 1]; got {self.memory_fraction}")


@dataclass(frozen=True)
class Profile:
    """Sizes of a ``fedkern bench`` profile, per kind of op (or of the simulator's workloads)."""

    help: str
    matrices: tuple[tuple[int, int], ...] = ()  # (K, D) of the aggregation ops on K updates
    vectors: tuple[int, ...] = ()               # D of the ops on one vector (accumulate, optimizer steps)
    robust: tuple[tuple[int, int], ...] = ()    # (K, D) of the robust rules
    flwr: tuple[tuple[int, int], ...] = ()      # (K, D) of the Flower drop-in
    sim: SimSizes | None = None                 # set: the profile runs the simulator's workloads
    scaling: ScalingSizes | None = None         # set: the profile times ops over a K x D grid, per byte


_GRID = tuple((k, d) for k in (10, 100, 1000) for d in (100_000, 1_000_000, 10_000_000)
              if 4 * k * d <= FULL_GRID_BYTES)

PROFILES: dict[str, Profile] = {
    "quick": Profile("CI-sized run, a few seconds", ((10, 100_000),), (100_000,), ((10, 1000),)),
    "default": Profile("every op at its target sizes (about two minutes)",
                       ((100, 1_000_000), (10, 10_000_000)), (10_000_000,), ((100, 100_000),)),
    "full": Profile("the whole grid of K in {10, 100, 1000} x D in {1e5, 1e6, 1e7} (long)", _GRID, (100_000, 1_000_000, 10_000_000), _GRID),
    "robust": Profile("robust rules at K=100 x D=1e6 and K=10 x D=1e7, against their peers (minutes)",
                      robust=((100, 1_000_000), (10, 10_000_000))),
    "flwr": Profile("fedkern.compat.flwr against Flower's own helpers, K in {10, 100} x D=1e6 (needs flwr; "
                    "Flower's Bulyan alone takes minutes)", flwr=((10, 1_000_000), (100, 1_000_000))),
    "sim": Profile("the simulator: FedProx's protocol, cross-device rounds, the engine's overhead, first-round "
                   "latency and memory at 100,000 clients (about a minute and a half)", sim=SimSizes()),
    "scaling": Profile("weighted_mean, median, krum and geometric_median over K in {10, 100, 1000} x D in "
                       "{1e5, 1e6, 1e7}, in ns per byte: how cost grows (skips cells predicted over 2 minutes; "
                       "about 15 minutes)", scaling=ScalingSizes()),
}


def size_label(k: int | None, d: int) -> str:
    dims = f"D={d:.0e}".replace("e+0", "e")
    return dims if k is None else f"K={k} {dims}"


def _spec_cases(spec: OpSpec, sizes) -> list[Case]:
    variants = spec.variants or {"": {}}
    return [_case(spec, variant, extra, k, d) for variant, extra in variants.items() for k, d in sizes]


def _case(spec: OpSpec, variant: str, extra: dict, k: int, d: int) -> Case:
    def make():
        args, kwargs = spec.example(np.random.default_rng(0), k, d, np.dtype(np.float32))
        kwargs = {**kwargs, **extra, **_preallocated(spec, k, d)}
        call = _stateful_call(spec, args, kwargs) if spec.stateful else lambda backend: spec(backend, *args, **kwargs)
        if spec.peer is not None and (spec.peer.package is None or _installed(spec.peer.package)):
            call.peer = spec.peer.make(np.stack(args[0]) if spec.peer.stacked else args)
        return call

    op = f"{spec.name}({variant})" if variant else spec.name
    label = size_label(k if spec.per_update else None, d)
    peer = spec.peer
    return Case(op, label, spec.nbytes(k, d), make, peer and peer.name, peer and peer.package, package=spec.package,
                family=spec.family)


def _preallocated(spec: OpSpec, k: int, d: int) -> dict:
    """``out=`` for an op that takes one: a server reuses its result buffers, so the bench
    times the op, not the first touch of a fresh allocation."""
    shapes = {"vector": (d,), "matrix": (k, d)}
    return {"out": np.empty(shapes[spec.out], np.float32)} if spec.out else {}


def _stateful_call(spec: OpSpec, args, kwargs):
    """An optimizer step: each backend steps its own copy of the model with its own
    optimizer, which keeps its state from call to call, as on a server."""
    instances: dict[str, tuple] = {}

    def call(backend):
        if backend not in instances:
            copies = tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)
            instances[backend] = (spec.stateful(backend), copies)
        step, own_args = instances[backend]
        return step(*own_args, **kwargs)

    return call


def _installed(package: str) -> bool:
    from .runner import installed

    return installed(package)


def cases(profile: str = "default") -> list[Case]:
    """The benchmark cases of a profile (a key of :data:`PROFILES`)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {tuple(PROFILES)}; got {profile!r}")
    sizes = PROFILES[profile]
    result = []
    for spec in _registry.OPS:
        if not spec.per_update:
            result += _spec_cases(spec, [(1, d) for d in sizes.vectors])
        else:
            result += _spec_cases(spec, sizes.robust if spec.family == "robust" else sizes.matrices)
    if sizes.flwr:
        from .flwr import FLWR_OPS, flwr_case

        result += [flwr_case(op, k, d) for op in FLWR_OPS for k, d in sizes.flwr]
    return result

