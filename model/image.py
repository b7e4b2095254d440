"""The model's Image: guest reads and writes over one qcow2 file and its backing chain.

Every request is cut into per-cluster (or per-subcluster) primitives, and every primitive
looks its entry up afresh in the tables on disk. The semantics are QEMU 7.2's, decided by
the functions cited in each docstring; the case tables there are the model's statement of
what QEMU does.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

from model import backing as bk
from model import compress as cz
from model import mapping as mp
from model import mapping_report as mr
from model import overlap as ov
from model import refcounts as rc
from model.qfile import Qcow2File
from spec import features as ft
from spec.entries import (
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_SUB_ALLOC_RANGE,
    QCOW_OFLAG_SUB_ZERO_RANGE,
    QCOW_OFLAG_ZERO,
    ClusterType,
    SubclusterType,
    cluster_type,
    compressed_range,
    csize_shift,
    subcluster_type,
)
from spec.errors import CorruptionError, FormatError, Qcow2Error, RequestError, UnsupportedFeature
from spec.geometry import align_down, align_up
from spec.image import ImageFile, open_image
from spec.info import full_backing_filename, virtual_size
from spec.limits import QCOW2_MAX_BACKING_DEPTH
from spec.locking import ImageLock, Locking

BDRV_SECTOR_SIZE = 512
PERFORM_COW_MERGE_MAX = 16384
"""perform_cow (block/qcow2.c) reads both COW regions in one request when at most this
many bytes of new data lie between them."""

IMPL_OPTIONS = frozenset({"l2_cache_size", "l2_cache_entry_size", "refcount_cache_size",
                          "cache_clean_interval", "overlap_check", "cache"})
"""Options of the impl's open (DESIGN.md). The model has no caches: it accepts them so that
one call works for both packages, and ignores them, except ``cache="unsafe"``: as qemu-io's
``-t unsafe`` (BDRV_O_NO_FLUSH), flush then skips the fsync (block/io.c bdrv_co_flush)."""


def open(path: str | os.PathLike[str], *, readonly: bool = False,
         snapshot: str | None = None, **options: Any) -> Image:
    """Open a qcow2 image (block/qcow2.c, qcow2_do_open, and block.c for the backing chain).

    ``snapshot`` opens an internal snapshot's state, read-only (block/snapshot.c,
    bdrv_snapshot_load_tmp refuses a writable node).

    Locking (spec/locking.py): the image file (and its external data file, and every
    backing file, read-only) is locked on the descriptor the Image keeps, with the OFD lock
    bytes QEMU 7.2 uses, until close(): read-write as qemu-io takes them, read-only as
    qemu-io -r. ``force_share=True`` is -U (read-only only); ``locking="auto"|"on"|"off"``
    is file-posix's option. Two opens of one image in the same process are two openers
    and conflict like two QEMU processes; open the second with ``force_share=True``.

    Raises:
        RequestError: an unknown option; ``snapshot`` without ``readonly``; ``force_share``
            without ``readonly``; another process (or open) holds a conflicting lock; a corrupt image
            opened read-write (QEMU: "Image is corrupt; cannot be opened read/write");
            no snapshot of that name or id.
        FormatError: the file, or a file in its backing chain, is not a valid qcow2 image,
            or a backing file is missing; the chain is too deep.
        UnsupportedFeature: encryption; unknown incompatible feature bits; a backing format
            other than qcow2/raw.
        CorruptionError: inconsistency found while rebuilding a dirty image's refcounts.
    """
    options = dict(options)
    force_share = options.pop("force_share", False)
    locking = options.pop("locking", "auto")
    if not isinstance(force_share, bool):
        raise RequestError("force_share must be a bool")
    if locking not in ("auto", "on", "off"):
        raise RequestError("locking must be 'auto', 'on' or 'off'")
    if force_share and not readonly:
        # block.c bdrv_open_common: "force-share=on can only be used with read-only images".
        raise RequestError("force_share can only be used with read-only images")
    lock = LockOptions(force_share=force_share, locking=locking)
    return _open(str(path), readonly=readonly, snapshot=snapshot, depth=0, options=options, lock=lock)


@dataclass(frozen=True)
class LockOptions:
    """QEMU's image locking for one open (spec/locking.py; block/file-posix.c).

    ``force_share`` is qemu-io/qemu-img ``-U``: a read-only open that shares every
    permission with other processes. ``locking`` is file-posix's option: "auto" (default;
    silently unlocked where the file system has no OFD locks), "on", "off".
    """

    force_share: bool = False
    locking: Locking = "auto"


def _validate_options(options: dict[str, Any]) -> None:
    """Unknown names, and values QEMU would reject for the impl's options, are the caller's
    mistake (RequestError); valid ones are accepted and ignored (see IMPL_OPTIONS)."""
    bad = set(options) - IMPL_OPTIONS
    if bad:
        raise RequestError(f"unknown option(s): {', '.join(sorted(bad))}")
    for name in ("l2_cache_size", "l2_cache_entry_size", "refcount_cache_size", "cache_clean_interval"):
        v = options.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise RequestError(f"{name} must be a non-negative integer")
    if options.get("cache", "writeback") not in ("writeback", "none", "unsafe"):
        raise RequestError("cache must be 'writeback', 'none' or 'unsafe'")
    if options.get("overlap_check", "cached") not in ("none", "constant", "cached", "all"):
        raise RequestError("overlap_check must be one of none, constant, cached, all")


def _open(path: str, *, readonly: bool, snapshot: str | None, depth: int,
          options: dict[str, Any], lock: LockOptions) -> Image:
    _validate_options(options)
    if snapshot is not None and not readonly:
        raise RequestError("a snapshot can only be opened read-only")
    if depth > QCOW2_MAX_BACKING_DEPTH:
        raise FormatError("backing chain too deep (a loop?)", "backing_file")
    img = open_image(path)
    try:
        image = _open_image(img, path, readonly=readonly, snapshot=snapshot, depth=depth, lock=lock)
    except BaseException:
        img.close()
        raise
    image.no_flush = options.get("cache") == "unsafe"
    return image


def _open_image(img: ImageFile, path: str, *, readonly: bool, snapshot: str | None,
                depth: int, lock: LockOptions) -> Image:
    if img.header.crypt_method:
        # The model never touches ciphertext (DESIGN.md): encryption is declared unsupported.
        raise UnsupportedFeature("encryption")
    incompat = img.incompatible_features
    if incompat & ft.QCOW2_INCOMPAT_CORRUPT and not readonly:
        raise RequestError("image is corrupt; it can only be opened read-only")
    f: BinaryIO = img.f
    if not readonly:
        try:
            f = builtins.open(path, "r+b")  # noqa: SIM115 - owned by the Image
        except OSError as e:
            raise FormatError(f"cannot open for writing: {e.strerror}", path) from None
        img.f.close()
        img.f = f
    # QEMU locks the image before it reads or writes anything beyond the header probe
    # (raw_open_common, then raw_check_perm/raw_set_perm as the node gets its permissions).
    # The lock lives on the descriptor the Image keeps, so closing it releases the lock.
    locks = [ImageLock(f, locking=lock.locking, path=path)]
    locks[0].acquire(write=not readonly, force_share=lock.force_share)
    data_f = None
    if img.has_data_file:
        if img.data_file is None:
            raise FormatError("external data file flag set but no data file name", "extensions")
        # QEMU opens the data file by the name in the header as given, relative to the
        # current directory, not to the image (qcow2_do_open opens the "data-file" child
        # from that name); the model does the same.
        data_path = img.data_file
        try:
            data_f = builtins.open(data_path, "rb" if readonly else "r+b")  # noqa: SIM115
        except OSError as e:
            raise FormatError(f"could not open data file: {e.strerror}", data_path) from None
        try:
            data_lock = ImageLock(data_f, locking=lock.locking, path=data_path)
            data_lock.acquire(write=not readonly, force_share=lock.force_share, data_file=True)
        except Qcow2Error:
            data_f.close()
            raise
        locks.append(data_lock)
    q = Qcow2File(img, f, readonly=readonly, data_f=data_f)
    backing: bk.Layer | None = None
    if img.backing_file:
        bpath = full_backing_filename(path, img.backing_file)
        kind = bk.backing_kind(bpath, img.backing_format)
        if kind == "raw":
            raw_backing = bk.open_raw(bpath)
            raw_lock = ImageLock(raw_backing.f, locking=lock.locking, path=bpath)
            try:
                raw_lock.acquire(write=False, force_share=lock.force_share)
            except Qcow2Error:
                raw_backing.close()
                raise
            locks.append(raw_lock)
            backing = raw_backing
        else:
            # A backing file is opened read-only and locked as qemu-io -r locks it (-U
            # applies to the whole chain).
            backing = _open(bpath, readonly=True, snapshot=None, depth=depth + 1, options={},
                            lock=lock)
    image = Image(q, backing)
    image.locks = locks
    if snapshot is not None:
        from model import snapshots as sn
        sn.load_for_reading(image, snapshot)
    elif not readonly:
        image._open_read_write()
    return image


class Image:
    """An open qcow2 image (spec.interface.Image). See the module doc.

    Every public method raises only spec.errors classes. Common to all of them:
    RequestError for a closed image; CorruptionError after the image was found corrupt
    (QEMU drops the node: every later request fails).
    """

    def __init__(self, q: Qcow2File, backing: bk.Layer | None) -> None:
        self.q = q
        self.backing = backing
        self.filename = q.path
        data_name = q.image_file.data_file
        self.data_filename = data_name
        self.cluster_size = q.cluster_size
        self.size = virtual_size(int(q.header.size))
        self.readonly = q.readonly
        self.closed = False
        self.broken = False
        self.last_host_end = 0
        self.metadata_preallocation: bool | None = None
        """BDRVQcow2State.metadata_preallocation(_checked): whether this open image looks
        preallocated, decided at its first block-status query and kept for the life of the
        open, as QEMU does (see mapping_report.detect_metadata_preallocation); None until
        then. map() answers as a fresh ``qemu-img map`` process would, deciding anew."""
        self.snapshot_l1: tuple[int, int] | None = None
        """(l1_table_offset, l1_size) when open(snapshot=...) redirected reads."""
        self.locks: list[ImageLock] = []
        """QEMU's locks on the image file (and the data file); released by close()."""
        self.no_flush = False
        """``cache="unsafe"``: flush does not fsync (BDRV_O_NO_FLUSH)."""

    # --- plumbing -------------------------------------------------------------------------
    @property
    def packed_into_live_cluster(self) -> bool:
        """Whether a compressed write of this open reproduced QEMU 7.2's packing into a
        cluster that something else owns (refcounts.alloc_bytes): the image is damaged as
        QEMU's would be."""
        return self.q.packed_into_live_cluster

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _usable(self) -> None:
        if self.closed:
            raise RequestError("image is closed")
        if self.broken:
            raise CorruptionError("image was found corrupt; no further requests are served")

    def _writable(self) -> None:
        self._usable()
        if self.readonly:
            raise RequestError("image is opened read-only")

    def _range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise RequestError(f"request [{offset}, {offset + n}) outside the image (size {self.size})")

    def corrupt(self, message: str) -> CorruptionError:
        """Flag the image corrupt as qcow2_signal_corruption(fatal=true) does: set the
        corrupt bit when writable, and refuse every further request. Returns the error."""
        if not self.readonly and not self.broken:
            with contextlib.suppress(Qcow2Error):
                self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
        self.broken = True
        return CorruptionError(message)

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run a metadata operation; a CorruptionError from the tables flags the image.
        A compressed cluster that does not decode, here or in a backing file, fails the
        request with a plain CorruptionError and flags nothing (QEMU: -EIO from
        qcow2_co_preadv_compressed); see _UnflaggedError."""
        try:
            return fn(*args)
        except _UnflaggedError as e:
            raise CorruptionError(str(e)) from None
        except CorruptionError as e:
            if not self.broken:
                raise self.corrupt(str(e)) from None
            raise

    def _open_read_write(self) -> None:
        """What a read-write open changes (qcow2_do_open, qcow2_update_options):

        - unknown autoclear bits are cleared, and the bitmaps bit too: the model does not
          keep bitmaps up to date, so it declares them stale the way an old writer does
          (qcow2.rst "autoclear_features");
        - a dirty image (lazy refcounts left unclean) gets its refcounts rebuilt and the
          dirty bit cleared (qcow2_check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS).
        """
        h = self.q.header
        if h.v3 is None:
            return
        keep = ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW
        if h.v3.autoclear_features & ~keep:
            h.v3.autoclear_features &= keep
            self.q.write_header()
        if h.v3.incompatible_features & ft.QCOW2_INCOMPAT_DIRTY:
            from model import repair

            self._guard(repair.rebuild_refcounts, self.q)
            self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)

    def _mark_dirty(self) -> None:
        """With lazy refcounts QEMU sets the dirty bit before the first allocating write
        (qcow2_mark_dirty) and clears it on a clean close (qcow2_mark_clean). The model
        updates refcounts eagerly, so the file is always consistent; the bit is still set
        so that the header says what QEMU's would."""
        h = self.q.header
        if h.v3 is not None and h.v3.compatible_features & ft.QCOW2_COMPAT_LAZY_REFCOUNTS:
            self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, True)

    # --- reading ---------------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        """Guest bytes [offset, offset+n) (qcow2_co_preadv_part).

        ============================  ==============================================
        subcluster type               bytes read
        ============================  ==============================================
        UNALLOCATED_PLAIN / _ALLOC     backing file, zeros past its end or without one
                                       (qcow2_co_preadv_task: bdrv_co_preadv on backing)
        ZERO_PLAIN / ZERO_ALLOC        zeros, never the backing file
        NORMAL                         host cluster (data file when external)
        COMPRESSED                     the decompressed cluster (qcow2_co_preadv_compressed)
        INVALID                        CorruptionError, image flagged corrupt
                                       (qcow2_get_host_offset)
        ============================  ==============================================

        Raises RequestError (range, closed), CorruptionError.
        """
        self._usable()
        self._range(offset, n)
        return self._guard(self._read_internal, offset, n)

    def _read_internal(self, offset: int, n: int) -> bytes:
        """Read without the range check: COW reads reach past the guest end within the last
        cluster, as QEMU's do (perform_cow reads through the driver)."""
        out = bytearray()
        pos, end = offset, offset + n
        q = self.q
        cs, scs = q.cluster_size, q.geometry.subcluster_size
        while pos < end:
            # One lookup per cluster; then each subcluster is classified from that entry.
            entry, bitmap = mp.get_entry(q, pos, self.snapshot_l1)
            cluster_end = min(end, align_down(pos, cs) + cs)
            while pos < cluster_end:
                piece_end = min(cluster_end, align_down(pos, scs) + scs)
                out += self._read_subcluster(pos, piece_end - pos, entry, bitmap)
                pos = piece_end
        return bytes(out)

    def _read_subcluster(self, pos: int, n: int, entry: int, bitmap: int) -> bytes:
        q = self.q
        t = subcluster_type(entry, bitmap, q.geometry.subcluster_index(pos),
                            extended_l2=q.extended_l2, has_data_file=q.has_data_file)
        if t in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
            return self._backing_read(pos, n)
        if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
            return bytes(n)
        if t is SubclusterType.NORMAL:
            host = entry & L2E_OFFSET_MASK
            if host % q.cluster_size:
                raise CorruptionError(f"cluster allocation offset {host:#x} unaligned (guest {pos:#x})")
            return q.data_pread(host + q.geometry.offset_in_cluster(pos), n)
        if t is SubclusterType.COMPRESSED:
            cluster = self._decompress(entry)
            start = q.geometry.offset_in_cluster(pos)
            return cluster[start:start + n]
        raise CorruptionError(f"invalid cluster entry {entry:#x}/{bitmap:#x} (guest {pos:#x})")

    def _decompress(self, entry: int) -> bytes:
        q = self.q
        coff, csize = compressed_range(entry, q.cluster_bits)
        ctype = q.image_file.compression_type
        try:
            return cz.decompress(q.pread(coff, csize), ctype, q.cluster_size)
        except CorruptionError as e:
            # qcow2_co_preadv_compressed fails the request with -EIO but does not flag the
            # image; mark the error so _guard lets it through unflagged.
            raise _UnflaggedError(str(e)) from None

    def _backing_read(self, pos: int, n: int) -> bytes:
        if self.backing is None or pos >= self.backing.size:
            return bytes(n)
        inside = min(n, self.backing.size - pos)
        try:
            return self.backing.read(pos, inside) + bytes(n - inside)
        except CorruptionError as e:
            raise _UnflaggedError(str(e)) from None

    # --- writing ---------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes (qcow2_co_pwritev_part over qcow2_alloc_host_offset).

        The request is consumed in runs of host-contiguous clusters. Per cluster:

        ===================================  =============================================
        L2 entry                             action (block/qcow2-cluster.c)
        ===================================  =============================================
        NORMAL or ZERO_ALLOC with COPIED      written in place (handle_copied). Touched
                                              subclusters that were not NORMAL get the rest
                                              of their bytes copied from what they read as
                                              (calculate_l2_meta, keep_old); ZERO flag
                                              cleared, alloc bits set (link_l2).
        anything else (unallocated, zero      new cluster (handle_alloc: qcow2_alloc_clusters,
        plain, compressed, or shared with     or qcow2_alloc_clusters_at to stay contiguous).
        a snapshot: refcount > 1)             Naive COW: what the old cluster read as is
                                              merged with the data and written; the entry
                                              becomes offset|COPIED; the old cluster loses a
                                              reference (qcow2_alloc_cluster_link_l2).
        ===================================  =============================================

        With extended L2 entries only the COW range calculate_l2_meta picks is written and
        marked allocated. The COW regions are read as perform_cow reads them (one read
        across the new data when both exist and at most 16 KiB lie between, else each
        alone); when such a read fails (a compressed cluster that does not decode) the
        request fails and the fresh clusters are freed (qcow2_alloc_cluster_abort).
        Replaced clusters lose their reference once the whole request is linked, so no
        piece of a request reuses a cluster another piece gave up (qcow2_co_pwritev_part).
        Whether a COW region may be zeroed instead of copied is bdrv_co_is_zero_fast's
        answer (handle_alloc_space), not is_zero's.
        With an external data file, host offset = guest offset and no
        refcounts are used (do_alloc_cluster_offset).

        Raises RequestError (range, read-only, closed), CorruptionError.
        """
        self._writable()
        self._range(offset, len(data))
        if not data:
            return
        self._guard(self._write_internal, offset, bytes(data))

    def _write_internal(self, offset: int, data: bytes) -> None:
        self._mark_dirty()
        pos, end = offset, offset + len(data)
        # The clusters the request replaces lose their reference only when the whole request
        # is done. QEMU allocates every piece of a request (qcow2_alloc_host_offset in the
        # loop of qcow2_co_pwritev_part) before the write tasks, running concurrently,
        # link their L2 entries and free what they replace (qcow2_alloc_cluster_link_l2);
        # so a later piece never reuses a cluster an earlier piece gave up.
        frees: list[int] = []
        try:
            while pos < end:
                pos = self._write_run(pos, end, data, offset, frees=frees)
        finally:
            for old in frees:
                self._free_any_cluster(old, request=False)

    def _write_run(self, pos: int, end: int, data: bytes, base: int, *, prealloc: bool = False,
                   frees: list[int] | None = None) -> int:
        """One pass of qcow2_alloc_host_offset: as many clusters as are contiguous on the host.
        Returns the guest offset where the run stopped. ``prealloc`` allocates and links
        without writing (preallocate_co; link_l2 with m->prealloc leaves the bitmap alone).
        The old entries the run replaces are appended to ``frees`` for the caller to free;
        without it they are freed at the end of the run."""
        q, g = self.q, self.q.geometry
        cs = q.cluster_size
        expected: int | None = None
        own_frees = frees is None
        if frees is None:
            frees = []
        while pos < end:
            l2off = mp.l2_table_for_write(q, pos)
            table = mp.read_l2(q, l2off)
            idx = g.l2_index(pos)
            want = min(g.size_to_clusters(pos % cs + (end - pos)), g.l2_entries - idx)
            entry = table[idx][0]
            if not self._needs_new_alloc(entry):
                host = entry & L2E_OFFSET_MASK
                if host % cs:
                    raise CorruptionError(f"data cluster offset {host:#x} unaligned (guest {pos:#x})")
                if expected is not None and host != expected:
                    break
                n = self._count_clusters(table, idx, want, new_alloc=False)
                nbytes = min(end - pos, n * cs - pos % cs)
                self._write_clusters(pos, nbytes, host, data, base, keep_old=True, prealloc=prealloc)
            else:
                n = self._count_clusters(table, idx, want, new_alloc=True)
                if q.has_data_file:
                    host = align_down(pos, cs)
                elif expected is None:
                    host = rc.alloc_clusters(q, n)
                else:
                    n = rc.alloc_clusters_at(q, expected, n)
                    if n == 0:
                        break
                    host = expected
                nbytes = min(end - pos, n * cs - pos % cs)
                try:
                    frees += self._write_clusters(pos, nbytes, host, data, base, keep_old=False,
                                                  prealloc=prealloc)
                except _UnflaggedError:
                    # The COW read failed (-EIO): qcow2_alloc_cluster_abort gives the fresh
                    # clusters back, without a discard; nothing was linked.
                    if not q.has_data_file:
                        rc.free_clusters(q, host, n * cs)
                    raise
            expected = host + pos % cs + nbytes
            self.last_host_end = expected
            pos += nbytes
        if own_frees:
            for old in frees:
                self._free_any_cluster(old, request=False)
        return pos

    def _preallocate(self, offset: int, n: int, *, full: bool) -> None:
        """preallocate_co over [offset, offset+n): allocate and link every cluster, then make
        the host file (or data file) reach the last allocated byte."""
        q = self.q
        self.last_host_end = 0
        pos, end = offset, offset + n
        while pos < end:
            pos = self._write_run(pos, end, b"", pos, prealloc=True)
        target = q.data_f if q.has_data_file else None
        size = q.file_size(target)
        # QEMU's file (or data file) then ends with the last allocated subcluster, whole
        # (observed with 7.2 for extended L2 entries and without; without them a subcluster
        # is the cluster).
        self.last_host_end = align_up(self.last_host_end, q.geometry.subcluster_size)
        if self.last_host_end > size:
            if full:
                chunk = 1 << 20
                for at in range(size, self.last_host_end, chunk):
                    q.pwrite(at, bytes(min(chunk, self.last_host_end - at)), target)
            else:
                q.truncate(self.last_host_end, target)

    def _needs_new_alloc(self, entry: int) -> bool:
        """cluster_needs_new_alloc: only NORMAL or ZERO_ALLOC clusters with COPIED (refcount
        exactly 1) can be written in place."""
        q = self.q
        t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
        if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            return not entry & QCOW_OFLAG_COPIED
        return True

    def _count_clusters(self, table: mp.L2Table, idx: int, want: int, *, new_alloc: bool) -> int:
        """count_single_write_clusters: consecutive clusters of the same kind; in-place ones
        must also be contiguous on the host."""
        expected = table[idx][0] & L2E_OFFSET_MASK
        i = 0
        while i < want:
            entry = table[idx + i][0]
            if self._needs_new_alloc(entry) != new_alloc:
                break
            if not new_alloc:
                if entry & L2E_OFFSET_MASK != expected:
                    break
                expected += self.cluster_size
            i += 1
        return i

    def _write_clusters(self, pos: int, nbytes: int, host: int, data: bytes, base: int,
                        *, keep_old: bool, prealloc: bool = False) -> list[int]:
        """Write [pos, pos+nbytes) to the clusters starting at host cluster ``host`` and link
        them (calculate_l2_meta, perform_cow, qcow2_alloc_cluster_link_l2). Returns the old
        entries that lose a reference."""
        q, g = self.q, self.q.geometry
        cs, scs = q.cluster_size, g.subcluster_size
        first = align_down(pos, cs)
        l2off = mp.l2_table_for_write(q, pos)
        table = mp.read_l2(q, l2off)
        idx = g.l2_index(pos)
        n = g.size_to_clusters(pos - first + nbytes)
        cow_start_to = pos - first
        cow_end_from = cow_start_to + nbytes
        piece = data[pos - base:pos - base + nbytes]

        def sctype(i: int, at: int) -> SubclusterType:
            e, b = table[idx + i]
            return subcluster_type(e, b, g.subcluster_index(at), extended_l2=q.extended_l2,
                                   has_data_file=q.has_data_file)

        for i in range(n):
            e, b = table[idx + i]
            w_from = max(cow_start_to, i * cs)
            w_to = min(cow_end_from, (i + 1) * cs)
            for sc in range(w_from // scs, (w_to - 1) // scs + 1):
                if sctype(i, sc * scs) is SubclusterType.INVALID:
                    raise CorruptionError(f"invalid cluster entry {e:#x}/{b:#x}")
        if keep_old and all(
            sctype(i, sc * scs) is SubclusterType.NORMAL
            for i in range(n)
            for sc in range(max(cow_start_to, i * cs) // scs,
                            (min(cow_end_from, (i + 1) * cs) - 1) // scs + 1)
        ):
            if prealloc:
                # calculate_l2_meta (skip_cow): nothing to link. Anything else kept in
                # place, a ZERO_ALLOC cluster say, is linked below like a write would
                # link it, and so turns into data (preallocate_co over a zeroed cluster).
                return []
            # Every touched subcluster is already allocated: a plain overwrite, no metadata.
            ov.check_data_write(q, host + cow_start_to, len(piece))
            q.data_pwrite(host + cow_start_to, piece)
            return []

        # Where the COW starts in the first cluster and ends in the last (calculate_l2_meta).
        t_first = sctype(0, pos)
        b0 = table[idx][1]
        if keep_old:
            cow_start_from = (cow_start_to if t_first is SubclusterType.NORMAL
                              else align_down(cow_start_to, scs))
        elif t_first is SubclusterType.COMPRESSED:
            cow_start_from = 0
        elif t_first in (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC):
            alloc = b0 & QCOW_L2_BITMAP_ALL_ALLOC
            first_alloc = (alloc & -alloc).bit_length() - 1 if alloc else 32
            cow_start_from = min(cow_start_to // scs, first_alloc) * scs if q.extended_l2 else 0
        else:
            cow_start_from = align_down(cow_start_to, scs)
        last_pos = pos + nbytes - 1
        t_last = sctype(n - 1, last_pos)
        _, bl = table[idx + n - 1]
        sc_last = g.subcluster_index(last_pos)
        if keep_old:
            cow_end_to = cow_end_from if t_last is SubclusterType.NORMAL else align_up(cow_end_from, scs)
        elif t_last is SubclusterType.COMPRESSED:
            cow_end_to = align_up(cow_end_from, cs)
        elif t_last in (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC):
            cow_end_to = align_up(cow_end_from, cs)
            if q.extended_l2:
                alloc = bl & QCOW_L2_BITMAP_ALL_ALLOC
                clz = 32 - alloc.bit_length()
                cow_end_to -= min(g.subclusters_per_cluster - sc_last - 1, clz) * scs
        else:
            cow_end_to = align_up(cow_end_from, scs)

        if not prealloc:
            ov.check_data_write(q, host + cow_start_from, cow_end_to - cow_start_from)
            has_cow = cow_start_from < cow_start_to or cow_end_from < cow_end_to
            target = q.data_f if q.has_data_file else None
            if (has_cow and self._is_zero_fast(first + cow_start_from, cow_start_to - cow_start_from)
                    and self._is_zero_fast(first + cow_end_from, cow_end_to - cow_end_from)
                    and q.write_zeroes_no_fallback(host + cow_start_from, cow_end_to - cow_start_from,
                                                   target)):
                # handle_alloc_space: the COW regions read as zeros, so the whole range is
                # zeroed on the host with fallocate and only the new data is written.
                q.data_pwrite(host + cow_start_to, piece)
            else:
                # Naive COW: what the COW regions read as now, with the new data laid over
                # them, written in one go. Which guest bytes are read is QEMU's choice
                # (perform_cow): nothing without COW regions; the whole range, middle
                # included, when both regions exist and at most 16 KiB lie between them;
                # else each region alone. It matters where reading fails (a compressed
                # cluster that does not decode): a cluster that is overwritten whole is
                # read only in the first case.
                head, tail = cow_start_to - cow_start_from, cow_end_to - cow_end_from
                merged = bytearray(cow_end_to - cow_start_from)
                if head and tail and cow_end_from - cow_start_to <= PERFORM_COW_MERGE_MAX:
                    merged[:] = self._read_internal(first + cow_start_from, len(merged))
                else:
                    if head:
                        merged[:head] = self._read_internal(first + cow_start_from, head)
                    if tail:
                        merged[len(merged) - tail:] = self._read_internal(first + cow_end_from, tail)
                merged[head:head + nbytes] = piece
                q.data_pwrite(host + cow_start_from, bytes(merged))

        # Link the clusters (qcow2_alloc_cluster_link_l2).
        olds: list[int] = []
        table = mp.read_l2(q, l2off)
        for i in range(n):
            old_e, old_b = table[idx + i]
            if not keep_old and old_e:
                olds.append(old_e)
            new_b = old_b if prealloc else 0
            if q.extended_l2 and not prealloc:
                w_from = max(cow_start_from, i * cs) - i * cs
                w_to = min(cow_end_to, (i + 1) * cs) - i * cs
                lo, hi = w_from // scs, (w_to - 1) // scs + 1
                new_b = (old_b | QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi)) & ~QCOW_OFLAG_SUB_ZERO_RANGE(lo, hi)
            table[idx + i] = ((host + i * cs) | QCOW_OFLAG_COPIED, new_b)
        mp.write_l2(q, l2off, table)
        return olds

    def _free_any_cluster(self, entry: int, *, request: bool) -> None:
        """qcow2_free_any_cluster: drop the reference an L2 entry held.

        NORMAL/ZERO_ALLOC: the cluster; COMPRESSED: every cluster its sectors touch;
        ZERO_PLAIN/UNALLOCATED: nothing. ``request`` (QCOW2_DISCARD_REQUEST, passed through
        by default) punches freed clusters out of the host file. With an external data file
        no refcounts exist; a discard request punches the cluster out of the data file.
        """
        q = self.q
        t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
        if q.has_data_file:
            if request and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                q.punch_hole(entry & L2E_OFFSET_MASK, q.cluster_size, q.data_f)
            return
        if t is ClusterType.COMPRESSED:
            coff, csize = compressed_range(entry, q.cluster_bits)
            rc.free_clusters(q, coff, csize, discard=request)
        elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            off = entry & L2E_OFFSET_MASK
            if off % q.cluster_size:
                # QEMU reports it (non-fatal corruption) and frees nothing.
                return
            rc.free_clusters(q, off, q.cluster_size, discard=request)

    # --- zeroes and discard -----------------------------------------------------------------
    def write_zeroes(self, offset: int, n: int, *, unmap: bool = False) -> None:
        """Make [offset, offset+n) read as zeros (bdrv_co_do_pwrite_zeroes, then
        qcow2_co_pwrite_zeroes and qcow2_subcluster_zeroize).

        The block layer cuts the request at subcluster boundaries (pwrite_zeroes_alignment);
        each piece goes to the driver, and a piece the driver refuses (-ENOTSUP) is written
        as an ordinary write of zero bytes, which allocates.

        ===========================================  ========================================
        piece                                        result
        ===========================================  ========================================
        partial subcluster whose rest does not       refused -> written as data
        already read as zero (is_zero; zeros past    (qcow2_co_pwrite_zeroes)
        a shorter backing file's end count), or
        whose subcluster is NORMAL/COMPRESSED
        v2, no backing file                          clusters discarded: entries become 0
                                                     (qcow2_subcluster_zeroize ->
                                                     qcow2_cluster_discard)
        v2 with a backing file                       refused -> written as data
        v3, whole cluster (zero_in_l2_slice)         ZERO flag / all-zero bitmap; the host
                                                     cluster is freed if it is compressed, or
                                                     if ``unmap`` and it is allocated;
                                                     otherwise kept (ZERO_ALLOC)
        v3, subclusters of one cluster               zero bits set, alloc bits cleared
        (zero_l2_subclusters)                        (compressed cluster: refused -> data)
        ===========================================  ========================================

        A range that ends at the end of the image counts as aligned there. With a raw
        external data file the data file is zeroed too.

        Raises RequestError (range, read-only, closed), CorruptionError.
        """
        self._writable()
        self._range(offset, n)
        if n:
            self._guard(self._write_zeroes_internal, offset, n, unmap)

    def _write_zeroes_internal(self, offset: int, n: int, unmap: bool) -> None:
        self._mark_dirty()
        align = self.q.geometry.subcluster_size
        for start, length in _split_aligned(offset, n, align):
            if not self._driver_pwrite_zeroes(start, length, unmap):
                self._write_internal(start, bytes(length))

    def _driver_pwrite_zeroes(self, offset: int, n: int, unmap: bool) -> bool:
        """qcow2_co_pwrite_zeroes for one piece; False means -ENOTSUP."""
        q, g = self.q, self.q.geometry
        scs = g.subcluster_size
        end = offset + n
        head = offset % scs
        tail = align_up(end, scs) - end
        if end == self.size:
            tail = 0
        if head or tail:
            if not (self._is_zero(offset - head, head) and self._is_zero(end, tail)):
                return False
            offset -= head
            n = scs
            entry, bitmap = mp.get_entry(q, offset)
            t = subcluster_type(entry, bitmap, g.subcluster_index(offset), extended_l2=q.extended_l2,
                                has_data_file=q.has_data_file)
            if t not in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC,
                         SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
                return False
        return self._zeroize(offset, n, unmap)

    def _is_zero(self, offset: int, n: int) -> bool:
        """is_zero (block/qcow2.c): every block-status answer over the range, through the
        chain, says ZERO. QEMU asks in a loop because the chain's answer does not merge
        zeros of different kinds (an unallocated hole of the backing file, then zeros past
        a short backing file's end): one answer may stop short of the range."""
        n = min(n, self.size - offset)
        while n > 0:
            flags, pnum = mr.status_above(self, offset, n)
            if not flags & bk.BDRV_BLOCK_ZERO or pnum <= 0:
                return False
            offset += pnum
            n -= pnum
        return True

    def _is_zero_fast(self, offset: int, n: int) -> bool:
        """bdrv_co_is_zero_fast, as handle_alloc_space asks it about COW regions
        (is_zero_cow): ONE block-status answer of the chain (want_zero off) must cover the
        range and say ZERO. Unlike is_zero there is no clamp to the image end, so a COW
        region past the end (the last cluster of an unaligned image) is not zero and is
        copied; and a raw backing file answers DATA, holes included."""
        if n <= 0:
            return True
        flags, pnum = mr.status_above(self, offset, n, want_zero=False)
        return pnum == n and bool(flags & bk.BDRV_BLOCK_ZERO)

    def _zeroize(self, offset: int, n: int, unmap: bool) -> bool:
        """qcow2_subcluster_zeroize. False means -ENOTSUP."""
        q, g = self.q, self.q.geometry
        cs = q.cluster_size
        end = offset + n
        if q.data_file_raw:
            self._zero_data_file(offset, n)
        if q.version < 3:
            if self.backing is None:
                self._cluster_discard(offset, n, request=True, full=False)
                return True
            return False
        head = min(end, align_up(offset, cs)) - offset
        offset += head
        tail = 0 if end >= self.size else end - max(offset, align_down(end, cs))
        end -= tail
        if head and not self._zero_subclusters(offset - head, head):
            return False
        pos = offset
        while pos < end:
            l2off = mp.l2_table_for_write(q, pos)
            table = mp.read_l2(q, l2off)
            idx = g.l2_index(pos)
            while pos < end and (idx < g.l2_entries):
                old_e, old_b = table[idx]
                t = cluster_type(old_e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
                allocated = t in (ClusterType.NORMAL, ClusterType.COMPRESSED, ClusterType.ZERO_ALLOC)
                do_unmap = t is ClusterType.COMPRESSED or (unmap and allocated)
                new_e = 0 if do_unmap else old_e
                new_b = old_b
                if q.extended_l2:
                    new_b = QCOW_L2_BITMAP_ALL_ZEROES
                else:
                    new_e |= QCOW_OFLAG_ZERO
                if (new_e, new_b) != (old_e, old_b):
                    table[idx] = (new_e, new_b)
                    mp.write_l2(q, l2off, table)
                    if do_unmap:
                        self._free_any_cluster(old_e, request=True)
                    table = mp.read_l2(q, l2off)
                idx += 1
                pos += cs
        return not (tail and not self._zero_subclusters(end, tail))

    def _zero_subclusters(self, offset: int, n: int) -> bool:
        """zero_l2_subclusters: within one cluster, mark subclusters zero."""
        q, g = self.q, self.q.geometry
        l2off = mp.l2_table_for_write(q, offset)
        table = mp.read_l2(q, l2off)
        idx = g.l2_index(offset)
        e, b = table[idx]
        if cluster_type(e, extended_l2=True, has_data_file=q.has_data_file) is ClusterType.COMPRESSED:
            return False
        sc = g.subcluster_index(offset)
        nsc = -(-n // g.subcluster_size)
        nb = (b | QCOW_OFLAG_SUB_ZERO_RANGE(sc, sc + nsc)) & ~QCOW_OFLAG_SUB_ALLOC_RANGE(sc, sc + nsc)
        if nb != b:
            table[idx] = (e, nb)
            mp.write_l2(q, l2off, table)
        return True

    def _zero_data_file(self, offset: int, n: int) -> None:
        size = self.q.file_size(self.q.data_f)
        if offset < size:
            self.q.data_pwrite(offset, bytes(min(n, size - offset)))

    def discard(self, offset: int, n: int) -> None:
        """Discard [offset, offset+n) (bdrv_co_pdiscard, qcow2_co_pdiscard,
        qcow2_cluster_discard / discard_in_l2_slice).

        A v2 image with a backing file ignores discards entirely (qcow2_co_pdiscard: it
        cannot mark clusters zero). The block layer cuts the request at cluster boundaries
        (pdiscard_alignment); the driver ignores (-ENOTSUP, and the block layer then reports
        success) every partial cluster except a last one that ends at the end of the image.
        Whole clusters:

        ===================================  ==========================================
        cluster, image                       new entry (discard_in_l2_slice)
        ===================================  ==========================================
        allocated (NORMAL, ZERO_ALLOC,       v3: ZERO flag (extended L2: entry 0, bitmap
        COMPRESSED), or any cluster when     all-zero) -- reads as zeros, hides backing;
        there is a backing file              v2: 0 (unallocated)
        unallocated or zero-plain, no        unchanged (already reads as zeros)
        backing file
        ===================================  ==========================================

        The old host cluster loses its reference (qcow2_free_any_cluster). As in QEMU,
        the L2 table is allocated (or unshared) first even where nothing changes
        (get_cluster_table).

        Raises RequestError (range, read-only, closed), CorruptionError.
        """
        self._writable()
        self._range(offset, n)
        if n:
            self._guard(self._discard_internal, offset, n)

    def _discard_internal(self, offset: int, n: int) -> None:
        cs = self.cluster_size
        if self.q.version < 3 and self.backing is not None:
            # qcow2_co_pdiscard: without the zero flag a discarded cluster would expose the
            # backing file, so v2 images with a backing file ignore discards.
            return
        for start, length in _split_aligned(offset, n, cs):
            if (start % cs or length % cs) and (start % cs or start + length != self.size):
                continue
            self._mark_dirty()
            self._cluster_discard(start, length, request=True, full=False)

    def _cluster_discard(self, offset: int, n: int, *, request: bool, full: bool) -> None:
        """qcow2_cluster_discard over whole clusters (the last may end at the image end)."""
        q, g = self.q, self.q.geometry
        cs = q.cluster_size
        pos, end = offset, offset + n
        while pos < end:
            l2off = mp.l2_table_for_write(q, pos)
            table = mp.read_l2(q, l2off)
            idx = g.l2_index(pos)
            while pos < end and idx < g.l2_entries:
                old_e, old_b = table[idx]
                t = cluster_type(old_e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
                new_e, new_b = old_e, old_b
                if full:
                    new_e = new_b = 0
                elif self.backing is not None or t in (ClusterType.NORMAL, ClusterType.COMPRESSED,
                                                       ClusterType.ZERO_ALLOC):
                    if q.extended_l2:
                        new_e, new_b = 0, QCOW_L2_BITMAP_ALL_ZEROES
                    else:
                        new_e, new_b = (QCOW_OFLAG_ZERO if q.version >= 3 else 0), 0
                if (new_e, new_b) != (old_e, old_b):
                    table[idx] = (new_e, new_b)
                    mp.write_l2(q, l2off, table)
                    self._free_any_cluster(old_e, request=request)
                    table = mp.read_l2(q, l2off)
                idx += 1
                pos += cs

    # --- compressed writes ------------------------------------------------------------------
    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one cluster compressed (qcow2_co_pwritev_compressed_part/_task,
        qcow2_alloc_compressed_cluster_offset, qcow2_alloc_bytes).

        ``data`` is one whole cluster at a cluster-aligned offset (the last cluster may be
        short when it ends at the end of the image; it is zero-padded). If compression does
        not save at least one byte the cluster is written normally, as QEMU does. The
        compressed bytes are packed after the previous compressed cluster, possibly running
        into the next host cluster.

        The checks, in QEMU's order:

        ==================================  ===============================================
        request                             outcome
        ==================================  ===============================================
        offset or length not a multiple     RequestError (qemu-io-cmds.c write_f refuses
        of 512                              ``write -c`` that is not sector-aligned)
        outside the image                   RequestError (blk_check_byte_request)
        external data file                  UnsupportedFeature (qcow2_co_pwritev_compressed
                                            _part, before any other check)
        empty (``data`` is b"")             success; the host file's length is rounded up
                                            to a multiple of 512 (same function: the empty
                                            write ends a compressed stream, qemu-img
                                            convert -c)
        not one cluster, cluster-aligned    RequestError (-EINVAL)
        ==================================  ===============================================

        Raises RequestError (alignment, size, range, read-only, closed, or the cluster is
        already allocated: QEMU fails that with -EIO), UnsupportedFeature (external data
        file: QEMU refuses compression there), CorruptionError.
        """
        self._writable()
        if offset % BDRV_SECTOR_SIZE or len(data) % BDRV_SECTOR_SIZE:
            raise RequestError("compressed writes must be sector aligned (qemu-io write -c)")
        self._range(offset, len(data))
        cs = self.cluster_size
        # qcow2_co_pwritev_compressed_part refuses an external data file (-ENOTSUP) before
        # it looks at the alignment (-EINVAL), so that check comes first here too.
        if self.q.has_data_file:
            raise UnsupportedFeature("compressed writes with an external data file")
        if not data:
            # The driver takes an empty compressed write as "the stream is complete" and
            # truncates the file to its own length as the block layer sees it, in whole
            # sectors (bdrv_getlength): a file ending mid-sector after packed compressed
            # data is padded with zeros. Nothing else changes (not even the dirty bit).
            size = self.q.file_size()
            if size % BDRV_SECTOR_SIZE:
                self._guard(self.q.truncate, align_up(size, BDRV_SECTOR_SIZE))
            return
        if offset % cs:
            raise RequestError("compressed writes must be cluster aligned")
        if len(data) != cs and not (0 < len(data) < cs and offset + len(data) == self.size):
            raise RequestError("compressed writes must cover exactly one cluster")
        self._guard(self._write_compressed_internal, offset, bytes(data) + bytes(cs - len(data)))

    def _write_compressed_internal(self, offset: int, data: bytes) -> None:
        q = self.q
        self._mark_dirty()
        out = cz.compress(data, q.image_file.compression_type, q.cluster_size - 1)
        if out is None:
            self._write_internal(offset, data[:min(len(data), self.size - offset)])
            return
        l2off = mp.l2_table_for_write(q, offset)
        table = mp.read_l2(q, l2off)
        idx = q.geometry.l2_index(offset)
        if table[idx][0] & L2E_OFFSET_MASK:
            raise RequestError("compressed writes need an unallocated cluster (QEMU: -EIO)")
        host = rc.alloc_bytes(q, len(out))
        ov.check_data_write(q, host, len(out))
        nb_additional = ((host + len(out) - 1) >> 9) - (host >> 9)
        entry = QCOW_OFLAG_COMPRESSED | (nb_additional << csize_shift(q.cluster_bits)) | host
        table = mp.read_l2(q, l2off)
        table[idx] = (entry, 0)
        mp.write_l2(q, l2off, table)
        q.pwrite(host, out)

    # --- flush / close -----------------------------------------------------------------------
    def flush(self) -> None:
        """Every update is already in the file (no caches); flush makes it durable, unless
        the image was opened with ``cache="unsafe"``.

        Raises RequestError (closed), CorruptionError (host I/O error)."""
        self._usable()
        if not self.readonly and not self.no_flush:
            try:
                os.fsync(self.q.f.fileno())
            except OSError as e:
                raise CorruptionError(f"fsync failed: {e}") from None

    def close(self) -> None:
        """Close the image, its data file and its backing chain. On a writable image the
        dirty bit is cleared (qcow2_close -> qcow2_mark_clean). Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.readonly and not self.broken:
                self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)
                # bdrv_close flushes: after fdatasync the file's holes are stable, so that
                # SEEK_HOLE (and qemu-img map, see mapping_report) sees what QEMU's would.
                for f in (self.q.f, self.q.data_f):
                    if f is not None:
                        os.fdatasync(f.fileno())
        except OSError as e:
            raise CorruptionError(f"flush at close failed: {e}") from None
        finally:
            for lock in self.locks:
                lock.release()
            self.q.f.close()
            if self.q.data_f is not None:
                self.q.data_f.close()
            if self.backing is not None:
                self.backing.close()

    # --- the rest of the interface ------------------------------------------------------------
    def map(self, offset: int = 0, n: int | None = None) -> list[dict[str, Any]]:
        """Extents of [offset, offset+n) as ``qemu-img map --output=json`` lists them.
        See model/mapping_report.py. Raises RequestError (range, closed), CorruptionError."""
        self._usable()
        n = self.size - offset if n is None else n
        self._range(offset, n)
        return self._guard(mr.image_map, self, offset, n)

    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> bk.Status:
        """This image's own block status at ``offset`` (qcow2_co_block_status plus the
        generic part of bdrv_co_block_status). See model/mapping_report.py."""
        return mr.qcow2_layer_status(self, offset, n, want_zero)

    def info(self) -> dict[str, Any]:
        """``qemu-img info --output=json`` of the file as it is now (spec.info.qcow2_info).
        Raises RequestError (closed), FormatError."""
        from spec.info import allocated_size, qcow2_info

        self._usable()
        img = open_image(self.filename)
        try:
            return qcow2_info(img, self.filename, allocated_size(os.stat(self.filename)))
        finally:
            img.close()

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Change the virtual size (qcow2_co_truncate). See model/resize.py.
        Raises RequestError (size, shrink without ``shrink``, snapshots, read-only, closed),
        CorruptionError."""
        from model import resize as rs

        self._writable()
        self._guard(rs.resize, self, new_size, shrink)

    def snapshot_create(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_create)."""
        from model import snapshots as sn

        self._writable()
        self._guard(sn.create, self, name)

    def snapshot_apply(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_goto)."""
        from model import snapshots as sn

        self._writable()
        self._guard(sn.apply, self, name)

    def snapshot_delete(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_delete)."""
        from model import snapshots as sn

        self._writable()
        self._guard(sn.delete, self, name)

    def snapshots(self) -> list[dict[str, Any]]:
        """See model/snapshots.py (qcow2_snapshot_list)."""
        from model import snapshots as sn

        self._usable()
        return sn.listing(self)


class _UnflaggedError(CorruptionError):
    """Fails the request and flags nothing: a compressed cluster that does not decode
    (qcow2_co_preadv_compressed returns -EIO), or a failed read of a backing file (QEMU
    flags the backing node, if anything, not this one). Public methods raise it as a plain
    CorruptionError (Image._guard)."""


def _split_aligned(offset: int, n: int, align: int) -> list[tuple[int, int]]:
    """How the block layer cuts a request for a driver with an alignment
    (block/io.c bdrv_co_do_pwrite_zeroes, bdrv_co_pdiscard): an unaligned head up to the
    first boundary, the aligned middle, an unaligned tail."""
    out: list[tuple[int, int]] = []
    end = offset + n
    pos = offset
    if pos % align:
        head_end = min(end, align_up(pos, align))
        out.append((pos, head_end - pos))
        pos = head_end
    mid_end = align_down(end, align)
    if mid_end > pos:
        out.append((pos, mid_end - pos))
        pos = mid_end
    if pos < end:
        out.append((pos, end - pos))
    return out
