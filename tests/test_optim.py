"""Server optimizers: every fast backend against the reference (exactly), the reference
against a textbook Reddi et al. (2021) Algorithm 2, thread-count independence, rejected
non-finite steps, state dtype and shape, no input mutation, and argument validation.

Tolerance of fast backends against the reference: **exact** (equal values, NaN where the
reference has NaN; ``-0.0 == 0.0``). This is not luck but follows from the contract:
each coordinate is computed from the same inputs by the same sequence of IEEE-754
binary64 operations (+, -, *, / and sqrt, each correctly rounded on every conforming
CPU), with the same association as the reference (e.g. ``lr * (c1 * m) / (sqrt(c2 * v) +
tau)``), then rounded once to the output dtype. float32 inputs widen to float64 exactly.
Nothing may change that sequence: setup.py passes ``-ffp-contract=off`` (no FMA) and no
``-ffast-math``, Numba kernels run without ``fastmath``. The branch-free
``a * v + (b - s * sign(v - g2)) * g2`` of the fast kernels equals the per-rule formula of
the reference exactly: ``1.0 * v`` is exact, and the coefficient of ``g2`` is an exact
``1``, ``1 - beta2`` or ``+-(1 - beta2)``, never a ``0 * g2`` term that an overflowed
``g2`` would turn into NaN (tested at the end with ``|delta| > sqrt(float64 max)``).
"""
import inspect
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fedkern
from fedkern._blocks import OPTIM_BLOCK

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
OPTIMIZERS = {cls.__name__: cls for cls in (fedkern.FedAvg, fedkern.FedAvgM, fedkern.FedAdagrad,
                                            fedkern.FedAdam, fedkern.FedYogi)}
ADAPTIVE = ("FedAdagrad", "FedAdam", "FedYogi")
STATEFUL = ("FedAvgM",) + ADAPTIVE
BLOCK = OPTIM_BLOCK  # prange in ext/optim.pyx hands out blocks of this many coordinates
SIZES = [1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]
STEPS = 5
#: Largest float64 delta magnitude the property tests draw: delta**2 may overflow.
HUGE64 = 1e300
#: Non-default settings, so that no hyperparameter is a neutral 0 or 1 by accident.
SETTINGS = {
    "FedAvg": dict(lr=0.7),
    "FedAvgM": dict(lr=0.3, momentum=0.8),
    "FedAdagrad": dict(lr=0.2, beta1=0.5, tau=1e-2, bias_correction=True),
    "FedAdam": dict(lr=0.05, beta1=0.8, beta2=0.9, tau=1e-3, bias_correction=True),
    "FedYogi": dict(lr=0.02, beta1=0.9, beta2=0.95, tau=1e-3, initial_v=0.5),
}


def bits(array):
    """The array's bit patterns, to compare results bit for bit (NaN payloads, -0.0)."""
    return array.view(np.uint32 if array.dtype == F32 else np.uint64)


def run(name, backend, params, deltas, **settings):
    """A copy of ``params`` after one step per delta, and the optimizer that took them."""
    opt = OPTIMIZERS[name](backend=backend, **settings)
    x = params.copy()
    with np.errstate(all="ignore"):  # the reference warns where values overflow; they are compared too
        for delta in deltas:
            assert opt.step(x, delta) is x
    return x, opt


def assert_same_result(actual, expected):
    """Same params, state and step count: exactly equal values (see the module docstring)."""
    (x, opt), (x_ref, ref) = actual, expected
    np.testing.assert_array_equal(x, x_ref, err_msg="params", strict=True)
    assert opt.state.keys() == ref.state.keys() == set(ref.state_names)
    for name, array in ref.state.items():
        np.testing.assert_array_equal(opt.state[name], array, err_msg=f"state[{name!r}]", strict=True)
        assert array.dtype == x.dtype
    assert opt.t == ref.t


