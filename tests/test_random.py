"""The random family (the Philox4x32-10 stream every randomised op draws from): the
bijection against Random123's known answers, every backend bit for bit against the
reference, slices and thread counts that cannot change a bit, the uniform mapping at its
ends, and statistics that any correct generator passes with fixed seeds."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fedkern
from fedkern import backends
from fedkern._reference import _philox as reference_philox

from conftest import ALL_BACKENDS, FAST_BACKENDS

MASK32 = 0xFFFFFFFF

#: Philox4x32-10 lines of Random123's kat_vectors: (counter, key, output). Checked against
#: the copy in DEShawResearch/Random123-Boost, libs/random/test/test_philox.cpp, which
#: says it was cut and pasted from that file.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
     (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]
KAT_IDS = ["zeros", "ones", "pi"]


def kernels(name):
    """The random kernels of backend ``name``, on fedkern's thread count."""
    module = backends._load(name, "random")
    if name != "reference":
        backends._load(name, "_runtime").use_threads(fedkern.get_num_threads())
    return module


def bits(name, seed, stream, start, n):
    out = np.full(n, 0xDEADBEEF, np.uint32)  # a word left unwritten shows up against the reference
    kernels(name).random_bits(seed, stream, start, out)
    return out


def uniforms(name, seed, stream, start, n):
    out = np.full(n, np.nan)
    kernels(name).random_uniform(seed, stream, start, out)
    return out


