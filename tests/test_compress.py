"""The compression family: unbiasedness and variance of each codec (Monte-Carlo over fixed
seeds), top-k exactness, the bits of the random draws against their definition, bytes
identical on every backend and thread count, the fused accumulate against decoding each
message and summing, error feedback's bookkeeping, and bad messages rejected before any
kernel reads them.

Parity of the registry's rows (accumulate of 8-bit and top-k messages) is also covered by
tests/test_registry.py.
"""
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedkern
from fedkern import backends, compress
from fedkern._reference import compress as spec
from fedkern._reference.random import random_bits
from fedkern._updates import Updates
from conftest import ALL_BACKENDS, FAST_BACKENDS

D = 64  # a power of two: a rotated message keeps all its coordinates, so its variance is the inner one
SEEDS = 3000


def vector(d: int = D, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(d) * rng.uniform(0.1, 3.0, d)).astype(dtype)


CODECS = {
    "top-k": compress.TopK(7),
    "random-k": compress.RandomK(7),
    "qsgd": compress.QSGD(levels=4),
    "qsgd-buckets": compress.QSGD(levels=100, bucket_size=10),
    "terngrad": compress.TernGrad(),
    "sq1": compress.StochasticQuantizer(bits=1, block_size=16),
    "sq2": compress.StochasticQuantizer(bits=2, block_size=7),
    "sq4": compress.StochasticQuantizer(bits=4, block_size=32),
    "sq8": compress.StochasticQuantizer(bits=8, block_size=256),
    "sign": compress.ScaledSign(),
    "rotated-qsgd": compress.Rotated(compress.QSGD(levels=2), seed=11),
    "rotated-sq": compress.Rotated(compress.StochasticQuantizer(bits=2, block_size=16), seed=12),
}
UNBIASED = ["random-k", "qsgd", "qsgd-buckets", "terngrad", "sq1", "sq2", "sq4", "sq8", "rotated-qsgd",
            "rotated-sq"]


def per_coordinate_variance(codec, x: np.ndarray) -> np.ndarray:
    """Var Q(x)_j from each paper's formula, with the (seed-independent) scales of a message."""
    x64 = x.astype(np.float64)
    d = x.shape[0]
    if isinstance(codec, compress.RandomK):
        return x64**2 * (d / codec.k - 1)
    enc = codec.encode(x, seed=0)
    if isinstance(codec, compress.TernGrad):
        s = float(enc.scales[0])
        clipped = np.clip(x64, -s, s)
        return s * np.abs(clipped) - clipped**2
    if isinstance(codec, compress.QSGD):
        bucket = codec.bucket_size or d
        norm = enc.scales.astype(np.float64)[np.arange(d) // bucket]
        t = np.abs(x64) * codec.levels / norm
        return (norm / codec.levels) ** 2 * (t - np.floor(t)) * (1 - t + np.floor(t))
    nb = -(-d // codec.block_size)
    block = np.arange(d) // codec.block_size
    lo, step = enc.scales[:nb].astype(np.float64)[block], enc.scales[nb:].astype(np.float64)[block]
    t = np.where(step > 0, (x64 - lo) / np.where(step > 0, step, 1), 0)
    f = t - np.floor(t)
    return step**2 * f * (1 - f)


def target(codec, x: np.ndarray) -> np.ndarray:
    """What the codec is unbiased for: x, TernGrad's x clipped."""
    if isinstance(codec, compress.TernGrad):
        s = float(codec.encode(x, seed=0).scales[0])
        return np.clip(x.astype(np.float64), -s, s)
    return x.astype(np.float64)


# --------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_codecs_mean_and_variance(name):
    codec = CODECS[name]
    x = vector(seed=1)
    samples = np.stack([codec.decode(codec.encode(x, seed=s), out=np.empty(D)) for s in range(SEEDS)])
    want = target(codec, x)
    if isinstance(codec, compress.Rotated):
        # the rotation is orthonormal: the total variance is the inner codec's on y = HSx/sqrt(n)
        total = per_coordinate_variance(codec.codec, codec.rotate(x).astype(np.float32)).sum()
        var = samples.var(axis=0, ddof=1)       # per coordinate: no closed form, sampled
    else:
        var = per_coordinate_variance(codec, x)
        total = var.sum()
    se = np.sqrt(var / SEEDS)
    assert (np.abs(samples.mean(axis=0) - want) <= 4 * se + 1e-6 * np.abs(want)).all()
    measured = ((samples - want) ** 2).sum(axis=1).mean()
    assert abs(measured - total) <= 0.1 * total
    if not isinstance(codec, compress.Rotated):
        assert codec.variance(x) == pytest.approx(total, rel=1e-6)


def test_grace_style_unscaled_random_k_would_be_biased():
    # the d/k scaling is what makes random-k unbiased: without it the mean is (k/d) x
    codec, x = CODECS["random-k"], vector(seed=2)
    mean = np.mean([codec.decode(codec.encode(x, seed=s), out=np.empty(D)) for s in range(2000)], axis=0)
    assert np.abs(mean - x).max() < np.abs(mean * codec.k / D - x).max()


def test_random_k_draws_each_coordinate_with_probability_k_over_d():
    codec, d, n = compress.RandomK(5), 20, 4000
    counts = np.zeros(d)
    for s in range(n):
        idx = codec.indices(d, s)
        assert idx.dtype == np.uint32 and (np.diff(idx.astype(np.int64)) > 0).all() and idx[-1] < d
        counts[idx] += 1
    p = codec.k / d
    assert (np.abs(counts / n - p) <= 4 * math.sqrt(p * (1 - p) / n)).all()


# --------------------------------------------------------------------------- exact definitions
@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1])
def test_top_k_keeps_exactly_the_k_largest_ties_to_the_lower_index(seed):
    rng = np.random.default_rng(seed % 1000)
    x = rng.integers(-5, 6, 200).astype(np.float32)     # many ties
    for k in (1, 13, 100, 200):
        enc = compress.TopK(k).encode(x, seed=seed)
        order = np.lexsort((np.arange(200), -np.abs(x)))  # by magnitude, then index
        assert np.array_equal(enc.indices, np.sort(order[:k]))
        assert np.array_equal(enc.values, x[enc.indices])
        assert enc.nbytes == 8 * k + 8


