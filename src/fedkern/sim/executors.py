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
client's work (examples x epochs), for scheduling the longest chunks first. The plan
entries named in :data:`OUTPUTS` are written by ``train_chunk`` (the round's update
matrix, when the rule needs every row). :class:`ProcessExecutor` ships the trainer to its
workers once, its data in shared memory, and only the plan each round.

Every executor takes a ``deadline``: seconds from the start of ``run`` by which a chunk's
result must be back. A chunk that is not (it finished late, never started, or its worker
was stopped at the deadline) is yielded as :class:`Lost`, and so is a chunk whose worker
died and whose retry died too (the executors that retry: processes and Ray); the round
counts its clients as dropouts. Without losses the deadline changes no bits; with them
the run depends on timing, as a real deployment's does.

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

import ctypes
import dataclasses
import io
import multiprocessing
import os
import pickle
import secrets
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import connection, shared_memory
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from .. import _validate as check
from .. import backends
from .._errors import WorkerError

#: At most this many chunks per round. More chunks balance the workers better; each
#: chunk holds one float64 partial sum while the round combines them, so this also
#: bounds the round's memory (MAX_CHUNKS x D floats, never K x D). Part of the bits:
#: changing it changes the summation order of every run.
MAX_CHUNKS = 16

#: Plan entries that ``train_chunk`` writes into (the round's update matrix): an executor
#: whose workers live elsewhere gives them a buffer of their own and copies it back.
OUTPUTS = ("rows",)


@dataclasses.dataclass(frozen=True)
class Lost:
    """What an executor yields for a chunk whose result did not come back: ``reason`` is
    ``"deadline"`` (not back by the round's deadline) or ``"worker"`` (its worker died,
    and so did the retry)."""

    reason: str


class _Clock:
    """A round's deadline: ``seconds`` from now (None: none)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def left(self) -> float | None:
        """Seconds to the deadline (0 once passed; None: no deadline)."""
        return None if self.end is None else max(0.0, self.end - time.monotonic())


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else check.real(seconds, "deadline", low=0.0, low_inclusive=False)


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
    #: seconds from the start of ``run`` by which a chunk must be back (None: no deadline)
    deadline: float | None

    def start(self, trainer: Trainer) -> None:
        """Called once, before the first round, with the trainer."""

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        """Yield ``trainer.train_chunk(item, plan)`` for every item, in the items' order
        (a :class:`Lost` for an item whose result did not come back)."""

    def close(self) -> None:
        """Release the workers (the executor may not be used afterwards)."""


def _work(plan: dict, items: Sequence[range]) -> list[float]:
    """Each item's work: ``plan["costs"]`` summed over its positions (its size without costs)."""
    costs = plan.get("costs")
    if costs is None:
        return [float(len(item)) for item in items]
    return [float(sum(costs[p] for p in item)) for item in items]


def longest_first(plan: dict, items: Sequence[range]) -> list[int]:
    """Indices of ``items`` by decreasing work, ``plan["costs"]`` summed per item (LPT
    scheduling: the longest chunk starts first, so it does not start last and finish late)."""
    if plan.get("costs") is None:
        return list(range(len(items)))
    work = _work(plan, items)
    return sorted(range(len(items)), key=lambda i: -work[i])


class _Closing:
    """``with executor:`` closes it at the end."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Local(_Closing):
    """Executors in this process: they call the trainer they were started with. A chunk
    cannot be stopped here: one that runs past the deadline is waited for, then lost."""

    _trainer: Trainer | None = None
    deadline: float | None = None

    def start(self, trainer: Trainer) -> None:
        self._trainer = trainer

    def _train(self, plan: dict) -> Callable[[range], Any]:
        """Train one item, or lose it if the round's deadline passes before it starts or ends."""
        if self._trainer is None:
            raise check.FedkernValueError(f"{type(self).__name__}.run before start(trainer)")
        trainer, clock = self._trainer, _Clock(self.deadline)

        def work(positions: range) -> Any:
            if clock.passed():
                return Lost("deadline")
            result = trainer.train_chunk(positions, plan)
            return Lost("deadline") if clock.passed() else result
        return work


class SerialExecutor(_Local):
    """Train clients one after another in the calling thread (the default).

    Parameters
    ----------
    deadline : seconds from the round's start by which a chunk must be back (see
        :class:`Lost`); a chunk that runs past it is waited for, then lost
    """

    name = "serial"
    workers = 1

    def __init__(self, deadline: float | None = None):
        self.deadline = _deadline(deadline)

    def run(self, plan: dict, items: Iterable[range]) -> Iterator[Any]:
        # lazy: the round takes each chunk before the next one trains (the clock starts now)
        return map(self._train(plan), items)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"SerialExecutor(deadline={self.deadline})"


class ThreadExecutor(_Local):
    """Train chunks on a pool of threads (the Numba training kernels release the GIL).

    Parameters
    ----------
    workers : number of threads, default ``os.cpu_count()``
    deadline : seconds from the round's start by which a chunk must be back (see
        :class:`Lost`); a chunk that runs past it is waited for, then lost
    """

    name = "threads"

    def __init__(self, workers: int | None = None, *, deadline: float | None = None):
        self.workers = check.count(os.cpu_count() or 1 if workers is None else workers, "workers", low=1)
        self.deadline = _deadline(deadline)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(self.workers, thread_name_prefix="fedkern-sim")

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        if self._pool is None:
            raise check.FedkernValueError("this ThreadExecutor was closed")
        work = self._train(plan)
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
        return f"ThreadExecutor(workers={self.workers}, deadline={self.deadline})"


