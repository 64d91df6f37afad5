"""``fedkern bench``: every backend of every op, side by side, against the memory bandwidth.

The cases come from the op registry (:mod:`fedkern._registry`) at the sizes of a profile
(:data:`PROFILES`); :mod:`.runner` times them, :mod:`.report` turns a run's JSON into the
README's tables, and ``benchmarks/`` runs the same cases under pytest-benchmark.
"""
from .cases import PROFILES, Case, Profile, cases
from .runner import INSTALL_HINTS, cpu_name, installed, median_time, read_bandwidth, run, to_json

__all__ = ["INSTALL_HINTS", "PROFILES", "Case", "Profile", "cases", "cpu_name", "installed", "median_time",
           "read_bandwidth", "run", "to_json"]
