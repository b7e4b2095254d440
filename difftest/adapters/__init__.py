"""External targets: how to put another qcow2 implementation into the differential test.

Two forms, both selected with ``qcow2lab difftest --targets`` (writers, stepped in lockstep)
or ``--readers`` (read-only, checked at teardown):

(a) **A Python object** with spec.interface's module-level API: ``create(path, size, **opts)``
    and ``open(path, *, readonly=False) -> Image``. Name it ``py:package.module`` (a module)
    or ``py:package.module:NAME`` (an object in it). A *reader* needs only
    ``open(path, readonly=True)`` returning an object with ``size``, ``read(off, n)`` and
    ``close()``; it reads every file the writers produced, and must read what they read.
    Any exception a reader raises is recorded as a finding (it is foreign code).

(b) **A command** that speaks qemu-io's command language on stdin:
    ``cmd:NAME=ARGV``. It is started as ``ARGV [-r] IMAGE`` in the image's directory after
    ``qemu-img create`` made IMAGE, and must, like ``qemu-io`` with a pipe on stdin:
    print the prompt ``qemu-io> `` (no newline) when ready; read one command line; print its
    output; print the prompt again. Failures are one line containing ``failed: <errno
    text>`` (or starting with the program's name and a colon). The commands used:
    ``read -v OFF LEN`` (hexdump, 16 bytes a line: ``%08x:  xx xx ...``), ``read -q -P BYTE
    OFF LEN`` (print ``Pattern verification failed`` on mismatch), ``write -q -P BYTE OFF
    LEN``, ``write -q -s FILE OFF LEN`` (bytes from FILE), ``write -q -z [-u] OFF LEN``,
    ``discard -q OFF LEN``, ``write -q -c (-P BYTE | -s FILE) OFF LEN``, ``flush``,
    ``truncate SIZE``, ``map`` (qemu-io's "... (0xLEN) bytes [not] allocated at offset ...
    (0xOFF)" lines, top layer only), ``close``, ``open -t unsafe [-r] -o driver=qcow2
    PATH`` and ``quit``. Metadata (map JSON, info, snapshots) is read with qemu-img from the
    file. ``python -m difftest.adapters.serve MODULE`` is such a command for any form (a)
    module, e.g. ``cmd:model-io=python -m difftest.adapters.serve model``.

Shipped: ``dissect_qcow2`` (form (a), reader): dissect.hypervisor's qcow2 reader, installed
with pip at first use into ~/.cache/qcow2lab/adapters (never vendored); ``libqcow``
(form (a), reader): libyal's libqcow through its Python binding pyqcow, installed the same way.
"""

from __future__ import annotations

import importlib
from typing import Any


def load(spec: str) -> Any:
    """The object a ``py:module[:NAME]`` or short reader name (``dissect``) stands for."""
    if spec == "dissect":
        spec = "py:difftest.adapters.dissect_qcow2:reader"
    elif spec == "libqcow":
        spec = "py:difftest.adapters.libqcow:reader"
    if not spec.startswith("py:"):
        raise ValueError(f"reader {spec!r}: expected py:MODULE[:NAME] or 'dissect'")
    modname, _, attr = spec[3:].partition(":")
    mod = importlib.import_module(modname)
    return getattr(mod, attr) if attr else mod