# --------------------------------------------------------------------------- processes
#: How the workers start: "spawn", a fresh interpreter per worker. Not "fork": a forked
#: child inherits the parent's OpenMP (GNU libgomp, the Cython kernels' runtime) and Numba
#: thread pools without their threads, only their locks and state, and its first parallel
#: kernel can hang or crash. "forkserver" would be safe too, but it does not exist on
#: Windows and its server, one per interpreter, forks from whatever it imported; spawn's
#: cost (importing fedkern, about 0.3 s per worker here) is paid once per executor.
START_METHOD = "spawn"
#: Arrays of the round's plan of at least this many bytes travel through the executor's
#: shared memory (written once, read by every worker in place); smaller ones are pickled
#: into the message each worker gets. Read-only arrays always go through shared memory.
SHARE_BYTES = 1 << 16
#: Offsets of the arrays in a shared segment are multiples of this (a cache line, and
#: enough for any SIMD load the kernels make).
_ALIGN = 64
#: Persistent id standing for the executor itself inside the trainer it ships.
_SELF = ("executor",)
#: An item's result before it comes back.
_UNDONE = object()


class _Packer(pickle.Pickler):
    """Pickles an object, setting aside the arrays ``share(array)`` picks and the
    ``outputs``: each becomes a reference (offset, dtype, shape, writable) into one buffer,
    laid out in the order they are met, :attr:`size` bytes in all. The caller fills the
    buffer from :attr:`arrays` (offset, array, is_output); ``special`` maps objects (by
    identity) to persistent ids of their own."""

    def __init__(self, file, share: Callable[[np.ndarray], bool], outputs: Sequence[np.ndarray] = (),
                 special: dict[int, tuple] | None = None):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.share, self.special = share, special or {}
        self.outputs = {id(a) for a in outputs}
        self.arrays: list[tuple[int, np.ndarray, bool]] = []
        self.size = 0
        self._ids: dict[int, tuple] = {}

    def persistent_id(self, obj):
        special = self.special.get(id(obj))
        if special is not None:
            return special
        # subclasses other than memmap (np.matrix, masked arrays) pickle as they are
        if type(obj) not in (np.ndarray, np.memmap) or obj.dtype.hasobject or obj.nbytes == 0:
            return None
        known = self._ids.get(id(obj))
        if known is not None:          # the same array twice: one copy (it is kept alive below)
            return known
        output = id(obj) in self.outputs
        if not (output or self.share(obj)):
            return None
        offset = _aligned(self.size)
        self.size = offset + obj.nbytes
        # keeping obj in self.arrays keeps its id from being reused by a temporary while we pickle
        self.arrays.append((offset, obj, output))
        pid = self._ids[id(obj)] = ("array", offset, obj.dtype, obj.shape, output)
        return pid


