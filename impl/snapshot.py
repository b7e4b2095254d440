"""Internal snapshots through the caches (qcow2.rst "Snapshots"; block/qcow2-snapshot.c).

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
data cluster it reaches; COPIED is set exactly where a refcount is 1 afterwards.

- create (qcow2_snapshot_create): L1 copied to new clusters (overlap-checked first,
  impl/overlap.py, like every metadata write QEMU checks), +1 over the active tables
  (qcow2_update_snapshot_refcount), the table rewritten to new clusters
  (qcow2_write_snapshots, overlap-checked), the old table freed;
- apply (qcow2_snapshot_goto): resize to the snapshot's size, grow the L1 if needed, +1
  over the snapshot's tables, its L1 written over the active one (overlap-checked, the
  active L1 ignored; COPIED cleared, unlike
  QEMU, which writes stale flags: see apply), -1 over the old active tables (still in
  memory), COPIED fixed (addend 0);
- delete (qcow2_snapshot_delete): table rewritten without it, -1 over its tables, its L1
  freed, COPIED fixed.

Lookups go by id first, then by name (find_snapshot_by_id_or_name). Errors: RequestError
(unknown snapshot, empty name, too many, refcount overflow), UnsupportedFeature (external
data file: QEMU answers -ENOTSUP), CorruptionError.
"""

from __future__ import annotations

import struct
import time

import construct as c

from impl import overlap as ov
from impl import refcount as rc
from impl.state import HEADER_SNAPSHOT_FIELDS, ImageView, State
from spec import snapshot_table as st
from spec.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    ClusterType,
    cluster_type,
    compressed_range,
)
from spec.errors import CorruptionError, RequestError, UnsupportedFeature
from spec.limits import QCOW_MAX_SNAPSHOTS

EXTRA_DATA_SIZE = st.EXTRA_DATA_SIZE


def read_table(s: State) -> list[c.Container]:
    """qcow2_read_snapshots, within QEMU's limits (spec/snapshot_table.py)."""
    return st.read_entries(lambda off, n: s.host.pread(off, n, meta=True),
                           int(s.header.snapshots_offset), int(s.header.nb_snapshots))


def table_span(s: State, table: list[c.Container]) -> tuple[int, int]:
    """(offset, bytes) of the table: entries 8-byte aligned, the last one unpadded."""
    return int(s.header.snapshots_offset), st.table_size(table)


def write_table(img: ImageView, table: list[c.Container]) -> None:
    """qcow2_write_snapshots: the table to new clusters, the header, then the old table
    freed (and punched out)."""
    s = img.s
    pieces = st.encode_entries(table)
    size = st.pieces_size(pieces)
    old_off, old_size = table_span(s, read_table(s))
    if size:
        offset = rc.alloc_clusters(s, s.geometry.size_to_clusters(size))
    else:
        offset = s.free_cluster_index * s.cluster_size
    # Everything the new table depends on is stable before it is written, and the table
    # with its refcounts before the header points at it; the header update is synced
    # before the old table is freed (qcow2_write_snapshots: bdrv_flush, bdrv_pwrite,
    # bdrv_flush, bdrv_pwrite_sync of nb_snapshots and snapshots_offset).
    s.flush_all()
    # qcow2_write_snapshots checks the new clusters against every kind of metadata (nothing
    # ignored), with the new list already in memory (the snapshot just added, or without
    # the one deleted) and the old table still in effect.
    checker = s.overlap
    if isinstance(checker, ov.OverlapChecker) and size:
        checker.set_snapshots(_l1_tables(table), (old_off, old_size))
    try:
        s.overlap.check_metadata(offset, size, 0)
    except CorruptionError:
        _refused_table(s, len(table), offset, size)
        raise
    for at, data in pieces:
        s.host.pwrite(offset + at, data, meta=True)
    s.flush_all()
    s.header.nb_snapshots = len(table)
    s.header.snapshots_offset = offset
    s.pwrite_sync(HEADER_SNAPSHOT_FIELDS, struct.pack(">IQ", len(table), offset))
    if old_size:
        rc.free_clusters(s, old_off, old_size, discard=True)
    _refresh_overlap(s, table)


def _refused_table(s: State, nb_snapshots: int, offset: int, size: int) -> None:
    """What QEMU leaves in the file when qcow2_write_snapshots' overlap check refuses the
    new table (the caller flags the image and drops the caches):
    - qcow2_signal_corruption rewrites the header from memory (qcow2_mark_corrupt,
      qcow2_update_header), where nb_snapshots already counts the new list while
      snapshots_offset still names the old table: that count reaches the file;
    - the fail path frees the new clusters with QCOW2_DISCARD_ALWAYS: their refcounts (1,
      flushed before the check) go back to 0 only in the refcount cache, never written
      back, but the discard punches them out of the file at once."""
    s.header.nb_snapshots = nb_snapshots
    s.pwrite_sync(HEADER_SNAPSHOT_FIELDS, struct.pack(">I", nb_snapshots))
    s.host.punch_hole(offset, s.geometry.size_to_clusters(size) * s.cluster_size)


