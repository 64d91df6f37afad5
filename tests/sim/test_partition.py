"""Partition schemes: exact NIID-Bench index maps, structural properties and validation.

The fixture ``fixtures/niid_bench_partitions.npz`` holds index maps made by running
NIID-Bench's own ``partition_data`` (see fixtures/README.md); only the numbers are kept.
"""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedkern._errors import FedkernTypeError, FedkernValueError
from fedkern.datasets import Dataset
from fedkern.sim import partition as P
from fedkern.sim.data import FederatedDataset

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "niid_bench_partitions.npz")
CASES = sorted({name.rsplit("|", 1)[0] for name in FIXTURE.files if "|" in name})


def ours(scheme: str, labels, n: int, beta: float, seed: int):
    """Our function and arguments for one NIID-Bench partition name (its datasets have K = 10)."""
    if scheme == "homo":
        return P.iid(labels, n, seed=seed)
    if scheme == "noniid-labeldir":
        return P.dirichlet(labels, n, beta, n_classes=10, seed=seed)
    if scheme.startswith("noniid-#label"):
        return P.label_quantity(labels, n, int(scheme[len("noniid-#label"):]), n_classes=10, seed=seed)
    assert scheme == "iid-diff-quantity"
    return P.quantity_skew(labels, n, beta=beta, seed=seed)


def test_fixture_covers_every_niid_bench_scheme():
    schemes = {case.split("|")[1] for case in CASES}
    assert {"homo", "noniid-labeldir", "iid-diff-quantity", "noniid-#label1", "noniid-#label10"} <= schemes
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES)
def test_reproduces_niid_bench_exactly(case):
    labels_name, scheme, n, beta, seed = case.split("|")
    parts = ours(scheme, FIXTURE[f"labels_{labels_name}"], int(n), float(beta), int(seed))
    assert [p.dtype for p in parts] == [np.dtype(np.int64)] * int(n)
    offsets = np.concatenate([[0], np.cumsum([p.size for p in parts])])
    np.testing.assert_array_equal(offsets, FIXTURE[f"{case}|offsets"])
    np.testing.assert_array_equal(np.concatenate(parts), FIXTURE[f"{case}|order"])


def check_disjoint(parts, n_rows, covering=True):
    rows = np.concatenate(parts)
    assert np.unique(rows).size == rows.size, "a row is in two clients"
    assert rows.min() >= 0 and rows.max() < n_rows
    if covering:
        assert rows.size == n_rows


