"""``fedkern bench --sim`` end to end at tiny sizes: every workload runs and returns
well-formed rows, the CLI's JSON parses. No timing is asserted, only the shape of the
results and the figures that follow from the data (bytes, row counts, identities)."""
import json
import math
import os
import sys

import numpy as np
import pytest

from fedkern import bench, cli
from fedkern._errors import FedkernTypeError, FedkernValueError
from fedkern.bench import SimSizes
from fedkern.bench import sim as simbench

TINY = SimSizes(fedprox_clients=4, fedprox_per_round=2, fedprox_epochs=1, fedprox_rounds=3, reference_rounds=2,
                device_clients=6, device_per_round=3, device_rounds=3, no_op_rounds=3, scale_clients=50,
                scale_rows=4, scale_per_round=5, scale_rounds=(2, 4))
ROW_KEYS = {"workload", "candidate", "value", "unit", "target", "met"}
LINUX = sys.platform.startswith("linux")
COMPILED = simbench.compiled_backends()


@pytest.fixture(scope="module")
def tiny_run():
    lines = []
    result = simbench.run(TINY, with_first_round=False, echo=lines.append)   # every compiled backend
    return result, lines


def check_rows(rows):
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["value"] is None or isinstance(row["value"], float)
        assert row["met"] in (True, False, None)
        assert (row["met"] is None) or row["target"], "a verdict needs a target"


def figures(rows, workload_start):
    return {row["candidate"]: row for row in rows if row["workload"].startswith(workload_start)}


def test_run_returns_every_workload_as_json(tiny_run):
    result, _ = tiny_run
    assert result["profile"] == "sim" and result["sizes"]["fedprox_rounds"] == 3
    assert result["model_backends"] == list(COMPILED) and COMPILED
    assert result["processor"] == bench.cpu_name() and result["threads"] >= 1
    check_rows(result["results"])
    assert json.loads(bench.to_json(result)) == result
    workloads = {row["workload"].split(",")[0].split(" ")[0] for row in result["results"]}
    assert workloads == {"FedProx", "cross-device", "no-op", "memory"}


def test_run_prints_a_progress_line_per_workload_then_the_table(tiny_run):
    result, lines = tiny_run
    assert lines[0].startswith("fedkern bench (sim): ")
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert lines[-1] == simbench.table(result["results"])


@pytest.mark.parametrize("backend", COMPILED)
def test_fedprox_reports_totals_accuracies_and_the_reference_per_round(tiny_run, backend):
    rows = figures(tiny_run[0]["results"], "FedProx")
    serial = rows[f"{backend} serial, final test accuracy"]
    threads = rows[f"{backend} threads(2), final test accuracy"]
    assert 0 <= serial["value"] <= 100
    assert serial["value"] == threads["value"]           # executors give the same bits
    assert rows[f"{backend} serial, total"]["target"] == "< 5 s"
    assert f"{backend}, warm-up round in its own run ({simbench.WARM_UP[backend]})" in rows
    assert rows["reference serial, median of 2 rounds"]["unit"] == "ms/round"
    assert rows[f"reference / {backend} serial, per-round medians of rounds 1-2"]["value"] > 0


@pytest.mark.parametrize("backend", COMPILED)
def test_cross_device_and_no_op_rounds_have_targets(tiny_run, backend):
    rows = figures(tiny_run[0]["results"], "cross-device")
    assert rows[f"{backend} serial, median of 3 rounds"]["target"] == "< 20 ms"
    assert rows["reference serial, median of 2 rounds"]["target"] is None
    assert rows["data generation (fedprox_synthetic, dataset cache off)"]["value"] > 0
    no_op = figures(tiny_run[0]["results"], "no-op")
    assert no_op["threads(2), median of 3 rounds"]["target"] == "<= 1.03 ms (1 ms + 10 us x 3)"
    assert set(no_op) == {"serial, median of 3 rounds", "threads(2), median of 3 rounds"}   # the model is moot


def test_ratio_compares_the_reference_with_numba_on_the_same_rounds():
    times = {"numba serial": [0.001, 0.003, 0.1, 0.1], "numba threads(2)": [0.001] * 4,
             "reference serial": [0.004, 0.008]}
    rows = simbench._per_round("w", times, "< 20 ms", 20.0)
    assert rows[-1]["value"] == pytest.approx(3.0)       # median(4, 8) / median(1, 3), not over all 4 rounds
    assert [row["met"] for row in rows[:3]] == [False, True, None]   # the reference has no target


def test_memory_reports_rss_at_each_reading():
    rows = figures(simbench.memory(TINY), "memory")
    check_rows(rows.values())
    data = simbench.scale_data(TINY.scale_clients, TINY.scale_rows)
    assert rows["the data's arrays"]["value"] == simbench.data_bytes(data) / 2**20
    readings = ["RSS before the data", "RSS after building the data", "RSS after round 2", "RSS after round 4"]
    assert all(name in rows for name in readings)
    if LINUX:
        assert all(rows[name]["value"] > 0 for name in readings)
        assert rows["RSS change, round 2 -> 4"]["target"] == "within +-5%"


@pytest.mark.skipif(not LINUX, reason="/proc/self/statm is Linux's")
def test_rss_is_the_current_resident_size():
    before = simbench.rss_bytes()
    block = np.ones(64 << 20, np.uint8)                  # 64 MiB, touched
    assert simbench.rss_bytes() - before > 32 << 20
    del block


