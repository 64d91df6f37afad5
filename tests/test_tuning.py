"""Run-time block sizes (fedkern._tuning): the rule, its fallbacks, and results that do not depend on it."""
import numpy as np
import pytest

import fedkern
from fedkern import _blocks, _tuning


@pytest.mark.parametrize("l2", [256 << 10, 512 << 10, 1 << 20, 2 << 20, 3 << 20])
@pytest.mark.parametrize("threads", [1, 2, 64])
@pytest.mark.parametrize("d", [1, 5000, 1_000_000, 10_000_000])
def test_sum_chunk_is_a_power_of_two_within_its_bounds(l2, threads, d):
    chunk = _tuning.sum_chunk(d, l2=l2, threads=threads)
    assert chunk & (chunk - 1) == 0 and _blocks.CHUNK <= chunk <= _tuning.MAX_SUM_CHUNK
    assert chunk == _blocks.CHUNK or (8 * chunk <= l2 // 4 and 4 * threads * chunk <= d)
    assert 2 * chunk > min(_tuning.MAX_SUM_CHUNK, l2 // 32, max(_blocks.CHUNK, d // (4 * threads)))  # the largest


def test_sum_chunk_follows_the_l2():
    assert _tuning.sum_chunk(10**7, l2=512 << 10, threads=2) == 16384      # Zen 3
    assert _tuning.sum_chunk(10**7, l2=2 << 20, threads=2) == 65536        # Sapphire Rapids


def test_l2_falls_back_when_the_system_does_not_say(monkeypatch):
    monkeypatch.setattr(_tuning, "cache_sizes", lambda: {})
    _tuning.l2_bytes.cache_clear()
    try:
        assert _tuning.l2_bytes() == _tuning.FALLBACK_L2_BYTES
    finally:
        _tuning.l2_bytes.cache_clear()


@pytest.mark.parametrize("backend", ["cython", "numba"])
@pytest.mark.parametrize("op", ["weighted_mean", "clip_and_accumulate"])
def test_results_do_not_depend_on_the_chunk(backend, op, monkeypatch):
    if not fedkern.backends.is_available(backend):
        pytest.skip(f"{backend} is not available")
    rng = np.random.default_rng(0)
    rows = list(rng.standard_normal((13, 100_003)).astype(np.float32))
    weights = np.arange(1.0, 14.0)
    family = "aggregate" if op == "weighted_mean" else "privacy"
    module = fedkern.backends._load(backend, family)
    results, used = [], []
    for chunk in (_blocks.CHUNK, 4096, _tuning.MAX_SUM_CHUNK):
        monkeypatch.setattr(module, "sum_chunk", lambda d, chunk=chunk: used.append(chunk) or chunk)
        if op == "weighted_mean":
            results.append(fedkern.weighted_mean(rows, weights, backend=backend))
        else:
            results.append(fedkern.clip_and_accumulate(rows, 100.0, weights=weights, backend=backend))
    assert used == [_blocks.CHUNK, 4096, _tuning.MAX_SUM_CHUNK]    # the kernel took each chunk
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize("k, d, itemsize", [(100, 1000, 4), (100, 100_000, 4), (100, 1_000_000, 4),
                                            (3, 10_000_000, 8), (100, 300_000, 4)])
def test_clip_group_is_a_cached_group_of_at_least_eight_rows_or_all_of_them(k, d, itemsize):
    group = _tuning.clip_group(k, d, itemsize)
    fits = _tuning.group_bytes() // (d * itemsize)
    assert group == (fits if fits >= _tuning.MIN_CLIP_GROUP else k)


@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_clip_and_accumulate_does_not_depend_on_the_group(backend, monkeypatch):
    if not fedkern.backends.is_available(backend, "privacy"):
        pytest.skip(f"{backend} is not available")
    rng = np.random.default_rng(1)
    rows = list(rng.standard_normal((19, 5003)).astype(np.float32))
    module = fedkern.backends._load(backend, "privacy")
    results, used = [], []
    for group in (1, 3, 8, 19):
        monkeypatch.setattr(module, "clip_group", lambda k, d, itemsize, group=group: used.append(group) or group)
        results.append(fedkern.clip_and_accumulate(rows, 60.0, weights=np.arange(1.0, 20.0), backend=backend,
                                                   return_stats=True))
    assert used == [1, 3, 8, 19]
    for total, norms, unclipped in results[1:]:
        np.testing.assert_array_equal(total, results[0][0])
        np.testing.assert_array_equal(norms, results[0][1])
        assert unclipped == results[0][2]


def test_group_bytes_are_a_quarter_of_the_l3_and_at_least_the_fixed_bound(monkeypatch):
    for caches, expected in (({"L3": 260 << 20}, 65 << 20), ({"L3": 16 << 20}, _blocks.CLIP_GROUP_BYTES),
                             ({}, _blocks.CLIP_GROUP_BYTES)):
        monkeypatch.setattr(_tuning, "cache_sizes", lambda caches=caches: caches)
        _tuning.group_bytes.cache_clear()
        try:
            assert _tuning.group_bytes() == expected
        finally:
            _tuning.group_bytes.cache_clear()
