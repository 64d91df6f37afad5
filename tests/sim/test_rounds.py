"""The round's stages on a plug-in numpy model whose local step is known in closed form."""
import dataclasses
import math

import numpy as np
import pytest

import fedkern
from fedkern.sim import (Aggregator, Attack, Dropout, FederatedData, FederatedDataset, LocalTraining,
                         Simulation, Stragglers, ThreadExecutor)
from fedkern.sim.history import FIELDS
from fedkern.sim.rounds import STREAM_CLIENT, stream
from fedkern.sim.sampling import BySize, PowerOfChoice

from .toy import ToyModel


def federation(n_clients=12, f=5, seed=0, empty=()):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 20, n_clients)
    sizes[list(empty)] = 0
    ids = np.repeat(np.arange(n_clients), sizes)
    x = (rng.standard_normal((ids.size, f)) + ids[:, None] * 0.1).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    train = FederatedData.from_client_ids(x, y, ids, n_clients=n_clients, n_classes=2)
    test = FederatedData(x[:20], y[:20], np.array([0, 20]), n_classes=2)
    return FederatedDataset(train, test, "toy")


def simulation(data=None, **options):
    data = data or federation()
    options.setdefault("clients_per_round", 5)
    options.setdefault("local", LocalTraining(epochs=2, lr=0.5))
    return Simulation(data, options.pop("model", ToyModel(data.train.n_features)), **options)


def test_records_have_every_field_and_count_rounds():
    history = simulation().run(4)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    for record in history:
        assert set(FIELDS) <= set(record)
        assert record["selected"] == record["arrived"] == 5 and record["dropped"] == record["rejected"] == 0
        assert record["bytes_down"] == record["bytes_up"] == 5 * 5 * 4
        assert not record["skipped"] and math.isfinite(record["test_accuracy"])


