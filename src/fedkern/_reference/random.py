"""Reference kernels of the random family: the counter-based stream every randomised op draws from.

The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers:
as easy as 1, 2, 3", SC 2011): a keyed bijection of a 128-bit counter, so a number is a
pure function of where it sits in the stream, never of a state carried from the previous
one. Any slice of any stream can then be drawn on its own, on any thread or worker, with
the same bits as every other backend.

**The stream.** Under ``seed`` (a uint64), stream ``stream`` (a uint64) is the sequence of
uint32 words where word ``i`` is word ``i % 4`` of::

    philox4x32_10(counter=(b lo32, b hi32, stream lo32, stream hi32), key=(seed lo32, seed hi32)),  b = i // 4

and uniform ``i`` is ``uniform53(word 2i, word 2i + 1)``, that is ``floor(v / 2**11) * 2**-53``
for the 64-bit draw ``v = word(2i + 1) * 2**32 + word(2i)``. A kernel fills ``out[j]`` with
item ``start + j``; the index is not reduced mod 2**64 (the block index never overflows),
so items past 2**64 - 1 are reachable as the tail of a call that starts below it.

Arithmetic is in uint64 on 32-bit values, masked back to 32 bits where it may carry.
"""
import numpy as np

from ._philox import blocks, philox4x32_10, uniform53


def philox4x32(counter: np.ndarray, key: np.ndarray, out: np.ndarray) -> None:
    """out[:4] = Philox4x32-10(counter[:4], key[:2]): the bijection on one block."""
    out[:4] = [int(x) for x in philox4x32_10(counter[:4], key[:2])]


def random_bits(seed: int, stream: int, start: int, out: np.ndarray) -> None:
    """out[j] = word start + j of the stream: word i % 4 of block i // 4."""
    start, n = int(start), out.shape[0]
    skip = start % 4  # words of the first block before out[0]
    words = blocks(seed, stream, start // 4, (skip + n + 3) // 4).reshape(-1)
    out[:] = words[skip:skip + n]


def random_uniform(seed: int, stream: int, start: int, out: np.ndarray) -> None:
    """out[j] = uniform start + j of the stream: uniform53(word 2i, word 2i + 1), i = start + j."""
    start, n = int(start), out.shape[0]
    skip = start % 2  # uniforms of the first block before out[0]
    pairs = blocks(seed, stream, start // 2, (skip + n + 1) // 2).reshape(-1, 2)[skip:skip + n]
    out[:] = uniform53(pairs[:, 0], pairs[:, 1])
