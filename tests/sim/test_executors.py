"""The process executor: the serial bits for every kind of round, what moves to the workers
and what stays there, errors, and clean-up (no process, no shared memory segment left).

Starting worker processes is slow next to these rounds, so one executor of two workers
(and one thread executor) serves the whole module: each Simulation's start() ships its
trainer to the same workers. Tests that break or close an executor start their own.
"""
import gc
import os
import pickle
import signal
import sys
import time

import numpy as np
import pytest

import fedkern
from fedkern import FedkernTypeError, FedkernValueError, WorkerError, datasets
from fedkern.sim import (Aggregator, Attack, Compression, DifferentialPrivacy, Dropout, LocalTraining,
                         LogisticRegression, ProcessExecutor, SecureAggregation, Simulation, Stragglers,
                         ThreadExecutor, config)
from fedkern.sim.algorithms import FedNova, Scaffold
from fedkern.sim.config import ConfigError
from fedkern.sim import executors
from fedkern.sim.executors import EXECUTORS, SHARE_BYTES, chunks

from .test_rounds import federation, simulation

SHM = "/dev/shm"


def leftover_segments():
    """Shared memory segments of fedkern's executors that exist now (Linux names them in /dev/shm)."""
    return sorted(name for name in os.listdir(SHM) if name.startswith("fedkern_")) if os.path.isdir(SHM) else []


@pytest.fixture(scope="module")
def processes():
    with ProcessExecutor(workers=2) as executor:
        yield executor
    assert leftover_segments() == []


@pytest.fixture(scope="module")
def threads():
    with ThreadExecutor(workers=2) as executor:
        yield executor


def records(run):
    """The run's history without its wall times."""
    return [repr({k: v for k, v in record.items() if "seconds" not in k}) for record in run.history]


def synthetic():
    return datasets.fedprox_synthetic(1.0, 1.0, n_clients=16, seed=3)


def logistic(data, **options):
    """A Simulation of the built-in (compiled) logistic regression."""
    model = LogisticRegression(data.train.n_features, data.train.n_classes)
    return Simulation(data, model, **{"clients_per_round": 8, "local": LocalTraining(epochs=1, lr=0.05), **options})


#: Settings of the runs compared (built afresh for every run: an algorithm keeps state).
TOY_CASES = {
    "mean": lambda: {},
    "median": lambda: dict(aggregator="median"),
    "krum, ipm attack": lambda: dict(aggregator=Aggregator("krum", f=2), attack=Attack("ipm", fraction=0.2)),
    "norm filter, faults": lambda: dict(reject_norm_ratio=3.0, dropout=Dropout(0.2), stragglers=Stragglers(0.3)),
    "label flip, equal weights": lambda: dict(attack=Attack("label_flip", fraction=0.2),
                                      aggregator=Aggregator("mean", weights="equal")),
    "top-k, error feedback": lambda: dict(compression=Compression("top_k", {"k": 3}, error_feedback=True),
                                  dropout=Dropout(0.2)),
    "qsgd, sign flip attack": lambda: dict(compression=Compression("qsgd", {"levels": 7}),
                                   attack=Attack("sign_flip", fraction=0.2)),
    "central DP": lambda: dict(privacy=DifferentialPrivacy(clip=2.0, noise_multiplier=0.7)),
    "local DP": lambda: dict(privacy=DifferentialPrivacy(mode="local", clip=2.0, noise_multiplier=0.7)),
    "secure aggregation": lambda: dict(secure_aggregation=SecureAggregation(), dropout=Dropout(0.2)),
    "fednova": lambda: dict(algorithm=FedNova(), stragglers=Stragglers(0.5)),
}


def assert_same_runs(serial, *others):
    for other in others:
        assert other.params.tobytes() == serial.params.tobytes()
        assert records(other) == records(serial)
        assert sorted(other.residuals) == sorted(serial.residuals)
        assert all(other.residuals[c].tobytes() == serial.residuals[c].tobytes() for c in serial.residuals)