def test_one_round_is_the_weighted_mean_of_the_closed_form_local_models():
    data = federation()
    run = simulation(data, model=ToyModel(5, noise=0.0), local=LocalTraining(epochs=1, lr=1.0))
    start = run.params.copy()
    record = run.step()
    # lr = 1, one epoch: every client lands on its own mean, so FedAvg gives the size-weighted mean of means
    chosen = [c for c in range(data.train.n_clients) if c in _clients_of_round(run, 1)]
    means = np.array([data.train.client(c)[0].astype(np.float64).mean(axis=0) for c in chosen])
    expected = np.average(means, axis=0, weights=data.train.sizes[chosen])
    np.testing.assert_allclose(run.params, expected, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(run.params, start) and record["arrived"] == 5


@pytest.mark.parametrize("rows_path", [False, True], ids=["streaming", "rows"])
def test_equal_weights_give_the_plain_mean_of_the_local_models(rows_path):
    """aggregator.weights = "equal" on both paths (a huge reject_norm_ratio makes the round
    keep every row without rejecting any)."""
    data = federation()
    run = simulation(data, model=ToyModel(5, noise=0.0), local=LocalTraining(epochs=1, lr=1.0),
                     aggregator=Aggregator("mean", weights="equal"), reject_norm_ratio=1e30 if rows_path else None)
    run.step()
    chosen = [c for c in range(data.train.n_clients) if c in _clients_of_round(run, 1)]
    means = np.array([data.train.client(c)[0].astype(np.float64).mean(axis=0) for c in chosen])
    assert len(set(data.train.sizes[chosen])) > 1       # so size weights would differ
    np.testing.assert_allclose(run.params, means.mean(axis=0), rtol=1e-5, atol=1e-6)


def _clients_of_round(run, r):
    """Rerun round r's selection through the same stream the round uses."""
    from fedkern.sim.rounds import STREAM_ROUND

    return set(run._select(stream(run.seed, STREAM_ROUND, r)).tolist())


@pytest.mark.parametrize("aggregator", ["mean", "median", Aggregator("krum", f=1)])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_thread_executor_gives_the_serial_bits(aggregator, workers):
    data = federation(n_clients=40)
    serial = simulation(data, clients_per_round=20, aggregator=aggregator)
    serial.run(3)
    with ThreadExecutor(workers) as executor:
        threaded = simulation(data, clients_per_round=20, aggregator=aggregator, executor=executor)
        threaded.run(3)
    assert np.array_equal(serial.params, threaded.params)
    assert serial.history.column("train_loss").tolist() == threaded.history.column("train_loss").tolist()


def test_each_client_draws_from_its_own_stream():
    seen = {}

    def spy(model, params, x, y, config, rng, delta_out):
        seen[len(seen)] = rng.random()
        return model.train(params, x, y, config, rng, delta_out)

    run = simulation(client_update=spy, clients_per_round=3)
    run.step()
    clients = sorted(_clients_of_round(run, 1))
    assert list(seen.values()) == [stream(run.seed, STREAM_CLIENT, 1, c).random() for c in clients]


def test_the_seed_decides_everything_and_a_new_seed_changes_it():
    a, b, c = simulation(seed=3), simulation(seed=3), simulation(seed=4)
    for run in (a, b, c):
        run.run(3)
    assert np.array_equal(a.params, b.params) and not np.array_equal(a.params, c.params)


def test_dropouts_leave_the_round_with_fewer_updates_and_a_quorum_skips_it():
    run = simulation(dropout=Dropout(rate=0.5, quorum=4), clients_per_round=6)
    records = run.run(12).records
    assert all(r["arrived"] + r["dropped"] == 6 for r in records)
    assert any(r["dropped"] for r in records)
    assert any(r["skipped"] for r in records) and any(not r["skipped"] for r in records)
    assert all(r["skipped"] == (r["arrived"] < 4) for r in records)


def test_a_skipped_round_does_not_move_the_model():
    run = simulation(dropout=Dropout(rate=0.9, quorum=5), clients_per_round=5)
    for _ in range(5):
        before = run.params.copy()
        record = run.step()
        assert record["skipped"] and np.array_equal(run.params, before)


@pytest.mark.parametrize("mode", ["partial", "drop"])
def test_stragglers_train_fewer_epochs_or_are_dropped(mode):
    epochs = []

    def spy(model, params, x, y, config, rng, delta_out):
        epochs.append(config.epochs)
        return model.train(params, x, y, config, rng, delta_out)

    run = simulation(stragglers=Stragglers(fraction=0.5, mode=mode), local=LocalTraining(epochs=6, lr=0.1),
                     client_update=spy, clients_per_round=8)
    run.run(6)
    stragglers = int(run.history.column("stragglers").sum())
    assert stragglers > 0
    if mode == "partial":
        assert all(1 <= e <= 5 for e in epochs if e != 6) and epochs.count(6) == len(epochs) - stragglers
        assert int(run.history.column("arrived").sum()) == 48
    else:
        assert set(epochs) == {6} and int(run.history.column("dropped").sum()) == stragglers


def test_label_flipping_clients_train_on_flipped_labels():
    data = federation()
    labels_seen = {}

    def spy(model, params, x, y, config, rng, delta_out):
        labels_seen[x.ctypes.data] = y.copy()
        return model.train(params, x, y, config, rng, delta_out)

    run = simulation(data, attack=Attack("label_flip", clients=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)),
                     client_update=spy)
    run.step()
    for c in range(data.train.n_clients):
        x, y = data.train.client(c)
        if x.ctypes.data in labels_seen:
            assert np.array_equal(labels_seen[x.ctypes.data], 1 - y)
    assert run.history[0]["byzantine"] == 5


def test_infinite_attack_is_rejected_and_the_model_stays_finite():
    run = simulation(attack=Attack("infinite", fraction=0.5), clients_per_round=8)
    run.run(5)
    assert np.isfinite(run.params).all()
    assert run.history.column("rejected").tolist() == run.history.column("byzantine").tolist()
    assert run.history.column("byzantine").sum() > 0