def _l1_tables(table: list[c.Container]) -> list[tuple[int, int]]:
    return [(int(e.l1_table_offset), int(e.l1_size)) for e in table]


def _refresh_overlap(s: State, table: list[c.Container]) -> None:
    checker = s.overlap
    if isinstance(checker, ov.OverlapChecker):
        checker.set_snapshots(_l1_tables(table), table_span(s, table))


def find(table: list[c.Container], name: str) -> int:
    for field in ("id_str", "name"):
        for i, e in enumerate(table):
            if bytes(e[field]).decode("utf-8", "surrogateescape") == name:
                return i
    raise RequestError(f"can't find snapshot {name!r}")


def _read_l1(s: State, offset: int, size: int) -> list[int]:
    if offset == s.l1_table_offset:
        return s.l1_table
    return s.read_snapshot_l1(offset, size)


def update_snapshot_refcount(s: State, l1_offset: int, l1_size: int, addend: int,
                             l1: list[int] | None = None) -> None:
    """qcow2_update_snapshot_refcount: ``addend`` on every L2 table and data cluster the L1
    table reaches, COPIED set exactly where the refcount is 1. Entries are changed in the
    cached slices as QEMU changes them, so a refcount overflow half-way leaves what it did
    (nothing rolled back); the L1 table is written only for ``addend >= 0``."""
    table = _read_l1(s, l1_offset, l1_size) if l1 is None else l1
    with s.discards_held():  # freed clusters are punched once, merged, at the end
        changed_l1 = _update_tables(s, table, l1_size, addend)
        s.flush_all()
    # The L1 table (not for addend -1: it is about to be freed) written with a barrier
    # behind it, after both caches and the file were flushed above.
    if changed_l1 and addend >= 0:
        s.pwrite_sync(l1_offset, struct.pack(f">{len(table)}Q", *table))


def _update_tables(s: State, table: list[int], l1_size: int, addend: int) -> bool:
    """update_snapshot_refcount's walk over the L2 tables; True when an L1 entry changed."""
    cs = s.cluster_size
    step = 2 if s.extended_l2 else 1
    changed_l1 = False
    for i, l1e in enumerate(table[:l1_size]):
        l2off = l1e & L1E_OFFSET_MASK
        if not l1e:
            continue
        if l2off & (cs - 1):
            raise CorruptionError(f"L2 table offset {l2off:#x} unaligned (L1 index {i:#x})")
        for key in range(l2off, l2off + cs, s.l2_cache.entry_size):
            for j in range(0, len(s.l2_cache.get(key)), step):
                words = s.l2_cache.get(key)
                fixed = _counted_entry(s, words[j], addend)
                if fixed != words[j]:
                    if addend > 0:
                        # The raised refcounts reach the file before the entries whose
                        # COPIED flag they cleared.
                        s.l2_cache.set_dependency(s.rc_cache)
                    words = s.l2_cache.get(key)
                    words[j] = fixed
                    s.l2_cache.mark_dirty(key)
        fixed_l1 = _counted_cluster(s, l2off, cs, addend)
        if fixed_l1 != l1e:
            table[i] = fixed_l1
            changed_l1 = True
    return changed_l1


