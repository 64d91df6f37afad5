"""The engine's small pieces on their own: samplers, executors, history, checkpoints, algorithms."""
import json
import math
import os

import numpy as np
import pytest

from fedkern import FedkernValueError
from fedkern.sim import History, SerialExecutor, ThreadExecutor, checkpoint, sampling
from fedkern.sim.algorithms import ALGORITHMS, FedAvg, FedProx
from fedkern.sim.executors import MAX_CHUNKS, chunks
from fedkern.sim.models import LocalTraining


# ---------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler", [sampling.Uniform(), sampling.BySize(), sampling.ByWeight(np.arange(50) % 3)])
def test_samplers_pick_distinct_candidates(sampler):
    rng = np.random.default_rng(0)
    sizes = np.arange(1, 51)
    candidates = np.arange(0, 50, 2)
    for m in (1, 7, 25, 40):
        chosen = sampler.select(rng, m, candidates, sizes)
        assert len(set(chosen.tolist())) == len(chosen) == min(m, candidates.size)
        assert set(chosen.tolist()) <= set(candidates.tolist())


def test_by_size_favours_big_clients_in_proportion():
    rng = np.random.default_rng(1)
    sizes = np.array([1, 1, 1, 1, 96])
    hits = sum(int(4 in sampling.BySize().select(rng, 1, np.arange(5), sizes)) for _ in range(2000))
    assert 0.93 < hits / 2000 < 0.99            # P = 0.96; 2000 draws put it within 0.01 or so


def test_by_weight_draws_in_proportion_and_zero_weights_last():
    rng = np.random.default_rng(5)
    sampler = sampling.ByWeight([0.0, 1.0, 3.0, 0.0, 4.0])
    counts = np.bincount([int(sampler.select(rng, 1, np.arange(5), np.ones(5))[0]) for _ in range(4000)],
                         minlength=5)
    assert counts[0] == counts[3] == 0
    # P = 1/8, 3/8, 1/2; 4000 draws put each within about 0.008 (one standard error)
    np.testing.assert_allclose(counts[[1, 2, 4]] / 4000, [0.125, 0.375, 0.5], atol=0.035)
    four = sampler.select(rng, 4, np.arange(5), np.ones(5)).tolist()
    assert len(set(four)) == 4 and {1, 2, 4} <= set(four)        # every positive weight before a zero


@pytest.mark.parametrize("weights, candidates, match", [
    ([1.0, -1.0], np.arange(2), "weights must be"), ([1.0, np.nan], np.arange(2), "weights must be"),
    ([[1.0]], np.arange(1), "weights must be"), ([1.0, 2.0], np.arange(3), "for 2 clients; got client 2")])
def test_by_weight_errors(weights, candidates, match):
    with pytest.raises(FedkernValueError, match=match):
        sampling.ByWeight(weights).select(np.random.default_rng(0), 1, candidates, np.ones(3))


def test_uniform_is_uniform():
    rng = np.random.default_rng(2)
    counts = np.bincount(np.concatenate([sampling.Uniform().select(rng, 3, np.arange(10), np.ones(10))
                                         for _ in range(3000)]), minlength=10)
    assert counts.min() > 0.9 * 900 and counts.max() < 1.1 * 900


def test_power_of_choice_draws_d_candidates_and_keeps_the_worst():
    rng = np.random.default_rng(3)
    seen = []

    def loss(ids):
        seen.append(ids.copy())
        return ids.astype(float)          # the loss grows with the id

    chosen = sampling.PowerOfChoice(d=6).select(rng, 2, np.arange(20), np.ones(20), loss)
    assert seen[0].size == 6 and sorted(chosen.tolist()) == sorted(seen[0])[-2:]


def test_power_of_choice_errors():
    with pytest.raises(FedkernValueError, match="needs loss"):
        sampling.PowerOfChoice(d=4).select(np.random.default_rng(), 2, np.arange(5), np.ones(5))
    with pytest.raises(FedkernValueError, match="d >= clients_per_round"):
        sampling.PowerOfChoice(d=1).validate(2)
    with pytest.raises(FedkernValueError, match="d must be"):
        sampling.PowerOfChoice(d=0)


def test_online_clients_follow_availability():
    rng = np.random.default_rng(4)
    sizes = np.ones(10_000, np.int64)
    sizes[:100] = 0
    online = sampling.online(rng, sizes, 0.3)
    assert online.min() >= 100 and abs(online.size / 9_900 - 0.3) < 0.02
    per_client = np.where(np.arange(10_000) % 2 == 0, 1.0, 0.0)
    assert np.all(sampling.online(rng, sizes, per_client) % 2 == 0)
    assert sampling.online(rng, sizes, 1.0).size == 9_900


