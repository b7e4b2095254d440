"""numpy, executed at its first attribute access (importlib.util.LazyLoader).

`qcow2lab info`, `map` and `check` on a small image never touch numpy, yet importing it costs
~40 ms, the largest single share of the CLI's start-up (the start-up budget is 100 ms above a
bare interpreter). Modules on those paths import ``numpy`` from here, the check engine
(spec/rules) included: its numpy walk runs only when spec/rules/quick.py cannot prove a small
image clean without it. A module that is already loaded is returned as is.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module ``name``, loaded now only if something already did."""
    if name in sys.modules:
        return sys.modules[name]
    found = importlib.util.find_spec(name)
    if found is None or found.loader is None:
        raise ImportError(name)
    loader = importlib.util.LazyLoader(found.loader)
    found.loader = loader
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


numpy = lazy_module("numpy")