def _pack(obj, what: str, share: Callable[[np.ndarray], bool], outputs: Sequence[np.ndarray] = (),
          special: dict[int, tuple] | None = None) -> _Packer:
    """``obj`` (``what`` it is, for the error) pickled by a :class:`_Packer` (its bytes in ``.payload``)."""
    file = io.BytesIO()
    packer = _Packer(file, share, outputs, special)
    try:
        packer.dump(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise check.FedkernTypeError(f"ProcessExecutor: cannot send {what} to the worker processes "
                                     f"(everything it holds must pickle): {err}") from err
    packer.payload = file.getvalue()
    return packer


def _view(buffer, offset: int, dtype, shape: tuple) -> np.ndarray:
    return np.ndarray(shape, dtype, buffer=buffer, offset=offset)


def _fill(packer: _Packer, buffer) -> None:
    """Copy a packer's input arrays into their places in ``buffer`` (outputs are written by
    the workers, not read)."""
    for offset, array, output in packer.arrays:
        if not output:
            _view(buffer, offset, array.dtype, array.shape)[...] = array


class _Unpacker(pickle.Unpickler):
    """Reads what a :class:`_Packer` wrote, its arrays as views of ``buffer`` (read-only but
    for the outputs) or, with ``copy``, as copies of their own."""

    def __init__(self, payload: bytes, buffer, special: dict[tuple, Any], copy: bool = False):
        super().__init__(io.BytesIO(payload))
        self.buffer, self.special, self.copy = buffer, special, copy

    def persistent_load(self, pid):
        if pid[0] != "array":
            return self.special[pid]
        _, offset, dtype, shape, writable = pid
        array = _view(self.buffer, offset, dtype, shape)
        if self.copy:
            return array.copy()
        array.flags.writeable = writable
        return array


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def _shm_free() -> int | None:
    """Free bytes for shared memory, where the system says (Linux: the tmpfs /dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        return None
    stats = os.statvfs("/dev/shm")
    return stats.f_bavail * stats.f_frsize


def _segment(size: int) -> shared_memory.SharedMemory:
    """A new shared memory segment of ``size`` bytes."""
    free = _shm_free()
    if free is not None:
        # Linux keeps POSIX shared memory in the tmpfs /dev/shm (64 MiB in a default Docker
        # container): creating a segment larger than its free space succeeds, but writing
        # into it then kills the process with SIGBUS, so refuse it here instead
        if size > free:
            raise check.FedkernValueError(
                f"ProcessExecutor: the data needs {size / 2**20:.1f} MiB of shared memory, but /dev/shm has "
                f"{free / 2**20:.1f} MiB free (in a container, give it more, e.g. docker run --shm-size=...)")
    # a name of our own, so that a leak is easy to spot (ls /dev/shm/fedkern_*); short,
    # as macOS allows 31 characters
    return shared_memory.SharedMemory(name=f"fedkern_{secrets.token_hex(6)}", create=True, size=max(size, 1))


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process (its ``__cause__`` in the parent)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _exception_bytes(err: BaseException) -> bytes | None:
    """The exception pickled, if it survives the round trip (many with custom
    ``__init__`` arguments do not); None otherwise, and the parent raises a WorkerError."""
    try:
        data = pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
        return data
    except Exception:
        return None


class _Worker:
    """The state of one worker process: its trainer, the round's plan, the shared segments."""

    def __init__(self):
        self.trainer = self.plan = None
        self.backend, self.limit = "auto", SHARE_BYTES
        self.segment = self.arena = None       # the trainer's shared arrays; the plans' arena

    def handle(self, message: tuple) -> tuple:
        kind = message[0]
        if kind == "chunk":
            _, index, item, payload, slot, slot_bytes = message
            if payload is not None:      # the first chunk this worker gets in the round
                self.backend, self.limit, self.plan = _Unpacker(payload, self.arena and self.arena.buf, {}).load()
            # the parent's backend choice (set_backend / use_backend), so the bits are its bits
            with backends.use_backend(self.backend):
                result = self.trainer.train_chunk(item, self.plan)
            return self._result(index, result, slot, slot_bytes)
        if kind == "trainer":
            _, name, payload = message
            self.trainer = self.plan = None
            self.segment = _swap(self.segment, name)
            self.trainer = _Unpacker(payload, self.segment and self.segment.buf, {_SELF: None}).load()
            return ("ok",)
        if kind == "arena":
            self.plan = None             # its arrays are views of the old arena
            self.arena = _swap(self.arena, message[1])
            return ("ok",)
        raise ValueError(f"unknown message {kind!r}")

    def _result(self, index: int, result: Any, slot: int, slot_bytes: int) -> tuple:
        """The reply for a chunk's result: its large arrays (a float64 partial sum) written
        into the item's slot of the arena when they fit, else everything pickled; and how
        many bytes the large arrays took, for the next round's slots."""
        packer = _pack(result, "the chunk's result", lambda array: array.nbytes >= self.limit)
        if 0 < packer.size <= slot_bytes:
            _fill(packer, self.arena.buf[slot:slot + slot_bytes])
            return "done", index, packer.payload, True, packer.size
        return "done", index, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), False, packer.size


def _swap(old: shared_memory.SharedMemory | None, name: str | None) -> shared_memory.SharedMemory | None:
    """Attach the segment ``name`` (None: none) and let go of ``old``."""
    if old is not None:
        try:
            old.close()
        except BufferError:
            pass       # a view of it is still alive somewhere: the mapping goes with the process
    return None if name is None else shared_memory.SharedMemory(name=name)


#: glibc's malloc parameters for the workers (mallopt's M_MMAP_THRESHOLD and
#: M_TRIM_THRESHOLD): the largest values its dynamic rule reaches.
_MALLOC = ((-3, 32 << 20), (-1, 64 << 20))


