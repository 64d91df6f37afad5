"""The ``fedkern`` command: ``fedkern info`` and ``fedkern bench``."""
from __future__ import annotations

import argparse
import platform
import sys

import numpy as np

from . import __version__, backends, bench


def info() -> str:
    """Versions, which backends import, OpenMP on/off, threads, and the default backend."""
    lines = [f"fedkern {__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"numpy {np.__version__}", f"cpu: {bench.cpu_name()}"]
    for name in backends.NAMES:
        try:
            backends._load(name, "aggregate")
            detail = "available"
        except backends.BackendUnavailableError as err:
            detail = f"NOT available ({err.__cause__})"
        if name == "cython" and detail == "available":
            runtime, build = backends._load("cython", "_runtime"), backends._load("cython", "_build")
            target = f"the building CPU (-march=native: {' '.join(build.ISA) or 'no x86 extensions'})"
            detail += (f", openmp {'on' if runtime.openmp_enabled() else 'off'}, built for "
                       f"{target if build.NATIVE else 'a portable baseline'}")
        if name == "numba" and detail == "available":
            import numba

            detail += f", numba {numba.__version__}, threading layer {numba.config.THREADING_LAYER}"
        lines.append(f"backend {name}: {detail}")
    lines.append(f"threads: {backends.get_num_threads()} (fedkern.set_num_threads or FEDKERN_NUM_THREADS)")
    lines.append(f"default backend: {backends.get_backend()} (auto = {backends.resolve('aggregate', 'auto')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkern", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, backends, OpenMP and threads")
    bench_parser = commands.add_parser("bench", help="time every backend of every op against the reference "
                                                    f"({bench.PROFILES['default'].help} without a profile flag)")
    size = bench_parser.add_mutually_exclusive_group()
    for name, profile in bench.PROFILES.items():
        if name != "default":
            size.add_argument(f"--{name}", action="store_true", help=profile.help)
    bench_parser.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    bench_parser.add_argument("--threads", type=int, help="threads for the compiled backends")
    bench_parser.add_argument("--backends", nargs="+", choices=backends.NAMES, help="backends to time")
    bench_parser.add_argument("--no-cold-start", action="store_true", help="skip the new-process first-call timing")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(info())
        return 0
    if args.threads:
        backends.set_num_threads(args.threads)
    profile = next((name for name in bench.PROFILES if name != "default" and getattr(args, name)), "default")
    result = bench.run(profile, tuple(args.backends) if args.backends else None,
                       with_cold_start=False if args.no_cold_start else None,
                       echo=None if args.json else print)
    if args.json:
        print(bench.to_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