def _counted_cluster(s: State, off: int, length: int, addend: int) -> int:
    """``addend`` on a cluster; the entry pointing at it, COPIED iff its refcount is 1."""
    if addend:
        rc.update_refcount(s, off, length, addend, discard=addend < 0)
    return off | QCOW_OFLAG_COPIED if rc.get_refcount(s, off // s.cluster_size) == 1 else off


def _counted_entry(s: State, l2e: int, addend: int) -> int:
    """One L2 entry: ``addend`` on what it points at and its COPIED flag recomputed. A
    compressed cluster never gets COPIED (it is never written in place)."""
    bare = l2e & ~QCOW_OFLAG_COPIED
    kind = cluster_type(bare, extended_l2=s.extended_l2, has_data_file=s.has_data_file)
    if kind is ClusterType.COMPRESSED:
        if addend:
            start, length = compressed_range(bare, s.cluster_bits)
            rc.update_refcount(s, start, length, addend, discard=addend < 0)
        return bare
    if kind is not ClusterType.NORMAL and kind is not ClusterType.ZERO_ALLOC:
        return bare
    host = bare & L2E_OFFSET_MASK
    if host & (s.cluster_size - 1):
        raise CorruptionError(f"cluster offset {host:#x} unaligned")
    return bare | (_counted_cluster(s, host, s.cluster_size, addend) & QCOW_OFLAG_COPIED)


def _no_data_file(s: State) -> None:
    if s.has_data_file:
        # qcow2_snapshot_create / _goto: -ENOTSUP with an external data file.
        raise UnsupportedFeature("internal snapshots with an external data file")


def create(img: ImageView, name: str) -> None:
    s = img.s
    _no_data_file(s)
    table = read_table(s)
    refusal = ("snapshot name must not be empty" if not name else
               "too many snapshots" if len(table) >= QCOW_MAX_SNAPSHOTS else None)
    if refusal:
        raise RequestError(refusal)
    # find_new_snapshot_id: one more than the largest numeric id.
    sid = b"%d" % (1 + max((int(bytes(e.id_str)) for e in table if bytes(e.id_str).isdigit()),
                            default=0))
    l1_size = s.l1_size
    l1_offset = 0
    if l1_size:
        l1_offset = rc.alloc_clusters(s, s.geometry.size_to_clusters(l1_size * 8))
        # qcow2_snapshot_create checks the copy's clusters against every kind of metadata.
        # Nothing was flushed since the allocation, so a refusal (the caches dropped as the
        # image is flagged) leaves the file as QEMU's: its refcount never written.
        s.overlap.check_metadata(l1_offset, l1_size * 8, 0)
        # A plain write: nothing points at the copy until the snapshot table does, and
        # update_snapshot_refcount and write_table flush before that.
        s.host.pwrite(l1_offset, struct.pack(f">{l1_size}Q", *s.l1_table), meta=True)
    # +1 on everything the active table reaches, stable on disk (the flush inside) before
    # the snapshot table names the new L1 table (qcow2_snapshot_create).
    update_snapshot_refcount(s, s.l1_table_offset, l1_size, 1)
    now = time.time_ns()
    entry = c.Container(
        l1_table_offset=l1_offset, l1_size=l1_size, id_str=sid, name=name.encode(),
        date_sec=now // 10**9, date_nsec=now % 10**9, vm_clock_nsec=0, vm_state_size=0,
        extra_data_size=EXTRA_DATA_SIZE,
        extra_data=c.Container(vm_state_size_large=0, disk_size=img.size, icount=0, unknown=b""))
    write_table(img, [*table, entry])


def apply(img: ImageView, name: str) -> None:
    from impl import resize as rs

    s = img.s
    _no_data_file(s)
    sn = read_table(s)[find(read_table(s), name)]
    # qcow2_snapshot_goto validates the snapshot's L1 table before anything changes.
    sn_l1_saved = s.read_snapshot_l1(int(sn.l1_table_offset), int(sn.l1_size))
    disk_size = int(sn.extra_data.disk_size) if sn.extra_data.disk_size is not None else img.size
    if disk_size != img.size:
        rs.resize(img, disk_size, True)
    sn_off, sn_size = int(sn.l1_table_offset), int(sn.l1_size)
    if sn_size > s.l1_size:
        rs.grow_l1(img, sn_size)
    cur = s.l1_size
    sn_l1 = sn_l1_saved + [0] * (cur - sn_size)
    # qcow2_snapshot_goto: the snapshot's clusters get +1 (flushed inside) before the
    # active L1 table is overwritten with a barrier behind it; only then -1 on the old.
    update_snapshot_refcount(s, sn_off, sn_size, 1)
    old_active = list(s.l1_table)
    # Every table the snapshot reaches is shared now, so its L1 goes in with no COPIED flag
    # (QEMU writes the flags copied at create, stale, and clears them only after the -1: a
    # crash between leaves COPIED on a shared L2 table). The addend-0 pass sets them where
    # the refcount fell to 1; the final file is QEMU's.
    sn_l1 = [e & ~QCOW_OFLAG_COPIED for e in sn_l1]
    # qcow2_snapshot_goto checks the active table's clusters before it overwrites them, the
    # active L1 ignored (the snapshot's L1 tables, the L2 tables still in use, ... not).
    s.overlap.check_metadata(s.l1_table_offset, cur * 8, ov.QCOW2_OL_ACTIVE_L1)
    s.pwrite_sync(s.l1_table_offset, struct.pack(f">{cur}Q", *sn_l1))
    update_snapshot_refcount(s, s.l1_table_offset, cur, -1, l1=old_active)
    s.l1_table = sn_l1
    s.overlap.stale = True
    update_snapshot_refcount(s, s.l1_table_offset, cur, 0)


def delete(img: ImageView, name: str) -> None:
    s = img.s
    table = read_table(s)
    sn = table.pop(find(table, name))
    # qcow2_snapshot_delete validates the snapshot's L1 table before the table changes.
    s.read_snapshot_l1(int(sn.l1_table_offset), int(sn.l1_size))
    write_table(img, table)
    update_snapshot_refcount(s, int(sn.l1_table_offset), int(sn.l1_size), -1)
    rc.free_clusters(s, int(sn.l1_table_offset), int(sn.l1_size) * 8, discard=True)
    update_snapshot_refcount(s, s.l1_table_offset, s.l1_size, 0)
