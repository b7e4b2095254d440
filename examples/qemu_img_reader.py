"""An example reader for ``--readers py:qemu_img_reader:reader`` (README, "Writing a
reader"): it reads a qcow2 image through ``qemu-img convert -O raw`` into a temporary file,
so it passes every conformance area it takes part in. Run a campaign from this directory:

    cd examples && qcow2lab conformance --readers py:qemu_img_reader:reader --time-budget 10

Start from it to hold your own reader to QEMU: keep ``open``/``size``/``read``/``close``.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from typing import Any, ClassVar


def _lift_memory_limit() -> None:
    # The harness's worker caps its address space (RLIMIT_AS) and qemu-img would inherit the
    # cap: it aborts when it cannot start its threads.
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


class Image:
    def __init__(self, path: str, snapshot: str | None) -> None:
        self._dir = tempfile.mkdtemp(prefix="qemu-img-reader-")
        raw = os.path.join(self._dir, "guest.raw")
        argv = ["qemu-img", "convert", "-O", "raw"]
        if snapshot is not None:
            argv += ["-l", f"snapshot.name={snapshot}"]
        subprocess.run([*argv, path, raw], check=True, capture_output=True, preexec_fn=_lift_memory_limit)
        self._fd = os.open(raw, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self._fd, n, off)

    def close(self) -> None:
        os.close(self._fd)
        shutil.rmtree(self._dir, ignore_errors=True)


class Reader:
    # Nothing is unsupported here; a reader that cannot read, e.g., extended L2 entries says
    # so with {"extended_l2": {True}} (difftest Config fields and their values).
    UNSUPPORTED: ClassVar[dict[str, set[Any]]] = {}

    def open(self, path: str, readonly: bool = True, snapshot: str | None = None, **_: Any) -> Image:
        return Image(path, snapshot)


reader = Reader()
