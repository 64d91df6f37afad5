"""Layout (a model's layers <-> one flat vector) and UpdateMatrix (a preallocated K x D)."""
import numpy as np
import pytest

import fedkern

# --------------------------------------------------------------------------- Layout
LAYERS = [((3, 4), np.float32), ((5,), np.float32), ((), np.float32), ((2, 1, 3), np.float32), ((0, 2), np.float32)]


def make_layers(spec, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * 10).astype(dtype) for shape, dtype in spec]


def test_layout_round_trip():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    assert (len(layout), layout.size, layout.dtype) == (5, 12 + 5 + 1 + 6, np.float32)
    flat = layout.flatten(layers)
    assert flat.shape == (layout.size,) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, np.concatenate([a.ravel() for a in layers]))
    views = layout.unflatten(flat)
    for view, layer in zip(views, layers):
        assert view.shape == layer.shape and view.dtype == flat.dtype
        np.testing.assert_array_equal(view, layer)


def test_unflatten_returns_views():
    layout = fedkern.Layout(make_layers(LAYERS))
    flat = np.zeros(layout.size, np.float32)
    views = layout.unflatten(flat)
    assert all(np.shares_memory(view, flat) for view in views if view.size)
    views[1][2] = 7.0
    views[2][...] = 9.0  # the 0-d layer
    views[3][1, 0, 2] = 5.0
    assert flat[12 + 2] == 7.0 and flat[12 + 5] == 9.0 and flat[12 + 5 + 1 + 5] == 5.0
    flat[0] = 3.0
    assert views[0][0, 0] == 3.0


def test_flatten_into_out():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    out = np.full(layout.size, np.nan, np.float64)
    assert layout.flatten(layers, out=out) is out
    np.testing.assert_array_equal(out, np.concatenate([a.ravel() for a in layers]))


@pytest.mark.parametrize("dtypes, expected", [
    ((np.float32, np.float64), np.float64),
    ((np.float32, np.int64), np.float32),
    ((np.int64, np.uint8), np.float32),
    ((np.float64, np.float32, np.int32), np.float64),
])
def test_layout_mixed_dtypes(dtypes, expected):
    layers = make_layers([((2, 2), dtype) for dtype in dtypes])
    layout = fedkern.Layout(layers)
    assert layout.dtype == expected
    for layer, view in zip(layers, layout.unflatten(layout.flatten(layers))):
        np.testing.assert_array_equal(view, layer.astype(expected))


def test_layout_dtype_option():
    layers = make_layers(LAYERS[:2])
    assert fedkern.Layout(layers, dtype=np.float64).flatten(layers).dtype == np.float64
    with pytest.raises(fedkern.FedkernTypeError, match="dtype"):
        fedkern.Layout(layers, dtype=np.int32)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda layout, layers: fedkern.Layout([]), fedkern.FedkernTypeError, "non-empty list"),
    (lambda layout, layers: fedkern.Layout(np.ones(3)), fedkern.FedkernTypeError, "non-empty list"),
    (lambda layout, layers: fedkern.Layout([np.ones(2, complex)]), fedkern.FedkernTypeError, r"arrays\[0\].*complex"),
    (lambda layout, layers: fedkern.Layout([np.ones(2), [1.0]]), fedkern.FedkernTypeError,
     r"arrays\[1\] must be a numpy array"),
    (lambda layout, layers: layout.flatten(layers[:-1]), fedkern.FedkernValueError, "arrays has 4 layers; the layout has 5"),
    (lambda layout, layers: layout.flatten(layers + layers[:1]), fedkern.FedkernValueError, "arrays has 6 layers"),
    (lambda layout, layers: layout.flatten([layers[0].T] + layers[1:]), fedkern.FedkernValueError,
     r"arrays\[0\] has shape \(4, 3\); the layout has \(3, 4\)"),
    (lambda layout, layers: layout.flatten(layers[:1] + [layers[1].astype(complex)] + layers[2:]),
     fedkern.FedkernTypeError, r"arrays\[1\] has dtype complex128"),
    (lambda layout, layers: layout.flatten(layers, out=np.empty(layout.size + 1)), fedkern.FedkernValueError,
     "out has shape"),
    (lambda layout, layers: layout.unflatten(np.zeros(layout.size - 1, np.float32)), fedkern.FedkernValueError,
     "flat has length 23; expected 24"),
    (lambda layout, layers: layout.unflatten(np.zeros((1, layout.size), np.float32)), fedkern.FedkernValueError,
     "flat must be 1-D"),
    (lambda layout, layers: layout.unflatten(np.zeros(2 * layout.size, np.float32)[::2]), fedkern.FedkernValueError,
     "flat is not C-contiguous"),
], ids=["empty", "array-not-list", "complex", "list-layer", "fewer-layers", "more-layers", "wrong-shape",
        "complex-in-flatten", "out-length", "flat-length", "flat-2-D", "flat-strided"])
