"""A read-only adapter (``--readers py:tests.difftest.planted_reader:reader``) with a planted
bug, the first libqcow bug of issue 14 in miniature: a cluster the top image marks zero
(QCOW_OFLAG_ZERO) over a backing file reads as 0xEE bytes instead of zeros. It is the model
underneath, so everything else reads right. ``PLANTED_READER_FIXED=1`` in the environment
takes the bug out, so a test can show that a reproducer passes without it.
"""

from __future__ import annotations

import os
from typing import Any

import model

PLANTED = 0xEE


class _Image:
    def __init__(self, path: str) -> None:
        self.img = model.open(path, readonly=True)
        self.size = self.img.size
        self.backed = bool(self.img.info().get("backing-filename"))

    def read(self, off: int, n: int) -> bytes:
        out = bytearray(self.img.read(off, n))
        if not self.backed or os.environ.get("PLANTED_READER_FIXED"):
            return bytes(out)
        for e in self.img.map(off, n):
            if e["depth"] == 0 and e["zero"] and not e["data"]:
                lo, hi = max(e["start"], off) - off, min(e["start"] + e["length"], off + n) - off
                out[lo:hi] = bytes([PLANTED]) * (hi - lo)
        return bytes(out)

    def close(self) -> None:
        self.img.close()


class _Reader:
    def open(self, path: str, readonly: bool = True, **_: Any) -> _Image:
        return _Image(path)


reader = _Reader()


class _OnceReader(_Reader):
    """Fails its first open after ``PLANTED_READER_ONCE`` (a file path) is set, then reads
    right: a finding whose reproducer passes when replayed (flaky)."""

    def open(self, path: str, readonly: bool = True, **_: Any) -> _Image:
        marker = os.environ.get("PLANTED_READER_ONCE")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            raise OSError("planted: the first open fails")
        os.environ["PLANTED_READER_FIXED"] = "1"  # no zero-cluster bug: only the flaky open
        return _Image(path)


once = _OnceReader()