def test_stochastic_rounding_uses_word_j_of_the_stream():
    x = vector(100, seed=3)
    codec = compress.StochasticQuantizer(bits=8, block_size=100)
    enc = codec.encode(x, seed=42)
    lo, step = float(enc.scales[0]), float(enc.scales[1])
    words = np.empty(100, np.uint32)
    random_bits(42, spec.ROUND_STREAM, 0, words)
    t = (x.astype(np.float64) - lo) / step
    want = np.floor(t) + (words * 2.0**-32 < t - np.floor(t))
    assert np.array_equal(enc.codes, want.astype(np.uint8))
    assert lo <= x.min() and x.max() <= lo + 255 * step   # the range covers x: no clipping


def test_floyd_indices_match_their_definition():
    d, k, seed = 30, 9, 77
    words = np.empty(2 * k, np.uint32)
    random_bits(seed, spec.INDEX_STREAM, 0, words)
    chosen = []
    for i in range(k):
        n = d - k + i + 1
        t = ((int(words[2 * i + 1]) << 32 | int(words[2 * i])) * n) >> 64
        chosen.append(n - 1 if t in chosen else t)
    assert np.array_equal(compress.RandomK(k).indices(d, seed), np.sort(chosen))


@pytest.mark.parametrize("d, k", [(1, 1), (2048, 2048), (5000, 300), (5_000_000, 20_000)])
def test_random_k_indices_on_every_backend_are_the_reference(d, k, fast_backend):
    """The compiled kernels keep the drawn indices in a bitmap per thread, cleared after each
    message, and sort them by radix (one, two and three passes of 11 bits here); every
    message's indices are the reference's sorted set, on any thread count."""
    seeds = np.array([0, 2**64 - 1, 5, 0, 123456789], np.uint64)    # a repeat: the bitmap was cleared
    want = np.empty((seeds.shape[0], k), np.uint32)
    spec.random_k_indices(seeds, spec.INDEX_STREAM, d, k, want)
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        got = np.empty_like(want)
        backends.kernels("compress", fast_backend).random_k_indices(seeds, spec.INDEX_STREAM, d, k, got)
        assert np.array_equal(got, want)


