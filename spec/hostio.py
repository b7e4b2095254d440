"""Host I/O as one small protocol, and the hook that lets a campaign watch it.

Every engine talks to its host files with the same few verbs (block/file-posix.c is QEMU's
side of them): ``pread``, ``pwrite``/``pwritev``, ``fallocate`` (punching holes, zeroing
ranges), ``truncate`` and ``flush`` (fdatasync). spec/qfile.Qcow2File (the model and the
shared check engine) and impl/hostfile.HostFile (the impl) each speak them, and each reports
every call to ``active``, the one monitor a campaign installs with ``monitoring()``:

- ``Recorder`` logs every call that can change a file, in order, with the written bytes, so
  a crash campaign (difftest/crash/) can rebuild what a power cut could leave on the disk;
- ``FaultInjector`` fails the N-th read, write or flush with an errno, as QEMU's blkdebug
  driver does (``inject-error`` rules; iotest 026), so a test can see what a failing disk
  does to an image.

Nothing is recorded unless a monitor is installed: the cost on the normal path is reading
``active`` once per host call. A flush is reported even when the engine skips the fdatasync
(``cache="unsafe"``, QEMU's BDRV_O_NO_FLUSH): the barrier is part of the engine's ordering,
and a recorder must see where it would be.

Errors: a monitor raises OSError to fail a call; the engine turns it into its own error for a
failed host call (HostIOError here, a CorruptionError that flags nothing: QEMU returns the
errno and leaves the corrupt bit alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from spec.errors import CorruptionError

READ, WRITE, FALLOCATE, TRUNCATE, FLUSH = "read", "write", "fallocate", "truncate", "flush"
CHANGES = (WRITE, FALLOCATE, TRUNCATE, FLUSH)
"""The kinds a recorder keeps: everything but reads."""

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


_libc: ctypes.CDLL | None = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with its mode flags (os has only posix_fallocate); returns 0 or the errno
    (block/file-posix.c, do_fallocate). libc is bound at the first call, from the symbols the
    interpreter already links (CDLL(None)): ctypes.util.find_library runs ldconfig, which cost
    every command ~10 ms of start-up."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno() or errno_mod.EIO


class HostIOError(CorruptionError):
    """A host call failed (EIO, ENOSPC, ...): the request fails as QEMU's does with the
    errno, and the image is not flagged corrupt (QEMU sets the corrupt bit only for
    inconsistent metadata, qcow2_signal_corruption)."""


@dataclass(frozen=True, slots=True)
class HostOp:
    """One host call. ``data`` is what a write writes; ``length`` the bytes a read,
    fallocate or write covers; ``offset`` the new size of a truncate; ``mode`` the
    fallocate(2) mode bits."""

    kind: str
    path: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    mode: int = 0

    def __str__(self) -> str:
        if self.kind == FLUSH:
            return f"flush {self.path}"
        if self.kind == TRUNCATE:
            return f"truncate {self.path} to {self.offset}"
        mode = f" mode={self.mode:#x}" if self.kind == FALLOCATE else ""
        return f"{self.kind} {self.path} [{self.offset:#x}, +{self.length:#x}){mode}"


class Monitor(Protocol):
    def host_op(self, op: HostOp) -> None:
        """Called before the host call ``op`` runs; raising OSError fails it."""


class HostIO(Protocol):
    """The verbs of a host-file layer (what Qcow2File and impl's HostFile provide; the
    optional ``f``/``meta`` arguments each adds are its own)."""

    def pread(self, offset: int, n: int) -> bytes: ...
    def pwrite(self, offset: int, data: bytes) -> None: ...
    def truncate(self, size: int) -> None: ...
    def punch_hole(self, offset: int, n: int) -> None: ...
    def flush(self) -> None: ...


active: Monitor | None = None
"""The installed monitor; None outside a campaign (the normal path)."""


@contextlib.contextmanager
def monitoring(monitor: Monitor) -> Iterator[Monitor]:
    """Install ``monitor`` for the duration of the block (nesting restores the outer one)."""
    global active
    outer, active = active, monitor
    try:
        yield monitor
    finally:
        active = outer


def report(kind: str, path: str, offset: int = 0, length: int = 0,
           data: bytes | bytearray | memoryview = b"",
           mode: int = 0) -> None:
    """Tell the active monitor about a host call (callers test ``active`` first, so that an
    unmonitored call costs one global lookup)."""
    if active is not None:
        active.host_op(HostOp(kind, path, offset, length, bytes(data), mode))


@dataclass
class Recorder:
    """Logs every host call that can change a file (see CHANGES), in call order."""

    ops: list[HostOp] = field(default_factory=list)
    paths: set[str] | None = None
    """Only these files (None: every file)."""

    def host_op(self, op: HostOp) -> None:
        if op.kind != READ and (self.paths is None or op.path in self.paths):
            self.ops.append(op)

    def mark(self) -> int:
        """Where the log stands now (an index into ``ops``)."""
        return len(self.ops)


@dataclass
class FaultInjector:
    """Fails the ``nth`` (1-based) host call of kind ``kind`` with ``err`` (EIO, ENOSPC),
    once, like a blkdebug ``inject-error`` rule with ``once=on``; ``fired`` says whether it
    did. Reads count too, unlike in a Recorder."""

    kind: str
    nth: int
    err: int = errno_mod.EIO
    paths: set[str] | None = None
    seen: int = 0
    fired: HostOp | None = None

    def host_op(self, op: HostOp) -> None:
        if op.kind != self.kind or (self.paths is not None and op.path not in self.paths):
            return
        self.seen += 1
        if self.seen == self.nth and self.fired is None:
            self.fired = op
            raise OSError(self.err, f"injected {errno_mod.errorcode.get(self.err, self.err)}")


@dataclass
class Tee:
    """Several monitors at once, called in order (a recorder behind a fault injector sees
    only the calls that ran)."""

    monitors: list[Monitor]

    def host_op(self, op: HostOp) -> None:
        for m in self.monitors:
            m.host_op(op)
