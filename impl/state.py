"""What one open image keeps in memory (QEMU's BDRVQcow2State, block/qcow2.h): the header,
the whole L1 table and refcount table (QEMU keeps both in memory), the two metadata caches,
the allocator cursors, and the plain values every request asks for.

The header is written back whole (its fixed fields, not the extensions) when a field
changes that QEMU rewrites with qcow2_update_header; the L1 table and the refcount table are
written entry-wise where QEMU writes entries (qcow2_write_l1_entry).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import construct as c

from impl.cache import Qcow2Cache
from impl.hostfile import HostFile
from spec import features as ft
from spec import header as hd
from spec.encryption import Qcow2Crypto
from spec.geometry import Geometry
from spec.header_update import HeaderMemory, header_cluster
from spec.image import validate_table
from spec.limits import QCOW_MAX_L1_SIZE

L1_ENTRIES_PER_SECTOR = 512 // 8
"""qcow2_write_l1_entry writes the aligned 512-byte sector holding the changed entry."""

# Offsets of the header fields QEMU rewrites on their own with bdrv_pwrite_sync when a table
# moves (qcow2.rst "Header"; block/qcow2.h QCowHeader).
HEADER_SIZE = 24
"""size (u64): qcow2_co_truncate."""
HEADER_L1_FIELDS = 36
"""l1_size (u32), l1_table_offset (u64): qcow2_grow_l1_table."""
HEADER_REFTABLE_FIELDS = 48
"""refcount_table_offset (u64), refcount_table_clusters (u32): qcow2_refcount_area."""
HEADER_SNAPSHOT_FIELDS = 60
"""nb_snapshots (u32), snapshots_offset (u64): qcow2_write_snapshots."""


class ImageView(Protocol):
    """The open image as the request code (cluster, status, resize, snapshot) sees it;
    image.Image implements it. Kept here so that those modules need not import image."""

    s: State
    size: int
    backing: Any
    filename: str
    data_filename: str | None
    snapshot_l1: list[int] | None
    metadata_preallocation: bool | None
    last_host_end: int

    def read_internal(self, offset: int, n: int) -> bytes: ...
    def read_below(self, offset: int, n: int) -> bytes: ...
    def is_zero_fast_below(self, offset: int, n: int) -> bool: ...
    def is_zero(self, offset: int, n: int) -> bool: ...
    def is_zero_fast(self, offset: int, n: int) -> bool: ...
    def mark_dirty(self) -> None: ...
    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> Any: ...


class NoOverlapCheck:
    """overlap-check=none, and the checker used while creating an image."""

    stale = False

    def check(self, offset: int, n: int) -> None:
        return None

    def check_metadata(self, offset: int, n: int, ignore: int) -> None:
        return None

    def check_l1_write(self, offset: int, n: int) -> None:
        return None


class State:
    """See the module doc. Built by image.py; used by refcount.py and cluster.py."""

    def __init__(self, host: HostFile, header: c.Container, geometry: Geometry, *,
                 data: HostFile | None, compression_type: ft.CompressionType) -> None:
        self.host = host
        self.data = data
        """The external data file (guest data goes there), or None."""
        self.header = header
        self.header_memory: HeaderMemory | None = None
        """What QEMU keeps of the header cluster to rewrite it (spec/header_update.py); set
        by image.py at open (None while an image is created)."""
        self.geometry = geometry
        self.cluster_size = geometry.cluster_size
        self.cluster_bits = geometry.cluster_bits
        self.version = int(header.version)
        self.extended_l2 = geometry.extended_l2
        incompat = int(header.v3.incompatible_features) if header.v3 is not None else 0
        autoclear = int(header.v3.autoclear_features) if header.v3 is not None else 0
        self.has_data_file = bool(incompat & ft.QCOW2_INCOMPAT_DATA_FILE)
        self.data_file_raw = self.has_data_file and bool(autoclear & ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
        self.compression_type = compression_type
        self.refcount_max = (1 << geometry.refcount_bits) - 1
        self.readonly = host.readonly
        self.sync = True
        """False with cache=unsafe: flushes never reach the disk (BDRV_O_NO_FLUSH)."""
        self.lazy_refcounts = False
        self.crypto: Qcow2Crypto | None = None
        """The payload cipher of an encrypted image (impl/crypt.py), set by image.py."""
        self.l1_table: list[int] = []
        self.reftable: list[int] = []
        self.free_cluster_index = 0
        self.signalled: str | None = None
        """A corruption signalled inside a step whose failure QEMU ignores (a refcount block
        for a free would land on the header, impl/refcount.py): the image flags itself when
        the request ends (qcow2_signal_corruption drops the node; the free only logs)."""
        self.free_byte_offset = 0
        self.packing_cluster_freed = False
        self.packed_into_live_cluster = False
        self.freed_unsynced: set[int] = set()
        """Indices of clusters freed since the L2 updates that unmapped them were last made
        durable. QEMU moves free_cluster_index back at once and may write new data into
        such a cluster while the old L2 entry is still the one on disk; impl makes the same
        allocation (so the file comes out the same) but first writes the L2 cache back and
        flushes (``settle_freed``)."""
        self.discards: list[list[int]] = []
        """Freed host ranges [offset, length] waiting to be punched (s->discards)."""
        self.cache_discards = False
        """Hold the discards until the caller's operation ends (s->cache_discards)."""
        # Set by image.py once the caches exist.
        self.l2_cache: Qcow2Cache = None  # type: ignore[assignment]
        self.rc_cache: Qcow2Cache = None  # type: ignore[assignment]
        self.overlap: Any = NoOverlapCheck()
        """cluster.OverlapChecker, set by image.py."""
        self.slice_entries = geometry.l2_entries
        """Entries per L2 cache entry (QEMU's l2_slice_size); see set_slice_size."""
        # Precomputed for the lookup on every request (cluster.l2_slice): the shift from a
        # guest offset to its L1 index, and the mask of the L2 index.
        self.l1_shift = geometry.cluster_bits + geometry.l2_bits
        self.l2_mask = geometry.l2_entries - 1
        self.set_slice_size(geometry.cluster_size)

    def set_slice_size(self, entry_size: int) -> None:
        """The L2 cache's entry size (a power of two): entries per slice and the shifts and
        mask that find a guest cluster's slice and word without a division."""
        self.slice_entries = entry_size // self.geometry.l2_entry_size
        self.slice_shift = self.slice_entries.bit_length() - 1
        self.slice_mask = self.slice_entries - 1
        self.entry_shift = entry_size.bit_length() - 1

    # --- plain values ---------------------------------------------------------------------
    @property
    def l1_table_offset(self) -> int:
        return int(self.header.l1_table_offset)

    @property
    def l1_size(self) -> int:
        return int(self.header.l1_size)

    @property
    def refcount_table_offset(self) -> int:
        return int(self.header.refcount_table_offset)

    @property
    def reftable_entries(self) -> int:
        return int(self.header.refcount_table_clusters) * self.cluster_size // 8

    def data_host(self) -> HostFile:
        """Where guest data clusters live."""
        return self.data if self.data is not None else self.host

    def flush_file(self) -> None:
        """The barrier: the image file flushed, and first the external data file when a
        call changed it since its last flush. Every barrier before an L2 update stands for
        "the guest data is durable", and with a data file that data is in the other file
        (QEMU 7.2's qcow2_cache_entry_flush flushes bs->file only, the same window; a
        guest flush, bdrv_co_flush, reaches every child, data_file included)."""
        if self.data is not None and self.data.unflushed:
            self.data.flush(sync=self.sync)
        self.host.flush(sync=self.sync)
        if self.freed_unsynced and (self.l2_cache is None or not self.l2_cache.dirty):
            # Every L2 update so far is on the disk now (L1, snapshot and reftable switches
            # are written with pwrite_sync): nothing still maps a freed cluster.
            self.freed_unsynced.clear()

    def settle_freed(self, offset: int, length: int) -> None:
        """Before clusters of [offset, offset+length) freed in this epoch are reused, the L2
        updates that unmapped them reach the disk: the L2 cache written back (after the
        refcount cache it may depend on), then a file flush. Allocation order and the final
        file stay QEMU's; only the barrier is added."""
        if not self.freed_unsynced or length <= 0:
            return
        cs = self.cluster_size
        first, last = offset // cs, (offset + length - 1) // cs
        pending = self.freed_unsynced
        if last - first < len(pending):
            hit = any(i in pending for i in range(first, last + 1))
        else:
            hit = any(first <= i <= last for i in pending)
        if not hit:
            return
        self.l2_cache.write(barrier=True)
        self.flush_file()
        self.freed_unsynced.clear()

    def flush_all(self) -> None:
        """bdrv_flush on the qcow2 node: both caches written back (the L2 cache after the
        refcount cache it depends on: qcow2_write_caches), then the file flushed. With
        cache=unsafe the fdatasync is skipped but the flush call is still made, so a
        recorder (difftest/crash) sees the barrier."""
        self.l2_cache.write()
        self.rc_cache.write()
        self.flush_file()

    def pwrite_sync(self, offset: int, data: bytes) -> None:
        """bdrv_pwrite_sync on the image file: a metadata write, then a file flush, so that
        nothing written later can reach the disk before it (the barrier QEMU puts after
        switching to a new table and before the old one is freed and reused)."""
        self.host.pwrite(offset, data, meta=True)
        self.flush_file()

    def queue_discard(self, offset: int, length: int) -> None:
        """update_refcount_discard: a freed range joins a queued range it touches, and a
        range that then touches another is merged with it (freed ranges never overlap)."""
        end = offset + length
        for d in self.discards:
            if d[0] <= end and offset <= d[0] + d[1]:
                lo = min(d[0], offset)
                d[1] = max(d[0] + d[1], end) - lo
                d[0] = lo
                break
        else:
            d = [offset, length]
            self.discards.append(d)
        for p in list(self.discards):
            if p is not d and p[0] <= d[0] + d[1] and d[0] <= p[0] + p[1]:
                self.discards.remove(p)
                lo = min(d[0], p[0])
                d[1] = max(d[0] + d[1], p[0] + p[1]) - lo
                d[0] = lo

    @contextmanager
    def discards_held(self) -> Iterator[None]:
        """Hold freed ranges for the duration (s->cache_discards) and, unless an outer
        operation already holds them, punch them once, merged, when it ends; after a failure
        they are dropped unpunched (qcow2_process_discards)."""
        held = self.cache_discards
        self.cache_discards = True
        try:
            yield
        except BaseException:
            self.cache_discards = held
            if not held:
                self.process_discards(issue=False)
            raise
        self.cache_discards = held
        if not held:
            self.process_discards()

    def process_discards(self, *, issue: bool = True) -> None:
        """qcow2_process_discards: one punched hole per queued range, in queue order; after
        a failed operation (``issue`` False) the queue is dropped, nothing punched."""
        queued, self.discards = self.discards, []
        if issue and queued:
            # The L2 updates that freed these ranges reach the disk before the holes are
            # punched (QEMU punches while the slices may still be dirty; a compressed
            # cluster's descriptor pointing at a hole does not decode).
            if self.l2_cache is not None and self.l2_cache.dirty:
                self.l2_cache.write(barrier=True)
            self.flush_file()
            for off, n in queued:
                self.host.punch_hole(off, n)

    def read_snapshot_l1(self, offset: int, size: int) -> list[int]:
        """A snapshot's L1 table, checked first as QEMU checks it before reading one
        (qcow2_validate_table, called from qcow2_snapshot_goto, _delete, _load_tmp and
        qcow2_check_metadata_overlap): at most QCOW_MAX_L1_SIZE bytes, cluster aligned, its
        end within int64. FormatError otherwise ("Snapshot L1 table too large"), so a
        header's l1_size never decides how much memory is taken."""
        validate_table(offset, size, 8, QCOW_MAX_L1_SIZE, self.cluster_size,
                       "snapshot.l1_size", "snapshot.l1_table_offset")
        if not size:
            return []
        return list(struct.unpack(f">{size}Q", self.host.pread(offset, 8 * size, meta=True)))

    # --- writing what QEMU keeps in memory ----------------------------------------------------
    def write_header(self) -> None:
        """The fixed header fields: QEMU's writes of single fields (qcow2_mark_dirty, the
        snapshot table, a grown table, a resize) leave the rest of the cluster alone."""
        self.host.pwrite(0, hd.Header.build(self.header), meta=True)

    def update_header(self) -> None:
        """qcow2_update_header: the whole header cluster rebuilt from memory
        (spec/header_update.py); nothing when it does not fit."""
        if self.header_memory is None:
            self.write_header()
            return
        cluster = header_cluster(self.header_memory, self.header, self.cluster_size)
        if cluster is not None:
            self.host.pwrite(0, cluster, meta=True)

    def set_incompatible_bit(self, bit: int, on: bool) -> None:
        """Flip one incompatible feature bit when it differs: qcow2_mark_dirty writes the
        field alone, qcow2_mark_clean and qcow2_mark_corrupt rewrite the header cluster (the
        latter on v2 too, which has no such bit)."""
        v3 = self.header.v3
        if v3 is None:
            if bit == ft.QCOW2_INCOMPAT_CORRUPT and on:
                self.update_header()
            return
        if bool(int(v3.incompatible_features) & bit) == on:
            return
        v3.incompatible_features = int(v3.incompatible_features) ^ bit
        if bit == ft.QCOW2_INCOMPAT_DIRTY and on:
            self.write_header()
        else:
            self.update_header()

    def write_l1_entry(self, index: int, *, sync: bool = True) -> None:
        """qcow2_write_l1_entry: the 512-byte aligned group of entries around ``index``,
        with bdrv_pwrite_sync (the new L2 table is in use from here on); ``sync`` False
        leaves the flush to the caller."""
        first = index - index % L1_ENTRIES_PER_SECTOR
        words = self.l1_table[first:min(first + L1_ENTRIES_PER_SECTOR, self.l1_size)]
        # The whole sector is written, zeros past the table's end included.
        words += [0] * (L1_ENTRIES_PER_SECTOR - len(words))
        data = struct.pack(f">{len(words)}Q", *words)
        # qcow2_write_l1_entry checks the sector against every other kind of metadata first.
        self.overlap.check_l1_write(self.l1_table_offset + 8 * first, len(data))
        if sync:
            self.pwrite_sync(self.l1_table_offset + 8 * first, data)
        else:
            self.host.pwrite(self.l1_table_offset + 8 * first, data, meta=True)

    def write_reftable_entry(self, index: int) -> None:
        """alloc_refcount_block hooks a new block into the table with bdrv_pwrite_sync.
        Unchecked, as in QEMU 7.2: that hook-up runs no qcow2_pre_write_overlap_check (the
        old write_reftable_entry, which did, is gone from block/qcow2-refcount.c), so an
        entry landing on other metadata is written (tests/conformance/test_damaged.py)."""
        self.pwrite_sync(self.refcount_table_offset + 8 * index, struct.pack(">Q", self.reftable[index]))
