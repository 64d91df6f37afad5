"""Block, chunk and lane sizes of the compiled kernels: the one place they are set.

The Numba kernels import them from here; ``setup.py`` writes them into ``ext/_blocks.pxd``
(a ``cdef enum``, generated at build time, not in git) for the Cython kernels to cimport,
and ``fedkern._cython._runtime.BLOCKS`` holds the values a build was compiled with
(tests/test_blocks.py compares). This file is read by ``setup.py`` without importing
fedkern: keep it to ``NAME = <integer expression>`` lines, each with the reason for its
value. Names are unique across families (the Cython enum is one namespace).

Sizes that split work over coordinates are part of the results' contract only through
determinism: every reduction runs over fixed blocks in a fixed order, so results do not
depend on the thread count; changing a size may change the last bits of a float sum.
Where the two compiled backends use different sizes, the names say which algorithm a
size belongs to and the comment says why they differ.

After changing a value: rebuild the Cython kernels, and clear Numba's on-disk cache
(``src/fedkern/_numba/__pycache__``), which checks the kernel modules' own files, not the
globals they import, so it would keep kernels compiled with the old value.
"""

# -- aggregate (both backends) ---------------------------------------------------------------
#: Coordinates per task of ring_sum: the K rows are added into one accumulator of CHUNK
#: words, which stays in L1 while every row streams through. weighted_sum and clip_and_sum
#: choose their chunk at run time from the L2 (fedkern._tuning.sum_chunk), never below this.
CHUNK = 2048
#: Coordinates per partial sum of a squared norm (l2_norms, clip_by_norm) or squared
#: distance (robust sq_distances_to): a block of a row is one long run for the prefetcher,
#: the K x D/NORM_BLOCK partials stay small, and K x blocks gives every thread work.
NORM_BLOCK = 8192
#: Interleaved float64 partial sums within a NORM_BLOCK, lane l summing coordinates l, l + 64,
#: ...: independent adds hide the add latency (four scalar sums did not), and an inner
#: loop of 64 lanes is one that Numba's LLVM vectorises (it does not with 16, which it
#: unrolls into scalar code; its SLP vectoriser is off), so both backends give the same bits.
NORM_LANES = 64
#: clip_by_norm and clip_and_sum handle rows in groups of at least this many bytes, norms
#: then the second read, so that read comes from L3 rather than memory; at run time a
#: quarter of the L3 when that is more (fedkern._tuning.group_bytes).
CLIP_GROUP_BYTES = 8 << 20

#: Cython aggregation kernels that move fewer bytes than this run on one thread: one core
#: reads them in microseconds, less than waking the OpenMP team costs, and on a loaded
#: machine a parallel region can wait a whole scheduler time slice for its last thread
#: (seen: a 7 x 610 float32 weighted sum took 0.3-2.5 ms on 2 threads, 5 us on one).
SERIAL_BYTES = 256 << 10

# -- privacy (Cython) ------------------------------------------------------------------------
#: Normal pairs per task of gaussian_noise: drawn into a stack buffer of 2 x NOISE_PAIRS
#: float64 (8 KiB, in L1) by a plain loop the C compiler vectorises, then added to the
#: vector; a task is long enough that scheduling costs nothing next to its draws.
NOISE_PAIRS = 512

# -- optim (Cython) --------------------------------------------------------------------------
#: Coordinates per prange task of a server-optimizer step; each block is a plain loop in an
#: inline function, which the C compiler vectorises (loops directly under prange carry
#: OpenMP bookkeeping that stops it). Numba vectorises its prange loop over coordinates as
#: it is, so the Numba optim kernels need no block.
OPTIM_BLOCK = 4096

# -- _runtime: read_sum, the bandwidth probe (both backends) ---------------------------------
#: Coordinates per task of read_sum (256 KiB of float32): long enough that scheduling
#: costs nothing next to the read.
READ_BLOCK = 65536
#: Independent float32 partial sums of read_sum: enough vector registers of adds that the
#: loop keeps up with memory, so it measures the read bandwidth, not the add latency.
READ_LANES = 32

# -- robust: selection (both backends) -------------------------------------------------------
#: Quickselect / introsort finish ranges this short by insertion sort.
SELECT_SMALL = 16
# (robust sq_distances_to sums its partials over NORM_BLOCK, for the same reasons.)

