r"""``fedkern bench --sim``: the simulator's own workloads, timed end to end.

Five workloads, at the sizes of a :class:`~fedkern.bench.cases.SimSizes` (the defaults
are the issue's targets, which are printed beside each figure, never asserted):

1. **FedProx's protocol** (Li et al., "Federated Optimization in Heterogeneous
   Networks", MLSys 2020): Synthetic(1,1) with 30 devices, 10 a round, 20 local epochs,
   batch 10, lr 0.01, multinomial logistic regression, test accuracy every round. For
   each compiled model backend (Cython, Numba) the total of 200 rounds on the serial and
   a thread executor, after one warm-up round in a separate run (Numba's compilation or
   cache load, reported apart), and the final accuracy; the numpy twin of the same model
   (``backend="reference"``, a plain numpy training loop) over the first few rounds
   only, compared by per-round medians.
2. **Cross-device**: 1000 devices, 100 a round, 1 local epoch, no evaluation in the
   timed rounds: the median round, per model backend and executor.
3. **No-op clients**: the same rounds with a client that sends a zero update, so the
   median round is the engine's own cost (sampling, streams, accumulation, server
   step). Target: 1 ms + 10 us per client.
4. **First round latency**: a new Python process that imports fedkern, gets the
   cross-device data and finishes round 1, with Numba's and the dataset's on-disk caches
   warm (as in any run after the first); seconds from launching the process, with the
   data's share reported apart. The data's generation time is reported with workload 2.
5. **Memory at scale**: 100,000 clients x 20 rows x 60 features, 100 a round, the
   default model backend (as in workload 4); the resident set size
   (``/proc/self/statm``: the current RSS, not the peak) after building the data and
   after rounds 10 and 1000, against the data's own bytes.

Candidates run interleaved, one round of each in turn, so the machine's noise hits
them alike; a run's total is the sum of its rounds' wall times.

Examples
--------
>>> from fedkern.bench import sim
>>> print(sim.table([sim.row("no-op round", "numba serial", 0.81, "ms", "<= 2 ms", True)]))
workload     candidate     figure  unit  target   met
no-op round  numba serial    0.81  ms    <= 2 ms  yes
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import numpy as np

from .. import backends, datasets
from ..sim import (FederatedData, FederatedDataset, LocalTraining, LogisticRegression, SerialExecutor, Simulation,
                   ThreadExecutor, TrainResult)
from .cases import SimSizes
from .runner import cpu_description, cpu_line

#: The compiled model backends the workloads time, side by side (and the reference).
COMPILED = ("cython", "numba")
#: What a backend's first round does beyond the others.
WARM_UP = {"cython": "loads the extension", "numba": "compiles, or loads Numba's cache"}
#: Local training of every workload but the epochs (FedProx's Synthetic settings).
BATCH_SIZE, LR = 10, 0.01
#: The issue's targets: all FedProx rounds (s), a cross-device round (ms), launch to round 1 (s).
FEDPROX_TARGET_S, DEVICE_TARGET_MS, FIRST_ROUND_TARGET_S = 5.0, 20.0, 1.0
#: A no-op round may cost this much (ms) plus this much (ms) per client.
NO_OP_BASE_MS, NO_OP_PER_CLIENT_MS = 1.0, 0.010
#: RSS may move this much (percent) between the early and the late memory reading.
RSS_FLAT_PERCENT = 5.0
#: eval_every of the runs that must not evaluate in their timed rounds.
NEVER = 10**9


# --------------------------------------------------------------------------- building blocks
def simulation(data: FederatedDataset, clients_per_round: int, epochs: int, *, backend: str = "auto",
               executor=None, client_update=None, eval_every: int = 1) -> Simulation:
    """A FedAvg run with logistic regression, batch 10, lr 0.01 and seed 0 (every workload's)."""
    model = LogisticRegression(data.train.n_features, data.train.n_classes, backend=backend)
    return Simulation(data, model, clients_per_round=clients_per_round, executor=executor, seed=0,
                      local=LocalTraining(epochs=epochs, batch_size=BATCH_SIZE, lr=LR),
                      client_update=client_update, eval_every=eval_every)


def fedprox_data(sizes: SimSizes) -> FederatedDataset:
    """FedProx's Synthetic(1,1) with ``sizes.fedprox_clients`` devices."""
    return datasets.fedprox_synthetic(1.0, 1.0, n_clients=sizes.fedprox_clients, seed=0)


def device_data(sizes: SimSizes) -> FederatedDataset:
    """Synthetic(1,1) with ``sizes.device_clients`` devices (the cross-device workloads)."""
    return datasets.fedprox_synthetic(1.0, 1.0, n_clients=sizes.device_clients, seed=0)


@contextlib.contextmanager
def dataset_cache_off() -> Iterator[None]:
    """Within the block, :mod:`fedkern.datasets` generates afresh (``FEDKERN_DATA_CACHE=off``)."""
    saved = os.environ.get("FEDKERN_DATA_CACHE")
    os.environ["FEDKERN_DATA_CACHE"] = "off"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FEDKERN_DATA_CACHE"]
        else:
            os.environ["FEDKERN_DATA_CACHE"] = saved


def no_op_update(model, params, x, y, config, rng, delta_out) -> TrainResult:
    """A client that sends a zero update without training: what is left is the engine.

    Examples
    --------
    >>> from fedkern.bench.sim import no_op_update
    >>> delta = np.ones(3, np.float32)
    >>> no_op_update(None, None, None, None, None, None, delta), delta.tolist()
    (TrainResult(loss=0.0, steps=0), [0.0, 0.0, 0.0])
    """
    delta_out[:] = 0.0
    return TrainResult(0.0, 0)


def scale_data(n_clients: int, rows: int, *, n_features: int = 60, n_classes: int = 10, test_rows: int = 10_000,
               seed: int = 0) -> FederatedDataset:
    r"""``n_clients`` clients of ``rows`` rows each, labelled by one random linear model.

    x ~ N(0, I) in float32, y = argmax(x W + b) with W, b ~ N(0, 1); the test set is
    ``test_rows`` more rows of the same model, one central client.

    Examples
    --------
    >>> from fedkern.bench.sim import data_bytes, scale_data
    >>> data = scale_data(3, 4, n_features=2, test_rows=5)
    >>> data.train.sizes.tolist(), data.test.sizes.tolist()
    ([4, 4, 4], [5])
    >>> data_bytes(data)     # train: x 96 + y 48 + offsets 32 + sizes 24; test: 40 + 20 + 16 + 8
    284
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_features, n_classes)).astype(np.float32)
    b = rng.standard_normal(n_classes).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.standard_normal((n, n_features), dtype=np.float32)
        y = np.empty(n, np.int32)
        for start in range(0, n, 1 << 16):  # labels in blocks: no (N, classes) temporary
            y[start:start + (1 << 16)] = np.argmax(x[start:start + (1 << 16)] @ w + b, axis=1)
        return x, y

    train = FederatedData(*draw(n_clients * rows), np.arange(0, n_clients * rows + 1, rows), n_classes)
    test = FederatedData(*draw(test_rows), [0, test_rows], n_classes)
    return FederatedDataset(train, test, f"scale({n_clients}x{rows})")


def data_bytes(data: FederatedDataset) -> int:
    """Bytes of the arrays a FederatedDataset holds (features, labels, offsets, sizes)."""
    return sum(part.x.nbytes + part.y.nbytes + part.offsets.nbytes + part.sizes.nbytes
               for part in (data.train, data.test))


def rss_bytes() -> int | None:
    """The process's current resident set size (Linux ``/proc/self/statm``), None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def row(workload: str, candidate: str, value: float | None, unit: str, target: str | None = None,
        met: bool | None = None) -> dict:
    """One figure of the run (what ``--json`` lists); ``met`` says whether it meets ``target``."""
    return dict(workload=workload, candidate=candidate, value=None if value is None else float(value), unit=unit,
                target=target, met=met)