# ---------------------------------------------------------------- executors
@pytest.mark.parametrize("k", [1, 5, 16, 17, 100, 1000])
def test_chunks_cover_the_cohort_in_order(k):
    parts = chunks(k)
    assert len(parts) <= MAX_CHUNKS
    assert [i for part in parts for i in part] == list(range(k))


class Summer:
    def train_chunk(self, positions, plan):
        return plan["scale"] * sum(positions)


@pytest.mark.parametrize("executor", [SerialExecutor(), ThreadExecutor(3)])
def test_executors_return_results_in_item_order(executor):
    with executor:
        executor.start(Summer())
        assert list(executor.run({"scale": 2}, chunks(200))) == [2 * sum(p) for p in chunks(200)]


class Recorder:
    """Records which thread trained each chunk; chunk ``fail`` raises."""

    def __init__(self, fail=None):
        self.threads, self.fail = {}, fail

    def train_chunk(self, positions, plan):
        import threading

        if positions.start == self.fail:
            raise RuntimeError(f"chunk {positions.start} failed")
        self.threads[positions.start] = threading.get_ident()
        return positions.start


def test_thread_executor_runs_one_task_per_worker_and_keeps_item_order():
    items = chunks(16)
    costs = np.arange(16, dtype=float)          # the last chunk is the longest
    with ThreadExecutor(2) as executor:
        recorder, submitted = Recorder(), []
        submit = executor._pool.submit
        executor._pool.submit = lambda *args: submitted.append(args) or submit(*args)
        executor.start(recorder)
        assert list(executor.run({"costs": costs}, items)) == [p.start for p in items]
    assert len(submitted) == 2 and 1 <= len(set(recorder.threads.values())) <= 2


def test_a_chunks_exception_reaches_the_round_from_a_thread_executor():
    with ThreadExecutor(2) as executor:
        executor.start(Recorder(fail=5))
        with pytest.raises(RuntimeError, match="chunk 5 failed"):
            executor.run({}, chunks(16))


def test_executor_errors():
    with pytest.raises(FedkernValueError, match="before start"):
        SerialExecutor().run({}, [range(2)])
    executor = ThreadExecutor(2)
    executor.start(Summer())
    executor.close()
    with pytest.raises(FedkernValueError, match="closed"):
        executor.run({"scale": 1}, [range(2)])
    with pytest.raises(FedkernValueError, match="workers"):
        ThreadExecutor(0)


# ---------------------------------------------------------------- history and checkpoints
def test_history_saves_json_with_null_for_nan_and_csv(tmp_path):
    history = History([{"round": 1, "test_accuracy": math.nan, "seconds": 0.5}, {"round": 2, "test_accuracy": 0.75}])
    history.save(tmp_path)
    assert json.loads((tmp_path / "history.json").read_text())[0]["test_accuracy"] is None
    assert History.from_json((tmp_path / "history.json").read_text()).column("test_accuracy")[1] == 0.75
    assert math.isnan(History.from_json((tmp_path / "history.json").read_text())[0]["test_accuracy"])
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["round", "seconds", "train_loss"] and len(rows) == 3
    assert history.last("test_accuracy") == 0.75 and math.isnan(History().last("test_accuracy"))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_plot_needs_matplotlib_or_says_so(tmp_path):
    history = History([{"round": r, "test_accuracy": r / 10, "balanced_accuracy": r / 11, "train_loss": 1 / r}
                       for r in range(1, 6)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fedkern\\[plot\\]"):
            history.plot(tmp_path / "c.png")
        return
    history.plot(tmp_path / "c.png", title="t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_round_trip_and_atomic_replacement(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"a": np.arange(4, dtype=np.float32)}, {"round": 1})
    checkpoint.save(path, {"a": np.ones(2)}, {"round": 2, "history": [{"x": 1.5}]})
    arrays, meta = checkpoint.load(path)
    assert meta == {"round": 2, "history": [{"x": 1.5}]} and arrays["a"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["c.npz"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FedkernValueError, match="no checkpoint"):
        checkpoint.load(tmp_path / "absent.npz")
    np.savez(tmp_path / "other.npz", a=np.ones(2))
    with pytest.raises(FedkernValueError, match="not a fedkern checkpoint"):
        checkpoint.load(tmp_path / "other.npz")
    with pytest.raises(FedkernValueError, match="reserved"):
        checkpoint.save(tmp_path / "c.npz", {"__meta__": np.ones(1)}, {})


# ---------------------------------------------------------------- algorithms
def test_algorithms_set_the_local_objective():
    base = LocalTraining(epochs=3, mu=0.0)
    assert FedAvg().local(base) == base
    assert FedProx(mu=0.25).local(base).mu == 0.25 and FedProx(mu=0.25).local(base).epochs == 3
    assert set(ALGORITHMS) == {"fedavg", "fedprox", "fednova", "qffl", "scaffold", "fedbuff", "fbl"}
    with pytest.raises(FedkernValueError, match="mu"):
        FedProx(mu=-1.0)
