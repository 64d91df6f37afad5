"""The privacy family: the normal stream against libm, its statistics, the clipped sum
against its formula, DP-FedAvg's building blocks and adaptive clipping.

Parity of every backend with the reference (bit for bit for the noise), out=/dtype=,
thread counts and bad input reaching no kernel are the registry's tests
(tests/test_registry.py); this file checks what the registry cannot: that the reference
itself is right.
"""
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fedkern
from fedkern import backends, privacy
from fedkern._reference import privacy as reference
from fedkern._reference._philox import blocks
from conftest import ALL_BACKENDS, FAST_BACKENDS


def libm_normals(seed: int, stream: int, count: int) -> np.ndarray:
    """The stream's definition evaluated with math.log, math.cos and math.sin."""
    out = []
    for w0, w1, w2, w3 in blocks(seed, stream, 0, (count + 1) // 2).astype(np.uint64).tolist():
        k1 = (w1 << 20) | (w0 >> 12)
        k2 = (w3 << 20) | (w2 >> 12)
        r = math.sqrt(-2.0 * math.log((2**52 - k1) * 2.0**-52))
        theta = 2.0 * math.pi * k2 * 2.0**-52
        out += [r * math.cos(theta), r * math.sin(theta)]
    return np.array(out[:count])


def noise(n: int, seed: int = 1, stream: int = 0, backend: str = "reference") -> np.ndarray:
    return privacy.add_gaussian_noise(np.zeros(n), 1.0, seed, stream=stream, backend=backend)


# --------------------------------------------------------------------------- the normal stream
@pytest.mark.parametrize("seed, stream", [(0, 0), (1, 0), (2**64 - 1, 2**64 - 1), (12345, 7)])
def test_normals_are_box_muller_to_double_precision(seed, stream):
    # the kernels' own log, sin and cos against libm's: differences are rounding only
    z = noise(4001, seed, stream)
    assert np.allclose(z, libm_normals(seed, stream, 4001), rtol=0, atol=1e-13)


def test_the_radius_covers_both_ends():
    # k1 = 0 gives log 1 = 0 and k1 = 2**52 - 1 the largest radius: both finite and exact
    assert reference._log_scaled(np.array([2**52], np.uint64))[0] == 0.0
    smallest = reference._log_scaled(np.array([1], np.uint64))[0]
    assert smallest == pytest.approx(-52 * math.log(2), rel=1e-15)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 2**40), n=st.integers(1, 70), stream=st.integers(0, 2**64 - 1))
def test_a_slice_of_the_stream_is_the_stream_sliced(backend, start, n, stream):
    # any coordinate range is drawn on its own with the same bits: what lets threads and
    # workers split a vector anywhere
    module = backends.kernels("privacy", backend)
    whole = np.zeros(n + 3)
    module.gaussian_noise(np.zeros(n + 3), 1.0, 9, stream, start, whole)
    part = np.empty(n)
    module.gaussian_noise(np.zeros(n), 1.0, 9, stream, start + 3, part)
    assert np.array_equal(part, whole[3:])


def test_normal_moments_and_kolmogorov_smirnov():
    stats = pytest.importorskip("scipy.stats")
    z = noise(1_000_000, seed=2024)
    n = z.size
    # bounds of about 5 standard errors: any correct generator meets them for this seed
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # the two normals of a pair are independent: their correlation is noise
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / math.sqrt(n / 2)


def test_streams_and_seeds_are_independent():
    a, b, c = noise(100_000, 1, 0), noise(100_000, 1, 1), noise(100_000, 2, 0)
    for x, y in [(a, b), (a, c), (b, c)]:
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(100_000)


# --------------------------------------------------------------------------- add_gaussian_noise
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noise_is_added_in_float64_and_rounded_once(backend):
    x = np.linspace(-3, 3, 1001).astype(np.float32)
    y = privacy.add_gaussian_noise(x, 0.25, 5, backend=backend)
    z = noise(1001, seed=5)
    assert y.dtype == np.float32
    assert np.array_equal(y, (x.astype(np.float64) + 0.25 * z).astype(np.float32))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float32_noise_makes_no_float64_copy(backend):
    x = np.zeros(1_000_000, np.float32)
    out = np.empty_like(x)
    privacy.add_gaussian_noise(x, 1.0, 3, out=out, backend=backend)   # compile, load
    tracemalloc.start()
    privacy.add_gaussian_noise(x, 1.0, 3, out=out, backend=backend)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < x.nbytes // 4        # a float64 temporary would be 8 MB


def test_noise_in_place_and_zero_std():
    x = np.arange(5.0)
    assert np.array_equal(privacy.add_gaussian_noise(x, 0.0, 1), x)
    y = x.copy()
    assert privacy.add_gaussian_noise(y, 1.0, 1, out=y) is y
    assert np.array_equal(y, privacy.add_gaussian_noise(x, 1.0, 1))
    assert np.array_equal(x, np.arange(5.0))          # the input is never touched


