"""The conformance suite: guest-visible behaviour that every engine owes QEMU 7.2.

Every test here takes the ``engine`` fixture, the imported engine package (``model`` today,
``impl`` when it exists), and reaches it only through the interface of spec/interface.py:
``engine.create``, ``engine.open``, ``engine.check`` and the ``Image`` methods (``stats()``
excepted until the model has it). Anything else a test needs comes from spec/ (``open_image``
reads any file, ``spec.entries`` decodes what it finds), from QEMU (tests/qemu.py runs
qemu-img and qemu-io) and from the file on disk. So each test runs once per engine, and both
engines answer to the same assertions and to qemu-io.

What belongs here: what ``qemu-io`` reads back and ``qemu-img map``/``info``/``check`` report
after the same operations, files byte-identical to the ones QEMU writes (with default cache
options an engine must allocate as QEMU does), the error class of every bad request and bad
image, image locking against a live qemu-io, and the named regressions that pin each of
these down. What does not: tests of one engine's internals (its tables, its caches, private
attributes, counted I/O) stay beside that engine's other tests, and tests of the CLI or of
the differential tester stay with difftest.

To add an engine: make it importable as a top-level package exporting ``create``, ``open``
and ``check`` (spec/interface.py), then add its name to ``ENGINES`` below. Nothing else
changes; ``pytest tests/conformance -k impl`` runs the suite on it alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

ENGINES = ["model", "impl"]
"""The engines under test, by package name. Add ``"impl"`` when impl/ exports the interface."""


@pytest.fixture(scope="session", params=ENGINES)
def engine(request: pytest.FixtureRequest) -> ModuleType:
    """The engine package (``engine.create``, ``engine.open``, ``engine.check``).

    Session-scoped so that module-scoped fixtures (an image an engine prepared once) can
    depend on it; each engine is imported once."""
    return importlib.import_module(request.param)