def _keep_freed_memory() -> None:
    """Let a worker reuse the memory its temporaries free, as a long-running process does.

    A fresh glibc process hands blocks above 128 KiB back to the system as they are freed,
    until it frees some large block (which raises both thresholds); a worker that never
    did faults every page of a model's per-step temporaries in again, each step: a numpy
    model of 51k parameters trained 2.3x slower in a worker than in the parent (6,600
    page faults per chunk against none). Other C libraries have no mallopt: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    for option, value in _MALLOC:
        mallopt(option, value)


def _serve(conn) -> None:
    """A worker process's loop: answer the parent's messages until it says stop or goes away."""
    # Ctrl-C reaches the whole process group: the parent handles it and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # N workers on one thread each, not N x the cores: the Cython (OpenMP) and Numba
    # kernels, including those the trainer loads as it unpickles, run on one thread here
    backends.set_num_threads(1)
    _keep_freed_memory()
    worker = _Worker()
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            return                       # the parent is gone
        if message[0] == "stop":
            return
        try:
            reply = pickle.dumps(worker.handle(message), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as err:     # everything goes back to the parent, which decides
            reply = pickle.dumps(("error", _exception_bytes(err), traceback.format_exc()))
        conn.send_bytes(reply)


class _Pool:
    """The worker processes, their pipes and the parent's shared segments. Holds no
    reference to the executor, so that a finaliser can shut it down."""

    def __init__(self, n: int):
        context = multiprocessing.get_context(START_METHOD)
        self.processes: list = []
        self.connections: list = []
        self.arena: shared_memory.SharedMemory | None = None
        self.named: list[shared_memory.SharedMemory] = []      # created, not yet unlinked
        try:
            for i in range(n):
                ours, theirs = context.Pipe()
                # daemon: multiprocessing terminates a worker whose parent exits without close()
                process = context.Process(target=_serve, args=(theirs,), name=f"fedkern-sim-{i}", daemon=True)
                process.start()
                theirs.close()           # so that our end sees EOF if the worker dies
                self.processes.append(process)
                self.connections.append(ours)
        except BaseException:
            self.shutdown()
            raise

    # ---------------------------------------------------------------- messages
    def send(self, w: int, message: tuple) -> None:
        try:
            self.connections[w].send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            raise self._died(w) from None

    def ready(self, workers: Iterable[int], timeout: float | None = None) -> list[int]:
        """Block until some of ``workers`` replied or died, or ``timeout`` seconds passed;
        return those that did."""
        workers = list(workers)
        waits = {}
        for w in workers:
            waits[self.connections[w]] = waits[self.processes[w].sentinel] = w
        return sorted({waits[r] for r in connection.wait(list(waits), timeout)})

    def reply(self, w: int) -> tuple:
        """Worker ``w``'s reply (it is ready), or a WorkerError if it died."""
        try:
            return pickle.loads(self.connections[w].recv_bytes())
        except (EOFError, OSError):
            raise self._died(w) from None

    def _died(self, w: int) -> WorkerError:
        process = self.processes[w]
        process.join(timeout=1.0)
        return WorkerError(f"ProcessExecutor: worker {w} (pid {process.pid}) died (exit code {process.exitcode})")

    def everyone(self, message: tuple) -> None:
        """Send every worker ``message`` and wait for all of them to acknowledge it."""
        for w in range(len(self.processes)):
            self.send(w, message)
        failures = {}
        for w in range(len(self.processes)):
            self.ready([w])
            answer = self.reply(w)
            if answer[0] == "error":
                failures[w] = answer
        if failures:
            w = min(failures)
            raise _remote(failures[w], f"worker {w} could not take the {message[0]}")

    # ---------------------------------------------------------------- shared memory
    def share(self, size: int, message: Callable[[str | None], tuple],
              fill: Callable[[memoryview], None] | None = None) -> shared_memory.SharedMemory | None:
        """A new segment of ``size`` bytes (None if 0), filled by ``fill``, attached by every
        worker (told by ``message(name)``) and then unlinked: from then on it has no name
        that could leak, and it lives while a process maps it."""
        segment = None
        if size:
            segment = _segment(size)
            self.named.append(segment)
            if fill is not None:
                fill(segment.buf)
        self.everyone(message(segment and segment.name))
        if segment is not None:
            self.named.remove(segment)
            segment.unlink()
        return segment

    def ensure_arena(self, size: int) -> None:
        """An arena of at least ``size`` bytes for the rounds' plans (grown by doubling, so rarely)."""
        if size == 0 or (self.arena is not None and self.arena.size >= size):
            return
        old, self.arena = self.arena, None
        self.arena = self.share(max(size, 2 * (old.size if old else 0)), lambda name: ("arena", name))
        if old is not None:
            old.close()

    # ---------------------------------------------------------------- a round
    def train(self, payload: bytes, items: Sequence[range], order: list[int], slots: int, slot_bytes: int,
              clock: _Clock) -> tuple[list, tuple | None, int, list[int]]:
        """The items ``order`` names trained, in that order, each worker taking the next
        one as it finishes one (the plan goes with its first). Item i's result comes back
        through ``slot_bytes`` of the arena at ``slots + i * slot_bytes`` if it fits there.
        Returns the results in item order (:data:`_UNDONE` for an item not done), the
        failure of the lowest failed item (None: none failed), the most bytes a result's
        large arrays took, and the workers that are no use any more: dead, or busy when the
        deadline passed. After a failure, or the deadline, no new item starts; after a
        failure the running ones finish, so the workers are ready for the next round."""
        results: list = [_UNDONE] * len(items)
        failures: dict[int, tuple] = {}
        todo, busy, fresh = deque(order), {}, set(range(len(self.processes)))
        needed, gone = 0, []

        def give(w: int) -> None:
            i = todo.popleft()
            try:
                self.send(w, ("chunk", i, items[i], payload if w in fresh else None, slots + i * slot_bytes,
                              slot_bytes))
            except WorkerError:
                todo.appendleft(i)
                gone.append(w)
                return
            fresh.discard(w)
            busy[w] = i

        for w in range(len(self.processes)):
            if todo:
                give(w)
        while busy:
            ready = self.ready(busy, clock.left())
            if not ready:                # the deadline passed: the busy workers are stopped
                gone.extend(busy)
                break
            for w in ready:
                i = busy.pop(w)
                try:
                    answer = self.reply(w)
                except WorkerError:
                    gone.append(w)
                    continue
                if answer[0] == "done":
                    _, _, data, in_slot, size = answer
                    needed = max(needed, size)
                    if in_slot:
                        # copied out: the round may keep them (error feedback's residuals)
                        # past this arena's next use
                        slot = slots + i * slot_bytes
                        results[i] = _Unpacker(data, self.arena.buf[slot:slot + slot_bytes], {}, copy=True).load()
                    else:
                        results[i] = pickle.loads(data)
                else:
                    failures[i] = answer
                if todo and not failures and not clock.passed():
                    give(w)
        return results, (failures[min(failures)] if failures else None), needed, sorted(gone)

    def shutdown(self, patience: float = 1.0) -> None:
        """Stop the workers (asking first, then terminating those that do not stop within
        ``patience`` seconds, then killing), close the pipes, release the segments."""
        for conn in self.connections:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=patience)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.connections:
            conn.close()
        self.processes, self.connections = [], []
        for segment in self.named:       # made but not yet unlinked: an error came between
            segment.close()
            segment.unlink()
        self.named = []
        if self.arena is not None:
            self.arena.close()
            self.arena = None


