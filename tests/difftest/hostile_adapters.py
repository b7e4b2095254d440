"""Readers and targets that misbehave the ways foreign code does (tests/difftest/test_isolation.py).

Each is named with ``py:tests.difftest.hostile_adapters:NAME``. The good ones read through the
model (the project's own reader), so only the planted misbehaviour differs.
"""

from __future__ import annotations

import os
import signal
from typing import Any, ClassVar

import model
from spec.errors import UnsupportedFeature


class _Image:
    def __init__(self, path: str, on_read: Any = None) -> None:
        self.img = model.open(path, readonly=True)
        self.size = self.img.size
        self.on_read = on_read

    def read(self, off: int, n: int) -> bytes:
        if self.on_read is not None:
            self.on_read(self)
        return bytes(self.img.read(off, n))

    def close(self) -> None:
        self.img.close()


class Reader:
    """``open(path, readonly=True)`` as a reader needs; ``on_read`` misbehaves per read."""

    def __init__(self, on_read: Any = None, on_open: Any = None) -> None:
        self.on_read = on_read
        self.on_open = on_open

    def open(self, path: str, readonly: bool = True) -> _Image:
        if self.on_open is not None:
            self.on_open()
        return _Image(path, self.on_read)


def _spin(_img: Any) -> None:
    # SIGALRM cannot stop this: it is ignored, as a loop inside a C extension would be.
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        pass


def _segfault(_img: Any) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _exit(_img: Any) -> None:
    os._exit(3)


def _leak(_img: Any) -> None:
    for _ in range(100):
        open(os.devnull, "rb")  # noqa: SIM115 - the leak is the point


_hoard: list[bytes] = []


def _grab(_img: Any) -> None:
    while True:
        _hoard.append(b"\x01" * (16 << 20))


def _raise(_img: Any) -> None:
    raise KeyError("planted")


def _unsupported() -> None:
    raise UnsupportedFeature("extended_l2", "planted: no extended L2 entries")


def _not_implemented() -> None:
    raise NotImplementedError("planted: zstd")


good = Reader()
spins = Reader(_spin)
segfaults = Reader(_segfault)
exits = Reader(_exit)
leaks_fds = Reader(_leak)
hoards = Reader(_grab)
raises = Reader(_raise)
refuses = Reader(on_open=_unsupported)
not_implemented = Reader(on_open=_not_implemented)


class WrongReader(Reader):
    """Reads every byte at guest offset 0 as 0xEE: a wrong answer, not a failure."""

    def open(self, path: str, readonly: bool = True) -> _Image:
        img = _Image(path)
        real = img.read

        def read(off: int, n: int) -> bytes:
            data = bytearray(real(off, n))
            if off == 0 and n:
                data[0] = 0xEE
            return bytes(data)

        img.read = read  # type: ignore[method-assign]
        return img


wrong = WrongReader()


class NoRawBacking(Reader):
    """Declares what it does not support, on the object."""

    UNSUPPORTED: ClassVar[dict[str, set[Any]]] = {"backing": {"raw"}, "cluster_size": {512}}


no_raw = NoRawBacking()


class Target:
    """A writer (``--targets py:...``) over the model, with a planted misbehaviour on write."""

    UNSUPPORTED: ClassVar[dict[str, set[Any]]] = {"compression_type": {"zstd"}, "extended_l2": {True}}

    def __init__(self, on_write: Any = None) -> None:
        self.on_write = on_write

    def create(self, path: str, size: int, **kw: Any) -> None:
        model.create(path, size, **kw)

    def open(self, path: str, readonly: bool = False) -> Any:
        img = model.open(path, readonly=readonly)
        if self.on_write is not None:
            on_write, real = self.on_write, img.write

            def write(off: int, data: bytes) -> None:
                on_write(img)
                real(off, data)

            img.write = write  # type: ignore[method-assign,assignment]
        return img


plain_target = Target()
spinning_target = Target(_spin)
crashing_target = Target(_segfault)


class RefusingTarget(Target):
    def open(self, path: str, readonly: bool = False) -> Any:
        raise UnsupportedFeature("lazy_refcounts", "planted: refuses every image")


refusing_target = RefusingTarget()


class StartsAProgram:
    def open(self, path: str, pidfile: str) -> None:
        import subprocess
        proc = subprocess.Popen(["sleep", "600"])
        with open(pidfile, "w") as f:
            f.write(str(proc.pid))


starts_a_program = StartsAProgram()
