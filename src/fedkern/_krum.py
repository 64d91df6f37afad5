"""Krum's scores and Bulyan's selection on a K x K matrix of squared distances: the one
implementation behind :func:`fedkern.krum`, :func:`fedkern.bulyan` and the Flower drop-in."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


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
    n = min(neighbours, good.size - 1)
    result[good] = np.sort(among, axis=1)[:, :n].sum(axis=1) if n > 0 else 0.0
    return result


def bulyan_selection(distances: np.ndarray, rounds: int, neighbours: Callable[[int], int],
                     bad: np.ndarray) -> np.ndarray:
    """Bulyan's first phase (El Mhamdi et al., ICML 2018): ``rounds`` times, the remaining
    update of lowest Krum score (``neighbours(remaining)`` neighbours; ties to the lower
    index, finite updates first) moves to the selection. Returns the selected indices."""
    remaining, selected = np.arange(distances.shape[0]), []
    for _ in range(rounds):
        sub = distances[np.ix_(remaining, remaining)]
        best = int(np.argmin(scores(sub, neighbours(remaining.size), bad[remaining])))
        selected.append(remaining[best])
        remaining = np.delete(remaining, best)
    return np.array(selected, dtype=np.intp)
