"""``fedkern bench``: every backend of every op, side by side, against the memory bandwidth.

The cases come from the op registry (:mod:`fedkern._registry`) at the sizes of a profile
(:data:`PROFILES`); :mod:`.runner` times them, :mod:`.report` turns a run's JSON into the
README's tables, and ``benchmarks/`` runs the same cases under pytest-benchmark. The
``sim`` profile (:class:`SimSizes`) times the simulator's workloads instead
(:mod:`fedkern.bench.sim`, imported when that profile runs).
"""
from .cases import PROFILES, Case, Profile, ScalingSizes, SimSizes, cases
from .runner import (INSTALL_HINTS, cache_sizes, cpu_description, cpu_line, cpu_name, installed, interleaved_times,
                     median_time, read_bandwidth, run, to_json, wake_cores)

__all__ = ["INSTALL_HINTS", "PROFILES", "Case", "Profile", "ScalingSizes", "SimSizes", "cache_sizes", "cases", "cpu_description",
           "cpu_line", "cpu_name", "installed", "interleaved_times", "median_time", "read_bandwidth", "run", "to_json",
           "wake_cores"]