def _remote(answer: tuple, what: str) -> BaseException:
    """The exception of a worker's error reply, with the worker's traceback as its cause."""
    _, data, text = answer
    error = None
    if data is not None:
        try:
            error = pickle.loads(data)
        except Exception:
            error = None
    if error is None:
        return WorkerError(f"ProcessExecutor: {what}:\n{text}")
    error.__cause__ = _WorkerTraceback(text)
    return error


class ProcessExecutor(_Closing):
    """Train chunks in worker processes: for many cores and Python trainers that hold the GIL.

    ``start(trainer)`` starts the workers (the first time) and ships the trainer to each
    of them once; its read-only arrays (a :class:`~fedkern.sim.data.FederatedData`'s
    ``x``, ``y`` and ``offsets`` are) are put in one shared memory segment, which every
    worker maps instead of holding a copy. Each round, only the plan moves: its arrays of at
    least :data:`SHARE_BYTES` bytes (and every read-only one, such as the broadcast
    parameters) are written once into a shared arena that all workers read in place; the
    rest is pickled once and sent to each worker with its first chunk. The chunks go out
    longest first, each worker taking the next as it finishes one. The results come back
    through the arena too (a chunk's float64 partial sum into a slot of its own, sized by
    the previous round's results; the rows of the round's update matrix into the plan's
    matrix, copied into the caller's) and are returned in chunk order, so the bits equal
    the serial executor's.

    Workers are fresh interpreters (:data:`START_METHOD`), each running fedkern's compiled
    kernels on one thread; a script that uses this executor must guard its entry point
    with ``if __name__ == "__main__":``, and the trainer (with any model or
    ``client_update`` of your own) must pickle by reference from an importable module.
    What a worker changes in its copy of the trainer stays there.

    A chunk's exception is raised in the parent as it was raised in the worker, with the
    worker's traceback as its ``__cause__``, and the executor stays usable. A worker that
    dies, or is still busy when the round's deadline passes, is the end of this set of
    workers: a fresh one is started (and the trainer shipped again, :attr:`restarts`
    counts them); the chunks a dead worker left undone are retried once on it, and
    yielded as :class:`Lost` if they fail again or the deadline passes. ``close()`` (or
    leaving a ``with`` block, or the interpreter's exit) stops the workers; no shared
    segment outlives a call, even if the parent is killed.

    Parameters
    ----------
    workers : number of worker processes, default ``os.cpu_count()``
    deadline : seconds from the round's start by which a chunk must be back; the workers
        still busy then are stopped and their chunks lost (see :class:`Lost`)

    Examples
    --------
    >>> from fedkern import datasets, sim
    >>> data = datasets.fedprox_synthetic(1.0, 1.0, n_clients=8, seed=0)
    >>> model = sim.LogisticRegression(data.train.n_features, data.train.n_classes)
    >>> serial = sim.Simulation(data, model, clients_per_round=4, seed=0)
    >>> with sim.ProcessExecutor(workers=2) as executor:
    ...     run = sim.Simulation(data, model, clients_per_round=4, seed=0, executor=executor)
    ...     _ = run.run(rounds=2)
    >>> _ = serial.run(rounds=2)
    >>> bool((run.params == serial.params).all()), run.history[-1]["train_loss"] == serial.history[-1]["train_loss"]
    (True, True)
    """

    name = "processes"
    #: plan arrays of at least this many bytes go through shared memory (see :data:`SHARE_BYTES`)
    share_bytes = SHARE_BYTES

    def __init__(self, workers: int | None = None, *, deadline: float | None = None):
        self.workers = check.count(os.cpu_count() or 1 if workers is None else workers, "workers", low=1)
        self.deadline = _deadline(deadline)
        self._pool: _Pool | None = None
        self._closed = False
        self._started = False
        self._trainer: Trainer | None = None      # shipped again to fresh workers
        self._stop: weakref.finalize | None = None
        self._slot_bytes = 0          # the arena's room per result, learnt from the last round
        #: times a fresh set of workers replaced one that lost a worker, over the executor's life
        self.restarts = 0

    def start(self, trainer: Trainer) -> None:
        """Ship ``trainer`` to the workers (starting them the first time); it replaces the
        trainer they had."""
        if self._closed:
            raise check.FedkernValueError("this ProcessExecutor was closed")
        # packed before any process starts: a trainer that does not pickle costs nothing
        packer = _pack(trainer, f"the trainer ({type(trainer).__name__})", lambda array: not array.flags.writeable,
                       special={id(self): _SELF})
        self._started, self._slot_bytes = False, 0
        try:
            if self._pool is None:
                self._pool = _Pool(self.workers)
                self._stop = weakref.finalize(self, self._pool.shutdown)
            segment = self._pool.share(packer.size, lambda name: ("trainer", name, packer.payload),
                                       lambda buffer: _fill(packer, buffer))
            if segment is not None:
                segment.close()          # the workers map it; the parent keeps its own arrays
        except BaseException:
            self.close()
            raise
        self._started, self._trainer = True, trainer

    def _restart(self) -> None:
        """Stop the workers at once (a busy one is terminated) and start fresh ones with the trainer."""
        self._stop.detach()
        self._pool.shutdown(patience=0.0)
        self._pool = None
        self.restarts += 1
        self.start(self._trainer)

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        """Train every item on the workers; an iterator over the results in the items' order
        (they are all done, or lost, when it is returned)."""
        if self._closed:
            raise check.FedkernValueError("this ProcessExecutor was closed")
        if not self._started:
            raise check.FedkernValueError("ProcessExecutor.run before start(trainer)")
        items = list(items)
        if not items:
            return iter([])
        clock = _Clock(self.deadline)
        if not all(process.is_alive() for process in self._pool.processes):
            self._restart()              # one died between rounds
        outputs = [plan[key] for key in OUTPUTS if isinstance(plan.get(key), np.ndarray)]
        limit = self.share_bytes
        packer = _pack((backends.get_backend(), limit, plan), "the round's plan",
                       lambda array: not array.flags.writeable or array.nbytes >= limit, outputs)
        results, failure, gone = self._pass(packer, items, longest_first(plan, items), clock, retry=False)
        undone = [i for i, result in enumerate(results) if result is _UNDONE]
        if gone:
            self._restart()
            if undone and failure is None and not clock.passed():     # a worker died: once more
                again, failure, gone = self._pass(packer, items, undone, clock, retry=True)
                for i in undone:
                    results[i] = again[i]
                if gone:
                    self._restart()
        if failure is not None:
            raise _remote(failure, "a chunk failed")
        reason = "deadline" if clock.passed() else "worker"
        return iter(Lost(reason) if result is _UNDONE else result for result in results)

    def _pass(self, packer: _Packer, items: list[range], order: list[int], clock: _Clock,
              retry: bool) -> tuple[list, tuple | None, list[int]]:
        """One pass of the workers over the items ``order`` names (see :meth:`_Pool.train`);
        the outputs are copied back into the caller's arrays (on a retry they go out too,
        holding what the first pass wrote)."""
        pool = self._pool
        # after the plan, one slot per item for its result's large arrays (a float64 partial
        # sum each: one write in the worker and one copy here, instead of pickling it
        # through a pipe), as large as the last round's results needed; none if they would
        # take more than half the free shared memory (then they come through the pipes)
        slots, slot_bytes = _aligned(packer.size), self._slot_bytes
        free = _shm_free()
        if free is not None and slots + len(items) * slot_bytes > free // 2:
            slot_bytes = 0
        try:
            pool.ensure_arena(slots + len(items) * slot_bytes)
            buffer = pool.arena.buf if pool.arena is not None else None
            if buffer is not None:
                _fill(packer, buffer)
            for offset, array, output in packer.arrays:
                if output and retry:
                    _view(buffer, offset, array.dtype, array.shape)[...] = array
            results, failure, needed, gone = pool.train(packer.payload, items, order, slots, slot_bytes, clock)
            self._slot_bytes = _aligned(needed)
            for offset, array, output in packer.arrays:
                if output:
                    array[...] = _view(buffer, offset, array.dtype, array.shape)
            del buffer
        except BaseException:
            # the parent was interrupted with chunks in flight: the workers are in an
            # unknown state, so none is kept
            self.close()
            raise
        return results, failure, gone

    def close(self) -> None:
        """Stop the workers (the executor may not be used afterwards)."""
        self._closed, self._started, self._trainer = True, False, None
        if self._stop is not None:
            self._stop()
        self._pool = None

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers}, deadline={self.deadline})"