def test_layout_errors(make, exc, pattern):
    layers = make_layers(LAYERS)
    with pytest.raises(exc, match=pattern):
        make(fedkern.Layout(layers), layers)


# --------------------------------------------------------------------------- UpdateMatrix
def test_update_matrix_rows_are_writable_views():
    matrix = fedkern.UpdateMatrix(3, 4)
    assert matrix.shape == (3, 4) and matrix.dtype == np.float32 and len(matrix) == 3
    assert matrix.array.flags.c_contiguous
    np.testing.assert_array_equal(matrix.weights, [1, 1, 1])
    matrix[1][:] = 5.0
    matrix[-1][2] = 7.0
    np.testing.assert_array_equal(matrix.array, [[0, 0, 0, 0], [5, 5, 5, 5], [0, 0, 7, 0]])


def test_update_matrix_set_copies_and_records_the_weight():
    matrix = fedkern.UpdateMatrix(2, 3, dtype=np.float64)
    update = np.array([1, 2, 3], np.int64)
    matrix.set(1, update, weight=30)
    update[0] = 100
    np.testing.assert_array_equal(matrix.array, [[0, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(matrix.weights, [1, 30])


def test_update_matrix_iterates_over_its_rows():
    """It has __len__ and __getitem__, so ``for row in matrix`` must stop after K rows."""
    matrix = fedkern.UpdateMatrix(2, 3)
    assert [row.shape for row in matrix] == [(3,), (3,)]


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda m: m[3], fedkern.FedkernValueError, "client index 3 is out of range for 3 clients"),
    (lambda m: m[-4], fedkern.FedkernValueError, "client index -4 is out of range"),
    (lambda m: m.set(3, np.ones(4)), fedkern.FedkernValueError, "client index 3"),
    (lambda m: m.set(True, np.ones(4)), fedkern.FedkernValueError, "client index True"),
    (lambda m: m.set(0, np.ones(5)), fedkern.FedkernValueError, r"update has shape \(5,\); expected \(4,\)"),
    (lambda m: m.set(0, np.ones((1, 4))), fedkern.FedkernValueError, r"update has shape \(1, 4\)"),
    (lambda m: m.set(0, np.ones(4, complex)), fedkern.FedkernTypeError, "update has dtype complex128"),
    (lambda m: m.set(0, np.ones(4), weight=-1), fedkern.FedkernValueError, "weight must be >= 0"),
    (lambda m: m.set(0, np.ones(4), weight=np.nan), fedkern.FedkernValueError, "weight must be finite"),
    (lambda m: fedkern.UpdateMatrix(0, 4), fedkern.FedkernValueError, "k must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, -1), fedkern.FedkernValueError, "d must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, 2.0), fedkern.FedkernValueError, "d must be a positive integer"),
    (lambda m: fedkern.UpdateMatrix(2, 2, dtype=np.int32), fedkern.FedkernTypeError, "dtype"),
])
def test_update_matrix_errors(call, exc, pattern):
    matrix = fedkern.UpdateMatrix(3, 4)
    before = matrix.array.copy(), matrix.weights.copy()
    with pytest.raises(exc, match=pattern):
        call(matrix)
    np.testing.assert_array_equal(matrix.array, before[0])
    np.testing.assert_array_equal(matrix.weights, before[1])


def test_weighted_mean_uses_the_matrix_weights(any_backend, dtype):
    matrix = fedkern.UpdateMatrix(3, 5, dtype=dtype)
    rng = np.random.default_rng(1)
    for i, weight in enumerate([10, 0, 30]):
        matrix.set(i, rng.standard_normal(5), weight=weight)
    mean = fedkern.weighted_mean(matrix, backend=any_backend)
    assert mean.dtype == dtype
    np.testing.assert_array_equal(mean, fedkern.weighted_mean(matrix.array, matrix.weights, backend=any_backend))
    np.testing.assert_allclose(mean, (matrix.array[0] * 10 + matrix.array[2] * 30) / 40, rtol=1e-6)
    np.testing.assert_array_equal(fedkern.weighted_mean(matrix, [1, 1, 1], backend=any_backend),
                                  fedkern.weighted_mean(matrix.array, backend=any_backend))
    matrix.weights[1] = -1
    with pytest.raises(fedkern.FedkernValueError, match=r"weights\[1\]"):
        fedkern.weighted_mean(matrix, backend=any_backend)


def test_layout_empty_updates():
    layers = make_layers(LAYERS)
    layout = fedkern.Layout(layers)
    matrix = layout.empty_updates(4)
    assert isinstance(matrix, fedkern.UpdateMatrix) and matrix.shape == (4, layout.size)
    assert matrix.dtype == layout.dtype
    for i in range(4):
        layout.flatten(layers, out=matrix[i])
    for view, layer in zip(layout.unflatten(fedkern.weighted_mean(matrix)), layers):
        np.testing.assert_allclose(view, layer, rtol=1e-6)
