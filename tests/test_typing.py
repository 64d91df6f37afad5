"""fedkern ships ``py.typed``, and every public signature is annotated, so users' type
checkers see the API."""
import inspect
from importlib import resources

import pytest

import fedkern

PUBLIC = [name for name in fedkern.__all__ if callable(getattr(fedkern, name))
          and not (inspect.isclass(getattr(fedkern, name)) and issubclass(getattr(fedkern, name), Exception))]


def test_package_ships_py_typed():
    assert resources.files("fedkern").joinpath("py.typed").is_file()


def _callables(name):
    obj = getattr(fedkern, name)
    if not inspect.isclass(obj):
        return [(name, obj)]
    return [(f"{name}.{attr}", member) for attr, member in vars(obj).items()
            if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__")]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_signature_is_annotated(name):
    for label, function in _callables(name):
        signature = inspect.signature(function)
        missing = [p.name for p in signature.parameters.values()
                   if p.name != "self" and p.annotation is inspect.Parameter.empty]
        assert not missing, f"{label}: parameters without annotation: {missing}"
        if function.__name__ != "__init__":
            assert signature.return_annotation is not inspect.Signature.empty, f"{label}: no return annotation"
