"""Overlap checks before data writes and metadata write-backs (block/qcow2-refcount.c
qcow2_check_metadata_overlap, qcow2_pre_write_overlap_check; QEMU's overlap-check modes and
per-structure options, block/qcow2.h QCow2MetadataOverlap).

A data write landing on metadata means the tables are inconsistent: it is refused with
CorruptionError and the caller flags the image corrupt. Writes to an external data file
are not checked (no metadata lives there). The image's own table writes are checked too,
each against every kind but its own, as QEMU checks them: an L2 slice or refcount block
leaving its cache (impl/cache.py, qcow2_cache_entry_flush), an L1 entry
(State.write_l1_entry, qcow2_write_l1_entry), the grown L1 table (impl/resize.py grow_l1,
qcow2_grow_l1_table: nothing ignored), a snapshot's L1 copy and the snapshot table
(impl/snapshot.py, qcow2_snapshot_create and qcow2_write_snapshots: nothing ignored) and the
active L1 table overwritten by a snapshot's (qcow2_snapshot_goto: the active L1 ignored).
The persistent bitmaps' writes at close (spec/bitmap_store.py: data clusters, tables, the
new directory) are checked with nothing ignored, as store_bitmap and bitmap_list_store do.
The refcount table's own writes are not checked, as QEMU 7.2 does not check them
(block/qcow2-refcount.c: alloc_refcount_block hooks a new block into the table, and
qcow2_refcount_area writes the grown table and the header, with plain bdrv_pwrite_sync).
The in-place directory rewrite of a read-write open is checked with the directory itself
ignored (bitmap_list_store in place; impl/image.py loads the bitmaps once this exists).
The bitmap directory counts as metadata only while the bitmaps autoclear bit is set
(qcow2_check_metadata_overlap).
"""

from __future__ import annotations

from impl.cluster import UnflaggedError
from impl.state import State
from spec.entries import L1E_OFFSET_MASK
from spec.errors import CorruptionError, FormatError
from spec.features import QCOW2_AUTOCLEAR_BITMAPS

QCOW2_OL_MAIN_HEADER = 1 << 0
QCOW2_OL_ACTIVE_L1 = 1 << 1
QCOW2_OL_ACTIVE_L2 = 1 << 2
QCOW2_OL_REFCOUNT_TABLE = 1 << 3
QCOW2_OL_REFCOUNT_BLOCK = 1 << 4
QCOW2_OL_SNAPSHOT_TABLE = 1 << 5
QCOW2_OL_INACTIVE_L1 = 1 << 6
QCOW2_OL_INACTIVE_L2 = 1 << 7
QCOW2_OL_BITMAP_DIRECTORY = 1 << 8
OVERLAP_NAMES = {
    "main_header": QCOW2_OL_MAIN_HEADER, "active_l1": QCOW2_OL_ACTIVE_L1,
    "active_l2": QCOW2_OL_ACTIVE_L2, "refcount_table": QCOW2_OL_REFCOUNT_TABLE,
    "refcount_block": QCOW2_OL_REFCOUNT_BLOCK, "snapshot_table": QCOW2_OL_SNAPSHOT_TABLE,
    "inactive_l1": QCOW2_OL_INACTIVE_L1, "inactive_l2": QCOW2_OL_INACTIVE_L2,
    "bitmap_directory": QCOW2_OL_BITMAP_DIRECTORY,
}
"""block/qcow2.h QCow2MetadataOverlap; the names of the overlap-check.* options."""
QCOW2_OL_CONSTANT = (QCOW2_OL_MAIN_HEADER | QCOW2_OL_ACTIVE_L1 | QCOW2_OL_REFCOUNT_TABLE
                     | QCOW2_OL_SNAPSHOT_TABLE | QCOW2_OL_BITMAP_DIRECTORY)
QCOW2_OL_CACHED = (QCOW2_OL_CONSTANT | QCOW2_OL_ACTIVE_L2 | QCOW2_OL_REFCOUNT_BLOCK
                   | QCOW2_OL_INACTIVE_L1)
