"""One open qcow2 file, raw: the host file, the header, and nothing cached.

This is the layer every writer of the raw file shares: the check-and-repair engine
(spec/check/) and the model write through it; the impl has its own counted host file.
The header is the only structure kept in memory, because QEMU keeps it too (BDRVQcow2State)
and rewrites it whole when it changes (block/qcow2.c, qcow2_update_header). Every table
(L1, L2, refcount table, refcount blocks) is read from the file each time it is needed.

One allocator cursor lives here as well. It is not a cache of on-disk data but QEMU's
allocation state, kept so that a writer picks the same host offsets QEMU picks:
``free_cluster_index`` (block/qcow2-refcount.c, alloc_clusters_noref; spec/refblocks.py).

Every host call goes through the verbs of spec/hostio.py (``pread``, ``write_raw``/``pwrite``,
``truncate``, fallocate as ``punch_hole``/``write_zeroes_no_fallback``, ``flush``) and is reported
to ``hostio.active`` when a campaign installed a monitor (a recorder, a fault injector).
``pwrite`` is the metadata write and calls ``barrier()`` first: a no-op here (the check engine
orders its repairs itself), the model's ordering point (model/state.py ModelFile).

Errors: host I/O failures become hostio.HostIOError, a CorruptionError that flags nothing
(QEMU returns the errno and, for plain I/O errors, does not set the corrupt bit). Writing
through a read-only file is RequestError.
"""

from __future__ import annotations

import errno
import os
from typing import BinaryIO

import construct as c

from spec import header as hd
from spec import hostio
from spec.errors import RequestError
from spec.features import QCOW2_INCOMPAT_CORRUPT, QCOW2_INCOMPAT_DIRTY
from spec.geometry import Geometry
from spec.header_update import header_cluster, memory_of
from spec.hostio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from spec.image import ImageFile


