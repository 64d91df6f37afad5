"""Compression in the simulator: the round equals a hand-written encode / decode / mean / step
reference; the same bits on every executor and after a resume; error feedback's residuals;
bytes on the wire; the settings, their combinations and the config key."""
import math
import sys

import numpy as np
import pytest

import fedkern
from fedkern import compress, privacy
from fedkern.sim import (Aggregator, Attack, Compression, DifferentialPrivacy, Dropout, FederatedData,
                         FederatedDataset, LocalTraining, Simulation, ThreadExecutor, compression, config)
from fedkern.sim.config import ConfigError
from fedkern.sim.history import FIELDS
from fedkern.sim.rounds import STREAM_CLIENT, STREAM_ROUND, noise_stream, stream

from .toy import ToyModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

F = 20          # the toy model's parameters: not a power of two, so a rotation pads
LOCAL = LocalTraining(epochs=1, lr=0.5)


def federation(n_clients=12, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 15, n_clients)
    ids = np.repeat(np.arange(n_clients), sizes)
    x = (0.3 * rng.standard_normal((ids.size, F)) + 0.05 * ids[:, None]).astype(np.float32)
    y = rng.integers(0, 2, ids.size)
    train = FederatedData.from_client_ids(x, y, ids, n_clients=n_clients, n_classes=2)
    test = FederatedData(x[:20], y[:20], np.array([0, 20]), n_classes=2)
    return FederatedDataset(train, test, "toy")


def simulation(data, settings, **options):
    options.setdefault("clients_per_round", 6)
    options.setdefault("local", LOCAL)
    return Simulation(data, ToyModel(F), compression=settings, **options)


def reference(data, settings, rounds, **options):
    """The rounds written out by hand: the selection and faults of an uncompressed twin run
    (not under test here), then the documented seeds, local training, encoding (with error
    feedback's bookkeeping), decoding with the reference kernels, the FedAvg mean and the step."""
    twin = simulation(data, None, **options)
    model, params, residuals = ToyModel(F), twin.params.copy(), {}
    local_dp = options.get("privacy")
    for r in range(1, rounds + 1):
        rng = stream(twin.seed, STREAM_ROUND, r)
        selected = twin._select(rng)
        arrives, _, _ = twin._faults(rng, selected.size)
        seeds = rng.integers(0, 2**64, size=selected.size, dtype=np.uint64)
        codec = settings.codec(F, int(rng.integers(0, 2**64, dtype=np.uint64)) if settings.rotated else 0)
        broadcast = params.copy()
        total, weight = np.zeros(F), 0.0
        for c, seed in zip(selected[arrives].tolist(), seeds[arrives]):
            x, y = data.train.client(c)
            delta = np.empty(F, np.float32)
            model.train(broadcast, x, y, twin.local, stream(twin.seed, STREAM_CLIENT, r, c), delta)
            if local_dp is not None:
                privacy.local_dp_update(delta, local_dp.clip, local_dp.noise_multiplier, twin.seed,
                                        stream=noise_stream(r, c), out=delta)
            p = delta + residuals.get(c, 0.0) if settings.error_feedback else delta
            decoded = codec.decode(codec.encode(p, int(seed)), out=np.empty(F), backend="reference")
            if settings.error_feedback:
                residuals[c] = p - decoded
            w = 1.0 if local_dp is not None else float(data.train.sizes[c])
            total += w * decoded
            weight += w
        # local DP divides by the expected cohort, FedAvg by the total weight
        params += (total / (options["clients_per_round"] if local_dp is not None else weight)).astype(np.float32)
    return params, residuals


