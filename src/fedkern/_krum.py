r"""Krum's scores and Bulyan's selection: the one implementation behind :func:`fedkern.krum`,
:func:`fedkern.bulyan` and the Flower drop-in, on a K x K matrix of squared distances or,
certified, on bounds of one.

**Certified selection.** Given matrices with :math:`\ell_{il} \le \hat d_{il} \le h_{il}`
entrywise, where :math:`\hat d` are the exact method's distances (float64 differences,
``method="exact"``), :func:`certified_order` returns exactly what ranking the scores of
:math:`\hat d` returns, while computing exact rows of :math:`\hat d` only for the few
updates whose rank the bounds leave open.

*Score bounds* (:func:`score_bounds`). Update i's score is
:math:`s_i = \mathrm{fl}(\sum_{r \le n} \hat d_{i(r)})`, the float64 sum of its n smallest
distances to the other finite updates (Blanchard et al., NeurIPS 2017). Order statistics
are monotone: the r-th smallest of :math:`\ell_{i\cdot}` is at most the r-th smallest of
:math:`\hat d_{i\cdot}`, which is at most that of :math:`h_{i\cdot}`; so the real sums of the
n smallest bounds enclose the real sum of the n smallest distances. Each float64 sum of n
non-negative terms, in any order, is within :math:`\gamma_{n-1}` relative of the real one
(:math:`\gamma_m = mu/(1-mu)`, u = 2^-53; Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., 2002, Sec. 3.1 and 4.2), hence

.. math:: L_i = \mathrm{fl}\Big(\sum_{r\le n} \ell_{i(r)}\Big)(1 - \sigma_n) \le s_i \le
          \mathrm{fl}\Big(\sum_{r\le n} h_{i(r)}\Big)(1 + \sigma_n) = U_i,
          \qquad \sigma_n = 4(n + 4)u,

since :math:`(1-\sigma_n)(1+u) \le (1-\gamma_{n-1})/(1+\gamma_{n-1})` (and likewise above):
:math:`\sigma_n` covers both sums' errors and the rounding of the product. The bounds hold
for any subset of the updates (Bulyan's rounds), as the entrywise ones do. Some scores are
*known* exactly without any distance: +inf for an update holding NaN or inf, and 0 for
every finite one when n = 0.

*Candidates and ranks* (:func:`certified_order`). Let :math:`U_{(m)}` be the m-th smallest
upper bound. The exact method's m best (stable sort by score: by (s_i, i)) are among the
candidates :math:`C = \{i : L_i \le U_{(m)}\}`: the m updates of smallest U all have
:math:`s \le U \le U_{(m)}`, so the m-th smallest score :math:`s_{(m)} \le U_{(m)}`, and
every i among the m best has :math:`L_i \le s_i \le s_{(m)} \le U_{(m)}`. Within C, the
updates whose closed interval :math:`[L_i, U_i]` meets another candidate's (and whose
score is not known) are ranked by their exact score, recomputed from exact rows; every
other candidate keeps :math:`L_i` as its sort key. This key order, with ties to the lower
index, is the order of (s_i, i) on C: two exact keys compare as the scores do; a
candidate j with a non-exact key has an interval disjoint from every other's, so for any
other i either :math:`U_j < L_i` (then :math:`L_j \le s_j \le U_j < L_i \le`
:math:`\mathrm{key}_i` and :math:`s_j < s_i`) or :math:`U_i < L_j` (symmetrically). Sorting C
by the key therefore yields the exact method's m best, in its order. Exact rows come from
the exact kernel's own sums (bit for bit the same as the full matrix's rows, see
``exact_sq_rows``), and the exact scores from :func:`scores` on a matrix of the same shape,
so they are the very floats the exact method compares. For m = 1 (Krum and each Bulyan
round) every candidate meets the one of smallest U, so either C is a single update or
all of C is recomputed.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: float64's unit roundoff u = 2^-53.
UNIT_ROUNDOFF = 2.0 ** -53

#: ``exact_rows(indices)`` -> (len(indices), K) rows of the exact distance matrix.
ExactRows = Callable[[np.ndarray], np.ndarray]


def _neighbour_count(neighbours: int, bad: np.ndarray) -> int:
    """How many distances a finite update's score sums: at most one per other finite update."""
    return min(neighbours, int((~bad).sum()) - 1)


