"""Build ext/*.pyx into fedkern._cython.*, with OpenMP when the compiler supports it.

Without OpenMP the same sources build serial kernels: Cython's ``prange`` turns into an
ordinary loop, and ``fedkern info`` reports ``openmp: off``.
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


def openmp_flags() -> list[str]:
    """Return the OpenMP flags if a tiny OpenMP program compiles and links, else []."""
    if os.environ.get("FEDKERN_NO_OPENMP"):
        return []
    flag = "/openmp" if sys.platform == "win32" else "-fopenmp"
    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "check_openmp.c")
        source.write_text(
            "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
        )
        try:
            objects = compiler.compile([str(source)], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objects, str(Path(tmp, "check_openmp")), extra_postargs=[flag])
        except (CompileError, LinkError):
            print("fedkern: OpenMP not available, building serial kernels", file=sys.stderr)
            return []
    return [flag]


omp = openmp_flags()
# -fno-math-errno lets sqrt vectorise; it changes no result (kernels never take sqrt of a negative).
optimise = ["/O2"] if sys.platform == "win32" else ["-O3", "-fno-math-errno"]
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
