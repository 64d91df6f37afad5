"""Build ext/*.pyx into fedkern._cython.*, with OpenMP when the compiler supports it.

Without OpenMP the same sources build serial kernels: Cython's ``prange`` turns into an
ordinary loop, and ``fedkern info`` reports ``openmp: off``.

The kernels are compiled for the building machine's CPU (``-march=native``), as Numba
compiles its kernels: the vector instructions it allows make the sorting networks of the
robust rules about twice as fast. Set ``FEDKERN_PORTABLE=1`` to build for the compiler's
baseline instead, e.g. for a wheel meant for other machines.
"""
import os
import sys
import tempfile
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.errors import CompileError, LinkError
from setuptools._distutils.sysconfig import customize_compiler

HERE = Path(__file__).parent


def compiles(flag: str, program: str) -> bool:
    """Whether a tiny C ``program`` compiles and links with ``flag``."""
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "check.c")
        source.write_text(program)
        try:
            objects = compiler.compile([str(source)], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objects, str(Path(tmp, "check")), extra_postargs=[flag])
        except (CompileError, LinkError):
            return False
    return True


def openmp_flags() -> list[str]:
    """The OpenMP flag if a tiny OpenMP program compiles and links, else []."""
    if os.environ.get("FEDKERN_NO_OPENMP"):
        return []
    flag = "/openmp" if sys.platform == "win32" else "-fopenmp"
    if compiles(flag, "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"):
        return [flag]
    print("fedkern: OpenMP not available, building serial kernels", file=sys.stderr)
    return []


def native_flags() -> list[str]:
    """-march=native (and a macro ``fedkern info`` reports) unless FEDKERN_PORTABLE is set."""
    if os.environ.get("FEDKERN_PORTABLE") or sys.platform == "win32":
        return []
    if compiles("-march=native", "int main(void) { return 0; }\n"):
        # no contraction into FMA: it would change results, as fastmath would in Numba
        return ["-march=native", "-ffp-contract=off", "-DFEDKERN_NATIVE=1"]
    return []


omp = openmp_flags()
# -fno-math-errno lets sqrt vectorise; it changes no result (kernels never take sqrt of a negative).
optimise = ["/O2"] if sys.platform == "win32" else ["-O3", "-fno-math-errno"] + native_flags()
extensions = [
    Extension(
        f"fedkern._cython.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        extra_compile_args=optimise + omp,
        extra_link_args=omp,
    )
    for pyx in sorted((HERE / "ext").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["ext"],
        compiler_directives={
            # Bounds and wraparound checks are off because _validate.py guarantees every
            # index a kernel touches is in range before any compiled code runs.
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