QCOW2_OL_ALL = QCOW2_OL_CACHED | QCOW2_OL_INACTIVE_L2
OVERLAP_MODES = {"none": 0, "constant": QCOW2_OL_CONSTANT, "cached": QCOW2_OL_CACHED,
                 "all": QCOW2_OL_ALL}


_KIND_BITS = {
    "qcow2_header": QCOW2_OL_MAIN_HEADER, "active L1 table": QCOW2_OL_ACTIVE_L1,
    "refcount table": QCOW2_OL_REFCOUNT_TABLE, "snapshot table": QCOW2_OL_SNAPSHOT_TABLE,
    "bitmap directory": QCOW2_OL_BITMAP_DIRECTORY, "inactive L1 table": QCOW2_OL_INACTIVE_L1,
    "active L2 table": QCOW2_OL_ACTIVE_L2, "refcount block": QCOW2_OL_REFCOUNT_BLOCK,
    "inactive L2 table": QCOW2_OL_INACTIVE_L2,
}
"""The names in the overlap message, in the order _rebuild adds them (the order a name is
chosen in when a cluster holds several kinds)."""


class OverlapChecker:
    """qcow2_pre_write_overlap_check: a write landing on metadata selected by ``mask``
    (less the written table's own kind, for a metadata write) is refused (the caller flags
    the image corrupt). The metadata clusters are
    kept as a dict cluster index -> name, rebuilt only when a table moved (``stale``), so a
    check is one dict lookup per cluster written; mask 0 costs one comparison.

    The inactive L2 tables are those the snapshots' L1 tables point at. QEMU reads those
    L1 tables at every check (qcow2_check_metadata_overlap); here they are read when the
    snapshot list changes (``set_snapshots``) and kept until it changes again: a snapshot's
    L1 table is never rewritten with other offsets while the snapshot exists. A snapshot
    L1 table that QEMU's qcow2_validate_table refuses makes every checked write fail
    without flagging the image (QEMU returns its -EFBIG/-EINVAL from the check)."""

    def __init__(self, s: State, mask: int, snapshots: list[tuple[int, int]],
                 snapshot_table: tuple[int, int], bitmap_dir: tuple[int, int]) -> None:
        self.s = s
        self.mask = mask
        self.bitmap_dir = bitmap_dir
        self.dir_wraps = False
        """The bitmaps autoclear bit is set and no bitmaps extension names a directory: QEMU's
        check then compares against (0, 0), whose last byte wraps to 2^64 - 1
        (ranges_overlap), so every write it checks overlaps the "bitmap directory"."""
        self.stale = True
        self.clusters: dict[int, int] = {}
        """cluster index -> the QCOW2_OL_* bits of the metadata kinds found there."""
        self.snapshots: list[tuple[int, int]] = []
        self.snapshot_table = (0, 0)
        self._inactive_l2: list[int] | None = None
        self.set_snapshots(snapshots, snapshot_table)

    def set_snapshots(self, snapshots: list[tuple[int, int]],
                      snapshot_table: tuple[int, int]) -> None:
        """The snapshot list changed: (l1_table_offset, l1_size) of each snapshot, and
        (offset, bytes) of the snapshot table."""
        self.snapshots = snapshots
        self.snapshot_table = snapshot_table
        self._inactive_l2 = None
        self.stale = True

    def _inactive_l2_tables(self) -> list[int]:
        if self._inactive_l2 is None:
            out: list[int] = []
            for off, size in self.snapshots:
                try:
                    words = self.s.read_snapshot_l1(off, size)
                except FormatError as e:
                    raise UnflaggedError(f"overlap check: {e}") from None
                out += [e & L1E_OFFSET_MASK for e in words if e & L1E_OFFSET_MASK]
            self._inactive_l2 = out
        return self._inactive_l2

    def _rebuild(self) -> None:
        s, m = self.s, self.mask
        cs = s.cluster_size
        out: dict[int, int] = {}

        # Every kind a cluster holds is kept (a bit each), not only the first: a table's
        # write-back ignores its own kind and must still meet any other kind there.
        def add(name: str, start: int, length: int) -> None:
            if length > 0:
                bit = _KIND_BITS[name]
                for c in range(start // cs, -(-(start + length) // cs)):
                    out[c] = out.get(c, 0) | bit

        if m & QCOW2_OL_MAIN_HEADER:
            add("qcow2_header", 0, cs)
        if m & QCOW2_OL_ACTIVE_L1:
            add("active L1 table", s.l1_table_offset, s.l1_size * 8)
        if m & QCOW2_OL_REFCOUNT_TABLE:
            add("refcount table", s.refcount_table_offset, int(s.header.refcount_table_clusters) * cs)
        if m & QCOW2_OL_SNAPSHOT_TABLE:
            add("snapshot table", *self.snapshot_table)
        if m & QCOW2_OL_BITMAP_DIRECTORY:
            add("bitmap directory", *self.bitmap_dir)
        v3 = s.header.v3
        self.dir_wraps = bool(m & QCOW2_OL_BITMAP_DIRECTORY and not self.bitmap_dir[1] and v3 is not None
                              and int(v3.autoclear_features) & QCOW2_AUTOCLEAR_BITMAPS)
        if m & QCOW2_OL_INACTIVE_L1:
            for off, size in self.snapshots:
                add("inactive L1 table", off, size * 8)
        if m & QCOW2_OL_ACTIVE_L2:
            for e in s.l1_table:
                if e & L1E_OFFSET_MASK:
                    add("active L2 table", e & L1E_OFFSET_MASK, cs)
        if m & QCOW2_OL_REFCOUNT_BLOCK:
            for e in s.reftable:
                if e & ~0x1FF:
                    add("refcount block", e & ~0x1FF, cs)
        if m & QCOW2_OL_INACTIVE_L2:
            for off in self._inactive_l2_tables():
                add("inactive L2 table", off, cs)
        self.clusters = out
        self.stale = False

    def check(self, offset: int, n: int) -> None:
        """A guest-data write (data_file=true in QEMU: nothing to check with a data file)."""
        if not self.mask or n <= 0 or self.s.has_data_file:
            return
        if not self.stale and not self.dir_wraps:
            # Every allocating write asks this: a request inside one cluster that holds no
            # metadata is one dict lookup, without check_metadata's call and range loop.
            cs = self.s.cluster_size
            first = offset // cs
            if first == (offset + n - 1) // cs and not self.clusters.get(first):
                return
        self.check_metadata(offset, n, 0)

    def check_l1_write(self, offset: int, n: int) -> None:
        """qcow2_write_l1_entry's check of the sector it writes (State.write_l1_entry, which
        names no overlap kind: this module imports impl.state)."""
        self.check_metadata(offset, n, QCOW2_OL_ACTIVE_L1)

    def check_metadata(self, offset: int, n: int, ignore: int) -> None:
        """A write of the image's own metadata (a cache write-back, an L1 entry, a new table):
        checked with a data file too, the written table's own kind ``ignore``d
        (qcow2_cache_entry_flush, qcow2_write_l1_entry; 0 for a table at new clusters,
        which the header does not name yet)."""
        if not self.mask & ~ignore or n <= 0:
            return
        if self.stale:
            self._rebuild()
        cs = self.s.cluster_size
        clusters = self.clusters
        for c in range(offset // cs, -(-(offset + n) // cs)):
            bits = clusters.get(c, 0) & ~ignore
            if bits:
                # The first kind in the order of _rebuild names the overlap (QEMU names the
                # first one its check meets).
                name = next(k for k, b in _KIND_BITS.items() if bits & b)
                raise CorruptionError(f"preventing invalid write on metadata (overlaps with {name})")
        if self.dir_wraps and not ignore & QCOW2_OL_BITMAP_DIRECTORY:
            # Checked last, as qcow2_check_metadata_overlap checks the directory last.
            raise CorruptionError("preventing invalid write on metadata (overlaps with bitmap directory)")
