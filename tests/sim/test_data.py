"""FederatedData / FederatedDataset: the CSR container every simulation stage reads."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedkern._errors import FedkernTypeError, FedkernValueError
from fedkern.sim.data import FederatedData, FederatedDataset


def small(n_rows=6, n_features=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_rows, n_features)), rng.integers(0, 3, n_rows)


def test_layout_and_dtypes():
    x, y = small()
    data = FederatedData(x, y, [0, 2, 2, 6])
    assert data.x.dtype == np.float32 and data.x.flags.c_contiguous
    assert data.y.dtype == np.int32 and data.offsets.dtype == np.int64
    assert (data.n_clients, data.n_features, len(data)) == (3, 3, 6)
    assert data.sizes.tolist() == [2, 0, 4] and data.sizes.dtype == np.int64
    assert data.n_classes == int(y.max()) + 1
    np.testing.assert_array_equal(data.x, x.astype(np.float32))
    assert "n_clients=3" in repr(data)


def test_no_copy_when_already_float32_and_caller_array_untouched():
    x = np.ones((4, 2), dtype=np.float32)
    y = np.zeros(4, dtype=np.int32)
    data = FederatedData(x, y, np.array([0, 4]))
    assert np.shares_memory(data.x, x) and np.shares_memory(data.y, y)
    assert x.flags.writeable and y.flags.writeable  # the caller's flags are left alone
    assert not data.x.flags.writeable and not data.y.flags.writeable and not data.offsets.flags.writeable


def test_non_contiguous_and_integer_features_are_converted():
    x = np.arange(24).reshape(4, 6)[:, ::2]
    data = FederatedData(x, [0, 1, 0, 1], [0, 4])
    assert data.x.flags.c_contiguous
    np.testing.assert_array_equal(data.x, x)


def test_client_is_a_zero_copy_view():
    x, y = small()
    data = FederatedData(x, y, [0, 2, 2, 6])
    cx, cy = data.client(2)
    assert np.shares_memory(cx, data.x) and np.shares_memory(cy, data.y)
    np.testing.assert_array_equal(cy, y[2:])
    assert data.client(np.int64(1))[0].shape == (0, 3)


@pytest.mark.parametrize("c, error", [(3, FedkernValueError), (-1, FedkernValueError),
                                      (1.0, FedkernTypeError), (True, FedkernTypeError)])
def test_bad_client_index(c, error):
    data = FederatedData(*small(), [0, 2, 2, 6])
    with pytest.raises(error, match="c must"):
        data.client(c)


def test_label_counts_cached_and_correct():
    x, y = small(30, seed=3)
    data = FederatedData(x, y, [0, 10, 10, 30])
    counts = data.label_counts()
    assert counts.shape == (3, data.n_classes) and counts.dtype == np.int64
    for c in range(3):
        np.testing.assert_array_equal(counts[c], np.bincount(data.client(c)[1], minlength=data.n_classes))
    assert data.label_counts() is counts


def test_float_labels_with_no_fraction_and_explicit_n_classes():
    data = FederatedData(np.zeros((3, 1)), np.array([0.0, 2.0, 1.0]), [0, 3], n_classes=5)
    assert data.y.tolist() == [0, 2, 1] and data.n_classes == 5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=np.zeros(3)), FedkernValueError, "x must be a 2-D"),
    (dict(x=np.zeros((3, 0))), FedkernValueError, "x has no features"),
    (dict(x=np.array([["a"], ["b"], ["c"]])), FedkernTypeError, "x must hold real"),
    (dict(x=np.array([[1.0], [np.nan], [0.0]])), FedkernValueError, "x holds a NaN .* row 1"),
    (dict(x=np.array([[1.0], [1e300], [0.0]])), FedkernValueError, "x holds a NaN or infinity"),
    (dict(y=[0, 1]), FedkernValueError, "y must be 1-D with one label per row"),
    (dict(y=[0.5, 1, 0]), FedkernValueError, "y must hold integer labels"),
    (dict(y=[np.nan, 1, 0]), FedkernValueError, "y must hold integer labels"),
    (dict(y=[-1, 1, 0]), FedkernValueError, "labels >= 0"),
    (dict(y=np.array([2**40, 0, 0])), FedkernValueError, "int32 range"),
    (dict(y=np.array(["a", "b", "c"])), FedkernTypeError, "y must hold integer"),
    (dict(offsets=[0, 1.5, 3]), FedkernTypeError, "offsets must hold integers"),
    (dict(offsets=[0]), FedkernValueError, "offsets must be 1-D"),
    (dict(offsets=[1, 3]), FedkernValueError, "start at 0 and end at the row count 3"),
    (dict(offsets=[0, 2]), FedkernValueError, "end at the row count 3"),
    (dict(offsets=[0, 2, 1, 3]), FedkernValueError, "non-decreasing"),
    (dict(n_classes=2), FedkernValueError, r"labels must lie in \[0, n_classes=2\)"),
    (dict(n_classes=0), FedkernValueError, "n_classes must be >= 1"),
    (dict(n_classes=2.0), FedkernTypeError, "n_classes must be an integer"),
])
def test_bad_input(kwargs, error, match):
    args = dict(x=np.zeros((3, 2)), y=[0, 2, 1], offsets=[0, 1, 3], n_classes=None) | kwargs
    with pytest.raises(error, match=match):
        FederatedData(**args)


def test_empty_data_needs_n_classes():
    with pytest.raises(FedkernValueError, match="n_classes cannot be inferred"):
        FederatedData(np.zeros((0, 2)), [], [0, 0])
    data = FederatedData(np.zeros((0, 2)), [], [0, 0, 0], n_classes=2)
    assert data.label_counts().tolist() == [[0, 0], [0, 0]]


def test_from_client_ids_is_a_stable_grouping():
    x, y = small(8, seed=1)
    ids = np.array([2, 0, 2, 1, 0, 2, 2, 0])
    data = FederatedData.from_client_ids(x, y, ids, n_clients=4)
    assert data.sizes.tolist() == [3, 1, 4, 0]
    for c in range(4):
        rows = np.flatnonzero(ids == c)  # ascending, i.e. the original order
        np.testing.assert_array_equal(data.client(c)[0], x[rows].astype(np.float32))
        np.testing.assert_array_equal(data.client(c)[1], y[rows])
    assert FederatedData.from_client_ids(x, y, ids).n_clients == 3


@pytest.mark.parametrize("ids, n_clients, error, match", [
    ([0, 1], None, FedkernValueError, "one id per row"),
    ([0, -1, 0], None, FedkernValueError, "client_ids must be >= 0"),
    ([0, 1, 0.5], None, FedkernTypeError, "client_ids must hold integer"),
    ([0, 3, 0], 2, FedkernValueError, "n_clients must be >= 4 .client_ids go up to 3"),
])
def test_from_client_ids_errors(ids, n_clients, error, match):
    with pytest.raises(error, match=match):
        FederatedData.from_client_ids(np.zeros((3, 1)), [0, 0, 0], ids, n_clients=n_clients)


def test_from_client_ids_with_no_rows():
    with pytest.raises(FedkernValueError, match="n_clients cannot be inferred"):
        FederatedData.from_client_ids(np.zeros((0, 1)), [], [], n_classes=1)
    assert FederatedData.from_client_ids(np.zeros((0, 1)), [], [], n_clients=2, n_classes=1).n_clients == 2


def test_from_partition_gathers_in_the_given_order():
    x, y = small(6, seed=2)
    parts = [np.array([5, 0]), np.array([], dtype=np.int64), [3]]
    data = FederatedData.from_partition(x, y, parts)
    assert data.sizes.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(data.y, y[[5, 0, 3]])
    np.testing.assert_array_equal(data.x, x[[5, 0, 3]].astype(np.float32))
    assert data.n_classes == int(y.max()) + 1  # rows left out still count


@pytest.mark.parametrize("parts, error, match", [
    ([np.array([0, 1]), np.array([1])], FedkernValueError, "row 1 to more than one place"),
    ([np.array([0, 0])], FedkernValueError, "row 0 to more than one place"),
    ([np.array([0, 6])], FedkernValueError, "row index 6, outside"),
    ([np.array([-1])], FedkernValueError, "row index -1, outside"),
    ([np.array([0.0])], FedkernTypeError, r"partition\[0\] must hold integer"),
    ([np.array([0]), np.array([[1]])], FedkernValueError, r"partition\[1\] must be 1-D"),
    ([], FedkernValueError, "partition is empty"),
    (np.array([[0, 1]]), FedkernTypeError, "partition must be a sequence"),
])
def test_from_partition_errors(parts, error, match):
    x, y = small(6)
    with pytest.raises(error, match=match):
        FederatedData.from_partition(x, y, parts)


def test_with_labels_shares_features():
    x, y = small(6)
    data = FederatedData(x, y, [0, 3, 6], n_classes=4)
    flipped = data.with_labels(3 - data.y)
    assert flipped.x is data.x and flipped.offsets is data.offsets and flipped.n_classes == 4
    np.testing.assert_array_equal(flipped.y, 3 - data.y)
    assert data.y.tolist() == np.asarray(y).tolist()
    with pytest.raises(FedkernValueError, match="n_classes=4"):
        data.with_labels(np.full(6, 4))
    with pytest.raises(FedkernValueError, match="one label per row"):
        data.with_labels([0])


@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.integers(1, 8))
def test_from_client_ids_matches_a_per_client_oracle(ids, extra):
    ids = np.array(ids)
    n = int(ids.max()) + extra
    x = np.arange(ids.size, dtype=np.float64)[:, None]
    data = FederatedData.from_client_ids(x, ids % 3, ids, n_clients=n)
    assert data.offsets[0] == 0 and data.offsets[-1] == ids.size and (np.diff(data.offsets) >= 0).all()
    for c in range(n):
        np.testing.assert_array_equal(data.client(c)[0][:, 0], np.flatnonzero(ids == c))
    np.testing.assert_array_equal(data.label_counts().sum(axis=0), np.bincount(ids % 3, minlength=data.n_classes))


def test_many_clients_cost_two_arrays():
    n_clients = 200_000
    ids = np.arange(n_clients * 2) % n_clients
    data = FederatedData.from_client_ids(np.zeros((ids.size, 1), np.float32), np.zeros(ids.size, np.int32), ids)
    assert data.n_clients == n_clients and (data.sizes == 2).all()
    assert data.label_counts().shape == (n_clients, 1)


def federated(n_clients=2, n_classes=3, n_features=2):
    return FederatedData(np.zeros((n_clients, n_features)), np.arange(n_clients) % n_classes,
                         np.arange(n_clients + 1), n_classes=n_classes)


def test_federated_dataset():
    train = federated(4)
    for test in (federated(1), federated(4)):
        assert FederatedDataset(train, test, "t").test is test
    with pytest.raises(AttributeError):
        FederatedDataset(train, federated(1), "t").name = "u"


@pytest.mark.parametrize("test, name, error, match", [
    (federated(2), "t", FedkernValueError, "1 client .central. or one per train client"),
    (federated(1, n_features=3), "t", FedkernValueError, "test has 3 features"),
    (federated(1, n_classes=2), "t", FedkernValueError, "test has n_classes=2"),
    ("nope", "t", FedkernTypeError, "test must be a FederatedData"),
    (federated(1), 3, FedkernTypeError, "name must be a str"),
])
def test_federated_dataset_errors(test, name, error, match):
    with pytest.raises(error, match=match):
        FederatedDataset(federated(4), test, name)
