"""The Numba backend: ``njit(parallel=True, cache=True, nogil=True)`` kernels."""