@pytest.mark.parametrize("case", TOY_CASES)
def test_serial_threads_and_processes_give_the_same_bits(case, processes, threads):
    data = federation(n_clients=40)
    serial = simulation(data, clients_per_round=20, **TOY_CASES[case]())
    serial.run(3)
    runs = []
    for executor, share_bytes in ((threads, None), (processes, SHARE_BYTES), (processes, 0)):
        if share_bytes is not None:          # 0: every plan array through shared memory
            processes.share_bytes = share_bytes
        run = simulation(data, clients_per_round=20, executor=executor, **TOY_CASES[case]())
        run.run(3)
        runs.append(run)
        if share_bytes == 0 and not run.needs_rows:
            assert processes._slot_bytes > 0     # rounds 2 and 3 sent their results through the arena
    processes.share_bytes = SHARE_BYTES
    assert_same_runs(serial, *runs)
    assert np.isfinite(serial.params).all()


def test_scaffold_gives_the_same_bits_on_processes(processes, threads):
    """SCAFFOLD's corrections change every round in the parent and reach the workers in the
    plan (the variates themselves never leave the parent)."""
    data = synthetic()
    options = dict(stragglers=Stragglers(0.5), seed=4)
    serial = logistic(data, algorithm=Scaffold(global_lr=0.8), **options)
    serial.run(3)
    assert np.abs(serial.algorithm.server_variate).max() > 0       # the corrections were not all 0
    runs = []
    for executor in (threads, processes):
        runs.append(logistic(data, algorithm=Scaffold(global_lr=0.8), executor=executor, **options))
        runs[-1].run(3)
    assert_same_runs(serial, *runs)


def test_compiled_model_with_robust_rule_and_dp_on_processes(processes):
    data = synthetic()
    for options in (dict(aggregator=Aggregator("trimmed_mean", beta=0.2)), dict(privacy=DifferentialPrivacy(clip=1.0, noise_multiplier=1.0))):
        serial = logistic(data, **options)
        serial.run(2)
        run = logistic(data, executor=processes, **options)
        run.run(2)
        assert_same_runs(serial, run)


def test_checkpoint_and_resume_on_processes(processes, tmp_path):
    data = federation(n_clients=40)
    options = dict(clients_per_round=12, dropout=Dropout(0.2), compression=Compression("top_k", {"k": 2},
                                                                                        error_feedback=True))
    straight = simulation(data, **options)
    straight.run(4)
    first = simulation(data, executor=processes, **options)
    first.run(2, checkpoint_path=tmp_path / "run.npz")
    resumed = simulation(data, executor=processes, **options)
    resumed.restore(tmp_path / "run.npz")
    resumed.run(4)
    assert_same_runs(straight, resumed)


def test_the_config_key_builds_a_process_executor_whose_checkpoint_resumes_anywhere(tmp_path):
    settings = {"rounds": 3, "clients_per_round": 4, "seed": 2,
                "dataset": {"name": "fedprox_synthetic", "n_clients": 8},
                "algorithm": {"name": "scaffold", "global_lr": 0.8}}
    straight, _ = config.build(settings)
    straight.run(3)
    built, resolved = config.build({**settings, "executor": {"name": "processes", "workers": 2}})
    with built:
        assert isinstance(built.executor, ProcessExecutor) and built.executor.workers == 2
        assert resolved["executor"] == {"name": "processes", "workers": 2}
        built.run(2, checkpoint_path=tmp_path / "run.npz")
    assert EXECUTORS["processes"] is ProcessExecutor
    resumed, _ = config.build(settings)          # serial, from the process run's checkpoint
    resumed.restore(tmp_path / "run.npz")
    resumed.run(3)
    assert_same_runs(straight, resumed)


# ---------------------------------------------------------------- the executor alone
class Summer:
    def train_chunk(self, positions, plan):
        return plan["scale"] * sum(positions)


