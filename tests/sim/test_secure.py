"""Secure aggregation in the simulator: masked FedAvg moves the model exactly as unmasked
quantised FedAvg does, with dropouts; bytes and time recorded; settings and config errors."""
import numpy as np
import pytest

pytest.importorskip("cryptography")

import fedkern
from fedkern import secagg
from fedkern.sim import (Aggregator, DifferentialPrivacy, Dropout, FederatedData, FederatedDataset, LocalTraining,
                         SecureAggregation, Simulation, ThreadExecutor, secure)
from fedkern.sim.config import ConfigError, build

from .toy import ToyModel


def federation(n_clients=30, f=6, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, n_clients)
    ids = np.repeat(np.arange(n_clients), sizes)
    x = (0.1 * rng.standard_normal((ids.size, f)) + ids[:, None] * 0.01).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    train = FederatedData.from_client_ids(x, y, ids, n_clients=n_clients, n_classes=2)
    test = FederatedData(x[:20], y[:20], np.array([0, 20]), n_classes=2)
    return FederatedDataset(train, test, "toy")


def simulation(data, settings, **options):
    options.setdefault("clients_per_round", 10)
    options.setdefault("local", LocalTraining(epochs=1, lr=0.5))
    return Simulation(data, ToyModel(data.train.n_features), secure_aggregation=settings, **options)


def plain_quantised_mean(settings, n, dim, survivors, rows, weights, seeds, max_weight, r, backend=None):
    """The test double of secure_mean: quantise, sum in the ring and decode, no masks at all."""
    config = settings.config(n, dim, max_weight, r)
    if not secure.recoverable(config, survivors):
        return None, {"bytes_up": 0, "secagg_bytes": 0, "secagg_seconds": 0.0}
    total = np.zeros(dim, config.dtype)
    for row, w, s in zip(rows, weights, seeds):
        total += secagg.ring_quantize(row, config.clip, config.levels, int(s), weight=int(w), bits=config.bits)
    mean = secagg.ring_dequantize(total, config.clip, config.levels) / int(np.sum(weights))
    return mean.astype(np.float32), {"bytes_up": 0, "secagg_bytes": 0, "secagg_seconds": 0.0}


@pytest.mark.parametrize("settings", [SecureAggregation(clip=0.5), SecureAggregation(graph="neighbours", neighbours=4,
                                                                                     clip=0.5, bits=64)])
def test_masked_fedavg_is_unmasked_quantised_fedavg_with_dropouts(settings, monkeypatch):
    data = federation()
    masked = simulation(data, settings, dropout=Dropout(rate=0.3))
    masked.run(4)
    monkeypatch.setattr("fedkern.sim.rounds.secure_mean", plain_quantised_mean)
    plain = simulation(data, settings, dropout=Dropout(rate=0.3))
    plain.run(4)
    assert np.array_equal(masked.params, plain.params)
    skipped = masked.history.column("skipped").astype(bool)
    assert np.array_equal(skipped, plain.history.column("skipped").astype(bool))
    # rounds unmasked despite dropouts: the dropped clients' masks were recovered
    assert masked.history.column("dropped")[~skipped].sum() > 0


def test_quantised_fedavg_is_close_to_fedavg():
    data = federation()
    exact = Simulation(data, ToyModel(data.train.n_features), clients_per_round=10,
                       local=LocalTraining(epochs=1, lr=0.5))
    masked = simulation(data, SecureAggregation(clip=8.0, levels=2**20))    # nothing clipped
    exact.step(), masked.step()
    step = 2 * 8.0 / 2**20                 # one level; stochastic rounding errs by less than one
    assert np.abs(masked.params - exact.params).max() < 2 * step


def test_bytes_and_time_are_recorded():
    data = federation()
    run = simulation(data, SecureAggregation(), dropout=Dropout(rate=0.2))
    record = run.step()
    survivors = record["arrived"] - record["rejected"]
    dim = run.params.shape[0]
    assert record["bytes_up"] == record["secagg_bytes"] + survivors * (dim + 1) * 4
    assert record["secagg_bytes"] > 64 * record["selected"]   # keys and shares besides the vectors
    assert record["secagg_seconds"] > 0
    plain = Simulation(data, ToyModel(data.train.n_features), clients_per_round=10).step()
    assert plain["secagg_bytes"] == 0 and plain["secagg_seconds"] == 0


