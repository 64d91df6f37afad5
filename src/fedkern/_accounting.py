r"""Renyi-DP accounting of the subsampled Gaussian mechanism (the privacy family's accountant).

A round of DP federated averaging adds Gaussian noise of standard deviation
:math:`z \cdot C` to a sum of updates clipped to L2 norm :math:`C`, over a cohort that is
either Poisson-sampled (each client joins with probability :math:`q`) or a fixed-size
sample of :math:`m` out of :math:`n` clients. Each round is an event whose Renyi
divergence of order :math:`\alpha` is bounded by a curve :math:`\varepsilon(\alpha)`;
curves of independent rounds add up (Mironov 2017, Proposition 1), and the sum converts to
an :math:`(\varepsilon, \delta)` guarantee at the end.

The numbers agree with Google's ``dp-accounting`` (its ``RdpAccountant``) to rounding:
the same series, the same truncation rule and the same conversion, but evaluated over all
orders at once with numpy, in log space. Only numpy and :mod:`math` are used, since scipy
is not a dependency of fedkern. The PLD accountant of ``dp-accounting`` itself is reached
through :func:`pld_epsilon`, which needs the optional extra ``fedkern[privacy]``.

References
----------
.. [M17] I. Mironov, "Renyi differential privacy", CSF 2017, arXiv:1702.07476.
.. [MTZ19] I. Mironov, K. Talwar, L. Zhang, "Renyi differential privacy of the sampled
   Gaussian mechanism", arXiv:1908.10530, 2019.
.. [WBK19] Y.-X. Wang, B. Balle, S. Kasiviswanathan, "Subsampled Renyi differential privacy
   and analytical moments accountant", AISTATS 2019, arXiv:1808.00087.
.. [CKS20] C. Canonne, G. Kamath, T. Steinke, "The discrete Gaussian for differential
   privacy", NeurIPS 2020, arXiv:2004.00010 (Proposition 12).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from . import _validate
from ._errors import BackendUnavailableError, FedkernTypeError, FedkernValueError

__all__ = ["DEFAULT_RDP_ORDERS", "RDPAccountant", "noise_multiplier_for", "pld_epsilon"]

#: The orders dp-accounting uses by default: dense near 1 (where small epsilons are
#: attained), every integer up to 63, then a few large powers of two for tiny deltas.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])

NEIGHBORING = ("add_or_remove", "replace_one")

#: The fractional-order series stops after this many terms; an order whose series has not
#: met the stopping rule by then counts as infinite (excluded), as in dp-accounting.
_MAX_TERMS_FRAC = 1000
#: Terms of the fractional series evaluated per numpy pass: most orders stop within one.
_BLOCK_FRAC = 64
#: Integer orders up to this one use the exact bound of [WBK19] Theorem 27; above it, the
#: cheaper O(alpha) bound (the choice dp-accounting makes).
_MAX_EXACT_WOR = 256
#: Elements per matrix of series terms, so that unusually large orders cannot exhaust memory.
_CHUNK_ELEMENTS = 1 << 20
_LOG2 = math.log(2.0)
_LOG4 = math.log(4.0)

_erfc = np.frompyfunc(math.erfc, 1, 1)


# --- series helpers --------------------------------------------------------------------

def _logsumexp_rows(terms: np.ndarray) -> np.ndarray:
    """log(sum(exp(terms), axis=1)), exact for rows of -inf and for infinite maxima."""
    top = terms.max(axis=1)
    finite = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(terms - finite[:, None]).sum(axis=1)) + finite


def _log_binom(alpha: np.ndarray, start: int, stop: int, carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""log|binom(alpha, i)| for i in [start, stop), given ``carry`` = log|binom(alpha, start)|.

    Uses the ratio :math:`\binom{\alpha}{i+1} / \binom{\alpha}{i} = (\alpha - i)/(i + 1)`, so a
    cumulative sum replaces the log-gamma function numpy lacks; an integer alpha gives -inf
    from i = alpha + 1 on. Returns the block and the carry for ``stop``.
    """
    k = np.arange(start, stop, dtype=np.float64)
    with np.errstate(divide="ignore"):
        steps = np.log(np.abs(alpha[:, None] - k)) - np.log1p(k)
    running = carry[:, None] + np.cumsum(steps, axis=1)
    block = np.concatenate([carry[:, None], running[:, :-1]], axis=1)
    return block, running[:, -1]