def scores(distances: np.ndarray, neighbours: int, bad: np.ndarray) -> np.ndarray:
    """Krum score of each update: the sum of its ``neighbours`` smallest distances to the
    other updates (Blanchard et al., NeurIPS 2017).

    ``bad`` marks the updates holding NaN or inf: they score +inf, and finite updates are
    scored among the finite ones only (over at most as many neighbours as there are), so
    a Byzantine NaN never decides the ranking of the honest updates.
    """
    k = distances.shape[0]
    result = np.full(k, np.inf)
    good = np.flatnonzero(~bad)
    among = distances[np.ix_(good, good)] + np.diag(np.full(good.size, np.inf))  # not oneself
    n = _neighbour_count(neighbours, bad)
    result[good] = np.sort(among, axis=1)[:, :n].sum(axis=1) if n > 0 else 0.0
    return result


def score_bounds(lower: np.ndarray, upper: np.ndarray, neighbours: int,
                 bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, U, known): L <= s <= U for the scores s that :func:`scores` computes from any
    matrix between ``lower`` and ``upper``; ``known`` marks the scores known exactly
    (L = U = s: +inf for a bad update, 0 when no neighbour is summed). See the module
    docstring for the proof."""
    low, high = scores(lower, neighbours, bad), scores(upper, neighbours, bad)
    n = _neighbour_count(neighbours, bad)
    if n > 0:
        sigma = 4 * (n + 4) * UNIT_ROUNDOFF
        low *= 1.0 - sigma
        high *= 1.0 + sigma
    return low, high, bad | (n <= 0)


def certified_order(lower: np.ndarray, upper: np.ndarray, exact_rows: ExactRows, neighbours: int,
                    bad: np.ndarray, m: int, among: np.ndarray | None = None) -> np.ndarray:
    """The m updates of ``among`` (default: all) of lowest exact score, best first, ties to
    the lower index: ``among[np.argsort(s[among], kind="stable")][:m]`` for the scores s of
    the exact distance matrix, computed from its bounds (``lower``, ``upper``) and from the
    exact rows of the few updates the bounds cannot rank (module docstring)."""
    among = np.arange(lower.shape[0]) if among is None else among
    if m <= 0 or among.size == 0:
        return among[:0]
    low, high, known = score_bounds(lower, upper, neighbours, bad)
    cut = np.partition(high[among], min(m, among.size) - 1)[min(m, among.size) - 1]
    candidates = among[low[among] <= cut]
    a, b = low[candidates], high[candidates]
    meets = (a[:, None] <= b[None, :]) & (a[None, :] <= b[:, None])
    np.fill_diagonal(meets, False)
    ambiguous = candidates[meets.any(axis=1) & ~known[candidates]]
    key = low
    if ambiguous.size:
        matrix = upper.copy()  # same shape as the exact matrix: scores sums each row as it would
        matrix[ambiguous] = exact_rows(ambiguous)
        key[ambiguous] = scores(matrix, neighbours, bad)[ambiguous]
    return candidates[np.argsort(key[candidates], kind="stable")][:m]


def bulyan_selection(k: int, rounds: int, best: Callable[[np.ndarray], int]) -> np.ndarray:
    """Bulyan's first phase (El Mhamdi et al., ICML 2018): ``rounds`` times, the remaining
    update ``best(remaining)`` picks (a position in ``remaining``, the indices not yet
    selected, in increasing order) moves to the selection. Returns the selected indices."""
    remaining, selected = np.arange(k), []
    for _ in range(rounds):
        pick = best(remaining)
        selected.append(remaining[pick])
        remaining = np.delete(remaining, pick)
    return np.array(selected, dtype=np.intp)


def exact_best(distances: np.ndarray, neighbours: Callable[[int], int],
               bad: np.ndarray) -> Callable[[np.ndarray], int]:
    """Bulyan's pick from exact distances: the remaining update of lowest Krum score over
    ``neighbours(remaining)`` neighbours, ties to the lower index (finite updates first)."""
    def best(remaining: np.ndarray) -> int:
        sub = distances[np.ix_(remaining, remaining)]
        return int(np.argmin(scores(sub, neighbours(remaining.size), bad[remaining])))

    return best


def certified_best(lower: np.ndarray, upper: np.ndarray, exact_rows: ExactRows,
                   neighbours: Callable[[int], int], bad: np.ndarray) -> Callable[[np.ndarray], int]:
    """:func:`exact_best`'s pick, from bounds of the exact distances: each round is
    :func:`certified_order` with m = 1 on the remaining updates (bounds of a subset's
    distances are the subset of the bounds; the exact rows, cached by ``exact_rows``, are
    cut to the remaining columns, so the scores are those of the exact round's matrix)."""
    def best(remaining: np.ndarray) -> int:
        sub = np.ix_(remaining, remaining)
        rows = lambda positions: exact_rows(remaining[positions])[:, remaining]  # noqa: E731
        return int(certified_order(lower[sub], upper[sub], rows, neighbours(remaining.size),
                                   bad[remaining], 1)[0])

    return best
