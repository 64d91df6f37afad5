"""Split a central labelled dataset among clients: IID, label skew and quantity skew.

Every scheme maps the N central labels to one int64 array of row indices per client and
is vectorised: a few sorts, one concatenation and no Python work per row, so 100,000
clients over 10 million rows take seconds. Randomness comes from
``np.random.RandomState(seed)``; the NIID-Bench schemes replay that benchmark's calls on
numpy's global state in the same order, so for the same seed they give *exactly* its
index maps (Li, Diao, Chen and He, "Federated Learning on Non-IID Data Silos: An
Experimental Study", ICDE 2022; ``partition_data`` in github.com/Xtra-Computing/NIID-Bench,
which seeds ``np.random.seed(init_seed)`` and ``random.seed(init_seed)`` first).

Examples
--------
>>> from fedkern.sim import partition as P
>>> labels = np.repeat(np.arange(4), 5)
>>> [part.size for part in P.dirichlet(labels, 3, alpha=0.5, min_size=2, seed=1)]
[4, 9, 7]
>>> [np.unique(labels[part]).tolist() for part in P.shards(labels, 4, shards_per_client=1)]
[[2], [3], [1], [0]]
"""
from __future__ import annotations

import inspect
import random
from collections.abc import Callable

import numpy as np

from .._errors import FedkernTypeError, FedkernValueError
from .._validate import count, parameters, real
from ..datasets import Dataset
from .data import FederatedData, FederatedDataset

__all__ = ["iid", "dirichlet", "shards", "label_quantity", "quantity_skew", "long_tailed", "PARTITIONS",
           "partition"]

#: Attempts of a retrying scheme (dirichlet, quantity_skew with beta) before it gives up.
MAX_TRIES = 1000


# --- validation -------------------------------------------------------------------------

def _labels(labels) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype.kind not in "iu":
        raise FedkernTypeError(f"labels must be integers; got dtype {array.dtype}")
    if array.ndim != 1 or array.size == 0:
        raise FedkernValueError(f"labels must be a non-empty 1-D array; got shape {array.shape}")
    if array.min() < 0:
        raise FedkernValueError(f"labels must be >= 0; got {int(array.min())}")
    return array.astype(np.int64, copy=False)


def _n_clients(n_clients, n_rows: int) -> int:
    return count(n_clients, "n_clients", low=1, high=n_rows, why=" (at most one client per row)")


def _n_classes(n_classes, labels: np.ndarray) -> int:
    top = int(labels.max()) + 1
    if n_classes is None:
        return top
    return count(n_classes, "n_classes", low=top, why=f" (labels go up to {top - 1})")


def _rng(seed) -> np.random.RandomState:
    return np.random.RandomState(count(seed, "seed", low=0, high=2**32 - 1))


# --- shared pieces ----------------------------------------------------------------------

