"""fedkern.sim.models: the built-in models on every backend, against the numpy reference,
finite differences and local steps worked out by hand."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedkern import backends
from fedkern._errors import BackendUnavailableError, FedkernTypeError, FedkernValueError
from fedkern._reference import models as reference_kernels
from fedkern.sim.models import MLP, Evaluation, LocalTraining, LogisticRegression, Model, TrainResult, make_model


def compiled(name):
    """A compiled backend as a test parameter, skipped where it is not built."""
    return pytest.param(name, marks=pytest.mark.skipif(not backends.is_available(name, "models"),
                                                        reason=f"the {name} models kernels are not available"))


COMPILED = [compiled("cython"), compiled("numba")]
BACKENDS = COMPILED + ["reference"]


def data(n, f, c, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, f)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    return x, y


def build(kind, f, c, backend="numba"):
    return LogisticRegression(f, c, backend=backend, init_scale=0.3) if kind == "lr" else MLP(f, [5, 4], c, backend=backend)


def trained_delta(model, params, x, y, config, seed):
    delta = np.empty_like(params)
    result = model.train(params, x, y, config, np.random.default_rng(seed), delta)
    return delta, result


def assert_backends_agree(backend, kind, n, f, c, config, seed):
    x, y = data(n, f, c, seed)
    fast, slow = build(kind, f, c, backend), build(kind, f, c, "reference")
    params = fast.init(np.random.default_rng(seed))
    d_fast, r_fast = trained_delta(fast, params, x, y, config, seed)
    d_slow, r_slow = trained_delta(slow, params, x, y, config, seed)
    scale = max(1e-3, float(np.abs(d_slow).max()))
    np.testing.assert_allclose(d_fast, d_slow, rtol=1e-4, atol=1e-5 * scale)
    assert r_fast.steps == r_slow.steps
    assert r_fast.loss == pytest.approx(r_slow.loss, rel=1e-6)


# ---------------------------------------------------------------- backends agree
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("kind", ["lr", "mlp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n, f, c, batch", [(40, 6, 3, 10), (37, 11, 5, 8), (9, 2, 2, 1)])
def test_backends_agree(backend, kind, seed, n, f, c, batch):
    config = LocalTraining(epochs=3, batch_size=batch, lr=0.1, momentum=0.5, weight_decay=0.01, mu=0.1)
    assert_backends_agree(backend, kind, n, f, c, config, seed)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("hidden", [[], [7], [9], [16, 3]])
def test_backends_agree_with_a_correction(backend, hidden):
    """SCAFFOLD's correction, added to every gradient: the compiled kernels (Cython's in
    its padded layout) against the reference's g += correction; zeros change nothing."""
    f, c = 9, 5
    x, y = data(31, f, c, seed=len(hidden))
    config = LocalTraining(epochs=2, batch_size=7, lr=0.1, momentum=0.5, weight_decay=0.01, mu=0.1)
    fast, slow = MLP(f, hidden, c, backend=backend), MLP(f, hidden, c, backend="reference")
    params = fast.init(np.random.default_rng(3))
    correction = np.random.default_rng(4).normal(0.0, 0.5, fast.n_params).astype(np.float32)
    got, want = np.empty_like(params), np.empty_like(params)
    fast.train(params, x, y, config, np.random.default_rng(0), got, correction)
    slow.train(params, x, y, config, np.random.default_rng(0), want, correction)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    plain, zeros = trained_delta(fast, params, x, y, config, 0)[0], np.empty_like(params)
    fast.train(params, x, y, config, np.random.default_rng(0), zeros, np.zeros_like(params))
    np.testing.assert_array_equal(zeros, plain)
    assert np.abs(got - plain).max() > 1e-3       # the correction moved the model


