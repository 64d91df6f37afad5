"""FedNova, q-FFL, SCAFFOLD and FedBuff against small numpy references of the papers' math."""
import numpy as np
import pytest

from fedkern import FedAvg as FedAvgOptimizer
from fedkern import FedkernTypeError, FedkernValueError
from fedkern.sim import LocalTraining, Stragglers, ThreadExecutor, checkpoint, config
from fedkern.sim.algorithms import FBL, BufferedRun, FedAvg, FedBuff, FedNova, QFFL, Scaffold
from fedkern.sim.data import FederatedDataset
from fedkern.sim.models import LogisticRegression
from fedkern.sim.privacy import DifferentialPrivacy
from fedkern.sim.sampling import ByWeight, BySize, Uniform
from fedkern.sim.secure import SecureAggregation
from fedkern.sim.config import ConfigError
from fedkern.sim.models import TrainResult

from .test_config import SMALL
from .test_rounds import federation, simulation
from .toy import ToyModel


class OneStepPerRow(ToyModel):
    """The toy quadratic, trained one plain SGD step per row: clients of different sizes
    take different step counts (FedNova's tau_i)."""

    def train(self, params, x, y, config, rng, delta_out):
        w = params.astype(np.float64)
        for _ in range(x.shape[0]):
            w -= config.lr * (w - x.mean(axis=0))
        delta_out[:] = w.astype(np.float32) - params
        return TrainResult(loss=self.loss(params, x, y), steps=x.shape[0])


def local_quadratic_deltas(data, w0, lr, steps_of):
    """Each client's delta after its steps of SGD on 0.5 ||w - m_i||^2, in float64."""
    deltas = []
    for c in range(data.n_clients):
        x, _ = data.client(c)
        w = w0.astype(np.float64)
        for _ in range(steps_of(x)):
            w -= lr * (w - x.mean(axis=0))
        deltas.append(w - w0)
    return np.array(deltas)