class Probe:
    """Reports, from inside a worker, what the worker holds."""

    def __init__(self, data):
        self.data = data

    def train_chunk(self, positions, plan):
        x = self.data.x
        base = x
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return {"buffer": type(getattr(base, "obj", base)).__name__, "x_writeable": x.flags.writeable,
                "x_sum": float(x.astype(np.float64).sum()), "threads": fedkern.get_num_threads(),
                "params_writeable": plan["params"].flags.writeable, "rows_writeable": plan["rows"].flags.writeable,
                "pid": os.getpid()}


class Failing:
    """Chunk ``fail`` raises ``error(*args)``."""

    def __init__(self, fail, error, *args):
        self.fail, self.error, self.args = fail, error, args

    def train_chunk(self, positions, plan):
        if positions.start == self.fail:
            raise self.error(*self.args)
        return positions.start


class TwoArgumentError(Exception):
    def __init__(self, a, b):            # does not unpickle: pickle calls TwoArgumentError(message)
        super().__init__(f"{a} and {b}")


class Sleeps:
    def train_chunk(self, positions, plan):
        time.sleep(60)


def test_results_come_in_item_order_and_the_longest_chunks_go_out_first(processes):
    processes.start(Summer())
    assert list(processes.run({"scale": 2}, chunks(200))) == [2 * sum(p) for p in chunks(200)]
    processes.start(Probe(federation(n_clients=40).train))
    costs = np.arange(16.0)[::-1].copy()
    costs[[3, 9]] = 100.0                   # chunks 3 and 9 are the longest, then 0, 1, 2, 4, ...
    plan = {"costs": costs, "params": np.zeros(3, np.float32), "rows": np.zeros((16, 3), np.float32)}
    plan["params"].flags.writeable = False
    pool = processes._pool
    send, sent = pool.send, []
    pool.send = lambda w, message: sent.append(message[1]) or send(w, message)
    try:
        results = list(processes.run(plan, chunks(16)))
    finally:
        del pool.send
    assert sent == [3, 9, 0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15]
    pids = {r["pid"] for r in results}
    assert len(pids) <= 2 and os.getpid() not in pids


def test_workers_map_the_data_read_only_and_run_kernels_on_one_thread(processes):
    data = federation(n_clients=40)
    processes.start(Probe(data.train))
    plan = {"params": np.zeros(3, np.float32), "rows": np.zeros((4, 3), np.float32)}
    plan["params"].flags.writeable = False
    (report,) = processes.run(plan, [range(0, 4)])
    assert report["buffer"] == "mmap" and not report["x_writeable"]
    assert report["x_sum"] == float(data.train.x.astype(np.float64).sum())
    assert report["threads"] == 1
    assert not report["params_writeable"] and report["rows_writeable"]
    assert leftover_segments() == []        # every segment was unlinked once the workers mapped it


def test_each_round_sends_the_plan_not_the_data(processes):
    data = federation(n_clients=40, f=1000)         # 1.7 MB of features, 1000 parameters
    run = simulation(data, clients_per_round=20, executor=processes)
    sent = []
    pool = processes._pool
    send = pool.send
    pool.send = lambda w, message: sent.append(len(pickle.dumps(message))) or send(w, message)
    try:
        run.run(2)
    finally:
        del pool.send
    assert data.train.x.nbytes > 1_000_000
    # each worker gets the plan once a round (1.4 kB here), then 57 bytes per chunk
    assert 0 < sum(sent) < 2 * 2 * 5_000


def test_a_chunks_exception_is_raised_with_the_workers_traceback_and_the_executor_goes_on(processes):
    processes.start(Failing(5, RuntimeError, "chunk 5 failed"))
    with pytest.raises(RuntimeError, match="chunk 5 failed") as caught:
        processes.run({}, chunks(16))
    cause = str(caught.value.__cause__)
    assert "Traceback" in cause and "train_chunk" in cause and "test_executors.py" in cause
    assert list(processes.run({}, chunks(4)))[:2] == [0, 1]         # chunk 5 is not among these
    processes.start(Failing(2, TwoArgumentError, "x", "y"))
    with pytest.raises(WorkerError, match="(?s)a chunk failed.*TwoArgumentError: x and y"):
        processes.run({}, chunks(8))