def make_inputs(d, dtype, delta_dtype, seed, steps=STEPS):
    """Normal params and deltas whose coordinates span four decades, some exactly zero."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(d).astype(dtype)
    deltas = []
    for _ in range(steps):
        delta = rng.standard_normal(d) * 10.0 ** rng.uniform(-3, 1, d)
        delta[rng.random(d) < 0.05] = 0.0
        deltas.append(delta.astype(delta_dtype))
    return params, deltas


# ---------------------------------------------------------------------------------------
# Fast backends against the reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_reference_around_the_block_size(fast_backend, dtype, name, d):
    params, deltas = make_inputs(d, dtype, dtype, seed=d)
    assert_same_result(run(name, fast_backend, params, deltas, **SETTINGS[name]),
                       run(name, "reference", params, deltas, **SETTINGS[name]))


@dataclass(frozen=True)
class Case:
    d: int
    seed: int
    other_dtype: bool  # deltas of the other float dtype than params (float64 deltas for float32 params...)
    values: str        # "normal", "wide", "tiny", "huge", "zeros" or "ties"; see make_case


@dataclass(frozen=True)
class Hyper:
    lr: float = 0.1
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False
    initial_v: float | None = None

    def settings(self, name, tie_v=None):
        """The keyword arguments of optimizer ``name``; ``tie_v`` overrides initial_v."""
        if name == "FedAvg":
            return dict(lr=self.lr)
        if name == "FedAvgM":
            return dict(lr=self.lr, momentum=self.momentum)
        settings = dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
                        bias_correction=self.bias_correction,
                        initial_v=self.initial_v if tie_v is None else tie_v)
        if name == "FedAdagrad":
            del settings["beta2"]
        return settings


def make_case(case, dtype):
    """params, STEPS deltas, and the initial_v for which ``v == delta**2`` somewhere (or None).

    "wide": per-coordinate magnitudes over most of each dtype's range (subnormal to huge);
    "tiny": small multiples of the smallest subnormal; "huge": near each dtype's largest
    value (float64 deltas: HUGE64), so float32 state and params overflow to inf;
    "zeros": zero deltas and v = 0 (a tie at 0); "ties": every other coordinate of every
    delta is +-c with v starting at c**2, exact in float32 (c has 11 significant bits).
    """
    rng = np.random.default_rng(case.seed)
    delta_dtype = ({F32: F64, F64: F32}[dtype]) if case.other_dtype else dtype
    d, tie_v = case.d, None

    def spread(lo, hi):
        return rng.uniform(-1.0, 1.0, d) * 10.0 ** rng.uniform(lo, hi, d)

    if case.values == "wide":
        params = spread(*{F32: (-45, 38), F64: (-320, 300)}[dtype])
        deltas = [spread(*{F32: (-45, 38), F64: (-320, np.log10(HUGE64))}[delta_dtype]) for _ in range(STEPS)]
    elif case.values == "tiny":
        params = rng.integers(-1000, 1000, d) * float(np.finfo(dtype).smallest_subnormal)
        deltas = [rng.integers(-1000, 1000, d) * float(np.finfo(delta_dtype).smallest_subnormal) for _ in range(STEPS)]
    elif case.values == "huge":
        top = {F32: float(np.finfo(F32).max), F64: HUGE64}
        params = rng.uniform(-1.0, 1.0, d) * {F32: top[F32], F64: 1e300}[dtype]
        deltas = [rng.uniform(-1.0, 1.0, d) * top[delta_dtype] for _ in range(STEPS)]
    elif case.values == "zeros":
        params, deltas, tie_v = rng.standard_normal(d), [np.zeros(d)] * STEPS, 0.0
    else:
        params = rng.standard_normal(d)
        deltas = [rng.standard_normal(d) * 10.0 ** rng.uniform(-3, 1, d) for _ in range(STEPS)]
        if case.values == "ties":
            c = float(rng.integers(1, 2048)) * 2.0 ** int(rng.integers(-30, 10))
            tie_v = c * c
            for delta in deltas:
                delta[::2] = c * rng.choice([-1.0, 1.0], delta[::2].shape)
    return params.astype(dtype), [delta.astype(delta_dtype) for delta in deltas], tie_v


UNIT = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999999]), st.floats(0.0, 1.0, exclude_max=True))
CASES = st.builds(
    Case,
    d=st.one_of(st.integers(1, 40), st.sampled_from(SIZES + [2 * BLOCK, 2 * BLOCK + 1])),
    seed=st.integers(0, 2**32 - 1),
    other_dtype=st.booleans(),
    values=st.sampled_from(["normal", "wide", "tiny", "huge", "zeros", "ties"]),
)
HYPERS = st.builds(
    Hyper,
    lr=st.one_of(st.sampled_from([1e-6, 1.0, 1e3]), st.floats(1e-6, 1e3)),
    momentum=UNIT,
    beta1=UNIT,
    beta2=UNIT,
    tau=st.one_of(st.sampled_from([1e-12, 1e-3, 1.0]), st.floats(1e-12, 10.0)),
    bias_correction=st.booleans(),
    initial_v=st.one_of(st.none(), st.just(0.0), st.floats(0.0, 1e6)),
)


@pytest.mark.parametrize("name", OPTIMIZERS)
@given(case=CASES, hyper=HYPERS)
@example(case=Case(1, 0, False, "ties"), hyper=Hyper(beta2=0.5))
@example(case=Case(BLOCK + 1, 1, False, "ties"), hyper=Hyper(bias_correction=True))
@example(case=Case(3 * BLOCK + 5, 2, True, "wide"), hyper=Hyper(lr=1e3, tau=1e-12))
@example(case=Case(BLOCK - 1, 3, True, "huge"), hyper=Hyper(beta1=0.0, beta2=0.0, initial_v=0.0))
@example(case=Case(BLOCK, 4, False, "huge"), hyper=Hyper())
@example(case=Case(7, 5, False, "tiny"), hyper=Hyper(tau=1e-12, initial_v=0.0))
@example(case=Case(BLOCK, 6, True, "zeros"), hyper=Hyper(beta1=0.0, beta2=0.0, bias_correction=True))
@example(case=Case(40, 7, True, "normal"),
         hyper=Hyper(momentum=0.999999, beta1=0.999999, beta2=0.999999, bias_correction=True))
def test_matches_reference(fast_backend, dtype, name, case, hyper):
    params, deltas, tie_v = make_case(case, dtype)
    settings = hyper.settings(name, tie_v)
    assert_same_result(run(name, fast_backend, params, deltas, **settings),
                       run(name, "reference", params, deltas, **settings))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_results_do_not_depend_on_the_thread_count(fast_backend, dtype, name):
    params, deltas = make_inputs(8 * BLOCK + 3, dtype, dtype, seed=5)
    results = []
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        results.append(run(name, fast_backend, params, deltas, **SETTINGS[name]))
    (x1, opt1), (x2, opt2) = results
    assert np.array_equal(bits(x1), bits(x2))
    for key in opt1.state:
        assert np.array_equal(bits(opt1.state[key]), bits(opt2.state[key])), key


# ---------------------------------------------------------------------------------------
# The reference against the paper's formulas
# ---------------------------------------------------------------------------------------

def textbook_adaptive(name, x, deltas, lr, beta1, beta2, tau, bias_correction, v0):
    """Reddi et al. (2021), Algorithm 2, in float64; returns x, m, v and sum_t |step_t|."""
    x = np.array(x, F64)
    m, v, moved = np.zeros_like(x), np.full_like(x, v0), np.zeros_like(x)
    for t, delta in enumerate(deltas, start=1):
        g = np.asarray(delta, F64)
        m = beta1 * m + (1 - beta1) * g
        if name == "FedAdagrad":
            v = v + g**2
        elif name == "FedAdam":
            v = beta2 * v + (1 - beta2) * g**2
        else:
            v = v - (1 - beta2) * g**2 * np.sign(v - g**2)
        c1 = 1 / (1 - beta1**t) if bias_correction else 1.0
        c2 = 1 / (1 - beta2**t) if bias_correction and name != "FedAdagrad" else 1.0
        step = lr * c1 * m / (np.sqrt(c2 * v) + tau)
        x, moved = x + step, moved + np.abs(step)
    return x, m, v, moved


#: The documented defaults, written down here so that the paper tests check them too.
DEFAULTS = {
    "FedAvg": dict(lr=1.0),
    "FedAvgM": dict(lr=1.0, momentum=0.9),
    "FedAdagrad": dict(lr=0.1, beta1=0.0, beta2=0.0, tau=1e-3, bias_correction=False, initial_v=None),
    "FedAdam": dict(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=False, initial_v=None),
    "FedYogi": dict(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=False, initial_v=None),
}


def textbook(name, x, deltas, settings):
    """Each optimizer's formula in float64: x, its state (by name) and sum_t |step_t|."""
    s = {**DEFAULTS[name], **settings}
    x0, x = x, np.array(x, F64)
    if name == "FedAvg":
        steps = [s["lr"] * np.asarray(delta, F64) for delta in deltas]
        return x + sum(steps), {}, sum(np.abs(step) for step in steps)
    if name == "FedAvgM":
        m, moved = np.zeros_like(x), np.zeros_like(x)
        for delta in deltas:
            m = s["momentum"] * m + np.asarray(delta, F64)
            x, moved = x + s["lr"] * m, moved + np.abs(s["lr"] * m)
        return x, {"momentum": m}, moved
    v0 = s["tau"] ** 2 if s["initial_v"] is None else s["initial_v"]
    v0 = float(np.asarray(v0, np.asarray(x0).dtype))  # v starts as a state array of params' dtype
    x, m, v, moved = textbook_adaptive(name, x, deltas, s["lr"], s["beta1"], s["beta2"], s["tau"],
                                       s["bias_correction"], v0)
    return x, {"m": m, "v": v}, moved