def test_scale_data_is_clients_of_equal_size_with_a_central_test_set():
    data = simbench.scale_data(7, 3, n_features=5, n_classes=4, test_rows=11)
    assert data.train.sizes.tolist() == [3] * 7 and data.test.sizes.tolist() == [11]
    assert data.train.x.dtype == np.float32 and data.train.x.shape == (21, 5)
    assert data.train.y.min() >= 0 and data.train.y.max() < 4 and data.train.n_classes == 4
    again = simbench.scale_data(7, 3, n_features=5, n_classes=4, test_rows=11)
    assert np.array_equal(again.train.x, data.train.x) and np.array_equal(again.test.y, data.test.y)


def test_no_op_clients_leave_the_model_where_it_was():
    data = simbench.device_data(TINY)
    run = simbench.simulation(data, 3, 1, client_update=simbench.no_op_update, eval_every=simbench.NEVER)
    start = run.params.copy()
    record = run.step()
    assert np.array_equal(run.params, start) and record["arrived"] == 3
    assert math.isnan(record["test_accuracy"])           # no evaluation in the timed rounds


def test_first_round_runs_in_a_new_process():
    rows = figures(simbench.first_round(TINY), "first round")
    check_rows(rows.values())
    total = rows["launch -> round 1 done (all included)"]["value"]
    parts = [row["value"] for name, row in rows.items() if name.startswith("  of which")]
    assert len(parts) == 3 and all(part >= 0 for part in parts)
    assert sum(parts) == pytest.approx(total)
    assert rows["launch -> round 1 done without the data"]["value"] == pytest.approx(total - parts[1])
    assert "  of which: fedprox_synthetic (from the dataset cache)" in rows   # tests/conftest.py sets a cache
    assert f"  of which: model ({COMPILED[0]}), Simulation, round 1" in rows   # the default model backend


def test_dataset_cache_off_restores_the_setting(monkeypatch):
    monkeypatch.setenv("FEDKERN_DATA_CACHE", "/somewhere")
    with simbench.dataset_cache_off():
        assert os.environ["FEDKERN_DATA_CACHE"] == "off"
    assert os.environ["FEDKERN_DATA_CACHE"] == "/somewhere"
    monkeypatch.delenv("FEDKERN_DATA_CACHE")
    with simbench.dataset_cache_off():
        pass
    assert "FEDKERN_DATA_CACHE" not in os.environ


def test_a_failing_first_round_process_says_why(monkeypatch):
    monkeypatch.setattr(simbench, "_FIRST_ROUND", "import sys; sys.exit('no luck')")
    with pytest.raises(RuntimeError, match=r"\(exit 1\):\nno luck"):
        simbench.first_round(TINY)


def test_sizes_are_validated():
    with pytest.raises(FedkernValueError, match="device_rounds must be >= 1"):
        SimSizes(device_rounds=0)
    with pytest.raises(FedkernTypeError, match="workers must be an integer"):
        SimSizes(workers=2.0)
    with pytest.raises(FedkernValueError, match="scale_rounds must be two round counts"):
        SimSizes(scale_rounds=(10, 10))
    assert SimSizes(reference_rounds=0).reference_rounds == 0


def test_without_reference_rounds_no_reference_is_timed():
    sizes = SimSizes(**{**TINY.__dict__, "reference_rounds": 0})
    rows = simbench.cross_device(sizes, simbench.device_data(sizes), ("numba",))
    assert {row["candidate"] for row in rows} == {"numba serial, median of 3 rounds",
                                                  "numba threads(2), median of 3 rounds"}


def test_table_aligns_columns_and_marks_verdicts():
    rows = [simbench.row("a", "b", 1234.4, "ms", "< 1 ms", False), simbench.row("a", "long name", None, "MB"),
            simbench.row("a", "c", 0.012345, "s")]
    lines = simbench.table(rows).splitlines()
    assert lines[0].split() == ["workload", "candidate", "figure", "unit", "target", "met"]
    assert lines[1].split()[2:] == ["1,234", "ms", "<", "1", "ms", "NO"]
    assert lines[2].split()[-2:] == ["n/a", "MB"] and lines[3].split()[-2:] == ["0.0123", "s"]
    ends = {line.index(figure) + len(figure) for line, figure in zip(lines, ["figure", "1,234", "n/a", "0.0123"])}
    assert len(ends) == 1                                # figures are right-aligned


def test_cli_bench_sim_json_parses(monkeypatch, capsys):
    monkeypatch.setitem(bench.PROFILES, "sim", bench.Profile("tiny", sim=TINY))
    assert cli.main(["bench", "--sim", "--json", "--no-cold-start"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile"] == "sim" and result["sizes"]["device_clients"] == TINY.device_clients
    check_rows(result["results"])


def test_sim_profile_is_a_cli_flag_and_needs_a_compiled_model_backend():
    assert bench.PROFILES["sim"].sim == SimSizes()
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sim", "--quick"])          # profiles exclude each other
    with pytest.raises(ValueError, match="need a compiled model backend"):
        bench.run("sim", ("reference",))
    assert bench.cases("sim") == []                      # no op cases: the profile is the simulator's


def test_backends_pick_the_model_backends_timed(monkeypatch, capsys):
    monkeypatch.setitem(bench.PROFILES, "sim", bench.Profile("tiny", sim=TINY))
    assert cli.main(["bench", "--sim", "--json", "--no-cold-start", "--backends", "numba"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_backends"] == ["numba"]
    assert not any(row["candidate"].startswith("cython") for row in result["results"])
