"""The secure aggregation family: the protocol's sum against the plain quantised sum for
many dropout patterns at every phase, the masks' uniformity, Shamir thresholds, the
double-masking invariant, the ring overflow check and bad input.

Parity of the ring kernels across backends, threads and read-only inputs are the
registry's tests (tests/test_registry.py); this file checks what the registry cannot.
"""
import subprocess
import sys

import numpy as np
import pytest

import fedkern
from fedkern import secagg
from fedkern.secagg import SecAggConfig, SecAggError
from conftest import ALL_BACKENDS

pytest.importorskip("cryptography")


def entropy(seed: int):
    """A reproducible byte source (tests only: real clients use os.urandom)."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def run_round(config, updates, weights=None, drop=((), (), (), ()), seed=0, backend=None):
    """One round; ``drop[p]`` are the clients that drop before phase p + 1 answers
    (0: advertise, 1: share keys, 2: masked input, 3: unmask). Returns the server and the
    plain ring sum of the weighted quantised updates of the clients whose input arrived."""
    n = config.n_clients
    weights = [1] * n if weights is None else weights
    clients = {u: secagg.Client(u, config, entropy=entropy(1000 * seed + u)) for u in range(n)}
    server = secagg.Server(config, backend=backend)
    online = [u for u in range(n) if u not in drop[0]]
    keys = server.receive_keys([clients[u].advertise_keys() for u in online])
    online = [u for u in online if u not in drop[1]]
    routed = server.receive_shares([clients[u].share_keys(keys[u]) for u in online])
    online = [u for u in online if u not in drop[2]]
    masked = [clients[u].masked_input(updates[u], routed[u], weight=weights[u], seed=u, backend=backend)
              for u in online]
    request = server.receive_masked(masked)
    expected = np.zeros(config.dim, config.dtype)
    for u in online:
        expected += secagg.ring_quantize(updates[u], config.clip, config.levels, u, weight=weights[u], bits=config.bits)
    online = [u for u in online if u not in drop[3]]
    server.unmask({u: clients[u].unmask(request) for u in online})
    return server, expected


def succeeds(config, drop) -> bool:
    """Whether a round with these dropouts has enough clients and shares everywhere."""
    t = config.threshold
    alive = [set(range(config.n_clients))]
    for phase in drop:
        alive.append(alive[-1] - set(phase))
    u1, u2, u3, u4 = alive[1:]
    if min(len(u1), len(u2), len(u3)) < t:
        return False
    if any(len(config.holders_of(u) & u1) < t for u in u2):          # share_keys
        return False
    if any(len(config.holders_of(u) & u2) < t for u in u3):          # masked_input
        return False
    return all(len(config.holders_of(v) & u4) >= t for v in u2)       # unmask


CONFIGS = {
    "full graph": SecAggConfig(n_clients=10, threshold=5, dim=37, clip=1.0, levels=2**12),
    "SecAgg+ k=4": SecAggConfig(n_clients=12, threshold=3, dim=37, clip=1.0, levels=2**12, neighbours=4,
                                round=5, graph_seed=3),
    "SecAgg+ k=5, 64-bit": SecAggConfig(n_clients=10, threshold=3, dim=37, clip=2.0, levels=2**30, bits=64,
                                        max_weight=7, neighbours=5, round=2**63),
}


# --------------------------------------------------------------------------- the protocol's sum
@pytest.mark.parametrize("name", list(CONFIGS))
def test_unmasked_sum_is_the_plain_quantised_sum_for_random_dropouts(name):
    config = CONFIGS[name]
    rng = np.random.default_rng(7)
    outcomes = set()
    for trial in range(12):
        updates = [rng.uniform(-1.5, 1.5, config.dim) for _ in range(config.n_clients)]
        weights = list(rng.integers(0, config.max_weight, config.n_clients, endpoint=True))
        order = rng.permutation(config.n_clients)
        cuts = np.sort(rng.integers(0, 5, 4)) if trial % 3 else [0, 0, 0, 0]
        # up to a few clients drop before each phase (fewer for the first trials)
        drop = tuple(tuple(int(u) for u in order[sum(cuts[:p]):sum(cuts[:p + 1])]) for p in range(4))
        if succeeds(config, drop):
            server, expected = run_round(config, updates, weights, drop, seed=trial)
            np.testing.assert_array_equal(server.total, expected)
            alive = set(range(config.n_clients)) - set(drop[0]) - set(drop[1]) - set(drop[2])
            assert server.total_weight == sum(weights[u] for u in alive)
            outcomes.add("sum")
        else:
            with pytest.raises(SecAggError):
                run_round(config, updates, weights, drop, seed=trial)
            outcomes.add("raised")
    assert "sum" in outcomes


@pytest.mark.parametrize("phase", [0, 1, 2, 3])
def test_dropouts_at_each_phase_alone(phase):
    config = CONFIGS["SecAgg+ k=4"]
    updates = [np.full(config.dim, 0.25 * (u % 3)) for u in range(config.n_clients)]
    drop = [(), (), (), ()]
    drop[phase] = (1, 6)
    assert succeeds(config, drop)
    server, expected = run_round(config, updates, drop=tuple(drop))
    np.testing.assert_array_equal(server.total, expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_backend_gives_the_same_sum(backend):
    config = CONFIGS["full graph"]
    updates = [np.linspace(-1, 1, config.dim, dtype=np.float32) * (u + 1) / 10 for u in range(config.n_clients)]
    drop = ((0,), (3,), (5,), (8,))
    server, expected = run_round(config, updates, drop=drop, backend=backend)
    np.testing.assert_array_equal(server.total, expected)


def test_dequantised_sum_is_within_n_levels_of_the_float_sum():
    config = SecAggConfig(n_clients=8, threshold=4, dim=2000, clip=1.0, levels=2**10)
    rng = np.random.default_rng(3)
    updates = [rng.uniform(-1, 1, config.dim) for _ in range(8)]
    server, _ = run_round(config, updates)
    error = np.abs(server.sum() - np.sum(updates, axis=0))
    assert error.max() < 8 * 2 * config.clip / config.levels
    # weighted: the mean of the survivors, weights carried as the extra element
    config = SecAggConfig(n_clients=8, threshold=4, dim=2000, clip=1.0, levels=2**10, max_weight=5)
    weights = [1, 2, 3, 4, 5, 1, 2, 3]
    server, _ = run_round(config, updates, weights, drop=((), (), (7,), ()))
    want = np.average(updates[:7], axis=0, weights=weights[:7])
    assert server.total_weight == 18
    assert np.abs(server.mean() - want).max() < 2 * config.clip / config.levels


# --------------------------------------------------------------------------- what the server sees
def masked_vector(dim=1 << 16, bits=32, update=None):
    config = SecAggConfig(n_clients=4, threshold=2, dim=dim, levels=2**12, bits=bits)
    clients = [secagg.Client(u, config, entropy=entropy(50 + u)) for u in range(4)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    update = np.linspace(-1, 1, dim) if update is None else update
    return update, clients[0].masked_input(update, routed[0], seed=0).vector


@pytest.mark.parametrize("bits", [32, 64])
def test_masked_vectors_look_uniform_on_the_ring(bits):
    stats = pytest.importorskip("scipy.stats")
    update, masked = masked_vector(bits=bits)
    for shift in (bits - 8, 0):     # the top and the bottom byte of each word
        counts = np.bincount(((masked >> masked.dtype.type(shift)) & masked.dtype.type(255)).astype(np.int64),
                             minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    # and uncorrelated with the input (which is a ramp, as far from uniform as it gets)
    top = (masked >> masked.dtype.type(bits - 16)).astype(np.float64)
    assert abs(np.corrcoef(top[:-1], update)[0, 1]) < 5 / np.sqrt(update.size)


def test_a_constant_input_still_masks_to_uniform():
    stats = pytest.importorskip("scipy.stats")
    _, masked = masked_vector(update=np.zeros(1 << 16))
    counts = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


# --------------------------------------------------------------------------- Shamir
@pytest.mark.parametrize("t, n", [(1, 1), (2, 3), (3, 5), (7, 10)])
def test_any_t_shares_reconstruct_and_fewer_do_not(t, n):
    rng = np.random.default_rng(t * n)
    secret = rng.bytes(32)
    shares = secagg.split_secret(secret, t, holders=list(range(3, 3 + n)), entropy=entropy(t))
    for _ in range(5):
        subset = [shares[i] for i in rng.permutation(n)[:t]]
        assert secagg.combine_shares(subset, t) == secret
    assert secagg.combine_shares(shares, t) == secret
    if t > 1:
        with pytest.raises(SecAggError):
            secagg.combine_shares(shares[:t - 1], t)
        # t - 1 shares interpolated as if they were enough give something else
        try:
            assert secagg.combine_shares(shares[:t - 1], t - 1) != secret
        except SecAggError:
            pass  # or no 32-byte value at all


def test_shares_of_different_secrets_do_not_mix():
    one = secagg.split_secret(b"x" * 32, 2, [0, 1, 2], owner=1, round=4)
    other_round = secagg.split_secret(b"x" * 32, 2, [0, 1, 2], owner=1, round=5)
    other_owner = secagg.split_secret(b"x" * 32, 2, [0, 1, 2], owner=2, round=4)
    other_kind = secagg.split_secret(b"x" * 32, 2, [0, 1, 2], owner=1, round=4, kind="key")
    for bad in (other_round, other_owner, other_kind):
        with pytest.raises(SecAggError, match="mixed"):
            secagg.combine_shares([one[0], bad[1]], 2)
    with pytest.raises(SecAggError, match="holder"):
        secagg.combine_shares([one[0], one[0]], 2)


# --------------------------------------------------------------------------- double masking
def unmask_phase(config=None):
    config = config or CONFIGS["full graph"]
    clients = [secagg.Client(u, config, entropy=entropy(70 + u)) for u in range(config.n_clients)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    masked = [c.masked_input(np.zeros(config.dim), routed[c.client_id]) for c in clients[:-1]]
    return clients, server, server.receive_masked(masked)


def test_a_client_never_reveals_both_secrets_of_one_client():
    clients, server, request = unmask_phase()
    both = secagg.UnmaskRequest(request.round, request.survivors, request.dropped + (request.survivors[1],))
    with pytest.raises(SecAggError, match="survivors and as dropped"):
        clients[0].unmask(both)
    clients[0].unmask(request)
    # a second request that swaps a survivor into the dropped list
    swapped = secagg.UnmaskRequest(request.round, tuple(u for u in request.survivors if u != 2),
                                   request.dropped + (2,))
    with pytest.raises(SecAggError, match="already revealed"):
        clients[0].unmask(swapped)


def test_the_server_refuses_a_share_of_the_other_kind():
    clients, server, request = unmask_phase()
    responses = {u: clients[u].unmask(request) for u in request.survivors}
    # the mask key of a survivor, which an honest client never sends: the server must not use it
    survivor = request.survivors[0]
    stolen = secagg.Share(survivor, 1, request.round, "key", clients[1]._held[survivor][1])
    responses[1] = responses[1] + [stolen]
    with pytest.raises(SecAggError, match="would unmask"):
        server.unmask(responses)


def test_the_server_asks_for_seeds_of_survivors_and_keys_of_the_dropped():
    _, _, request = unmask_phase()
    assert set(request.survivors) == set(range(9)) and request.dropped == (9,)


# --------------------------------------------------------------------------- faults and bad input
def test_too_few_survivors_raise_at_every_phase():
    config = SecAggConfig(n_clients=5, threshold=4, dim=3)
    clients = [secagg.Client(u, config, entropy=entropy(u)) for u in range(5)]
    server = secagg.Server(config)
    with pytest.raises(SecAggError, match="threshold"):
        secagg.Server(config).receive_keys([c.advertise_keys() for c in clients[:3]])
    clients = [secagg.Client(u, config, entropy=entropy(u)) for u in range(5)]
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    masked = [c.masked_input(np.zeros(3), routed[c.client_id]) for c in clients]
    request = server.receive_masked(masked)
    responses = {u: clients[u].unmask(request) for u in range(3)}  # two drop while unmasking
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        server.unmask(responses)


def test_a_share_for_another_holder_or_round_raises():
    config = CONFIGS["full graph"]
    clients = [secagg.Client(u, config, entropy=entropy(u)) for u in range(config.n_clients)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    misrouted = dict(routed[0])
    misrouted[1] = routed[2][1]   # client 1's share meant for holder 2
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[0].masked_input(np.zeros(config.dim), misrouted)
    # a share object of another round at the server
    _, server, request = unmask_phase()
    with pytest.raises(SecAggError, match="round"):
        server.unmask({0: [secagg.Share(1, 0, request.round + 1, "seed", 5)]})


def test_messages_of_another_round_raise():
    config = CONFIGS["full graph"]
    other = SecAggConfig(n_clients=10, threshold=5, dim=37, clip=1.0, levels=2**12, round=1)
    server = secagg.Server(config)
    messages = [secagg.Client(u, config).advertise_keys() for u in range(9)] + \
        [secagg.Client(9, other).advertise_keys()]
    with pytest.raises(SecAggError, match="round 1"):
        server.receive_keys(messages)


@pytest.mark.parametrize("bad, error", [
    (np.zeros(37, np.uint32), fedkern.FedkernValueError),           # no weight element
    (np.zeros(39, np.uint32), fedkern.FedkernValueError),
    (np.zeros(38, np.uint64), fedkern.FedkernTypeError),            # the other ring
    (np.zeros(38, np.int32), fedkern.FedkernTypeError),
    (np.zeros(38, np.float64), fedkern.FedkernTypeError),
    (np.zeros(76, np.uint32)[::2], fedkern.FedkernValueError),
])
def test_a_masked_vector_of_the_wrong_length_or_dtype_raises(bad, error):
    config = CONFIGS["full graph"]
    clients = [secagg.Client(u, config, entropy=entropy(u)) for u in range(config.n_clients)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    masked = [c.masked_input(np.zeros(37), routed[c.client_id]) for c in clients]
    masked[4] = secagg.MaskedInput(4, config.round, bad)
    with pytest.raises(error, match="client 4"):
        server.receive_masked(masked)


def test_masks_that_do_not_cancel_raise():
    config = CONFIGS["full graph"]
    clients = [secagg.Client(u, config, entropy=entropy(u)) for u in range(config.n_clients)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    masked = [c.masked_input(np.zeros(37), routed[c.client_id]) for c in clients]
    masked[3].vector[-1] += np.uint32(12345)  # altered in transit
    request = server.receive_masked(masked)
    with pytest.raises(SecAggError, match="did not cancel"):
        server.unmask({c.client_id: c.unmask(request) for c in clients})


def test_the_ring_must_hold_the_sum():
    assert secagg.ring_bits_needed(2, 2**31 - 2) == 32
    assert secagg.ring_bits_needed(2, 2**31) == 64          # 2 * 2^31 is not < 2^32
    assert secagg.ring_bits_needed(2, 2**31 - 1) == 64      # odd Q reaches ceil(Q/2)
    with pytest.raises(fedkern.FedkernValueError, match="cannot hold"):
        SecAggConfig(n_clients=100, threshold=10, dim=5, levels=2**24, max_weight=3)
    SecAggConfig(n_clients=100, threshold=10, dim=5, levels=2**24, max_weight=3, bits=64)
    with pytest.raises(fedkern.FedkernValueError, match="no ring"):
        secagg.ring_bits_needed(2**40, 2**30)
    # a weight above the configured maximum is refused before anything is sent
    config = SecAggConfig(n_clients=3, threshold=2, dim=2, max_weight=4)
    clients = [secagg.Client(u, config) for u in range(3)]
    server = secagg.Server(config)
    keys = server.receive_keys([c.advertise_keys() for c in clients])
    routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    with pytest.raises(fedkern.FedkernValueError, match="weight"):
        clients[0].masked_input(np.zeros(2), routed[0], weight=5)


@pytest.mark.parametrize("kwargs", [dict(neighbours=3, n_clients=7), dict(threshold=6, neighbours=4),
                                    dict(threshold=0), dict(bits=16), dict(neighbours=12)])
def test_bad_configs_raise(kwargs):
    base = dict(n_clients=12, threshold=3, dim=4)
    with pytest.raises(fedkern.FedkernError):
        SecAggConfig(**(base | kwargs))


def test_phases_out_of_order_raise():
    config = CONFIGS["full graph"]
    client = secagg.Client(0, config)
    with pytest.raises(SecAggError, match="out of order"):
        client.share_keys({})
    with pytest.raises(SecAggError, match="out of order"):
        secagg.Server(config).receive_masked([])


def test_the_graph_is_k_regular_and_symmetric():
    config = SecAggConfig(n_clients=11, threshold=3, dim=1, neighbours=4, graph_seed=5)
    for u in range(11):
        assert len(config.neighbours_of(u)) == 4 and u not in config.neighbours_of(u)
        assert all(u in config.neighbours_of(v) for v in config.neighbours_of(u))
    odd = SecAggConfig(n_clients=10, threshold=3, dim=1, neighbours=5)
    assert all(len(odd.neighbours_of(u)) == 5 for u in range(10))


# --------------------------------------------------------------------------- the ring kernels
def test_quantize_is_unbiased_clipped_and_twos_complement():
    x = np.full(200_000, -0.3)
    q = secagg.ring_quantize(x, clip=1.0, levels=10, seed=4)
    signed = q.view(np.int32)
    assert set(np.unique(signed)) == {-2, -1}                    # -0.3 * 5 = -1.5
    assert abs(signed.mean() + 1.5) < 5 * 0.5 / np.sqrt(x.size)
    assert np.array_equal(secagg.ring_quantize(np.array([5.0, -5.0]), 1.0, 10, 0), np.array([5, 2**32 - 5], np.uint32))
    weighted = secagg.ring_quantize(np.array([-1.0]), 1.0, 10, 0, weight=3, bits=64)
    assert weighted.dtype == np.uint64 and weighted[0] == 2**64 - 15
    np.testing.assert_array_equal(secagg.ring_dequantize(q, 1.0, 10), signed * 0.2)


def test_quantize_rejects_non_finite_input():
    with pytest.raises(fedkern.NonFiniteError):
        secagg.ring_quantize(np.array([0.0, np.nan]), 1.0, 4, 0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_add_masks_adds_aes_ctr_keystreams(backend, dtype):
    ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
    d = 3 * 16384 + 5   # several chunks and a cut one
    keys = [bytes([i]) * 32 for i in range(3)]
    x = np.arange(d, dtype=dtype)
    want = x.copy()
    for key, sign in zip(keys, [1, -1, 1]):
        encryptor = ciphers.Cipher(ciphers.algorithms.AES(key), ciphers.modes.CTR(bytes(16))).encryptor()
        stream = np.frombuffer(encryptor.update(bytes(d * x.itemsize)), dtype)
        want = want + stream if sign == 1 else want - stream
    for threads in (1, 2):
        fedkern.set_num_threads(threads)
        np.testing.assert_array_equal(secagg.add_masks(x, keys, [1, -1, 1], backend=backend), want)
    assert np.array_equal(secagg.add_masks(secagg.add_masks(x, keys[:1], [1]), keys[:1], [-1]), x)


def test_cryptography_is_imported_lazily_and_missing_names_the_extra(monkeypatch):
    code = "import sys, fedkern; from fedkern import secagg; assert 'cryptography' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    secagg._cryptography.cache_clear()
    monkeypatch.setitem(sys.modules, "cryptography", None)
    monkeypatch.setitem(sys.modules, "cryptography.exceptions", None)
    try:
        with pytest.raises(fedkern.BackendUnavailableError, match=r"fedkern\[secagg\]"):
            secagg.Client(0, CONFIGS["full graph"])
    finally:
        secagg._cryptography.cache_clear()