class Qcow2File(hd.HeaderViews):
    """The host file of a qcow2 image plus its in-memory header (see the module doc).

    A writer that keeps allocation state of its own overrides ``refcount_freed``."""

    def __init__(self, img: ImageFile, f: BinaryIO, *, readonly: bool,
                 data_f: BinaryIO | None = None) -> None:
        self.path = img.path
        self.f = f
        self.readonly = readonly
        self.header: c.Container = img.header
        self.geometry: Geometry = img.geometry
        self.image_file = img
        self.header_memory = memory_of(img)
        """What QEMU keeps of the header cluster to rewrite it (spec/header_update.py)."""
        self.data_f = data_f
        self.free_cluster_index = 0
        # No operation changes the data-file bit, and every lookup asks for it: it is read
        # from the header once instead of on each call (HeaderViews decodes it each time).
        self._has_data_file = img.has_data_file
        self.unflushed = False
        """Something was written since the last flush (so a barrier has work to do)."""
        self.signalled: str | None = None
        """A corruption QEMU signals inside a step whose failure it ignores (a refcount
        block for a free would land on the header: qcow2_signal_corruption flags the image
        and drops the node, qcow2_free_clusters only logs the failure); the writer flags
        the image when the operation ends (spec/refblocks.py)."""

    # --- header views: spec.header.HeaderViews, plus what only a writer needs -------------
    @property
    def has_data_file(self) -> bool:
        return self._has_data_file

    @property
    def refcount_max(self) -> int:
        return (1 << self.geometry.refcount_bits) - 1

    def check_refblock_write(self, offset: int, n: int) -> None:
        """The overlap check of a refcount block alloc_refcount_block or qcow2_refcount_area
        writes at once (their qcow2_cache_flush runs qcow2_pre_write_overlap_check, refcount
        blocks ignored); raises CorruptionError. No check here: the check-and-repair engine
        writes as qemu-img check does; the model overrides it (model/state.py)."""

    def refcount_freed(self, cluster_index: int) -> None:
        """The refcount of ``cluster_index`` dropped to 0: the free-cluster search will
        start there at the latest (update_refcount moves free_cluster_index back)."""
        if cluster_index < self.free_cluster_index:
            self.free_cluster_index = cluster_index

    # --- host I/O ---------------------------------------------------------------------------
    def _path(self, f: BinaryIO | None) -> str:
        """The file a host call goes to, as monitors name it."""
        return self.path if f is None or f is self.f else str(f.name)

    def pread(self, offset: int, n: int, f: BinaryIO | None = None) -> bytes:
        """Read ``n`` bytes; bytes past the end of the file read as zeros, as in QEMU's
        file driver (block/file-posix.c zero-fills short reads of regular files)."""
        if n <= 0:
            return b""
        try:
            if hostio.active is not None:
                hostio.report(hostio.READ, self._path(f), offset, n)
            data = os.pread((f or self.f).fileno(), n, offset)
        except (OSError, OverflowError) as e:
            raise hostio.HostIOError(f"host read of {n} bytes at {offset} failed: {e}") from None
        return data if len(data) == n else data + bytes(n - len(data))

    def pwrite(self, offset: int, data: bytes | bytearray, f: BinaryIO | None = None) -> None:
        """A metadata write (every write but guest data, which is data_pwrite): an engine
        that orders its writes puts its barrier before it (see barrier)."""
        self.barrier()
        self.write_raw(offset, data, f)

    def write_raw(self, offset: int, data: bytes | bytearray, f: BinaryIO | None = None) -> None:
        """One host write, with no ordering of its own."""
        if self.readonly:
            raise RequestError("image is opened read-only")
        try:
            if hostio.active is not None:
                hostio.report(hostio.WRITE, self._path(f), offset, len(data), data)
            self.unflushed = True
            os.pwrite((f or self.f).fileno(), data, offset)
        except (OSError, OverflowError) as e:
            raise hostio.HostIOError(f"host write of {len(data)} bytes at {offset} failed: {e}") from None

    def barrier(self) -> None:
        """Called before every metadata write. The plain file orders nothing; the model
        overrides it with a flush (model/state.py ModelFile)."""

    def flush(self, f: BinaryIO | None = None, *, sync: bool = True) -> None:
        """bdrv_co_flush on one file: fdatasync, unless ``sync`` is False (cache=unsafe,
        BDRV_O_NO_FLUSH). A monitor sees the flush either way: it is still a barrier in the
        writer's ordering."""
        if self.readonly:
            return
        try:
            if hostio.active is not None:
                hostio.report(hostio.FLUSH, self._path(f))
            if sync:
                os.fdatasync((f or self.f).fileno())
        except OSError as e:
            raise hostio.HostIOError(f"flush of {self._path(f)} failed: {e}") from None

    def flush_all(self, *, sync: bool = True) -> None:
        """Flush the image file and the data file (bdrv_co_flush recurses into children)."""
        self.flush(sync=sync)
        if self.data_f is not None:
            self.flush(self.data_f, sync=sync)
        self.unflushed = False

    def file_size(self, f: BinaryIO | None = None) -> int:
        try:
            return os.fstat((f or self.f).fileno()).st_size
        except OSError as e:
            raise hostio.HostIOError(f"cannot stat host file: {e}") from None

    def truncate(self, size: int, f: BinaryIO | None = None) -> None:
        if self.readonly:
            raise RequestError("image is opened read-only")
        try:
            if hostio.active is not None:
                hostio.report(hostio.TRUNCATE, self._path(f), size)
            self.unflushed = True
            os.ftruncate((f or self.f).fileno(), size)
        except OSError as e:
            raise hostio.HostIOError(f"cannot resize host file: {e}") from None

    def _fallocate(self, f: BinaryIO | None, mode: int, offset: int, n: int) -> int:
        """fallocate(2) through the monitor; 0 or the errno."""
        if hostio.active is not None:
            try:
                hostio.report(hostio.FALLOCATE, self._path(f), offset, n, mode=mode)
            except OSError as e:
                return e.errno or errno.EIO
        self.unflushed = True
        return fallocate((f or self.f).fileno(), mode, offset, n)

    # QEMU's file driver does more than read and write: it punches holes for discards and
    # zeroes ranges with fallocate. Holes are visible to qemu-img map (through SEEK_HOLE when
    # an image looks preallocated), so a writer makes the same calls.
    def punch_hole(self, offset: int, n: int, f: BinaryIO | None = None) -> None:
        """raw_co_pdiscard / handle_aiocb_discard: PUNCH_HOLE | KEEP_SIZE; errors ignored,
        as the discard is only advice."""
        if self.readonly or n <= 0:
            return
        self._fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)

    def write_zeroes_no_fallback(self, offset: int, n: int, f: BinaryIO | None = None) -> bool:
        """handle_aiocb_write_zeroes for a BDRV_REQ_NO_FALLBACK request: ZERO_RANGE, else
        PUNCH_HOLE + fallocate(0), else fallocate(0) past the end. False = -ENOTSUP."""
        if self.readonly:
            raise RequestError("image is opened read-only")
        ret = self._fallocate(f, FALLOC_FL_ZERO_RANGE, offset, n)
        if ret == 0:
            return True
        if ret not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise hostio.HostIOError(f"zeroing {n} bytes at {offset} failed: {os.strerror(ret)}")
        ret = self._fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, n)
        if ret == 0:
            return self._fallocate(f, 0, offset, n) == 0
        if offset >= self.file_size(f):
            return self._fallocate(f, 0, offset, n) == 0
        return False

    # Guest data lives in the external data file when there is one (qcow2.rst "External
    # data file"); its host offsets are guest offsets.
    def data_pread(self, offset: int, n: int) -> bytes:
        return self.pread(offset, n, self.data_f if self.has_data_file else None)

    def data_pwrite(self, offset: int, data: bytes) -> None:
        """A guest-data write: no barrier before it (see pwrite)."""
        self.write_raw(offset, data, self.data_f if self.has_data_file else None)

    # --- header ------------------------------------------------------------------------------
    def write_header(self) -> None:
        """Write the fixed header fields (not the extensions) back to offset 0: QEMU's
        writes of single header fields (qcow2_mark_dirty, the snapshot table, a grown L1 or
        refcount table, a resize), which leave the rest of the cluster alone."""
        self.pwrite(0, hd.Header.build(self.header))

    def update_header(self) -> None:
        """qcow2_update_header: the whole header cluster rebuilt from memory (extensions,
        backing file name, zeros; spec/header_update.py); nothing when it does not fit."""
        cluster = header_cluster(self.header_memory, self.header, self.cluster_size)
        if cluster is not None:
            self.pwrite(0, cluster)

    def set_incompatible_bit(self, bit: int, on: bool) -> None:
        """Set or clear one incompatible feature bit as QEMU does: qcow2_mark_dirty writes
        the field alone, qcow2_mark_clean, qcow2_mark_corrupt and qcow2_mark_consistent
        rewrite the header cluster (also on v2, which has no such bits: the corrupt flag
        lives in memory there, but qcow2_mark_corrupt still rewrites the cluster)."""
        if self.header.v3 is None:
            if bit == QCOW2_INCOMPAT_CORRUPT and on:
                self.update_header()
            return
        old = int(self.header.v3.incompatible_features)
        new = old | bit if on else old & ~bit
        if new != old:
            self.header.v3.incompatible_features = new
            if bit == QCOW2_INCOMPAT_DIRTY and on:
                self.write_header()
            else:
                self.update_header()
