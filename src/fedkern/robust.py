r"""Byzantine-robust aggregation: rules that stay close to the honest clients' updates when
up to ``f`` of the K clients send arbitrary vectors, and pre-aggregators that prepare
updates for those rules.

Every op validates its inputs once (``fedkern._validate``), runs the kernels of the chosen
backend (``fedkern.backends``, family ``"robust"``) and returns numpy arrays; updates are
a (K, D) C-contiguous array or a sequence of K 1-D contiguous arrays, never stacked.

**Non-finite updates.** A Byzantine client may send NaN or inf, and a robust rule must
survive it, so these ops do not reject such updates up front. Coordinate-wise rules order
NaN as +inf; distance-based rules give a non-finite distance the value +inf, so an update
holding NaN or inf is never the nearest neighbour of a finite one and is never selected
while enough finite updates remain. ``check_finite=True`` (the default) raises
:class:`fedkern.NonFiniteError` only when the *result* is not finite, naming the first
client holding a non-finite value: the rule was given more bad values than it tolerates.

**Distances.** ``method="gram"`` computes :math:`\lVert a\rVert^2 + \lVert b\rVert^2 - 2ab`
with BLAS over coordinate tiles of the updates centred on one (finite) update, with each
tile's Gram matrix added into float64: centring removes the cancellation that makes the
plain Gram form useless for models far from the origin, and the tiles avoid any K x D
copy. ``method="exact"`` sums squared differences in float64. Gram results may vary in
the last bits with BLAS's thread count; exact ones never do. For
:func:`pairwise_sq_distances` and :func:`nearest_neighbor_mixing`, ``method="auto"`` (the
default) is exact for K <= :data:`EXACT_MAX_K`, where it is also the faster of the two
(memory-bound, while the Gram form pays for a copy of every tile), and Gram above.

**Selection.** For :func:`krum` (and Multi-Krum) and :func:`bulyan`, ``method="auto"``
selects exactly what ``method="exact"`` selects, on every input, at Gram speed: above
:data:`EXACT_MAX_K` it computes the centred Gram form in float64 tiles (on
:func:`fedkern.get_num_threads` threads when threadpoolctl is installed), bounds each
distance's rounding error rigorously (``_Certified``), bounds each score from those, and
computes exact distances only for the rows of the updates whose rank the bounds leave
open (``fedkern._krum``; typically none). ``method="gram"`` is the fast float-tile Gram
form alone, whose choice may differ from the exact one between near-tied updates.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _krum
from . import _shared as shared
from . import _validate as check
from ._updates import DTypeLike, OutUpdates, SeedLike, Updates, UpdatesLike, WeightsLike
from .backends import get_num_threads, kernels

METHODS = ("auto", "gram", "exact")
#: Largest K for which ``method="auto"`` computes exact distances (measured crossover:
#: exact 91 ms vs Gram 119 ms at K=8, D=1e7; Gram faster from K=16 on).
EXACT_MAX_K = 12
#: Bytes of one tile of coordinates read for the Gram and mixing products: it stays in
#: cache between the gather and the BLAS call.
TILE_BYTES = 4 << 20


# --------------------------------------------------------------------------- helpers
def _finish(op: str, rows: Updates, result: np.ndarray, check_finite: bool) -> np.ndarray:
    if check_finite and not np.isfinite(result).all():
        check.raise_nonfinite(op, rows, result)
    return result


def _byzantine(f, k: int, minimum_k, rule: str) -> int:
    """Validate ``f`` for a rule that needs K >= minimum_k(f)."""
    f = check.count(f, "f")
    if k < minimum_k(f):
        raise check.FedkernValueError(
            f"{rule} needs at least {minimum_k(f)} updates to tolerate f={f} Byzantine clients; got {k}"
        )
    return f


def _method(method: str, k: int) -> str:
    if method not in METHODS:
        raise check.FedkernValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "auto":
        return "exact" if k <= EXACT_MAX_K else "gram"
    return method


def _selection_method(method: str, k: int) -> str:
    """Krum's and Bulyan's method: ``"auto"`` is exact up to EXACT_MAX_K (the faster there,
    and the same choice), else ``"certified"``: the exact method's choice at Gram speed."""
    if method == "auto" and k > EXACT_MAX_K:
        return "certified"
    return _method(method, k)