def test_a_correction_is_added_to_every_step():
    """One full-batch step of plain SGD is w - lr (g(w) + correction): the correction moves
    the delta by -lr correction (to the float32 rounding of the deltas)."""
    x, y = data(12, 3, 2, seed=5)
    model = LogisticRegression(3, 2, backend="reference")
    params = np.zeros(model.n_params, np.float32)
    config = LocalTraining(epochs=1, batch_size=12, lr=0.5)        # one step
    correction = np.arange(model.n_params, dtype=np.float32) / 8
    plain, shifted = np.empty_like(params), np.empty_like(params)
    model.train(params, x, y, config, np.random.default_rng(0), plain)
    model.train(params, x, y, config, np.random.default_rng(0), shifted, correction)
    np.testing.assert_allclose(shifted - plain, -0.5 * correction, atol=1e-7)


def test_a_bad_correction_is_refused():
    model = LogisticRegression(3, 2)
    x, y = data(5, 3, 2)
    params, delta = np.zeros(model.n_params, np.float32), np.empty(model.n_params, np.float32)
    for bad in (np.zeros(model.n_params), np.zeros(model.n_params - 1, np.float32)):
        with pytest.raises((FedkernTypeError, FedkernValueError), match="correction"):
            model.train(params, x, y, LocalTraining(), np.random.default_rng(0), delta, bad)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("hidden", [[], [1], [7], [8], [9], [16, 3], [24, 17, 8]])
@pytest.mark.parametrize("f, c", [(1, 2), (8, 8), (9, 17), (16, 7)])
def test_backends_agree_at_widths_around_the_vector_lanes(backend, hidden, f, c):
    """The Cython kernel pads every layer's outputs to whole vectors of eight: widths just
    below, at and above a multiple of eight, and batches that leave a row tile partial."""
    x, y = data(23, f, c, seed=len(hidden) + f)
    config = LocalTraining(epochs=2, batch_size=6, lr=0.1, momentum=0.9, weight_decay=0.01, mu=0.2)
    fast, slow = MLP(f, hidden, c, backend=backend), MLP(f, hidden, c, backend="reference")
    params = fast.init(np.random.default_rng(f))
    params[fast.n_params - c:] = np.linspace(-0.5, 0.5, c)  # nonzero output biases
    d_fast, r_fast = trained_delta(fast, params, x, y, config, 0)
    d_slow, r_slow = trained_delta(slow, params, x, y, config, 0)
    np.testing.assert_allclose(d_fast, d_slow, rtol=1e-4, atol=1e-5 * max(1e-3, float(np.abs(d_slow).max())))
    assert r_fast.loss == pytest.approx(r_slow.loss, rel=1e-6)
    e_fast, e_slow = fast.evaluate(params + d_fast, x, y), slow.evaluate(params + d_fast, x, y)
    assert e_fast.loss == pytest.approx(e_slow.loss, rel=1e-9)
    assert e_fast.accuracy == e_slow.accuracy


