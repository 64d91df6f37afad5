# OpenMP entry points that also compile without OpenMP (then everything runs serially).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fk_openmp_enabled(void) { return 1; }
    static int fk_max_threads(void) { return omp_get_max_threads(); }
    static void fk_set_threads(int n) { omp_set_num_threads(n); }
    #else
    static int fk_openmp_enabled(void) { return 0; }
    static int fk_max_threads(void) { return 1; }
    static void fk_set_threads(int n) { (void)n; }
    #endif
    """
    int fk_openmp_enabled() noexcept nogil
    int fk_max_threads() noexcept nogil
    void fk_set_threads(int n) noexcept nogil


from _blocks cimport SERIAL_BYTES  # why: src/fedkern/_blocks.py


cdef inline int fk_threads_for(Py_ssize_t nbytes) noexcept nogil:
    """OpenMP threads for a kernel that moves ``nbytes``: one below SERIAL_BYTES."""
    return 1 if nbytes < SERIAL_BYTES else fk_max_threads()
