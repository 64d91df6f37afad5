"""The Ray executor on a local two-node cluster: the serial bits, where the actors run,
an actor killed mid-round, the config key. Skipped where Ray is not installed.

Starting the cluster and its actors takes seconds, so one cluster (two nodes of one CPU
each, on this machine) and one executor of two actors serve the whole module; each
Simulation's start() loads its trainer into the same actors.
"""
import os
import sys
import time

import numpy as np
import pytest

from fedkern import FedkernValueError, WorkerError
from fedkern.sim import config
from fedkern.sim.algorithms import Scaffold
from fedkern.sim.executors import EXECUTORS, RayExecutor, _lpt, chunks
from fedkern.sim.rounds import Stragglers

from . import toy
from .test_executors import TOY_CASES, assert_same_runs, logistic, synthetic
from .test_rounds import _clients_of_round, federation, simulation

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def cluster():
    # the test modules travel by value: the actors' interpreters need not find them on their path
    ray.cloudpickle.register_pickle_by_value(toy)
    if ray.is_initialized():        # an earlier test's Ray (Flower's simulation starts one)
        ray.shutdown()
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def actors(cluster):
    with RayExecutor(workers=2, num_cpus=0.5) as executor:     # half the CPUs: a test may start two more
        yield executor


def test_the_two_actors_run_on_the_two_nodes(actors):
    simulation(executor=actors)              # starts the actors
    places = ray.get([actor.where.remote() for actor in actors._actors])
    assert len({node for _, node in places}) == 2 and os.getpid() not in {pid for pid, _ in places}


@pytest.mark.parametrize("case", ["mean", "median", "krum, ipm attack", "norm filter, faults",
                                  "top-k, error feedback", "central DP", "secure aggregation", "fednova"])
def test_ray_gives_the_serial_bits(case, actors):
    data = federation(n_clients=40)
    serial = simulation(data, clients_per_round=20, **TOY_CASES[case]())
    serial.run(3)
    run = simulation(data, clients_per_round=20, executor=actors, **TOY_CASES[case]())
    run.run(3)
    assert_same_runs(serial, run)


@pytest.mark.parametrize("features", [3000, 30000], ids=["plan inline, 3 results a reply", "plan put, 1 a reply"])
@pytest.mark.parametrize("aggregator", ["mean", "median"])
def test_large_models_travel_in_several_replies_with_the_serial_bits(features, aggregator, actors):
    data = federation(n_clients=40, f=features)
    serial = simulation(data, clients_per_round=20, aggregator=aggregator)
    serial.run(2)
    run = simulation(data, clients_per_round=20, aggregator=aggregator, executor=actors)
    run.run(2)
    assert_same_runs(serial, run)


def test_scaffold_on_the_compiled_model_gives_the_serial_bits(actors):
    data = synthetic()
    options = dict(stragglers=Stragglers(0.5), seed=4)
    serial = logistic(data, algorithm=Scaffold(global_lr=0.8), **options)
    serial.run(3)
    run = logistic(data, algorithm=Scaffold(global_lr=0.8), executor=actors, **options)
    run.run(3)
    assert_same_runs(serial, run)


class DiesOnce(toy.ToyModel):
    """The toy model, whose process exits when it trains once a file ``marker.armed``
    exists: the first time only (it leaves ``marker``, so the retry trains normally), or
    every time with ``die_always``."""

    def __init__(self, n_features, marker, die_always=False):
        super().__init__(n_features)
        self.marker, self.die_always = str(marker), die_always

    def train(self, params, x, y, config, rng, delta_out):
        if os.path.exists(self.marker + ".armed") and (self.die_always or not os.path.exists(self.marker)):
            open(self.marker, "w").close()
            os._exit(1)
        return super().train(params, x, y, config, rng, delta_out)