PAPER_SETTINGS = {  # the paper's (and fedkern's) defaults, and a second set far from them
    "defaults": {},
    "other": dict(lr=0.5, beta1=0.5, beta2=0.7, tau=0.1, initial_v=0.25, momentum=0.5),
}


PAPER_CASES = [(name, which, bias_correction) for name in OPTIMIZERS for which in PAPER_SETTINGS
               for bias_correction in ((False, True) if name in ADAPTIVE else (False,))]


@pytest.mark.parametrize("name, which, bias_correction", PAPER_CASES,
                         ids=[f"{n}-{w}{'-bias-corrected' * b}" for n, w, b in PAPER_CASES])
def test_follows_the_paper_in_float64(any_backend, name, which, bias_correction):
    """Six float64 steps against the formulas, written independently of the kernels.

    The textbook code need not round in the reference's order (``lr * c1 * m`` is not
    ``lr * (c1 * m)``), so each coordinate may differ by a few float64 ulps of the
    distance it moved; 1e-13 of that is still far below any formula mistake.
    """
    takes = inspect.signature(OPTIMIZERS[name]).parameters
    settings = {k: v for k, v in PAPER_SETTINGS[which].items() if k in takes}
    if name in ADAPTIVE:
        settings["bias_correction"] = bias_correction
    params, deltas = make_inputs(300, F64, F64, seed=11, steps=6)
    x, opt = run(name, any_backend, params, deltas, **settings)
    expected_x, expected_state, moved = textbook(name, params, deltas, settings)
    assert np.all(np.abs(x - expected_x) <= 1e-13 * (np.abs(params) + moved)), "params"
    assert opt.state.keys() == expected_state.keys()
    for key, expected in expected_state.items():
        np.testing.assert_allclose(opt.state[key], expected, rtol=1e-13, atol=1e-13 * np.abs(deltas).max(), err_msg=key)


