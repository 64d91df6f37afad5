"""The ``fedkern`` command: ``fedkern simulate``, ``fedkern bench`` and ``fedkern info``."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np

from . import __version__, backends, bench


def info() -> str:
    """Versions, which backends import, OpenMP on/off, threads, and the default backend."""
    lines = [f"fedkern {__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"numpy {np.__version__}", f"cpu: {bench.cpu_line(bench.cpu_description())}"]
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


class Progress:
    """A one-line progress bar on stderr for a run of ``total`` rounds (plain lines when not a terminal)."""

    def __init__(self, total: int, title: str, stream=None):
        self.total, self.title = total, title
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = time.perf_counter()
        self.every = max(1, total // 4)

    def __call__(self, record: dict) -> None:
        r = record["round"]
        accuracy = record["test_accuracy"]
        shown = "   nan" if accuracy != accuracy else f"{100 * accuracy:5.1f}%"
        elapsed = time.perf_counter() - self.start
        if self.live:
            filled = 24 * r // self.total
            bar = "#" * filled + "." * (24 - filled)
            end = "\n" if r == self.total else ""
            self.stream.write(f"\r{self.title} [{bar}] round {r}/{self.total}  test acc {shown}  {elapsed:.1f} s{end}")
            self.stream.flush()
        elif r % self.every == 0 or r == self.total:
            self.stream.write(f"{self.title}: round {r}/{self.total}, test acc {shown}, {elapsed:.1f} s\n")


def simulate(args: argparse.Namespace) -> int:
    """``fedkern simulate``: one config, a resumed run, or the built-in demo; then a summary table."""
    from .sim import config as configs, experiment

    rows = []
    if args.resume:
        if args.config or args.set or args.output:
            raise configs.ConfigError("--resume DIR takes no --config, --set or --output (DIR holds them)")
        settings = configs.resolve(experiment.saved_config(args.resume))
        start = time.perf_counter()
        simulation, _ = experiment.resume(args.resume, progress=_bar(args, settings["rounds"], "resume"))
        rows.append((f"resumed {args.resume}", simulation.history, time.perf_counter() - start))
    elif args.config or args.set:
        config = configs.apply_overrides(configs.read(args.config) if args.config else {}, args.set or [])
        settings = configs.resolve(config)
        title = args.config or "config"
        start = time.perf_counter()
        simulation, _ = experiment.run(config, args.output, title=title, progress=_bar(args, settings["rounds"], title))
        rows.append((title, simulation.history, time.perf_counter() - start))
    else:
        print("fedkern simulate: the built-in experiment (pass --config FILE.toml to run your own)", flush=True)
        for i, (title, config) in enumerate(experiment.DEMO):
            output = f"{args.output}/run{i + 1}" if args.output else None
            start = time.perf_counter()
            simulation, _ = experiment.run(config, output, title=title, progress=_bar(args, config["rounds"], title))
            rows.append((title, simulation.history, time.perf_counter() - start))
    print(experiment.summary(rows))
    if args.output or args.resume:
        print(f"results in {args.output or args.resume}: config.toml, history.json, history.csv, params.npy"
              f"{', learning_curves.png' if _has_matplotlib() else ' (pip install fedkern[plot] adds the plot)'}")
    return 0


def _bar(args, total: int, title: str):
    return None if args.quiet else Progress(total, title)


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedkern", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions, backends, OpenMP and threads")
    sim_parser = commands.add_parser("simulate", help="run federated learning (the built-in experiment without a config)")
    sim_parser.add_argument("--config", metavar="FILE.toml", help="the run's config (keys: see the README)")
    sim_parser.add_argument("--set", metavar="KEY=VALUE", action="append",
                            help="override a config key, e.g. --set rounds=50 --set aggregator.name=median")
    sim_parser.add_argument("--output", metavar="DIR", help="write config, history, params, plot and checkpoints here")
    sim_parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    sim_parser.add_argument("--quiet", action="store_true", help="no progress bar")
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
    if args.command == "simulate":
        from .sim.config import ConfigError

        try:
            return simulate(args)
        except ConfigError as err:
            print(f"fedkern simulate: {err}", file=sys.stderr)
            return 2
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