def same_bits(a, b):
    """Equal bit for bit: same dtype, shape and bytes (for floats, stricter than ==)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def near(*bases, spread=12):
    """Integers within ``spread`` of the bases, clipped to uint64."""
    return st.builds(lambda base, offset: min(max(base + offset, 0), 2**64 - 1),
                     st.sampled_from(bases), st.integers(-spread, spread))


# Carries matter at 2**32 (lo32 -> hi32 of a key or stream word), at 2**34 and 2**33 (the
# block index i // 4 of words and i // 2 of uniforms reaches 2**32) and at the top of uint64.
U64 = st.one_of(st.integers(0, 2**64 - 1), near(0, 2**32, 2**63, 2**64 - 1))
STARTS = st.one_of(st.integers(0, 2**64 - 1), near(0, 2**32, 2**33, 2**34, 2**63, 2**64 - 1))
LENGTHS = st.one_of(st.integers(0, 9), st.sampled_from([15, 16, 17, 63, 64, 65, 1023, 1024, 1025, 4099]))


# ---------------------------------------------------------------------------------------
# The bijection: Random123's known answers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, expected", KAT, ids=KAT_IDS)
def test_reference_bijection_matches_random123(counter, key, expected):
    assert tuple(int(x) for x in reference_philox.philox4x32_10(counter, key)) == expected


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("counter, key, expected", KAT, ids=KAT_IDS)
def test_every_backend_bijection_matches_random123(name, counter, key, expected):
    out = np.zeros(4, np.uint32)
    kernels(name).philox4x32(np.array(counter, np.uint32), np.array(key, np.uint32), out)
    assert tuple(int(x) for x in out) == expected


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_the_first_block_of_stream_zero_under_seed_zero_is_the_zero_kat(name):
    # counter (block lo, block hi, stream lo, stream hi) = 0 and key (seed lo, seed hi) = 0
    assert tuple(int(x) for x in bits(name, 0, 0, 0, 4)) == KAT[0][2]
    w0, w1, w2, w3 = KAT[0][2]
    # uniform i = top 53 bits of word(2i + 1) * 2**32 + word(2i), over 2**53: exact in a float
    expected = [((w1 << 32 | w0) >> 11) / 2**53, ((w3 << 32 | w2) >> 11) / 2**53]
    assert same_bits(uniforms(name, 0, 0, 0, 2), np.array(expected))


@pytest.mark.parametrize("name", ALL_BACKENDS)
@given(seed=U64, stream=U64, block=st.one_of(st.integers(0, 2**62 - 1), near(2**32), st.integers(2**62 - 12, 2**62 - 1)))
def test_block_b_of_a_stream_is_the_bijection_of_its_counter(name, seed, stream, block):
    """Words 4b .. 4b + 3 are philox(counter=(b lo, b hi, stream lo, stream hi), key=(seed lo, seed hi)).

    With the bijection's known answers above this pins the stream down in every backend.
    Blocks at and above 2**62 (the ones and pi vectors need them) are past the start of
    any call, whose word index is a uint64.
    """
    counter = np.array([block & MASK32, block >> 32, stream & MASK32, stream >> 32], np.uint32)
    key = np.array([seed & MASK32, seed >> 32], np.uint32)
    expected = np.zeros(4, np.uint32)
    kernels(name).philox4x32(counter, key, expected)
    assert same_bits(bits(name, seed, stream, 4 * block, 4), expected)


# ---------------------------------------------------------------------------------------
# Every backend bit for bit against the reference
# ---------------------------------------------------------------------------------------

@given(seed=U64, stream=U64, start=STARTS, n=LENGTHS)
@example(seed=2**64 - 1, stream=2**64 - 1, start=2**64 - 1, n=9)
@example(seed=0, stream=2**32 - 1, start=2**34 - 3, n=9)
@example(seed=0x299f31d0a4093822, stream=0x0370734413198a2e, start=2**33 - 1, n=1025)
def test_random_bits_match_reference(fast_backend, seed, stream, start, n):
    assert same_bits(bits(fast_backend, seed, stream, start, n), bits("reference", seed, stream, start, n))


@given(seed=U64, stream=U64, start=STARTS, n=LENGTHS)
@example(seed=2**64 - 1, stream=2**64 - 1, start=2**64 - 1, n=9)
@example(seed=0, stream=2**32 - 1, start=2**33 - 3, n=9)
def test_random_uniform_matches_reference(fast_backend, seed, stream, start, n):
    assert same_bits(uniforms(fast_backend, seed, stream, start, n), uniforms("reference", seed, stream, start, n))


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("start", [0, 3, 2**64 - 1])
def test_an_empty_out_is_fine(name, start):
    bits(name, 1, 2, start, 0)
    uniforms(name, 1, 2, start, 0)


# ---------------------------------------------------------------------------------------
# A number depends on its place in the stream only
# ---------------------------------------------------------------------------------------

SLICES = st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40)).map(sorted)


@pytest.mark.parametrize("name", ALL_BACKENDS)
@given(seed=U64, stream=U64, start=near(0, 2**32, 2**33, 2**34, 2**64 - 53), cuts=SLICES)
def test_any_slice_equals_the_same_slice_of_a_longer_call(name, seed, stream, start, cuts):
    a, b, n = cuts  # out[a:b] of a call of n from start is a call of b - a from start + a
    assert same_bits(bits(name, seed, stream, start + a, b - a), bits(name, seed, stream, start, n)[a:b])
    assert same_bits(uniforms(name, seed, stream, start + a, b - a), uniforms(name, seed, stream, start, n)[a:b])


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_the_index_is_not_reduced_mod_2_to_the_64(name):
    # words 2**64 .. 2**64 + 3 are block 2**62, not block 0 again
    tail = bits(name, 5, 6, 2**64 - 4, 8)[4:]
    assert same_bits(tail, reference_philox.blocks(5, 6, 2**62, 1)[0])
    assert not same_bits(tail, bits(name, 5, 6, 0, 4))


@pytest.mark.parametrize("name", FAST_BACKENDS)
def test_results_do_not_depend_on_thread_count(name):
    runtime = backends._load(name, "_runtime")
    module = backends._load(name, "random")
    results = {}
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        runtime.use_threads(threads)
        words, values = np.zeros(100_003, np.uint32), np.zeros(100_003)
        module.random_bits(7, 2**32 + 1, 2**34 - 5, words)
        module.random_uniform(7, 2**32 + 1, 2**33 - 5, values)
        results[threads] = words, values
    assert same_bits(results[1][0], results[2][0]) and same_bits(results[1][1], results[2][1])


@pytest.mark.skipif("numba" not in ALL_BACKENDS, reason="Numba is not available")
def test_numba_inline_generator_is_usable_from_another_kernel():
    from numba import njit

    from fedkern._numba._philox import philox_block, uniform53

    @njit
    def first_uniforms(seed, stream, out):  # what a privacy or compress kernel would write
        for b in range(out.shape[0] // 2):
            x0, x1, x2, x3 = philox_block(seed, stream, np.uint64(b))
            out[2 * b], out[2 * b + 1] = uniform53(x0, x1), uniform53(x2, x3)

    out = np.zeros(64)
    first_uniforms(np.uint64(2**64 - 1), np.uint64(3), out)
    assert same_bits(out, uniforms("reference", 2**64 - 1, 3, 0, 64))


# ---------------------------------------------------------------------------------------
# The uniform mapping
# ---------------------------------------------------------------------------------------

UNIFORM53 = {"reference": reference_philox.uniform53}
if "numba" in ALL_BACKENDS:  # an inline="always" function still runs from Python
    from fedkern._numba._philox import uniform53 as _numba_uniform53

    UNIFORM53["numba"] = lambda lo, hi: _numba_uniform53(np.uint32(lo), np.uint32(hi))
# (the Cython one is a cdef inline: the KAT uniforms and the parity tests cover it)


@pytest.mark.parametrize("name", list(UNIFORM53))
def test_uniform_mapping_ends(name):
    uniform53 = UNIFORM53[name]
    assert float(uniform53(0, 0)) == 0.0  # 0 is possible
    assert float(uniform53(MASK32, MASK32)) == 1.0 - 2.0**-53  # 1 is not
    assert float(uniform53(0x7FF, 0)) == 0.0  # the low 11 bits of the 64-bit draw are dropped
    assert float(uniform53(0x800, 0)) == 2.0**-53  # the smallest step
    assert float(uniform53(0, 0x80000000)) == 0.5  # the top bit is the 2**-1 digit


# ---------------------------------------------------------------------------------------
# Statistics: fixed seeds, bounds any correct generator meets with overwhelming probability
# ---------------------------------------------------------------------------------------

N = 1_000_000


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_uniforms_lie_in_the_unit_interval_with_mean_one_half(name):
    values = uniforms(name, 2024, 1, 0, N)
    assert values.min() >= 0.0 and values.max() < 1.0
    assert abs(values.mean() - 0.5) < 5 * np.sqrt(1 / 12 / N)  # 5 sigma of the mean
    assert abs(values.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / N)  # var of (u - 1/2)**2 is 1/180


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_every_bit_of_the_words_is_set_half_the_time(name):
    words = bits(name, 2024, 2, 0, N)
    counts = np.array([np.count_nonzero(words & np.uint32(1 << k)) for k in range(32)])
    assert np.all(np.abs(counts - N / 2) < 5 * np.sqrt(N) / 2), counts  # 5 sigma of Binomial(N, 1/2)


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("base", [0, 2**32 - 1, 2**64 - 2])
def test_neighbouring_streams_and_seeds_differ(name, base):
    # 64 words: two independent streams share a word with probability about 64 / 2**32
    assert np.count_nonzero(bits(name, 9, base, 0, 64) == bits(name, 9, base + 1, 0, 64)) <= 1
    assert np.count_nonzero(bits(name, base, 9, 0, 64) == bits(name, base + 1, 9, 0, 64)) <= 1