def test_norm_filter_rejects_huge_updates():
    # at most 3 attackers among 10: the median norm stays an honest one
    attack = Attack("gaussian", clients=(0, 1, 2), params={"std": 1e4})
    run = simulation(attack=attack, reject_norm_ratio=5.0, clients_per_round=10, data=federation(n_clients=20))
    run.run(8)
    assert run.history.column("byzantine").sum() > 0
    assert run.history.column("rejected").tolist() == run.history.column("byzantine").tolist()


def test_non_finite_updates_on_the_streaming_path_are_rejected_and_counted():
    def broken(model, params, x, y, config, rng, delta_out):
        result = model.train(params, x, y, config, rng, delta_out)
        if len(x) % 2:
            delta_out[0] = np.nan
        return result

    data = federation(n_clients=30)
    odd = int(np.sum(data.train.sizes % 2))
    run = simulation(data, client_update=broken, clients_per_round=30)
    record = run.step()
    assert record["rejected"] == odd and np.isfinite(run.params).all()


def test_robust_rule_resists_noise_attackers_where_the_mean_does_not():
    data = federation(n_clients=30)
    clean = simulation(data, clients_per_round=10, model=ToyModel(5, noise=0.0))
    clean.run(5)
    results = {}
    for rule in ("mean", "median"):
        run = simulation(data, clients_per_round=10, model=ToyModel(5, noise=0.0), aggregator=rule,
                         attack=Attack("gaussian", fraction=0.2, params={"std": 10.0}))
        run.run(5)
        results[rule] = np.linalg.norm(run.params - clean.params)
    assert results["median"] < results["mean"]


def test_centered_clipping_is_centred_on_the_previous_aggregate():
    run = simulation(aggregator=Aggregator("centered_clipping", tau=1.0))
    run.step()
    first = run.previous.copy()
    run.step()
    assert np.linalg.norm(first) > 0 and not np.array_equal(run.previous, first)


def test_pre_aggregation_by_bucketing_then_median():
    run = simulation(aggregator=Aggregator("median", pre={"name": "bucketing", "s": 2}), clients_per_round=6)
    run.run(2)
    assert np.isfinite(run.params).all()


def test_power_of_choice_keeps_the_highest_loss_candidates():
    data = federation(n_clients=20)
    run = simulation(data, sampler=PowerOfChoice(d=20), clients_per_round=3)
    losses = np.array([run.model.loss(run.params, *data.train.client(c)) for c in range(20)])
    trained = []

    def spy(model, params, x, y, config, rng, delta_out):
        trained.append(model.loss(params, x, y))
        return model.train(params, x, y, config, rng, delta_out)

    run.client_update = spy
    run.step()
    assert sorted(trained) == sorted(np.sort(losses)[-3:].tolist())


def test_clients_without_data_are_never_selected():
    data = federation(n_clients=10, empty=(0, 3, 7))
    for sampler in (None, BySize()):
        run = simulation(data, sampler=sampler, clients_per_round=7)
        for r in range(1, 4):
            run.step()
            assert not _clients_of_round(run, r) & {0, 3, 7}


def test_availability_limits_the_candidates():
    run = simulation(availability=0.3, clients_per_round=10, data=federation(n_clients=40))
    run.run(5)
    assert run.history.column("selected").max() <= 40 and run.history.column("selected").min() < 10


def test_server_optimizer_state_moves():
    run = simulation(server_optimizer=fedkern.FedAdam(lr=0.1))
    run.run(3)
    assert run.optimizer.t == 3 and set(run.optimizer.state) == {"m", "v"}


def test_clients_receive_a_read_only_model():
    def vandal(model, params, x, y, config, rng, delta_out):
        params[0] = 1e9

    with pytest.raises(ValueError, match="read-only"):
        simulation(client_update=vandal).step()