def test_a_plan_that_does_not_pickle_is_refused_and_the_executor_goes_on(processes):
    processes.start(Summer())
    with pytest.raises(FedkernTypeError, match="cannot send the round's plan to the worker processes"):
        processes.run({"scale": lambda: 1}, chunks(4))
    assert list(processes.run({"scale": 1}, chunks(4))) == [0, 1, 2, 3]


def test_a_trainer_that_does_not_pickle_is_refused_before_any_process_starts():
    executor = ProcessExecutor(workers=1)
    trainer = Summer()
    trainer.step = lambda: None
    with pytest.raises(FedkernTypeError, match=r"cannot send the trainer \(Summer\) to the worker processes"):
        executor.start(trainer)
    assert executor._pool is None
    with pytest.raises(FedkernValueError, match="before start"):
        executor.run({"scale": 1}, [range(2)])
    executor.close()


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs a POSIX interval timer")
def test_an_interrupted_round_stops_the_busy_workers():
    executor = ProcessExecutor(workers=1)
    executor.start(Sleeps())
    processes = list(executor._pool.processes)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.run({}, chunks(2))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - began < 10         # the sleeping worker was terminated, not awaited
    assert not any(p.is_alive() for p in processes) and leftover_segments() == []
    with pytest.raises(FedkernValueError, match="closed"):
        executor.run({}, chunks(2))


def test_close_and_garbage_collection_stop_the_workers():
    executor = ProcessExecutor(workers=1)
    executor.start(Summer())
    processes = list(executor._pool.processes)
    executor.close()
    executor.close()                        # twice is fine
    assert not any(p.is_alive() for p in processes)
    forgotten = ProcessExecutor(workers=1)
    forgotten.start(Summer())
    processes = list(forgotten._pool.processes)
    del forgotten
    gc.collect()
    assert not any(p.is_alive() for p in processes) and leftover_segments() == []


@pytest.mark.skipif(not os.path.isdir(SHM), reason="no /dev/shm to measure")
def test_data_larger_than_the_free_shared_memory_is_refused_before_it_is_written():
    with pytest.raises(FedkernValueError, match="MiB of shared memory, but /dev/shm has"):
        executors._segment(1 << 60)
    assert leftover_segments() == []


def test_bad_arguments():
    with pytest.raises(FedkernValueError, match="workers must be >= 1; got 0"):
        ProcessExecutor(0)
    with pytest.raises(FedkernTypeError, match="workers must be an integer"):
        ProcessExecutor(2.0)
    assert repr(ProcessExecutor(3)) == "ProcessExecutor(workers=3, deadline=None)" and ProcessExecutor().workers == os.cpu_count()
    with pytest.raises(ConfigError, match="'executor'.*workers must be >= 1"):
        config.build({"clients_per_round": 4, "dataset": {"name": "fedprox_synthetic", "n_clients": 8},
                      "executor": {"name": "processes", "workers": 0}})


def test_the_ray_executor_without_ray_says_which_extra_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed
    with pytest.raises(ImportError, match=r'pip install "fedkern\[ray\]"'):
        executors.RayExecutor(workers=1)


def test_ray_replies_are_cut_into_runs_that_fit_inside_a_message():
    assert executors._groups([], 10) == []
    assert executors._groups([4, 4, 4, 4, 4], 10) == [2, 2, 1]
    assert executors._groups([12, 3, 3, 3, 12], 10) == [1, 3, 1]     # one too large goes alone
    assert executors._groups([10, 0, 1], 10) == [2, 1]
    assert executors._array_bytes({"a": np.zeros(3), "b": {1: np.zeros(2, np.float32)}, "c": 7}) == 24
