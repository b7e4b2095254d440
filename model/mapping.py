"""Guest-to-host mapping: the L1 and L2 tables (qcow2.rst "Cluster mapping",
"Extended L2 Entries"; block/qcow2-cluster.c).

An L2 entry is handled as a pair ``(l2_entry, l2_bitmap)``; without extended L2 the bitmap
is always 0, so one code path serves both layouts. Every lookup reads the L1 table and the
L2 table from disk; every update reads the whole table, changes one entry and writes the
whole table back.

Errors: CorruptionError (and the image is flagged corrupt by the caller) for an L2 table
offset that is not cluster aligned, as qcow2_get_host_offset and get_cluster_table find it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

from model import overlap as ov
from spec import refblocks as rb
from spec.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    ClusterType,
    cluster_type,
    compressed_range,
)
from spec.errors import CorruptionError
from spec.hostio import HostIOError
from spec.qfile import Qcow2File

L2Pair = tuple[int, int]


# The layouts are spec.tables.l1_table and spec.tables.l2_table (big-endian 64-bit words;
# an extended entry is the word pair (l2_entry, l2_bitmap)). They are decoded here with
# struct because construct is too slow to run on every lookup; tests/model/test_tables.py
# checks that both readings agree.

def read_l1(q: Qcow2File, offset: int | None = None, size: int | None = None) -> list[int]:
    off = q.header.l1_table_offset if offset is None else offset
    n = q.header.l1_size if size is None else size
    return list(struct.unpack(f">{n}Q", q.pread(off, n * 8)))


def write_l1(q: Qcow2File, table: list[int], offset: int | None = None) -> None:
    off = q.header.l1_table_offset if offset is None else offset
    q.pwrite(off, struct.pack(f">{len(table)}Q", *table))


class L2Table:
    """One L2 table as read from the file: entry ``i`` is (l2_entry, l2_bitmap), the bitmap 0
    without extended L2. Entries are decoded when indexed (struct on the raw bytes), since
    decoding a whole 64 KiB table per lookup dominated the model's run time; an assignment
    changes the bytes, which write_l2 writes back whole."""

    def __init__(self, data: bytes, extended_l2: bool) -> None:
        # Copied into a bytearray only when an entry is assigned: with 2 MiB clusters a
        # table is 2 MiB, and most readers only look.
        self.raw: bytes | bytearray = data
        self.extended_l2 = extended_l2
        self.width = 16 if extended_l2 else 8
        self.count = len(data) // self.width

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> L2Pair:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self.extended_l2:
            entry, bitmap = struct.unpack_from(">QQ", self.raw, 16 * i)
            return entry, bitmap
        return struct.unpack_from(">Q", self.raw, 8 * i)[0], 0

    def __setitem__(self, i: int, pair: L2Pair) -> None:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if not isinstance(self.raw, bytearray):
            self.raw = bytearray(self.raw)
        if self.extended_l2:
            struct.pack_into(">QQ", self.raw, 16 * i, *pair)
        else:
            struct.pack_into(">Q", self.raw, 8 * i, pair[0])

    def pairs(self, start: int, count: int) -> list[L2Pair]:
        """Entries ``start`` .. ``start+count-1`` (clipped to the table), decoded at once."""
        count = max(0, min(count, len(self) - start))
        words = struct.unpack_from(f">{count * self.width // 8}Q", self.raw, start * self.width)
        if self.extended_l2:
            return list(zip(words[0::2], words[1::2], strict=True))
        return [(w, 0) for w in words]

    def __iter__(self) -> Iterator[L2Pair]:
        words = struct.unpack(f">{len(self.raw) // 8}Q", self.raw)
        if self.extended_l2:
            return zip(words[0::2], words[1::2], strict=True)
        return zip(words, itertools.repeat(0))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, L2Table):
            return self.raw == other.raw and self.extended_l2 == other.extended_l2
        return isinstance(other, list) and list(self) == other

    __hash__ = None  # type: ignore[assignment]  # mutable


def read_l2(q: Qcow2File, offset: int) -> L2Table:
    return L2Table(q.pread(offset, q.cluster_size), q.extended_l2)


def read_l2_entries(q: Qcow2File, offset: int, start: int, count: int) -> list[L2Pair]:
    """Entries ``start`` .. ``start+count-1`` (clipped to the table) of the L2 table at
    ``offset``; only those are read."""
    count = max(0, min(count, q.geometry.l2_entries - start))
    width = q.geometry.l2_entry_size
    return L2Table(q.pread(offset + start * width, count * width), q.extended_l2).pairs(0, count)


def read_l2_entry(q: Qcow2File, offset: int, index: int) -> L2Pair:
    """Entry ``index`` of the L2 table at ``offset``; only that entry is read."""
    if q.extended_l2:
        entry, bitmap = struct.unpack(">QQ", q.pread(offset + 16 * index, 16))
        return entry, bitmap
    return int.from_bytes(q.pread(offset + 8 * index, 8), "big"), 0


def write_l2(q: Qcow2File, offset: int, table: L2Table) -> None:
    q.pwrite(offset, table.raw)


def l2_offset(q: Qcow2File, l1_entry: int, l1_index: int) -> int:
    off = l1_entry & L1E_OFFSET_MASK
    if off % q.cluster_size:
        raise CorruptionError(f"L2 table offset {off:#x} unaligned (L1 index {l1_index:#x})")
    return off


def read_l1_entry(q: Qcow2File, index: int, l1: tuple[int, int] | None = None) -> int:
    """One entry of the L1 table at ``l1`` = (offset, size), the active one by default;
    0 past its end. Only the entry is read: an L1 table can be 32 MiB."""
    if l1 is None:
        h = q.header
        off, size = h.l1_table_offset, h.l1_size
    else:
        off, size = l1
    if index >= size:
        return 0
    return int.from_bytes(q.pread(off + 8 * index, 8), "big")


def get_entry(q: Qcow2File, guest_offset: int, l1: tuple[int, int] | None = None) -> L2Pair:
    """The L2 entry mapping ``guest_offset`` through the L1 table at ``l1`` (offset, size),
    the active one by default; (0, 0) where no L2 table exists."""
    g = q.geometry
    i1 = g.l1_index(guest_offset)
    off = l2_offset(q, read_l1_entry(q, i1, l1), i1)
    if not off:
        return 0, 0
    return read_l2_entry(q, off, g.l2_index(guest_offset))


def l2_table_for_write(q: Qcow2File, guest_offset: int) -> int:
    """Offset of a writable L2 table for ``guest_offset`` (get_cluster_table + l2_allocate).

    A missing table is allocated zeroed. A table shared with a snapshot (L1 entry without
    COPIED) is copied to a new cluster, the L1 entry pointed at the copy with COPIED set,
    and the old table loses one reference. The data clusters' refcounts do not change: the
    copy and the snapshot's table each still reach them once per L1 table.
    """
    g = q.geometry
    i1 = g.l1_index(guest_offset)
    old_entry = read_l1_entry(q, i1)
    old = l2_offset(q, old_entry, i1)
    if old and old_entry & QCOW_OFLAG_COPIED:
        return old
    new = rb.alloc_clusters(q, 1)
    if new == 0:
        # Refcounts that call the header free (damage, a truncated refcount block) would put
        # the table on it: l2_allocate (block/qcow2-cluster.c) flags the image instead.
        raise CorruptionError("preventing invalid allocation of L2 table at offset 0")
    content = q.pread(old, q.cluster_size) if old else bytes(q.cluster_size)
    try:
        q.pwrite(new, content)
        l1 = read_l1(q)
        l1[i1] = new | QCOW_OFLAG_COPIED
        # qcow2_write_l1_entry overlap-checks the 512-byte sector it writes, the active L1
        # table itself ignored. A refusal flags the image; QEMU's fail path then frees the
        # new table in its refcount cache, which the flagged node never writes back, so the
        # model frees nothing either (the file keeps QEMU's bytes: a leaked table).
        sector = int(q.header.l1_table_offset) + 8 * (i1 - i1 % 64)  # 64 entries a sector
        ov.check_metadata_write(q, sector, 512, "active L1 table")
        write_l1(q, l1)
    except HostIOError:
        # l2_allocate's fail path (block/qcow2-cluster.c): the new table is freed
        # (QCOW2_DISCARD_ALWAYS), so a write that failed on the host (EFBIG for an L1 table a
        # damaged offset put out of reach) leaks nothing; the L1 table was not changed.
        rb.free_clusters(q, new, q.cluster_size, discard=True)
        raise
    if old:
        rb.free_clusters(q, old, q.cluster_size)
    return new


def set_entry(q: Qcow2File, guest_offset: int, entry: L2Pair) -> None:
    """Write one L2 entry (allocating or unsharing its table first)."""
    off = l2_table_for_write(q, guest_offset)
    table = read_l2(q, off)
    table[q.geometry.l2_index(guest_offset)] = entry
    write_l2(q, off, table)


def free_any_cluster(q: Qcow2File, entry: int, *, request: bool) -> None:
    """qcow2_free_any_cluster: drop the reference an L2 entry held.

    NORMAL/ZERO_ALLOC: the cluster; COMPRESSED: every cluster its sectors touch;
    ZERO_PLAIN/UNALLOCATED: nothing. ``request`` (QCOW2_DISCARD_REQUEST, passed through
    by default) punches freed clusters out of the host file. With an external data file
    no refcounts exist; a discard request punches the cluster out of the data file.
    """
    t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
    if q.has_data_file:
        if request and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            q.punch_hole(entry & L2E_OFFSET_MASK, q.cluster_size, q.data_f)
        return
    if t is ClusterType.COMPRESSED:
        coff, csize = compressed_range(entry, q.cluster_bits)
        rb.free_clusters(q, coff, csize, discard=request)
    elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        off = entry & L2E_OFFSET_MASK
        if off % q.cluster_size:
            # QEMU reports it (non-fatal corruption) and frees nothing.
            return
        rb.free_clusters(q, off, q.cluster_size, discard=request)
