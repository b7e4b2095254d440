"""libyal's libqcow as a read-only difftest target (adapter form (a)): ``--readers libqcow``.

The Python binding (PyPI ``libqcow-python``, module ``pyqcow``) is pip-installed on first
use into the same cache as dissect's (``~/.cache/qcow2lab/adapters``, QCOW2LAB_ADAPTERS
overrides it), never vendored and not a project dependency. pip builds it from source
there, which needs a C compiler and takes about a minute, once.

What the reader gets is the top image's path only, as every reader does, so it resolves
the rest itself, as QEMU 7.2 would:
- a backing file is named relative to the image's directory (an absolute name is used
  as is); libqcow reads the top layer only until it is given the parent with
  ``set_parent``, which takes another libqcow file, so each qcow2 layer of the chain is
  opened and linked here, bottom first;
- an external data file would be named relative to the current directory, but libqcow
  refuses the image at open (incompatible feature bit 2), before that matters.

What libqcow cannot do is declared in ``UNSUPPORTED`` (the campaign draws no such
configuration) and, for an image that reaches it anyway, raised at open as
``spec.errors.UnsupportedFeature``, which the harness records as *unsupported*, not as a
finding: the incompatible features libqcow refuses itself at open (external data file,
zstd compression, extended L2 entries: ``unsupported incompatible features flags``) and a
raw backing file, which ``set_parent`` cannot take. Everything else it raises is a finding.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from difftest.adapters.dissect_qcow2 import CACHE
from spec.errors import UnsupportedFeature

PACKAGES = ["libqcow-python"]
UNSUPPORTED: dict[str, set[Any]] = {
    "data_file": {True},
    "compression_type": {"zstd"},
    "extended_l2": {True},
    "backing": {"raw"},
}
"""Config field -> values libqcow cannot read (see the module docstring)."""
MAX_CHAIN = 16
"""Layers followed before the chain is taken for a loop."""


def ensure_installed() -> Any:
    """The pyqcow module, pip-installed into CACHE on first use."""
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    try:
        return importlib.import_module("pyqcow")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(CACHE), *PACKAGES],
                       check=True)
        importlib.invalidate_caches()
        return importlib.import_module("pyqcow")


def version() -> str:
    return str(ensure_installed().get_version())


def _refused(e: OSError) -> str | None:
    """The feature libqcow names when it refuses an image it does not support, or None."""
    msg = str(e)
    if "unsupported incompatible features flags" in msg:
        flags = msg.split("unsupported incompatible features flags:")[1].split(".")[0].strip()
        return f"incompatible features {flags} (libqcow)"
    return None


class LibqcowImage:
    def __init__(self, path: Path) -> None:
        pyqcow = ensure_installed()
        self._files: list[Any] = []
        try:
            top = self._open(pyqcow, path)
            layer, where = top, path
            for _ in range(MAX_CHAIN):
                name = layer.get_backing_filename()
                if not name:
                    break
                where = Path(name) if os.path.isabs(name) else where.parent / name
                if not pyqcow.check_file_signature(str(where)):
                    raise UnsupportedFeature("raw backing file (libqcow's set_parent takes qcow files only)")
                parent = self._open(pyqcow, where)
                layer.set_parent(parent)
                layer = parent
        except BaseException:
            self.close()
            raise
        self.f = top
        self.size = int(top.get_media_size())

    def _open(self, pyqcow: Any, path: Path) -> Any:
        f = pyqcow.file()
        try:
            f.open(str(path))
        except OSError as e:
            what = _refused(e)
            if what is not None:
                raise UnsupportedFeature(what) from e
            raise
        self._files.append(f)
        return f

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.f.read_buffer_at_offset(n, off))

    def close(self) -> None:
        for f in reversed(self._files):
            f.close()
        self._files.clear()


class _Reader:
    """``open(path, readonly=True)`` is all a reader needs; libqcow has no internal
    snapshot API, so ``snapshot=`` is refused as unsupported."""

    def open(self, path: str, readonly: bool = True, snapshot: str | None = None) -> LibqcowImage:
        if snapshot is not None:
            raise UnsupportedFeature("internal snapshots (libqcow reads the active layer only)")
        return LibqcowImage(Path(path))


reader = _Reader()