# -- robust: order statistics by pruned sorting networks over a per-thread tile --------------
# (Cython for every K up to NET_MAX_BYTES, Numba's trimmed_mean and median up to SORT_ALL_MAX)
#: Coordinates sorted together by one pass of a network: one compare-exchange of two wires
#: is a few min/max vector instructions (32 float32: two AVX-512 or four AVX2 registers).
NET_LANES = 32
#: Order statistics use a sorting network while a coordinate's K values fit in this many
#: bytes (K = 2048 float32, 1024 float64): beyond, the network's K log^2 K compare-exchanges
#: lose to quickselect on each coordinate's column. Numba's meamed uses the same bound
#: (its unpruned network, K padded to a power of two, then fits the same bytes).
NET_MAX_BYTES = 8192
#: Bytes of one thread's tile (K wires x tile width): it stays in L2 while the network
#: makes its passes over it (on Zen 3, whose L2 is 512 KiB, tiles of 128 KiB to 1 MiB timed
#: alike: a slab of NET_LANES coordinates, the network's working set, stays in L1).
NET_TILE_BYTES = 1 << 19
#: Most bytes of a row copied into one tile: runs of 2 KiB keep the prefetchers busy on
#: all K rows at once while the tile stays narrow enough for large K.
NET_RUN_BYTES = 2048
#: Bytes added to the tile's wire stride, so that the K wires do not all map to the same
#: L1 sets (a power-of-two stride would make them conflict).
CACHE_LINE = 64

# -- robust, Cython: exact_sq_distances and sq_distances_to ----------------------------------
#: Coordinates per block of exact_sq_distances (row-pair sums over the block): the block's K
#: rows stay in L2 while every pair reads them. Numba transposes its blocks instead (see
#: PAIR_BYTES), a different loop order with its own size.
DIST_BLOCK = 2048
#: Interleaved float64 partial sums of one squared difference (_sq_diff): two AVX2 / one
#: AVX-512 register of independent adds. The final sum in ext/robust.pyx is written out
#: for exactly 8 lanes. (Numba's pairwise distances sum in NORM_LANES lanes up to
#: PAIR_LANES_MAX_K rows and four terms at a time beyond, and its sq_distances_to in
#: NORM_LANES lanes, as its norms: other orders of the same float64 sums.)
DIST_LANES = 8

# -- robust, Numba: order statistics by sample, count and band over a gathered block ----------
#: Up to this K, trimmed_mean (and median) sort slabs by the pruned network of ext/robust.pyx;
#: beyond, a sorted sample, counting passes and small band networks find the two ranks,
#: K log K work instead of K log^2 K. Measured on Zen 3 (float32, 2 threads): the network
#: is level with the sample at K = 250 for the median and faster for trimmed_mean; at
#: K = 500 the sample wins the median (369 against 471 ms at D = 4e5).
SORT_ALL_MAX = 256
#: Bytes of one gathered block of K rows (1 MiB): it stays in L2 while the counting passes
#: stream it, a few times per rank.
GATHER_BYTES = 1 << 20
#: Most coordinates per gathered block: long runs of each row keep the prefetchers busy.
GATHER_MAX = 8192
#: A gathered block's width is a multiple of this (and at least this): whole vectors for
#: the counting passes, which run across the block's coordinates.
GATHER_STEP = 8

# -- robust, Numba: exact_sq_distances --------------------------------------------------------
#: Bytes of one transposed tile (a coordinate's K values contiguous): it stays in L2 while
#: every row's pairs read it, so each update is read from memory once.
PAIR_BYTES = 1 << 20
#: Most coordinates per tile, reached for small K (K <= 64 float32, 32 float64): caps the two
#: double-buffered tiles where PAIR_BYTES alone would allow very wide ones.
PAIR_BLOCK_MAX = 4096
#: A tile's width is a multiple of this (and at least this, for very large K): the pair
#: sums take four coordinates per step, and a tile of 64 still amortises the parallel
#: region opened per tile.
PAIR_BLOCK_STEP = 64
#: Up to this K, Numba's exact_sq_distances (and exact_sq_rows) sum each pair along the
#: block's coordinates in NORM_LANES lanes, a task per row, instead of across the pairs of a
#: transposed tile: with few rows the tile's lanes over l < i stay mostly empty. Measured on
#: an Intel Xeon with AVX-512 (float32, 2 threads), lanes against tile: 75 against 280 ms at
#: K = 10 x D = 1e7, 154 against 476 ms at K = 32 x D = 3e6, 202 against 468 ms at K = 64 x
#: D = 1e6; 469 against 551 ms at K = 100, but 1.0 against 0.79 s at K = 200 x D = 5e5.
PAIR_LANES_MAX_K = 64

# -- compress (both backends) ----------------------------------------------------------------
#: Coordinates per task of quantize and scale_by_signs (the fused accumulate's tasks are
#: fedkern._tuning.sum_chunk's): a multiple of 128, so a task holds whole Philox blocks
#: (4 words: 4 coordinates of quantize, 128 sign bits) and whole bytes of codes and signs.
COMPRESS_CHUNK = 4096
#: Coordinates per task of scatter_add: each client's sorted indices are bisected once per
#: task, so a task must be long next to K log k; its 512 KiB of accumulator stays in L2.
SCATTER_CHUNK = 65536
#: Length of the blocks the Walsh-Hadamard transform finishes its first stages in: 32 KiB
#: of float64, in L1; the wider stages then run on panels of every block's columns
#: (fedkern._tuning.fwht_panel).
FWHT_BLOCK = 4096