def test_an_actor_killed_mid_round_is_replaced_and_its_clients_retried(actors, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = federation(n_clients=20)
    marker = tmp_path / "died"
    serial = simulation(data, model=DiesOnce(data.train.n_features, marker), clients_per_round=10)
    serial.run(3)
    replaced = actors.replaced
    run = simulation(data, model=DiesOnce(data.train.n_features, marker), clients_per_round=10, executor=actors)
    run.run(1)
    open(str(marker) + ".armed", "w").close()     # from round 2 on: the first actor to train dies, once
    run.run(3)
    assert marker.exists() and actors.replaced > replaced
    assert_same_runs(serial, run)


class Stalls(toy.ToyModel):
    """The toy model, which sleeps a minute (``"sleep"``) or exits its process (``"die"``)
    before training on the rows ``x``, once the file ``marker`` exists."""

    def __init__(self, n_features, x, marker, how):
        super().__init__(n_features)
        self.x, self.marker, self.how = x, str(marker), how

    def train(self, params, x, y, config, rng, delta_out):
        if os.path.exists(self.marker) and np.array_equal(x, self.x):
            time.sleep(60) if self.how == "sleep" else os._exit(1)
        return super().train(params, x, y, config, rng, delta_out)


def stalling_run(data, marker, how, executor):
    """A run whose second round's second client stalls, and the actor's share of round 2
    (one client a chunk, costs examples x 2 epochs) that holds it."""
    plain = simulation(data)
    plain.run(2)
    chosen = sorted(_clients_of_round(plain, 2))
    share = next(share for share in _lpt({"costs": 2.0 * data.train.sizes[chosen]}, chunks(5), 2) if 1 in share)
    model = Stalls(data.train.n_features, data.train.client(chosen[1])[0], marker, how)
    return simulation(data, model=model, executor=executor), share


def test_clients_whose_actor_dies_again_on_retry_are_dropouts_and_the_checkpoint_resumes(actors, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = federation(n_clients=20)
    marker = tmp_path / "armed"
    run, share = stalling_run(data, marker, "die", actors)
    replaced = actors.replaced
    run.run(1)
    marker.touch()               # round 2: the actor of the stalling client dies, and its replacement
    run.run(2, checkpoint_path=tmp_path / "run.ckpt", checkpoint_every=1)
    record = run.history[-1]
    # no deadline: one call per actor, so its whole share is lost
    assert record["lost"] == record["dropped"] == len(share) and record["arrived"] == 5 - len(share)
    assert record["rejected"] == 0 and actors.replaced == replaced + 2 and np.isfinite(run.params).all()
    marker.unlink()
    resumed = simulation(data, model=run.model)
    resumed.restore(tmp_path / "run.ckpt")
    run.run(4)                                     # on live actors again
    resumed.run(4)
    assert_same_runs(resumed, run)


def test_an_actor_busy_at_the_deadline_is_replaced_and_its_chunks_from_the_late_one_on_are_lost(cluster,
                                                                                                 tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = federation(n_clients=20)
    marker = tmp_path / "armed"
    with RayExecutor(workers=2, num_cpus=0.5, deadline=5.0) as executor:
        run, share = stalling_run(data, marker, "sleep", executor)
        lost = share[share.index(1):]      # a call per chunk: those queued behind the late one too
        assert run.step()["lost"] == 0
        marker.touch()
        began = time.monotonic()
        record = run.step()
        assert time.monotonic() - began < 30 and executor.replaced == 1
        assert record["lost"] == len(lost) and record["arrived"] == 5 - len(lost) and record["rejected"] == 0
        assert np.isfinite(run.params).all()
        marker.unlink()
        assert run.step()["lost"] == 0             # the replacement trains


class LoadsOnlyHere(toy.ToyModel):
    """The toy model, which cannot be unpickled in any process but this one."""

    def __init__(self, n_features, pid):
        super().__init__(n_features)
        self.pid = pid

    def __reduce__(self):
        return _load_only_in, (self.n_params, self.pid)


def _load_only_in(n_features, pid):
    if os.getpid() != pid:
        raise RuntimeError("this model cannot load here")
    return LoadsOnlyHere(n_features, pid)


def test_a_trainer_the_actors_cannot_load_is_a_worker_error_not_lost_rounds(cluster, actors):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = federation(n_clients=20)
    model = LoadsOnlyHere(data.train.n_features, os.getpid())
    with RayExecutor(workers=1, num_cpus=0.5) as fresh:       # new actors: their creation fails
        run = simulation(data, model=model, executor=fresh)
        with pytest.raises(WorkerError, match="(?s)actor 0 could not take the trainer.*cannot load here"):
            run.step()
    with pytest.raises(WorkerError, match="(?s)could not take the trainer.*cannot load here"):
        simulation(data, model=model, executor=actors)        # running actors: their load fails
    run = simulation(data, executor=actors)                   # and they still train the next run
    assert run.step()["lost"] == 0


def test_more_actors_than_free_cpus_are_refused(cluster):
    with pytest.raises(FedkernValueError, match="need 8 CPUs; the cluster has"):
        simulation(executor=RayExecutor(workers=8))


def test_the_config_key_attaches_to_the_running_cluster(cluster):
    settings = {"rounds": 2, "clients_per_round": 4, "dataset": {"name": "fedprox_synthetic", "n_clients": 8}}
    straight, _ = config.build(settings)
    straight.run(2)
    table = {"name": "ray", "workers": 2, "num_cpus": 0.5}
    built, resolved = config.build({**settings, "executor": table})
    with built:
        assert isinstance(built.executor, RayExecutor) and resolved["executor"] == table
        built.run(2)
    assert ray.is_initialized()          # attached, so left running
    assert built.params.tobytes() == straight.params.tobytes() and EXECUTORS["ray"] is RayExecutor