def straight_and_resumed(settings: dict, rounds: int, path):
    """A config's run of ``rounds``, and a second one checkpointed halfway and resumed in
    a fresh simulation to the same round."""
    straight, _ = config.build(settings)
    straight.run(rounds)
    first, _ = config.build(settings)
    first.run(rounds // 2)
    first.save(path)
    resumed, _ = config.build(settings)
    resumed.restore(path)
    resumed.run(rounds)
    return straight, resumed


# --------------------------------------------------------------------------- FedNova
def test_fednova_norms_of_a_are_the_sums_of_the_papers_a_vectors():
    tau = np.array([1, 3, 7])
    momentum = FedNova()
    momentum.local(LocalTraining(lr=0.1, momentum=0.9))
    # momentum SGD: a = [1 - rho^tau, ..., 1 - rho] / (1 - rho)
    by_sum = [sum((1 - 0.9 ** (t - k)) / 0.1 for k in range(t)) for t in tau]
    np.testing.assert_allclose(momentum.norm_a(tau), by_sum, rtol=1e-12)
    proximal = FedNova(mu=0.5)
    proximal.local(LocalTraining(lr=0.1))
    # proximal SGD: a = [(1 - eta mu)^(tau-1), ..., 1]
    np.testing.assert_allclose(proximal.norm_a(tau), [sum(0.95 ** k for k in range(t)) for t in tau], rtol=1e-12)
    plain = FedNova()
    plain.local(LocalTraining())
    np.testing.assert_array_equal(plain.norm_a(tau), tau)


def test_fednova_round_matches_a_numpy_reference_with_unequal_step_counts():
    data = federation(n_clients=6)
    run = simulation(data, model=OneStepPerRow(data.train.n_features), clients_per_round=6,
                     local=LocalTraining(lr=0.05), algorithm=FedNova())
    w0 = run.params.copy()
    run.step()
    deltas = local_quadratic_deltas(data.train, w0, 0.05, lambda x: x.shape[0])
    tau = data.train.sizes.astype(np.float64)
    assert len(set(tau)) > 1
    p = tau / tau.sum()                  # data shares; here also the step counts
    expected = w0 + (p @ tau) * ((p / tau) @ deltas)
    np.testing.assert_allclose(run.params, expected, rtol=1e-5, atol=1e-6)
    mean = w0 + p @ deltas               # FedAvg's step differs: the test can tell them apart
    assert np.abs(run.params - mean).max() > 1e-3


def test_fednova_is_the_weighted_mean_when_every_client_takes_the_same_steps():
    nova = FedNova()
    nova.local(LocalTraining())
    deltas, weights = np.random.default_rng(0).standard_normal((4, 3)), np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(nova.combine(deltas, weights, np.full(4, 5)), weights @ deltas / weights.sum(),
                               rtol=1e-6)


def test_fednova_counts_a_stragglers_partial_work_at_its_own_step_count():
    nova = FedNova()
    nova.local(LocalTraining())
    # a full client (10 steps) and a straggler (2 steps) moving at the same rate per step
    step = nova.combine(np.array([[10.0], [2.0]]), np.ones(2), np.array([10, 2]))
    assert step == pytest.approx(6.0)    # tau_eff = 6 times the mean per-step progress 1


@pytest.mark.parametrize("algorithm, local, match", [
    (FedNova(mu=0.1), LocalTraining(momentum=0.9), "fednova.*not both"),
])
def test_fednova_refuses_momentum_with_a_proximal_term(algorithm, local, match):
    with pytest.raises(FedkernValueError, match=match):
        simulation(algorithm=algorithm, local=local)


# --------------------------------------------------------------------------- q-FFL
def q_fedavg_reference(deltas, losses, q, lipschitz):
    """The paper's update written out client by client."""
    numerator, denominator = np.zeros(deltas.shape[1]), 0.0
    for delta_w, loss in zip(deltas, losses):
        big_delta = lipschitz * (-delta_w)
        numerator += loss ** q * big_delta
        denominator += q * loss ** (q - 1) * big_delta @ big_delta + lipschitz * loss ** q
    return -numerator / denominator


def test_qffl_matches_the_papers_update():
    rng = np.random.default_rng(1)
    deltas, losses = rng.standard_normal((5, 4)), rng.uniform(0.2, 3.0, 5)
    np.testing.assert_allclose(QFFL(q=2.0, lipschitz=4.0).combine(deltas, None, None, losses),
                               q_fedavg_reference(deltas, losses, 2.0, 4.0), rtol=1e-6)


def test_qffl_with_q_zero_is_the_unweighted_mean_over_l():
    deltas = np.random.default_rng(2).standard_normal((3, 2))
    np.testing.assert_allclose(QFFL(q=0.0, lipschitz=2.0).combine(deltas, None, None, np.array([1.0, 5.0, 9.0])),
                               deltas.mean(axis=0), rtol=1e-6)


def test_qffl_with_each_clients_own_loss_moves_toward_the_high_loss_client():
    # two clients pulling along orthogonal axes by the same amount; client 1's loss is 4x client 0's
    deltas, own = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.5, 2.0])
    toward_high_over_low = lambda step: float(step[1] / step[0])
    fair = QFFL(q=1.5, lipschitz=1.0)
    with_own = fair.combine(deltas, None, None, own)
    one_loss = fair.combine(deltas, None, None, np.full(2, own.mean()))     # Flower's single server loss
    fedavg = deltas.mean(axis=0)
    assert toward_high_over_low(with_own) == pytest.approx(4.0 ** 1.5)      # (F_1 / F_0)^q
    assert toward_high_over_low(one_loss) == pytest.approx(1.0)             # the reweighting cancels
    assert toward_high_over_low(fedavg) == pytest.approx(1.0)


