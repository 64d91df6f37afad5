"""DP-FedAvg in the simulator: sampling, clipping, noise, accounting, budgets, checkpoints, configs.

The plug-in numpy model of ``toy.py`` makes every client's delta known in closed form
(lr = 1 and one epoch: client i lands on m_i, the mean of its rows), so a round's result
is computed here by hand in numpy, with the noise regenerated from its documented stream.
"""
import math
import sys
import warnings

import numpy as np
import pytest

import fedkern
from fedkern import attacks, privacy
from fedkern._accounting import RDPAccountant
from fedkern.sim import (Aggregator, Attack, DifferentialPrivacy, Dropout, FederatedData, FederatedDataset,
                         LocalTraining, Simulation, ThreadExecutor, config)
from fedkern.sim.config import ConfigError
from fedkern.sim.rounds import SERVER_COUNT, SERVER_NOISE, STREAM_ROUND, noise_stream, stream
from fedkern.sim.sampling import BySize, Poisson, Uniform

from .toy import ToyModel

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def federation(n_clients=40, f=5, seed=0, empty=()):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, n_clients)
    sizes[list(empty)] = 0
    ids = np.repeat(np.arange(n_clients), sizes)
    x = (rng.standard_normal((ids.size, f)) + ids[:, None] * 0.05).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    train = FederatedData.from_client_ids(x, y, ids, n_clients=n_clients, n_classes=2)
    test = FederatedData(x[:20], y[:20], np.array([0, 20]), n_classes=2)
    return FederatedDataset(train, test, "toy")


def simulation(data=None, *, noise=0.0, **options):
    data = data or federation()
    options.setdefault("clients_per_round", 8)
    options.setdefault("local", LocalTraining(epochs=1, lr=1.0))
    return Simulation(data, ToyModel(data.train.n_features, noise=noise), **options)


def dp(**options):
    options.setdefault("clip", 2.0)
    options.setdefault("noise_multiplier", 0.0)
    return DifferentialPrivacy(**options)


def cohort(run, r=1):
    """Round r's cohort, drawn again from the stream the round draws it from."""
    return run._select(stream(run.seed, STREAM_ROUND, r))


def closed_form_deltas(data, clients, w):
    return np.array([data.train.client(int(c))[0].astype(np.float64).mean(axis=0) for c in clients]) - w


def clip_rows(deltas, clip):
    norms = np.linalg.norm(deltas, axis=1)
    return deltas * np.minimum(1.0, clip / norms)[:, None], norms


# ------------------------------------------------------------------ sampling
def test_poisson_sampler_includes_each_client_independently_with_probability_m_over_n():
    rng = np.random.default_rng(0)
    sizes = np.ones(200, np.int64)
    sizes[:10] = 0                           # no data: never sampled, not counted in N
    candidates = np.flatnonzero(sizes)
    draws = [Poisson().select(rng, 19, candidates, sizes) for _ in range(2000)]
    counts = np.bincount(np.concatenate(draws), minlength=200)
    lengths = np.array([d.size for d in draws])
    q, n = 19 / 190, 2000
    # Binomial(2000, 0.1) per client: mean 200, sd 13.4; 6 sd cannot all hold by accident only
    assert counts[:10].sum() == 0
    assert np.all(np.abs(counts[10:] - n * q) < 6 * math.sqrt(n * q * (1 - q)))
    assert abs(lengths.mean() - 19) < 6 * math.sqrt(190 * q * (1 - q) / n)
    # the cohort size varies as a Binomial(190, 0.1) does (variance 17.1); a fixed-size sampler has 0
    assert 12 < lengths.var() < 23
    assert all(np.unique(d).size == d.size for d in draws)


def test_privacy_draws_the_cohort_as_accounted_and_copes_with_an_empty_one():
    data = federation()
    run = simulation(data, clients_per_round=1, privacy=dp(noise_multiplier=1.0))
    assert isinstance(run.sampler, Poisson)
    assert isinstance(simulation(data, privacy=dp(sampling="fixed")).sampler, Uniform)
    before, records = [], []
    for _ in range(8):
        before.append(run.params.copy())
        records.append(run.step())
    sizes = [r["selected"] for r in records]
    empty = sizes.index(0)                    # q = 1/40: this seed's run has empty rounds (and others)
    assert max(sizes) >= 1 and not records[empty]["skipped"]
    # central mode: an empty round still adds noise to the (zero) sum and still spends privacy
    moved = run.history[empty]
    assert not np.array_equal(before[empty + 1] if empty + 1 < 8 else run.params, before[empty])
    assert moved["epsilon"] > (run.history[empty - 1]["epsilon"] if empty else 0.0)


