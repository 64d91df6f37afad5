"""Chunks an executor loses: past the round's deadline, or on a worker that died and whose
retry died too. The executors yield :class:`Lost` for them; the round counts their
clients as dropouts (``lost``, and in ``dropped``), never as rejected, and aggregates the
others on every path (streaming, rows, robust rules, secure aggregation, compression).

The deadline tests sleep: a chunk that sleeps twice the deadline (or a minute, where the
executor can stop it) against chunks that take microseconds, so the outcome does not
depend on the machine's speed.
"""
import os
import time

import numpy as np
import pytest

from fedkern.sim import (Aggregator, Attack, Compression, LocalTraining, ProcessExecutor, SecureAggregation,
                         SerialExecutor, ThreadExecutor, config)
from fedkern.sim.executors import Lost, chunks

from .test_executors import leftover_segments
from .test_rounds import _clients_of_round, federation, simulation
from .toy import ToyModel

#: seconds: the quick chunks take microseconds, so even a loaded machine keeps them in time
DEADLINE = 2.0


class Summer:
    def train_chunk(self, positions, plan):
        return sum(positions)


class SleepsAt(Summer):
    """The chunk starting at ``start`` sleeps ``seconds`` first."""

    def __init__(self, start, seconds):
        self.start, self.seconds = start, seconds

    def train_chunk(self, positions, plan):
        if positions.start == self.start:
            time.sleep(self.seconds)
        return super().train_chunk(positions, plan)


class DiesAt(Summer):
    """The worker exits when it trains the chunk starting at ``start``: every time, or with
    ``marker`` only while that file does not exist (it makes it, so the retry trains)."""

    def __init__(self, start, marker=None):
        self.start, self.marker = start, marker

    def train_chunk(self, positions, plan):
        if positions.start == self.start and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                open(self.marker, "w").close()
            os._exit(3)
        return super().train_chunk(positions, plan)


# ---------------------------------------------------------------- the executors alone
@pytest.mark.parametrize("make", [SerialExecutor, lambda deadline: ThreadExecutor(2, deadline=deadline)],
                         ids=["serial", "threads"])
def test_in_process_executors_wait_for_a_late_chunk_then_lose_it_and_start_no_other(make):
    executor = make(deadline=DEADLINE)
    executor.start(SleepsAt(1, 2 * DEADLINE))
    results = list(executor.run({}, chunks(6)))
    # serial: chunk 0 was back in time; 1 came late; 2.. never started
    # threads: the other thread trained 0, 2, 3, 4, 5 while 1 slept
    expected = {SerialExecutor: [0] + [Lost("deadline")] * 5}.get(type(executor), [0, Lost("deadline"), 2, 3, 4, 5])
    assert results == expected
    executor.close()


def test_without_a_miss_the_deadline_changes_nothing():
    for executor in (SerialExecutor(deadline=60), ThreadExecutor(2, deadline=60)):
        executor.start(Summer())
        assert list(executor.run({}, chunks(40))) == [sum(p) for p in chunks(40)]
        executor.close()


def test_a_process_busy_at_the_deadline_is_stopped_its_chunk_lost_and_fresh_workers_go_on():
    with ProcessExecutor(workers=2, deadline=DEADLINE) as executor:
        executor.start(SleepsAt(2, 60))
        old = list(executor._pool.processes)
        began = time.monotonic()
        results = list(executor.run({}, chunks(6)))
        assert time.monotonic() - began < 30               # stopped, not awaited for a minute
        assert results == [0, 1, Lost("deadline"), 3, 4, 5]
        assert executor.restarts == 1 and not any(p.is_alive() for p in old)
        executor.start(Summer())
        assert list(executor.run({}, chunks(6))) == [0, 1, 2, 3, 4, 5]
    assert leftover_segments() == []


def test_a_dead_workers_chunks_are_retried_once_on_fresh_workers(tmp_path):
    with ProcessExecutor(workers=2) as executor:
        executor.start(DiesAt(3, marker=str(tmp_path / "died")))
        assert list(executor.run({}, chunks(8))) == [sum(p) for p in chunks(8)]
        assert executor.restarts == 1 and (tmp_path / "died").exists()


def test_chunks_whose_retry_dies_too_are_lost_and_the_executor_goes_on():
    with ProcessExecutor(workers=1) as executor:
        executor.start(DiesAt(2))
        old = list(executor._pool.processes)
        results = list(executor.run({}, chunks(4)))
        # one worker: 0 and 1 came back, 2 killed it (3 never started); the retry of 2 and 3
        # killed the fresh one at 2 again, and 3 was not trained after it
        assert results == [0, 1, Lost("worker"), Lost("worker")]
        assert executor.restarts == 2 and not any(p.is_alive() for p in old)
        executor.start(Summer())
        assert list(executor.run({}, chunks(4))) == [0, 1, 2, 3]
    assert leftover_segments() == []


