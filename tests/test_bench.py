"""``fedkern bench`` and ``fedkern info`` on a plain install: no optional package is
imported where a plain ``pip install .`` reaches, and a missing peer is skipped with a
line saying what adds it."""
import contextlib
import io
import json
import subprocess
import sys
import textwrap

import pytest

import fedkern
from fedkern import bench, cli

#: Every optional package fedkern knows of (extras and test-only peers).
OPTIONAL = ("scipy", "flwr", "sklearn", "mlxtend", "matplotlib", "ray", "tqdm", "cryptography",
            "dp_accounting", "torch", "threadpoolctl")

#: Run first in a subprocess: makes every optional package unimportable, as on a plain install.
BLOCK_OPTIONAL = textwrap.dedent(f"""
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {OPTIONAL!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, Blocked())
""")


def run_plain(code: str) -> str:
    """Run ``code`` in a new interpreter where no optional package can be imported."""
    done = subprocess.run([sys.executable, "-c", BLOCK_OPTIONAL + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_module_imports_without_optional_packages():
    out = run_plain("""
        import pkgutil, sys
        import fedkern
        for module in pkgutil.walk_packages(fedkern.__path__, "fedkern."):
            __import__(module.name)
        from fedkern import cli
        print(cli.info())
        print(sorted(name for name in sys.modules if name.split(".")[0] in OPTIONAL))
    """.replace("OPTIONAL", repr(OPTIONAL)))
    assert "backend reference: available" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_bench_runs_to_the_end_without_optional_packages():
    out = run_plain("""
        from fedkern import bench
        result = bench.run("quick", ("reference",), with_cold_start=False)
        assert any(row["op"] == "trimmed_mean" for row in result["results"])
        assert not any(row["backend"] == "scipy.trim_mean" for row in result["results"])
        flwr = bench.run("flwr", ("reference",), with_cold_start=False)
        assert flwr["results"] == []
        print("done")
    """)
    assert out.count("skipped peer scipy.trim_mean: scipy is not installed (pip install scipy adds it)") == 1
    assert "flwr is not installed (pip install \"fedkern[flwr]\" adds it)" in out
    assert out.strip().endswith("done")


def test_installed_reports_missing_and_present_packages():
    assert bench.installed("numpy")
    assert not bench.installed("fedkern_no_such_package")


def test_cpu_name_is_a_non_empty_string():
    assert isinstance(bench.cpu_name(), str) and bench.cpu_name()


def test_cache_sizes_read_sysfs_levels_types_and_units(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "260M")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    assert bench.cache_sizes(str(tmp_path)) == {"L1d": 48 << 10, "L1i": 32 << 10, "L2": 2 << 20, "L3": 260 << 20}
    assert bench.cache_sizes(str(tmp_path / "absent")) == {}


def test_the_cpu_line_names_model_isa_caches_and_cpus():
    cpu = dict(model="Some CPU", machine="x86_64", isa="AVX2", caches={"L1d": 32 << 10, "L1i": 32 << 10,
                                                                       "L2": 512 << 10, "L3": 32 << 20},
               logical_cpus=2)
    assert bench.cpu_line(cpu) == "Some CPU (x86_64, AVX2, L1d 32 KiB, L2 512 KiB, L3 32 MiB, 2 logical CPUs)"
    here = bench.cpu_description()
    assert here["model"] == bench.cpu_name() and here["logical_cpus"] >= 1


def test_interleaved_times_take_turns_and_respect_repeats_and_budget():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    times = bench.interleaved_times(calls, budget=10.0, min_repeats=3, max_repeats=4)
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert log == ["a", "b", "c"] * 5          # one warm-up round, then rounds in turn


def test_interleaved_times_time_a_slow_candidate_once_and_a_peer_without_warm_up():
    import time

    calls = {"slow": lambda: time.sleep(0.02), "fast": lambda: None, "peer": lambda: None}
    times = bench.interleaved_times(calls, budget=0.01, min_repeats=3, max_repeats=5, no_warm_up=frozenset({"peer"}))
    # the fast calls never fill the budget, so they run to max_repeats; the peer's first call counts
    assert len(times["slow"]) == 1 and len(times["fast"]) == 5 and len(times["peer"]) == 5


def test_interleaved_times_judge_a_slow_warm_up_by_the_call_after_it():
    import time

    first = iter([True])
    calls = {"compiles": lambda: time.sleep(0.02) if next(first, False) else None,  # slow the first time only
             "slow": lambda: time.sleep(0.02)}
    times = bench.interleaved_times(calls, budget=0.01, min_repeats=3, max_repeats=5)
    assert len(times["compiles"]) == 5 and max(times["compiles"]) < 0.01   # the warm-up is not a timing
    assert len(times["slow"]) == 1 and times["slow"][0] >= 0.02


def test_interleaved_times_wake_the_cores_after_each_settle(monkeypatch):
    from fedkern.bench import runner

    events = []
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: events.append("sleep"))
    monkeypatch.setattr(runner, "wake_cores", lambda: events.append("wake"))
    calls = {"peer": lambda: events.append("peer"), "a": lambda: events.append("a")}
    bench.interleaved_times(calls, budget=10.0, min_repeats=2, max_repeats=2, no_warm_up=frozenset({"peer"}),
                            settle=0.25, settle_after=frozenset({"peer"}))
    assert events == ["peer", "sleep", "wake", "a"] * 2 + ["a"]


def test_wake_cores_returns_after_its_time():
    import time

    start = time.perf_counter()
    bench.wake_cores(0.01)
    assert 0.01 <= time.perf_counter() - start < 5.0


def test_interleaved_times_settle_after_each_call_of_the_named_candidates_outside_their_time(monkeypatch):
    from fedkern.bench import runner

    events = []
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    calls = {"peer": lambda: events.append("peer"), "a": lambda: events.append("a")}
    times = bench.interleaved_times(calls, budget=10.0, min_repeats=3, max_repeats=3,
                                    no_warm_up=frozenset({"peer"}), settle=0.25, settle_after=frozenset({"peer"}))
    # the peer's first call is a timing, so it is done a round before "a"; every peer call settles, no call of "a"
    assert events == ["peer", ("sleep", 0.25), "a"] * 3 + ["a"]
    assert len(times["peer"]) == 3 and max(times["peer"]) < 0.25    # the wait is not in its time


def test_info_names_every_backend_and_the_threads(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "cython", "numba"):
        assert f"backend {name}: " in out
    assert "threads: " in out


@pytest.fixture(scope="module")
def quick_json():
    """One ``fedkern bench --quick --json`` run of the reference backend (about 30 s), parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["bench", "--quick", "--no-cold-start", "--json", "--backends", "reference"]) == 0
    return json.loads(out.getvalue())


def test_bench_json_holds_every_backend_of_every_case(quick_json):
    result = quick_json
    ops = {case.op for case in bench.cases("quick")}
    assert {row["op"] for row in result["results"]} == ops
    assert result["processor"] == bench.cpu_name() and result["cpu"] == bench.cpu_description()
    for row in result["results"]:
        assert row["median_s"] > 0 and row["gb_per_s"] > 0
        assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["repeats"] >= 1


def test_unknown_profile_is_rejected():
    with pytest.raises(ValueError, match="profile must be one of"):
        bench.cases("huge")


def test_every_registry_op_has_a_case_in_every_sized_profile():
    from fedkern import _registry

    for profile in ("quick", "default", "full"):
        ops = {case.op.split("(")[0] for case in bench.cases(profile)}
        assert ops >= {spec.name for spec in _registry.OPS}, profile


def test_cli_flags_are_the_profiles(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for name, profile in bench.PROFILES.items():
        assert name == "default" or f"--{name}" in out


def test_report_turns_a_run_into_a_table(quick_json):
    from fedkern.bench import report

    result = quick_json
    text = report.table(result)
    lines = text.splitlines()
    assert lines[2].startswith("| op | size | reference |")
    ops = {row["op"] for row in result["results"]}
    assert len(lines) - 4 == len({(row["op"], row["size"]) for row in result["results"]}) and ops
    assert "scipy.trim_mean" in text or not bench.installed("scipy")
    assert lines[0].startswith(bench.cpu_line(result["cpu"]) + ", ")   # the CPU named with its ISA and caches


def test_cli_info():
    result = subprocess.run([sys.executable, "-m", "fedkern.cli", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout.lower()
    for word in ("cython", "numba", "reference", "openmp", "threads", fedkern.__version__):
        assert word in text, f"{word!r} missing from `fedkern info`:\n{result.stdout}"