def test_nbytes_is_what_is_sent():
    d = 1000
    expected = {"qsgd": d * 4 // 8 + d // 8 + 4, "terngrad": d // 4 + 4, "sign": d // 8 + 4,
                "sq8": d + 4 * 8, "sq2": 250 + 143 * 8, "random-k": 28, "top-k": 56}
    x = vector(d, seed=4)
    for name, body in expected.items():
        enc = CODECS[name].encode(x, seed=1)
        assert enc.nbytes == body + 8, name
        assert CODECS[name].bytes_per_coordinate(d) == enc.nbytes / d
    rotated = CODECS["rotated-qsgd"].encode(x, seed=1)
    assert rotated.nbytes == 1024 * 2 // 8 + 1024 // 8 + 4 + 8   # QSGD(2) on the padded 1024


def test_fwht_is_the_hadamard_matrix(any_backend):
    hadamard = pytest.importorskip("scipy.linalg").hadamard
    for n in (1, 2, 4, 8, 4096, 16384, 1 << 18):    # the last: many panels of the wide stages
        x = np.random.default_rng(n).standard_normal(n)
        want = hadamard(n) @ x if n <= 4096 else None
        y = compress.fwht(x.copy(), backend=any_backend)
        if want is not None:
            assert np.allclose(y, want, atol=1e-9 * math.sqrt(n))
        assert np.allclose(compress.fwht(y.copy(), backend=any_backend), n * x, atol=1e-9 * n)
        assert np.array_equal(y, compress.fwht(x.copy(), backend="reference"))