@pytest.mark.parametrize("backend", COMPILED)
@given(kind=st.sampled_from(["lr", "mlp"]), n=st.integers(1, 50), f=st.integers(1, 20), c=st.integers(2, 6),
       batch=st.sampled_from([1, 3, 10, 64]), momentum=st.sampled_from([0.0, 0.9]),
       weight_decay=st.sampled_from([0.0, 0.1]), mu=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_backends_agree_on_any_shape(backend, kind, n, f, c, batch, momentum, weight_decay, mu, seed):
    config = LocalTraining(epochs=2, batch_size=batch, lr=0.05, momentum=momentum, weight_decay=weight_decay, mu=mu)
    assert_backends_agree(backend, kind, n, f, c, config, seed)


# ---------------------------------------------------------------- gradients
def finite_differences(loss, w, h=1e-6):
    grad = np.empty_like(w)
    for i in range(w.size):
        up, down = w.copy(), w.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (loss(up) - loss(down)) / (2 * h)
    return grad


def mean_cross_entropy(w, sizes, x, y, adjustment=0.0):
    """Independent float64 forward pass of the dense network (logits + adjustment)."""
    a, p = x.astype(np.float64), 0
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        z = a @ w[p:p + n_in * n_out].reshape(n_in, n_out) + w[p + n_in * n_out:p + (n_in + 1) * n_out]
        p += (n_in + 1) * n_out
        a = np.maximum(z, 0.0) if l < len(sizes) - 2 else z + adjustment
    z = a - a.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


@pytest.mark.parametrize("model", [LogisticRegression(4, 3, init_scale=0.5), MLP(4, [6, 5], 3)], ids=["lr", "mlp"])
def test_gradient_matches_finite_differences(model):
    x, y = data(12, 4, 3, seed=3)
    params = model.init(np.random.default_rng(3))
    sizes = model._sizes
    analytic = reference_kernels._gradient(params, sizes, x, y)
    numeric = finite_differences(lambda w: mean_cross_entropy(w, sizes, x, y), params.astype(np.float64))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lr", "mlp"])
def test_one_full_batch_step_is_minus_lr_times_the_gradient(backend, kind):
    x, y = data(15, 4, 3, seed=4)
    model = build(kind, 4, 3, backend)
    params = model.init(np.random.default_rng(4))
    delta, result = trained_delta(model, params, x, y, LocalTraining(batch_size=100, lr=0.01), 0)
    expected = -0.01 * reference_kernels._gradient(params, model._sizes, x, y)
    np.testing.assert_allclose(delta, expected, rtol=1e-3, atol=1e-8)
    assert result == TrainResult(pytest.approx(mean_cross_entropy(params.astype(np.float64), model._sizes, x, y)), 1)


# ---------------------------------------------------------------- local steps by hand
def hand_lr_steps(params, x, y, c, steps, lr, momentum=0.0, weight_decay=0.0, mu=0.0, adjustment=0.0):
    """Logistic-regression SGD on one row, written out from the formulas (logits z + adjustment)."""
    w = params.astype(np.float64)
    start, v = w.copy(), np.zeros_like(w)
    f = x.shape[1]
    for _ in range(steps):
        weights, bias = w[:f * c].reshape(f, c), w[f * c:]
        z = x[0].astype(np.float64) @ weights + bias + adjustment
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        dz = p - np.eye(c)[y[0]]
        g = np.concatenate([np.outer(x[0], dz).ravel(), dz])
        g = g + weight_decay * w + mu * (w - start)
        v = momentum * v + g
        w = w - lr * v
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_exact_step_gives_delta_exactly_w_after_minus_params(backend):
    # logits 0, softmax (1/2, 1/2): every number below is exact in binary
    model = LogisticRegression(1, 2, backend=backend)
    x, y = np.array([[2.0]], np.float32), np.array([0], np.int32)
    params = model.init(np.random.default_rng(0))
    delta, result = trained_delta(model, params, x, y, LocalTraining(lr=0.5), 0)
    np.testing.assert_array_equal(delta, np.array([0.5, -0.5, 0.25, -0.25], np.float32))
    assert result == TrainResult(math.log(2.0), 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("term", ["momentum", "weight_decay", "mu", "none"])
def test_momentum_weight_decay_and_mu_follow_their_formulas(backend, term):
    model = LogisticRegression(3, 4, backend=backend, init_scale=0.7)
    x, y = data(1, 3, 4, seed=5)
    params = model.init(np.random.default_rng(5))
    settings = {} if term == "none" else {term: 0.6}
    delta, result = trained_delta(model, params, x, y, LocalTraining(epochs=3, lr=0.4, **settings), 0)
    w = hand_lr_steps(params, x, y, 4, steps=3, lr=0.4, **settings)
    np.testing.assert_allclose(delta, w.astype(np.float32) - params, rtol=1e-5, atol=1e-7)
    assert result.steps == 3
    if term != "none":
        plain, _ = trained_delta(model, params, x, y, LocalTraining(epochs=3, lr=0.4), 0)
        assert np.abs(delta - plain).max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("term", ["momentum", "weight_decay", "mu", "none"])
def test_a_logit_adjustment_trains_the_adjusted_loss(backend, term):
    """FBL's logits z + a in training: the steps of -log softmax(z + a)_y, weight decay
    and the proximal term on the model's own weights; the input is left as it was."""
    model = LogisticRegression(3, 4, backend=backend, init_scale=0.7)
    x, y = data(1, 3, 4, seed=6)
    params = model.init(np.random.default_rng(6))
    kept = params.copy()
    adjustment = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    settings = {} if term == "none" else {term: 0.6}
    config = LocalTraining(epochs=3, lr=0.4, **settings)
    delta = np.empty_like(params)
    model.train(params, x, y, config, np.random.default_rng(0), delta, logit_adjustment=adjustment)
    w = hand_lr_steps(params, x, y, 4, steps=3, lr=0.4, adjustment=adjustment.astype(np.float64), **settings)
    np.testing.assert_allclose(delta, w.astype(np.float32) - params, rtol=1e-5, atol=2e-6)
    assert params.tobytes() == kept.tobytes()
    plain, _ = trained_delta(model, params, x, y, config, 0)
    assert np.abs(delta - plain).max() > 1e-2


def test_an_mlp_logit_adjustment_step_is_the_adjusted_gradient():
    model = MLP(3, [5], 3, backend="reference")
    x, y = data(9, 3, 3, seed=7)
    params = model.init(np.random.default_rng(7))
    adjustment = np.array([0.0, -1.0, -3.0], np.float32)
    delta = np.empty_like(params)
    model.train(params, x, y, LocalTraining(batch_size=100, lr=0.01), np.random.default_rng(0), delta,
                logit_adjustment=adjustment)
    shifted = lambda w: mean_cross_entropy(w, model._sizes, x, y, adjustment)
    np.testing.assert_allclose(delta, -0.01 * finite_differences(shifted, params.astype(np.float64)),
                               rtol=1e-3, atol=1e-7)      # the float32 rounding of w + delta


@pytest.mark.parametrize("adjustment, error", [
    (np.zeros(4, np.float32), FedkernValueError), (np.zeros(3, np.float64), FedkernTypeError),
    (np.array([0.0, -np.inf, 0.0], np.float32), FedkernValueError), ([0.0, 0.0, 0.0], FedkernTypeError)])
def test_a_bad_logit_adjustment_is_refused(adjustment, error):
    model = LogisticRegression(2, 3)
    x, y = data(4, 2, 3)
    params = model.init(np.random.default_rng(0))
    with pytest.raises(error, match="logit_adjustment"):
        model.train(params, x, y, LocalTraining(), np.random.default_rng(0), np.empty_like(params),
                    logit_adjustment=adjustment)


# ---------------------------------------------------------------- training behaviour
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lr", "mlp"])
def test_training_reduces_the_loss_on_separable_data(backend, kind):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((80, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
    model = build(kind, 5, 2, backend)
    params = model.init(rng)
    delta, result = trained_delta(model, params, x, y, LocalTraining(epochs=10, lr=0.3), 1)
    after = model.evaluate(params + delta, x, y)
    assert after.loss < 0.5 * model.loss(params, x, y)
    assert after.accuracy >= 0.95
    assert result.steps == 80


@pytest.mark.parametrize("n, batch, steps", [(25, 10, 3), (25, 25, 1), (25, 100, 1), (7, 1, 7)])
def test_steps_count_the_smaller_last_batch(n, batch, steps):
    x, y = data(n, 3, 2)
    model = LogisticRegression(3, 2)
    _, result = trained_delta(model, model.init(None), x, y, LocalTraining(epochs=2, batch_size=batch), 0)
    assert result.steps == 2 * steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_mutated_and_may_be_read_only(backend):
    x, y = data(20, 4, 3)
    model = MLP(4, [3], 3, backend=backend)
    params = model.init(np.random.default_rng(0))
    copies = [a.copy() for a in (params, x, y)]
    for array in (params, x, y):
        array.flags.writeable = False
    delta, _ = trained_delta(model, params, x, y, LocalTraining(mu=0.1), 0)
    model.evaluate(params, x, y)
    for array, copy in zip((params, x, y), copies):
        np.testing.assert_array_equal(array, copy)
    assert np.abs(delta).max() > 0


# ---------------------------------------------------------------- the epochs' row orders
def shuffled(backend, seed, epochs, n):
    order = np.full((epochs, n), -1, np.int64)
    backends.kernels("models", backend).shuffle(np.uint64(seed), order)
    return order


@pytest.mark.parametrize("backend", COMPILED)
@given(seed=st.integers(0, 2**64 - 1), epochs=st.integers(0, 4), n=st.integers(0, 300))
def test_shuffle_gives_the_references_permutations(backend, seed, epochs, n):
    order = shuffled(backend, seed, epochs, n)
    np.testing.assert_array_equal(order, shuffled("reference", seed, epochs, n))
    for row in order:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))


def test_shuffle_is_fisher_yates_on_the_streams_words():
    """Worked by hand from the stream's words: i = n-1 .. 1 swaps i with (word * (i+1)) >> 32."""
    from fedkern._reference.random import random_bits
    seed, n = 99, 6
    words = np.empty(2 * n, np.uint32)
    random_bits(seed, 1, 0, words)           # stream 1 is epoch 1's
    row, used = list(range(n)), 0
    for i in range(n - 1, 0, -1):
        m = int(words[used]) * (i + 1)
        used += 1
        assert m & 0xFFFFFFFF >= (1 << 32) % (i + 1)   # no rejection on these words
        row[i], row[m >> 32] = row[m >> 32], row[i]
    np.testing.assert_array_equal(shuffled("reference", seed, 2, n)[1], row)


def test_the_bounded_draw_rejects_exactly_the_low_words():
    """Lemire's rule: for bound 3, 2**32 mod 3 = 1 low value is rejected (word 0 gives m = 0);
    the next word is then used."""
    from fedkern._reference.models import _below
    assert _below(3, iter([0, 2**31])) == 1           # 0 rejected, then (2**31 * 3) >> 32 = 1
    assert _below(3, iter([2**32 - 1])) == 2
    assert _below(4, iter([0])) == 0                  # a power of two rejects nothing
    assert _below(1, iter([12345])) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_permutation_of_four_is_equally_likely(backend):
    """A chi-square test of the 24 permutations over 24,000 epochs (fixed seed): the statistic
    of a uniform shuffle stays below the 1e-4 upper quantile of chi2(23), 59.7."""
    order = shuffled(backend, 2026, 24_000 if backend != "reference" else 4_800, 4)
    codes = order @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert counts.size == 24
    expected = order.shape[0] / 24
    assert ((counts - expected) ** 2 / expected).sum() < 59.7


def test_same_rng_same_delta_and_the_rng_drives_the_order():
    x, y = data(30, 4, 3)
    model = LogisticRegression(4, 3)
    params = model.init(None)
    a, _ = trained_delta(model, params, x, y, LocalTraining(batch_size=4, lr=0.1), 7)
    b, _ = trained_delta(model, params, x, y, LocalTraining(batch_size=4, lr=0.1), 7)
    c, _ = trained_delta(model, params, x, y, LocalTraining(batch_size=4, lr=0.1), 8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_trains_to_zero_delta_and_evaluates_to_nan(backend):
    model = LogisticRegression(3, 4, backend=backend)
    x, y = np.empty((0, 3), np.float32), np.empty(0, np.int32)
    params = model.init(None)
    delta = np.full_like(params, 5.0)
    result = model.train(params, x, y, LocalTraining(), np.random.default_rng(0), delta)
    assert result.steps == 0 and math.isnan(result.loss)
    assert not delta.any()
    evaluation = model.evaluate(params, x, y)
    assert evaluation.n == 0 and math.isnan(evaluation.loss) and math.isnan(evaluation.accuracy)
    assert np.isnan(evaluation.recall).all() and math.isnan(evaluation.balanced_accuracy)
    assert math.isnan(model.loss(params, x, y))


# ---------------------------------------------------------------- evaluation
@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_matches_numpy(backend):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 6)).astype(np.float32)
    y = rng.choice([0, 1, 3], 300).astype(np.int32)  # class 2 absent
    model = LogisticRegression(6, 4, backend=backend, init_scale=1.0)
    params = model.init(rng)
    logits = x.astype(np.float64) @ params[:24].reshape(6, 4).astype(np.float64) + params[24:]
    predicted = logits.argmax(axis=1)
    evaluation = model.evaluate(params, x, y)
    assert evaluation.n == 300
    assert evaluation.accuracy == np.mean(predicted == y)
    recall = [np.mean(predicted[y == k] == k) if np.any(y == k) else np.nan for k in range(4)]
    np.testing.assert_array_equal(evaluation.recall, recall)
    assert evaluation.balanced_accuracy == pytest.approx(np.nanmean(recall))
    assert evaluation.loss == pytest.approx(mean_cross_entropy(params.astype(np.float64), [6, 4], x, y))
    assert model.loss(params, x, y) == evaluation.loss


def test_balanced_accuracy_is_the_mean_recall_of_present_classes():
    evaluation = Evaluation(0.1, 0.5, np.array([1.0, np.nan, 0.5]), 4)
    assert evaluation.balanced_accuracy == 0.75


# ---------------------------------------------------------------- init and construction
def test_init_gives_fresh_float32_vectors():
    lr, mlp = LogisticRegression(5, 3, init_scale=0.1), MLP(5, [7], 3)
    for model in (lr, mlp):
        a, b = model.init(np.random.default_rng(1)), model.init(np.random.default_rng(1))
        assert a.dtype == np.float32 and a.shape == (model.n_params,) and a is not b
        np.testing.assert_array_equal(a, b)
    assert lr.n_params == 18 and mlp.n_params == 6 * 7 + 8 * 3
    assert not LogisticRegression(5, 3).init(None).any()


def test_mlp_init_bounds_and_zero_biases():
    model = MLP(30, [40], 10)
    params = model.init(np.random.default_rng(2))
    hidden, hidden_bias = params[:1200], params[1200:1240]
    output, output_bias = params[1240:1640], params[1640:]
    he, glorot = math.sqrt(6 / 30), math.sqrt(6 / 50)
    assert 0.9 * he < np.abs(hidden).max() <= he
    assert 0.9 * glorot < np.abs(output).max() <= glorot
    assert not hidden_bias.any() and not output_bias.any()


def test_built_ins_follow_the_model_protocol():
    assert isinstance(LogisticRegression(2, 2), Model)
    assert isinstance(MLP(2, [3], 2), Model)


def test_auto_takes_cython_then_numba():
    expected = next(name for name in ("cython", "numba", "reference") if backends.is_available(name, "models"))
    assert LogisticRegression(2, 2).backend == expected == MLP(2, [3], 2, backend="auto").backend
    assert repr(MLP(2, [3], 2)) == f"MLP(2, [3], 2, backend={expected!r})"


def test_auto_falls_back_to_numba_and_an_unbuilt_cython_raises(monkeypatch):
    """As on a machine without a C compiler: the Cython module does not import."""
    if not backends.is_available("numba", "models"):
        pytest.skip("the numba models kernels are not available")
    monkeypatch.setitem(backends._modules, ("cython", "models"), ImportError("fedkern._cython.models was not built"))
    assert LogisticRegression(2, 2).backend == "numba"
    with pytest.raises(BackendUnavailableError, match="cython"):
        LogisticRegression(2, 2, backend="cython")


def test_make_model_builds_by_name():
    model = make_model("mlp", 4, 3, hidden=[8], backend="reference")
    assert isinstance(model, MLP) and model.backend == "reference" and model.n_params == 67
    model = make_model("logistic_regression", 4, 3, init_scale=0.5)
    assert isinstance(model, LogisticRegression) and model.init_scale == 0.5


@pytest.mark.parametrize("name, params, match", [
    ("svm", {}, "logistic_regression"),
    ("logistic_regression", {"hidden": [3]}, "init_scale"),
    ("mlp", {}, "hidden"),
])
def test_make_model_errors_list_the_valid_choices(name, params, match):
    with pytest.raises(FedkernValueError, match=match):
        make_model(name, 4, 3, **params)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value, error", [
    ("epochs", 0, FedkernValueError), ("epochs", 1.5, FedkernTypeError), ("batch_size", 0, FedkernValueError),
    ("lr", 0.0, FedkernValueError), ("lr", math.inf, FedkernValueError), ("momentum", -0.1, FedkernValueError),
    ("weight_decay", math.nan, FedkernValueError), ("mu", -1.0, FedkernValueError), ("mu", "0", FedkernTypeError),
])
def test_bad_config_fields_are_named(field, value, error):
    with pytest.raises(error, match=field):
        LocalTraining(**{field: value})