def _split(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut ``order`` into consecutive per-client pieces of the given sizes."""
    return np.split(order, np.cumsum(sizes)[:-1])


def _even_sizes(n_rows: int, parts: int) -> np.ndarray:
    """The piece sizes of ``np.array_split``: the first ``n_rows % parts`` pieces get one more."""
    sizes = np.full(parts, n_rows // parts, dtype=np.int64)
    sizes[: n_rows % parts] += 1
    return sizes


def _cut_sizes(proportions: np.ndarray, n_rows: int) -> np.ndarray:
    """Piece sizes of NIID-Bench's cut ``np.split(rows, (cumsum(p) * n).astype(int)[:-1])``."""
    cuts = np.clip((np.cumsum(proportions) * n_rows).astype(int)[:-1], 0, n_rows)
    return np.diff(cuts, prepend=0, append=n_rows)


def _group(rows: np.ndarray, owners: np.ndarray, n_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by owner, each owner's rows in their order in ``rows`` (a stable sort)."""
    by_owner = np.argsort(owners, kind="stable")
    return rows[by_owner], np.bincount(owners, minlength=n_clients)


def _by_class(labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices sorted by label (ascending within a class) and the class boundaries."""
    rows = np.argsort(labels, kind="stable")
    bounds = np.zeros(n_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(labels, minlength=n_classes), out=bounds[1:])
    return rows, bounds


# --- schemes ----------------------------------------------------------------------------

def iid(labels, n_clients: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle the rows and deal them out in near-equal consecutive blocks.

    One permutation of the N rows, cut like ``np.array_split`` (the first ``N % n_clients``
    clients get one row more): NIID-Bench's ``"homo"`` partition, index for index.

    Examples
    --------
    >>> from fedkern.sim.partition import iid
    >>> [part.tolist() for part in iid(np.zeros(5, dtype=int), 2, seed=0)]
    [[2, 0, 1], [3, 4]]
    """
    labels = _labels(labels)
    n_clients = _n_clients(n_clients, labels.size)
    order = _rng(seed).permutation(labels.size)
    return _split(order, _even_sizes(labels.size, n_clients))


def _dirichlet_attempt(rng, rows, bounds, n_clients, alpha) -> tuple[np.ndarray, np.ndarray] | None:
    """One pass of NIID-Bench's label-Dirichlet loop: (rows in class order, owners) or None."""
    n_rows = rows.size
    sizes = np.zeros(n_clients, dtype=np.int64)
    chunks, owners = [], []
    for k in range(bounds.size - 1):
        idx_k = rows[bounds[k]:bounds[k + 1]].copy()
        rng.shuffle(idx_k)
        shares = rng.dirichlet(np.repeat(alpha, n_clients))
        # balance: a client already holding N / n_clients rows gets no more
        shares = shares * (sizes < n_rows / n_clients)
        if idx_k.size == 0:
            continue
        total = shares.sum()
        if not total > 0:  # every open share underflowed to 0: NIID-Bench would divide by zero
            return None
        piece = _cut_sizes(shares / total, idx_k.size)
        sizes += piece
        chunks.append(idx_k)
        owners.append(np.repeat(np.arange(n_clients), piece))
    return np.concatenate(chunks), np.concatenate(owners)


def dirichlet(labels, n_clients: int, alpha: float, *, min_size: int = 10, n_classes: int | None = None,
              seed: int = 0) -> list[np.ndarray]:
    """Label skew: each class is split among the clients by Dirichlet(alpha) shares.

    NIID-Bench's ``"noniid-labeldir"`` exactly: for each class k (0 .. n_classes - 1) its
    rows are shuffled and cut by shares p ~ Dir(alpha 1_n), where clients that already hold
    N / n_clients rows get share 0 and the rest are renormalised; the cut points are
    ``floor(cumsum(p) * N_k)``. The whole draw repeats until every client holds at least
    ``min_size`` rows, and each client's rows are finally shuffled. Smaller ``alpha`` means
    more skew (alpha -> inf tends to IID).

    Parameters
    ----------
    alpha : float
        Dirichlet concentration, > 0.
    min_size : int
        Fewest rows any client may get (NIID-Bench: 10); ``0`` accepts the first draw.
    n_classes : int, optional
        Classes to loop over, default ``labels.max() + 1`` (NIID-Bench fixes it per
        dataset, e.g. 10: pass it to match a run whose labels miss the top classes).

    Raises
    ------
    FedkernValueError
        If ``MAX_TRIES`` (1000) draws all leave a client below ``min_size``. Where every
        open Dirichlet share underflows to 0 or NaN (numpy's legacy ``dirichlet`` does for
        alpha below about 1e-4) NIID-Bench divides by zero; here that draw counts as a
        failed attempt.

    Examples
    --------
    >>> from fedkern.sim.partition import dirichlet
    >>> labels = np.repeat(np.arange(3), 20)
    >>> parts = dirichlet(labels, 4, alpha=0.3, min_size=5, seed=0)
    >>> [np.bincount(labels[part], minlength=3).tolist() for part in parts]
    [[15, 0, 0], [4, 0, 3], [0, 1, 17], [1, 19, 0]]
    """
    labels = _labels(labels)
    n_clients = _n_clients(n_clients, labels.size)
    alpha = real(alpha, "alpha", low=0, low_inclusive=False)
    min_size = count(min_size, "min_size", low=0, high=labels.size // n_clients,
                     why=f" (N / n_clients = {labels.size / n_clients:g} rows per client)")
    rows, bounds = _by_class(labels, _n_classes(n_classes, labels))
    rng = _rng(seed)
    underflows = 0
    for _ in range(MAX_TRIES):
        attempt = _dirichlet_attempt(rng, rows, bounds, n_clients, alpha)
        if attempt is None:
            underflows += 1
            continue
        order, sizes = _group(*attempt, n_clients)
        if sizes.min() >= min_size:
            parts = _split(order, sizes)
            for part in parts:  # NIID-Bench shuffles every client's rows, client by client
                rng.shuffle(part)
            return parts
    why = f"; in {underflows} of them every Dirichlet share underflowed to 0 or NaN" if underflows else ""
    raise FedkernValueError(
        f"dirichlet found no split giving each of n_clients={n_clients} clients min_size={min_size} rows "
        f"in {MAX_TRIES} draws (alpha={alpha}, {labels.size} rows{why}); lower min_size, raise alpha or "
        f"use fewer clients"
    )


def shards(labels, n_clients: int, *, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Sort-and-shard label skew of McMahan et al. (2017), "Communication-Efficient Learning".

    The rows are sorted by label (stably), cut into S = n_clients * shards_per_client
    consecutive shards (sizes as ``np.array_split``), and a random permutation ``perm``
    of the shards gives client c the shards ``perm[c*s:(c+1)*s]``, concatenated in that
    order. Every row is used. With 100 clients and 2 shards each over MNIST this is the
    paper's pathological non-IID split: most clients see two digits.

    Examples
    --------
    >>> from fedkern.sim.partition import shards
    >>> labels = np.repeat(np.arange(5), 4)
    >>> [np.unique(labels[part]).tolist() for part in shards(labels, 5, shards_per_client=2, seed=3)]
    [[2], [0, 1], [3, 4], [0, 3], [1, 4]]
    """
    labels = _labels(labels)
    n_clients = _n_clients(n_clients, labels.size)
    per_client = count(shards_per_client, "shards_per_client", low=1, high=labels.size // n_clients,
                       why=f" (each shard needs a row: N / n_clients = {labels.size / n_clients:g})")
    n_shards = n_clients * per_client
    perm = _rng(seed).permutation(n_shards)
    rank = np.empty(n_shards, dtype=np.int64)
    rank[perm] = np.arange(n_shards)  # the place of each shard in the dealing order
    shard_sizes = _even_sizes(labels.size, n_shards)
    position_rank = np.repeat(rank, shard_sizes)
    order = np.argsort(labels, kind="stable")[np.argsort(position_rank, kind="stable")]
    sizes = np.bincount(rank // per_client, weights=shard_sizes, minlength=n_clients).astype(np.int64)
    return _split(order, sizes)


def _chosen_labels(n_clients: int, per_client: int, n_classes: int, seed: int) -> np.ndarray:
    """NIID-Bench's label sets: client i holds i mod K plus distinct random.randint draws."""
    draw = random.Random(seed)  # NIID-Bench draws these from Python's seeded global random
    chosen = np.empty((n_clients, per_client), dtype=np.int64)
    for i in range(n_clients):
        current = [i % n_classes]
        while len(current) < per_client:
            label = draw.randint(0, n_classes - 1)
            if label not in current:
                current.append(label)
        chosen[i] = current
    return chosen


def label_quantity(labels, n_clients: int, labels_per_client: int, *, n_classes: int | None = None,
                   seed: int = 0) -> list[np.ndarray]:
    """Label skew by count: each client holds rows of exactly ``labels_per_client`` classes.

    NIID-Bench's ``"noniid-#label{C}"`` exactly: client i takes class ``i mod K`` plus
    C - 1 other distinct classes drawn by ``random.Random(seed).randint`` (NIID-Bench's
    seeded Python ``random``); then each class's rows are shuffled and split like
    ``np.array_split`` among the clients holding it, in client order, and each client
    concatenates its pieces in class order.

    Two documented departures, both where NIID-Bench fails: a class that no client draws
    (possible when n_clients < K) raises ``ValueError`` there; here its rows stay
    unassigned (the partition then does not cover every row). NIID-Bench special-cases
    C = 10 and then splits only classes 0..9 among all clients; here C = K splits every
    class among all clients, which is the same whenever K = 10.

    Examples
    --------
    >>> from fedkern.sim.partition import label_quantity
    >>> labels = np.repeat(np.arange(4), 6)
    >>> [np.unique(labels[part]).tolist() for part in label_quantity(labels, 4, 2, seed=0)]
    [[0, 3], [1, 3], [0, 2], [2, 3]]
    """
    labels = _labels(labels)
    n_clients = _n_clients(n_clients, labels.size)
    k = _n_classes(n_classes, labels)
    per_client = count(labels_per_client, "labels_per_client", low=1, high=k, why=f" (n_classes = {k})")
    if per_client == k:  # every client holds every class: no draws needed
        chosen = np.tile(np.arange(k), (n_clients, 1))
    else:
        chosen = _chosen_labels(n_clients, per_client, k, seed)
    # the holders of each class, in client order (a stable sort of (client, class) pairs)
    pair_class = chosen.ravel()
    holders = np.repeat(np.arange(n_clients), per_client)[np.argsort(pair_class, kind="stable")]
    times = np.bincount(pair_class, minlength=k)
    rows, bounds = _by_class(labels, k)
    rng = _rng(seed)
    chunks, owners, start = [], [], 0
    for label in range(k):
        idx_k = rows[bounds[label]:bounds[label + 1]].copy()
        rng.shuffle(idx_k)
        if times[label] == 0:
            continue
        chunks.append(idx_k)
        owners.append(np.repeat(holders[start:start + times[label]], _even_sizes(idx_k.size, times[label])))
        start += times[label]
    order, sizes = _group(np.concatenate(chunks), np.concatenate(owners), n_clients)
    return _split(order, sizes)


def _dirichlet_quantity(rng, n_rows: int, n_clients: int, beta: float, min_size: int) -> np.ndarray:
    for _ in range(MAX_TRIES):
        shares = rng.dirichlet(np.repeat(beta, n_clients))
        shares = shares / shares.sum()
        if np.min(shares * n_rows) >= min_size:
            return _cut_sizes(shares, n_rows)
    raise FedkernValueError(
        f"quantity_skew found no Dirichlet(beta={beta}) sizes giving each of n_clients={n_clients} clients "
        f"min_size={min_size} of {n_rows} rows in {MAX_TRIES} draws; lower min_size, raise beta or use "
        f"fewer clients"
    )


def _lognormal_quantity(rng, n_rows: int, n_clients: int, sigma: float, min_size: int) -> np.ndarray:
    spare = n_rows - n_clients * min_size
    weights = rng.lognormal(0.0, sigma, n_clients)
    return min_size + _cut_sizes(weights / weights.sum(), spare)


def quantity_skew(labels, n_clients: int, *, sigma: float | None = None, beta: float | None = None,
                  min_size: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Quantity skew: IID rows, but clients hold very different numbers of them.

    The rows are shuffled (``RandomState(seed).permutation``) and cut into consecutive
    blocks whose sizes come from one of two models (give at most one of sigma, beta):

    * ``sigma`` (lognormal, the default with sigma = 1): weights w_c ~ LogNormal(0, sigma),
      drawn after the permutation; client c gets ``min_size`` rows plus its share
      w_c / sum(w) of the remaining N - n_clients * min_size rows, cut at
      ``floor(cumsum(share) * remaining)``. Never retries; sigma = 0 gives equal sizes.
    * ``beta`` (Dirichlet): NIID-Bench's ``"iid-diff-quantity"`` exactly: shares
      p ~ Dir(beta 1_n) are redrawn until ``min(p) * N >= min_size`` (its test, on the
      unrounded shares, so a client may end one row short) and cut at
      ``floor(cumsum(p) * N)``.

    Examples
    --------
    >>> from fedkern.sim.partition import quantity_skew
    >>> labels = np.zeros(100, dtype=int)
    >>> [part.size for part in quantity_skew(labels, 4, sigma=1.0, min_size=5, seed=0)]
    [18, 14, 45, 23]
    >>> [part.size for part in quantity_skew(labels, 4, beta=0.5, min_size=5, seed=0)]
    [7, 7, 60, 26]
    """
    labels = _labels(labels)
    n_rows = labels.size
    n_clients = _n_clients(n_clients, n_rows)
    if sigma is not None and beta is not None:
        raise FedkernValueError("quantity_skew takes sigma (lognormal sizes) or beta (Dirichlet sizes), not both")
    min_size = count(min_size, "min_size", low=0, high=n_rows // n_clients,
                     why=f" (N / n_clients = {n_rows / n_clients:g} rows per client)")
    if beta is not None:
        beta = real(beta, "beta", low=0, low_inclusive=False)
    else:
        sigma = real(1.0 if sigma is None else sigma, "sigma", low=0)
    rng = _rng(seed)
    order = rng.permutation(n_rows)
    if beta is not None:
        return _split(order, _dirichlet_quantity(rng, n_rows, n_clients, beta, min_size))
    return _split(order, _lognormal_quantity(rng, n_rows, n_clients, sigma, min_size))


def long_tailed(labels, ratio: float, *, n_classes: int | None = None, seed: int = 0) -> np.ndarray:
    """Rows of a long-tailed subsample: class c keeps n_c = floor(n_max ratio^(-c / (C - 1))) rows.

    The exponential profile of Cao et al. ("Learning Imbalanced Datasets with
    Label-Distribution-Aware Margin Loss", NeurIPS 2019) and of the CIFAR-LT benchmarks:
    class 0 keeps n_max rows (its own count), the last class n_max / ratio (at least 1),
    in between geometrically; a class that holds fewer rows than its n_c keeps them all.
    The kept rows of each class are a uniformly random subset (``RandomState(seed)``);
    the result is sorted. ``ratio = 1`` keeps every row of the largest class's count.

    Examples
    --------
    >>> from fedkern.sim.partition import long_tailed
    >>> labels = np.repeat(np.arange(3), 100)
    >>> np.bincount(labels[long_tailed(labels, 100)]).tolist()
    [100, 10, 1]
    """
    labels = _labels(labels)
    ratio = real(ratio, "imbalance_ratio", low=1.0)
    n_classes = _n_classes(n_classes, labels)
    rows, bounds = _by_class(labels, n_classes)
    counts = np.diff(bounds)
    profile = np.floor(counts.max() * ratio ** (-np.arange(n_classes) / max(n_classes - 1, 1)))
    keep = np.minimum(counts, np.maximum(profile, 1).astype(np.int64))
    rng = _rng(seed)
    kept = [rng.permutation(rows[bounds[c]:bounds[c + 1]])[:keep[c]] for c in range(n_classes)]
    return np.sort(np.concatenate(kept))


#: Partition schemes by name, for a run's configuration.
PARTITIONS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid, "dirichlet": dirichlet, "shards": shards,
    "label_quantity": label_quantity, "quantity_skew": quantity_skew,
}


def _scheme(name) -> Callable[..., list[np.ndarray]]:
    if name not in PARTITIONS:
        raise FedkernValueError(f"unknown partition {name!r}; choose one of {', '.join(PARTITIONS)}")
    return PARTITIONS[name]


def partition(dataset: Dataset, name: str, n_clients: int, *, imbalance_ratio: float = 1.0,
              **params) -> FederatedDataset:
    """Federate a central :class:`~fedkern.datasets.Dataset` with the scheme ``PARTITIONS[name]``.

    The train rows are split among ``n_clients`` clients by their labels; the test set
    stays central (a test :class:`FederatedData` with one client). Both keep the
    dataset's ``n_classes``, which is also passed to the schemes that take it. An
    ``imbalance_ratio`` above 1 first makes the federation's label distribution long-tailed
    (:func:`long_tailed`, with the scheme's ``seed``); the test set stays as it is, so its
    accuracy per class measures every class alike.

    Examples
    --------
    >>> from fedkern.datasets import Dataset
    >>> from fedkern.sim.partition import partition
    >>> x, y = np.arange(40.0).reshape(20, 2), np.arange(20) % 2
    >>> fed = partition(Dataset(x, y, x[:4], y[:4], 2, "toy"), "shards", 5, shards_per_client=1)
    >>> fed.name, fed.train.sizes.tolist(), fed.test.n_clients
    ('toy/shards', [4, 4, 4, 4, 4], 1)
    """
    if not isinstance(dataset, Dataset):
        raise FedkernTypeError(f"dataset must be a fedkern.datasets.Dataset; got {type(dataset).__name__}")
    scheme = _scheme(name)
    parameters(scheme, params, f"partition {name!r}", given=("labels", "n_clients"))
    if "n_classes" in inspect.signature(scheme).parameters:
        params.setdefault("n_classes", dataset.n_classes)
    train_x, train_labels = dataset.x_train, np.asarray(dataset.y_train)
    name_suffix = ""
    if imbalance_ratio != 1.0:
        kept = long_tailed(train_labels, imbalance_ratio, n_classes=dataset.n_classes, seed=params.get("seed", 0))
        train_x, train_labels = np.asarray(train_x)[kept], train_labels[kept]
        name_suffix = f"/long_tailed({imbalance_ratio:g})"
    parts = scheme(train_labels, n_clients, **params)
    train = FederatedData.from_partition(train_x, train_labels, parts, n_classes=dataset.n_classes)
    n_test = np.asarray(dataset.y_test).shape[0]
    test = FederatedData(dataset.x_test, dataset.y_test, [0, n_test], n_classes=dataset.n_classes)
    return FederatedDataset(train, test, f"{dataset.name}/{name}{name_suffix}")