def _log_half_erfc(x: np.ndarray) -> np.ndarray:
    r""":math:`\log(\operatorname{erfc}(x) / 2)` without underflow for large x.

    Past x = 26, where erfc nears underflow, the asymptotic expansion
    :math:`\log\operatorname{erfc}(x) \approx -x^2 - \log(x\sqrt\pi) - 1/(2x^2) + 5/(8x^4) - \dots`
    (four terms) is accurate to about 1e-14.
    """
    out = np.empty_like(x)
    tail = x > 26.0
    out[~tail] = np.log(_erfc(x[~tail]).astype(np.float64))
    t = x[tail]
    u = t ** -2.0
    out[tail] = (-0.5 * math.log(math.pi) - np.log(t) - t * t
                 + u * (-0.5 + u * (0.625 + u * (-37.0 / 24.0 + u * 353.0 / 64.0))))
    return out - _LOG2


def _chunks(alphas: np.ndarray):
    """Split ascending integer orders into groups for one matrix of series terms each.

    A group's matrix has a row per order and a column per term of its largest order: a
    group closes when padding would double its work, or its matrix would pass
    _CHUNK_ELEMENTS, so the default orders cost ~6k terms rather than 71 x 1025.
    """
    begin, work = 0, 0.0
    for end in range(alphas.size):
        width = alphas[end] + 1
        padded = (end + 1 - begin) * width
        if end > begin and (padded > _CHUNK_ELEMENTS or padded > 2 * (work + width) + 4096):
            yield slice(begin, end)
            begin, work = end, 0.0
        work += width
    yield slice(begin, alphas.size)


# --- Poisson-subsampled Gaussian [MTZ19] ------------------------------------------------

def _poisson_log_a_int(q: float, z: float, alphas: np.ndarray) -> np.ndarray:
    r"""log A_alpha for integer alphas: :math:`\sum_{i=0}^{\alpha} \binom{\alpha}{i}
    (1-q)^{\alpha-i} q^i e^{(i^2-i)/(2z^2)}` ([MTZ19] Section 3.2)."""
    out = np.empty(alphas.size)
    order = np.argsort(alphas)
    sorted_alphas = alphas[order]
    log_q, log1m_q = math.log(q), math.log1p(-q)
    for part in _chunks(sorted_alphas):
        group = sorted_alphas[part]
        i = np.arange(group[-1] + 1, dtype=np.float64)
        log_coef, _ = _log_binom(group, 0, i.size, np.zeros(group.size))
        terms = log_coef + i * log_q + (group[:, None] - i) * log1m_q + (i * i - i) / (2 * z * z)
        out[order[part]] = _logsumexp_rows(terms)
    return out