@pytest.mark.parametrize("make, match", [
    (lambda: LogisticRegression(0, 2), "n_features"), (lambda: LogisticRegression(3, 1), "n_classes"),
    (lambda: LogisticRegression(3, 2, init_scale=-1.0), "init_scale"),
    (lambda: LogisticRegression(3, 2, backend="fortran"), "backend.*'auto', 'cython', 'numba', 'reference'"),
    (lambda: MLP(3, [2], 2, backend=None), "backend"),
    (lambda: MLP(3, [4, 0], 2), r"hidden\[1\]"), (lambda: MLP(3, 4, 2), "hidden"),
])
def test_bad_model_arguments(make, match):
    with pytest.raises((FedkernValueError, FedkernTypeError), match=match):
        make()


def bad_inputs():
    x, y = data(6, 3, 2)
    params, delta = np.zeros(8, np.float32), np.zeros(8, np.float32)
    read_only = delta.copy()
    read_only.flags.writeable = False
    cases = {
        "params": [(np.zeros(7, np.float32), FedkernValueError), (np.zeros(8), FedkernTypeError), ([0.0] * 8, FedkernTypeError)],
        "x": [(x[:, :2].copy(), FedkernValueError), (x.astype(np.float64), FedkernTypeError), (x[0], FedkernValueError),
              (np.asfortranarray(np.zeros((6, 3), np.float32)), FedkernValueError)],
        "y": [(y[:5], FedkernValueError), (y.astype(np.int64), FedkernTypeError), (np.full(6, 2, np.int32), FedkernValueError),
              (np.full(6, -1, np.int32), FedkernValueError)],
        "delta_out": [(np.zeros(9, np.float32), FedkernValueError), (np.zeros(8), FedkernTypeError),
                      (read_only, FedkernValueError)],
        "config": [({"lr": 0.1}, FedkernTypeError)],
        "rng": [(0, FedkernTypeError)],
    }
    good = dict(params=params, x=x, y=y, config=LocalTraining(), rng=np.random.default_rng(0), delta_out=delta)
    for name, values in cases.items():
        for value, error in values:
            yield pytest.param(name, {**good, name: value}, error, id=f"{name}-{len(str(value))}-{error.__name__}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, arguments, error", list(bad_inputs()))