# --------------------------------------------------------------------------- Ray
def _import_ray():
    """Ray, imported on first use (``pip install "fedkern[ray]"``)."""
    try:
        import ray
    except ImportError as err:
        raise ImportError('RayExecutor needs Ray: pip install "fedkern[ray]"') from err
    return ray


def _ray_packed(obj: Any) -> bytes:
    """``obj`` pickled as Ray pickles a call's arguments (cloudpickle: a class defined in
    ``__main__`` travels by value), as one bytes object for Ray to pass on."""
    return _import_ray().cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cannot_load(w: int, err: Exception) -> WorkerError:
    """Actor ``w`` failed to unpickle the trainer (Ray's ``err`` holds the cause): a new
    actor would fail alike, so the run stops rather than losing every round's clients."""
    return WorkerError(f"RayExecutor: actor {w} could not take the trainer: {err}")


def _no_executor() -> None:
    """What an executor becomes when the trainer holding it is sent to a worker: nothing
    (a worker calls ``train_chunk`` itself)."""
    return None


class _RayWorker:
    """The body of one Ray actor: it holds the trainer for the whole run."""

    def __init__(self, trainer: Trainer):
        # one kernel thread per actor, as in a process worker: the actors share the cores
        backends.set_num_threads(1)
        self.trainer = trainer

    def load(self, trainer: Trainer) -> None:
        """Hold another trainer (a new run on the same actors)."""
        self.trainer = trainer

    def train(self, call: bytes, shared_plan: dict | None = None) -> bytes | tuple[bytes, ...]:
        """Train a share of the round. ``call`` pickles (plan, items, row_shape, backend,
        groups); its plan is None when the plan is large and comes as ``shared_plan``, from
        the object store. Train ``items`` in turn; return their results and, when the round
        keeps every update (``row_shape``), each item's rows: as one pickled (results, rows)
        pair per group of ``groups[g]`` consecutive items, each group a return value of its
        own."""
        # One argument of bytes, and bytes back: Ray serialises each argument and numpy
        # array of a call on its own, which cost 0.2 ms a call (a fifth of the round at 8 actors).
        plan, items, row_shape, backend, groups = pickle.loads(call)
        plan = shared_plan if plan is None else plan
        if row_shape is not None:
            # the parent's update matrix does not travel: the rows are written here and sent back
            plan = {**plan, "rows": np.empty(row_shape, np.float32)}
        with backends.use_backend(backend):
            results = [self.trainer.train_chunk(item, plan) for item in items]
        rows = [None] * len(items) if row_shape is None else [plan["rows"][item.start:item.stop] for item in items]
        bounds = np.cumsum([0, *groups]).tolist()
        pairs = tuple(_ray_packed((results[a:b], rows[a:b])) for a, b in zip(bounds, bounds[1:]))
        return pairs if len(pairs) > 1 else pairs[0]

    def where(self) -> tuple[int, str]:
        """(process id, Ray node id) of this actor."""
        return os.getpid(), _import_ray().get_runtime_context().get_node_id()