def _poisson_log_a_frac(q: float, z: float, alphas: np.ndarray) -> np.ndarray:
    r"""log A_alpha for fractional alphas ([MTZ19] Section 3.3).

    The integral splits at :math:`z_0 = z^2 \log(1/q - 1) + 1/2`; on each side the binomial
    series converges, with terms (magnitudes of)

    .. math::
        s_{0,i} = \binom{\alpha}{i} q^i (1-q)^{\alpha-i} e^{(i^2-i)/(2z^2)}
                  \tfrac12\operatorname{erfc}\bigl(\tfrac{i - z_0}{\sqrt2 z}\bigr), \quad
        s_{1,i} = \binom{\alpha}{i} q^{\alpha-i} (1-q)^{i} e^{(j^2-j)/(2z^2)}
                  \tfrac12\operatorname{erfc}\bigl(\tfrac{z_0 - j}{\sqrt2 z}\bigr),

    j = alpha - i. The binomial coefficients of a fractional alpha change sign past
    i = alpha; adding magnitudes, as dp-accounting does, bounds A_alpha from above (tightly
    at small q, loosely at large q and orders near 1). The sum stops at the first i where
    both terms decrease and lie e^30 below the running total; an order that does not stop
    within _MAX_TERMS_FRAC terms gets +inf. Blocks of terms are computed for all unfinished
    orders at once.
    """
    log_q, log1m_q = math.log(q), math.log1p(-q)
    z0 = z * z * math.log(1 / q - 1) + 0.5
    scale = math.sqrt(2) * z
    out = np.full(alphas.size, np.inf)
    active = np.arange(alphas.size)
    carry_coef = np.zeros(alphas.size)
    carry_a0 = carry_a1 = carry_s0 = carry_s1 = np.full(alphas.size, -np.inf)
    for start in range(0, _MAX_TERMS_FRAC, _BLOCK_FRAC):
        alpha = alphas[active]
        stop = min(start + _BLOCK_FRAC, _MAX_TERMS_FRAC)
        log_coef, carry_coef = _log_binom(alpha, start, stop, carry_coef)
        i = np.arange(start, stop, dtype=np.float64)
        j = alpha[:, None] - i
        # the first tail depends on i alone: one row of erfc values serves every order
        s0 = (log_coef + i * log_q + j * log1m_q + (i * i - i) / (2 * z * z)
              + _log_half_erfc((i - z0) / scale))
        s1 = (log_coef + j * log_q + i * log1m_q + (j * j - j) / (2 * z * z)
              + _log_half_erfc((z0 - j) / scale))
        a0 = np.logaddexp.accumulate(np.concatenate([carry_a0[:, None], s0], axis=1), axis=1)[:, 1:]
        a1 = np.logaddexp.accumulate(np.concatenate([carry_a1[:, None], s1], axis=1), axis=1)[:, 1:]
        total = np.logaddexp(a0, a1)
        prev0 = np.concatenate([carry_s0[:, None], s0[:, :-1]], axis=1)
        prev1 = np.concatenate([carry_s1[:, None], s1[:, :-1]], axis=1)
        done = (s0 < prev0) & (s1 < prev1) & (np.maximum(s0, s1) < total - 30)
        finished = done.any(axis=1)
        first = done.argmax(axis=1)
        rows = np.flatnonzero(finished)
        out[active[rows]] = total[rows, first[rows]]
        keep = ~finished
        if not keep.any():
            break
        active, carry_coef = active[keep], carry_coef[keep]
        carry_a0, carry_a1 = a0[keep, -1], a1[keep, -1]
        carry_s0, carry_s1 = s0[keep, -1], s1[keep, -1]
    return out


