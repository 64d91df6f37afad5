"""How the Cython kernels were compiled. Built for the compiler's baseline, unlike the
kernel modules, so it imports on any CPU and can tell whether the kernels would run."""

cdef extern from *:
    """
    #ifndef FEDKERN_ISA
    #define FEDKERN_ISA ""
    #endif
    #ifdef FEDKERN_NATIVE
    #define FK_NATIVE 1
    #else
    #define FK_NATIVE 0
    #endif
    """
    const char* FEDKERN_ISA
    int FK_NATIVE

#: Whether the kernels were compiled for the building CPU (-march=native).
NATIVE = bool(FK_NATIVE)
#: The x86 instruction sets that build may use, named as in /proc/cpuinfo.
ISA = tuple(FEDKERN_ISA.decode().split())