def test_the_config_key_sets_the_deadline():
    built, resolved = config.build({"clients_per_round": 4, "dataset": {"name": "fedprox_synthetic", "n_clients": 8},
                                    "executor": {"name": "threads", "workers": 2, "deadline": 30}})
    with built:
        assert built.executor.deadline == 30.0 and resolved["executor"]["deadline"] == 30
        assert built.run(2)[-1]["lost"] == 0


def test_bad_deadlines_are_refused():
    for make in (SerialExecutor, ThreadExecutor, ProcessExecutor):
        with pytest.raises(ValueError, match="deadline must be > 0"):
            make(deadline=0)
    with pytest.raises(config.ConfigError, match="'executor'.*deadline must be > 0"):
        config.build({"clients_per_round": 4, "dataset": {"name": "fedprox_synthetic", "n_clients": 8},
                      "executor": {"name": "serial", "deadline": -1}})


# ---------------------------------------------------------------- the round
class Loses(SerialExecutor):
    """The serial executor, which loses the chunks at ``lose``."""

    def __init__(self, lose):
        super().__init__()
        self.lose = set(lose)

    def run(self, plan, items):
        return [Lost("worker") if j in self.lose else result for j, result in enumerate(super().run(plan, items))]


def closed_form(data, **options):
    """A run whose round 1 lands each client on its own mean (lr 1, one epoch, no noise)."""
    return simulation(data, model=ToyModel(5, noise=0.0), local=LocalTraining(epochs=1, lr=1.0), clients_per_round=8,
                      **options)


@pytest.mark.parametrize("rows_path", [False, True], ids=["streaming", "rows"])
def test_a_lost_chunks_clients_are_dropouts_and_the_others_are_averaged(rows_path):
    data = federation()
    run = closed_form(data, executor=Loses({2, 5}), reject_norm_ratio=1e30 if rows_path else None)
    record = run.step()
    chosen = sorted(_clients_of_round(run, 1))
    kept = [c for j, c in enumerate(chosen) if j not in (2, 5)]      # eight chunks of one client
    means = np.array([data.train.client(c)[0].astype(np.float64).mean(axis=0) for c in kept])
    np.testing.assert_allclose(run.params, np.average(means, axis=0, weights=data.train.sizes[kept]),
                               rtol=1e-5, atol=1e-6)
    assert (record["selected"], record["arrived"], record["dropped"], record["lost"]) == (8, 6, 2, 2)
    assert record["rejected"] == 0 and not record["skipped"] and record["bytes_up"] == 6 * 5 * 4


@pytest.mark.parametrize("case", ["median", "krum, ipm attack", "secure aggregation", "top-k, error feedback"])
def test_every_path_leaves_the_lost_clients_out(case):
    options = {"median": dict(aggregator="median"),
               "krum, ipm attack": dict(aggregator=Aggregator("krum", f=1), attack=Attack("ipm", fraction=0.25)),
               "secure aggregation": dict(secure_aggregation=SecureAggregation()),
               "top-k, error feedback": dict(compression=Compression("top_k", {"k": 2}, error_feedback=True))}[case]
    data = federation(n_clients=16)
    run = simulation(data, clients_per_round=8, executor=Loses({0, 3}), **options)
    history = run.run(3)
    assert np.isfinite(run.params).all()
    for record in history:
        assert record["lost"] == 2 and record["rejected"] == 0 and record["arrived"] == 6 and not record["skipped"]
    if "error feedback" in case:     # a lost client sent nothing, so it keeps no residual
        sent = {c for r in (1, 2, 3) for j, c in enumerate(sorted(_clients_of_round(run, r))) if j not in (0, 3)}
        assert set(run.residuals) == sent


def test_a_round_that_loses_every_chunk_is_skipped():
    run = simulation(executor=Loses(range(16)))
    before = run.params.copy()
    record = run.step()
    assert record["skipped"] and record["lost"] == record["dropped"] == 5 and record["arrived"] == 0
    assert np.array_equal(run.params, before)


def test_a_checkpoint_after_a_loss_resumes_to_the_same_bits(tmp_path):
    data = federation()
    run = simulation(data, executor=Loses({1}))
    run.run(2, checkpoint_path=tmp_path / "run.ckpt", checkpoint_every=1)
    run.executor.lose = set()
    resumed = simulation(data)
    resumed.restore(tmp_path / "run.ckpt")
    assert resumed.round == 2 and [r["lost"] for r in resumed.history] == [1, 1]
    run.run(4)
    resumed.run(4)
    assert run.params.tobytes() == resumed.params.tobytes()


def test_a_real_deadline_in_a_simulation_drops_the_sleeping_client():
    data = federation()

    def sleepy(model, params, x, y, config, rng, delta_out):
        if np.array_equal(x, sleeper):
            time.sleep(2 * DEADLINE)
        return model.train(params, x, y, config, rng, delta_out)

    plain = simulation(data)
    plain.step()
    sleeper = data.train.client(sorted(_clients_of_round(plain, 1))[2])[0]
    run = simulation(data, client_update=sleepy, executor=ThreadExecutor(2, deadline=DEADLINE))
    record = run.step()
    assert record["lost"] == 1 and record["arrived"] == 4
    run.executor.close()