def _poisson_rdp(z: float, q: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian event at every order."""
    if z == 0:
        return np.full(orders.size, np.inf)
    if q == 1:
        return orders / (2 * z * z)
    integer = orders == np.floor(orders)
    log_a = np.empty(orders.size)
    if integer.any():
        log_a[integer] = _poisson_log_a_int(q, z, orders[integer])
    if not integer.all():
        log_a[~integer] = _poisson_log_a_frac(q, z, orders[~integer])
    return log_a / (orders - 1)


# --- sampling without replacement [WBK19] -----------------------------------------------

def _signed_log_diff(mag: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One forward difference v[j+1] - v[j] of numbers held as (log|v|, v >= 0).

    Same signs subtract magnitudes, opposite signs add them, in the log-space forms
    ``max + log1p(-+exp(-|a - b|))`` that dp-accounting evaluates one pair at a time.
    """
    a, b, sa = mag[1:], mag[:-1], pos[1:]
    same = sa == pos[:-1]
    ratio = np.exp(-np.abs(a - b))
    out_mag = np.maximum(a, b) + np.log1p(np.where(same, -ratio, ratio))
    # two zeros in a row give nan (-inf minus -inf): their difference is zero too
    out_mag[np.isnan(out_mag)] = -np.inf
    out_pos = np.where(same, (a >= b) == sa, sa)
    return out_mag, out_pos


@functools.lru_cache(maxsize=64)
def _log_forward_differences(z: float, count: int) -> np.ndarray:
    r"""log|Delta^m g(0)| for m = 0..count, where :math:`g_k = e^{k(k-1)/(2z^2)}`.

    :math:`g_k` is :math:`e^{(k-1)\varepsilon(k)}` of the Gaussian mechanism, whose forward
    differences enter [WBK19] Theorem 27. Differencing pairwise in signed log space, as
    dp-accounting does, avoids the cancellations of the alternating binomial sum.
    """
    k = np.arange(count + 1, dtype=np.float64)
    mag, pos = k * (k - 1) / (2 * z * z), np.ones(count + 1, dtype=bool)
    out = np.empty(count + 1)
    out[0] = mag[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in range(1, count + 1):
            mag, pos = _signed_log_diff(mag, pos)
            out[m] = mag[0]
    out.flags.writeable = False
    return out


def _wor_log_a_int(q: float, z: float, alphas: np.ndarray) -> np.ndarray:
    r"""The bound on :math:`(\alpha-1)\varepsilon(\alpha)` of [WBK19] Theorem 27 for integer alphas.

    .. math::
        \log\Bigl(1 + q^2\tbinom{\alpha}{2}\min\bigl(4(e^{\varepsilon(2)}-1), 2e^{\varepsilon(2)}\bigr)
        + \sum_{i=3}^{\alpha} q^i \tbinom{\alpha}{i}
          \min\bigl(4\sqrt{B_{2\lfloor i/2\rfloor} B_{2\lceil i/2\rceil}},
                    2e^{(i-1)\varepsilon(i)}\bigr)\Bigr)

    with :math:`\varepsilon(\alpha) = \alpha/(2z^2)` and :math:`B_m = |\Delta^m g(0)|`; orders
    above _MAX_EXACT_WOR keep only the second argument of the min. Order 1 gives 0.
    """
    out = np.zeros(alphas.size)
    order = np.argsort(alphas)
    sorted_alphas = alphas[order]
    log_q, eps2 = math.log(q), 1 / (z * z)
    log_f2m1 = eps2 + math.log(-math.expm1(-eps2))  # log(e^eps2 - 1), finite for any z > 0
    exact_top = int(min(alphas.max(), _MAX_EXACT_WOR))
    # one table for every group (entries do not depend on its length), cached per z
    diffs = _log_forward_differences(z, 2 * ((exact_top + 1) // 2)) if exact_top >= 3 else None
    for part in _chunks(sorted_alphas):
        group = sorted_alphas[part]
        top = int(group[-1])
        if top < 2:
            continue
        i = np.arange(top + 1, dtype=np.float64)
        log_coef, _ = _log_binom(group, 0, i.size, np.zeros(group.size))
        moment = _LOG2 + (i - 1) * i / (2 * z * z)
        exact = np.full(i.size, np.inf)
        if top >= 3 and group[0] <= _MAX_EXACT_WOR:
            n_exact = min(top, _MAX_EXACT_WOR) + 1
            k = np.arange(3, n_exact)
            exact[3:n_exact] = _LOG4 + 0.5 * (diffs[2 * (k // 2)] + diffs[2 * ((k + 1) // 2)])
        bound = np.where((group <= _MAX_EXACT_WOR)[:, None], np.minimum(exact, moment), moment)
        bound[:, 2] = min(_LOG4 + log_f2m1, eps2 + _LOG2)
        terms = i * log_q + log_coef + bound
        terms[:, :2] = -np.inf
        out[order[part]] = np.logaddexp(0.0, _logsumexp_rows(terms))
    return out


def _wor_rdp(z: float, q: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Gaussian event on a uniformly sampled fixed cohort, at every order.

    A fractional order interpolates the bound linearly between its neighbouring integers
    ([WBK19] Corollary 10: the cumulant generating function is convex).
    """
    if z == 0:
        return np.full(orders.size, np.inf)
    if q == 1:
        return orders / (2 * z * z)
    low, high = np.floor(orders), np.ceil(orders)
    needed = np.unique(np.concatenate([low, high]))
    log_a = _wor_log_a_int(q, z, needed)
    at_low, at_high = log_a[np.searchsorted(needed, low)], log_a[np.searchsorted(needed, high)]
    frac = orders - low
    return ((1 - frac) * at_low + frac * at_high) / (orders - 1)


@functools.lru_cache(maxsize=512)
def _event_rdp(kind: str, z: float, q: float, orders_key: bytes) -> np.ndarray:
    """The RDP curve of one event, cached: a schedule repeats the same (z, q) round after round."""
    orders = np.frombuffer(orders_key, dtype=np.float64)
    rdp = (_poisson_rdp if kind == "poisson" else _wor_rdp)(z, q, orders)
    rdp.flags.writeable = False
    return rdp


# --- RDP -> (epsilon, delta) [CKS20] ----------------------------------------------------

def _epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    r"""Smallest epsilon over orders, and the order attaining it ([CKS20] Proposition 12).

    .. math:: \varepsilon = \min_\alpha\ \varepsilon(\alpha) + \log(1 - 1/\alpha)
              - \frac{\log(\delta\alpha)}{\alpha - 1},

    used for alpha > 1.01 only (it is unstable near 1), plus epsilon = 0 wherever the KL
    bound :math:`\delta \ge \sqrt{1 - e^{-\varepsilon(\alpha)}}` already holds, and 0 for a
    negative RDP value (numerical noise of an extreme event).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        improved = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
    eps = np.where(orders > 1.01, improved, np.inf)
    eps = np.where((rdp < 0) | (delta * delta + np.expm1(-rdp) > 0), 0.0, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])


def _delta(orders: np.ndarray, rdp: np.ndarray, epsilon: float) -> tuple[float, float]:
    r"""Smallest delta over orders, and the order attaining it ([CKS20] Proposition 12).

    .. math:: \delta = \min_\alpha\ \min\Bigl(\sqrt{1 - e^{-\varepsilon(\alpha)}},\
              \frac{e^{(\alpha-1)(\varepsilon(\alpha) - \varepsilon)}}{\alpha}
              \bigl(1 - \tfrac1\alpha\bigr)^{\alpha-1}\Bigr),

    the second bound for alpha > 1.01 only; a zero or negative RDP value gives delta = 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = 0.5 * np.log1p(-np.exp(-rdp))
        improved = (orders - 1) * (rdp - epsilon + np.log1p(-1 / orders)) - np.log(orders)
    log_delta = np.where(rdp <= 0, -np.inf, kl)
    log_delta = np.where(orders > 1.01, np.minimum(log_delta, improved), log_delta)
    best = int(np.argmin(log_delta))
    return min(math.exp(log_delta[best]), 1.0), float(orders[best])


# --- validation -------------------------------------------------------------------------

def _orders(obj) -> np.ndarray:
    """Validate RDP orders: a non-empty 1-D sequence of finite reals > 1; float64, read-only."""
    if obj is None:
        obj = DEFAULT_RDP_ORDERS
    if isinstance(obj, (str, bytes)) or np.ndim(obj) == 0:
        raise FedkernTypeError(f"orders must be a 1-D sequence of real numbers; got {type(obj).__name__}")
    array = np.asarray(obj)
    if array.ndim != 1:
        raise FedkernValueError(f"orders must be 1-D; got shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise FedkernTypeError(f"orders must be real numbers; got {array.dtype} values")
    array = np.array(array, dtype=np.float64)
    if array.size == 0:
        raise FedkernValueError("orders is empty; give at least one order > 1")
    bad = np.flatnonzero(~(np.isfinite(array) & (array > 1)))
    if bad.size:
        raise FedkernValueError(f"orders[{bad[0]}] is {array[bad[0]]}; every RDP order must be finite and > 1")
    array.flags.writeable = False
    return array


def _neighboring(obj) -> str:
    if not isinstance(obj, str):
        raise FedkernTypeError(f"neighboring must be a string, one of {NEIGHBORING}; got {type(obj).__name__}")
    if obj not in NEIGHBORING:
        raise FedkernValueError(f"neighboring must be one of {NEIGHBORING}; got {obj!r}")
    return obj


def _delta_arg(delta) -> float:
    return _validate.real(delta, "delta", low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)


# --- the accountant ---------------------------------------------------------------------

class RDPAccountant:
    r"""Renyi-DP accountant for Gaussian rounds on Poisson-sampled or fixed-size cohorts.

    Keeps the running sum of the RDP curves :math:`\varepsilon_t(\alpha)` of the rounds
    composed so far ([M17] Proposition 1) at each order alpha, and converts it to
    :math:`(\varepsilon, \delta)` on demand. Chain :meth:`compose` and
    :meth:`compose_fixed_cohort` calls to mix schedules.

    Parameters
    ----------
    orders : sequence of float, optional
        Renyi orders, each finite and > 1; integers and fractions alike. The default is
        :data:`DEFAULT_RDP_ORDERS`, the same as dp-accounting's.
    neighboring : {"add_or_remove", "replace_one"}
        The neighbouring relation: datasets differ by adding or removing one client
        ("add_or_remove", required by Poisson sampling) or by replacing one, with the
        population size public ("replace_one", required by fixed cohorts). A noise
        multiplier is always relative to the L2 sensitivity under this relation.

    Raises
    ------
    FedkernValueError, FedkernTypeError
        For orders that are not finite reals > 1, or an unknown relation.

    Notes
    -----
    The numbers match dp-accounting's ``RdpAccountant`` with ``PoissonSampledDpEvent``,
    ``SampledWithoutReplacementDpEvent`` and ``GaussianDpEvent``, including its rule of
    treating as infinite a fractional order whose series fails to converge (small orders
    at large sampling rates and small noise): such an order is skipped by the conversion.
    At fractional orders the series is an upper bound, loose at large sampling rates; the
    integer orders are exact.

    Examples
    --------
    >>> acc = fedkern._accounting.RDPAccountant().compose(1.1, 0.01, steps=1000)
    >>> round(acc.epsilon(1e-5), 3)
    1.712
    >>> eps, order = acc.epsilon(1e-5, return_order=True)
    >>> order
    9.6
    """

    def __init__(self, orders=None, neighboring: str = "add_or_remove"):
        self._orders = _orders(orders)
        self._key = self._orders.tobytes()
        self._neighboring = _neighboring(neighboring)
        self._rdp = np.zeros(self._orders.size)

    @property
    def orders(self) -> np.ndarray:
        """The Renyi orders (a read-only array)."""
        return self._orders

    @property
    def rdp(self) -> np.ndarray:
        """The composed RDP value at each order (a copy)."""
        return self._rdp.copy()

    @property
    def neighboring(self) -> str:
        """The neighbouring relation, "add_or_remove" or "replace_one"."""
        return self._neighboring

    def __repr__(self) -> str:
        return (f"RDPAccountant({self._orders.size} orders, neighboring={self._neighboring!r}, "
                f"epsilon(1e-5)={self.epsilon(1e-5):.4g})")

    def compose(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> RDPAccountant:
        r"""Add ``steps`` rounds of the Poisson-subsampled Gaussian mechanism.

        Each client joins a round independently with probability q = ``sample_rate``, and
        the sum of the cohort's clipped updates gets noise :math:`N(0, z^2 C^2)`. Per round
        ([MTZ19] Theorem 4), with :math:`\mu_0 = N(0, z^2)`, :math:`\mu_1 = N(1, z^2)`,

        .. math:: \varepsilon(\alpha) = \frac{1}{\alpha - 1}\log
                  \mathbb{E}_{x\sim\mu_0}\Bigl[\bigl(1 - q + q\,\mu_1(x)/\mu_0(x)\bigr)^\alpha\Bigr],

        a finite binomial sum for integer alpha and a convergent series for fractional
        alpha; q = 1 is the plain Gaussian, :math:`\alpha / (2z^2)` ([M17] Proposition 7).
        z = 0 adds an infinite RDP (no privacy).

        Parameters
        ----------
        noise_multiplier : float
            z >= 0, the noise standard deviation over the L2 sensitivity.
        sample_rate : float
            q in (0, 1].
        steps : int
            Number of such rounds, >= 0.

        Returns
        -------
        RDPAccountant
            ``self``, so calls chain.

        Raises
        ------
        FedkernValueError
            Bad arguments, or q < 1 under ``neighboring="replace_one"`` (Poisson sampling
            is analysed under add-or-remove only, as in dp-accounting; use
            :meth:`compose_fixed_cohort`).

        Examples
        --------
        >>> acc = fedkern._accounting.RDPAccountant(orders=[2, 4.5])
        >>> acc.compose(1.0, 1.0, steps=3).rdp
        array([3.  , 6.75])
        """
        z = _validate.real(noise_multiplier, "noise_multiplier", low=0.0)
        q = _validate.real(sample_rate, "sample_rate", low=0.0, low_inclusive=False, high=1.0)
        steps = _validate.count(steps, "steps")
        if q < 1 and self._neighboring != "add_or_remove":
            raise FedkernValueError(
                f"sample_rate={q} (Poisson sampling) is accounted under neighboring='add_or_remove' only; "
                f"this accountant uses {self._neighboring!r}: use compose_fixed_cohort, or sample_rate=1")
        if steps:
            self._rdp += steps * _event_rdp("poisson", z, q, self._key)
        return self

    def compose_fixed_cohort(self, noise_multiplier: float, cohort_size: int, population: int,
                             steps: int = 1) -> RDPAccountant:
        r"""Add ``steps`` Gaussian rounds on a cohort of m clients drawn without replacement from n.

        Uses the bound of [WBK19] Theorem 27 for the subsampled Gaussian with q = m / n
        (see :func:`_wor_log_a_int`), interpolated for fractional orders; m = n is the
        plain Gaussian :math:`\alpha / (2z^2)`.

        Parameters
        ----------
        noise_multiplier : float
            z >= 0, the noise standard deviation over the replace-one L2 sensitivity.
        cohort_size : int
            m, clients per round, 1 <= m <= n.
        population : int
            n >= 1, the (public) number of clients.
        steps : int
            Number of such rounds, >= 0.

        Returns
        -------
        RDPAccountant
            ``self``, so calls chain.

        Raises
        ------
        FedkernValueError
            Bad arguments, or an accountant with ``neighboring="add_or_remove"``: the bound
            holds under replace-one only (as in dp-accounting).

        Examples
        --------
        >>> acc = fedkern._accounting.RDPAccountant(neighboring="replace_one")
        >>> round(acc.compose_fixed_cohort(1.0, 100, 10_000, steps=100).epsilon(1e-5), 3)
        1.483
        """
        if self._neighboring != "replace_one":
            raise FedkernValueError(
                "compose_fixed_cohort (sampling without replacement) is accounted under "
                f"neighboring='replace_one' only; this accountant uses {self._neighboring!r}")
        z = _validate.real(noise_multiplier, "noise_multiplier", low=0.0)
        n = _validate.count(population, "population", low=1)
        m = _validate.count(cohort_size, "cohort_size", low=1, high=n, why=" (the population)")
        steps = _validate.count(steps, "steps")
        if steps:
            self._rdp += steps * _event_rdp("without_replacement", z, m / n, self._key)
        return self

    def epsilon(self, delta: float, *, return_order: bool = False) -> float | tuple[float, float]:
        r"""The epsilon of the composed rounds at ``delta``, optionally with the best order.

        :math:`\min_\alpha \varepsilon(\alpha) + \log(1 - 1/\alpha) - \log(\delta\alpha)/(\alpha-1)`
        ([CKS20] Proposition 12), floored at 0 where the KL bound gives delta already.

        Parameters
        ----------
        delta : float
            In (0, 1).
        return_order : bool
            Also return the order that attains the minimum.

        Returns
        -------
        float or (float, float)
            epsilon (inf when z = 0 was composed), or (epsilon, order).

        Examples
        --------
        >>> acc = fedkern._accounting.RDPAccountant(orders=[32]).compose(1.0, 1.0)
        >>> round(acc.epsilon(1e-5), 4)
        16.2278
        """
        eps, order = _epsilon(self._orders, self._rdp, _delta_arg(delta))
        return (eps, order) if return_order else eps

    def delta(self, epsilon: float, *, return_order: bool = False) -> float | tuple[float, float]:
        r"""The delta of the composed rounds at ``epsilon``, optionally with the best order.

        :math:`\min_\alpha e^{(\alpha-1)(\varepsilon(\alpha) - \varepsilon)}(1-1/\alpha)^{\alpha-1}/\alpha`
        ([CKS20] Proposition 12), or the KL bound :math:`\sqrt{1 - e^{-\varepsilon(\alpha)}}`
        when smaller; at most 1.

        Parameters
        ----------
        epsilon : float
            >= 0.
        return_order : bool
            Also return the order that attains the minimum.

        Returns
        -------
        float or (float, float)
            delta, or (delta, order).

        Examples
        --------
        >>> acc = fedkern._accounting.RDPAccountant().compose(1.1, 0.01, steps=1000)
        >>> f"{acc.delta(1.712):.2e}"
        '9.98e-06'
        """
        eps = _validate.real(epsilon, "epsilon", low=0.0)
        value, order = _delta(self._orders, self._rdp, eps)
        return (value, order) if return_order else value


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int, *,
                         orders=None, rtol: float = 1e-6) -> float:
    r"""The smallest noise multiplier whose ``steps`` Poisson-sampled rounds are (epsilon, delta)-DP.

    Epsilon falls as z grows, so z is bracketed by doubling (or halving) from 1 and then
    bisected geometrically until the bracket :math:`[z_{lo}, z_{hi}]` satisfies
    :math:`z_{lo} \ge z_{hi}(1 - \mathrm{rtol})`. The returned :math:`z_{hi}` meets the
    target; any :math:`z \le z_{hi}(1 - \mathrm{rtol})` misses it.

    Parameters
    ----------
    epsilon : float
        Target epsilon, > 0.
    delta : float
        Target delta, in (0, 1).
    sample_rate : float
        Poisson sampling rate q in (0, 1].
    steps : int
        Number of rounds, >= 1.
    orders : sequence of float, optional
        RDP orders (default :data:`DEFAULT_RDP_ORDERS`).
    rtol : float
        Relative tolerance on z, in (0, 0.5].

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    FedkernValueError
        Bad arguments, or a target that no z in [1e-6, 1e9] separates (e.g. an epsilon so
        large that z = 1e-6 still meets it).

    Examples
    --------
    >>> z = fedkern._accounting.noise_multiplier_for(2.0, 1e-5, 0.01, 1000)
    >>> round(z, 4)
    1.0223
    """
    target = _validate.real(epsilon, "epsilon", low=0.0, low_inclusive=False)
    delta = _delta_arg(delta)
    q = _validate.real(sample_rate, "sample_rate", low=0.0, low_inclusive=False, high=1.0)
    steps = _validate.count(steps, "steps", low=1)
    rtol = _validate.real(rtol, "rtol", low=0.0, low_inclusive=False, high=0.5)
    orders = _orders(orders)
    key = orders.tobytes()

    def meets(z: float) -> bool:
        return _epsilon(orders, steps * _event_rdp("poisson", z, q, key), delta)[0] <= target

    low, high = 1.0, 1.0
    if meets(high):
        while meets(low):
            if low < 1e-6:
                raise FedkernValueError(f"epsilon={target} is met even with noise_multiplier < 1e-6; "
                                        f"the target puts no useful bound on the noise")
            high, low = low, low / 2
    else:
        while not meets(high):
            if high > 1e9:
                raise FedkernValueError(f"no noise_multiplier up to 1e9 reaches epsilon={target} at delta={delta}")
            low, high = high, high * 2
    while low < high * (1 - rtol):
        middle = math.sqrt(low * high)
        if meets(middle):
            high = middle
        else:
            low = middle
    return high


def pld_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
                value_discretization_interval: float = 1e-4) -> float:
    r"""Epsilon of ``steps`` Poisson-sampled Gaussian rounds by privacy-loss-distribution accounting.

    A thin wrapper of dp-accounting's ``PLDAccountant`` (add-or-remove relation), which is
    tighter than RDP, especially for many rounds; dp-accounting is imported only here, so
    fedkern itself never needs it. The PLD is discretised with
    ``value_discretization_interval``: smaller is tighter and slower.

    Parameters
    ----------
    noise_multiplier : float
        z >= 0.
    sample_rate : float
        q in (0, 1].
    steps : int
        Number of rounds, >= 0.
    delta : float
        In (0, 1).
    value_discretization_interval : float
        > 0.

    Returns
    -------
    float
        epsilon.

    Raises
    ------
    BackendUnavailableError
        An ``ImportError`` when dp-accounting is not installed
        (``pip install 'fedkern[privacy]'``).
    FedkernValueError, FedkernTypeError
        Bad arguments.
    """
    z = _validate.real(noise_multiplier, "noise_multiplier", low=0.0)
    q = _validate.real(sample_rate, "sample_rate", low=0.0, low_inclusive=False, high=1.0)
    steps = _validate.count(steps, "steps")
    delta = _delta_arg(delta)
    interval = _validate.real(value_discretization_interval, "value_discretization_interval",
                              low=0.0, low_inclusive=False)
    try:
        import dp_accounting
    except ImportError as error:
        raise BackendUnavailableError(
            "pld_epsilon() needs dp-accounting: pip install 'fedkern[privacy]'") from error
    if z == 0:
        return math.inf
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))