SCHEMES = {
    "iid": lambda y, n, seed: P.iid(y, n, seed=seed),
    "dirichlet": lambda y, n, seed: P.dirichlet(y, n, 0.5, min_size=1, seed=seed),
    "shards": lambda y, n, seed: P.shards(y, n, shards_per_client=2, seed=seed),
    "label_quantity": lambda y, n, seed: P.label_quantity(y, n, 2, seed=seed),
    "lognormal": lambda y, n, seed: P.quantity_skew(y, n, sigma=1.5, min_size=1, seed=seed),
    "dirichlet_quantity": lambda y, n, seed: P.quantity_skew(y, n, beta=1.0, min_size=1, seed=seed),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@given(n_rows=st.integers(40, 300), n_clients=st.integers(1, 12), n_classes=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
def test_partitions_are_disjoint_and_cover(scheme, n_rows, n_clients, n_classes, seed):
    labels = np.random.default_rng(seed).integers(0, n_classes, n_rows)
    labels[:n_classes] = np.arange(n_classes)  # every class present, so label_quantity covers all rows
    if scheme == "label_quantity" and n_classes < 2:
        return
    parts = SCHEMES[scheme](labels, n_clients, seed)
    assert len(parts) == n_clients
    covering = scheme != "label_quantity" or n_clients >= n_classes
    check_disjoint(parts, n_rows, covering)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeds_reproduce_and_differ(scheme):
    labels = np.repeat(np.arange(5), 40)
    first, again, other = (SCHEMES[scheme](labels, 6, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_inputs_are_not_mutated():
    labels = np.repeat(np.arange(4), 25)
    before = labels.copy()
    for scheme in SCHEMES.values():
        scheme(labels, 5, 0)
    np.testing.assert_array_equal(labels, before)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [p.size for p in P.iid(np.zeros(103, dtype=int), 10)]
    assert sizes == [11, 11, 11] + [10] * 7


@given(st.integers(1, 10), st.integers(2, 8), st.integers(0, 1000))
def test_label_quantity_holds_at_most_c_labels(per_client, n_classes, seed):
    per_client = min(per_client, n_classes)
    labels = np.repeat(np.arange(n_classes), 30)
    for part in P.label_quantity(labels, 9, per_client, seed=seed):
        assert np.unique(labels[part]).size <= per_client


def test_label_quantity_with_fewer_clients_than_classes_leaves_rows_out():
    labels = np.repeat(np.arange(10), 10)
    parts = P.label_quantity(labels, 3, 1, seed=0)
    assert [np.unique(labels[p]).tolist() for p in parts] == [[0], [1], [2]]
    check_disjoint(parts, labels.size, covering=False)
    assert sum(p.size for p in parts) == 30


def test_label_quantity_all_labels_splits_every_class_among_all():
    labels = np.repeat(np.arange(3), 9)
    for part in P.label_quantity(labels, 3, 3, seed=1):
        assert np.bincount(labels[part]).tolist() == [3, 3, 3]


@given(st.integers(1, 20), st.integers(1, 3), st.integers(0, 1000))
def test_shards_of_a_balanced_sorted_set_hold_at_most_s_labels(n_clients, per_client, seed):
    n_classes = 5
    shard = 7  # each class is a whole number of shards, so a shard holds one label
    n_shards = n_clients * per_client
    labels = np.repeat(np.arange(n_shards) * n_classes // n_shards, shard)  # near-balanced, shard-aligned
    parts = P.shards(labels, n_clients, shards_per_client=per_client, seed=seed)
    check_disjoint(parts, labels.size)
    for part in parts:
        assert part.size == per_client * shard
        assert np.unique(labels[part]).size <= per_client


def test_shards_mcmahan_setting():
    labels = np.repeat(np.arange(10), 60)  # 600 rows, 20 shards of 30 for 10 clients
    for part in P.shards(labels, 10, seed=0):
        assert part.size == 60 and np.unique(labels[part]).size <= 2


def test_dirichlet_respects_min_size_and_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = P.dirichlet(labels, 10, 0.1, min_size=20, seed=0)
    assert min(p.size for p in parts) >= 20
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    assert (counts.max(axis=1) / counts.sum(axis=1)).mean() > 0.5  # alpha = 0.1: most rows of one class
    wide = np.array([np.bincount(labels[p], minlength=10) for p in P.dirichlet(labels, 10, 1000.0, seed=0)])
    assert (wide.max(axis=1) / wide.sum(axis=1)).mean() < 0.3


def test_dirichlet_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(P, "MAX_TRIES", 5)
    with pytest.raises(FedkernValueError, match="no split giving each of n_clients=2 clients min_size=10 rows "
                                                r"in 5 draws \(alpha=0.01, 20 rows\); lower min_size"):
        P.dirichlet(np.zeros(20, dtype=int), 2, 0.01, min_size=10, seed=0)


def test_dirichlet_treats_an_underflowed_draw_as_failed(monkeypatch):
    monkeypatch.setattr(P, "MAX_TRIES", 3)
    with pytest.raises(FedkernValueError, match="in 3 of them every Dirichlet share underflowed"):
        P.dirichlet(np.repeat(np.arange(2), 10), 2, 1e-300, min_size=0)


def test_quantity_skew_lognormal_sizes():
    labels = np.zeros(1000, dtype=int)
    sizes = np.array([p.size for p in P.quantity_skew(labels, 20, sigma=2.0, min_size=5, seed=1)])
    assert sizes.sum() == 1000 and sizes.min() >= 5 and sizes.max() > 5 * sizes.min()
    equal = [p.size for p in P.quantity_skew(labels, 8, sigma=0.0, min_size=0)]
    assert max(equal) - min(equal) <= 1
    default = [p.size for p in P.quantity_skew(labels, 20, seed=1)]
    assert default == [p.size for p in P.quantity_skew(labels, 20, sigma=1.0, seed=1)]


def test_quantity_skew_dirichlet_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(P, "MAX_TRIES", 5)
    with pytest.raises(FedkernValueError, match=r"no Dirichlet\(beta=0.01\) sizes .* in 5 draws"):
        P.quantity_skew(np.zeros(40, dtype=int), 4, beta=0.01, min_size=10)


LABELS = np.repeat(np.arange(4), 5)


@pytest.mark.parametrize("call, error, match", [
    (lambda: P.iid(LABELS.astype(float), 2), FedkernTypeError, "labels must be integers"),
    (lambda: P.iid(LABELS.reshape(4, 5), 2), FedkernValueError, "non-empty 1-D"),
    (lambda: P.iid(np.zeros(0, dtype=int), 1), FedkernValueError, "non-empty 1-D"),
    (lambda: P.iid(LABELS - 1, 2), FedkernValueError, "labels must be >= 0"),
    (lambda: P.iid(LABELS, 0), FedkernValueError, "n_clients must be between 1 and 20"),
    (lambda: P.iid(LABELS, 21), FedkernValueError, "at most one client per row"),
    (lambda: P.iid(LABELS, True), FedkernTypeError, "n_clients must be an integer"),
    (lambda: P.iid(LABELS, 2, seed=-1), FedkernValueError, "seed must be between"),
    (lambda: P.iid(LABELS, 2, seed=1.5), FedkernTypeError, "seed must be an integer"),
    (lambda: P.dirichlet(LABELS, 2, 0.0), FedkernValueError, "alpha must be > 0"),
    (lambda: P.dirichlet(LABELS, 2, float("nan")), FedkernValueError, "alpha must be finite"),
    (lambda: P.dirichlet(LABELS, 2, 1.0, min_size=11), FedkernValueError, "min_size must be between 0 and 10"),
    (lambda: P.dirichlet(LABELS, 2, 1.0, n_classes=3), FedkernValueError, "n_classes must be >= 4"),
    (lambda: P.shards(LABELS, 5, shards_per_client=5), FedkernValueError, "shards_per_client must be between 1 and 4"),
    (lambda: P.shards(LABELS, 5, shards_per_client=0), FedkernValueError, "shards_per_client"),
    (lambda: P.label_quantity(LABELS, 2, 0), FedkernValueError, "labels_per_client must be between 1 and 4"),
    (lambda: P.label_quantity(LABELS, 2, 5), FedkernValueError, r"n_classes = 4"),
    (lambda: P.quantity_skew(LABELS, 2, sigma=1.0, beta=1.0), FedkernValueError, "not both"),
    (lambda: P.quantity_skew(LABELS, 2, sigma=-1.0), FedkernValueError, "sigma must be >= 0"),
    (lambda: P.quantity_skew(LABELS, 2, beta=0), FedkernValueError, "beta must be > 0"),
    (lambda: P.quantity_skew(LABELS, 2, min_size=11), FedkernValueError, "min_size must be between 0 and 10"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def central(n_train=40, n_test=10, n_classes=4, name="toy"):
    rng = np.random.default_rng(0)
    return Dataset(rng.normal(size=(n_train, 3)), np.arange(n_train) % (n_classes - 1),
                   rng.normal(size=(n_test, 3)), np.arange(n_test) % n_classes, n_classes, name)


def test_partitions_registry():
    assert list(P.PARTITIONS) == ["iid", "dirichlet", "shards", "label_quantity", "quantity_skew"]
    assert P.PARTITIONS["dirichlet"] is P.dirichlet


@pytest.mark.parametrize("name, params", [("iid", {}), ("dirichlet", {"alpha": 1.0, "min_size": 2}),
                                          ("shards", {}), ("label_quantity", {"labels_per_client": 2}),
                                          ("quantity_skew", {"sigma": 1.0, "min_size": 1})])
def test_partition_federates_a_central_dataset(name, params):
    data = central()
    fed = P.partition(data, name, 4, seed=1, **params)
    assert isinstance(fed, FederatedDataset) and fed.name == f"toy/{name}"
    assert fed.train.n_clients == 4 and fed.test.n_clients == 1 and len(fed.test) == 10
    assert fed.train.n_classes == fed.test.n_classes == 4  # from the dataset, though train lacks class 3
    if name in ("dirichlet", "label_quantity"):
        params["n_classes"] = 4
    parts = P.PARTITIONS[name](data.y_train, 4, seed=1, **params)
    rows = np.concatenate(parts)
    np.testing.assert_array_equal(fed.train.y, data.y_train[rows])
    np.testing.assert_array_equal(fed.train.x, data.x_train[rows].astype(np.float32))


def test_partition_passes_n_classes_to_the_schemes_that_take_it():
    data = central()  # train labels 0..2, dataset says 4 classes: dirichlet draws for 4
    fed = P.partition(data, "dirichlet", 2, alpha=1.0, min_size=1)
    parts = P.dirichlet(data.y_train, 2, 1.0, min_size=1, n_classes=4)
    np.testing.assert_array_equal(fed.train.y, data.y_train[np.concatenate(parts)])


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("nope", 2), {}, FedkernValueError, "unknown partition 'nope'; choose one of iid, dirichlet"),
    (("iid", 2), {"alpha": 1.0}, FedkernValueError, "'iid' takes no parameter 'alpha'; its parameters are seed"),
    (("dirichlet", 2), {}, FedkernValueError, "'dirichlet' needs parameter 'alpha'"),
])
def test_partition_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        P.partition(central(), *args, **kwargs)


def test_partition_needs_a_dataset():
    with pytest.raises(FedkernTypeError, match="dataset must be a fedkern.datasets.Dataset"):
        P.partition((1, 2), "iid", 2)


# ---------------------------------------------------------------- long-tailed federations
@given(st.integers(2, 12), st.floats(1.0, 500.0), st.integers(0, 2**32 - 1))
def test_long_tailed_keeps_the_exponential_profile(n_classes, ratio, seed):
    labels = np.random.default_rng(seed).integers(0, n_classes, 3000)
    counts = np.bincount(labels, minlength=n_classes)
    kept = P.long_tailed(labels, ratio, n_classes=n_classes, seed=seed)
    assert np.all(np.diff(kept) > 0)                             # sorted, no row twice
    profile = np.floor(counts.max() * ratio ** (-np.arange(n_classes) / (n_classes - 1)))
    want = np.minimum(counts, np.maximum(profile, 1))
    np.testing.assert_array_equal(np.bincount(labels[kept], minlength=n_classes), want)


def test_partition_with_an_imbalance_ratio_subsamples_only_the_train_rows():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = np.repeat(np.arange(2), 50)
    dataset = Dataset(x, y, x[:10], y[:10], 2, "toy")
    fed = P.partition(dataset, "iid", 4, imbalance_ratio=10.0, seed=3)
    assert fed.name == "toy/iid/long_tailed(10)"
    assert fed.train.label_counts().sum(axis=0).tolist() == [50, 5]
    assert fed.test.y.tolist() == y[:10].tolist()
    rows = fed.train.x[:, 0].astype(int) // 2                   # each kept row is one of the originals
    assert np.unique(rows).size == 55 and np.all(y[rows] == fed.train.y)
    assert P.partition(dataset, "iid", 4, seed=3).train.sizes.sum() == 100


@pytest.mark.parametrize("ratio, error", [(0.5, FedkernValueError), ("10", FedkernTypeError)])
def test_bad_imbalance_ratios(ratio, error):
    with pytest.raises(error, match="imbalance_ratio"):
        P.long_tailed(np.arange(4) % 2, ratio)
