"""The Ray executor on a local two-node cluster: the serial bits, where the actors run,
an actor killed mid-round, the config key. Skipped where Ray is not installed.

Starting the cluster and its actors takes seconds, so one cluster (two nodes of one CPU
each, on this machine) and one executor of two actors serve the whole module; each
Simulation's start() loads its trainer into the same actors.
"""
import os
import sys

import numpy as np
import pytest

from fedkern import FedkernValueError, WorkerError
from fedkern.sim import config
from fedkern.sim.algorithms import Scaffold
from fedkern.sim.executors import EXECUTORS, RayExecutor
from fedkern.sim.rounds import Stragglers

from . import toy
from .test_executors import TOY_CASES, assert_same_runs, logistic, synthetic
from .test_rounds import federation, simulation

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


def test_an_actor_that_dies_again_on_retry_raises_and_is_replaced(actors, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = federation(n_clients=20)
    marker = tmp_path / "died"
    open(str(marker) + ".armed", "w").close()
    run = simulation(data, model=DiesOnce(data.train.n_features, marker, die_always=True), executor=actors)
    with pytest.raises(WorkerError, match="died twice"):
        run.step()
    fine = simulation(data, executor=actors)          # the next run has live actors again
    fine.run(1)
    assert np.isfinite(fine.params).all()


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