def test_a_generator_seed_draws_64_bits_of_it():
    a = privacy.add_gaussian_noise(np.zeros(10), 1.0, np.random.default_rng(4))
    seed = int(np.random.default_rng(4).integers(0, 2**64, dtype=np.uint64))
    assert np.array_equal(a, privacy.add_gaussian_noise(np.zeros(10), 1.0, seed))


@pytest.mark.parametrize("bad, error", [
    (dict(std=-1.0), fedkern.FedkernValueError),
    (dict(std=math.nan), fedkern.FedkernValueError),
    (dict(seed=-1), fedkern.FedkernValueError),
    (dict(seed=2**64), fedkern.FedkernValueError),
    (dict(seed=1.5), fedkern.FedkernTypeError),
    (dict(stream=-1), fedkern.FedkernValueError),
])
def test_noise_bad_arguments(bad, error):
    kwargs = dict(std=1.0, seed=0) | bad
    with pytest.raises(error, match=next(iter(bad))):
        privacy.add_gaussian_noise(np.zeros(3), kwargs.pop("std"), kwargs.pop("seed"), **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noise_never_hides_a_nan(backend):
    x = np.zeros(10, np.float32)
    x[4] = np.nan
    with pytest.raises(fedkern.NonFiniteError, match="index 4"):
        privacy.add_gaussian_noise(x, 1.0, 0, backend=backend)


# --------------------------------------------------------------------------- clip_and_accumulate
def clipped_sum(rows: np.ndarray, clip: float, weights: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    scales = np.where(norms > clip, clip / np.where(norms > 0, norms, 1), 1.0)
    return (weights * scales) @ rows.astype(np.float64)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 9), d=st.integers(1, 300), clip=st.floats(1e-3, 1e3), zero_row=st.booleans(),
       seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_clip_and_accumulate_is_the_clipped_weighted_sum(backend, k, d, clip, zero_row, seed, dtype):
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((k, d)) * rng.lognormal(0, 2, (k, 1))).astype(dtype)
    if zero_row:
        rows[0] = 0.0
    weights = rng.random(k)
    total, norms, unclipped = privacy.clip_and_accumulate(rows, clip, weights, dtype=np.float64,
                                                          return_stats=True, backend=backend)
    expected_norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert np.allclose(norms, expected_norms, rtol=1e-12, atol=0)
    assert unclipped == int(np.sum(norms <= clip))
    scale = np.abs(rows).max() * max(1.0, weights.sum())
    assert np.allclose(total, clipped_sum(rows, clip, weights), rtol=0, atol=1e-12 * scale * k)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_clip_and_accumulate_in_groups_overwrites_out_and_keeps_the_bits(backend, monkeypatch):
    """Rows in groups (norms, then the sum, a group at a time): the first group zeroes out,
    whatever it held, and the sums are those of one group of all the rows, bit for bit."""
    from fedkern import _tuning

    rng = np.random.default_rng(5)
    k, d = 20, 70_000                 # several chunks of any L2's sum_chunk
    rows = rng.standard_normal((k, d)) * rng.lognormal(0, 1, (k, 1))
    weights = rng.random(k)
    monkeypatch.setattr(_tuning, "group_bytes", lambda: 1 << 40)                  # one group, whatever the L3
    assert _tuning.clip_group(k, d, rows.itemsize) >= k
    whole = privacy.clip_and_accumulate(rows, 50.0, weights, backend=backend)
    monkeypatch.setattr(_tuning, "group_bytes", lambda: 8 * d * rows.itemsize)   # groups of 8, 8, 4 rows
    assert _tuning.clip_group(k, d, rows.itemsize) == 8
    out = np.full(d, np.nan)
    assert privacy.clip_and_accumulate(rows, 50.0, weights, out=out, backend=backend) is out
    assert np.array_equal(out, whole)
    np.testing.assert_allclose(whole, clipped_sum(rows, 50.0, weights), rtol=1e-12, atol=1e-12)


def test_clipped_updates_have_norm_clip():
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    for i, expected in [(0, [0.6, 0.8]), (1, [0.0, 0.0]), (2, [0.3, 0.4])]:
        one = np.zeros(3)
        one[i] = 1.0
        assert np.allclose(privacy.clip_and_accumulate(rows, 1.0, one), expected)


def test_clip_and_accumulate_names_the_bad_client():
    rows = [np.ones(4, np.float32), np.array([0, np.inf, 0, 0], np.float32)]
    with pytest.raises(fedkern.NonFiniteError, match=r"updates\[1\]") as error:
        privacy.clip_and_accumulate(rows, 1.0)
    assert error.value.client == 1


@pytest.mark.parametrize("clip", [0.0, -1.0, math.inf])
def test_clip_must_be_positive_and_finite(clip):
    with pytest.raises(fedkern.FedkernValueError, match="clip"):
        privacy.clip_and_accumulate(np.ones((2, 3)), clip)


