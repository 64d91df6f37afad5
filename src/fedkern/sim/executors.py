r"""Executors: where the clients of a round train.

The round splits its cohort into fixed chunks of consecutive clients (in client-id
order; the split depends only on the cohort, see :func:`chunks`). An executor runs
``work(chunk)`` for every chunk, wherever it likes, and yields the results **in chunk
order**; the round combines them in that order. Because neither the chunks nor the
combination order depend on the executor or the number of workers, and every client
draws its randomness from its own (seed, round, client) stream, every executor gives
the same bits.

To plug in another executor (processes, a cluster), implement :class:`Executor`:
``start`` receives the round's trainer once, ``map`` runs chunks, ``close`` frees
workers.

Examples
--------
>>> from fedkern.sim.executors import ThreadExecutor, chunks
>>> chunks(10)
[range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6), range(6, 7), range(7, 8), range(8, 9), range(9, 10)]
>>> with ThreadExecutor(workers=2) as executor:
...     list(executor.map(lambda chunk: sum(chunk), chunks(40)))[:3]
[3, 12, 21]
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from .. import _validate as check

#: At most this many chunks per round. More chunks balance the workers better; each
#: chunk holds one float64 partial sum while the round combines them, so this also
#: bounds the round's memory (MAX_CHUNKS x D floats, never K x D). Part of the bits:
#: changing it changes the summation order of every run.
MAX_CHUNKS = 16


def chunks(k: int) -> list[range]:
    """Split positions ``0..k-1`` of a round's cohort into at most :data:`MAX_CHUNKS` runs."""
    size = -(-k // MAX_CHUNKS)
    return [range(start, min(start + size, k)) for start in range(0, k, size)]


class Executor(Protocol):
    """What the round needs from an executor."""

    #: name used by configs and the history
    name: str
    #: number of clients trained at once
    workers: int

    def start(self, trainer: Any) -> None:
        """Called once before the first round with the object whose method ``map`` runs."""

    def map(self, work: Callable[[range], Any], items: Sequence[range]) -> Iterator[Any]:
        """Run ``work`` on every item; yield the results in the items' order."""

    def close(self) -> None:
        """Release the workers (the executor may not be used afterwards)."""


class _Context:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(_Context):
    """Train clients one after another in the calling thread (the default)."""

    name = "serial"
    workers = 1

    def start(self, trainer: Any) -> None:
        pass

    def map(self, work: Callable[[range], Any], items: Iterable[range]) -> Iterator[Any]:
        # a generator: the round combines each chunk before the next one trains, so only
        # one partial sum is alive at a time
        return (work(item) for item in items)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "SerialExecutor()"


class ThreadExecutor(_Context):
    """Train chunks on a pool of threads (the Numba training kernels release the GIL).

    Parameters
    ----------
    workers : number of threads, default ``os.cpu_count()``
    """

    name = "threads"

    def __init__(self, workers: int | None = None):
        self.workers = check.count(os.cpu_count() or 1 if workers is None else workers, "workers", low=1)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(self.workers, thread_name_prefix="fedkern-sim")

    def start(self, trainer: Any) -> None:
        pass

    def map(self, work: Callable[[range], Any], items: Iterable[range]) -> Iterator[Any]:
        if self._pool is None:
            raise check.FedkernValueError("this ThreadExecutor was closed")
        return self._pool.map(work, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __repr__(self) -> str:
        return f"ThreadExecutor(workers={self.workers})"


#: Executors by config name.
EXECUTORS: dict[str, type] = {"serial": SerialExecutor, "threads": ThreadExecutor}
