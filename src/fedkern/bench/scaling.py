r"""``fedkern bench --scaling``: how an op's cost grows with K and D, in time per byte.

For every cell of a grid of K clients x D coordinates (:class:`~fedkern.bench.cases.ScalingSizes`,
by default K in {10, 100, 1000} x D in {1e5, 1e6, 1e7}), each op is timed on K float32
updates of D coordinates, and its median is printed as nanoseconds per byte of input
(4 K D bytes). A mean reads each byte once, so its time per byte stays flat as K and D
grow; pairwise distances (Krum) make K^2 D / 2 differences, so theirs grows with K. Ops
with methods (Krum's ``auto``, ``gram`` and ``exact``) are timed per method on the
default backend; the others per compiled backend, so the table shows where each wins.

A cell is skipped when its data would not fit in half the machine's memory, or when the
candidate's time predicted from the largest cell it has already run (time per unit of
work x the cell's work, work K D, or K^2 D for distances) exceeds ``max_seconds``; every
skip is printed and recorded. Candidates of a cell run interleaved, as in every profile.

Examples
--------
>>> from fedkern.bench import scaling
>>> scaling.predicted_seconds(0.5, (10, 1000), (100, 1000), exponent=2)
50.0
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from .. import _registry, backends
from .cases import ScalingSizes, size_label
from .runner import cpu_description, cpu_line, interleaved_times


def predicted_seconds(seconds: float, measured: tuple[int, int], cell: tuple[int, int], exponent: int) -> float:
    """Seconds for ``cell`` = (K, D) from ``seconds`` measured at ``measured``, when work
    grows as K^exponent x D."""
    (k0, d0), (k1, d1) = measured, cell
    return seconds * (k1 / k0) ** exponent * (d1 / d0)


def memory_bytes() -> int:
    """The machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def candidates(op: str, by_method: tuple[str, ...] = ("krum",)) -> dict[str, tuple[str | None, dict]]:
    """The candidates of an op by label: (backend, extra keyword arguments).

    An op of ``by_method`` is timed per method (its registry variants) on the default
    backend; any other, per compiled backend this machine runs.
    """
    spec = _registry.BY_NAME[op]
    if op in by_method:
        return {variant: (None, extra) for variant, extra in spec.variants.items()}
    return {name: (name, {}) for name in backends.NAMES if name != "reference" and backends.is_available(name)}


def run(sizes: ScalingSizes, *, profile: str = "scaling", echo: Callable[[str], None] | None = print) -> dict:
    """Time the grid; print a line per candidate and cell; return the results (``--json``)."""
    say = echo or (lambda line: None)
    cpu = cpu_description()
    say(f"fedkern bench ({profile}): {cpu_line(cpu)}, {backends.get_num_threads()} threads; "
        f"ns per byte of input (4 K D), cells predicted to take over {sizes.max_seconds:.0f} s skipped")
    say(f"{'op':<18} {'candidate':<10} {'size':<14} {'median':>10} {'min-max ms':>19} {'ns/byte':>8}")
    cells = sorted(((k, d) for k in sizes.ks for d in sizes.ds), key=lambda cell: (cell[0] * cell[1], cell[0]))
    largest: dict[tuple[str, str], tuple[tuple[int, int], float]] = {}   # (op, candidate) -> (cell, seconds)
    rows, skipped = [], []
    started = time.perf_counter()
    for k, d in cells:
        if 4 * k * d > sizes.memory_fraction * memory_bytes():
            skipped.append(dict(size=size_label(k, d), reason="memory"))
            say(f"skipped {size_label(k, d)}: {4 * k * d / 2**30:.1f} GiB of updates exceed "
                f"{sizes.memory_fraction:.0%} of memory")
            continue
        data = None
        for op in sizes.ops:
            spec = _registry.BY_NAME[op]
            calls = {}
            for label, (backend, extra) in candidates(op, sizes.by_method).items():
                if (op, label) in largest:
                    cell, seconds = largest[op, label]
                    guess = predicted_seconds(seconds, cell, (k, d), sizes.exponents.get(op, 1))
                    if guess > sizes.max_seconds:
                        skipped.append(dict(op=op, candidate=label, size=size_label(k, d), reason="time",
                                            predicted_s=guess))
                        say(f"skipped {op} {label} at {size_label(k, d)}: predicted {guess:.0f} s")
                        continue
                if data is None:
                    data = _registry.updates(np.random.default_rng(0), k, d, np.dtype(np.float32))
                calls[label] = _call(spec, backend, data, extra)
            if not calls:
                continue
            times = interleaved_times(calls, budget=sizes.budget)
            for label, seconds in times.items():
                median = statistics.median(seconds)
                largest[op, label] = ((k, d), median)
                row = dict(op=op, candidate=label, k=k, d=d, size=size_label(k, d), median_s=median,
                           min_s=min(seconds), max_s=max(seconds), repeats=len(seconds),
                           ns_per_byte=1e9 * median / (4 * k * d))
                rows.append(row)
                spread = f"{1e3 * row['min_s']:.2f}-{1e3 * row['max_s']:.2f}"
                say(f"{op:<18} {label:<10} {row['size']:<14} {_time(median):>10} {spread:>19} "
                    f"{row['ns_per_byte']:>8.3f}  ({time.perf_counter() - started:.0f} s so far)")
        del data
    return dict(profile=profile, processor=cpu["model"], cpu=cpu, threads=backends.get_num_threads(),
                scaling=True, results=rows, skipped=skipped)


def _call(spec: _registry.OpSpec, backend: str | None, data: list[np.ndarray], extra: dict) -> Callable[[], object]:
    """The op on ``data``; its other arguments are its registry example's (built at D = 1,
    since they depend on K alone: weights, f, iterations)."""
    args, kwargs = spec.example(np.random.default_rng(0), len(data), 1, np.dtype(np.float32))
    args, kwargs = (data, *args[1:]), {**kwargs, **extra}
    return lambda: spec(backend, *args, **kwargs)


def _time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{1e3 * seconds:.2f} ms"


def markdown(result: dict) -> str:
    """A ``--scaling --json`` run as a Markdown table: ns per byte by op, candidate and K,
    a column per D (``python -m fedkern.bench.report``)."""
    ds = sorted({row["d"] for row in result["results"]})
    groups: dict[tuple[str, str, int], dict[int, dict]] = {}
    for row in result["results"]:
        groups.setdefault((row["op"], row["candidate"], row["k"]), {})[row["d"]] = row
    header = ["op", "candidate", "K", *(f"D={d:.0e}".replace("e+0", "e") for d in ds)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (op, label, k), by_d in groups.items():
        cells = [f"{by_d[d]['ns_per_byte']:.3f} ({_time(by_d[d]['median_s'])})" if d in by_d else "skipped"
                 for d in ds]
        lines.append("| " + " | ".join([op, label, str(k), *cells]) + " |")
    return (f"{cpu_line(result['cpu'])}, {result['threads']} threads; ns per byte of input (median time).\n\n"
            + "\n".join(lines))