def _tile_width(rows: Updates, dtype: np.dtype) -> int:
    """Coordinates per tile of ``dtype`` values: K of them fill TILE_BYTES."""
    return int(min(rows.d, max(256, TILE_BYTES // (rows.k * dtype.itemsize))))


def _tiles(rows: Updates, dtype: DTypeLike = None):
    """(j0, (K, n) C-contiguous tile buffer of ``dtype``, default the updates') over the
    coordinates, reusing one buffer."""
    dtype = rows.dtype if dtype is None else np.dtype(dtype)
    width = _tile_width(rows, dtype)
    buffer = np.empty(rows.k * width, dtype)
    for j0 in range(0, rows.d, width):
        n = min(width, rows.d - j0)
        yield j0, buffer[:rows.k * n].reshape(rows.k, n)


#: Held while Gram tiles run on several threads with BLAS limited to one thread each.
_PARALLEL_BLAS = threading.Lock()


@functools.lru_cache(maxsize=None)
def _blas_threads():
    """threadpoolctl's controller of the loaded BLAS (built once: a limit is then ~30 us),
    None without threadpoolctl: then Gram tiles run on one thread (same results). Imported
    here, on the first parallel Gram, so that ``import fedkern`` never imports it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _on_threads(work: Callable[[int, int], object], workers: int) -> list:
    """``[work(0, 1)]``, or ``[work(p, q) for p in range(q)]`` on q = ``workers`` threads.

    BLAS products of K x K tiles are too small for OpenBLAS to split well, and its threads
    fight when several callers use them at once, so the threads run with BLAS limited to
    one thread each. That limit is process-wide: it needs threadpoolctl (optional, a
    dependency of scikit-learn), and only one caller at a time sets it; any other runs
    ``work(0, 1)`` meanwhile.
    """
    controller = _blas_threads() if workers > 1 else None
    if controller is None or not _PARALLEL_BLAS.acquire(blocking=False):
        return [work(0, 1)]
    try:
        with controller.limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            return list(pool.map(work, range(workers), [workers] * workers))
    finally:
        _PARALLEL_BLAS.release()


def _centred_first(rows: Updates, backend: str | None) -> tuple[Updates, np.ndarray | None]:
    """The rows with their first finite update first (gather_tile centres on row 0), and
    the permutation undoing that (None when it is first already)."""
    center = next((i for i, bad in enumerate(shared.nonfinite(rows, backend)) if not bad), None)
    if not center:
        return rows, None
    order = np.r_[center, np.delete(np.arange(rows.k), center)]
    return rows.subset(order), np.argsort(order)


def _gram(parts: list[Updates], backend: str | None, dtype: DTypeLike = None, workers: int = 1) -> np.ndarray:
    """The sum over ``parts`` (the same K clients' updates in pieces) of each part's Gram
    matrix, centred on its first finite update: for one part, the Gram matrix of the
    updates centred on the first finite one. Tile by tile in ``dtype`` (default each
    part's own), the tiles' products added in float64; the tiles of every part are dealt
    round-robin to up to ``workers`` threads (see _on_threads), each summing its share."""
    module = kernels("robust", backend)
    k = parts[0].k
    centred = [_centred_first(rows, backend) for rows in parts]
    dtypes = [rows.dtype if dtype is None else np.dtype(dtype) for rows in parts]
    widths = [_tile_width(rows, tile_dtype) for (rows, _), tile_dtype in zip(centred, dtypes)]
    tiles = [(p, j0, min(width, rows.d - j0)) for p, ((rows, _), width) in enumerate(zip(centred, widths))
             for j0 in range(0, rows.d, width)]
    sizes: dict[np.dtype, int] = {}  # one buffer per tile dtype, for the widest tile
    for tile_dtype, width in zip(dtypes, widths):
        sizes[tile_dtype] = max(sizes.get(tile_dtype, 0), k * width)

    def products(worker: int, workers: int) -> list[np.ndarray]:
        grams = [np.zeros((k, k)) for _ in parts]
        buffers = {dt: np.empty(size, dt) for dt, size in sizes.items()}
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite updates are handled by the caller
            for p, j0, n in tiles[worker::workers]:
                tile = buffers[dtypes[p]][:k * n].reshape(k, n)
                module.gather_tile(centred[p][0], j0, True, tile)
                grams[p] += tile @ tile.T  # numpy calls BLAS SYRK for this product
        return grams

    shares = _on_threads(products, min(workers, len(tiles)))
    total = np.zeros((k, k))
    with np.errstate(invalid="ignore"):  # inf - inf: such a client is bad in any case
        for p, (_, inverse) in enumerate(centred):
            gram = shares[0][p]
            for share in shares[1:]:
                gram += share[p]
            total += gram if inverse is None else gram[np.ix_(inverse, inverse)]
    return total


def _sq_distances(rows: Updates, method: str, backend: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(K x K squared distances, mask of the updates whose squared norm is finite).

    Distances from or to an update that is not finite, and distances that overflow, are
    +inf; the diagonal is 0.
    """
    if method == "exact":
        distances = np.empty((rows.k, rows.k))
        kernels("robust", backend).exact_sq_distances(rows, distances)
        finite = np.ones(rows.k, bool)
        if not np.isfinite(distances).all():  # only then a scan to tell which updates are bad
            finite = ~shared.nonfinite_mask(rows, backend)
    else:
        gram = _gram([rows], backend)
        sq = np.diag(gram)
        finite = np.isfinite(sq)
        with np.errstate(invalid="ignore", over="ignore"):
            distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    distances[~finite] = np.inf
    distances[:, ~finite] = np.inf
    distances[~np.isfinite(distances)] = np.inf
    np.fill_diagonal(distances, 0.0)
    return distances, finite


def _gamma(m: int) -> float:
    """Higham's gamma_m = m u / (1 - m u) for float64 (u = 2^-53)."""
    return m * _krum.UNIT_ROUNDOFF / (1.0 - m * _krum.UNIT_ROUNDOFF)


class _Certified:
    r"""Bounds on the exact method's squared distances, from the centred Gram form, and the
    exact method's rows on demand: what :func:`fedkern._krum.certified_order` ranks with.

    The target :math:`\hat d_{il}` is what the exact method computes: per part the
    ``exact_sq_distances`` kernel (float64 differences and sums), summed over the parts in
    order from 0 (for one part, the kernel's value itself).

    Parameters
    ----------
    layers : list of validated Updates, the same K clients' updates in one or more parts
        (the Flower drop-in's layers)
    backend : the kernels' backend (as the exact method's, so its rows are the same bits)

    Attributes
    ----------
    lower, upper : (K, K) float64, ``lower <= d_hat <= upper`` entrywise between finite
        clients; +inf for a client holding NaN or inf (as the exact method gives), 0 on the
        diagonal
    bad : (K,) bool, the clients holding NaN or inf
    rows_computed : exact rows computed so far (the whole matrix counts K)

    **The bound.** Notation: u = 2^-53, :math:`\gamma_m = mu / (1 - mu)`,
    :math:`\lambda = 2^{-1022}` (float64's smallest normal), d coordinates in all, cut into
    t tiles of at most w coordinates, P parts, q threads. Each part is centred on one of its finite
    updates c, so :math:`a_i = x_i - c` (real) and the true distance is
    :math:`\delta_{il} = \lVert a_i - a_l \rVert^2` over all parts (a distance does not
    depend on the centre). ``gather_tile`` stores :math:`\tilde a_{ij} = \mathrm{fl}(x_{ij} - c_j)`
    in a float64 tile, one rounding: :math:`|\tilde a_{ij} - a_{ij}| \le u|a_{ij}| + \lambda`
    (:math:`\lambda` covers underflow, even flushed to zero). BLAS is assumed to compute
    each entry of a product as an inner product of its two rows, in floating point; the
    error bounds below hold for any order of summation, blocking, FMA use and thread count
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 2002, Sec. 3.1,
    Lemma 3.3, Eq. (3.5)):

    1. BLAS's product of one tile, :math:`g^T_{il} = \mathrm{fl}(\sum_{j \in T} \tilde a_{ij}\tilde a_{lj})`,
       is within :math:`\gamma_w \sum_{j\in T} |\tilde a_{ij}\tilde a_{lj}|`; the t tiles' products
       are added in float64 (each of q threads sums its share, then the threads' sums and
       the parts are added: one summation tree over t terms), within
       :math:`\gamma_{t-1} \sum_T |g^T_{il}|`, counted here as :math:`\gamma_{t+q+P}`. So the
       Gram entry :math:`G_{il}` is within :math:`\varepsilon\, p_{il} + \alpha` of
       :math:`\tilde a_i \cdot \tilde a_l`, where
       :math:`\varepsilon = \gamma_{w+t+q+P} \ge (1+\gamma_w)(1+\gamma_{t+q+P}) - 1`,
       :math:`p_{il} = \sum_j |\tilde a_{ij} \tilde a_{lj}| \le \lVert\tilde a_i\rVert \lVert\tilde a_l\rVert`
       (Cauchy-Schwarz) and :math:`\alpha = 2(d + t + q + P)\lambda` bounds underflow, at most
       :math:`\lambda` per operation.
    2. The diagonal then gives :math:`\lVert\tilde a_i\rVert^2 \le N_i^2 = (G_{ii} + \alpha)/(1 - \varepsilon)`;
       let :math:`S_{il} = (N_i + N_l)^2`.
    3. The Gram-form distance :math:`D_{il} = \max(0, \mathrm{fl}(G_{ii} + G_{ll} - 2G_{il}))`
       is within :math:`\varepsilon S_{il} + 4\alpha` (step 1, four entries) plus
       :math:`\gamma_2 (G_{ii} + G_{ll} + 2|G_{il}|) \le 1.01\gamma_2 S_{il}` (its own two
       roundings) of :math:`\lVert\tilde a_i - \tilde a_l\rVert^2`; the clamp at 0 only moves
       it towards the (non-negative) target.
    4. The tiles' rounding: :math:`e = |\lVert\tilde a_i - \tilde a_l\rVert - \lVert a_i - a_l\rVert|
       \le u(\lVert a_i\rVert + \lVert a_l\rVert) + 2\sqrt d\lambda \le 1.01u(N_i + N_l) + 3\sqrt d\lambda`,
       and :math:`|\lVert a_i - a_l\rVert^2 - \lVert\tilde a_i - \tilde a_l\rVert^2| \le e(2(N_i + N_l) + e)`.
    5. Together: :math:`|D_{il} - \delta_{il}| \le \kappa S_{il} + \beta_{il}`, with
       :math:`\kappa = \varepsilon + 3\gamma_2 + 3u` and
       :math:`\beta_{il} = 8(d + t + q + P)\lambda(1 + N_i + N_l)` (all underflow terms).
    6. The exact method's own error: per pair and coordinate one rounded difference, squared
       with one more rounding, then d terms summed in some order, then the parts added:
       :math:`\hat d_{il} = \sum_j (x_{ij} - x_{lj})^2 (1 + \theta_j)`, :math:`|\theta_j| \le \gamma_{d+P+2}`,
       within :math:`4(d + P)\lambda` for underflow. All terms are non-negative, so
       :math:`|\hat d_{il} - \delta_{il}| \le \gamma_{d+P+2}\,\delta_{il} + 4(d+P)\lambda`.

    Hence, with :math:`\Delta_{il} = 4\kappa S_{il} + \beta_{il}` (a safety factor 4 on
    :math:`\kappa S`),

    .. math:: \max\big(0, (D_{il} - \Delta_{il})(1 - \gamma_{d+P+2}) - 4(d+P)\lambda\big)
              \le \hat d_{il} \le (D_{il} + \Delta_{il})(1 + \gamma_{d+P+2}) + 4(d+P)\lambda.

    The bounds are evaluated in float64, a dozen roundings of relative size u on quantities
    of size at most :math:`1.01 S_{il}`; the safety factor leaves
    :math:`3\kappa S_{il} \ge 27 u S_{il}` of room for them. Centring keeps
    :math:`S_{il}` near :math:`4\delta_{il}` for updates near each other, far from the origin
    or not; at K = 100, D = 1e6 (w = 5242, t = 191) the bounds are within about 1e-11
    relative of the distance, so only scores within about that of the best one are ever
    recomputed. The float32 tiles of ``method="gram"`` (gamma_w ~ 6e-4 there) would leave
    most scores' intervals overlapping: the tiles are float64 whatever the updates' dtype.

    When an upper bound between two finite clients is not finite or above 2^1000 (the
    exact distance may overflow), or a client's squared norm overflows although it holds
    no NaN or inf, the bounds are replaced by the exact matrix itself (``lower = upper =``
    exact distances, every row known): the result is still the exact method's.
    """

    def __init__(self, layers: list[Updates], backend: str | None):
        self._layers, self._backend = layers, backend
        self.k = k = layers[0].k
        self.rows_computed = 0
        self._rows: dict[int, np.ndarray] = {}
        workers = get_num_threads()
        gram = _gram(layers, backend, np.float64, workers)
        width = tiles = d = 0
        for rows in layers:
            w = _tile_width(rows, np.dtype(np.float64))
            width, tiles, d = max(width, w), tiles + -(-rows.d // w), d + rows.d
        sq = np.diag(gram).copy()
        # a NaN or inf makes the squared norm NaN or inf; the converse (overflow) is checked
        self.bad = ~np.isfinite(sq)
        overflow = any(not self._holds_nonfinite(i) for i in np.flatnonzero(self.bad))
        parts, tiny = len(layers), np.finfo(np.float64).tiny
        tiles += workers  # the threads' sums of tiles are added too (step 1)
        eps = _gamma(width + tiles + parts)
        kappa = eps + 3 * _gamma(2) + 3 * _krum.UNIT_ROUNDOFF
        exact_gamma, exact_tiny = _gamma(d + parts + 2), 4 * (d + parts) * tiny
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.sqrt((sq + 2 * (d + tiles + parts) * tiny) / (1.0 - eps))
            pair = norms[:, None] + norms[None, :]
            slack = 4 * kappa * pair * pair + 8 * (d + tiles + parts) * tiny * (1.0 + pair)
            distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
            self.lower = np.maximum((distances - slack) * (1.0 - exact_gamma) - exact_tiny, 0.0)
            self.upper = (distances + slack) * (1.0 + exact_gamma) + exact_tiny
        good = np.flatnonzero(~self.bad)
        finite_upper = self.upper[np.ix_(good, good)]
        if overflow or not (finite_upper <= 2.0 ** 1000).all():  # also catches NaN
            self.bad = np.zeros(k, bool)
            for rows in layers:  # the exact method's own mask: a scan, not the squared norms
                self.bad |= shared.nonfinite_mask(rows, backend)
            self._exact_everything()
            return
        for bounds in (self.lower, self.upper):
            bounds[self.bad] = np.inf
            bounds[:, self.bad] = np.inf
            np.fill_diagonal(bounds, 0.0)

    def _holds_nonfinite(self, i: int) -> bool:
        count = kernels("aggregate", self._backend).count_nonfinite
        return any(count(rows[i]) > 0 for rows in self._layers)

    def _exact_everything(self) -> None:
        """The exact matrix, as the exact method computes it: bounds and every row known."""
        total = np.zeros((self.k, self.k))
        for rows in self._layers:
            total += _sq_distances(rows, "exact", self._backend)[0]
        self.rows_computed += self.k
        self.lower = self.upper = total
        self._rows = dict(enumerate(total))

    def exact_rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` of the exact distance matrix, bit for bit (computed once each).

        Beyond K/2 rows in all, the whole matrix (K^2 D / 2 work) is cheaper than more
        rows (K D each). Only the entries between finite clients are the exact method's
        exactly; those to a client holding NaN or inf are +inf there and here.
        """
        missing = np.array([i for i in indices if i not in self._rows], dtype=np.intp)
        if missing.size and len(self._rows) + missing.size > self.k // 2:
            self._exact_everything()
        elif missing.size:
            total = np.zeros((missing.size, self.k))
            for rows in self._layers:
                part = np.empty((missing.size, self.k))
                kernels("robust", self._backend).exact_sq_rows(rows, missing, part)
                part[~np.isfinite(part)] = np.inf
                total += part
            total[:, self.bad] = np.inf
            self.rows_computed += missing.size
            self._rows.update(zip(missing.tolist(), total))
        return np.array([self._rows[i] for i in indices]).reshape(len(indices), self.k)


# --------------------------------------------------------------------------- coordinate-wise rules
def median(updates: UpdatesLike, *, out: np.ndarray | None = None, dtype: DTypeLike = None,
           check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Coordinate-wise median, :math:`m_j = \mathrm{median}_i\, x_{ij}`.

    For even K the midpoint of the two middle values, as :func:`numpy.median`. Tolerates
    f < K/2 arbitrary updates (Yin et al., ICML 2018). NaN is ordered as +inf.

    Parameters
    ----------
    updates : (K, D) array or sequence of K 1-D arrays, float32 or float64
    out : (D,) array, optional, written in place and returned
    dtype : result dtype when ``out`` is not given (default: the updates')
    check_finite : raise :class:`fedkern.NonFiniteError` if the result is not finite
    backend : "reference", "cython", "numba" or "auto"

    Examples
    --------
    >>> fedkern.median(np.array([[1.0, 5.0], [2.0, -1.0], [100.0, 3.0]]))
    array([2., 3.])
    """
    rows = check.updates(updates)
    return _trimmed("median", rows, (rows.k - 1) // 2, rows.k // 2 + 1, out, dtype, check_finite, backend)


def trimmed_mean(updates: UpdatesLike, beta: float | None = None, *, f: int | None = None,
                 out: np.ndarray | None = None, dtype: DTypeLike = None, check_finite: bool = True,
                 backend: str | None = None) -> np.ndarray:
    r"""Coordinate-wise trimmed mean: drop the t smallest and t largest values, average the rest.

    .. math:: m_j = \frac{1}{K - 2t} \sum_{r=t}^{K-t-1} x_{(r)j}

    where :math:`x_{(r)j}` is the r-th smallest value of coordinate j and
    :math:`t = \lfloor \beta K \rfloor` (as :func:`scipy.stats.trim_mean`), or ``t = f``.
    Yin et al., ICML 2018. Give exactly one of ``beta`` (0 <= beta < 0.5) and ``f``;
    K - 2t must be at least 1. Other parameters as in :func:`median`.

    Examples
    --------
    >>> fedkern.trimmed_mean(np.array([[1.0], [2.0], [3.0], [100.0]]), f=1)
    array([2.5])
    """
    rows = check.updates(updates)
    if (beta is None) == (f is None):
        raise check.FedkernValueError("give exactly one of beta (a proportion) and f (a count) to trim")
    if f is None:
        beta = check.real(beta, "beta", low=0.0, high=0.5, high_inclusive=False)
        t = int(beta * rows.k)
    else:
        t = check.count(f, "f", high=(rows.k - 1) // 2, why=f" so that K - 2f >= 1 (K = {rows.k})")
    if rows.k - 2 * t < 1:
        raise check.FedkernValueError(f"beta={beta} trims all {rows.k} values of a coordinate")
    return _trimmed("trimmed_mean", rows, t, rows.k - t, out, dtype, check_finite, backend)


def _trimmed(op, rows, lo, hi, out, dtype, check_finite, backend):
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    kernels("robust", backend).trimmed_mean(rows, lo, hi, result)
    return _finish(op, rows, result, check_finite)


def meamed(updates: UpdatesLike, f: int, *, out: np.ndarray | None = None, dtype: DTypeLike = None,
           check_finite: bool = True, backend: str | None = None) -> np.ndarray:
    r"""Mean around the median: per coordinate, the mean of the K - f values closest to the median.

    Xie et al., "Generalized Byzantine-tolerant SGD", 2018. Needs K >= 2f + 1. The K - f
    values form a window of the sorted values grown from the median; when the next
    values below and above are equally close, the lower one is taken. Other parameters
    as in :func:`median`.

    Examples
    --------
    >>> fedkern.meamed(np.array([[0.0], [1.0], [2.0], [50.0]]), f=1)
    array([1.])
    """
    rows = check.updates(updates)
    f = _byzantine(f, rows.k, lambda f: 2 * f + 1, "meamed")
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    kernels("robust", backend, "meamed").meamed(rows, rows.k - f, result)
    return _finish("meamed", rows, result, check_finite)


# --------------------------------------------------------------------------- distance-based rules
def pairwise_sq_distances(updates: UpdatesLike, method: str = "auto", *,
                          backend: str | None = None) -> np.ndarray:
    r"""Squared Euclidean distances between every two updates, :math:`d_{il} = \lVert x_i - x_l\rVert^2`.

    Returns a symmetric (K, K) float64 matrix with a zero diagonal. ``method="gram"``
    (BLAS), ``"exact"`` (float64 differences) or ``"auto"`` (exact for small K, else
    Gram); see the module docstring. A distance that is not finite (an update holding
    NaN or inf) is +inf.

    Examples
    --------
    >>> fedkern.pairwise_sq_distances(np.array([[0.0, 0.0], [3.0, 4.0]]), method="exact")
    array([[ 0., 25.],
           [25.,  0.]])
    """
    rows = check.updates(updates)
    return _sq_distances(rows, _method(method, rows.k), backend)[0]


def krum(updates: UpdatesLike, f: int, m: int = 1, weights: WeightsLike | None = None, *, method: str = "auto",
         return_indices: bool = False, out: np.ndarray | None = None, dtype: DTypeLike = None,
         check_finite: bool = True, backend: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

    Each update's score is the sum of its squared distances to its K - f - 2 nearest
    other updates, :math:`s_i = \sum_{l \in N_i} \lVert x_i - x_l \rVert^2`. Krum returns
    the update with the lowest score; Multi-Krum (``m > 1``) the weighted mean of the
    ``m`` lowest-scoring updates (``weights``, e.g. example counts, or equal weights).
    Ties go to the lower client index. Needs K >= 2f + 3 and 1 <= m <= K - f.

    Returns the (D,) result, and with ``return_indices`` also the selected clients'
    indices, best first. ``method``: ``"auto"`` (the default) selects exactly as
    ``"exact"`` (float64 differences) does, at Gram speed for K > :data:`EXACT_MAX_K`
    (rigorous rounding bounds on the Gram form's scores, exact rows only for the updates
    they cannot rank; see the module docstring); ``"gram"`` may choose differently between
    near-tied updates. Other parameters as in :func:`median`.

    Examples
    --------
    >>> updates = np.array([[0.0], [0.25], [0.5], [0.75], [9.0]])
    >>> fedkern.krum(updates, f=1, return_indices=True)  # updates 1 and 2 tie: the lower index wins
    (array([0.25]), array([1]))
    """
    rows = check.updates(updates)
    f = _byzantine(f, rows.k, lambda f: 2 * f + 3, "krum")
    m = check.count(m, "m", low=1, high=rows.k - f, why=f" (K - f = {rows.k - f})")
    w = np.ones(rows.k) if weights is None else check.weights(weights, rows.k)
    method = _selection_method(method, rows.k)
    if method == "certified":
        bounds = _Certified([rows], backend)
        selected = _krum.certified_order(bounds.lower, bounds.upper, bounds.exact_rows, rows.k - f - 2,
                                         bounds.bad, m)
    else:
        distances, finite = _sq_distances(rows, method, backend)
        selected = np.argsort(_krum.scores(distances, rows.k - f - 2, ~finite), kind="stable")[:m]
    # Krum's single pick is returned as it is, whatever its weight
    w = w[selected] if m > 1 else np.ones(1)
    if not w.any():
        raise check.FedkernValueError(f"krum: every selected client {selected.tolist()} has weight 0")
    result = shared.weighted_sum("krum", rows.subset(selected), w, w.sum(), out, dtype, check_finite, backend)
    return (result, selected) if return_indices else result


def bulyan(updates: UpdatesLike, f: int, *, method: str = "auto", return_indices: bool = False,
           out: np.ndarray | None = None, dtype: DTypeLike = None, check_finite: bool = True,
           backend: str | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Bulyan (El Mhamdi et al., ICML 2018) over Krum.

    1. Selection: :math:`\theta = K - 2f` rounds; each picks, among the updates not yet
       picked, the one with the lowest Krum score (sum of squared distances to its
       :math:`\max(n - f - 2, 0)` nearest others, n = updates left), ties to the lower
       index. Distances are computed once.
    2. Aggregation: per coordinate, the mean of the :math:`\beta = \theta - 2f` selected
       values closest to their median (as :func:`meamed`).

    Needs K >= 4f + 3. Returns the (D,) result and, with ``return_indices``, the selected
    clients in selection order. Other parameters as in :func:`krum`: with ``method="auto"``
    every round picks what the exact method picks, each round certified from the same
    bounds and exact rows computed once.

    Examples
    --------
    >>> updates = np.array([[0.0], [0.25], [0.5], [0.75], [1.0], [1.25], [9.0]])
    >>> fedkern.bulyan(updates, f=1, return_indices=True)  # 2 and 3 tie first: the lower index wins
    (array([0.5]), array([2, 3, 1, 4, 0]))
    """
    rows = check.updates(updates)
    f = _byzantine(f, rows.k, lambda f: 4 * f + 3, "bulyan")
    neighbours = lambda n: max(n - f - 2, 0)  # noqa: E731
    method = _selection_method(method, rows.k)
    if method == "certified":
        bounds = _Certified([rows], backend)
        best = _krum.certified_best(bounds.lower, bounds.upper, bounds.exact_rows, neighbours, bounds.bad)
    else:
        distances, finite = _sq_distances(rows, method, backend)
        best = _krum.exact_best(distances, neighbours, ~finite)
    selected = _krum.bulyan_selection(rows.k, rows.k - 2 * f, best)
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    kernels("robust", backend, "meamed").meamed(rows.subset(selected), len(selected) - 2 * f, result)
    _finish("bulyan", rows, result, check_finite)
    return (result, selected) if return_indices else result


def geometric_median(updates: UpdatesLike, weights: WeightsLike | None = None, *, nu: float = 1e-6, maxiter: int = 100,
                     tol: float = 1e-6, return_info: bool = False, out: np.ndarray | None = None,
                     dtype: DTypeLike = None, check_finite: bool = True,
                     backend: str | None = None) -> np.ndarray | tuple[np.ndarray, dict]:
    r"""Weighted geometric median by the smoothed Weiszfeld algorithm (Pillutla et al., RFA, 2022).

    Minimises :math:`g(z) = \sum_i \alpha_i \lVert z - x_i \rVert` with
    :math:`\alpha = w / \sum w`. Starting from the weighted mean, each iteration sets

    .. math:: z \leftarrow \frac{\sum_i \beta_i x_i}{\sum_i \beta_i}, \qquad
              \beta_i = \frac{\alpha_i}{\max(\nu, \lVert z - x_i \rVert)}

    and stops after ``maxiter`` iterations or when
    :math:`|g_{\text{prev}} - g| \le \text{tol} \cdot g`. Each iteration is two passes over
    the updates (a weighted sum and the distances); z is kept in float64. Updates holding
    NaN or inf are infinitely far from every point and are left out.

    Returns the (D,) estimate, and with ``return_info`` also a dict with ``iterations``,
    ``converged`` and ``objective`` (the final g).

    Examples
    --------
    >>> z = fedkern.geometric_median(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]))
    >>> bool(np.linalg.norm(z) < 1.0)
    True
    """
    rows = check.updates(updates)
    alpha = np.ones(rows.k) if weights is None else check.weights(weights, rows.k)
    nu = check.real(nu, "nu", low=0.0, low_inclusive=False)
    tol = check.real(tol, "tol", low=0.0)
    maxiter = check.count(maxiter, "maxiter")
    module = kernels("robust", backend)
    aggregate_kernels = kernels("aggregate", backend)
    result = check.out(out, (rows.d,), rows.dtype, dtype)

    kept, z = rows, np.empty(rows.d)
    if aggregate_kernels.weighted_sum(rows, alpha, alpha.sum(), z):  # the start is not finite:
        good = np.flatnonzero(~shared.nonfinite_mask(rows, backend) & (alpha > 0))  # leave the bad out
        if good.size == 0:
            check.raise_nonfinite("geometric_median", rows)
        kept, alpha = rows.subset(good), alpha[good]
        aggregate_kernels.weighted_sum(kept, alpha, alpha.sum(), z)
    alpha = alpha / alpha.sum()
    distances = np.empty(kept.k)

    def objective():
        module.sq_distances_to(kept, z, distances)
        np.sqrt(distances, out=distances)
        return float(np.sum(alpha * distances))  # numpy's own fixed-order sum, not BLAS

    current, iterations, converged = objective(), 0, False
    while iterations < maxiter and not converged:
        beta = alpha / np.maximum(nu, distances)
        aggregate_kernels.weighted_sum(kept, beta, beta.sum(), z)
        previous, current = current, objective()
        iterations += 1
        converged = abs(previous - current) <= tol * current
    result[...] = z
    _finish("geometric_median", rows, result, check_finite)
    info = dict(iterations=iterations, converged=converged, objective=current)
    return (result, info) if return_info else result


def centered_clipping(updates: UpdatesLike, center: np.ndarray, tau: float, iterations: int = 1, *,
                      out: np.ndarray | None = None, dtype: DTypeLike = None, check_finite: bool = True,
                      backend: str | None = None) -> np.ndarray:
    r"""Centered clipping (Karimireddy et al., ICML 2021).

    Starting from :math:`v = ` ``center`` (typically the previous round's aggregate),
    repeat ``iterations`` times

    .. math:: v \leftarrow v + \frac{1}{K} \sum_i (x_i - v) \min\left(1, \frac{\tau}{\lVert x_i - v \rVert}\right)

    Updates holding NaN or inf contribute nothing (they are infinitely far from v).
    Each iteration is two passes over the updates; v is kept in float64.

    Examples
    --------
    >>> updates = np.array([[1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    >>> fedkern.centered_clipping(updates, np.zeros(2), tau=1.0).round(3)
    array([0.569, 0.569])
    """
    rows = check.updates(updates)
    center = check.vector(center, "center", length=rows.d)
    tau = check.real(tau, "tau", low=0.0, low_inclusive=False)
    iterations = check.count(iterations, "iterations", low=1)
    module = kernels("robust", backend)
    aggregate_kernels = kernels("aggregate", backend)
    result = check.out(out, (rows.d,), rows.dtype, dtype)
    if check_finite and aggregate_kernels.count_nonfinite(center):
        check.raise_nonfinite("centered_clipping", [center], name="center")

    v, step, sq = center.astype(np.float64), np.empty(rows.d), np.empty(rows.k)
    for _ in range(iterations):
        module.sq_distances_to(rows, v, sq)
        good = np.flatnonzero(np.isfinite(sq))
        scale = tau / np.maximum(np.sqrt(sq[good]), tau) / rows.k  # min(1, tau / ||x_i - v||) / K
        if good.size:
            aggregate_kernels.weighted_sum(rows.subset(good), scale, 1.0, step)
            v = step + (1.0 - scale.sum()) * v  # v + sum_i c_i (x_i - v) / K
    result[...] = v
    return _finish("centered_clipping", rows, result, check_finite)


# --------------------------------------------------------------------------- pre-aggregators
def nearest_neighbor_mixing(updates: UpdatesLike, f: int, *, method: str = "auto",
                            out: OutUpdates = None, backend: str | None = None) -> np.ndarray | list[np.ndarray]:
    r"""Nearest neighbour mixing, NNM (Allouah et al., AISTATS 2023).

    Replaces each update by the mean of its K - f nearest updates (itself included):
    :math:`y_i = \frac{1}{K - f} \sum_{l \in N_i} x_l`; ties go to the lower index. Run it
    before a robust rule (e.g. ``krum(nearest_neighbor_mixing(x, f), f)``). Needs
    K >= 2f + 1. Computed as a (K, K) mixing matrix applied with BLAS over coordinate
    tiles. An update holding NaN or inf is nobody's neighbour and its own row comes out
    as NaN, for the rule that follows to discard; when more than f updates are
    non-finite, a row is the mean of the finite ones among its K - f nearest.

    Examples
    --------
    >>> fedkern.nearest_neighbor_mixing(np.array([[1.0], [2.0], [3.0], [np.inf], [np.inf]]), f=1)
    array([[ 2.],
           [ 2.],
           [ 2.],
           [nan],
           [nan]])

    Returns a (K, D) array of the updates' dtype, or ``out`` (an array or K rows).
    """
    rows = check.updates(updates)
    f = _byzantine(f, rows.k, lambda f: 2 * f + 1, "nearest_neighbor_mixing")
    target = check.out_updates(out, rows)
    distances, finite = _sq_distances(rows, _method(method, rows.k), backend)
    mixing = np.zeros((rows.k, rows.k))
    for i in range(rows.k):
        nearest = np.argsort(distances[i], kind="stable")[:rows.k - f]
        # with more than f non-finite updates a finite row has fewer than K - f finite
        # neighbours: it is the mean of those it has, never a sum divided by K - f
        nearest = nearest[finite[nearest]]
        mixing[i, nearest] = 1.0 / max(nearest.size, 1)
    good = np.flatnonzero(finite)
    _mix(rows.subset(good) if good.size < rows.k else rows, mixing[:, good], target, backend)
    for i in np.flatnonzero(~finite):
        target[i][...] = np.nan
    return out if out is not None else target.matrix


def _mix(rows: Updates, mixing: np.ndarray, target: Updates, backend) -> None:
    """target_i = sum_l mixing[i, l] rows_l, tile by tile (BLAS in float64)."""
    module = kernels("robust", backend)
    for j0, tile in _tiles(rows):
        module.gather_tile(rows, j0, False, tile)
        mixed = mixing @ tile.astype(np.float64)
        if target.matrix is not None:
            target.matrix[:, j0:j0 + tile.shape[1]] = mixed
        else:
            for i, row in enumerate(target):
                row[j0:j0 + tile.shape[1]] = mixed[i]


def bucketing(updates: UpdatesLike, s: int, seed: SeedLike = None, *, backend: str | None = None) -> np.ndarray:
    r"""Bucketing (Karimireddy et al., ICLR 2022): shuffle, then average buckets of ``s``.

    A random permutation (``seed``: an int, None or a :class:`numpy.random.Generator`)
    splits the K updates into :math:`\lceil K/s \rceil` buckets of ``s`` consecutive
    updates (the last may be smaller); returns the (ceil(K/s), D) bucket means, to be fed
    to a robust rule. Non-finite updates make their bucket's mean non-finite.
    """
    rows = check.updates(updates)
    s = check.count(s, "s", low=1)
    order = np.random.default_rng(seed).permutation(rows.k)
    buckets = [order[b:b + s] for b in range(0, rows.k, s)]
    result = np.empty((len(buckets), rows.d), rows.dtype)
    for out_row, bucket in zip(result, buckets):
        shared.weighted_sum("bucketing", rows.subset(bucket), np.ones(bucket.size), bucket.size,
                      out_row, None, False, backend)
    return result


def adaptive_clipping(updates: UpdatesLike, f: int, *, out: OutUpdates = None, return_norms: bool = False,
                      backend: str | None = None) -> np.ndarray | list[np.ndarray] | tuple:
    r"""Adaptive robust clipping, ARC (Allouah et al., 2024).

    Clips the :math:`k = \lfloor 2 (f/K) (K - f) \rfloor` updates of largest norm to the
    norm of the (k+1)-th largest; the others pass unchanged. Needs K >= 2f + 1. One
    norm pass plus one clipping pass (:func:`fedkern.clip_by_norm`). Non-finite updates
    come out non-finite (clipping cannot repair them).

    Returns a (K, D) array (or ``out``), and with ``return_norms`` the float64 norms
    before clipping.
    """
    rows = check.updates(updates)  # validated once: the kernels below take the rows as they are
    f = _byzantine(f, rows.k, lambda f: 2 * f + 1, "adaptive_clipping")
    target = check.out_updates(out, rows)
    module = kernels("aggregate", backend)
    norms = np.empty(rows.k)
    module.l2_norms(rows, norms)
    clipped = int(np.floor(2 * f / rows.k * (rows.k - f)))
    ordered = np.sort(np.where(np.isnan(norms), np.inf, norms))
    threshold = ordered[rows.k - clipped - 1]
    if clipped and np.isfinite(threshold) and threshold > 0:
        module.clip_by_norm(rows, threshold, target, np.empty(rows.k))
    else:  # nothing to clip, clipping to zero length, or no finite bound: no kernel needed
        for source, row, norm in zip(rows, target, norms):
            row[...] = 0.0 if clipped and threshold == 0 and norm > 0 else source
    result = out if out is not None else target.matrix
    return (result, norms) if return_norms else result
