# The fused types every kernel is compiled for: `from _fused cimport in_t, out_t, ...`.
from libc.stdint cimport uint32_t, uint64_t

# Floating point: what a kernel reads (in_t: client updates, an aggregated delta) and what
# it writes (out_t: results, optimizer parameters and state) are float32 or float64
# independently; every combination is compiled.
ctypedef fused in_t:
    float
    double

ctypedef fused out_t:
    float
    double

# A second input, independent of in_t: e.g. a float64 point against float32 rows.
ctypedef fused ref_t:
    float
    double

# Integer rings Z / 2^32 and Z / 2^64 for secure aggregation: unsigned C arithmetic wraps
# around, which is exactly the ring's addition and multiplication (never int64 + modulo).
ctypedef fused ring_t:
    uint32_t
    uint64_t