CASES = {
    "8-bit, dropouts": (Compression("stochastic_quantizer", {"bits": 8, "block_size": 8}), {"dropout": Dropout(0.3)}),
    "top-k with EF": (Compression("top_k", {"fraction": 0.2}, error_feedback=True), {}),
    "rotated qsgd with EF": (Compression("qsgd", {"levels": 3}, error_feedback=True, rotated=True), {}),
    "scaled sign with EF": (Compression("scaled_sign", error_feedback=True), {"dropout": Dropout(0.2)}),
    "random-k": (Compression("random_k", {"k": 3}), {}),
    "terngrad, local DP": (Compression("terngrad"), {"privacy": DifferentialPrivacy(
        mode="local", clip=0.5, noise_multiplier=0.3, sampling="fixed")}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_round_is_encode_decode_mean_step(case):
    settings, options = CASES[case]
    options = dict(options, clients_per_round=6)
    data = federation()
    run = simulation(data, settings, **options)
    run.run(3)
    expected, residuals = reference(data, settings, 3, **options)
    np.testing.assert_allclose(run.params, expected, rtol=0, atol=1e-6)
    assert sorted(run.residuals) == sorted(residuals)
    for c in residuals:
        np.testing.assert_allclose(run.residuals[c], residuals[c], rtol=0, atol=1e-9)


def test_compression_changes_the_model_and_uncompressed_the_twin_does_not():
    # the reference's twin is uncompressed: its own run moves otherwise than the compressed one
    data = federation()
    settings = Compression("top_k", {"k": 2})
    compressed, plain = simulation(data, settings), simulation(data, None)
    compressed.run(2), plain.run(2)
    assert np.abs(compressed.params - plain.params).max() > 1e-3


def test_the_server_never_decodes_a_message_alone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the server decoded one message")

    monkeypatch.setattr(compress.Codec, "decode", refuse)
    data = federation()
    for settings in (Compression("qsgd"), Compression("stochastic_quantizer", rotated=True),
                     Compression("random_k", {"k": 4})):
        assert math.isfinite(simulation(data, settings).run(2).last("train_loss"))
    with pytest.raises(AssertionError, match="decoded"):      # error feedback's client does decode
        simulation(data, Compression("qsgd", error_feedback=True)).step()


@pytest.mark.parametrize("settings", [Compression("top_k", {"k": 3}, error_feedback=True),
                                      Compression("stochastic_quantizer", {"bits": 4}, rotated=True),
                                      Compression("qsgd", {"levels": 7}, error_feedback=True)])
def test_thread_executor_gives_the_serial_bits(settings):
    data = federation(n_clients=30)
    options = dict(clients_per_round=12, dropout=Dropout(0.2))
    serial = simulation(data, settings, **options)
    serial.run(3)
    with ThreadExecutor(2) as executor:
        threaded = simulation(data, settings, executor=executor, **options)
        threaded.run(3)
    assert np.array_equal(serial.params, threaded.params)
    assert serial.history.column("bytes_up").tolist() == threaded.history.column("bytes_up").tolist()
    assert sorted(serial.residuals) == sorted(threaded.residuals)
    assert all(np.array_equal(serial.residuals[c], threaded.residuals[c]) for c in serial.residuals)


def client_of(data, x):
    """The client whose slice of the training data ``x`` is."""
    first = (x.ctypes.data - data.train.x.ctypes.data) // data.train.x.strides[0]
    return int(np.searchsorted(data.train.offsets, first, side="right") - 1)


def test_error_feedback_keeps_what_was_not_sent_for_the_clients_that_sent():
    data = federation()
    deltas, poisoned = {}, set()

    def recording(model, params, x, y, config, rng, delta_out):
        result = model.train(params, x, y, config, rng, delta_out)
        c = client_of(data, x)
        if c in poisoned:
            delta_out[3] = np.nan
        deltas[c] = delta_out.copy()
        return result

    k = 4
    run = simulation(data, Compression("top_k", {"k": k}, error_feedback=True), client_update=recording,
                     dropout=Dropout(0.3))
    first = run.step()
    sent = {c for c in deltas}
    assert first["arrived"] == len(sent) < first["selected"]     # somebody dropped, and has no residual
    assert set(run.residuals) == sent
    for c in sent:                          # round 1: the residual is the update without its top k
        g = deltas[c].astype(np.float64)
        kept = np.argsort(-np.abs(g), kind="stable")[:k]
        expected = g.copy()
        expected[kept] = 0.0
        assert np.array_equal(run.residuals[c], expected)
    before = {c: run.residuals[c] for c in run.residuals}
    deltas.clear()
    poisoned.update(sent)                   # round 2: every update of a round-1 client is NaN
    second = run.step()
    again = set(deltas) & sent
    assert second["rejected"] == len(again)
    for c in sent:                          # rejected before encoding: the residual did not move
        assert run.residuals[c] is before[c]
    assert set(run.residuals) == sent | set(deltas)     # the memory grows with the senders only


def test_checkpoint_resume_is_bit_identical_with_error_feedback(tmp_path):
    data = federation()
    settings = Compression("top_k", {"fraction": 0.1}, error_feedback=True)

    def run():      # each run its own server optimizer: its momentum is state
        return simulation(data, settings, dropout=Dropout(0.2), server_optimizer=fedkern.FedAvgM(lr=1.0, momentum=0.5))

    straight = run()
    straight.run(5)
    first = run()
    first.run(2, checkpoint_path=tmp_path / "c.npz")
    second = run()
    second.restore(tmp_path / "c.npz")
    assert sorted(second.residuals) == sorted(first.residuals) and second.residuals
    second.run(5)
    assert np.array_equal(second.params, straight.params)
    assert sorted(second.residuals) == sorted(straight.residuals)
    assert all(np.array_equal(second.residuals[c], straight.residuals[c]) for c in straight.residuals)
    keep = [f for f in FIELDS if f != "seconds"]
    assert [[r[f] for f in keep] for r in second.history] == [[r[f] for f in keep] for r in straight.history]


def test_restore_refuses_a_checkpoint_of_the_other_error_feedback(tmp_path):
    data = federation()
    simulation(data, Compression("top_k", {"k": 2}, error_feedback=True)).run(1, checkpoint_path=tmp_path / "ef.npz")
    simulation(data, Compression("top_k", {"k": 2})).run(1, checkpoint_path=tmp_path / "plain.npz")
    with pytest.raises(fedkern.FedkernValueError, match="with error feedback"):
        simulation(data, Compression("top_k", {"k": 2})).restore(tmp_path / "ef.npz")
    with pytest.raises(fedkern.FedkernValueError, match="without error feedback"):
        simulation(data, Compression("top_k", {"k": 2}, error_feedback=True)).restore(tmp_path / "plain.npz")


def test_bytes_up_is_the_sum_of_the_messages_nbytes(monkeypatch):
    sums = []
    accumulate = compress.accumulate

    def counting(messages, weights=None, out=None, **options):
        sums.append(sum(m.nbytes for m in messages))
        return accumulate(messages, weights, out, **options)

    monkeypatch.setattr(compress, "accumulate", counting)
    data = federation()
    run = simulation(data, Compression("top_k", {"k": 3}, error_feedback=True), dropout=Dropout(0.3))
    history = run.run(4)
    assert history.column("bytes_up").tolist() == sums
    assert sums == [(8 * 3 + 8) * r["arrived"] for r in history]
    assert history.column("bytes_up_uncompressed").tolist() == [4 * F * r["arrived"] for r in history]


def test_non_finite_updates_send_nothing_and_forged_ones_are_encoded():
    data = federation()
    settings = Compression("stochastic_quantizer", {"bits": 8, "block_size": 8})
    per_message = settings.codec(F).encode(np.zeros(F, np.float32)).nbytes
    assert per_message == 8 + F + 2 * 4 * 3
    infinite = simulation(data, settings, attack=Attack("infinite", clients=(0, 1, 2, 3, 4, 5)),
                          clients_per_round=12).step()
    assert infinite["rejected"] == infinite["byzantine"] == 6
    assert infinite["bytes_up"] == 6 * per_message and infinite["bytes_up_uncompressed"] == 12 * 4 * F
    flipped = simulation(data, settings, attack=Attack("sign_flip", clients=(0, 1)), clients_per_round=12)
    record = flipped.step()
    assert record["rejected"] == 0 and record["bytes_up"] == 12 * per_message
    plain = simulation(data, None).step()
    assert plain["bytes_up"] == plain["bytes_up_uncompressed"] == 6 * 4 * F


def _distance(run, target):
    return float(np.linalg.norm(run.params.astype(np.float64) - target))


EVERY_CODEC = [Compression(name, {"k": 4} if name in ("top_k", "random_k") else {}, error_feedback=ef)
               for name in compression.CODECS for ef in (False, True) if not (ef and name == "random_k")]
EVERY_CODEC += [Compression(name, rotated=True) for name in compression.ROTATABLE]


@pytest.mark.parametrize("settings", EVERY_CODEC, ids=repr)
def test_every_codec_learns_in_the_simulator(settings):
    data = federation()
    # the clients' objectives pull towards their means: FedAvg approaches the size-weighted mean of means
    means = np.array([data.train.client(c)[0].astype(np.float64).mean(axis=0) for c in range(12)])
    target = np.average(means, axis=0, weights=data.train.sizes)
    run = simulation(data, settings)
    start = _distance(run, target)
    history = run.run(10)
    assert _distance(run, target) < 0.3 * start
    assert (history.column("bytes_up") < history.column("bytes_up_uncompressed")).all()


@pytest.mark.parametrize("bad, match", [
    (dict(name="gzip"), "compression.name"),
    (dict(name="qsgd", params={"levels": 256}), "compression.levels"),
    (dict(name="qsgd", params={"bits": 4}), "'bits'"),
    (dict(name="top_k"), "k or fraction"),
    (dict(name="top_k", params={"k": 2, "fraction": 0.1}), "not both"),
    (dict(name="random_k", params={"fraction": 0.0}), "compression.fraction"),
    (dict(name="stochastic_quantizer", params={"bits": 3}), "compression.bits"),
    (dict(name="terngrad", params={"clip": -1.0}), "compression.clip"),
    (dict(name="scaled_sign", rotated=True), "compression.rotated"),
    (dict(name="top_k", params={"k": 1}, rotated=True), "compression.rotated"),
    (dict(name="qsgd", error_feedback="yes"), "compression.error_feedback"),
    (dict(name="random_k", params={"k": 2}, error_feedback=True), "not contractive"),
    (dict(name="qsgd", params=[("levels", 4)]), "compression.params"),
])
def test_bad_settings(bad, match):
    with pytest.raises(fedkern.FedkernError, match=match):
        Compression(**bad)


def test_the_codec_is_built_for_the_model():
    assert Compression("top_k", {"fraction": 0.01}).codec(610) == compress.TopK(6)
    assert Compression("random_k", {"fraction": 0.001}).codec(100) == compress.RandomK(1)
    assert Compression("qsgd", {"levels": 15}, rotated=True).codec(10, 7) == compress.Rotated(compress.QSGD(15), 7)
    with pytest.raises(fedkern.FedkernValueError, match="compression.k"):
        simulation(federation(), Compression("top_k", {"k": F + 1}))


def test_settings_compression_cannot_serve_are_refused():
    data = federation()
    settings = Compression("qsgd")
    with pytest.raises(fedkern.FedkernValueError, match="aggregator"):
        simulation(data, settings, aggregator=Aggregator("median"))
    with pytest.raises(fedkern.FedkernValueError, match="aggregator"):
        simulation(data, settings, aggregator=Aggregator("mean", pre={"name": "bucketing", "s": 2}))
    with pytest.raises(fedkern.FedkernValueError, match="reject_norm_ratio"):
        simulation(data, settings, reject_norm_ratio=3.0)
    with pytest.raises(fedkern.FedkernValueError, match="central differential privacy"):
        simulation(data, settings, privacy=DifferentialPrivacy(clip=1.0, noise_multiplier=1.0, sampling="fixed"))
    with pytest.raises(fedkern.FedkernTypeError, match="compression"):
        simulation(data, "qsgd")


def test_secure_aggregation_is_refused():
    pytest.importorskip("cryptography")
    from fedkern.sim import SecureAggregation

    with pytest.raises(fedkern.FedkernValueError, match="secure_aggregation"):
        simulation(federation(), Compression("qsgd"), secure_aggregation=SecureAggregation())


SMALL = {"rounds": 2, "clients_per_round": 4, "dataset": {"name": "fedprox_synthetic", "n_clients": 8}}


def test_the_config_key_and_its_round_trip():
    toml = """
rounds = 2
clients_per_round = 4
[dataset]
name = "fedprox_synthetic"
n_clients = 8
[compression]
name = "qsgd"
levels = 15
bucket_size = 64
error_feedback = true
"""
    run, settings = config.build(tomllib.loads(toml))
    assert run.compression == Compression("qsgd", {"levels": 15, "bucket_size": 64}, error_feedback=True)
    history = run.run(2)
    assert (history.column("bytes_up") < history.column("bytes_up_uncompressed") / 4).all()
    again, _ = config.build(tomllib.loads(config.to_toml(settings)))
    again.run(2)
    assert np.array_equal(again.params, run.params)
    plain, settings = config.build(SMALL)
    assert plain.compression is None and settings["compression"] == {"name": "none"}
    top, _ = config.build(config.apply_overrides(SMALL, ["compression.name=top_k", "compression.fraction=0.01",
                                                         "compression.error_feedback=true"]))
    assert top.compression == Compression("top_k", {"fraction": 0.01}, error_feedback=True)
    assert config.build({**SMALL, "compression": "scaled_sign"})[0].compression == Compression("scaled_sign")


@pytest.mark.parametrize("table, extra, match", [
    ({"name": "zip"}, {}, "'compression.name'"),
    ({"name": "none", "levels": 4}, {}, "'compression'.*takes no parameters"),
    ({"name": "qsgd", "level": 4}, {}, "'compression.level'.*compression.levels"),
    ({"name": "qsgd", "levels": 256}, {}, "'compression'.*compression.levels must be between 1 and 255"),
    ({"name": "qsgd", "rotated": 1}, {}, "'compression'.*compression.rotated"),
    ({"name": "top_k"}, {}, "'compression'.*k or fraction"),
    ({"name": "top_k", "k": 10_000}, {}, "'compression.k'"),
    ({"name": "qsgd"}, {"aggregator": "median"}, "'aggregator'.*mean"),
    ({"name": "qsgd"}, {"reject_norm_ratio": 2.0}, "'reject_norm_ratio'"),
    ({"name": "qsgd"}, {"privacy": {"name": "central", "noise_multiplier": 1.0}}, "'privacy'"),
])
def test_config_errors_name_the_key(table, extra, match):
    with pytest.raises(ConfigError, match=match):
        config.build({**SMALL, **extra, "compression": table})


def test_local_privacy_is_accounted_as_without_compression():
    data = federation()
    dp = DifferentialPrivacy(mode="local", clip=0.5, noise_multiplier=1.0, sampling="fixed")
    compressed = simulation(data, Compression("stochastic_quantizer", {"bits": 2}), privacy=dp)
    plain = simulation(data, None, privacy=dp)
    assert compressed.run(3).column("epsilon").tolist() == plain.run(3).column("epsilon").tolist()
