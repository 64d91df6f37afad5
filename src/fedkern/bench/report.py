"""The README's benchmark tables from a ``fedkern bench --json`` run.

``python -m fedkern.bench.report run.json`` prints one Markdown table per run: a row per
op and size with each backend's median, the best backend's GB/s and share of the read
bandwidth measured in the same run, its speedup over the reference and, where the op has
one, over its peer.
"""
from __future__ import annotations

import argparse
import json
import sys

from .. import backends
from .runner import cpu_line


def _ms(seconds: float) -> str:
    milliseconds = 1e3 * seconds
    return f"{seconds:.2f} s" if seconds >= 1 else f"{milliseconds:.{1 if milliseconds >= 10 else 2}f} ms"


def table(result: dict) -> str:
    """One Markdown table of a bench result (what :func:`fedkern.bench.run` returns)."""
    if "sizes" in result:       # a ``--sim`` run: its rows are workloads, not ops
        from . import sim

        return sim.markdown(result)
    if result.get("scaling"):   # a ``--scaling`` run: ns per byte over a K x D grid
        from . import scaling

        return scaling.markdown(result)
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for row in result["results"]:
        groups.setdefault((row["op"], row["size"]), {})[row["backend"]] = row
    timed = [name for name in backends.NAMES if any(name in rows for rows in groups.values())]
    with_peer = any(set(rows) - set(backends.NAMES) for rows in groups.values())
    header = ["op", "size", *timed, "best GB/s (% of read bandwidth)", "best x reference"]
    header += ["peer", "best x peer"] if with_peer else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (op, size), rows in groups.items():
        best = min((rows[name] for name in timed if name in rows and name != "reference"),
                   key=lambda row: row["median_s"], default=rows.get("reference"))
        cells = [op, size, *(_ms(rows[name]["median_s"]) if name in rows else "" for name in timed),
                 f"{best['gb_per_s']:.1f} ({best['percent_bandwidth']:.0f}%)", f"{best['speedup']:.1f}x"]
        if with_peer:
            peer = next((name for name in rows if name not in backends.NAMES), None)
            cells += [f"{peer} {_ms(rows[peer]['median_s'])}", f"{best['speedup_vs_peer']:.2f}x"] if peer else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    # runs saved before the bench recorded its CPU's caches name the processor alone
    machine = cpu_line(result["cpu"]) if "cpu" in result else result["processor"]
    intro = (f"{machine}, {result['threads']} threads, profile {result['profile']}; read bandwidth "
             f"measured in the same run: {result['read_bandwidth_gb_per_s']:.1f} GB/s.")
    return intro + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedkern.bench.report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="JSON files written by `fedkern bench --json`")
    args = parser.parse_args(argv)
    for path in args.runs:
        with open(path) as file:
            print(table(json.load(file)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
