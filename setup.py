"""Build ext/*.pyx into fedkern._cython.*, with OpenMP when the compiler supports it.

Without OpenMP the same sources build serial kernels: Cython's ``prange`` turns into an
ordinary loop, and ``fedkern info`` reports ``openmp: off``.

The kernels are compiled for the building machine's CPU (``-march=native``), as Numba
compiles its kernels: the vector instructions it allows make the sorting networks of the
robust rules about twice as fast. Set ``FEDKERN_PORTABLE=1`` to build for the compiler's
baseline instead, e.g. for a wheel meant for other machines. The instruction sets such a
build uses are recorded in ``fedkern._cython._build`` (itself built for the baseline), and
``fedkern.backends`` refuses the Cython backend on a CPU that lacks one of them, rather
than letting a kernel die of an illegal instruction.

Without a working C compiler the Cython kernels are skipped with a warning and the
package still installs: the Numba and numpy backends run every op.

Block, chunk and lane sizes are set once, in ``src/fedkern/_blocks.py``, which the Numba
kernels import; this script writes them into ``ext/_blocks.pxd`` for the Cython kernels
before cythonizing (reading the file, not importing fedkern, which may not import yet).
"""
import ast
import os
import re
import subprocess
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
    """-march=native unless FEDKERN_PORTABLE is set."""
    if os.environ.get("FEDKERN_PORTABLE") or sys.platform == "win32":
        return []
    if compiles("-march=native", "int main(void) { return 0; }\n"):
        # no contraction into FMA: it would change results, as fastmath would in Numba
        return ["-march=native", "-ffp-contract=off"]
    return []


#: Instruction sets -march=native may use in vector code, as the compiler's macros and as
#: /proc/cpuinfo names them (which is what fedkern.backends compares at import).
ISA_MACROS = {"SSE4_1": "sse4_1", "SSE4_2": "sse4_2", "AVX": "avx", "AVX2": "avx2", "FMA": "fma",
              "F16C": "f16c", "BMI": "bmi1", "BMI2": "bmi2", "AVX512F": "avx512f", "AVX512DQ": "avx512dq",
              "AVX512CD": "avx512cd", "AVX512BW": "avx512bw", "AVX512VL": "avx512vl"}


def native_isa(flags: list[str]) -> list[str]:
    """The instruction sets ``flags`` let the compiler use, from its predefined macros."""
    if not flags:
        return []
    compiler = new_compiler()
    customize_compiler(compiler)
    try:
        macros = subprocess.run([compiler.compiler_so[0], *flags, "-dM", "-E", "-"], input="",
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    defined = set(re.findall(r"#define __(\w+)__ 1", macros))
    return [name for macro, name in ISA_MACROS.items() if macro in defined]


def write_blocks_pxd() -> None:
    """Generate ext/_blocks.pxd (a ``cdef enum`` and ``blocks()``, the dict of its values)
    from src/fedkern/_blocks.py; the file is rewritten only when its text changes, so an
    unchanged source does not rebuild every extension."""
    source = HERE / "src" / "fedkern" / "_blocks.py"
    values = {}
    for node in ast.parse(source.read_text(), str(source)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            # the integer expressions of _blocks.py (e.g. 8 << 20), evaluated with no names in scope
            value = eval(compile(ast.Expression(node.value), str(source), "eval"), {"__builtins__": {}})
            if not isinstance(value, int) or not -2**31 <= value < 2**31:
                raise ValueError(f"{source}: {name} must be an int that fits a C enum; got {value!r}")
            values[name] = value
    lines = ["# Generated by setup.py from src/fedkern/_blocks.py (the one place to change them): do not edit.",
             "cdef enum:"] + [f"    {name} = {value}" for name, value in values.items()]
    lines += ["", "", "cdef inline dict blocks():", '    """The values this module was compiled with, by name."""',
              "    return {"] + [f'        "{name}": {name},' for name in values] + ["    }", ""]
    target = HERE / "ext" / "_blocks.pxd"
    text = "\n".join(lines)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


write_blocks_pxd()
omp = openmp_flags()
native = native_flags()
# -fno-math-errno lets sqrt vectorise; it changes no result (kernels never take sqrt of a negative).
# -fno-trapping-math lets the compiler evaluate both sides of a float select (if-conversion),
# so loops with them vectorise; it changes no value, only when exception flags may be raised.
optimise = ["/O2"] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-fno-trapping-math"] + native
build_info = [("FEDKERN_ISA", '"' + " ".join(native_isa(native)) + '"')] + ([("FEDKERN_NATIVE", "1")] if native else [])
extensions = [
    Extension(
        f"fedkern._cython.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        # _build says how the others were built, so it must run on any CPU
        extra_compile_args=(["-O2"] if pyx.stem == "_build" else optimise + omp),
        extra_link_args=[] if pyx.stem == "_build" else omp,
        define_macros=build_info if pyx.stem == "_build" else [],
    )
    for pyx in sorted((HERE / "ext").glob("*.pyx"))
]
compiled = cythonize(
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
for extension in compiled:  # set after cythonize, which does not carry it over
    extension.optional = True  # no compiler: a warning, and the Numba and numpy backends

setup(ext_modules=compiled)