def test_a_poisson_cohort_larger_than_clients_per_round_fits_the_update_matrix():
    data = federation()
    run = simulation(data, clients_per_round=8, attack=Attack("sign_flip", clients=(0, 1)),
                     privacy=dp(noise_multiplier=0.5))
    sizes = [run.step()["selected"] for _ in range(6)]
    assert max(sizes) > 8 and np.isfinite(run.params).all()


# ------------------------------------------------------------------ one round by hand
@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_without_noise_a_round_is_the_clipped_sum_over_the_expected_cohort(mode, sampling):
    data = federation()
    run = simulation(data, privacy=dp(mode=mode, sampling=sampling, clip=3.2))
    w = run.params.astype(np.float64)
    clients = cohort(run)
    clipped, norms = clip_rows(closed_form_deltas(data, clients, w), 3.2)
    assert (norms > 3.2).any() and (norms < 3.2).any()     # the test clips some and not others
    record = run.step()
    np.testing.assert_allclose(run.params, w + clipped.sum(axis=0) / 8, rtol=1e-5, atol=1e-6)
    assert record["clip"] == 3.2 and record["arrived"] == clients.size


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_noise_is_the_documented_stream_of_the_run_seed(mode):
    data = federation()
    run = simulation(data, seed=7, privacy=dp(mode=mode, noise_multiplier=0.8, clip=1.5))
    w = run.params.astype(np.float64)
    clients = cohort(run)
    clipped, _ = clip_rows(closed_form_deltas(data, clients, w), 1.5)
    if mode == "central":
        total = privacy.add_gaussian_noise(clipped.sum(axis=0), 0.8 * 1.5, 7, stream=noise_stream(1, SERVER_NOISE))
    else:
        total = sum(privacy.add_gaussian_noise(row, 0.8 * 1.5, 7, stream=noise_stream(1, int(c)))
                    for row, c in zip(clipped, clients))
    run.step()
    np.testing.assert_allclose(run.params, w + total / 8, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["central", "local"])
def test_the_noise_has_the_documented_standard_deviation(mode):
    data = federation(f=20_000)
    z, clip, m = 2.0, 1.0, 8
    clean = simulation(data, privacy=dp(mode=mode, clip=clip))
    noisy = simulation(data, privacy=dp(mode=mode, clip=clip, noise_multiplier=z))
    arrived = clean.step()["arrived"]
    noisy.step()
    noise = noisy.params.astype(np.float64) - clean.params
    # central: N(0, (zC)^2) on the sum; local: one such draw per arrived client
    std = z * clip / m * (1.0 if mode == "central" else math.sqrt(arrived))
    assert abs(noise.std() / std - 1) < 0.03       # sample sd of 20000 normals: 0.5% relative
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)


def test_the_server_clips_forged_updates_too():
    data = federation()
    run = simulation(data, attack=Attack("sign_flip", clients=tuple(range(0, 40, 3))), privacy=dp(clip=0.5))
    w = run.params.astype(np.float64)
    clients = cohort(run)
    deltas = closed_form_deltas(data, clients, w)
    forged = clients % 3 == 0
    assert forged.any() and not forged.all()
    deltas[forged] = attacks.sign_flip(deltas[~forged].astype(np.float32), int(forged.sum()))
    clipped, _ = clip_rows(deltas, 0.5)
    run.step()
    np.testing.assert_allclose(run.params, w + clipped.sum(axis=0) / 8, rtol=1e-5, atol=1e-6)


def test_non_finite_updates_are_rejected_never_noised():
    def broken(model, params, x, y, config, rng, delta_out):
        result = model.train(params, x, y, config, rng, delta_out)
        if x.shape[0] == 7:
            delta_out[0] = np.nan
        return result

    data = federation()
    run = simulation(data, client_update=broken, privacy=dp(noise_multiplier=1.0))
    records = [run.step() for _ in range(4)]
    assert sum(r["rejected"] for r in records) > 0 and np.isfinite(run.params).all()


