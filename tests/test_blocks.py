"""Block sizes come from one source, fedkern._blocks: the Cython build was compiled with its
values, and neither compiled backend sets a size of its own. Also the integer ring kernel
(``ring_sum``, in both compiled ``_runtime`` modules) against numpy's wrap-around."""
import ast
import importlib
import re
from pathlib import Path

import numpy as np
import pytest

import fedkern
from fedkern import _blocks, backends

ROOT = Path(__file__).resolve().parent.parent
NUMBA_SOURCES = sorted((ROOT / "src" / "fedkern" / "_numba").glob("*.py"))
CYTHON_SOURCES = sorted((ROOT / "ext").glob("*.pyx"))
BLOCKS = {name: value for name, value in vars(_blocks).items() if name.isupper()}
#: Integer constants of the kernel modules that are not sizes: the values of optim's
#: ``rule`` argument, part of the kernels' interface.
NOT_SIZES = {"ADAGRAD", "ADAM", "YOGI"}
COMPILED = [name for name in ("cython", "numba") if backends.is_available(name, "_runtime")]


def runtime(backend: str):
    return importlib.import_module(f"fedkern._{backend}._runtime")


# ---------------------------------------------------------------------------------------
# One source of sizes
# ---------------------------------------------------------------------------------------

def test_blocks_py_holds_only_named_integers():
    """setup.py turns every assignment of _blocks.py into a C enum: ints that fit one."""
    assert BLOCKS
    for name, value in BLOCKS.items():
        assert type(value) is int and 0 < value < 2**31, name
    tree = ast.parse((ROOT / "src" / "fedkern" / "_blocks.py").read_text())
    assigned = [node.targets[0].id for node in tree.body if isinstance(node, ast.Assign)]
    assert sorted(assigned) == sorted(BLOCKS)  # nothing setup.py would miss or choke on


@pytest.mark.skipif(not backends.is_available("cython", "_runtime"), reason="Cython backend not built")
def test_cython_build_has_the_values_of_blocks_py():
    """ext/_blocks.pxd is generated from _blocks.py at build time; a stale build fails here."""
    assert runtime("cython").BLOCKS == BLOCKS


def _integer_literal(node) -> bool:
    """Whether an expression is made of integer literals alone (2048, 8 << 20, (16, 32))."""
    if isinstance(node, ast.Constant):
        return type(node.value) is int
    if isinstance(node, ast.BinOp):
        return _integer_literal(node.left) and _integer_literal(node.right)
    if isinstance(node, ast.UnaryOp):
        return _integer_literal(node.operand)
    if isinstance(node, ast.Tuple):
        return all(_integer_literal(item) for item in node.elts)
    return False


@pytest.mark.parametrize("source", NUMBA_SOURCES, ids=lambda path: path.stem)
def test_numba_modules_set_no_size_of_their_own(source):
    """Sizes in a Numba module are imported from fedkern._blocks: no module-level integer
    constants (bar NOT_SIZES), and every _blocks name it uses is the imported one."""
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            if _integer_literal(node.value) and not set(names) <= NOT_SIZES:
                pytest.fail(f"{source.name}:{node.lineno} sets {', '.join(names)} itself: put it in fedkern/_blocks.py")
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                and node.module == "_blocks" and node.level == 2 for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in BLOCKS}
    assert used <= imported, f"{source.name} uses {sorted(used - imported)} without importing them from _blocks"
    module = importlib.import_module(f"fedkern._numba.{source.stem}") if backends.is_available("numba") else None
    for name in imported if module is not None else ():
        assert getattr(module, name) is getattr(_blocks, name)


