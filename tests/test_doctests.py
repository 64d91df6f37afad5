"""Every example in a fedkern docstring runs, so none can go stale.

Each docstring is a doctest run with ``np`` and ``fedkern`` in its namespace, on the
backend "auto" picks; examples print results that every backend gives.
"""
import doctest
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import fedkern


def _docstring_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    for info in pkgutil.walk_packages(fedkern.__path__, "fedkern."):
        module = __import__(info.name, fromlist=["_"])
        for test in finder.find(module, globs={"np": np, "fedkern": fedkern}):
            if test.examples:
                yield pytest.param(test, id=test.name)


EXAMPLES = list(_docstring_examples())


def test_there_are_examples():
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("test", EXAMPLES)
def test_docstring_example(test):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


README = Path(__file__).resolve().parent.parent / "README.md"
#: The README's complete examples (those that start by importing numpy); the Flower
#: snippets are fragments of a user's server code.
README_EXAMPLES = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                   if block.startswith("import numpy as np")] if README.exists() else []


@pytest.mark.skipif(not README_EXAMPLES, reason="README.md is not beside the tests")
@pytest.mark.parametrize("code", README_EXAMPLES, ids=lambda code: f"readme-{README_EXAMPLES.index(code)}")
def test_readme_example_runs(code):
    exec(compile(code, "README.md", "exec"), {})
