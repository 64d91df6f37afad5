"""``fedkern bench --scaling``: the grid, the per-byte figures, the skips and the table."""
import json

import pytest

from fedkern import backends, bench, cli
from fedkern._errors import FedkernValueError
from fedkern.bench import scaling
from fedkern.bench.cases import ScalingSizes

TINY = ScalingSizes(ks=(5, 10), ds=(200, 400), budget=0.01)


@pytest.fixture(scope="module")
def tiny_run():
    return scaling.run(TINY, echo=None)


def compiled() -> list[str]:
    return [name for name in backends.NAMES if name != "reference" and backends.is_available(name)]


def test_every_op_runs_on_every_cell_per_backend_or_per_method(tiny_run):
    seen = {(row["op"], row["candidate"], row["k"], row["d"]) for row in tiny_run["results"]}
    cells = [(k, d) for k in TINY.ks for d in TINY.ds]
    expected = {("krum", method, k, d) for method in ("auto", "gram", "exact") for k, d in cells}
    expected |= {(op, name, k, d) for op in ("weighted_mean", "median", "geometric_median")
                 for name in compiled() for k, d in cells}
    assert seen == expected and not tiny_run["skipped"]


def test_ns_per_byte_is_the_median_over_the_input_bytes(tiny_run):
    for row in tiny_run["results"]:
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["ns_per_byte"] == pytest.approx(1e9 * row["median_s"] / (4 * row["k"] * row["d"]))


def test_the_json_names_the_cpu_and_parses(tiny_run):
    text = bench.to_json(tiny_run)
    assert json.loads(text)["cpu"]["model"] == tiny_run["processor"]


def test_predicted_seconds_scale_with_the_work():
    assert scaling.predicted_seconds(1.0, (10, 100), (100, 100), exponent=1) == pytest.approx(10.0)
    assert scaling.predicted_seconds(1.0, (10, 100), (100, 1000), exponent=2) == pytest.approx(1000.0)


def test_a_cell_predicted_too_slow_is_skipped_after_the_first_is_timed():
    sizes = ScalingSizes(ops=("weighted_mean",), ks=(5,), ds=(100, 1000), max_seconds=1e-12, budget=0.01)
    result = scaling.run(sizes, echo=None)
    assert {row["d"] for row in result["results"]} == {100}
    assert {(s["candidate"], s["reason"]) for s in result["skipped"]} == {(name, "time") for name in compiled()}
    assert all(s["predicted_s"] > sizes.max_seconds for s in result["skipped"])


def test_a_cell_too_large_for_memory_is_skipped(monkeypatch):
    monkeypatch.setattr(scaling, "memory_bytes", lambda: 2 * 4 * 5 * 100)   # half of it holds 5 x 100 float32
    sizes = ScalingSizes(ops=("median",), ks=(5,), ds=(100, 101), budget=0.01)
    lines = []
    result = scaling.run(sizes, echo=lines.append)
    assert {row["d"] for row in result["results"]} == {100}
    assert result["skipped"] == [dict(size="K=5 D=1e2", reason="memory")]
    assert any(line.startswith("skipped K=5") for line in lines)


def test_the_markdown_table_has_a_column_per_d_and_marks_skips(tiny_run):
    run = dict(tiny_run, results=[row for row in tiny_run["results"] if (row["k"], row["d"]) != (10, 400)])
    lines = scaling.markdown(run).splitlines()
    assert lines[2] == "| op | candidate | K | D=2e2 | D=4e2 |"
    rows = [line for line in lines[4:] if line.startswith("| krum | exact |")]
    assert len(rows) == 2 and rows[1].endswith("| skipped |") and "skipped" not in rows[0]


def test_report_dispatches_a_scaling_run(tiny_run):
    from fedkern.bench import report

    assert report.table(tiny_run) == scaling.markdown(tiny_run)


def test_sizes_are_validated():
    with pytest.raises(FedkernValueError, match="registry ops"):
        ScalingSizes(ops=("nope",))
    with pytest.raises(FedkernValueError, match="ks"):
        ScalingSizes(ks=(0,))
    with pytest.raises(FedkernValueError, match="memory_fraction"):
        ScalingSizes(memory_fraction=0.0)


def test_cli_bench_scaling_json(monkeypatch, capsys):
    monkeypatch.setitem(bench.PROFILES, "scaling", bench.Profile("tiny", scaling=ScalingSizes(
        ops=("weighted_mean",), ks=(5,), ds=(100,), budget=0.01)))
    assert cli.main(["bench", "--scaling", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile"] == "scaling" and {row["op"] for row in result["results"]} == {"weighted_mean"}
