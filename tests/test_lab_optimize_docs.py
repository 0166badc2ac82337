"""The runnable examples in the optimizer's docstrings are tests (river's habit: docs that cannot drift)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import edgewise.lab.optimize as pkg

MODULES = sorted(
    {pkg.__name__} | {m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")}
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