@pytest.mark.parametrize("delta_dtype", [F32, F64], ids=["float32-delta", "float64-delta"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_step_is_computed_in_float64_and_rounded_once(any_backend, name, delta_dtype):
    """One step on float32 params is the float64 formula rounded to float32, to 1 float32 ulp
    (1 ulp rather than 0: the textbook's float64 order may round differently just below a
    float32 rounding boundary)."""
    params, deltas = make_inputs(5000, F32, delta_dtype, seed=12, steps=1)
    x, opt = run(name, any_backend, params, deltas, **SETTINGS[name])
    expected_x, expected_state, _ = textbook(name, params, deltas, SETTINGS[name])
    pairs = [("params", x, expected_x)] + [(key, opt.state[key], e) for key, e in expected_state.items()]
    for label, actual, expected in pairs:
        assert actual.dtype == F32
        rounded = expected.astype(F32)
        assert np.all(np.abs(actual.astype(F64) - rounded) <= np.spacing(np.abs(rounded)).astype(F64)), label


@pytest.mark.parametrize("name", ADAPTIVE)
def test_initial_v_defaults_to_tau_squared(any_backend, name):
    opt = OPTIMIZERS[name](tau=0.05, backend=any_backend)
    assert opt.initial_v == 0.05**2
    opt.step(np.zeros(3), np.zeros(3))
    expected_v = 0.05**2 * (0.99 if name == "FedAdam" else 1.0)  # Yogi: sign(v - 0) = 1, times 0
    np.testing.assert_array_equal(opt.state["v"], np.full(3, expected_v))
    np.testing.assert_array_equal(opt.state["m"], np.zeros(3))


def test_yogi_leaves_v_where_it_equals_delta_squared(any_backend, dtype):
    opt = fedkern.FedYogi(lr=1.0, beta1=0.0, beta2=0.5, tau=0.25, initial_v=0.25, backend=any_backend)
    params = np.zeros(4, dtype)
    opt.step(params, np.array([0.5, -0.5, 1.0, 0.0], dtype))
    # sign(v - delta^2) = 0, 0, -1 (v grows by (1 - beta2) * 1), +1 (shrinks by 0)
    np.testing.assert_array_equal(opt.state["v"], np.array([0.25, 0.25, 0.75, 0.25], dtype))
    np.testing.assert_array_equal(params, np.array([0.5 / 0.75, -0.5 / 0.75, 1.0 / (np.sqrt(0.75) + 0.25), 0.0], dtype))


def test_fedavg_with_lr_one_lands_on_the_clients_mean(any_backend, dtype):
    global_model = np.arange(6, dtype=dtype)
    clients = [global_model + np.full(6, shift, dtype) for shift in (1.0, 2.0, 6.0)]
    delta = fedkern.weighted_mean([c - global_model for c in clients], backend=any_backend)
    fedkern.FedAvg(backend=any_backend).step(global_model, delta)
    np.testing.assert_array_equal(global_model, np.mean(clients, axis=0).astype(dtype))


# ---------------------------------------------------------------------------------------
# Rejected steps, state, inputs
# ---------------------------------------------------------------------------------------

def snapshot(params, opt):
    return bits(params).copy(), {k: bits(v).copy() for k, v in opt.state.items()}, opt.t


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("good_steps", [0, 3], ids=["first-step", "after-3-steps"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_delta_is_rejected_before_anything_changes(any_backend, dtype, name, good_steps, bad):
    params, deltas = make_inputs(BLOCK + 1, dtype, dtype, seed=13, steps=good_steps + 1)
    start = params.copy()
    opt = OPTIMIZERS[name](backend=any_backend, **SETTINGS[name])
    for delta in deltas[:good_steps]:
        opt.step(params, delta)
    before = snapshot(params, opt)
    poisoned = deltas[-1].copy()
    poisoned[BLOCK] = bad  # in the last, one-coordinate block
    with pytest.raises(fedkern.NonFiniteError, match=rf"{name}\.step: delta .*index {BLOCK}") as info:
        opt.step(params, poisoned)
    assert info.value.position == BLOCK
    after = snapshot(params, opt)
    assert np.array_equal(after[0], before[0]) and after[2] == before[2] == good_steps
    assert after[1].keys() == before[1].keys()  # on the first step: still no state
    assert all(np.array_equal(after[1][k], before[1][k]) for k in before[1])
    # the rejected step left no trace: the next good step is the one it would have been
    opt.step(params, deltas[-1])
    expected, _ = run(name, any_backend, start, deltas, **SETTINGS[name])
    assert np.array_equal(bits(params), bits(expected))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_check_finite_false_takes_the_step(any_backend, name):
    params, (delta,) = make_inputs(10, F64, F64, seed=14, steps=1)
    delta[3] = np.nan
    opt = OPTIMIZERS[name](check_finite=False, backend=any_backend)
    with np.errstate(invalid="ignore"):
        opt.step(params, delta)
    assert opt.t == 1 and np.isnan(params[3]) and np.isfinite(np.delete(params, 3)).all()


@pytest.mark.parametrize("delta_dtype", [F32, F64], ids=["float32-delta", "float64-delta"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_has_the_dtype_and_shape_of_params(any_backend, dtype, name, delta_dtype):
    params, deltas = make_inputs(9, dtype, delta_dtype, seed=15, steps=2)
    x, opt = run(name, any_backend, params, deltas, **SETTINGS[name])
    assert x.dtype == dtype and opt.t == 2
    assert set(opt.state) == set(opt.state_names) == ({"momentum"} if name == "FedAvgM" else
                                                      {"m", "v"} if name in ADAPTIVE else set())
    for array in opt.state.values():
        assert array.dtype == dtype and array.shape == (9,) and array.flags.c_contiguous


@pytest.mark.parametrize("name", STATEFUL)
def test_params_of_another_shape_or_dtype_need_reset(any_backend, name):
    opt = OPTIMIZERS[name](backend=any_backend)
    params = np.zeros(5, np.float32)
    opt.step(params, np.ones(5, np.float32))
    before = snapshot(params, opt)
    for other in (np.zeros(6, np.float32), np.zeros(5, np.float64)):
        with pytest.raises(fedkern.FedkernValueError, match=r"call reset\(\)"):
            opt.step(other, np.ones(other.shape[0], other.dtype))
        assert not other.any()
    after = snapshot(params, opt)
    assert after[2] == before[2] == 1 and all(np.array_equal(after[1][k], before[1][k]) for k in before[1])
    opt.reset()
    assert opt.state == {} and opt.t == 0
    other = np.zeros(6, np.float64)
    opt.step(other, np.ones(6))
    assert opt.t == 1 and all(a.shape == (6,) and a.dtype == F64 for a in opt.state.values())
    fresh = OPTIMIZERS[name](backend=any_backend)
    np.testing.assert_array_equal(other, fresh.step(np.zeros(6), np.ones(6)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_delta_is_only_read_and_params_are_updated_in_place(any_backend, dtype, name):
    params, deltas = make_inputs(BLOCK + 1, dtype, dtype, seed=16, steps=2)
    originals = [delta.copy() for delta in deltas]
    for delta in deltas:
        delta.flags.writeable = False  # e.g. Ray's zero-copy arrays
    x = params.copy()
    opt = OPTIMIZERS[name](backend=any_backend, **SETTINGS[name])
    for delta in deltas:
        assert opt.step(x, delta) is x
    for delta, original in zip(deltas, originals):
        assert np.array_equal(bits(delta), bits(original))
    assert not np.array_equal(x, params)
    np.testing.assert_array_equal(x, run(name, "reference", params, originals, **SETTINGS[name])[0])


def test_read_only_params_are_rejected(any_backend):
    params = np.zeros(3)
    params.flags.writeable = False
    for name, cls in OPTIMIZERS.items():
        opt = cls(backend=any_backend)
        with pytest.raises(fedkern.FedkernValueError, match=r"params is read-only"):
            opt.step(params, np.ones(3))
        assert opt.t == 0 and opt.state == {}, name


BAD_STEPS = [  # (params, delta, error, words the message must hold)
    ([0.0, 0.0], np.ones(2), fedkern.FedkernTypeError, "params must be a numpy array"),
    (np.zeros(2), [1.0, 1.0], fedkern.FedkernTypeError, "delta must be a numpy array"),
    (np.zeros(2), np.ones(3), fedkern.FedkernValueError, "delta has length 3; expected 2"),
    (np.zeros((2, 2)), np.ones(4), fedkern.FedkernValueError, "params must be 1-D"),
    (np.zeros(2), np.ones((1, 2)), fedkern.FedkernValueError, "delta must be 1-D"),
    (np.zeros(0), np.ones(0), fedkern.FedkernValueError, "params is empty"),
    (np.zeros(2, np.float16), np.ones(2), fedkern.FedkernTypeError, "params has dtype float16"),
    (np.zeros(2), np.ones(2, np.int64), fedkern.FedkernTypeError, "delta has dtype int64"),
    (np.zeros(2), np.ones(4)[::2], fedkern.FedkernValueError, "delta is not C-contiguous"),
]


@pytest.mark.parametrize("params, delta, error, words", BAD_STEPS, ids=[case[3] for case in BAD_STEPS])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_step_arguments_raise_and_change_nothing(name, params, delta, error, words):
    opt = OPTIMIZERS[name]()
    with pytest.raises(error, match=words):
        opt.step(params, delta)
    assert opt.t == 0 and opt.state == {}


# ---------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------

ARGUMENTS = {  # every argument each constructor documents, in signature order
    "FedAvg": ["lr", "check_finite", "backend"],
    "FedAvgM": ["lr", "momentum", "check_finite", "backend"],
    "FedAdagrad": ["lr", "beta1", "tau", "bias_correction", "initial_v", "check_finite", "backend"],
    "FedAdam": ["lr", "beta1", "beta2", "tau", "bias_correction", "initial_v", "check_finite", "backend"],
    "FedYogi": ["lr", "beta1", "beta2", "tau", "bias_correction", "initial_v", "check_finite", "backend"],
}
GOOD_VALUES = dict(lr=0.25, momentum=0.5, beta1=0.5, beta2=0.75, tau=0.125, bias_correction=True,
                   initial_v=2.0, check_finite=False, backend="reference")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_constructor_takes_every_documented_argument_by_keyword(name):
    cls = OPTIMIZERS[name]
    named = [p.name for p in inspect.signature(cls).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert named == ARGUMENTS[name]
    opt = cls(**{arg: GOOD_VALUES[arg] for arg in ARGUMENTS[name]})
    for arg in ARGUMENTS[name]:
        assert getattr(opt, arg) == GOOD_VALUES[arg], arg
    assert repr(opt).startswith(f"{name}(lr=0.25")


def test_fedadagrad_rejects_beta2_saying_why():
    with pytest.raises(fedkern.FedkernTypeError, match=r"FedAdagrad has no argument 'beta2' \(its second "
                                                         r"moment is a running sum") as info:
        fedkern.FedAdagrad(lr=0.1, beta2=0.9)
    assert isinstance(info.value, TypeError)
    assert "it accepts lr, beta1, tau, bias_correction, initial_v, check_finite, backend" in str(info.value)


@pytest.mark.parametrize("name, argument, hint", [
    ("FedAvg", "momentum", "server momentum is FedAvgM"),
    ("FedAdam", "beta", ""),
    ("FedYogi", "eps", ""),
    ("FedAvgM", "beta1", ""),
    ("FedAdagrad", "options", ""),
    ("FedAdam", "unknown", ""),
])
def test_unknown_keyword_is_named_with_the_accepted_ones(name, argument, hint):
    with pytest.raises(fedkern.FedkernTypeError) as info:
        OPTIMIZERS[name](**{argument: 0.9})
    message = str(info.value)
    assert message.startswith(f"{name} has no argument {argument!r}")
    assert hint in message
    assert message.endswith("it accepts " + ", ".join(ARGUMENTS[name]))


def test_positional_arguments_follow_the_signature():
    opt = fedkern.FedAdagrad(0.5, 0.25, 0.125)
    assert (opt.lr, opt.beta1, opt.tau) == (0.5, 0.25, 0.125)
    opt = fedkern.FedYogi(0.5, 0.25, 0.75, 0.125)
    assert (opt.lr, opt.beta1, opt.beta2, opt.tau) == (0.5, 0.25, 0.75, 0.125)
    with pytest.raises(TypeError):  # only the hyperparameters are positional
        fedkern.FedAvg(1.0, True)


BAD_ARGUMENTS = [  # (argument, value, error)
    *[("lr", v, fedkern.FedkernValueError) for v in (0.0, -0.1, np.nan, np.inf)],
    *[("lr", v, fedkern.FedkernTypeError) for v in ("0.1", None, True, [0.1], 1j)],
    *[(arg, v, fedkern.FedkernValueError) for arg in ("beta1", "beta2", "momentum") for v in (-0.1, 1.0, 1.5, np.nan)],
    *[(arg, v, fedkern.FedkernTypeError) for arg in ("beta1", "beta2", "momentum") for v in ("0.9", None, False)],
    *[("tau", v, fedkern.FedkernValueError) for v in (0.0, -1e-3, np.inf, np.nan)],
    *[("tau", v, fedkern.FedkernTypeError) for v in ("1e-3", np.array([1e-3]))],
    *[("initial_v", v, fedkern.FedkernValueError) for v in (-1.0, np.inf, np.nan)],
    *[("initial_v", v, fedkern.FedkernTypeError) for v in ("0", True)],
    *[(arg, v, fedkern.FedkernTypeError) for arg in ("bias_correction", "check_finite") for v in (1, "yes", None)],
    ("backend", "cyton", fedkern.FedkernValueError),
    ("backend", "Numba", fedkern.FedkernValueError),
    ("backend", 3, fedkern.FedkernTypeError),
]


@pytest.mark.parametrize("argument, value, error", BAD_ARGUMENTS,
                         ids=[f"{a}={v!r}" for a, v, _ in BAD_ARGUMENTS])
def test_bad_argument_is_rejected_by_name(argument, value, error):
    takers = [name for name, args in ARGUMENTS.items() if argument in args]
    assert takers
    for name in takers:
        with pytest.raises(error, match=rf"\b{argument}\b") as info:
            OPTIMIZERS[name](**{argument: value})
        if argument == "backend" and error is fedkern.FedkernValueError:
            assert "choose one of 'reference', 'cython', 'numba', 'auto'" in str(info.value)


@pytest.mark.parametrize("argument, value", [
    ("lr", 1), ("lr", np.float32(0.5)), ("lr", np.int64(2)), ("lr", 1e-300),
    ("beta1", 0.0), ("beta2", 0.0), ("momentum", 0.0), ("beta1", 0.999999),
    ("tau", 1e-300), ("initial_v", 0.0), ("initial_v", 5), ("bias_correction", np.bool_(True)),
    ("check_finite", np.bool_(False)), ("backend", "auto"), ("backend", None),
])
def test_edge_arguments_are_accepted(argument, value):
    for name, args in ARGUMENTS.items():
        if argument in args:
            opt = OPTIMIZERS[name](**{argument: value})
            assert getattr(opt, argument) == value, name


# ---------------------------------------------------------------------------------------
# delta**2 overflows float64: the fast kernels must still agree with the reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_step_where_delta_squared_overflows(fast_backend, name):
    params = np.zeros(4)
    # the second, ordinary step shows the damage persists: the reference keeps v = inf there
    deltas = [np.array([1e200, -1e160, 1.0, 0.0]), np.ones(4)]
    assert_same_result(run(name, fast_backend, params, deltas), run(name, "reference", params, deltas))