def test_too_few_survivors_skip_the_round():
    data = federation()
    run = simulation(data, SecureAggregation(threshold=10), dropout=Dropout(rate=0.5))
    before = run.params.copy()
    record = run.step()
    assert record["arrived"] < 10 and record["skipped"]
    assert np.array_equal(run.params, before)


def test_serial_and_threads_give_the_same_model():
    data = federation()
    serial = simulation(data, SecureAggregation(), dropout=Dropout(rate=0.2))
    threads = simulation(data, SecureAggregation(), dropout=Dropout(rate=0.2), executor=ThreadExecutor(2))
    serial.run(3), threads.run(3)
    assert np.array_equal(serial.params, threads.params)


def test_defaults_and_the_graph_fallback():
    settings = SecureAggregation(graph="neighbours", neighbours=4)
    assert settings.neighbours_for(20) == 4 and settings.neighbours_for(5) is None   # k >= n - 1: full
    assert settings.threshold_for(20) == 3 and SecureAggregation().threshold_for(10) == 6
    assert SecureAggregation(threshold=50).threshold_for(10) == 10


@pytest.mark.parametrize("bad, match", [
    (dict(graph="ring"), "graph"), (dict(graph="neighbours"), "neighbours"), (dict(neighbours=4), "neighbours"),
    (dict(graph="neighbours", neighbours=3), "even"), (dict(clip=0.0), "clip"), (dict(levels=1), "levels"),
    (dict(bits=16), "bits"), (dict(weights="loss"), "weights"), (dict(threshold=0), "threshold"),
])
def test_bad_settings(bad, match):
    with pytest.raises(fedkern.FedkernValueError, match=match):
        SecureAggregation(**bad)


def test_settings_the_protocol_cannot_serve_are_refused():
    data = federation()
    with pytest.raises(fedkern.FedkernValueError, match="aggregator"):
        simulation(data, SecureAggregation(), aggregator=Aggregator("median"))
    with pytest.raises(fedkern.FedkernValueError, match="reject_norm_ratio"):
        simulation(data, SecureAggregation(), reject_norm_ratio=3.0)
    with pytest.raises(fedkern.FedkernValueError, match="privacy"):
        simulation(data, SecureAggregation(), privacy=DifferentialPrivacy(clip=1.0, noise_multiplier=1.0,
                                                                          sampling="fixed"))
    # 10 clients x 2^30 levels x weight 11 does not fit 32 bits
    with pytest.raises(fedkern.FedkernValueError, match="secure_aggregation"):
        simulation(data, SecureAggregation(levels=2**30, bits=32))


def test_the_config_key():
    config = {"rounds": 2, "clients_per_round": 6, "dataset": {"name": "fedprox_synthetic", "n_clients": 12},
              "secure_aggregation": {"name": "neighbours", "neighbours": 4, "clip": 0.5}}
    run, settings = build(config)
    assert run.secure == SecureAggregation(graph="neighbours", neighbours=4, clip=0.5)
    assert run.run(2).column("secagg_bytes").min() > 0
    with pytest.raises(ConfigError, match="secure_aggregation"):
        build({**config, "secure_aggregation": {"name": "ring"}})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        build({**config, "secure_aggregation": {"name": "none", "clip": 1.0}})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        build({**config, "secure_aggregation": {"name": "full", "levels": 0}})


def test_the_protocol_stats_of_secure_mean():
    settings = SecureAggregation()
    rows = [np.full(5, 0.25, np.float32), np.full(5, -0.5, np.float32)]
    mean, stats = secure.secure_mean(settings, 3, 5, [0, 2], rows, np.array([1, 3]), np.array([1, 2]), 3, 7)
    assert np.allclose(mean, (0.25 - 1.5) / 4, atol=2 * 2 / 2**16)
    assert stats["bytes_up"] - stats["secagg_bytes"] == 2 * 6 * 4