def test_bad_train_inputs_raise_before_any_kernel(backend, name, arguments, error):
    model = LogisticRegression(3, 2, backend=backend)
    match = "y\\[0\\]" if name == "y" and isinstance(arguments["y"], np.ndarray) and arguments["y"].dtype == np.int32 \
        and arguments["y"].shape == (6,) else name
    with pytest.raises(error, match=match):
        model.train(**arguments)
    if name in ("params", "x", "y"):
        with pytest.raises(error, match=match):
            model.evaluate(arguments["params"], arguments["x"], arguments["y"])


@pytest.mark.parametrize("make", [lambda: LogisticRegression(5, 3), lambda: MLP(5, [4], 3)])
def test_models_pickle_and_train_the_same_after(make):
    import pickle

    model = make()
    copy = pickle.loads(pickle.dumps(model))
    assert copy.backend == model.backend and copy.n_params == model.n_params
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    y = rng.integers(0, 3, 20).astype(np.int32)
    params = model.init(np.random.default_rng(1))
    deltas = []
    for m in (model, copy):
        delta = np.empty(m.n_params, np.float32)
        m.train(params, x, y, LocalTraining(epochs=2), np.random.default_rng(2), delta)
        deltas.append(delta)
    assert np.array_equal(deltas[0], deltas[1])


