"""Every importable backend module of a family has exactly the kernels of the family's
contract (``fedkern._contracts``), with the same arguments."""
import importlib
import inspect
import pkgutil

import pytest

from fedkern import _contracts, backends
from conftest import ALL_BACKENDS


def own_functions(module) -> set[str]:
    """The public callables a kernel module defines itself (not what it imports)."""
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and callable(value) and not inspect.isclass(value)
            and getattr(value, "__module__", None) == module.__name__}


def arguments(function) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("family", sorted(_contracts.CONTRACTS))
def test_backend_modules_have_exactly_the_contracts_kernels(family, any_backend):
    module = backends._load(any_backend, family)
    assert own_functions(module) == set(_contracts.kernel_names(family))
    contract = _contracts.CONTRACTS[family]
    for name in _contracts.kernel_names(family):
        assert arguments(getattr(module, name)) == arguments(getattr(contract, name)), f"{any_backend}.{family}.{name}"


def test_every_family_of_every_backend_is_under_contract():
    for name in ALL_BACKENDS:
        package = importlib.import_module(backends._PACKAGES[name])
        path = package.__path__[0]
        families = {info.name for info in pkgutil.iter_modules([path]) if not info.name.startswith("_")}
        assert families <= set(_contracts.CONTRACTS), f"{name}: {families - set(_contracts.CONTRACTS)} have no contract"