def test_majority_vote():
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((9, 40)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, 9)
    msgs = [compress.ScaledSign().encode(x) for x in xs]
    want = np.sign(weights @ np.where(xs >= 0, 1.0, -1.0))
    for backend in ALL_BACKENDS:
        assert np.array_equal(compress.majority_vote(msgs, weights, backend=backend), want)


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_seed_same_bytes_on_every_backend_and_thread_count(name, dtype, fast_backend):
    codec, x = CODECS[name], vector(3 * 4096 + 37, seed=6, dtype=dtype)
    want = codec.encode(x, seed=2**63 + 5, backend="reference")
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        got = codec.encode(x, seed=2**63 + 5, backend=fast_backend)
        for a, b in ((got, want), (got.inner, want.inner)):
            if a is None:
                continue
            for field in ("codes", "signs", "indices", "values", "scales"):
                assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=False) or \
                    getattr(a, field) is getattr(b, field) is None, field


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 9, 4097])
def test_fused_accumulate_is_decode_then_weighted_sum(name, dtype, d, any_backend):
    codec = CODECS[name]
    if isinstance(codec, (compress.TopK, compress.RandomK)) and codec.k > d:
        codec = type(codec)(d)
    rows = [vector(d, seed=10 + i, dtype=dtype) for i in range(6)]
    msgs = [codec.encode(r, seed=i) for i, r in enumerate(rows)]
    weights = np.array([0.5, 2.0, 0.0, 1e-3, 3.0, 1.0])
    decoded = [codec.decode(m, out=np.empty(d), backend="reference") for m in msgs]
    want = fedkern.weighted_sum(decoded, weights, backend="reference")
    got = compress.accumulate(msgs, weights, backend=any_backend)
    scale = max(1.0, float(np.abs(np.stack(decoded)).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale * 6)
    out = np.full(d, np.nan, np.float32)
    assert compress.accumulate(msgs, weights, out=out, backend=any_backend) is out
    np.testing.assert_array_equal(out, got.astype(np.float32))


@pytest.mark.parametrize("k", [1, 3, 4, 5, 9])
def test_8bit_accumulate_sums_in_the_documented_order_bit_for_bit(k, any_backend):
    """Every coordinate starts at its block's offsets summed over the clients, (w off) in
    index order, then adds each client's (w step) q in index order, whatever the kernel's
    passes of four clients or its chunks: the bits of this numpy loop. The weights have full
    mantissas, so another order would round differently."""
    d = 2 * 65536 + 300            # several chunks of any L2's sum_chunk, a cut block at the end
    codec = compress.StochasticQuantizer(bits=8, block_size=256)
    msgs = [codec.encode(vector(d, seed=40 + i), seed=i) for i in range(k)]
    weights = np.random.default_rng(k).uniform(0.1, 2.0, k)
    block = np.arange(d) // 256
    affine = [codec._affine(m.scales, d) for m in msgs]
    base = np.zeros(block[-1] + 1)
    for w, (offsets, _) in zip(weights, affine):
        base = base + w * offsets
    want = base[block]
    for w, m, (_, steps) in zip(weights, msgs, affine):
        want = want + (w * steps)[block] * m.codes.astype(np.float64)
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        assert np.array_equal(compress.accumulate(msgs, weights, backend=any_backend), want)


@pytest.mark.parametrize("name", ["sq1", "sq2", "sq4", "qsgd", "qsgd-buckets", "terngrad", "sign"])
@pytest.mark.parametrize("k", [1, 5])
def test_packed_and_signed_codes_sum_as_the_reference_bit_for_bit(name, k, fast_backend):
    """Codes of 1, 2 and 4 bits and signed codes, unpacked a chunk at a time by the compiled
    kernels, give the reference kernel's sums bit for bit, on any thread count."""
    d = 2 * 65536 + 300
    codec = CODECS[name]
    msgs = [codec.encode(vector(d, seed=60 + i), seed=i) for i in range(k)]
    weights = np.random.default_rng(k).uniform(0.1, 2.0, k)
    want = compress.accumulate(msgs, weights, backend="reference")
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        assert np.array_equal(compress.accumulate(msgs, weights, backend=fast_backend), want)


@pytest.mark.parametrize("codec", [compress.StochasticQuantizer(bits=8), compress.StochasticQuantizer(bits=2),
                                   compress.QSGD(levels=8), compress.TopK(10_000)], ids=repr)
def test_accumulate_into_float32_builds_no_float64_vector(codec, fast_backend):
    """The compiled kernels round each chunk's float64 sum into out once: accumulating into
    a float32 out allocates no D-sized float64 buffer (numpy's allocations, as traced; the
    blocks' offsets and steps, 16 bytes per 256 coordinates and client, are the rest)."""
    d = 1 << 20
    msgs = [codec.encode(vector(d, seed=i), seed=i) for i in range(3)]
    out = np.empty(d, np.float32)
    compress.accumulate(msgs, out=out, backend=fast_backend)          # compiled and cached first
    tracemalloc.start()
    try:
        compress.accumulate(msgs, out=out, backend=fast_backend)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * d // 4
    np.testing.assert_array_equal(out, compress.accumulate(msgs, backend="reference").astype(np.float32))


def test_accumulate_mixes_codecs_and_does_not_depend_on_threads(fast_backend):
    d = 3 * 4096 + 11
    rows = [vector(d, seed=20 + i) for i in range(8)]
    codecs = list(CODECS.values())
    msgs = [codecs[i % len(codecs)].encode(r, seed=i) for i, r in enumerate(rows)]
    results = []
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        results.append(compress.accumulate(msgs, backend=fast_backend))
    assert np.array_equal(results[0], results[1])
    want = sum(m.codec.decode(m, out=np.empty(d), backend="reference") for m in msgs)
    np.testing.assert_allclose(results[0], want, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(d=st.one_of(st.integers(1, 70), st.integers(4090, 3 * 4096 + 9)), block_size=st.integers(1, 600),
       bits=st.sampled_from([1, 2, 4, 8]), signed=st.booleans(), seed=st.integers(0, 2**64 - 1),
       dtype=st.sampled_from([np.float32, np.float64]), data=st.data())
def test_quantize_kernel_matches_reference(fast_backend, d, block_size, bits, signed, seed, dtype, data):
    """The quantize kernel's codes and signs against the reference's, byte for byte, over
    lengths that cut the last chunk and byte anywhere, blocks that straddle chunks, steps of
    zero (a constant block) and values outside a block's range (clamped)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(d) * 3).astype(dtype)
    nblocks = -(-d // block_size)
    offsets = rng.uniform(-2, 0, nblocks) * (0 if signed else 1)
    steps = np.where(rng.random(nblocks) < 0.2, 0.0, rng.uniform(0.01, 1.0, nblocks))
    levels = (1 << bits) - 1
    got, want = ([np.full(-(-d * bits // 8), 0xAA, np.uint8), np.full(-(-d // 8), 0xAA, np.uint8)] for _ in range(2))
    for name, (codes, signs) in ((fast_backend, got), ("reference", want)):
        backends.kernels("compress", name).quantize(x, offsets, steps, block_size, levels, bits, signed, seed,
                                                    spec.ROUND_STREAM, codes, signs if signed else codes)
    assert np.array_equal(got[0], want[0])
    assert not signed or np.array_equal(got[1], want[1])


@settings(max_examples=40, deadline=None)
@given(d=st.one_of(st.integers(1, 70), st.integers(2040, 3 * 2048 + 9)), block_size=st.integers(1, 600),
       bits=st.sampled_from([1, 2, 4, 8]), signed=st.booleans(), k=st.integers(1, 9),
       dtype=st.sampled_from([np.float32, np.float64]), data=st.data())
def test_accumulate_kernel_matches_reference(fast_backend, d, block_size, bits, signed, k, dtype, data):
    """The fused accumulate kernel against the reference's, bit for bit, on arbitrary codes
    and signs (every bit pattern is a message), over lengths that cut the last chunk and
    byte anywhere, blocks that straddle chunks, any number of clients against the passes
    of four, and a float32 or float64 result."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    nblocks = -(-d // block_size)
    codes = [rng.integers(0, 256, -(-d * bits // 8), dtype=np.uint8) for _ in range(k)]
    signs = [rng.integers(0, 256, -(-d // 8), dtype=np.uint8) for _ in range(k)]
    offsets = [rng.uniform(-2, 0, nblocks) for _ in range(k)]
    steps = [rng.uniform(0.0, 1.0, nblocks) for _ in range(k)]
    weights = rng.uniform(0.0, 2.0, k)
    rows = [Updates(r, None) for r in (codes, signs if signed else codes, offsets, steps)]
    got, want = np.full(d, np.nan, dtype), np.full(d, np.nan, dtype)
    for name, out in ((fast_backend, got), ("reference", want)):
        backends.kernels("compress", name).accumulate_quantized(out, *rows, weights, block_size, bits, signed)
    assert np.array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(n=st.one_of(st.integers(0, 300), st.integers(4090, 3 * 4096 + 9)), seed=st.integers(0, 2**64 - 1),
       scale=st.sampled_from([1.0, 0.5, 1 / 3]))
def test_sign_kernel_matches_reference(fast_backend, n, seed, scale):
    """The rotation's signs, drawn inside the kernel chunk by chunk, against the reference's,
    bit for bit, over lengths that cut a word, a Philox block and a chunk anywhere."""
    y = np.random.default_rng(n).standard_normal(n)
    got, want = y.copy(), y.copy()
    backends.kernels("compress", fast_backend).scale_by_signs(got, seed, spec.ROTATE_STREAM, scale)
    spec.scale_by_signs(want, seed, spec.ROTATE_STREAM, scale)
    assert np.array_equal(got, want)


def test_rotation_signs_are_bits_of_the_stream():
    n = 1000
    words = np.empty((n + 31) // 32, np.uint32)
    random_bits(5, spec.ROTATE_STREAM, 0, words)
    bits = [(int(words[j // 32]) >> (j % 32)) & 1 for j in range(n)]
    signs = compress.Rotated(compress.QSGD(levels=2), seed=5).signs(n)
    assert np.array_equal(signs, 1.0 - 2.0 * np.array(bits))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(0, 40), d=st.integers(1, 60), data=st.data())
def test_sparse_check_kernel_matches_reference(fast_backend, k, n, d, data):
    """The one-pass check of top-k messages flags exactly the clients whose indices are not
    strictly increasing and below d, or whose values are not all finite."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    indices, values = [], []
    for _ in range(k):
        idx = np.sort(rng.choice(max(d, n) + 5, n, replace=False)).astype(np.uint32)
        if n > 1 and rng.random() < 0.3:
            idx[rng.integers(1, n)] = idx[0]                           # a repeat or a step down
        vals = rng.standard_normal(n).astype(np.float32)
        if n and rng.random() < 0.3:
            vals[rng.integers(n)] = rng.choice([np.nan, np.inf, -np.inf])
        indices.append(idx)
        values.append(vals)
    got, want = np.full(k, 7, np.uint8), np.full(k, 7, np.uint8)
    for name, bad in ((fast_backend, got), ("reference", want)):
        backends.kernels("compress", name).check_sparse(Updates(indices, None), Updates(values, None), d, bad)
    assert np.array_equal(got, want)
    assert set(want) <= {0, 1}


# --------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("codec", [compress.TopK(3), compress.RandomK(4)], ids=["top-k", "random-k"])
def test_error_feedback_invariant_is_exact(codec):
    # integer float32 updates: every value sent and kept is an integer, so the float64
    # bookkeeping has no rounding and the invariant holds exactly (random-k: d / k = 4)
    rng = np.random.default_rng(7)
    ef = compress.ErrorFeedback(codec)
    inputs, sent = np.zeros(16), np.zeros(16)
    for t in range(6):
        g = rng.integers(-8, 9, 16).astype(np.float32)
        enc = ef.encode("client", g, seed=t)
        inputs += g
        sent += codec.decode(enc, out=np.empty(16))
    assert np.array_equal(sent + ef.residual("client"), inputs)


@pytest.mark.parametrize("name", ["sq4", "qsgd", "sign", "rotated-sq"])
def test_error_feedback_keeps_exactly_what_was_not_sent(name):
    codec = CODECS[name]
    ef = compress.ErrorFeedback(codec)
    inputs, sent = np.zeros(D), np.zeros(D)
    for t in range(10):
        g = vector(seed=30 + t)
        before = ef.residual(1)
        enc = ef.encode(1, g, seed=t)
        decoded = codec.decode(enc, out=np.empty(D))
        p = g + (0.0 if before is None else before)
        assert np.array_equal(ef.residual(1), p - decoded)   # the server's decode, bit for bit
        inputs += g
        sent += decoded
    np.testing.assert_allclose(sent + ef.residual(1), inputs, rtol=0, atol=1e-12 * np.abs(inputs).max())
    assert ef.residual(2) is None


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def compress_kernels_forbidden(monkeypatch):
    """Every compiled and reference compress kernel raises if it is reached."""
    for name in ALL_BACKENDS:
        module = backends._load(name, "compress")
        for kernel in ("block_stats", "quantize", "accumulate_quantized", "scatter_add", "random_k_indices", "fwht",
                       "scale_by_signs"):
            def reached(*args, _kernel=kernel, _name=name, **kwargs):
                raise AssertionError(f"bad input reached {_name}.compress.{_kernel}")

            monkeypatch.setattr(module, kernel, reached)


def test_bad_codec_parameters():
    for make in (lambda: compress.TopK(0), lambda: compress.RandomK(-1), lambda: compress.StochasticQuantizer(3),
                 lambda: compress.StochasticQuantizer(True), lambda: compress.StochasticQuantizer(8, 0),
                 lambda: compress.QSGD(0), lambda: compress.QSGD(256), lambda: compress.TernGrad(clip=0.0),
                 lambda: compress.Rotated(compress.TopK(2)), lambda: compress.Rotated(compress.ScaledSign())):
        with pytest.raises(fedkern.FedkernError):
            make()
    with pytest.raises(fedkern.FedkernValueError, match="k = 11"):
        compress.TopK(11).encode(np.ones(10, np.float32))
    with pytest.raises(fedkern.FedkernValueError, match="k = 11"):
        compress.RandomK(11).encode(np.ones(10, np.float32))


def _corrupt(enc, **changes):
    fields = {f: getattr(enc, f) for f in ("codec", "d", "seed", "codes", "signs", "indices", "values", "scales",
                                           "inner")}
    fields.update(changes)
    return compress.Encoded(**fields)


def bad_messages():
    x = vector(64, seed=8)
    sq = CODECS["sq4"].encode(x, seed=1)
    qsgd = CODECS["qsgd"].encode(x, seed=1)
    top = CODECS["top-k"].encode(x)
    rot = CODECS["rotated-sq"].encode(x, seed=1)
    bad_idx = top.indices.copy()
    bad_idx[-1] = 64
    unsorted = top.indices[::-1].copy()
    return {
        "another codec": (CODECS["sq8"], sq),
        "another quantiser's parameters": (compress.StochasticQuantizer(bits=4, block_size=16), sq),
        "not an Encoded": (CODECS["sq4"], sq.codes),
        "codes too short": (CODECS["sq4"], _corrupt(sq, codes=sq.codes[:-1].copy())),
        "codes of another dtype": (CODECS["sq4"], _corrupt(sq, codes=sq.codes.astype(np.int8))),
        "scales too long": (CODECS["sq4"], _corrupt(sq, scales=np.concatenate([sq.scales, sq.scales]))),
        "NaN scale": (CODECS["sq4"], _corrupt(sq, scales=np.full_like(sq.scales, np.nan))),
        "negative step": (CODECS["sq4"], _corrupt(sq, scales=-np.abs(sq.scales) - 1)),
        "signs missing": (CODECS["qsgd"], _corrupt(qsgd, signs=None)),
        "an extra buffer": (CODECS["sq4"], _corrupt(sq, signs=np.zeros(8, np.uint8))),
        "wrong length": (CODECS["sq4"], _corrupt(sq, d=65)),
        "index out of range": (CODECS["top-k"], _corrupt(top, indices=bad_idx)),
        "indices unsorted": (CODECS["top-k"], _corrupt(top, indices=unsorted)),
        "indices too many": (CODECS["top-k"], _corrupt(top, indices=np.arange(8, dtype=np.uint32))),
        "NaN value": (CODECS["top-k"], _corrupt(top, values=np.full(7, np.nan, np.float32))),
        "k above the length": (CODECS["top-k"], _corrupt(top, d=5)),
        "inner too short": (CODECS["rotated-sq"], _corrupt(rot, inner=_corrupt(rot.inner, codes=rot.inner.codes[:3]))),
        "inner of another length": (CODECS["rotated-sq"], _corrupt(rot, d=200)),
    }


BAD = bad_messages()  # built before any test forbids the kernels that encode them


@pytest.mark.parametrize("case", list(BAD))
def test_bad_messages_never_reach_a_kernel(case, compress_kernels_forbidden, any_backend):
    codec, enc = BAD[case]
    with pytest.raises(fedkern.FedkernError):
        codec.decode(enc, backend=any_backend)
    if case.startswith("another"):
        return  # a whole message of another codec: accumulate rightly decodes it by its own
    with pytest.raises(fedkern.FedkernError):
        compress.accumulate([enc], backend=any_backend)


def test_bad_accumulate_arguments():
    x = vector(64, seed=9)
    a, b = CODECS["sq4"].encode(x), CODECS["sq4"].encode(vector(65, seed=9))
    for args, kwargs in [(([a, b],), {}), (([],), {}), ((a,), {}), (([a, a],), dict(weights=[1.0])),
                         (([a],), dict(weights=[-1.0])), (([a],), dict(out=np.empty(3)))]:
        with pytest.raises(fedkern.FedkernError):
            compress.accumulate(*args, **kwargs)
    with pytest.raises(fedkern.FedkernValueError, match="ScaledSign"):
        compress.majority_vote([a])


@pytest.mark.parametrize("corrupt", ["unsorted", "out of range", "NaN", "not a codec"])
def test_a_bad_message_among_good_ones_is_named(corrupt, any_backend):
    """Top-k messages are checked together in one pass; the error still names the bad one."""
    codec = compress.TopK(5)
    msgs = [codec.encode(vector(64, seed=i), seed=i) for i in range(6)]
    bad = msgs[3]
    msgs[3] = {"unsorted": lambda: _corrupt(bad, indices=bad.indices[::-1].copy()),
               "out of range": lambda: _corrupt(bad, indices=bad.indices + np.uint32(64)),
               "NaN": lambda: _corrupt(bad, values=np.full(5, np.nan, np.float32)),
               "not a codec": lambda: _corrupt(bad, codec="TopK(5)")}[corrupt]()
    with pytest.raises(fedkern.FedkernError, match=r"encoded_list\[3\]"):
        compress.accumulate(msgs, backend=any_backend)


@pytest.mark.parametrize("name", list(CODECS))
def test_non_finite_input_is_rejected(name, any_backend):
    # the quantisers learn it from their statistics kernel (no extra pass), before quantize
    x = vector(64, seed=10)
    x[5] = np.nan
    with pytest.raises(fedkern.FedkernValueError, match="NaN"):
        CODECS[name].encode(x, backend=any_backend)


def test_fwht_bad_input():
    for bad in (np.ones(6), np.ones(4, np.float32), np.ones((2, 2)), np.ones(0)):
        with pytest.raises(fedkern.FedkernError):
            compress.fwht(bad)