@pytest.mark.parametrize("source", CYTHON_SOURCES, ids=lambda path: path.stem)
def test_cython_modules_cimport_their_sizes_from_blocks(source):
    """A .pyx uses a _blocks name only through ``from _blocks cimport``, and declares no
    enum of sizes of its own (an enum holds NOT_SIZES only)."""
    text = source.read_text()
    cimported = set()
    for match in re.finditer(r"from _blocks cimport (\([^)]*\)|[^\n]*)", text):
        cimported |= set(re.findall(r"\b[A-Z][A-Z0-9_]*\b", re.sub(r"#[^\n]*", "", match.group(1))))
    code = re.sub(r"#[^\n]*", "", text)
    used = {name for name in BLOCKS if re.search(rf"\b{name}\b", code)}
    assert used <= cimported, f"{source.name} uses {sorted(used - cimported)} without cimporting them"
    for enum in re.finditer(r"cdef enum:\n((?:    .*\n)+)", text):
        members = set(re.findall(r"^\s+(\w+)\s*=", enum.group(1), re.M))
        assert members <= NOT_SIZES, f"{source.name} sets {sorted(members - NOT_SIZES)} itself: put it in fedkern/_blocks.py"


# ---------------------------------------------------------------------------------------
# ring_sum: integer rings with wrap-around (the secure-aggregation building block)
# ---------------------------------------------------------------------------------------

RING_DTYPES = [np.uint32, np.uint64]
CHUNK = _blocks.CHUNK


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", RING_DTYPES, ids=["uint32", "uint64"])
@pytest.mark.parametrize("k, d", [(1, 1), (1, 5), (2, 3), (5, CHUNK - 1), (3, CHUNK), (4, CHUNK + 1),
                                  (7, 3 * CHUNK + 5), (40, 33)])
def test_ring_sum_wraps_around_as_numpy(backend, dtype, k, d):
    rng = np.random.default_rng(k * 100_003 + d)
    rows = rng.integers(0, np.iinfo(dtype).max, size=(k, d), dtype=dtype, endpoint=True)
    rows[:, :3] = np.iinfo(dtype).max  # sums that certainly wrap
    expected = rows.sum(axis=0, dtype=dtype)  # numpy's unsigned sums wrap around
    out = np.full(d, 12345, dtype)
    before = rows.copy()
    runtime(backend).ring_sum(rows, out)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(rows, before)  # the input is not touched
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", RING_DTYPES, ids=["uint32", "uint64"])
def test_ring_sum_is_exact_ring_arithmetic(backend, dtype):
    """Masks that cancel in the ring cancel exactly: x + m + (2^b - m) = x (mod 2^b)."""
    bits = np.iinfo(dtype).bits
    rng = np.random.default_rng(bits)
    x = rng.integers(0, 2**bits, size=4099, dtype=dtype, endpoint=False)
    mask = rng.integers(0, 2**bits, size=4099, dtype=dtype, endpoint=False)
    rows = np.stack([x, mask, (np.zeros_like(mask) - mask)])  # the negated mask wraps as well
    out = np.empty_like(x)
    runtime(backend).ring_sum(rows, out)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("backend", COMPILED)
def test_ring_sum_accepts_read_only_rows_and_any_thread_count(backend):
    rows = np.arange(5 * (2 * CHUNK + 7), dtype=np.uint32).reshape(5, -1) * np.uint32(2**31 - 1)
    rows.flags.writeable = False
    expected = rows.sum(axis=0, dtype=np.uint32)
    for threads in (1, 2, 3):
        fedkern.set_num_threads(threads)
        backends.kernels("aggregate", backend)  # applies the thread count to the backend
        out = np.empty(rows.shape[1], np.uint32)
        runtime(backend).ring_sum(rows, out)
        np.testing.assert_array_equal(out, expected)


def test_compress_chunks_hold_whole_philox_blocks_and_bytes():
    """quantize's tasks take 4 coordinates a Philox block and scale_by_signs's 128 sign bits,
    and codes and signs must end on a byte: COMPRESS_CHUNK a multiple of 128. The
    Walsh-Hadamard blocks must be a power of two."""
    assert _blocks.COMPRESS_CHUNK % 128 == 0
    assert _blocks.FWHT_BLOCK & (_blocks.FWHT_BLOCK - 1) == 0
