"""QEMU's image locking protocol: OFD byte-range locks on the image file.

QEMU's file driver (block/file-posix.c: raw_apply_lock_bytes, raw_check_lock_bytes,
raw_handle_perm_lock) turns the block layer's permissions (include/block/block-common.h,
BLK_PERM_*) into open-file-description locks (fcntl F_OFD_SETLK / F_OFD_GETLK), so two
processes that open the same image agree on who may write it:

- for each permission bit ``b`` the opener *holds*, a shared (read) lock on byte
  ``RAW_LOCK_PERM_BASE + b`` (100 + b);
- for each permission bit ``b`` the opener *does not share* with others, a shared lock on
  byte ``RAW_LOCK_SHARED_BASE + b`` (200 + b);
- after taking its own locks, it probes with F_OFD_GETLK for an exclusive lock: on byte
  200 + b for every bit it holds (someone refuses to share it) and on byte 100 + b for every
  bit it does not share (someone holds it). Any conflict means "locked by another process".

Because every lock is shared, two openers never block each other at SETLK time; only the
GETLK probes find conflicts. OFD locks belong to the open file description, so a probe
never sees the caller's own locks, but a *second* open() of the same file in the same
process is a different description and does conflict, exactly as in QEMU.

What QEMU 7.2 takes, observed with strace and /proc/locks (qemu-io/qemu-img 7.2.22):

============================  =====================  =====================================
opener                        held (bytes 100+b)      not shared (bytes 200+b)
============================  =====================  =====================================
qemu-io (read-write)          CONSISTENT_READ,        WRITE, RESIZE
                              WRITE, RESIZE
qemu-io -r, qemu-img check,   CONSISTENT_READ         WRITE, RESIZE
a backing file
qemu-img info                 nothing (no I/O)        WRITE, RESIZE
qemu-io -r -U                 CONSISTENT_READ         nothing (shares everything)
qemu-img info -U              nothing                 nothing (takes no lock at all)
qemu-io -U (read-write)       refused: "force-share=on can only be used with read-only images"
external data file, rw        CONSISTENT_READ,        RESIZE
                              WRITE, RESIZE
external data file, -r        CONSISTENT_READ         RESIZE
external data file, -r -U     CONSISTENT_READ         nothing
============================  =====================  =====================================

The image file and its external data file are locked separately, each through its own
descriptor (qemu-img info, which does no I/O, does not open the data file at all). A
backing file is opened read-only and locked like ``qemu-io -r``.

WRITE_UNCHANGED is always shared. ``lock_mode()`` below encodes this table.

Error class (DESIGN.md, "Errors"): a conflict raises RequestError. The image is not at
fault (not FormatError/CorruptionError) and the library supports the request (not
UnsupportedFeature); what is wrong is the caller's environment, another process holding
the image, which is the caller's to resolve, as QEMU's "Failed to get "write" lock ... Is
another process using the image?" says.

Like QEMU's ``locking=auto``, a file system without OFD lock support (the GETLK probe fails
with EINVAL/ENOTSUP/ENOLCK) silently runs without locks; ``locking="on"`` makes that an
UnsupportedFeature instead, and ``locking="off"`` never touches the locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Literal

from spec.errors import RequestError, UnsupportedFeature

# include/block/block-common.h (QEMU 7.2): the permission bits. GRAPH_MOD no longer exists.
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F

PERM_NAMES = {
    BLK_PERM_CONSISTENT_READ: "consistent read",
    BLK_PERM_WRITE: "write",
    BLK_PERM_WRITE_UNCHANGED: "write unchanged",
    BLK_PERM_RESIZE: "resize",
}
"""QEMU's names for the bits (block.c, bdrv_perm_names), used in its lock error messages."""

# block/file-posix.c: first byte of the "held" and the "not shared" lock ranges.
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# What a read-only or read-write opener refuses to share unless force_share (-U) is given:
# observed in QEMU 7.2 (see the module doc); block.c bdrv_default_perms / blk_new callers.
_UNSHARED_DEFAULT = BLK_PERM_WRITE | BLK_PERM_RESIZE

Locking = Literal["auto", "on", "off"]
"""file-posix's ``locking`` option."""

# struct flock (Linux, all 64-bit and LFS 32-bit ABIs): short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid. Native alignment pads after l_whence; the tail
# padding brings it to sizeof(struct flock). l_pid must be 0 for OFD locks.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32


def _flock(l_type: int, start: int, length: int = 1) -> bytes:
    raw = _FLOCK.pack(l_type, os.SEEK_SET, start, length, 0)
    return raw + b"\0" * (_FLOCK_SIZE - len(raw))


def _setlk(fd: int, l_type: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(l_type, byte))


def _getlk_conflicts(fd: int, byte: int) -> bool:
    """True if another open file description holds a lock that blocks an exclusive lock on ``byte``."""
    out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return bool(_FLOCK.unpack(out[: _FLOCK.size])[0] != fcntl.F_UNLCK)


@dataclass(frozen=True)
class LockMode:
    """The permissions an opener holds (``perm``) and lets others hold (``shared``)."""

    perm: int
    shared: int

    @property
    def perm_bytes(self) -> list[int]:
        return [RAW_LOCK_PERM_BASE + b for b in range(4) if self.perm & (1 << b)]

    @property
    def unshared_bytes(self) -> list[int]:
        return [RAW_LOCK_SHARED_BASE + b for b in range(4) if not self.shared & (1 << b)]