#: Seconds RayExecutor.start waits for CPUs to free up (actors killed just before free
#: theirs a moment later) before it refuses to start.
RAY_CPU_WAIT = 10.0


def _free_cpus(ray, need: float) -> float:
    """The cluster's free CPUs, once at least ``need`` or after :data:`RAY_CPU_WAIT` seconds."""
    deadline = time.monotonic() + RAY_CPU_WAIT
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= need or time.monotonic() > deadline:
            return free
        time.sleep(0.1)


#: Ray's ``max_direct_call_object_size`` default: arguments and return values up to this
#: many bytes travel inside the call's messages, larger ones through the object store, a
#: round trip more (3-4 ms on a 2-core VM). A cluster configured otherwise loses no
#: correctness, only this saving.
RAY_INLINE_BYTES = 100 * 1024


def _array_bytes(value) -> int:
    """Bytes of the numpy arrays in ``value``, a dict's values (one level down) included."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_array_bytes(v) if isinstance(v, np.ndarray) else 0 for v in value.values())
    return 0


def _groups(sizes: Sequence[int], limit: int) -> list[int]:
    """Runs of consecutive items whose ``sizes`` add up to at most ``limit`` (an item
    larger than that alone): the lengths of the runs."""
    groups, room = [], 0
    for size in sizes:
        if groups and size <= room:
            groups[-1] += 1
            room -= size
        else:
            groups.append(1)
            room = limit - size
    return groups


def _lpt(plan: dict, items: Sequence[range], workers: int) -> list[list[int]]:
    """Items shared out to ``workers``: the longest first, each to the least loaded worker
    (LPT), each worker's items in that order."""
    work = _work(plan, items)
    loads, shares = [0.0] * workers, [[] for _ in range(workers)]
    for i in longest_first(plan, items):
        w = min(range(workers), key=lambda v: (loads[v], len(shares[v])))
        shares[w].append(i)
        loads[w] += work[i]
    return shares