# ------------------------------------------------------------------ executors
@pytest.mark.parametrize("settings", [
    dict(adaptive=privacy.AdaptiveClipping(clip=1.0, count_stddev=2.0), clip=None, noise_multiplier=0.7),
    dict(mode="local", noise_multiplier=0.7),
    dict(sampling="fixed", noise_multiplier=0.7),
])
def test_thread_executor_gives_the_serial_bits_with_noise(settings):
    data = federation(n_clients=80)
    serial = simulation(data, clients_per_round=30, noise=1e-3, privacy=dp(**settings))
    serial.run(3)
    with ThreadExecutor(3) as executor:
        threaded = simulation(data, clients_per_round=30, noise=1e-3, executor=executor, privacy=dp(**settings))
        threaded.run(3)
    assert np.array_equal(serial.params, threaded.params)
    for name in ("epsilon", "clip", "train_loss"):
        assert serial.history.column(name).tolist() == threaded.history.column(name).tolist()


# ------------------------------------------------------------------ accounting
@pytest.mark.parametrize("mode, sampling, compose", [
    ("central", "poisson", lambda acc: acc.compose(0.9, 8 / 40)),
    ("central", "fixed", lambda acc: acc.compose_fixed_cohort(0.45, 8, 40)),
    ("local", "poisson", lambda acc: acc.compose(0.45, 1.0)),
])
def test_epsilon_history_is_the_accountant_composed_round_by_round(mode, sampling, compose):
    run = simulation(privacy=dp(mode=mode, sampling=sampling, noise_multiplier=0.9, delta=1e-6))
    history = run.run(5)
    accountant = RDPAccountant(neighboring="add_or_remove" if sampling == "poisson" and mode == "central"
                               else "replace_one")
    expected = [compose(accountant).epsilon(1e-6) for _ in range(5)]
    assert history.column("epsilon").tolist() == expected


def test_adaptive_clipping_splits_the_noise_and_moves_the_clip():
    data = federation()
    adaptive = privacy.AdaptiveClipping(clip=5.0, target_quantile=0.5, learning_rate=0.5, count_stddev=1.5)
    run = simulation(data, privacy=DifferentialPrivacy(adaptive=adaptive, noise_multiplier=0.6))
    # add-or-remove: the count of bits centred at 1/2 has sensitivity 1/2 (TFF's split)
    assert run.privacy.value_multiplier == privacy.split_noise_multiplier(0.6, 1.5)
    _, norms = clip_rows(closed_form_deltas(data, cohort(run), run.params.astype(np.float64)), 5.0)
    run.step()
    # C <- C exp(-eta (b~ - gamma)), b~ the centred count of norms <= C plus its noise, over m, plus 1/2
    noise = privacy.add_gaussian_noise(np.zeros(1), 1.5, run.seed, stream=noise_stream(1, SERVER_COUNT))[0]
    centred = np.count_nonzero(norms <= 5.0) - norms.size / 2
    expected = 5.0 * math.exp(-0.5 * ((centred + noise) / 8 + 0.5 - 0.5))
    assert run.privacy.clip == pytest.approx(expected, rel=1e-12)
    clips = run.run(6).column("clip")
    assert clips[0] == 5.0 and clips[-1] < 5.0       # every toy delta fits 5.0 at first: it shrinks
    assert adaptive.clip == 5.0                      # the caller's object is not moved
    with pytest.raises(fedkern.FedkernValueError, match="count_stddev"):
        simulation(data, privacy=DifferentialPrivacy(adaptive=privacy.AdaptiveClipping(count_stddev=0.25),
                                                     noise_multiplier=0.6))


@pytest.mark.parametrize("mode, sampling", [("central", "poisson"), ("central", "fixed"), ("local", "fixed")])
def test_target_epsilon_is_reached_at_the_last_round(mode, sampling):
    settings = DifferentialPrivacy(mode=mode, sampling=sampling, clip=1.0, target_epsilon=3.0, rounds=12)
    run = simulation(privacy=settings)
    epsilon = run.run(12).column("epsilon")
    assert epsilon[-1] <= 3.0 * (1 + 1e-9) and abs(epsilon[-1] - 3.0) < 1e-4
    assert np.all(np.diff(epsilon) > 0)


# ------------------------------------------------------------------ budgets
def _epsilons(rounds):
    accountant = RDPAccountant()
    return [accountant.compose(1.0, 8 / 40).epsilon(1e-5) for _ in range(rounds)]