def test_qffl_round_uses_each_clients_loss_at_the_global_model():
    data = federation(n_clients=5)
    model = ToyModel(data.train.n_features, noise=0.0)
    run = simulation(data, model=model, clients_per_round=5, local=LocalTraining(epochs=2, lr=0.5),
                     algorithm=QFFL(q=1.5, lipschitz=2.0))
    w0 = run.params.copy()
    run.step()
    deltas = local_quadratic_deltas(data.train, w0, 0.5, lambda x: 2)
    losses = [model.loss(w0, *data.train.client(c)) for c in range(5)]
    np.testing.assert_allclose(run.params, w0 + q_fedavg_reference(deltas, losses, 1.5, 2.0), rtol=1e-5, atol=1e-6)


def test_qffl_refuses_losses_it_cannot_raise_to_a_power():
    with pytest.raises(FedkernValueError, match="global_losses"):
        QFFL().combine(np.ones((2, 1)), None, None, np.array([1.0, 0.0]))


# --------------------------------------------------------------------------- SCAFFOLD
CURVATURES, TARGETS = np.array([1.0, 4.0, 0.25]), np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]])


def scaffold_round(scaffold, w, lr, steps):
    """Every client of the quadratic federation 0.5 a_i ||w - m_i||^2 runs corrected SGD."""
    deltas, variate_deltas = [], []
    for i, (a, m) in enumerate(zip(CURVATURES, TARGETS)):
        correction, y = scaffold.correction(i).astype(np.float64), w.copy()
        for _ in range(steps):
            y -= lr * (a * (y - m) + correction)
        deltas.append(y - w)
        variate_deltas.append(scaffold.client_update(i, y - w, steps, lr))
    return w + scaffold.server_step(np.array(deltas), np.array(variate_deltas))


