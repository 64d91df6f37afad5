"""Timing: every backend of every case, side by side, against the memory bandwidth.

The candidates of a case (its backends and its peer) are timed interleaved, one call
each in turn, round after round, so a change in the machine's load (another process, a
frequency step) falls on all of them alike rather than on whichever ran at that moment.
For each op and size the bench prints the median time per backend with the spread of
its calls (fastest - slowest), the effective GB/s
(bytes the op must move / time), that rate as a percentage of the read bandwidth measured
by a compiled read kernel at the start of the same run, and the speedup over the numpy
reference. Where an established implementation is the yardstick (``np.median``,
``scipy.stats.trim_mean``, a bare BLAS SYRK, Flower), it is timed on the same data as a
*peer* row, and every backend's speedup over it is printed too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from .. import backends
from .._blocks import READ_BLOCK
from .._tuning import cache_sizes
from .cases import PROFILES, cases

#: Seconds the candidates wait after a call of the reference or a peer, for BLAS threads
#: to stop spinning (:func:`interleaved_times`): OpenBLAS's default of 2^28 cycles, at
#: 2 GHz and more.
SETTLE_S = 0.15

#: How a user adds each optional package a case or a peer needs.
INSTALL_HINTS = {"scipy": "pip install scipy", "flwr": 'pip install "fedkern[flwr]"',
                 "cryptography": 'pip install "fedkern[secagg]"'}


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


#: The vector instruction sets the CPU line names (as /proc/cpuinfo spells them), widest first.
ISA_FLAGS = {"avx512f": "AVX-512", "avx2": "AVX2", "sse4_2": "SSE4.2", "asimd": "NEON"}


def cpu_description() -> dict:
    """What the figures of a run depend on: the CPU's model, architecture, widest vector
    instruction set, cache sizes and logical CPUs (in every bench's header and JSON, so
    figures from different machines are never mixed)."""
    flags = backends.cpu_flags() or frozenset()
    return dict(model=cpu_name(), machine=platform.machine(),
                isa=next((name for flag, name in ISA_FLAGS.items() if flag in flags), None),
                caches=cache_sizes(), logical_cpus=os.cpu_count())


def _bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB"


def cpu_line(cpu: dict) -> str:
    """One line for a bench header, e.g. ``Intel(R) Xeon(R) (x86_64, AVX-512, L1d 48 KiB, L2 2 MiB,
    L3 260 MiB, 2 logical CPUs)``."""
    parts = [cpu["machine"], cpu["isa"]] + [f"{name} {_bytes(size)}" for name, size in cpu["caches"].items()
                                           if name != "L1i"]
    parts.append(f"{cpu['logical_cpus']} logical CPUs")
    return f"{cpu['model']} ({', '.join(p for p in parts if p)})"


def interleaved_times(calls: dict[str, Callable[[], object]], budget: float = 1.0, min_repeats: int = 3,
                      max_repeats: int = 15, no_warm_up: frozenset[str] = frozenset(),
                      settle: float = 0.0, settle_after: frozenset[str] = frozenset()) -> dict[str, list[float]]:
    """Wall times of every call, timed in turn, one call each per round.

    Each candidate is first called once as a warm-up (which also compiles Numba; for the
    names in ``no_warm_up``, peers that compile nothing, that call is a timing). Then the
    rounds go on until each candidate has ``min_repeats`` times and either ``max_repeats``
    or ``budget`` seconds of them; a candidate whose warm-up alone took more than
    ``budget`` is timed only once (keeping slow reference implementations from
    dominating the run).

    After each call of a name in ``settle_after`` the next candidate waits ``settle``
    seconds: numpy code (the reference, a peer) may leave BLAS threads spinning after it
    returns (OpenBLAS's do for up to 2^28 cycles, about 0.1 s, unless
    ``OPENBLAS_THREAD_TIMEOUT`` says less), and on a small machine they take cores from
    whichever candidate runs next (measured on 2 cores: fedkern's weighted sum timed right
    after BLAS ran at 0.56-0.76x of BLAS, and at 0.95-1.11x with the spinning cut short;
    ``l2_norms`` at K = 100 x D = 1e6 took 41-44 ms right after the reference, 17-18 ms
    0.1 s later). The wait ends with :func:`wake_cores`: on a VM a core idle for 0.15 s
    is slow to come back, and the candidate after the wait paid for it (measured on a
    2-vCPU Zen 4: a 2.5 ms top-k accumulate took 6-13 ms right after a 0.15 s sleep,
    5-6 ms after a sleep and the wake).

    A candidate whose warm-up took more than ``budget`` is timed once more before it is
    judged slow: a warm-up includes compiling (or loading Numba's cache), which must not
    leave a fast kernel with a single timing.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    slow: set[str] = set()

    def timed(name: str) -> float:
        start = time.perf_counter()
        calls[name]()
        seconds = time.perf_counter() - start
        if name in settle_after and settle > 0:
            time.sleep(settle)
            wake_cores()
        return seconds

    for name in calls:
        first = timed(name)
        if name in no_warm_up:
            times[name].append(first)
        elif first > budget:
            first = timed(name)
            times[name].append(first)
        if first > budget:
            slow.add(name)

    def done(name: str) -> bool:
        n = len(times[name])
        if name in slow:
            return n >= 1
        return n >= min_repeats and (n >= max_repeats or sum(times[name]) >= budget)

    while not all(done(name) for name in calls):
        for name in calls:
            if not done(name):
                times[name].append(timed(name))
    return times


def _read_kernels() -> list:
    """The compiled backends' ``_runtime`` modules (Cython first), each set to the bench's
    thread count: their ``read_sum`` measures the read bandwidth and wakes the cores."""
    runtimes = [backends._load(name, "_runtime") for name in ("cython", "numba")
                if backends.is_available(name, "_runtime")]
    for runtime in runtimes:
        runtime.use_threads(backends.get_num_threads())
    return runtimes


#: Seconds :func:`wake_cores` keeps every core busy.
WAKE_S = 0.02


def wake_cores(seconds: float = WAKE_S) -> None:
    """Keep every thread of the compiled backends busy for ``seconds`` (short parallel reads
    of one read task per thread, from cache), so that cores left idle come back before the
    next timing."""
    values = np.ones(READ_BLOCK * max(1, backends.get_num_threads()), np.float32)
    runtimes = _read_kernels()
    end = time.perf_counter() + seconds
    while runtimes and time.perf_counter() < end:
        for runtime in runtimes:
            runtime.read_sum(values)


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
    runtimes = _read_kernels()
    if not runtimes:
        raise RuntimeError("no compiled backend is available to measure the read bandwidth")
    runtime = runtimes[0]
    return values.nbytes / median_time(lambda: runtime.read_sum(values), min_repeats=5) / 1e9


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
    """Run the bench; return its results as a dict (what ``--json`` prints).

    A profile with simulator sizes (``--sim``) runs :func:`fedkern.bench.sim.run`
    instead: ``backend_names`` picks the model backends it times and
    ``with_cold_start=False`` skips its first-round-latency subprocesses.
    """
    grid = PROFILES[profile].scaling if profile in PROFILES else None
    if grid is not None:
        from . import scaling

        return scaling.run(grid, profile=profile, echo=echo)
    sizes = PROFILES[profile].sim if profile in PROFILES else None
    if sizes is not None:
        from . import sim  # here, not at the top: bench.sim imports this module

        return sim.run(sizes, profile=profile, model_backends=backend_names,
                       with_first_round=with_cold_start is not False, echo=echo)
    names = [b for b in (backend_names or backends.NAMES) if backends.is_available(b)]
    if "reference" not in names:
        names.insert(0, "reference")
    say = echo or (lambda line: None)
    bandwidth = read_bandwidth(64 << 20 if profile == "quick" else 512 << 20)
    cpu = cpu_description()
    say(f"fedkern bench ({profile}): {cpu_line(cpu)}, {backends.get_num_threads()} threads, "
        f"measured read bandwidth {bandwidth:.1f} GB/s")
    say(f"{'op':<24} {'size':<14} {'backend':<16} {'median ms':>10} {'min-max ms':>17} {'GB/s':>7} {'% bw':>6} "
        f"{'x ref':>7} {'x peer':>7}")
    rows, skipped = [], set()

    def skip(package: str, what: str) -> None:
        if package not in skipped:
            skipped.add(package)
            say(f"skipped {what}: {package} is not installed ({INSTALL_HINTS[package]} adds it)")

    budget = 0.3 if profile == "quick" else 1.0
    # the quick profile is a smoke run, its sizes too small to quote: no settling, so it stays quick
    settle = 0.0 if profile == "quick" else SETTLE_S
    for case in cases(profile):
        if case.package and not installed(case.package):
            skip(case.package, f"the cases that need {case.package}")
            continue
        call = case.make()
        calls = {name: (lambda name=name: call(name)) for name in names}
        if case.peer and not hasattr(call, "peer"):
            skip(case.peer_package, f"peer {case.peer}")
        elif case.peer:
            calls[case.peer] = call.peer
        times = interleaved_times(calls, budget=budget, no_warm_up=frozenset({case.peer}), settle=settle,
                                  settle_after=frozenset({"reference", case.peer}))
        timings = {name: statistics.median(seconds) for name, seconds in times.items()}
        for name, seconds in timings.items():
            gbps = case.nbytes / seconds / 1e9
            row = dict(op=case.op, size=case.size, backend=name, median_s=seconds, min_s=min(times[name]),
                       max_s=max(times[name]), repeats=len(times[name]), gb_per_s=gbps,
                       percent_bandwidth=100 * gbps / bandwidth, speedup=timings["reference"] / seconds,
                       speedup_vs_peer=timings[case.peer] / seconds if case.peer in timings else None)
            rows.append(row)
            vs_peer = f"{row['speedup_vs_peer']:>7.2f}" if case.peer in timings else f"{'':>7}"
            spread = f"{1e3 * row['min_s']:.3f}-{1e3 * row['max_s']:.3f}"
            say(f"{case.op:<24} {case.size:<14} {name:<16} {1e3 * seconds:>10.3f} {spread:>17} {gbps:>7.2f} "
                f"{row['percent_bandwidth']:>6.1f} {row['speedup']:>7.2f} {vs_peer}")
        del call
    result = dict(profile=profile, machine=platform.machine(), processor=cpu["model"], cpu=cpu,
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