def test_checkpoint_and_restore_continue_bit_identically(tmp_path):
    options = dict(server_optimizer=fedkern.FedAdam(lr=0.1), aggregator="mean", dropout=Dropout(rate=0.2))
    straight = simulation(**options)
    straight.run(6)
    first = simulation(**{**options, "server_optimizer": fedkern.FedAdam(lr=0.1)})
    first.run(3, checkpoint_path=tmp_path / "c.npz")
    second = simulation(**{**options, "server_optimizer": fedkern.FedAdam(lr=0.1)})
    second.restore(tmp_path / "c.npz")
    assert second.round == 3 and len(second.history) == 3
    second.run(6)
    assert np.array_equal(second.params, straight.params)
    keep = [f for f in FIELDS if f != "seconds"]
    assert [[r[f] for f in keep] for r in second.history] == [[r[f] for f in keep] for r in straight.history]


def test_restore_refuses_another_runs_checkpoint(tmp_path):
    simulation(seed=1).run(1, checkpoint_path=tmp_path / "c.npz")
    with pytest.raises(fedkern.FedkernValueError, match="another seed"):
        simulation(seed=2).restore(tmp_path / "c.npz")


@pytest.mark.parametrize("bad, match", [
    (dict(clients_per_round=13), "clients_per_round"),
    (dict(clients_per_round=0), "clients_per_round"),
    (dict(aggregator="krum"), "krum"),
    (dict(aggregator=Aggregator("krum", f=3)), "at least"),
    (dict(availability=0.0), "availability"),
    (dict(availability=np.ones(3)), "availability"),
    (dict(reject_norm_ratio=0.5), "reject_norm_ratio"),
    (dict(eval_every=0), "eval_every"),
    (dict(backend="fortran"), "backend"),
])
def test_bad_settings_raise_before_any_round(bad, match):
    with pytest.raises((fedkern.FedkernValueError, fedkern.FedkernTypeError), match=match):
        simulation(**bad)


@pytest.mark.parametrize("factory, match", [
    (lambda: Dropout(rate=1.0), "dropout.rate"),
    (lambda: Dropout(quorum=0), "dropout.quorum"),
    (lambda: Stragglers(fraction=1.5), "stragglers.fraction"),
    (lambda: Stragglers(mode="late"), "stragglers.mode"),
    (lambda: Attack("bogus"), "attack.name"),
    (lambda: Attack("ipm", fraction=0.1, clients=(1,)), "not both"),
    (lambda: Aggregator("average"), "aggregator.name"),
    (lambda: Aggregator("mean", weights="loss"), "aggregator.weights"),
    (lambda: Aggregator("median", pre={"name": "nearest_neighbor_mixing"}), "needs f"),
])
def test_bad_stage_settings(factory, match):
    with pytest.raises(fedkern.FedkernValueError, match=match):
        factory()


def test_attack_clients_out_of_range():
    with pytest.raises(fedkern.FedkernValueError, match="attack.clients"):
        simulation(attack=Attack("ipm", clients=(99,)))


def test_local_settings_reach_the_clients():
    configs = []

    def spy(model, params, x, y, config, rng, delta_out):
        configs.append(config)
        return model.train(params, x, y, config, rng, delta_out)

    from fedkern.sim.algorithms import FedProx
    local = LocalTraining(epochs=3, batch_size=7, lr=0.2)
    simulation(local=local, algorithm=FedProx(mu=0.5), client_update=spy).step()
    assert set(configs) == {dataclasses.replace(local, mu=0.5)}


def test_simulation_closes_its_executor_as_a_context_manager():
    with simulation(executor=ThreadExecutor(2)) as run:
        run.step()
    with pytest.raises(fedkern.FedkernValueError, match="closed"):
        run.step()


def test_the_mean_never_allocates_the_k_by_d_matrix_but_robust_rules_do():
    streaming = simulation(clients_per_round=12)
    streaming.run(2)
    assert streaming._matrix is None and not streaming.needs_rows
    robust = simulation(clients_per_round=12, aggregator="median")
    robust.run(2)
    assert robust._matrix.shape == (12, 5)
