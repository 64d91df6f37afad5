"""Block sizes the compiled kernels choose at run time, from the CPU's cache sizes.

The sizes in :mod:`fedkern._blocks` are fixed at build time, and the ones that set a
summation order must stay fixed, or results would change from machine to machine. A size
that only sets how work is cut, with every sum in the same order whatever it is, can
follow the machine instead; this module derives those from the caches Linux reports
(``/sys/devices/system/cpu/cpu0/cache``) and falls back to the smallest cache of a current
x86-64 or Arm server core where the system does not say.
"""
from __future__ import annotations

import functools
import os

from . import backends
from ._blocks import CHUNK, CLIP_GROUP_BYTES, FWHT_BLOCK

#: The L2 assumed when the system does not report one: the smallest of current server cores.
FALLBACK_L2_BYTES = 256 << 10
#: Largest chunk of a streaming weighted sum, in coordinates (a 512 KiB float64 accumulator).
MAX_SUM_CHUNK = 65536


def cache_sizes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> dict[str, int]:
    """Bytes of each cache of CPU 0 by name ("L1d", "L1i", "L2", "L3"), from Linux's sysfs;
    empty where the system does not say."""
    sizes: dict[str, int] = {}
    try:
        entries = sorted(e for e in os.listdir(root) if e.startswith("index"))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(f"{root}/{entry}/level") as level, open(f"{root}/{entry}/type") as kind, \
                    open(f"{root}/{entry}/size") as size:
                name = f"L{level.read().strip()}" + {"Data": "d", "Instruction": "i"}.get(kind.read().strip(), "")
                text = size.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes[name] = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    return sizes


@functools.lru_cache(maxsize=None)
def l2_bytes() -> int:
    """This machine's L2 per core in bytes (read once)."""
    return cache_sizes().get("L2", FALLBACK_L2_BYTES)


@functools.lru_cache(maxsize=None)
def group_bytes() -> int:
    """Bytes of rows a two-pass kernel (clip_by_norm, clip_and_sum: norms, then a second
    read) takes at a time, so that the second read comes from the L3: a quarter of it (it
    is shared with the other cores and, on a VM, other tenants), at least CLIP_GROUP_BYTES.
    Read once."""
    return max(CLIP_GROUP_BYTES, cache_sizes().get("L3", 0) // 4)


def sum_chunk(d: int, l2: int | None = None, threads: int | None = None) -> int:
    """Coordinates per task of a streaming weighted sum (``weighted_sum``, ``clip_and_sum``).

    A power of two whose float64 accumulator fills a quarter of the L2 (16384 on Zen 3's
    512 KiB), so each row is read in long runs while the accumulator stays in L2, at most
    MAX_SUM_CHUNK, and small enough to give every thread four tasks; never below CHUNK
    (16 KiB of accumulator, which any L1 holds). Every coordinate's sum adds the rows in
    index order whatever the chunk, so results do not depend on it.

    Examples
    --------
    >>> from fedkern._tuning import sum_chunk
    >>> sum_chunk(1_000_000, l2=512 << 10, threads=2)
    16384
    >>> sum_chunk(1_000_000, l2=2 << 20, threads=2)
    65536
    >>> sum_chunk(20_000, l2=2 << 20, threads=2)
    2048
    """
    l2 = l2_bytes() if l2 is None else l2
    threads = backends.get_num_threads() if threads is None else threads
    limit = min(MAX_SUM_CHUNK, l2 // 4 // 8, max(CHUNK, d // (4 * max(threads, 1))))
    chunk = CHUNK
    while 2 * chunk <= limit:
        chunk *= 2
    return chunk


#: Fewest rows of a group of clip_and_sum: a group's pass over the float64 accumulator (16 D
#: bytes read and written) must cost less than the second read of its rows it saves.
MIN_CLIP_GROUP = 8


def clip_group(k: int, d: int, itemsize: int, cached_bytes: int | None = None) -> int:
    """Rows per group of ``clip_and_sum``: norms, then the weighted sum, a group at a time.

    A group of about ``cached_bytes`` (default :func:`group_bytes`) is read the second time
    from cache. When fewer than
    MIN_CLIP_GROUP rows fit (long rows), the accumulator's traffic per group (16 D bytes)
    would outweigh that saving, so all K rows form one group: every norm first, then one
    sum over all rows (measured on Zen 3 at K = 100 x D = 1e6, float32: groups of 2 rows
    ran at 31% of the read bandwidth). The order of every sum is the same either way.

    Examples
    --------
    >>> from fedkern._tuning import clip_group
    >>> clip_group(100, 100_000, 4, cached_bytes=8 << 20), clip_group(100, 1_000_000, 4, cached_bytes=8 << 20)
    (20, 100)
    """
    group = max(1, (group_bytes() if cached_bytes is None else cached_bytes) // (d * itemsize))
    return group if group >= MIN_CLIP_GROUP else k


def fwht_panel(n: int, l2: int | None = None, threads: int | None = None) -> int:
    """Columns per task of the Walsh-Hadamard transform's wide stages (length ``n``).

    The vector is seen as rows of FWHT_BLOCK; its stages h >= FWHT_BLOCK pair whole rows.
    A task copies ``panel`` columns of every row into a scratch of rows x panel float64,
    runs all those stages there and copies them back: two passes over memory instead of one
    per stage. A power of two whose scratch fills at most a quarter of the L2, at least 16 (two
    cache lines a row: with one, the copy waits on every line; on Zen 4 at n = 2^24 a panel
    of 16 ran 1.4x faster than one of 8), at most the block, and small enough to give every
    thread four tasks. Every coordinate goes through the same operations in the same order
    whatever it is.

    Examples
    --------
    >>> from fedkern._tuning import fwht_panel
    >>> fwht_panel(1 << 20, l2=1 << 20, threads=2), fwht_panel(1 << 24, l2=1 << 20, threads=2)
    (128, 16)
    """
    l2 = l2_bytes() if l2 is None else l2
    threads = backends.get_num_threads() if threads is None else threads
    rows = max(1, n // FWHT_BLOCK)
    limit = min(FWHT_BLOCK // (4 * max(threads, 1)), l2 // 4 // (8 * rows))
    panel = 16
    while 2 * panel <= limit:
        panel *= 2
    return panel