def compiled_backends(names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The compiled model backends this machine runs (of ``names``, if given), fastest first."""
    return tuple(b for b in COMPILED if (names is None or b in names) and backends.is_available(b, "models"))


def _name(backend: str | None, executor: str) -> str:
    return executor if backend is None else f"{backend} {executor}"


@contextlib.contextmanager
def _candidates(make: Callable[[str | None, object], Simulation], sizes: SimSizes, rounds: int,
                model_backends: tuple[str | None, ...], reference_rounds: int = 0
                ) -> Iterator[dict[str, tuple[Simulation, int]]]:
    """name -> (run, rounds): each model backend on the serial and the thread executor, the
    reference serially; backend None is the default model (the name then says the executor only)."""
    runs = {}
    for backend in model_backends:
        runs[_name(backend, "serial")] = (make(backend, SerialExecutor()), rounds)
        runs[_name(backend, f"threads({sizes.workers})")] = (make(backend, ThreadExecutor(sizes.workers)), rounds)
    if reference_rounds:
        runs["reference serial"] = (make("reference", SerialExecutor()), reference_rounds)
    try:
        yield runs
    finally:
        for run, _ in runs.values():
            run.close()


def _interleaved(runs: dict[str, tuple[Simulation, int]]) -> dict[str, list[float]]:
    """Step the runs in turn, one round each, until each has done its rounds; each round's seconds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(max(rounds for _, rounds in runs.values())):
        for name, (run, rounds) in runs.items():
            if r < rounds:
                start = time.perf_counter()
                run.step()
                times[name].append(time.perf_counter() - start)
    return times


def _warm_up(make: Callable[[str | None, object], Simulation], backend: str) -> float:
    """Seconds of one round of a throwaway run (Numba compiles its kernels or loads its cache)."""
    run = make(backend, SerialExecutor())
    start = time.perf_counter()
    run.step()
    return time.perf_counter() - start


def _per_round(workload: str, times: dict[str, list[float]], target: str | None = None,
               limit_ms: float | None = None) -> list[dict]:
    """Median round (ms) of every candidate, and the reference's over each compiled backend's
    (serial) on the same rounds."""
    rows = []
    for name, seconds in times.items():
        median_ms = 1e3 * statistics.median(seconds)
        limited = limit_ms is not None and not name.startswith("reference")
        rows.append(row(workload, f"{name}, median of {len(seconds)} rounds", median_ms, "ms/round",
                        target if limited else None, median_ms <= limit_ms if limited else None))
    reference = times.get("reference serial")
    for name in [name for name in times if name.endswith(" serial") and reference and name != "reference serial"]:
        same = times[name][:len(reference)]   # the same rounds, so the same clients
        rows.append(row(workload, f"reference / {name}, per-round medians of rounds 1-{len(reference)}",
                        statistics.median(reference) / statistics.median(same), "x"))
    return rows


# --------------------------------------------------------------------------- the workloads
def fedprox(sizes: SimSizes, model_backends: tuple[str, ...]) -> list[dict]:
    """Workload 1: FedProx's Synthetic(1,1) protocol, the whole run per model backend and executor."""
    data = fedprox_data(sizes)

    def make(backend: str, executor) -> Simulation:
        return simulation(data, sizes.fedprox_per_round, sizes.fedprox_epochs, backend=backend, executor=executor)

    name = f"FedProx {sizes.fedprox_rounds} rounds"
    rows = [row(name, f"{backend}, warm-up round in its own run ({WARM_UP[backend]})", _warm_up(make, backend), "s")
            for backend in model_backends]
    with _candidates(make, sizes, sizes.fedprox_rounds, model_backends, sizes.reference_rounds) as runs:
        times = _interleaved(runs)
        for candidate in [name for name in runs if not name.startswith("reference")]:
            total = sum(times[candidate])
            rows.append(row(name, f"{candidate}, total", total, "s", f"< {FEDPROX_TARGET_S:g} s",
                            total < FEDPROX_TARGET_S))
            accuracy = runs[candidate][0].history.last("test_accuracy")
            rows.append(row(name, f"{candidate}, final test accuracy", 100 * accuracy, "%"))
    return rows + _per_round("FedProx per round", times)


def cross_device(sizes: SimSizes, data: FederatedDataset, model_backends: tuple[str, ...]) -> list[dict]:
    """Workload 2: 1 epoch on ``device_per_round`` clients a round, no evaluation; median rounds."""
    def make(backend: str, executor) -> Simulation:
        return simulation(data, sizes.device_per_round, 1, backend=backend, executor=executor, eval_every=NEVER)

    for backend in model_backends:
        _warm_up(make, backend)
    with _candidates(make, sizes, sizes.device_rounds, model_backends, sizes.reference_rounds) as runs:
        times = _interleaved(runs)
    return _per_round(f"cross-device, {sizes.device_per_round} of {sizes.device_clients} a round", times,
                      f"< {DEVICE_TARGET_MS:g} ms", DEVICE_TARGET_MS)


def no_op(sizes: SimSizes, data: FederatedDataset) -> list[dict]:
    """Workload 3: the cross-device rounds with :func:`no_op_update` clients (the engine's own cost)."""
    def make(backend: None, executor) -> Simulation:    # the model never trains: its backend is moot
        return simulation(data, sizes.device_per_round, 1, executor=executor, client_update=no_op_update,
                          eval_every=NEVER)

    with _candidates(make, sizes, sizes.no_op_rounds, (None,)) as runs:
        times = _interleaved(runs)
    limit = NO_OP_BASE_MS + NO_OP_PER_CLIENT_MS * sizes.device_per_round
    target = f"<= {limit:g} ms (1 ms + 10 us x {sizes.device_per_round})"
    return _per_round(f"no-op clients, {sizes.device_per_round} a round", times, target, limit)


_FIRST_ROUND = """
import json, sys, time
clients, per_round, batch_size, lr = json.loads(sys.argv[1])
import fedkern
from fedkern import datasets, sim
imported = time.time()
data = datasets.fedprox_synthetic(1.0, 1.0, n_clients=clients, seed=0)
built = time.time()
model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
run = sim.Simulation(data, model, clients_per_round=per_round, seed=0, eval_every=10**9,
                     local=sim.LocalTraining(epochs=1, batch_size=batch_size, lr=lr))
run.step()
print(json.dumps([imported, built, time.time(), model.backend]))
"""


def _first_round_process(sizes: SimSizes) -> tuple[float, float, float, float, str]:
    """Wall-clock (launch, imported, data built, round 1 done) of one new process, and its model's backend."""
    settings = json.dumps([sizes.device_clients, sizes.device_per_round, BATCH_SIZE, LR])
    # the child finds this very fedkern, wherever it was imported from
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    launch = time.time()     # wall clock: the only clock two processes share by definition
    done = subprocess.run([sys.executable, "-c", _FIRST_ROUND, settings], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the first-round process failed (exit {done.returncode}):\n{done.stderr}")
    return (launch, *json.loads(done.stdout.strip().splitlines()[-1]))


def first_round(sizes: SimSizes) -> list[dict]:
    """Workload 4: seconds from launching Python to the end of round 1, Numba's and the dataset cache warm.

    The data comes from :mod:`fedkern.datasets`' on-disk cache as in any later run
    (generated afresh if ``FEDKERN_DATA_CACHE=off``); its time is also reported apart.
    """
    _first_round_process(sizes)     # fills Numba's on-disk cache and the dataset cache
    launch, imported, built, done, backend = _first_round_process(sizes)
    name = f"first round, new process, {sizes.device_clients} clients"
    target = f"< {FIRST_ROUND_TARGET_S:g} s"
    total, loading = done - launch, built - imported
    source = "generated, cache off" if datasets.cache_directory() is None else "from the dataset cache"
    return [row(name, "launch -> round 1 done (all included)", total, "s", target, total < FIRST_ROUND_TARGET_S),
            row(name, "  of which: start Python + import fedkern", imported - launch, "s"),
            row(name, f"  of which: fedprox_synthetic ({source})", loading, "s"),
            row(name, f"  of which: model ({backend}), Simulation, round 1", done - built, "s"),
            row(name, "launch -> round 1 done without the data", total - loading, "s", target,
                total - loading < FIRST_ROUND_TARGET_S)]


def _mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def memory(sizes: SimSizes) -> list[dict]:
    """Workload 5: the RSS at 100,000 clients, after building the data and after two round counts."""
    early, late = sizes.scale_rounds
    gc.collect()
    before = rss_bytes()
    data = scale_data(sizes.scale_clients, sizes.scale_rows)
    readings = {"after building the data": rss_bytes()}
    run = simulation(data, sizes.scale_per_round, 1, eval_every=NEVER)
    seconds = []
    while run.round < late:
        start = time.perf_counter()
        run.step()
        seconds.append(time.perf_counter() - start)
        if run.round in (early, late):
            gc.collect()
            readings[f"after round {run.round}"] = rss_bytes()
    name = f"memory, {sizes.scale_clients:,} clients x {sizes.scale_rows} rows"
    rows = [row(name, "the data's arrays", _mb(data_bytes(data)), "MB"),
            row(name, "RSS before the data", _mb(before), "MB")]
    rows += [row(name, f"RSS {when}", _mb(rss), "MB") for when, rss in readings.items()]
    rows.append(row(name, f"median round ({sizes.scale_per_round} a round)", 1e3 * statistics.median(seconds),
                    "ms/round"))
    first, last = readings[f"after round {early}"], readings[f"after round {late}"]
    if None not in (before, first, last):   # no /proc/self/statm: nothing to compare
        change = 100 * (last - first) / first
        rows += [row(name, f"RSS change, round {early} -> {late}", change, "%", f"within +-{RSS_FLAT_PERCENT:g}%",
                     abs(change) <= RSS_FLAT_PERCENT),
                 row(name, f"(RSS after round {late} - RSS before the data) / the data", (last - before) /
                     data_bytes(data), "x", "close to 1")]
    return rows


# --------------------------------------------------------------------------- the run
def _flushing(echo: Callable[[str], None] | None) -> Callable[[str], None]:
    """``echo`` followed by a flush, so progress shows when stdout is a pipe."""
    if echo is None:
        return lambda line: None

    def say(line: str) -> None:
        echo(line)
        sys.stdout.flush()

    return say


def run(sizes: SimSizes | None = None, *, profile: str = "sim", model_backends: tuple[str, ...] | None = None,
        with_first_round: bool = True, echo: Callable[[str], None] | None = print) -> dict:
    """Run the workloads; print a progress line per workload and the table; return the results.

    ``model_backends`` picks the compiled model backends to time (default: every one this
    machine runs, of :data:`COMPILED`); the numpy reference always runs its few rounds.
    The dict (what ``fedkern bench --sim --json`` prints) holds the machine, the sizes
    and ``results``: one :func:`row` per figure.
    """
    sizes = sizes or SimSizes()
    compiled = compiled_backends(model_backends)
    if not compiled:
        raise ValueError(f"the simulator's workloads need a compiled model backend, one of {COMPILED} "
                         f"that imports here; got {model_backends}")
    say = _flushing(echo)
    cpu = cpu_description()
    say(f"fedkern bench ({profile}): {cpu_line(cpu)}, {backends.get_num_threads()} threads "
        f"for the kernels, thread executors with {sizes.workers} workers, model backends "
        f"{', '.join(compiled)} and the reference")
    steps = 5 if with_first_round else 4
    started = time.perf_counter()

    def progress(i: int, what: str) -> None:
        say(f"[{i}/{steps}] {what} ({time.perf_counter() - started:.0f} s so far)")

    progress(1, f"FedProx protocol: {sizes.fedprox_rounds} rounds per executor, the reference "
                f"{sizes.reference_rounds}")
    rows = fedprox(sizes, compiled)
    progress(2, f"cross-device: {sizes.device_rounds} rounds per executor, the reference {sizes.reference_rounds}")
    with dataset_cache_off():      # the generator's own time, whatever the cache holds
        start = time.perf_counter()
        data = device_data(sizes)
        rows.append(row(f"cross-device, {sizes.device_per_round} of {sizes.device_clients} a round",
                        "data generation (fedprox_synthetic, dataset cache off)", time.perf_counter() - start, "s"))
    rows += cross_device(sizes, data, compiled)
    progress(3, f"no-op clients: {sizes.no_op_rounds} rounds per executor")
    rows += no_op(sizes, data)
    del data
    if with_first_round:
        progress(4, "first round in a new process (run twice: the first fills Numba's cache)")
        rows += first_round(sizes)
    progress(steps, f"memory: {sizes.scale_clients:,} clients, {sizes.scale_rounds[-1]} rounds")
    rows += memory(sizes)
    say(f"done in {time.perf_counter() - started:.0f} s\n")
    say(table(rows))
    return dict(profile=profile, machine=platform.machine(), processor=cpu["model"], cpu=cpu,
                threads=backends.get_num_threads(), model_backends=list(compiled),
                sizes={name: list(value) if isinstance(value, tuple) else value for name, value in asdict(sizes).items()},
                results=rows)


def _figure(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:,.{0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2}f}"


def markdown(result: dict) -> str:
    """A ``--sim --json`` run as a Markdown table, for the README (``python -m fedkern.bench.report``).

    Examples
    --------
    >>> from fedkern.bench import sim
    >>> run = dict(processor="a CPU", threads=2, results=[sim.row("w", "c", 4.2, "s", "< 5 s", True)])
    >>> print(sim.markdown(run))
    a CPU, 2 threads.
    <BLANKLINE>
    | workload | candidate | figure | target |
    |---|---|---|---|
    | w | c | 4.20 s | < 5 s (met) |
    """
    lines = ["| workload | candidate | figure | target |", "|---|---|---|---|"]
    for r in result["results"]:
        verdict = {True: " (met)", False: " (missed)", None: ""}[r["met"]]
        lines.append(f"| {r['workload']} | {r['candidate'].strip()} | {_figure(r['value'])} {r['unit']} | "
                     f"{r['target'] or ''}{verdict} |")
    return f"{result['processor']}, {result['threads']} threads.\n\n" + "\n".join(lines)


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table: workload, candidate, figure, unit, target, met."""
    cells = [("workload", "candidate", "figure", "unit", "target", "met")]
    cells += [(r["workload"], r["candidate"], _figure(r["value"]), r["unit"], r["target"] or "",
               {True: "yes", False: "NO", None: ""}[r["met"]]) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(6)]
    return "\n".join("  ".join(cell.rjust(w) if i == 2 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in cells)