def test_a_stop_budget_ends_the_run_before_the_round_that_would_pass_it():
    eps = _epsilons(4)
    run = simulation(eval_every=10, privacy=dp(noise_multiplier=1.0, max_epsilon=(eps[2] + eps[3]) / 2))
    history = run.run(10)
    assert len(history) == 3 and run.round == 3
    assert "round 4" in history.stopped and "max_epsilon" in history.stopped
    assert history.column("epsilon").max() <= run.privacy.settings.max_epsilon
    assert math.isfinite(history[-1]["test_accuracy"])      # the last round run is evaluated
    with pytest.raises(fedkern.FedkernValueError, match="privacy budget"):
        run.step()


def test_a_warn_budget_warns_once_and_runs_on():
    eps = _epsilons(4)
    run = simulation(privacy=dp(noise_multiplier=1.0, max_epsilon=(eps[1] + eps[2]) / 2, on_budget="warn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = run.run(6)
    assert len(history) == 6 and history.stopped == ""
    assert [str(w.message)[:7] for w in caught] == ["round 3"]


# ------------------------------------------------------------------ checkpoints
def _adaptive_run(**options):
    adaptive = privacy.AdaptiveClipping(clip=1.0, learning_rate=0.5, count_stddev=2.0)
    return simulation(noise=1e-3, server_optimizer=fedkern.FedAdam(lr=0.1), dropout=Dropout(rate=0.2),
                      privacy=DifferentialPrivacy(adaptive=adaptive, noise_multiplier=0.8, **options))


def test_checkpoint_resume_is_bit_identical_with_adaptive_clipping(tmp_path):
    straight = _adaptive_run()
    straight.run(6)
    first = _adaptive_run()
    first.run(3, checkpoint_path=tmp_path / "c.npz")
    second = _adaptive_run()
    second.restore(tmp_path / "c.npz")
    second.run(6)
    assert np.array_equal(second.params, straight.params)
    assert len(set(straight.history.column("clip"))) == 6            # the clip moved every round
    for name in ("epsilon", "clip", "test_loss"):
        assert second.history.column(name).tolist() == straight.history.column(name).tolist()
    assert second.privacy.accountant.rdp.tolist() == straight.privacy.accountant.rdp.tolist()


def test_restore_refuses_a_checkpoint_of_other_privacy_settings(tmp_path):
    _adaptive_run().run(2, checkpoint_path=tmp_path / "c.npz")
    with pytest.raises(fedkern.FedkernValueError, match="other privacy settings"):
        _adaptive_run(delta=1e-6, sampling="fixed").restore(tmp_path / "c.npz")
    with pytest.raises(fedkern.FedkernValueError, match="differential privacy"):
        simulation(noise=1e-3, server_optimizer=fedkern.FedAdam(lr=0.1)).restore(tmp_path / "c.npz")


def test_history_json_keeps_infinite_epsilon():
    history = simulation(privacy=dp()).run(2)        # z = 0: no guarantee
    assert history.column("epsilon").tolist() == [math.inf, math.inf]
    again = fedkern.sim.History.from_json(history.to_json())
    assert '"inf"' in history.to_json() and again.column("epsilon").tolist() == [math.inf, math.inf]


# ------------------------------------------------------------------ settings and configs
@pytest.mark.parametrize("bad, match", [
    (dict(aggregator="median"), "aggregator"),
    (dict(aggregator=Aggregator("mean", pre={"name": "bucketing", "s": 2})), "aggregator"),
    (dict(sampler=BySize()), "sampler"),
    (dict(sampler=Uniform()), "sampler"),
    (dict(availability=0.5), "availability"),
    (dict(reject_norm_ratio=3.0), "reject_norm_ratio"),
    (dict(dropout=Dropout(quorum=2)), "dropout.quorum"),
    (dict(privacy={"clip": 1.0}), "privacy must be"),
])
def test_settings_the_accounting_cannot_cover_are_refused(bad, match):
    options = {"privacy": dp(noise_multiplier=1.0), **bad}
    with pytest.raises((fedkern.FedkernValueError, fedkern.FedkernTypeError), match=match):
        simulation(**options)


@pytest.mark.parametrize("bad, match", [
    (dict(clip=None), "give clip or adaptive"),
    (dict(adaptive=privacy.AdaptiveClipping()), "not both"),
    (dict(clip=0.0), "privacy.clip"),
    (dict(noise_multiplier=None), "noise_multiplier or target_epsilon"),
    (dict(target_epsilon=1.0), "not both"),
    (dict(noise_multiplier=None, target_epsilon=1.0), "privacy.rounds"),
    (dict(delta=1.0), "privacy.delta"),
    (dict(mode="global"), "privacy.mode"),
    (dict(sampling="shuffle"), "privacy.sampling"),
    (dict(on_budget="abort"), "privacy.on_budget"),
    (dict(max_epsilon=0.0), "privacy.max_epsilon"),
    (dict(mode="local", clip=None, adaptive=privacy.AdaptiveClipping()), "central"),
])
def test_bad_privacy_settings(bad, match):
    with pytest.raises((fedkern.FedkernValueError, fedkern.FedkernTypeError), match=match):
        dp(**bad)


SMALL = {"rounds": 3, "clients_per_round": 4, "local_epochs": 1,
         "dataset": {"name": "fedprox_synthetic", "n_clients": 12, "alpha": 0.5, "beta": 0.5}}


@pytest.mark.parametrize("privacy_table, extra, match", [
    ({"name": "central", "noise_multiplier": 1.0, "delta": 1.0}, {}, "'privacy'.*privacy.delta must be < 1"),
    ({"name": "global"}, {}, "'privacy.name'"),
    ({"name": "none", "clip": 1.0}, {}, "'privacy'.*takes no parameters"),
    ({"name": "central", "noise_multplier": 1.0}, {}, "'privacy.noise_multplier'.*privacy.noise_multiplier"),
    ({"name": "central"}, {}, "noise_multiplier or target_epsilon"),
    ({"name": "central", "noise_multiplier": "high"}, {}, "privacy.noise_multiplier must be a real"),
    ({"name": "central", "noise_multiplier": 1.0, "adaptive": 1}, {}, "'privacy.adaptive' must be"),
    ({"name": "central", "noise_multiplier": 1.0, "adaptive": {"quantile": 0.5}}, {}, "privacy.adaptive.quantile"),
    ({"name": "central", "noise_multiplier": 1.0, "adaptive": {"target_quantile": 2.0}}, {}, "'privacy.adaptive'"),
    ({"name": "central", "noise_multiplier": 1.0}, {"aggregator": "median"}, "'aggregator'.*mean"),
    ({"name": "central", "noise_multiplier": 1.0}, {"sampler": "by_size"}, "'sampler'"),
    ({"name": "central", "noise_multiplier": 1.0}, {"availability": 0.5}, "'availability'"),
    ({"name": "central", "noise_multiplier": 1.0}, {"dropout": {"quorum": 2}}, "'dropout.quorum'"),
    ({"name": "central", "noise_multiplier": 3.0, "adaptive": True}, {}, "'privacy.adaptive.count_stddev'"),
])
def test_config_errors_name_the_key(privacy_table, extra, match):
    with pytest.raises(ConfigError, match=match):
        config.build({**SMALL, **extra, "privacy": privacy_table})


def test_set_overrides_turn_privacy_on_and_the_saved_config_resumes_alike():
    overrides = ["privacy.name=central", "privacy.target_epsilon=4.0", "privacy.adaptive={count_stddev=5.0}",
                 "privacy.clip=0.5", "privacy.max_epsilon=10.0"]
    run, settings = config.build(config.apply_overrides(SMALL, overrides))
    assert settings["sampler"] == {"name": "poisson"} and isinstance(run.sampler, Poisson)
    assert run.privacy.adaptive.clip == 0.5 and run.privacy.settings.rounds == 3
    history = run.run(3)
    assert abs(history[-1]["epsilon"] - 4.0) < 1e-4
    again, _ = config.build(tomllib.loads(config.to_toml(settings)))
    assert again.run(3).column("epsilon").tolist() == history.column("epsilon").tolist()
    assert np.array_equal(again.params, run.params)


def test_the_summary_shows_epsilon_and_why_a_run_stopped():
    from fedkern.sim import experiment
    from fedkern.sim.history import History

    record = dict(round=1, test_accuracy=0.5, balanced_accuracy=0.5, train_loss=1.0, skipped=False)
    private = History([dict(record, epsilon=1.25, clip=1.0)], stopped="privacy budget: round 2 would pass it")
    plain = History([dict(record, epsilon=math.inf, clip=math.inf)])
    lines = experiment.summary([("dp", private, 1.0), ("plain", plain, 1.0)]).splitlines()
    assert lines[0].endswith("epsilon") and lines[1].split()[-1] == "1.25" and lines[2].split()[-1] == "inf"
    assert lines[3] == "dp: stopped early: privacy budget: round 2 would pass it"
    assert "epsilon" not in experiment.summary([("plain", plain, 1.0)])