def test_scaffold_round_matches_the_papers_option_two():
    scaffold = Scaffold(global_lr=0.5)
    scaffold.start(n_params=2, n_clients=4)      # one client never takes part: |S|/N = 3/4
    w = np.zeros(2)
    c, c_i = np.zeros(2), np.zeros((3, 2))
    for _ in range(2):                           # the second round starts from non-zero variates
        w_next = scaffold_round(scaffold, w, 0.1, 5)
        ys = []
        for i in range(3):
            y = w.copy()
            for _ in range(5):
                y -= 0.1 * (CURVATURES[i] * (y - TARGETS[i]) - c_i[i] + c)
            ys.append(y)
        new_c_i = c_i - c + (w - np.array(ys)) / (5 * 0.1)
        w_ref = w + 0.5 * (np.array(ys) - w).mean(axis=0)
        c, c_i = c + 3 / 4 * (new_c_i - c_i).mean(axis=0), new_c_i
        np.testing.assert_allclose(w_next, w_ref, rtol=1e-5, atol=1e-7)   # the step is float32
        # the variates are float64; the correction the local steps see is float32
        np.testing.assert_allclose(scaffold.server_variate, c, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(scaffold.client_variates[2], c_i[2], rtol=1e-6, atol=1e-7)
        w = w_next


def test_scaffold_removes_the_client_drift_that_biases_fedavg():
    optimum = CURVATURES @ TARGETS / CURVATURES.sum()
    scaffold, fedavg = Scaffold(), Scaffold()
    for algorithm in (scaffold, fedavg):
        algorithm.start(n_params=2, n_clients=3)
    w_scaffold = w_fedavg = np.zeros(2)
    for _ in range(200):
        w_scaffold = scaffold_round(scaffold, w_scaffold, 0.1, 10)
        w_fedavg = scaffold_round(fedavg, w_fedavg, 0.1, 10)
        fedavg.start(n_params=2, n_clients=3)    # variates kept at 0: plain FedAvg
    assert np.abs(w_scaffold - optimum).max() < 1e-6
    assert np.abs(w_fedavg - optimum).max() > 0.1


def test_scaffold_checkpoint_continues_bit_identically(tmp_path):
    straight, resumed = Scaffold(), Scaffold()
    straight.start(2, 3)
    w = scaffold_round(straight, np.zeros(2), 0.1, 4)
    checkpoint.save(tmp_path / "s.npz", straight.state(), {})
    arrays, _ = checkpoint.load(tmp_path / "s.npz")
    resumed.start(2, 3)
    resumed.restore(arrays)
    np.testing.assert_array_equal(scaffold_round(resumed, w, 0.1, 4), scaffold_round(straight, w, 0.1, 4))
    np.testing.assert_array_equal(resumed.server_variate, straight.server_variate)


class CorrectedSteps(OneStepPerRow):
    """OneStepPerRow with SCAFFOLD's correction added to each step's gradient."""

    takes_correction = True

    def train(self, params, x, y, config, rng, delta_out, correction=None):
        w, shift = params.astype(np.float64), 0.0 if correction is None else correction.astype(np.float64)
        for _ in range(x.shape[0]):
            w -= config.lr * ((w - x.mean(axis=0)) + shift)
        delta_out[:] = w.astype(np.float32) - params
        return TrainResult(loss=self.loss(params, x, y), steps=x.shape[0])


def test_scaffold_in_simulation_matches_a_numpy_reference_over_rounds():
    """Three rounds of the whole federation (|S| = N), clients of different sizes (their
    own step counts K_i), against the paper's option II written out in float64."""
    data = federation(n_clients=5)
    lr, global_lr = 0.05, 0.5
    run = simulation(data, model=CorrectedSteps(data.train.n_features), clients_per_round=5,
                     local=LocalTraining(lr=lr), algorithm=Scaffold(global_lr=global_lr))
    w = run.params.astype(np.float64)
    c, c_i = np.zeros_like(w), np.zeros((5, w.size))
    for _ in range(3):
        run.step()
        deltas, variate_deltas = [], []
        for i in range(5):
            x, _ = data.train.client(i)
            y = w.copy()
            for _ in range(x.shape[0]):
                y -= lr * ((y - x.mean(axis=0)) + (c - c_i[i]))
            new = c_i[i] - c + (w - y) / (x.shape[0] * lr)
            deltas.append(y - w)
            variate_deltas.append(new - c_i[i])
            c_i[i] = new
        w = w + global_lr * np.mean(deltas, axis=0)
        c = c + np.mean(variate_deltas, axis=0)
        np.testing.assert_allclose(run.params, w, rtol=1e-5, atol=1e-5)
        w = run.params.astype(np.float64)      # the run's float32 model is what goes out next
    np.testing.assert_allclose(run.algorithm.server_variate, c, rtol=1e-4, atol=1e-5)
    assert np.abs(c).max() > 1e-2          # the corrections were not negligible


def test_scaffold_runs_from_the_config_resumes_bit_identically_and_threads_agree(tmp_path):
    settings = {**SMALL, "algorithm": {"name": "scaffold", "global_lr": 0.8}}
    straight, resumed = straight_and_resumed({**settings, "stragglers": {"fraction": 0.5}}, 4, tmp_path / "s.npz")
    assert resumed.params.tobytes() == straight.params.tobytes()
    assert np.abs(straight.algorithm.server_variate).max() > 0
    threaded, _ = config.build({**settings, "stragglers": {"fraction": 0.5},
                                "executor": {"name": "threads", "workers": 2}})
    with threaded:
        threaded.run(4)
    assert threaded.params.tobytes() == straight.params.tobytes()
    plain, _ = config.build(SMALL)
    with pytest.raises(FedkernValueError, match="with SCAFFOLD's variates"):
        plain.restore(tmp_path / "s.npz")


def test_scaffold_refuses_what_cannot_carry_its_correction():
    data = federation()
    with pytest.raises(FedkernValueError, match="model: scaffold corrects every local step"):
        simulation(data, algorithm=Scaffold())                              # ToyModel takes no correction
    with pytest.raises(FedkernValueError, match="client_update: not with scaffold"):
        simulation(data, model=CorrectedSteps(data.train.n_features), algorithm=Scaffold(),
                   client_update=lambda *args, **kwargs: None)
    with pytest.raises(FedkernValueError, match="momentum"):
        simulation(data, model=CorrectedSteps(data.train.n_features), algorithm=Scaffold(),
                   local=LocalTraining(momentum=0.9))


# --------------------------------------------------------------------------- FedBuff
def test_fedbuff_step_weights_updates_by_staleness():
    deltas, staleness = np.array([[1.0, 2.0], [4.0, 0.0], [2.0, 2.0]]), np.array([0, 3, 8])
    step = FedBuff(buffer_size=3, server_lr=0.5).server_step(deltas, staleness)
    expected = 0.5 / 3 * (deltas[0] + deltas[1] / 2 + deltas[2] / 3)
    np.testing.assert_allclose(step, expected, rtol=1e-6)


TARGETS_BY_CLIENT = np.linspace(-1.0, 1.0, 7)[:, None] * np.ones((1, 3))


def pull_toward_target(client, params, rng):
    assert not params.flags.writeable
    return (0.3 * (TARGETS_BY_CLIENT[client] - params) + 0.01 * rng.standard_normal(3)).astype(np.float32)


def buffered(seed=0, **settings):
    settings = {"buffer_size": 3, "concurrency": 5, **settings}
    return BufferedRun(FedBuff(**settings), pull_toward_target, np.zeros(3, np.float32), n_clients=7, seed=seed)


def test_fedbuff_with_one_client_in_flight_is_sequential_sgd():
    run = buffered(buffer_size=1, concurrency=1)
    run.run(4)
    w = np.zeros(3, np.float32)
    for j in range(4):       # the reference draws each dispatch's client from the same keyed stream
        rng = np.random.Generator(np.random.Philox(key=np.array([0, j], np.uint64)))
        client = int(rng.integers(7))
        rng.exponential(1.0)
        w = w + pull_toward_target(client, np.frombuffer(w.tobytes(), np.float32), rng)
    np.testing.assert_array_equal(run.params, w)
    assert all(record["staleness_max"] == 0 for record in run.history)


def test_fedbuff_records_staleness_when_clients_overlap():
    history = buffered().run(6)
    assert [record["round"] for record in history] == list(range(1, 7))
    assert max(record["staleness_max"] for record in history) >= 1
    assert all(0 <= r["staleness_mean"] <= r["staleness_max"] for r in history)
    assert all(a["time"] <= b["time"] for a, b in zip(history, history[1:]))


def test_fedbuff_is_deterministic_under_a_seed():
    first, second, other = buffered(seed=3), buffered(seed=3), buffered(seed=4)
    for run in (first, second, other):
        run.run(5)
    assert first.params.tobytes() == second.params.tobytes() and first.history.records == second.history.records
    assert first.params.tobytes() != other.params.tobytes()


def test_fedbuff_checkpoint_continues_bit_identically(tmp_path):
    straight, interrupted = buffered(seed=1), buffered(seed=1)
    straight.run(5)
    interrupted.run(2)
    checkpoint.save(tmp_path / "b.npz", *interrupted.state())
    resumed = buffered(seed=1)
    resumed.restore(*checkpoint.load(tmp_path / "b.npz"))
    resumed.run(5)
    assert resumed.params.tobytes() == straight.params.tobytes() and resumed.history.records == straight.history.records
    with pytest.raises(FedkernValueError, match="another seed"):
        buffered(seed=2).restore(*checkpoint.load(tmp_path / "b.npz"))


def test_fedbuff_in_simulation_is_a_buffered_run_of_the_clients_with_data():
    data = federation(n_clients=9, empty=(2, 5))
    fedbuff = FedBuff(buffer_size=3, concurrency=4, staleness_exponent=0.5, server_lr=0.8)
    run = simulation(data, algorithm=fedbuff, seed=7)
    start = run.params.copy()
    history = run.run(5)
    with_data = np.flatnonzero(data.train.sizes)
    model, local = run.model, run.local

    def train(index, params, rng):
        delta = np.empty_like(params)
        model.train(params, *data.train.client(int(with_data[index])), local, rng, delta)
        return delta
    by_hand = BufferedRun(fedbuff, train, start, n_clients=with_data.size, seed=7)
    by_hand.run(5)
    assert run.params.tobytes() == by_hand.params.tobytes()
    assert [r["staleness_max"] for r in history] == [r["staleness_max"] for r in by_hand.history]
    assert all(r["selected"] == r["arrived"] == 3 and r["dropped"] == 0 and np.isfinite(r["train_loss"])
               for r in history)
    assert history[0]["dispatched"] == 4 + 3 and history[1]["dispatched"] == 3     # models sent out each round
    assert history[1]["bytes_down"] == 3 * run.params.nbytes


def test_fedbuff_runs_from_the_config_and_resumes_bit_identically(tmp_path):
    settings = {**SMALL, "algorithm": {"name": "fedbuff", "buffer_size": 2, "concurrency": 4}}
    straight, resumed = straight_and_resumed(settings, 5, tmp_path / "b.npz")
    assert resumed.params.tobytes() == straight.params.tobytes()
    assert resumed.history.column("staleness_mean").tolist() == straight.history.column("staleness_mean").tolist()
    plain, _ = config.build(SMALL)
    with pytest.raises(FedkernValueError, match="with FedBuff"):
        plain.restore(tmp_path / "b.npz")
    plain.run(1)
    plain.save(tmp_path / "p.npz")
    with pytest.raises(FedkernValueError, match="without FedBuff"):
        config.build(settings)[0].restore(tmp_path / "p.npz")


@pytest.mark.parametrize("setting, match", [
    ({"aggregator": "median"}, "aggregator: fedbuff averages its buffer itself"),
    ({"stragglers": Stragglers(fraction=0.5)}, "stragglers: not with fedbuff"),
    ({"reject_norm_ratio": 3.0}, "reject_norm_ratio: not with fedbuff"),
    ({"sampler": BySize()}, "sampler: fedbuff draws its clients uniformly"),
    ({"availability": 0.5}, "sampler: fedbuff draws its clients uniformly"),
    ({"server_optimizer": FedAvgOptimizer(lr=0.5)}, "server_optimizer: fedbuff steps the model"),
    ({"privacy": DifferentialPrivacy(clip=1.0, noise_multiplier=1.0, sampling="fixed")}, "privacy: not with fedbuff"),
])
def test_fedbuff_refuses_what_its_buffer_does_not_do(setting, match):
    with pytest.raises(FedkernValueError, match=match):
        simulation(algorithm=FedBuff(), **setting)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("table, kind", [({"name": "fednova"}, FedNova), ({"name": "qffl", "q": 0.5}, QFFL)])
def test_config_builds_and_runs_the_combining_algorithms(table, kind):
    simulation_, _ = config.build({**SMALL, "algorithm": table})
    assert isinstance(simulation_.algorithm, kind)
    simulation_.run(1)
    assert np.isfinite(simulation_.params).all()


@pytest.mark.parametrize("table, match", [
    ({"name": "qffl", "q": -1.0}, "'algorithm'.*q must be >= 0"),
    ({"name": "qffl", "lipschitz": 0.0}, "'algorithm'.*lipschitz must be > 0"),
    ({"name": "fednova", "mu": -0.5}, "'algorithm'.*mu must be >= 0"),
    ({"name": "scaffold", "global_lr": 0.0}, "'algorithm'.*global_lr must be > 0"),
    ({"name": "fedbuff", "buffer_size": 0}, "'algorithm'.*buffer_size must be >= 1"),
    ({"name": "fedbuff", "staleness_exponent": -1.0}, "'algorithm'.*staleness_exponent"),
    ({"name": "fedbuff", "delay": 1.0}, "'algorithm'.*delay"),
])
def test_config_errors_name_the_algorithm_key(table, match):
    with pytest.raises(ConfigError, match=match):
        config.build({**SMALL, "algorithm": table})


def test_combining_algorithms_refuse_a_robust_rule():
    with pytest.raises(FedkernValueError, match="aggregator: fednova combines the updates itself"):
        simulation(algorithm=FedNova(), aggregator="median")


@pytest.mark.parametrize("algorithm", [FedNova(), QFFL(q=1.0, lipschitz=2.0)], ids=["fednova", "qffl"])
def test_combining_algorithms_give_the_same_bits_on_threads(algorithm):
    serial = simulation(algorithm=algorithm, stragglers=Stragglers(fraction=0.5), seed=5)
    serial.run(3)
    with simulation(algorithm=algorithm, stragglers=Stragglers(fraction=0.5), seed=5,
                    executor=ThreadExecutor(workers=2)) as threaded:
        threaded.run(3)
    assert serial.params.tobytes() == threaded.params.tobytes()


# --------------------------------------------------------------------------- FBL
def skewed(n_clients=6, seed=0):
    """The toy federation relabelled so that client i holds class 1 in a share from 5% to 95%."""
    data = federation(n_clients=n_clients, seed=seed)
    rng = np.random.default_rng(seed)
    share = np.linspace(0.05, 0.95, n_clients)
    y = np.concatenate([(rng.random(n) < share[i]).astype(np.int32) for i, n in enumerate(data.train.sizes)])
    return FederatedDataset(data.train.with_labels(y), data.test, "skewed")


def test_fbl_masses_and_priors_follow_their_formulas():
    counts = np.array([[90, 10, 0], [10, 0, 5], [0, 0, 0]])
    fbl = FBL(tau=0.5)
    fbl.fit(counts)
    np.testing.assert_allclose(fbl.server_weights(), [90 / 100 + 10 / 10, 10 / 100 + 5 / 5, 0.0])
    np.testing.assert_allclose(fbl.logit_adjustment(1), 0.5 * np.log(np.array([11, 1, 6]) / 18), rtol=1e-6)
    np.testing.assert_allclose(fbl.logit_adjustment(2), np.full(3, 0.5 * np.log(1 / 3)), rtol=1e-6)
    assert fbl.logit_adjustment(0).dtype == np.float32


def test_fbl_masses_are_fedavgs_weights_on_a_balanced_federation():
    fbl = FBL()
    fbl.fit(np.outer([3, 7, 20], [2, 5, 1]))       # every client holds the classes in one proportion
    sizes = np.array([3, 7, 20]) * 8
    np.testing.assert_allclose(fbl.server_weights() / fbl.server_weights().sum(), sizes / sizes.sum())


def test_fbl_with_every_part_off_is_fedavg_bit_for_bit():
    data = skewed()
    plain, off = simulation(data, seed=3), simulation(data, seed=3, algorithm=FBL(False, False, False))
    plain.run(3)
    off.run(3)
    assert plain.params.tobytes() == off.params.tobytes()


def recorded_updates():
    """A client_update that trains as usual and keeps every delta it wrote."""
    deltas = []

    def update(model, params, x, y, config, rng, delta_out):
        result = model.train(params, x, y, config, rng, delta_out)
        deltas.append(delta_out.astype(np.float64))
        return result
    return update, deltas


def test_fbl_weighs_the_servers_mean_by_class_balanced_mass():
    data = skewed()
    update, deltas = recorded_updates()
    run = simulation(data, clients_per_round=6, client_update=update,
                     algorithm=FBL(balanced_loss=False, balanced_sampling=False))
    start = run.params.astype(np.float64)
    run.step()
    counts = data.train.label_counts()
    mass = (counts / counts.sum(axis=0)).sum(axis=1)
    np.testing.assert_allclose(run.params - start, mass @ np.array(deltas) / mass.sum(), rtol=1e-5, atol=1e-6)
    fedavg_step = data.train.sizes @ np.array(deltas) / data.train.sizes.sum()
    assert np.abs(run.params - start - fedavg_step).max() > 1e-3        # not FedAvg's weights


def test_fbl_samples_by_mass_in_place_of_uniform_sampling():
    data = skewed()
    for given in (None, Uniform()):
        run = simulation(data, algorithm=FBL(balanced_loss=False), sampler=given)
        assert isinstance(run.sampler, ByWeight) and run.sampler.weights.tolist() == run.algorithm.mass.tolist()
    assert isinstance(simulation(data, algorithm=FBL(balanced_loss=False, balanced_sampling=False)).sampler, Uniform)
    with pytest.raises(FedkernValueError, match="sampler: fbl draws its cohorts itself"):
        simulation(data, algorithm=FBL(balanced_loss=False), sampler=BySize())


class AdjustmentSpy(LogisticRegression):
    """Logistic regression that keeps the logit adjustment of every train() call."""

    def __init__(self, n_features):
        super().__init__(n_features, 2)
        self.seen = []

    def train(self, *args, logit_adjustment=None, **kwargs):
        self.seen.append(logit_adjustment.tolist())
        return super().train(*args, logit_adjustment=logit_adjustment, **kwargs)


def test_fbl_trains_every_client_with_its_own_logit_adjustment():
    data = skewed()
    model = AdjustmentSpy(data.train.n_features)
    run = simulation(data, model=model, clients_per_round=6, algorithm=FBL(tau=2.0))
    run.step()
    counts = data.train.label_counts()
    prior = (counts + 1) / (counts.sum(axis=1, keepdims=True) + 2)
    np.testing.assert_allclose(model.seen, 2.0 * np.log(prior), rtol=1e-6)
    assert len({tuple(row) for row in model.seen}) == 6


def test_fbl_refuses_what_would_drop_a_part():
    data = skewed()
    with pytest.raises(FedkernValueError, match="model: fbl adjusts every client's logits"):
        simulation(data, algorithm=FBL())                                 # ToyModel takes no adjustment
    model = LogisticRegression(data.train.n_features, 2)
    with pytest.raises(FedkernValueError, match="client_update: not with fbl"):
        simulation(data, model=model, algorithm=FBL(), client_update=recorded_updates()[0])
    weights_only = FBL(balanced_loss=False, balanced_sampling=False)
    with pytest.raises(FedkernValueError, match="privacy: DP-FedAvg weighs every client 1"):
        simulation(data, algorithm=weights_only, privacy=DifferentialPrivacy(clip=1.0, noise_multiplier=1.0,
                                                                             sampling="fixed"))
    with pytest.raises(FedkernValueError, match="secure_aggregation: needs integer client weights"):
        simulation(data, algorithm=weights_only, secure_aggregation=SecureAggregation())
    with pytest.raises(FedkernValueError, match="call fbl.fit"):
        FBL().server_weights()
    with pytest.raises(FedkernTypeError, match="balanced_loss must be true or false"):
        FBL(balanced_loss=1)


def test_fbl_runs_from_the_config_resumes_bit_identically_and_threads_agree(tmp_path):
    settings = {**SMALL, "algorithm": {"name": "fbl", "tau": 0.5}}
    straight, resumed = straight_and_resumed(settings, 4, tmp_path / "f.npz")
    assert resumed.params.tobytes() == straight.params.tobytes()
    threaded, _ = config.build({**settings, "executor": {"name": "threads", "workers": 2}})
    with threaded:
        threaded.run(4)
    assert threaded.params.tobytes() == straight.params.tobytes()
    uniform, _ = config.build({**SMALL, "algorithm": {"name": "fbl", "tau": 0.5, "balanced_sampling": False}})
    uniform.run(4)
    assert uniform.params.tobytes() != straight.params.tobytes()
    with pytest.raises(ConfigError, match="'algorithm'.*tau must be >= 0"):
        config.build({**SMALL, "algorithm": {"name": "fbl", "tau": -1.0}})
