r"""Executors: where the clients of a round train.

The round splits its cohort into fixed chunks of consecutive clients (in client-id
order; the split depends only on the cohort, see :func:`chunks`). An executor trains
every chunk, wherever it likes, and yields the results **in chunk order**; the round
combines them in that order. Because neither the chunks nor the combination order depend
on the executor or the number of workers, and every client draws its randomness from its
own (seed, round, client) stream, every executor gives the same bits.

The interface is made for workers in other processes or on other machines too:
``start(trainer)`` hands over, once, the object that trains (the
:class:`~fedkern.sim.rounds.Simulation`: model, data, settings); each round,
``run(plan, items)`` gets the round's plan (the broadcast parameters and the cohort's
small per-client arrays, all of it picklable) and yields
``trainer.train_chunk(item, plan)`` for every item; ``plan["costs"]`` estimates each
client's work (examples x epochs), for scheduling the longest chunks first. A process or
Ray executor ships the trainer to its workers once and only the plan each round.

Examples
--------
>>> from fedkern.sim.executors import ThreadExecutor, chunks
>>> chunks(10)
[range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6), range(6, 7), range(7, 8), range(8, 9), range(9, 10)]
>>> class Summer:                       # a stand-in trainer
...     def train_chunk(self, chunk, plan):
...         return plan["scale"] * sum(chunk)
>>> with ThreadExecutor(workers=2) as executor:
...     executor.start(Summer())
...     list(executor.run({"scale": 10}, chunks(40)))[:3]
[30, 120, 210]
"""
from __future__ import annotations

import os
import threading
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


class Trainer(Protocol):
    """What an executor runs: ``train_chunk(positions, plan)`` for one chunk of a round."""

    def train_chunk(self, positions: range, plan: dict) -> Any:
        ...


class Executor(Protocol):
    """What the round needs from an executor."""

    #: name used by configs and the history
    name: str
    #: number of clients trained at once
    workers: int

    def start(self, trainer: Trainer) -> None:
        """Called once, before the first round, with the trainer."""

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        """Yield ``trainer.train_chunk(item, plan)`` for every item, in the items' order."""

    def close(self) -> None:
        """Release the workers (the executor may not be used afterwards)."""


def longest_first(plan: dict, items: Sequence[range]) -> list[int]:
    """Indices of ``items`` by decreasing work, ``plan["costs"]`` summed per item (LPT
    scheduling: the longest chunk starts first, so it does not start last and finish late)."""
    costs = plan.get("costs")
    if costs is None:
        return list(range(len(items)))
    work = [float(sum(costs[p] for p in item)) for item in items]
    return sorted(range(len(items)), key=lambda i: -work[i])


class _Local:
    """Executors in this process: they call the trainer they were started with."""

    _trainer: Trainer | None = None

    def start(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def _work(self, plan: dict) -> Callable[[range], Any]:
        if self._trainer is None:
            raise check.FedkernValueError(f"{type(self).__name__}.run before start(trainer)")
        trainer = self._trainer
        return lambda positions: trainer.train_chunk(positions, plan)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialExecutor(_Local):
    """Train clients one after another in the calling thread (the default)."""

    name = "serial"
    workers = 1

    def run(self, plan: dict, items: Iterable[range]) -> Iterator[Any]:
        # a generator: the round takes each chunk before the next one trains
        return map(self._work(plan), items)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return "SerialExecutor()"


class ThreadExecutor(_Local):
    """Train chunks on a pool of threads (the Numba training kernels release the GIL).

    Parameters
    ----------
    workers : number of threads, default ``os.cpu_count()``
    """

    name = "threads"

    def __init__(self, workers: int | None = None):
        self.workers = check.count(os.cpu_count() or 1 if workers is None else workers, "workers", low=1)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(self.workers, thread_name_prefix="fedkern-sim")

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        if self._pool is None:
            raise check.FedkernValueError("this ThreadExecutor was closed")
        work = self._work(plan)
        results: list = [None] * len(items)
        pending = iter(longest_first(plan, items))
        lock = threading.Lock()

        def drain() -> None:
            # each worker takes the longest chunk left until none is: one task per worker
            # and round rather than one per chunk (a task's hand-off costs about as much
            # as a small chunk's training)
            while True:
                with lock:
                    i = next(pending, None)
                if i is None:
                    return
                results[i] = work(items[i])

        for future in [self._pool.submit(drain) for _ in range(min(self.workers, len(items)))]:
            future.result()       # raises a chunk's exception
        return iter(results)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __repr__(self) -> str:
        return f"ThreadExecutor(workers={self.workers})"


#: Executors by config name.
EXECUTORS: dict[str, type] = {"serial": SerialExecutor, "threads": ThreadExecutor}