# ---------------------------------------------------------------- the Cython kernel's exp
def cython_kernels():
    if not backends.is_available("cython", "models"):
        pytest.skip("the cython models kernels are not available")
    from fedkern._cython import models

    return models


def cython_exp(x):
    padded = np.concatenate([np.asarray(x, np.float64), np.zeros(-len(x) % 8)])
    out = np.empty_like(padded)
    cython_kernels()._exp(padded, out)
    return out[:len(x)]


def test_cython_exp_is_within_one_ulp_of_libm_down_to_underflow():
    """The softmax's own vectorised exp (inputs z - max z <= 0), against math.exp."""
    rng = np.random.default_rng(0)
    x = np.concatenate([-rng.uniform(0, 1, 20000) * 10.0 ** rng.uniform(-18, 2.85, 20000),
                        -rng.uniform(700, 746, 2000), -np.log(2) / 2 * np.array([1, 1 + 1e-15, 1 - 1e-15])])
    got = cython_exp(x)
    expected = np.array([math.exp(v) for v in x])
    normal = expected >= np.finfo(np.float64).tiny
    assert normal.sum() > 20000 and (~normal).sum() > 500
    assert np.all(np.abs(got[normal] - expected[normal]) <= np.spacing(expected[normal]))
    # subnormal results: within one step of the smallest subnormal (the last product rounds)
    assert np.all(np.abs(got[~normal] - expected[~normal]) <= 5e-324)


