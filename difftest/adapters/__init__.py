"""External targets: how to put another qcow2 implementation into the differential test.

Two forms, both selected with ``qcow2lab difftest --targets`` (writers, stepped in lockstep)
or ``--readers`` (read-only, checked at teardown):

(a) **A Python object** with spec.interface's module-level API: ``create(path, size, **opts)``
    and ``open(path, *, readonly=False) -> Image``. Name it ``py:package.module`` (a module)
    or ``py:package.module:NAME`` (an object in it). A *reader* needs only
    ``open(path, readonly=True)`` returning an object with ``size``, ``read(off, n)`` and
    ``close()``; it reads every file the writers produced, and must read what they read.
    ``py:model`` and ``py:impl`` run in the harness; every other ``py:`` adapter runs in a
    worker process (isolation.py), so its arguments and results must be builtin data
    (bytes, numbers, strings, lists, dicts); any other object it returns stays in the
    worker behind a proxy.

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

Isolation (isolation.py, worker.py). Foreign code runs in a worker process under a
wall-clock limit per call (``--adapter-timeout``, default 20 s) and an address-space limit
(``--adapter-memory``, default 1024 MiB above its size once imported); a ``py:`` adapter is
imported once per campaign process and every example is served by a fresh fork of that
import. What goes wrong is a finding of one class: ``hang`` (no answer in time: the process
group is killed, which stops a C loop that ignores SIGALRM too), ``crash`` (the process died),
``memory`` (MemoryError, or died out of memory), ``error`` (an ordinary exception; a target's
spec.errors exception is an outcome compared like any target's) or ``wrong-bytes`` (a reader
answered differently from the first target). A reader finding is ``Divergence("reader",
"finish", "<class>: ...")``; ``Divergence.finding_class`` holds the class. A ``cmd:`` adapter
gets the same wall-clock limit per command, an address-space cap and its own process group.

Capabilities. ``UNSUPPORTED`` on the adapter object (or its module) maps configuration field
names (difftest/core/config.py, ``Config``; the names ``--config`` takes) to the values the
adapter does not support, e.g. ``{"extended_l2": {True}, "compression_type": {"zstd"},
"backing": {"raw"}, "data_file": {True}, "cluster_size": {512}}``. A target's declaration
keeps those values out of the drawn configurations; a reader sits such an example out, noted
``unsupported: <reader>: field=value``. Raising spec.errors.UnsupportedFeature or
NotImplementedError at open does the same for that example (target or reader), noted
``unsupported: <name>: ...``: neither is a finding.

Shipped: ``dissect_qcow2`` (form (a), reader): dissect.hypervisor's qcow2 reader, installed
with pip at first use into ~/.cache/qcow2lab/adapters (never vendored); ``libqcow``
(form (a), reader): libyal's libqcow through its Python binding pyqcow, installed the same way.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def cwd_on_path() -> None:
    """The qcow2lab script's sys.path starts with its own directory, not the current one, so
    a reader module beside where the command runs would not import. The current directory
    goes last: it never shadows the project's own modules (the worker inherits sys.path)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def load(spec: str) -> Any:
    """The object a ``py:module[:NAME]`` or short reader name (``dissect``) stands for."""
    if spec == "dissect":
        spec = "py:difftest.adapters.dissect_qcow2:reader"
    elif spec == "libqcow":
        spec = "py:difftest.adapters.libqcow:reader"
    if not spec.startswith("py:"):
        raise ValueError(f"reader {spec!r}: expected py:MODULE[:NAME] or 'dissect'")
    modname, _, attr = spec[3:].partition(":")
    cwd_on_path()
    mod = importlib.import_module(modname)
    return getattr(mod, attr) if attr else mod
