"""Accumulator: streaming FedAvg, one update at a time."""
import numpy as np
import pytest

import fedkern

# --------------------------------------------------------------------------- Accumulator
def client_updates(dtype, k=6, d=1000, seed=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d).astype(dtype) for _ in range(k)], rng.uniform(0, 100, k)


def test_accumulator_matches_weighted_sum_and_mean(any_backend, dtype):
    updates, weights = client_updates(dtype)
    acc = fedkern.Accumulator(updates[0].size, dtype=dtype, backend=any_backend)
    for update, weight in zip(updates, weights):
        acc.add(update, weight)
    assert acc.count == len(updates) and acc.total_weight == pytest.approx(weights.sum(), rel=1e-15)
    # documented: exactly the sum weighted_sum computes over the same updates in that order
    np.testing.assert_array_equal(acc.sum(), fedkern.weighted_sum(updates, weights, backend=any_backend))
    mean = acc.mean()
    assert mean.dtype == dtype
    expected = fedkern.weighted_mean(updates, weights, backend=any_backend)
    np.testing.assert_allclose(mean, expected, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-13)


def test_accumulator_reset():
    updates, weights = client_updates(np.float32, k=2, d=4)
    acc = fedkern.Accumulator(4)
    acc.add(updates[0], 3.0)
    acc.reset()
    assert (acc.count, acc.total_weight) == (0, 0.0)
    np.testing.assert_array_equal(acc.sum(), np.zeros(4))
    with pytest.raises(fedkern.FedkernValueError, match="no update with positive weight"):
        acc.mean()
    acc.add(updates[1], 2.0)
    np.testing.assert_allclose(acc.mean(), updates[1], rtol=1e-7)


def test_accumulator_mean_needs_a_positive_weight():
    acc = fedkern.Accumulator(3)
    with pytest.raises(fedkern.FedkernValueError, match=r"Accumulator\.mean: no update with positive weight"):
        acc.mean()
    acc.add(np.ones(3, np.float32), 0)
    assert acc.count == 1
    with pytest.raises(fedkern.FedkernValueError, match="no update with positive weight"):
        acc.mean()


def test_accumulator_dtypes_and_out():
    acc = fedkern.Accumulator(3, dtype=np.float64)
    acc.add(np.array([1, 2, 3], np.float32), 1.0)
    acc.add(np.array([3, 2, 1], np.float64), 3.0)
    assert acc.sum().dtype == acc.mean().dtype == np.float64
    np.testing.assert_array_equal(acc.sum(), [10, 8, 6])
    out = np.empty(3, np.float32)
    assert acc.mean(out=out) is out
    np.testing.assert_array_equal(out, [2.5, 2, 1.5])
    assert fedkern.Accumulator(3).mean.__self__.dtype == np.float32  # default
    with pytest.raises(fedkern.FedkernValueError, match="out has shape"):
        acc.mean(out=np.empty(4))
    with pytest.raises(fedkern.FedkernValueError, match="out is read-only"):
        acc.sum(out=np.zeros(3)[::1].view().__array__().copy().setflags(write=False) or _read_only(3))


def _read_only(n):
    array = np.zeros(n)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("d", [0, -1, True, 2.0, "3"])
def test_accumulator_bad_d(d):
    with pytest.raises(fedkern.FedkernValueError, match="d must be a positive integer"):
        fedkern.Accumulator(d)


@pytest.mark.parametrize("update, weight, exc, pattern", [
    (np.ones(4, np.float32), 1.0, fedkern.FedkernValueError, "update has length 4; expected 3"),
    (np.ones(3, np.int64), 1.0, fedkern.FedkernTypeError, "update has dtype int64"),
    (np.ones(3, np.float32), -2.0, fedkern.FedkernValueError, "weight must be >= 0"),
    (np.ones(3, np.float32), np.nan, fedkern.FedkernValueError, "weight must be finite"),
    (np.array([1, np.inf, 1], np.float32), 1.0, fedkern.NonFiniteError, r"Accumulator\.add: update holds"),
])
def test_accumulator_rejects_leave_it_unchanged(update, weight, exc, pattern, any_backend):
    acc = fedkern.Accumulator(3, backend=any_backend)
    acc.add(np.ones(3, np.float32), 2.0)
    with pytest.raises(exc, match=pattern):
        acc.add(update, weight)
    assert (acc.count, acc.total_weight) == (1, 2.0)
    np.testing.assert_array_equal(acc.sum(), [2, 2, 2])