def lock_mode(*, write: bool, force_share: bool = False, no_io: bool = False,
              data_file: bool = False) -> LockMode:
    """The permissions QEMU 7.2 takes for an open (the table in the module doc).

    ``no_io`` is qemu-img info's open (BDRV_O_NO_IO): no data access, so nothing held.
    ``data_file`` is the lock on an external data file: QEMU lets other writers share it
    (WRITE is shared) but still refuses resizes (block.c, bdrv_default_perms_for_storage
    gives a pure data child WRITE sharing; observed as the table shows).
    force_share with write is refused as QEMU refuses it (block.c, bdrv_open_common:
    "force-share=on can only be used with read-only images"): RequestError.
    """
    if write and force_share:
        raise RequestError("force_share can only be used with read-only images")
    if write:
        perm = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE
    else:
        perm = 0 if no_io else BLK_PERM_CONSISTENT_READ
    unshared = BLK_PERM_RESIZE if data_file else _UNSHARED_DEFAULT
    shared = BLK_PERM_ALL if force_share else BLK_PERM_ALL & ~unshared
    return LockMode(perm, shared)


def _names(bits: int) -> str:
    return ", ".join(name for bit, name in PERM_NAMES.items() if bits & bit)


class ImageLock:
    """QEMU-compatible locks on one open file description (the image file's fd).

    The fd must stay open while the lock is held, and it must be the image's own fd: a
    separate open() of the same path would be another description that conflicts with it.
    Use as ``lock = ImageLock(f); lock.acquire(write=True); ...; lock.release()`` or as a
    context manager after acquire. Raises only RequestError / UnsupportedFeature.
    """

    def __init__(self, f: int | BinaryIO, *, locking: Locking = "auto", path: str | None = None) -> None:
        if locking not in ("auto", "on", "off"):
            raise RequestError(f"invalid locking option {locking!r}")
        self.fd = f if isinstance(f, int) else f.fileno()
        self.locking: Locking = locking
        self.path = path
        self.mode: LockMode | None = None
        self._held: list[int] = []

    @property
    def held(self) -> bool:
        return self.mode is not None

    def _supported(self) -> bool:
        """file-posix probes OFD support with a whole-file GETLK (raw_open_common)."""
        if self.locking == "off":
            return False
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, 0, 0))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK) \
                    and self.locking == "auto":
                return False
            raise UnsupportedFeature("locking", f"OFD locks unavailable: {e.strerror}") from None
        return True

    def acquire(self, *, write: bool, force_share: bool = False, no_io: bool = False,
                data_file: bool = False) -> LockMode:
        """Take QEMU's locks for this open, or raise RequestError if another process conflicts.

        Order as raw_handle_perm_lock: apply our lock bytes first, then probe; on a conflict
        our own bytes are dropped again so a failed open leaves nothing behind.
        """
        mode = lock_mode(write=write, force_share=force_share, no_io=no_io, data_file=data_file)
        if self.mode is not None:
            self.release()
        if not self._supported():
            self.mode = mode
            return mode
        try:
            for byte in mode.perm_bytes + mode.unshared_bytes:
                _setlk(self.fd, fcntl.F_RDLCK, byte)
                self._held.append(byte)
            self._check(mode)
        except OSError as e:
            self._unlock_all()
            raise RequestError(f"{self._where()}: failed to lock the image: {e.strerror}") from None
        except RequestError:
            self._unlock_all()
            raise
        self.mode = mode
        return mode

    def _check(self, mode: LockMode) -> None:
        """raw_check_lock_bytes: probe the opposite range of every bit we hold or unshare."""
        for b in range(4):
            bit = 1 << b
            if mode.perm & bit and _getlk_conflicts(self.fd, RAW_LOCK_SHARED_BASE + b):
                raise RequestError(f"{self._where()}: failed to get \"{PERM_NAMES[bit]}\" lock: "
                                   "the image is locked by another process")
        for b in range(4):
            bit = 1 << b
            if not mode.shared & bit and _getlk_conflicts(self.fd, RAW_LOCK_PERM_BASE + b):
                raise RequestError(f"{self._where()}: failed to get shared \"{PERM_NAMES[bit]}\" lock: "
                                   "the image is locked by another process")

    def _where(self) -> str:
        return self.path or f"fd {self.fd}"

    def _unlock_all(self) -> None:
        for byte in self._held:
            # OSError: fd already closed, and the kernel dropped its OFD locks with it.
            with contextlib.suppress(OSError):
                _setlk(self.fd, fcntl.F_UNLCK, byte)
        self._held = []

    def release(self) -> None:
        """Drop every lock byte; idempotent. Closing the fd has the same effect."""
        self._unlock_all()
        self.mode = None

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def conflicts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Which lock bytes other processes hold on ``path``: {"perm": bits, "unshared": bits}.

    A diagnostic (for tests and ``qcow2lab``): opens a fresh description, probes every byte
    of both ranges with F_OFD_GETLK and closes it; takes no lock itself. OSError becomes
    RequestError.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise RequestError(f"{path}: cannot open: {e.strerror}") from None
    try:
        perm = sum(1 << b for b in range(4) if _getlk_conflicts(fd, RAW_LOCK_PERM_BASE + b))
        unshared = sum(1 << b for b in range(4) if _getlk_conflicts(fd, RAW_LOCK_SHARED_BASE + b))
    except OSError as e:
        raise RequestError(f"{path}: cannot probe locks: {e.strerror}") from None
    finally:
        os.close(fd)
    return {"perm": perm, "unshared": unshared}