class RayExecutor(_Closing):
    """Train chunks on long-lived Ray actors, on this machine or an existing cluster.

    :meth:`start` puts the trainer (model, data, settings) into Ray's object store once;
    each of ``workers`` actors gets it there (numpy arrays zero-copy and read-only on the
    same node) and keeps it for the run (a later :meth:`start`, for another run, reuses the
    actors). Each round the plan is put once (or, when its arrays take less than 80% of
    :data:`RAY_INLINE_BYTES`, pickled into each call with the actor's share, which saves the
    object store's round trip), the chunks are shared out longest-first (LPT by examples x
    epochs), and every actor trains its share in one call, returning its chunks' results
    (float64 partial sums, or their rows when a robust rule needs every update) in as many
    return values as keep each under that size, so that they too travel inside the reply.
    The round combines them in chunk order, so the bits are those of the serial executor. An
    actor that dies during a round is replaced and its chunks are retried once on the new
    actor; if that one dies too, the chunks are yielded as :class:`Lost` (their clients
    count as dropouts) and the actor is replaced again for the next round. With a
    ``deadline`` each chunk is a call of its own (the chunks back in time count, not the
    actor's whole share); the actors still busy when it passes are killed and replaced, and
    their chunks lost.

    Parameters
    ----------
    workers : number of actors, default the cluster's CPUs (``ray.cluster_resources()``)
    address : a running cluster's address (``"auto"``, ``"ray://host:10001"``); None starts
        a local Ray when none is initialised. A Ray this executor started is shut down by
        :meth:`close`; one it attached to is left running.
    num_cpus : CPUs each actor reserves (the actors are spread over the nodes)
    deadline : seconds from the round's start by which a chunk must be back (see :class:`Lost`)
    """

    name = "ray"

    def __init__(self, workers: int | None = None, *, address: str | None = None, num_cpus: float = 1.0,
                 deadline: float | None = None):
        self.address = address
        self.deadline = _deadline(deadline)
        self.num_cpus = check.real(num_cpus, "num_cpus", low=0.0, low_inclusive=False)
        self.workers = None if workers is None else check.count(workers, "workers", low=1)
        self._ray = _import_ray()
        self._owns_ray = False
        self._actors: list = []
        self._starting: list = []     # calls that return once new actors are up
        self._trainer = None
        self._remote = None
        #: actors replaced after dying or missing a deadline, over the executor's life
        self.replaced = 0

    def start(self, trainer: Trainer) -> None:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            self._owns_ray = self.address is None
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1) // self.num_cpus))
        self._trainer = ray.put(trainer)
        if self._actors:             # a new run on the same executor: the actors stay, the trainer changes
            for w, call in enumerate([actor.load.remote(self._trainer) for actor in self._actors]):
                try:
                    ray.get(call)
                except ray.exceptions.RayActorError:
                    self._replace(w)       # one that died with an earlier round's failure
                except ray.exceptions.RayError as err:
                    raise _cannot_load(w, err) from None
            return
        need = self.workers * self.num_cpus
        free = _free_cpus(ray, need)
        if need > free:
            # Ray would wait for the CPUs forever
            raise check.FedkernValueError(f"RayExecutor: {self.workers} actors of {self.num_cpus:g} CPU need "
                                          f"{self.workers * self.num_cpus:g} CPUs; the cluster has {free:g} free")
        # SPREAD: one actor per node while nodes last, each with a node's memory bandwidth
        self._remote = ray.remote(num_cpus=self.num_cpus, max_restarts=0, scheduling_strategy="SPREAD")(_RayWorker)
        self._actors = [self._remote.remote(self._trainer) for _ in range(self.workers)]
        self._starting = [actor.where.remote() for actor in self._actors]

    def __reduce__(self):
        return _no_executor, ()

    def run(self, plan: dict, items: Sequence[range]) -> Iterator[Any]:
        if self._trainer is None:
            raise check.FedkernValueError("RayExecutor.run before start(trainer), or after close()")
        ray = self._ray
        if self._starting:       # new actors: a deadline counts from when they can train
            ray.wait(self._starting, num_returns=len(self._starting))
            self._starting = []
        clock = _Clock(self.deadline)
        rows = plan.get("rows")
        shape = None if rows is None else rows.shape
        shipped = {**plan, "rows": None} if rows is not None else plan
        small = 0.8 * RAY_INLINE_BYTES
        shared = None
        if sum(_array_bytes(value) for value in shipped.values()) > small:
            shipped, shared = None, ray.put(shipped)     # once, read by every actor; a small plan goes with each call
        backend = backends.get_backend()
        # a chunk sends back about one float64 partial sum of the parameters, or its rows
        params = plan.get("params")
        result_bytes = 0 if params is None else 2 * params.nbytes
        row_bytes = 0 if shape is None else shape[1] * 4
        calls: dict = {}          # call -> (actor's place, the actor, item indices, first try)

        def call(w: int, share: list[int], first: bool) -> None:
            # the results come back in return values small enough to travel inside the reply
            groups = _groups([result_bytes + len(items[i]) * row_bytes for i in share], int(small))
            actor = self._actors[w]
            method = actor.train if len(groups) == 1 else actor.train.options(num_returns=len(groups))
            payload = _ray_packed((shipped, [items[i] for i in share], shape, backend, groups))
            refs = method.remote(payload) if shared is None else method.remote(payload, shared)
            calls[tuple(refs) if len(groups) > 1 else (refs,)] = w, actor, share, first

        for w, share in enumerate(_lpt(plan, items, self.workers)):
            for part in ([[i] for i in share] if self.deadline is not None else [share] if share else []):
                call(w, part, True)
        results: list = [Lost("deadline")] * len(items)
        while calls:
            pending = [ref for refs in calls for ref in refs]
            done = set(ray.wait(pending, num_returns=len(pending), timeout=clock.left())[0])
            finished = [refs for refs in calls if all(ref in done for ref in refs)]
            if not finished:             # the deadline passed: the busy actors are stopped
                for w in sorted({w for w, _, _, _ in calls.values()}):
                    ray.kill(self._actors[w])
                    self._replace(w)
                break
            for refs in finished:
                w, actor, share, first = calls.pop(refs)
                try:
                    pairs = [pickle.loads(pair) for pair in ray.get(list(refs))]
                except ray.exceptions.RayActorError as err:
                    if err.actor_init_failed:
                        raise _cannot_load(w, err) from None
                    if self._actors[w] is actor:       # the first of its failed calls: a new actor
                        self._replace(w)
                    if first and not clock.passed():
                        call(w, share, False)
                    else:
                        for i in share:
                            results[i] = Lost("worker")
                    continue
                answers = [answer for group, _ in pairs for answer in group]
                parts = [part for _, group in pairs for part in group]
                for i, answer, part in zip(share, answers, parts):
                    results[i] = answer
                    if part is not None:
                        rows[items[i].start:items[i].stop] = part
        return iter(results)

    def _replace(self, w: int) -> None:
        self._actors[w] = self._remote.remote(self._trainer)
        self._starting.append(self._actors[w].where.remote())
        self.replaced += 1

    def close(self) -> None:
        if self._trainer is None:
            return
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._starting, self._trainer = [], [], None
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def __repr__(self) -> str:
        return f"RayExecutor(workers={self.workers}, address={self.address!r}, deadline={self.deadline})"


#: Executors by config name.
EXECUTORS: dict[str, type] = {"serial": SerialExecutor, "threads": ThreadExecutor, "processes": ProcessExecutor,
                              "ray": RayExecutor}
