"""Metadata overlap checks before data writes (block/qcow2-refcount.c,
qcow2_check_metadata_overlap and qcow2_pre_write_overlap_check, with QEMU's default
overlap-check mode "cached": everything except inactive L2 tables).

The image's own metadata writes that QEMU checks at once are checked too (check_metadata_write:
an L1 entry, the grown L1 table, a snapshot's L1 copy, the snapshot table, the active L1
overwritten by a snapshot's; the refcount blocks alloc_refcount_block and the refcount
table's growth write, Qcow2File.check_refblock_write; the persistent bitmaps' writes,
spec/bitmap_store.py).

A data write that would land on the header, an L1 table (active or a snapshot's), an active
L2 table, the refcount table, a refcount block, the snapshot table or the bitmap directory
(while the bitmaps autoclear bit is set) means the tables are
inconsistent. QEMU then refuses the write and flags the image corrupt; so does the model
(the caller turns the CorruptionError into the corrupt bit). Writes to an external data file
are not checked: no metadata lives there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spec import header as hd
from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.errors import CorruptionError
from spec.features import QCOW2_AUTOCLEAR_BITMAPS
from spec.qfile import Qcow2File
from spec.snapshot_table import read_snapshot_table, snapshot_table_size

if TYPE_CHECKING:
    import numpy as np
else:
    from spec.lazy import numpy as np  # executed at first use: CLI start-up (spec/lazy.py)


def _ranges(q: Qcow2File, snapshots: list[tuple[int, int]] | None = None) -> list[tuple[str, int, int]]:
    """The metadata regions other than L2 tables and refcount blocks. ``snapshots`` (the
    (l1_table_offset, l1_size) of each snapshot) stands for the snapshots' L1 tables of the
    table in the file, as QEMU's list in memory does while qcow2_write_snapshots writes it."""
    cs = q.cluster_size
    out = [("qcow2_header", 0, cs),
           ("active L1 table", int(q.header.l1_table_offset), int(q.header.l1_size) * 8),
           ("refcount table", int(q.header.refcount_table_offset),
            int(q.header.refcount_table_clusters) * cs)]
    if int(q.header.nb_snapshots):
        out.append(("snapshot table", int(q.header.snapshots_offset), snapshot_table_size(q)))
        if snapshots is None:
            snapshots = [(int(s.l1_table_offset), int(s.l1_size)) for s in read_snapshot_table(q)]
    out += [("inactive L1 table", off, size * 8) for off, size in snapshots or []]
    img = q.image_file
    if img.bitmaps_enabled:
        # QCOW2_OL_BITMAP_DIRECTORY: only while the bitmaps autoclear bit vouches for the
        # extension (qcow2_check_metadata_overlap; spec/bitmap_store.py keeps it current).
        ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        assert ext is not None
        out.append(("bitmap directory", int(ext.data.bitmap_directory_offset),
                    int(ext.data.bitmap_directory_size)))
    return out


def _cluster_tables(q: Qcow2File) -> list[tuple[str, np.ndarray]]:
    """Offsets of the one-cluster tables the L1 table and the refcount table point at, read
    in bulk with numpy (these tables have up to millions of entries, mostly zero: the zero
    entries, which point at nothing, are dropped first)."""
    l1 = q.pread(int(q.header.l1_table_offset), int(q.header.l1_size) * 8)
    reftable = q.pread(int(q.header.refcount_table_offset),
                       int(q.header.refcount_table_clusters) * q.cluster_size)
    return [("active L2 table", _nonzero(l1) & np.uint64(L1E_OFFSET_MASK)),
            ("refcount block", _nonzero(reftable) & np.uint64(REFT_OFFSET_MASK))]


def _nonzero(table: bytes) -> np.ndarray:
    entries = np.frombuffer(table, dtype=">u8")
    return entries[entries != 0]


def check_data_write(q: Qcow2File, offset: int, n: int) -> None:
    """Raise CorruptionError if [offset, offset+n) on the image file overlaps metadata."""
    if q.has_data_file:
        return
    check_metadata_write(q, offset, n, "")


def check_metadata_write(q: Qcow2File, offset: int, n: int, own: str,
                         snapshots: list[tuple[int, int]] | None = None) -> None:
    """The same check for a write of the image's own metadata, which QEMU runs with the
    written table's own kind (``own``, a name of this module) ignored and with a data file
    too (qcow2_write_l1_entry ignores the active L1 table; ``own`` "" ignores nothing, as
    the writers of new tables do: qcow2_grow_l1_table, qcow2_snapshot_create's L1 copy,
    qcow2_write_snapshots, whose new list ``snapshots`` replaces the file's, see _ranges).
    The model checks the writes QEMU makes at once, as the model does: L1 entries, the
    grown L1 table, the snapshot writers, new refcount blocks, the bitmaps' writes; the
    L2 tables and refcount blocks a request changes leave QEMU's caches later
    (difftest/damaged/notes.py, metadata-overlap)."""
    if n <= 0:
        return
    cs = q.cluster_size
    lo, hi = offset - offset % cs, -(-(offset + n) // cs) * cs
    for name, start, length in _ranges(q, snapshots):
        if name != own and length > 0 and start < hi and lo < start + length:
            raise CorruptionError(f"preventing invalid write on metadata (overlaps with {name})")
    # A table occupies one cluster from its offset, so it overlaps when lo - cs < start < hi.
    # As one unsigned comparison: start - first < hi - first, with first = lo - cs + 1. The
    # header check above leaves lo >= cs, so first >= 1 and a zero entry ("no table") can
    # never match.
    first = np.uint64(lo - cs + 1)
    span = np.uint64(hi - (lo - cs + 1))
    # qcow2_close frees the L1 table before qcow2_inactivate, and the check looks at active
    # L2 tables only while it exists: the writes of the close (the bitmaps' store, the refcount
    # blocks it allocates) skip them (ModelFile.l1_released).
    skip = "active L2 table" if getattr(q, "l1_released", False) else own
    for name, starts in _cluster_tables(q):
        if name not in (own, skip) and (starts - first < span).any():
            raise CorruptionError(f"preventing invalid write on metadata (overlaps with {name})")
    img = q.image_file
    if (own != "bitmap directory" and img.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS
            and img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS) is None):
        # The bitmaps bit without an extension: QEMU compares against a directory at (0, 0),
        # whose last byte wraps to 2^64 - 1 (ranges_overlap), so every checked write
        # overlaps it (qcow2_check_metadata_overlap checks the directory last).
        raise CorruptionError("preventing invalid write on metadata (overlaps with bitmap directory)")
