"""The counted host-file layer: every host read, write, flush, truncate and fallocate of the
impl goes through a HostFile, which counts it (data and metadata apart).

It is kept small on purpose so that a recorder (crash-safety tests) can subclass it, or wrap
an instance, and see every write and flush in order: the only entry points that change the
file are ``pwrite``, ``pwritev``, ``truncate``, ``punch_hole``, ``zero_range`` and ``flush``.

``direct=True`` opens the file with O_DIRECT, as QEMU does for cache=none
(block/file-posix.c raw_open_common, BDRV_O_NOCACHE). O_DIRECT wants the buffer, the offset
and the length aligned to the device's logical block; buffers here come from mmap, which is
page aligned, and unaligned requests are widened to the alignment (a read-modify-write for
writes), as the block layer does for a node with request_alignment (block/io.c
bdrv_aligned_pwritev / bdrv_co_do_copy_on_readv's padding).

Errors: a failed host call is spec.hostio.HostIOError, a CorruptionError that flags nothing
(QEMU returns the errno and leaves the corrupt bit alone); a change through a read-only file
is RequestError.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

from spec.errors import CorruptionError, RequestError
from spec.hostio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    HostIOError,
    fallocate,
)

DIRECT_ALIGN = 4096
"""Alignment used under O_DIRECT: a page, which covers every logical block size Linux
allows (file-posix probes 512 or 4096; 4096 is always safe)."""

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class IOStats:
    """Host I/O counted by one open image (its own file and data file, not the backing
    chain, which has its own). ``stats()`` of the Image returns these fields as a dict."""

    data_reads: int = 0
    data_read_bytes: int = 0
    data_writes: int = 0
    data_write_bytes: int = 0
    meta_reads: int = 0
    meta_read_bytes: int = 0
    meta_writes: int = 0
    meta_write_bytes: int = 0
    flushes: int = 0
    fallocates: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HostFile:
    """One host file (the image or its external data file). ``meta`` on each call says
    which counter it goes to; every call counts as one host request."""

    def __init__(self, path: str, *, readonly: bool, direct: bool = False,
                 stats: IOStats | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.stats = stats if stats is not None else IOStats()
        self.unflushed = False
        """True once a call changed the file since its last flush (State.flush_file uses it
        to flush an external data file only when guest data went there)."""
        self._bounce: mmap.mmap | None = None
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                # file-posix: "Could not open ... Invalid argument" (no O_DIRECT on tmpfs).
                raise RequestError(f"cache=none: {path} does not support O_DIRECT") from None
            raise CorruptionError(f"cannot open {path}: {e.strerror}") from None

    # --- counting -------------------------------------------------------------------------
    def _count(self, verb: str, n: int, meta: bool) -> None:
        """One host request of ``n`` bytes: ``verb`` is "read" or "write". Plain
        attribute updates: this runs on every request."""
        st = self.stats
        if verb == "read":
            if meta:
                st.meta_reads += 1
                st.meta_read_bytes += n
            else:
                st.data_reads += 1
                st.data_read_bytes += n
        elif meta:
            st.meta_writes += 1
            st.meta_write_bytes += n
        else:
            st.data_writes += 1
            st.data_write_bytes += n

    def _writable(self) -> None:
        if self.readonly:
            raise RequestError("image is opened read-only")

    # --- reads ----------------------------------------------------------------------------
    def pread(self, offset: int, n: int, *, meta: bool = False) -> bytes:
        """``n`` bytes at ``offset``; past the end of the file they read as zeros, as QEMU's
        file driver zero-fills short reads of regular files."""
        if n <= 0:
            return b""
        self._count("read", n, meta)
        try:
            data = self._direct_read(offset, n) if self.direct else os.pread(self.fd, n, offset)
        except (OSError, OverflowError) as e:
            raise HostIOError(f"host read of {n} bytes at {offset} failed: {e}") from None
        return data if len(data) == n else data + bytes(n - len(data))

    def preadv_into(self, bufs: Sequence[bytearray | memoryview], offset: int, *,
                    meta: bool = False) -> None:
        """Fill ``bufs`` from ``offset`` in one host request (os.preadv); zeros past EOF."""
        total = sum(map(len, bufs))
        if total <= 0:
            return
        self._count("read", total, meta)
        try:
            if self.direct:
                data = self._direct_read(offset, total)
                pos = 0
                for b in bufs:
                    b[:] = data[pos:pos + len(b)].ljust(len(b), b"\0")
                    pos += len(b)
                return
            got = os.preadv(self.fd, bufs, offset)
        except (OSError, OverflowError) as e:
            raise HostIOError(f"host read of {total} bytes at {offset} failed: {e}") from None
        if got < total:
            pos = 0
            for b in bufs:
                lo = max(0, got - pos)
                if lo < len(b):
                    b[lo:] = bytes(len(b) - lo)
                pos += len(b)

    def _bounce_buffer(self, size: int) -> mmap.mmap:
        """One aligned bounce buffer per file, kept while requests fit in it: an mmap per
        request costs more than a cached L2 lookup. Its bytes are whatever the last request
        left there."""
        buf = self._bounce
        if buf is None or len(buf) < size:
            if buf is not None:
                buf.close()
            buf = self._bounce = mmap.mmap(-1, size)
        return buf

    def _direct_read(self, offset: int, n: int) -> bytes:
        lo = offset - offset % DIRECT_ALIGN
        size = -(-(offset + n) // DIRECT_ALIGN) * DIRECT_ALIGN - lo
        buf = self._bounce_buffer(size)
        got = os.preadv(self.fd, [memoryview(buf)[:size]], lo)
        return bytes(buf[offset - lo:min(got, offset - lo + n)]) if got > offset - lo else b""

    # --- writes ---------------------------------------------------------------------------
    def pwrite(self, offset: int, data: Buffer, *, meta: bool = False) -> None:
        self.pwritev([data], offset, meta=meta)

    def pwritev(self, bufs: Sequence[Buffer], offset: int, *, meta: bool = False) -> None:
        """Write ``bufs`` back to back from ``offset`` in one host request (os.pwritev)."""
        self._writable()
        total = sum(map(len, bufs))
        if total <= 0:
            return
        self._count("write", total, meta)
        self.unflushed = True
        try:
            if self.direct:
                self._direct_write(offset, b"".join(bytes(b) for b in bufs))
                return
            done = os.pwritev(self.fd, bufs, offset)
            if done < total:
                # A short write (rare; signals, quotas): finish it the plain way.
                rest = b"".join(bytes(b) for b in bufs)[done:]
                while rest:
                    k = os.pwrite(self.fd, rest, offset + done)
                    done += k
                    rest = rest[k:]
        except (OSError, OverflowError) as e:
            raise HostIOError(f"host write of {total} bytes at {offset} failed: {e}") from None

    def _direct_write(self, offset: int, data: bytes) -> None:
        lo = offset - offset % DIRECT_ALIGN
        end = offset + len(data)
        hi = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN
        padded = lo != offset or hi != end
        size = os.fstat(self.fd).st_size if hi > end else 0
        view = memoryview(self._bounce_buffer(hi - lo))[:hi - lo]
        if padded:
            # The edges keep what the file holds there (zeros past its end).
            got = os.preadv(self.fd, [view], lo)
            if got < len(view):
                view[max(got, 0):] = bytes(len(view) - max(got, 0))
        view[offset - lo:end - lo] = data
        os.pwritev(self.fd, [view], lo)
        if hi > end and hi > size:
            # The padding must not make the file longer than a buffered write would.
            os.ftruncate(self.fd, max(size, end))

    # --- the rest ---------------------------------------------------------------------------
    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as e:
            raise HostIOError(f"cannot stat {self.path}: {e}") from None

    def truncate(self, size: int) -> None:
        self._writable()
        self.unflushed = True
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise HostIOError(f"cannot resize {self.path}: {e}") from None

    def flush(self, *, sync: bool = True) -> None:
        """bdrv_co_flush on the file: fdatasync, unless the open was cache=unsafe
        (BDRV_O_NO_FLUSH), when nothing reaches the host."""
        if self.readonly:
            return
        if sync:
            self.stats.flushes += 1
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                raise HostIOError(f"flush of {self.path} failed: {e}") from None
        self.unflushed = False

    def punch_hole(self, offset: int, n: int) -> None:
        """raw_co_pdiscard: PUNCH_HOLE|KEEP_SIZE; failures ignored (a discard is advice)."""
        if self.readonly or n <= 0:
            return
        self.stats.fallocates += 1
        self.unflushed = True
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)

    def zero_range(self, offset: int, n: int) -> bool:
        """handle_aiocb_write_zeroes with BDRV_REQ_NO_FALLBACK (file-posix): ZERO_RANGE,
        else PUNCH_HOLE then fallocate(0), else fallocate(0) past EOF. False = -ENOTSUP."""
        self._writable()
        self.stats.fallocates += 1
        self.unflushed = True
        ret = fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, n)
        if ret == 0:
            return True
        if ret not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise HostIOError(f"zeroing {n} bytes at {offset} failed: {os.strerror(ret)}")
        if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n) == 0:
            return fallocate(self.fd, 0, offset, n) == 0
        if offset >= self.size():
            return fallocate(self.fd, 0, offset, n) == 0
        return False

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
