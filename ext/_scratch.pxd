# Scratch memory of the kernels, shared by every family: `from _scratch cimport scratch`.
from libc.stdlib cimport malloc


cdef inline void* scratch(Py_ssize_t nbytes) except NULL:
    """``nbytes`` of uninitialised memory (at least one byte), to be released with ``free``;
    MemoryError if there is none. Called with the GIL, before the kernel's nogil region."""
    cdef void* buffer = malloc(nbytes if nbytes > 0 else 1)
    if buffer == NULL:
        raise MemoryError()
    return buffer