def test_cython_exp_special_values():
    x = np.array([0.0, -0.0, -1e-300, -5e-324, -745.2, -746.0, -1e300, -np.inf, np.nan])
    got = cython_exp(x)
    np.testing.assert_array_equal(got[:4], 1.0)
    np.testing.assert_array_equal(got[4:8], 0.0)
    assert np.isnan(got[8])


def test_cython_exp_checks_lengths():
    kernels = cython_kernels()
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels._exp(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="same length"):
        kernels._exp(np.zeros(8), np.zeros(16))


@pytest.mark.parametrize("backend", COMPILED)
def test_backends_agree_when_softmax_probabilities_underflow(backend):
    """Confident logits (gaps of thousands): exp(z - max z) is subnormal or 0 in most lanes."""
    x, y = data(30, 4, 12, seed=7)
    fast, slow = LogisticRegression(4, 12, backend=backend), LogisticRegression(4, 12, backend="reference")
    params = (400.0 * np.random.default_rng(7).standard_normal(fast.n_params)).astype(np.float32)
    config = LocalTraining(epochs=2, batch_size=7, lr=0.1, momentum=0.5)
    d_fast, r_fast = trained_delta(fast, params, x, y, config, 0)
    d_slow, r_slow = trained_delta(slow, params, x, y, config, 0)
    np.testing.assert_allclose(d_fast, d_slow, rtol=1e-5, atol=1e-6)
    assert r_fast.loss == pytest.approx(r_slow.loss, rel=1e-9)
    assert fast.evaluate(params, x, y).loss == pytest.approx(slow.evaluate(params, x, y).loss, rel=1e-12)
