"""dissect.hypervisor's qcow2 reader as a read-only difftest target (adapter form (a)).

The package is pip-installed on first use into ``~/.cache/qcow2lab/adapters`` (override
with QCOW2LAB_ADAPTERS), never vendored and not a project dependency. It opens backing
files itself (by name, next to the image); external data files are passed explicitly
because the image names them by absolute path, which dissect's ``Path.with_name`` refuses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

PACKAGES = ["dissect.hypervisor", "backports.zstd"]
"""backports.zstd: dissect reads zstd-compressed clusters with it on Python < 3.14."""
CACHE = Path(os.environ.get("QCOW2LAB_ADAPTERS", Path.home() / ".cache" / "qcow2lab" / "adapters"))


def ensure_installed() -> None:
    """Install the packages unless their distributions are found. Asked of the package
    metadata, not by importing: the harness calls this before a campaign, and foreign code
    runs only in the reader's worker (difftest/adapters/isolation.py)."""
    import importlib.metadata

    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    found = {d.metadata["Name"].lower().replace("_", ".").replace("-", ".")
             for d in importlib.metadata.distributions(path=[str(CACHE), *sys.path])}
    if not {p.lower() for p in PACKAGES} <= found:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(CACHE), *PACKAGES],
                       check=True)
        importlib_invalidate()


def importlib_invalidate() -> None:
    import importlib
    importlib.invalidate_caches()


def _data_file_name(path: Path) -> str | None:
    """The external data file name from the header extension (parsed by spec.image)."""
    from spec.image import open_image
    with open_image(str(path)) as img:
        return img.data_file


class DissectImage:
    def __init__(self, path: Path) -> None:
        ensure_installed()
        from dissect.hypervisor.disk.qcow2 import QCow2
        self._files: list[BinaryIO] = []
        kw: dict[str, Any] = {}
        name = _data_file_name(path)
        if name:
            df = Path(name) if os.path.isabs(name) else path.parent / name
            f = df.open("rb")
            self._files.append(f)
            kw["data_file"] = f
        self.q = QCow2(path, **kw)
        self.stream = self.q.open()
        self.size = int(self.q.size)
        self.cluster_size = 1 << int(self.q.header.cluster_bits)

    def read(self, off: int, n: int) -> bytes:
        self.stream.seek(off)
        return bytes(self.stream.read(n))

    def close(self) -> None:
        for f in self._files:
            f.close()


class _Reader:
    """``open(path, readonly=True)`` is all a reader needs."""

    def open(self, path: str, readonly: bool = True) -> DissectImage:
        return DissectImage(Path(path))


reader = _Reader()
