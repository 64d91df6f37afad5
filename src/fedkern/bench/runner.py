"""``fedkern bench``: every backend of every op, side by side, against the memory bandwidth.

For each op and size the bench prints the median time per backend, the effective GB/s
(bytes the op must move / time), that rate as a percentage of the read bandwidth measured
by a compiled read kernel at the start of the same run, and the speedup over the numpy
reference. Where an established implementation is the yardstick (``np.median``,
``scipy.stats.trim_mean``, a bare BLAS SYRK), it is timed on the same data as a *peer*
row, and every backend's speedup over it is printed too. ``benchmarks/`` runs the same
cases under pytest-benchmark.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import aggregate, backends, optim, robust

PROFILES = ("quick", "default", "full", "robust", "flwr")
#: Largest K x D float32 matrix the full grid builds (the rest is skipped, as DESIGN.md allows).
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

    @property
    def name(self) -> str:
        return f"{self.op}[{self.size}]"


#: How a user adds each optional package a case or a peer needs.
INSTALL_HINTS = {"scipy": "pip install scipy", "flwr": 'pip install "fedkern[flwr]"'}


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # blocked, or a broken install
        return False


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rows(k: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d, dtype=np.float32) for _ in range(k)]


def _size(k: int | None, d: int) -> str:
    dims = f"D={d:.0e}".replace("e+0", "e")
    return dims if k is None else f"K={k} {dims}"


def _weighted_mean(k: int, d: int) -> Case:
    def make():
        rows, weights = _rows(k, d), np.arange(1, k + 1, dtype=np.float64)
        out = np.empty(d, np.float32)
        return lambda b: aggregate.weighted_mean(rows, weights, out=out, backend=b)

    return Case("weighted_mean", _size(k, d), 4 * k * d + 4 * d, make)


def _l2_norms(k: int, d: int) -> Case:
    def make():
        rows = _rows(k, d)
        return lambda b: aggregate.l2_norms(rows, backend=b)

    return Case("l2_norms", _size(k, d), 4 * k * d, make)


def _clip_by_norm(k: int, d: int) -> Case:
    def make():
        rows, out = _rows(k, d), np.empty((k, d), np.float32)
        max_norm = 0.5 * float(np.sqrt(d))  # about half the rows get clipped
        return lambda b: aggregate.clip_by_norm(rows, max_norm, out=out, backend=b)

    return Case("clip_by_norm", _size(k, d), 2 * 4 * k * d, make)


def _accumulate(d: int) -> Case:
    """Streaming FedAvg: float32 update into the float64 running sum of an Accumulator."""

    def make():
        (update,) = _rows(1, d)
        acc = np.zeros(d)
        return lambda b: aggregate.accumulate(acc, update, 0.5, backend=b)

    return Case("accumulate", _size(None, d), 4 * d + 2 * 8 * d, make)


def _optimizer(cls: type, arrays: int, d: int) -> Case:
    """One server step; ``arrays`` counts the D-vectors read plus those written."""

    def make():
        (delta,) = _rows(1, d, seed=1)
        delta *= 1e-3
        params = {name: np.zeros(d, np.float32) for name in backends.NAMES}
        optimizers = {name: cls(backend=name) for name in backends.NAMES}
        return lambda b: optimizers[b].step(params[b], delta)

    return Case(f"{cls.__name__}.step", _size(None, d), 4 * arrays * d, make)


def _robust(op: str, k: int, d: int) -> Case:
    """A robust rule on K rows; peers: np.median, scipy's trim_mean, a bare BLAS SYRK."""
    f = max(1, k // 10)
    calls = {
        "median": (lambda rows, b: robust.median(rows, backend=b), "np.median",
                   lambda stack: lambda: np.median(stack, axis=0)),
        "trimmed_mean": (lambda rows, b: robust.trimmed_mean(rows, 0.1, backend=b), "scipy.trim_mean",
                         lambda stack: _trim_mean_peer(stack)),
        "meamed": (lambda rows, b: robust.meamed(rows, f, backend=b), None, None),
        "pairwise_gram": (lambda rows, b: robust.pairwise_sq_distances(rows, "gram", backend=b), "BLAS syrk",
                          lambda stack: lambda: stack @ stack.T),
        "pairwise_exact": (lambda rows, b: robust.pairwise_sq_distances(rows, "exact", backend=b), None, None),
        "krum": (lambda rows, b: robust.krum(rows, f, backend=b), "BLAS syrk",
                 lambda stack: lambda: stack @ stack.T),
        "bulyan": (lambda rows, b: robust.bulyan(rows, f, backend=b), "BLAS syrk",
                   lambda stack: lambda: stack @ stack.T),
        # a fixed number of iterations, so every backend does the same work
        "geometric_median": (lambda rows, b: robust.geometric_median(rows, maxiter=10, tol=0.0, backend=b),
                             None, None),
        # from the origin, with a radius that clips about half the (unit-variance) updates
        "centered_clipping": (lambda rows, b: robust.centered_clipping(rows, np.zeros(d, np.float32), np.sqrt(d),
                                                                       iterations=3, backend=b), None, None),
        "nearest_neighbor_mixing": (lambda rows, b: robust.nearest_neighbor_mixing(rows, f, backend=b), None, None),
        "bucketing": (lambda rows, b: robust.bucketing(rows, 2, seed=0, backend=b), None, None),
        "adaptive_clipping": (lambda rows, b: robust.adaptive_clipping(rows, f, backend=b), None, None),
    }
    run, peer, make_peer = calls[op]
    peer_package = "scipy" if op == "trimmed_mean" else None

    def make():
        rows = _rows(k, d)
        call = lambda b: run(rows, b)  # noqa: E731
        if make_peer is not None and (peer_package is None or installed(peer_package)):
            call.peer = make_peer(np.stack(rows))
        return call

    return Case(op, _size(k, d), 4 * k * d, make, peer, peer_package)


def _trim_mean_peer(stack: np.ndarray) -> Callable[[], object]:
    from scipy.stats import trim_mean  # scipy is only needed for this peer

    return lambda: trim_mean(stack, 0.1, axis=0)


ROBUST_OPS = ("median", "trimmed_mean", "meamed", "pairwise_gram", "pairwise_exact", "krum", "bulyan",
              "geometric_median", "centered_clipping", "nearest_neighbor_mixing", "bucketing", "adaptive_clipping")


def cnn_shapes(d: int) -> list[tuple[int, ...]]:
    """Layer shapes of a small CNN (convolutions, biases, a dense layer sized to bring the
    total to about ``d``, a 0-d scalar): what Flower clients send."""
    convs = [(16, 3, 3, 3), (16,), (32, 16, 3, 3), (32,)]
    if d >= 200_000:
        convs += [(64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,)]
    head = [(10, 128), (10,), ()]
    used = sum(int(np.prod(s)) for s in convs + head) + 128
    return convs + [(max(1, (d - used) // 128), 128), (128,)] + head


def flwr_results(k: int, d: int, seed: int = 0) -> list[tuple[list[np.ndarray], int]]:
    """K clients' (float32 layer list, example count), as Flower's legacy helpers take them."""
    rng = np.random.default_rng(seed)
    shapes = cnn_shapes(d)
    return [([rng.standard_normal(s, dtype=np.float32) for s in shapes], int(rng.integers(1, 500)))
            for _ in range(k)]


FLWR_OPS = ("flwr.aggregate", "flwr.aggregate_inplace", "flwr.aggregate_arrayrecords", "flwr.aggregate_median",
            "flwr.aggregate_trimmed_avg", "flwr.aggregate_krum", "flwr.select_multikrum", "flwr.aggregate_bulyan")


def flwr_case(op: str, k: int, d: int) -> Case:
    """A helper of ``fedkern.compat.flwr`` on a CNN-like model; peer: Flower's own helper.

    Flower is imported only when the case is made, so listing the cases needs no Flower.
    """

    def make():
        build, ours, theirs = _flwr_calls(k)[op]
        data = build(flwr_results(k, d))

        def call(backend):
            with backends.use_backend(backend):
                return ours(data)

        call.peer = lambda: theirs(data)
        return call

    return Case(op, _size(k, d), 4 * k * d, make, "flower", package="flwr")


def _flwr_calls(k: int) -> dict:
    """op: (input builder, fedkern call, Flower call), for K clients."""
    import flwr.server.strategy.aggregate as flower
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.serverapp.strategy import multikrum as flower_multikrum
    from flwr.serverapp.strategy import strategy_utils as flower_utils

    from .compat import flwr as fk

    f = max(1, (k - 3) // 8)  # Bulyan needs K >= 4f + 3

    def fit_results(results):
        return [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(p), n, {})) for p, n in results]

    def contents(results):
        return [RecordDict({"arrays": ArrayRecord({f"l{j}": Array(a) for j, a in enumerate(p)}),
                            "metrics": MetricRecord({"num-examples": n})}) for p, n in results]

    def same(results):
        return results

    return {
        "flwr.aggregate": (same, fk.aggregate, flower.aggregate),
        "flwr.aggregate_inplace": (fit_results, fk.aggregate_inplace, flower.aggregate_inplace),
        "flwr.aggregate_arrayrecords": (contents, lambda c: fk.aggregate_arrayrecords(c, "num-examples"),
                                        lambda c: flower_utils.aggregate_arrayrecords(c, "num-examples")),
        "flwr.aggregate_median": (same, fk.aggregate_median, flower.aggregate_median),
        "flwr.aggregate_trimmed_avg": (same, lambda r: fk.aggregate_trimmed_avg(r, 0.2),
                                       lambda r: flower.aggregate_trimmed_avg(r, 0.2)),
        "flwr.aggregate_krum": (same, lambda r: fk.aggregate_krum(r, f, 0), lambda r: flower.aggregate_krum(r, f, 0)),
        "flwr.select_multikrum": (contents, lambda c: fk.select_multikrum(c, f, k // 2),
                                  lambda c: flower_multikrum.select_multikrum(c, f, k // 2)),
        # Flower's Bulyan pops the selected clients out of its argument: a fresh list each call
        "flwr.aggregate_bulyan": (same, lambda r: fk.aggregate_bulyan(r, f, fk.aggregate_krum),
                                  lambda r: flower.aggregate_bulyan(list(r), f, flower.aggregate_krum, to_keep=0)),
    }


def cases(profile: str = "default") -> list[Case]:
    """The benchmark cases of a profile: "quick" (seconds), "default" (about a minute),
    "full" (the K x D grid of DESIGN.md, long) or "robust" (robust rules at their target sizes)."""
    robust_sizes = [(10, 1000)] if profile == "quick" else [(100, 100_000)]
    if profile == "quick":
        matrices, vectors = [(10, 100_000)], [100_000]
    elif profile == "default":
        matrices, vectors = [(100, 1_000_000), (10, 10_000_000)], [10_000_000]
    elif profile == "full":
        matrices = [(k, d) for k in (10, 100, 1000) for d in (100_000, 1_000_000, 10_000_000)
                    if 4 * k * d <= FULL_GRID_BYTES]
        vectors = [100_000, 1_000_000, 10_000_000]
        robust_sizes = matrices
    elif profile == "robust":
        return [_robust(op, k, d) for op in ROBUST_OPS for k, d in [(100, 1_000_000), (10, 10_000_000)]]
    elif profile == "flwr":
        return [flwr_case(op, k, 1_000_000) for op in FLWR_OPS for k in (10, 100)]
    else:
        raise ValueError(f"profile must be one of {PROFILES}; got {profile!r}")
    result = [_weighted_mean(k, d) for k, d in matrices]
    result += [_l2_norms(k, d) for k, d in matrices]
    result += [_clip_by_norm(k, d) for k, d in matrices]
    result += [_accumulate(d) for d in vectors]
    for cls, arrays in ((optim.FedAvg, 3), (optim.FedAvgM, 5), (optim.FedAdagrad, 7),
                        (optim.FedAdam, 7), (optim.FedYogi, 7)):
        result += [_optimizer(cls, arrays, d) for d in vectors]
    result += [_robust(op, k, d) for op in ROBUST_OPS for k, d in robust_sizes]
    return result


def median_time(call: Callable[[], object], min_repeats: int = 3, max_repeats: int = 15,
                budget: float = 1.0, warm_up: bool = True) -> float:
    """Median wall time of ``call()`` after one warm-up call (which also compiles Numba).

    A call whose warm-up alone exceeds ``budget`` is timed once more and no further,
    which keeps slow reference implementations from dominating the run; without
    ``warm_up`` (peers, which compile nothing) such a call is timed only once.
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    if first > budget:
        if not warm_up:
            return first
        min_repeats = 1
    times: list[float] = [] if warm_up else [first]
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) < budget):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int = 512 << 20) -> float:
    """Read bandwidth in GB/s: a compiled kernel summing a float32 buffer once per call."""
    values = np.ones(nbytes // 4, np.float32)
    for name in ("cython", "numba"):
        if backends.is_available(name, "_runtime"):
            runtime = backends._load(name, "_runtime")
            runtime.use_threads(backends.get_num_threads())
            return values.nbytes / median_time(lambda: runtime.read_sum(values), min_repeats=5) / 1e9
    raise RuntimeError("no compiled backend is available to measure the read bandwidth")


_COLD_START = """
import time, numpy as np, fedkern
x = [np.ones(1000, np.float32) for _ in range(4)]
calls = {{
    "weighted_mean": lambda: fedkern.weighted_mean(x, backend="{backend}"),
    "accumulate": lambda: fedkern.accumulate(np.zeros(1000), x[0], backend="{backend}"),
    "l2_norms": lambda: fedkern.l2_norms(x, backend="{backend}"),
    "clip_by_norm": lambda: fedkern.clip_by_norm(x, 1.0, backend="{backend}"),
    "FedAvgM.step": lambda: fedkern.FedAvgM(backend="{backend}").step(np.zeros(1000, np.float32), x[0]),
    "FedAdam.step": lambda: fedkern.FedAdam(backend="{backend}").step(np.zeros(1000, np.float32), x[0]),
    "median": lambda: fedkern.median(x, backend="{backend}"),
    "meamed": lambda: fedkern.meamed(x, 1, backend="{backend}"),
    "krum": lambda: fedkern.krum(x, 0, method="exact", backend="{backend}"),
    "geometric_median": lambda: fedkern.geometric_median(x, backend="{backend}"),
}}
start = time.perf_counter()
calls["{op}"]()
print(time.perf_counter() - start)
"""
COLD_START_OPS = ("weighted_mean", "accumulate", "l2_norms", "clip_by_norm", "FedAvgM.step", "FedAdam.step",
                  "median", "meamed", "krum", "geometric_median")


def cold_start(backend: str = "numba") -> dict[str, float]:
    """Seconds of each op's first call in a new process (includes importing Numba).

    Run after the in-process bench, so Numba's on-disk cache exists: this measures
    whether a later process loads it instead of compiling.
    """
    result = {}
    for op in COLD_START_OPS:
        script = _COLD_START.format(backend=backend, op=op)
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)  # fills the cache
        done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        result[op] = float(done.stdout.strip().splitlines()[-1])
    return result


def run(profile: str = "default", backend_names: tuple[str, ...] | None = None,
        with_cold_start: bool | None = None, echo: Callable[[str], None] | None = print) -> dict:
    """Run the bench; return its results as a dict (what ``--json`` prints)."""
    names = [b for b in (backend_names or backends.NAMES) if backends.is_available(b)]
    if "reference" not in names:
        names.insert(0, "reference")
    say = echo or (lambda line: None)
    bandwidth = read_bandwidth(64 << 20 if profile == "quick" else 512 << 20)
    say(f"fedkern bench ({profile}): {cpu_name()} ({platform.machine()}), {backends.get_num_threads()} threads, "
        f"measured read bandwidth {bandwidth:.1f} GB/s")
    say(f"{'op':<24} {'size':<14} {'backend':<16} {'median ms':>10} {'GB/s':>7} {'% bw':>6} {'x ref':>7} "
        f"{'x peer':>7}")
    rows, skipped = [], set()

    def skip(package: str, what: str) -> None:
        if package not in skipped:
            skipped.add(package)
            say(f"skipped {what}: {package} is not installed ({INSTALL_HINTS[package]} adds it)")

    budget = 0.3 if profile == "quick" else 1.0
    for case in cases(profile):
        if case.package and not installed(case.package):
            skip(case.package, f"the cases that need {case.package}")
            continue
        call = case.make()
        timings = {name: median_time(lambda: call(name), budget=budget) for name in names}
        if case.peer and not hasattr(call, "peer"):
            skip(case.peer_package, f"peer {case.peer}")
        elif case.peer:
            timings[case.peer] = median_time(call.peer, budget=budget, warm_up=False)
        for name, seconds in timings.items():
            gbps = case.nbytes / seconds / 1e9
            row = dict(op=case.op, size=case.size, backend=name, median_s=seconds, gb_per_s=gbps,
                       percent_bandwidth=100 * gbps / bandwidth, speedup=timings["reference"] / seconds,
                       speedup_vs_peer=timings[case.peer] / seconds if case.peer in timings else None)
            rows.append(row)
            vs_peer = f"{row['speedup_vs_peer']:>7.2f}" if case.peer in timings else f"{'':>7}"
            say(f"{case.op:<24} {case.size:<14} {name:<16} {1e3 * seconds:>10.3f} {gbps:>7.2f} "
                f"{row['percent_bandwidth']:>6.1f} {row['speedup']:>7.2f} {vs_peer}")
        del call
    result = dict(profile=profile, machine=platform.machine(), processor=cpu_name(),
                  threads=backends.get_num_threads(), read_bandwidth_gb_per_s=bandwidth, results=rows)
    if with_cold_start is None:
        with_cold_start = profile != "quick"
    if with_cold_start and "numba" in names:
        result["cold_start_s"] = cold_start("numba")
        say("first call in a new process, numba backend (includes importing numba): " + ", ".join(
            f"{op} {seconds:.2f} s" for op, seconds in result["cold_start_s"].items()))
    return result


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2)