# --------------------------------------------------------------------------- DP-FedAvg
def test_dp_mean_without_noise_is_the_clipped_sum_over_the_expected_count():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 50)) * np.arange(1, 7)[:, None]
    mean = privacy.dp_mean(rows, 5.0, 0.0, expected_clients=10, seed=0)
    assert np.allclose(mean, clipped_sum(rows, 5.0, np.ones(6)) / 10)


def test_dp_mean_noise_has_std_z_clip_over_m():
    rows = np.zeros((3, 200_000), np.float32)
    mean = privacy.dp_mean(rows, clip=2.0, noise_multiplier=1.5, expected_clients=4, seed=11, dtype=np.float64)
    assert mean.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    again = privacy.dp_mean(rows, clip=2.0, noise_multiplier=1.5, expected_clients=4, seed=11, dtype=np.float64)
    assert np.array_equal(mean, again)


def test_dp_mean_weights_are_bounded_by_one():
    with pytest.raises(fedkern.FedkernValueError, match="weights must be <= 1"):
        privacy.dp_mean(np.ones((2, 3)), 1.0, 1.0, 2, 0, weights=[1.0, 2.0])


def test_local_dp_update_clips_then_noises():
    update = np.full(100_000, 1.0)                  # norm 316: clipped to 3
    noised = privacy.local_dp_update(update, clip=3.0, noise_multiplier=0.5, seed=2)
    clipped = update * 3.0 / np.linalg.norm(update)
    assert (noised - clipped).std() == pytest.approx(1.5, rel=0.01)
    assert abs((noised - clipped).mean()) < 5 * 1.5 / math.sqrt(update.size)


# --------------------------------------------------------------------------- adaptive clipping
def test_split_noise_multiplier_composes_back():
    z, sigma = 1.3, 4.0
    value = privacy.split_noise_multiplier(z, sigma)
    assert value**-2 + (2 * sigma) ** -2 == pytest.approx(z**-2)
    assert privacy.split_noise_multiplier(0.0, 0.0) == 0.0
    with pytest.raises(fedkern.FedkernValueError, match="count_stddev"):
        privacy.split_noise_multiplier(2.0, 1.0)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_adaptive_clipping_finds_the_quantile_without_noise(quantile):
    # norms drawn fresh each round from one lognormal: C must end within 10% of its quantile
    rng = np.random.default_rng(3)
    mu, sigma, m = 1.0, 0.5, 100
    target = math.exp(mu + sigma * math.sqrt(2) * _erfinv(2 * quantile - 1))
    adaptive = privacy.AdaptiveClipping(target_quantile=quantile, count_stddev=0.0)   # C0 = 0.1, eta = 0.2
    for r in range(100):
        norms = rng.lognormal(mu, sigma, m)
        adaptive.update(int(np.sum(norms <= adaptive.clip)), m, seed=r)
    assert adaptive.clip == pytest.approx(target, rel=0.10)


def _erfinv(y: float) -> float:
    """Inverse of math.erf by bisection (enough for a test's target)."""
    lo, hi = -6.0, 6.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return lo


def test_adaptive_clipping_moves_the_right_way():
    # everything clipped: the norm must grow; nothing clipped: it must shrink (Flower's
    # rule, counting the clipped fraction with this sign, moves the other way)
    grow, shrink = privacy.AdaptiveClipping(count_stddev=0.0), privacy.AdaptiveClipping(count_stddev=0.0)
    assert grow.update(0, 10, seed=0) == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    assert shrink.update(10, 10, seed=0) == pytest.approx(0.1 * math.exp(-0.2 * 0.5))


def test_adaptive_clipping_count_noise_is_m_over_20_and_seeded():
    a, b = privacy.AdaptiveClipping(), privacy.AdaptiveClipping()
    assert a.stddev(100) == 5.0
    assert a.update(50, 100, seed=1) == b.update(50, 100, seed=1)
    assert a.update(50, 100, seed=2) != privacy.AdaptiveClipping().update(50, 100, seed=1)


@pytest.mark.parametrize("bad", [dict(clip=0.0), dict(target_quantile=1.5), dict(learning_rate=-1.0),
                                 dict(count_stddev=-1.0)])
def test_adaptive_clipping_bad_settings(bad):
    with pytest.raises(fedkern.FedkernValueError, match=next(iter(bad))):
        privacy.AdaptiveClipping(**bad)


def test_adaptive_clipping_centres_the_bits_of_the_clients_counted():
    # 3 of 4 arrived updates fit, 10 expected: b~ = (3 - 4 / 2) / 10 + 1/2 = 0.6
    adaptive = privacy.AdaptiveClipping(clip=1.0, count_stddev=0.0)
    assert adaptive.update(3, 10, seed=0, clients=4) == pytest.approx(math.exp(-0.2 * (0.6 - 0.5)))
    with pytest.raises(fedkern.FedkernValueError, match="clients"):
        adaptive.update(5, 10, seed=0, clients=4)
