"""The metadata overlap check of a repair's writes (block/qcow2-refcount.c,
qcow2_check_metadata_overlap and qcow2_pre_write_overlap_check, overlap-check=cached).

During a check QEMU's in-memory structures are the file's, so the regions are read from the
file. A write that would hit one is QEMU's fatal corruption: the image is flagged corrupt and
the check fails (``Fatal``), keeping what was written before it.
"""

from __future__ import annotations

import struct

from spec import header as hd
from spec import refblocks as rb
from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.geometry import align_up
from spec.qfile import Qcow2File


class Fatal(Exception):
    """qcow2_signal_corruption(fatal=true): QEMU flags the image corrupt, makes the node
    unusable and the check fails."""


def _snapshot_tables(q: Qcow2File) -> tuple[list[tuple[int, int]], int]:
    """(l1_table_offset, l1_size) of each snapshot, and the table's size, read as
    qcow2_do_read_snapshots reads them (the check has already refused a table it cannot read)."""
    start = off = int(q.header.snapshots_offset)
    out: list[tuple[int, int]] = []
    for _ in range(int(q.header.nb_snapshots)):
        off = align_up(off, 8)
        fixed = q.pread(off, 40)
        out.append((int.from_bytes(fixed[0:8], "big"), int.from_bytes(fixed[8:12], "big")))
        id_len, name_len = int.from_bytes(fixed[12:14], "big"), int.from_bytes(fixed[14:16], "big")
        off += 40 + int.from_bytes(fixed[36:40], "big") + id_len + name_len
    return out, off - start


def overlap(q: Qcow2File, offset: int, size: int, ign: frozenset[str] = frozenset(),
            l1: list[int] | None = None) -> str | None:
    """The metadata [offset, offset+size) would overwrite, by QEMU's name, or None. The
    structures are those of QEMU's in-memory state, which during a check are the file's,
    but for the active L1 table: ``l1`` is QEMU's copy (s->l1_table) when the file's may
    have changed under it (spec/check/fix_pass.py read_l1)."""
    if size <= 0:
        return None
    cs = q.cluster_size
    if "qcow2_header" not in ign and offset < cs:
        return "qcow2_header"
    size = align_up(offset % cs + size, cs)
    offset -= offset % cs
    h = q.header
    regions: list[tuple[str, int, int]] = []
    l1_off, l1_size = int(h.l1_table_offset), int(h.l1_size)
    regions.append(("active L1 table", l1_off, l1_size * 8))
    regions.append(("refcount table", int(h.refcount_table_offset), int(h.refcount_table_clusters) * cs))
    snaps, snap_size = _snapshot_tables(q)
    regions.append(("snapshot table", int(h.snapshots_offset), snap_size))
    regions += [("inactive L1 table", o, n * 8) for o, n in snaps]
    if l1 is None and l1_size:
        l1 = list(struct.unpack(f">{l1_size}Q", q.pread(l1_off, l1_size * 8)))
    if l1:
        for e in l1:
            regions.append(("active L2 table", e & L1E_OFFSET_MASK, cs if e & L1E_OFFSET_MASK else 0))
    for e in rb.read_reftable(q):
        regions.append(("refcount block", e & REFT_OFFSET_MASK, cs if e & REFT_OFFSET_MASK else 0))
    bm = q.image_file.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if bm is not None and q.image_file.bitmaps_enabled:
        regions.append(("bitmap directory", int(bm.data.bitmap_directory_offset),
                        int(bm.data.bitmap_directory_size)))
    for name, start, length in regions:
        if name not in ign and length > 0 and offset < start + length and start < offset + size:
            return name
    return None


def pre_write(q: Qcow2File, offset: int, size: int, ign: frozenset[str] = frozenset(),
              l1: list[int] | None = None) -> None:
    """qcow2_pre_write_overlap_check: raise Fatal if the write would hit metadata."""
    hit = overlap(q, offset, size, ign, l1)
    if hit is not None:
        raise Fatal(f"preventing invalid write on metadata (overlaps with {hit})")
