"""Internal snapshots (qcow2.rst "Snapshots"; block/qcow2-snapshot.c).

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
data cluster it reaches. Writes then copy-on-write shared clusters (refcount > 1, no
COPIED flag: model/write.py). The operations, in QEMU's order:

- create (qcow2_snapshot_create): copy the active L1 to new clusters (COPIED bits and
  all), add a reference to everything the active L1 reaches and clear COPIED where the
  refcount is no longer 1 (qcow2_update_snapshot_refcount +1), rewrite the snapshot table
  to new clusters (qcow2_write_snapshots) and free the old one.
- apply (qcow2_snapshot_goto): resize to the snapshot's disk size if it differs, grow the
  active L1 if needed, add a reference to what the snapshot reaches, write the snapshot's
  L1 over the active one (its COPIED flags cleared, where QEMU writes them stale: see
  apply), drop a reference from what the old active L1 reached, then fix COPIED flags of
  the new active tables.
- delete (qcow2_snapshot_delete): rewrite the snapshot table without it, drop a reference
  from what it reaches, free its L1 table, fix COPIED flags of the active tables.
- reading a snapshot (qcow2_snapshot_load_tmp): reads go through the snapshot's L1; the
  virtual size stays the image's.

Snapshots are looked up by id first, then by name (find_snapshot_by_id_or_name).

Errors: RequestError for an unknown snapshot or a name QEMU would refuse;
UnsupportedFeature for snapshots of an image with an external data file (QEMU: -ENOTSUP);
CorruptionError for inconsistencies in the tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import construct as c

from model import mapping as mp
from model import overlap as ov
from model import resize as rs
from model.state import State
from spec import refblocks as rb
from spec.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    ClusterType,
    cluster_type,
    compressed_range,
)
from spec.errors import CorruptionError, RequestError, UnsupportedFeature
from spec.image import open_image, validate_table
from spec.info import snapshot_list
from spec.limits import QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS
from spec.qfile import Qcow2File
from spec.snapshot_table import EXTRA_DATA_SIZE, read_snapshot_table, write_snapshots


def _find(q: Qcow2File, name: str) -> int:
    table = read_snapshot_table(q)
    for by in ("id_str", "name"):
        for i, s in enumerate(table):
            if bytes(s[by]).decode("utf-8", "surrogateescape") == name:
                return i
    raise RequestError(f"can't find snapshot {name!r}")


def load_for_reading(state: State, name: str) -> None:
    """qcow2_snapshot_load_tmp: point reads at the snapshot's L1 table."""
    s = read_snapshot_table(state.q)[_find(state.q, name)]
    validate_snapshot_l1(state.q, s)
    state.snapshot_l1 = (int(s.l1_table_offset), int(s.l1_size))


def update_snapshot_refcount(q: Qcow2File, l1_offset: int, l1_size: int, addend: int,
                             l1: list[int] | None = None) -> None:
    """qcow2_update_snapshot_refcount: add ``addend`` to every L2 table and data cluster the
    L1 table reaches, and set COPIED exactly where the refcount is now 1.

    ``l1`` overrides the table read from disk (apply passes the old active table, which QEMU
    still has in memory). The L1 table is written back only for ``addend >= 0``; L2 tables
    are always updated in place, as QEMU's cache does. Freed clusters are discarded
    (QCOW2_DISCARD_SNAPSHOT, passed through by default).

    A refcount overflow half-way (RequestError) undoes nothing but the failing update itself,
    as QEMU: the refcounts already raised and the L2 entries already changed stay, and the
    L1 table is not written.
    """
    cs = q.cluster_size
    table = mp.read_l1(q, l1_offset, l1_size) if l1 is None else list(l1)
    modified = False
    for i, l1e in enumerate(table):
        if not l1e:
            continue
        l2off = l1e & L1E_OFFSET_MASK
        if l2off % cs:
            raise CorruptionError(f"L2 table offset {l2off:#x} unaligned (L1 index {i:#x})")
        l2 = mp.read_l2(q, l2off)
        dirty = False
        try:
            for j, (old, bitmap) in enumerate(l2):
                entry = old & ~QCOW_OFLAG_COPIED
                t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
                if t is ClusterType.COMPRESSED:
                    if addend:
                        coff, csize = compressed_range(entry, q.cluster_bits)
                        rb.update_refcount(q, coff, csize, addend, discard=addend < 0)
                    refcount = 2  # compressed clusters are never written in place
                elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    off = entry & L2E_OFFSET_MASK
                    if off % cs:
                        raise CorruptionError(f"cluster offset {off:#x} unaligned")
                    if addend:
                        rb.update_refcount(q, off, cs, addend, discard=addend < 0)
                    refcount = rb.get_refcount(q, off // cs)
                else:
                    refcount = 0
                if refcount == 1:
                    entry |= QCOW_OFLAG_COPIED
                if entry != old:
                    l2[j] = (entry, bitmap)
                    dirty = True
        except CorruptionError:
            raise  # QEMU stops serving the image; its dirty cache never reaches the file
        except Exception:
            # QEMU changes each entry in the cached L2 slice as it goes and marks the slice
            # dirty, so when a refcount update fails half-way (-EINVAL on a refcount
            # overflow, say) the entries already done, COPIED cleared, still reach the file
            # together with their raised refcounts; nothing is rolled back
            # (qcow2_update_snapshot_refcount, its fail: path).
            if dirty:
                mp.write_l2(q, l2off, l2)
            raise
        if dirty:
            mp.write_l2(q, l2off, l2)
        if addend:
            rb.update_refcount(q, l2off, cs, addend, discard=addend < 0)
        new = l2off | (QCOW_OFLAG_COPIED if rb.get_refcount(q, l2off // cs) == 1 else 0)
        if new != l1e:
            table[i] = new
            modified = True
    if addend >= 0 and modified:
        mp.write_l1(q, table, l1_offset)


def create(state: State, name: str) -> None:
    """qcow2_snapshot_create (see the module doc). The id is one more than the largest
    numeric id (find_new_snapshot_id); names need not be unique, as in qemu-img."""
    q = state.q
    if q.has_data_file:
        raise UnsupportedFeature("internal snapshots with an external data file")
    if not name:
        raise RequestError("snapshot name must not be empty")
    table = read_snapshot_table(q)
    if len(table) >= QCOW_MAX_SNAPSHOTS:
        raise RequestError("too many snapshots")
    ids = [int(s.id_str) for s in table if bytes(s.id_str).isdigit()]
    id_str = str(max(ids, default=0) + 1).encode()
    l1_size = int(q.header.l1_size)
    l1 = mp.read_l1(q)
    l1_offset = rb.alloc_clusters(q, q.geometry.size_to_clusters(l1_size * 8)) if l1_size else 0
    if l1_size:
        try:
            # qcow2_snapshot_create checks the copy's clusters against every kind of metadata.
            ov.check_metadata_write(q, l1_offset, l1_size * 8, "")
        except CorruptionError:
            # QEMU's allocation is still in its refcount cache, which the flagged node never
            # writes back: the file keeps the refcounts it had, so the model frees what it
            # wrote through.
            rb.free_clusters(q, l1_offset, l1_size * 8)
            raise
        mp.write_l1(q, l1, l1_offset)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), l1_size, 1)
    now = time.time_ns()
    new = c.Container(
        l1_table_offset=l1_offset, l1_size=l1_size, id_str=id_str, name=name.encode(),
        date_sec=now // 10**9, date_nsec=now % 10**9, vm_clock_nsec=0, vm_state_size=0,
        extra_data_size=EXTRA_DATA_SIZE,
        extra_data=c.Container(vm_state_size_large=0, disk_size=state.size, icount=0, unknown=b""),
        id_str_size=len(id_str), name_size=len(name.encode()))
    write_snapshots(q, [*table, new], _table_check(q, [*table, new]))


def _table_check(q: Qcow2File, table: list[c.Container]) -> Callable[[int, int], None]:
    """qcow2_write_snapshots' overlap check of the new table's clusters: nothing ignored,
    the new list (``table``) in memory and the old table still in effect. The allocation
    was flushed before it (bdrv_flush), so a refusal keeps it, as the model's file does."""
    snapshots = [(int(s.l1_table_offset), int(s.l1_size)) for s in table]

    def check(offset: int, n: int) -> None:
        try:
            ov.check_metadata_write(q, offset, n, "", snapshots)
        except CorruptionError:
            # What QEMU leaves in the file (impl/snapshot.py _refused_table): the header
            # rewritten at the flag with the new list's count and the old table's offset,
            # and the new clusters punched out by the fail path's QCOW2_DISCARD_ALWAYS free,
            # whose refcount change stays in QEMU's cache, never written back.
            q.header.nb_snapshots = len(table)
            q.write_header()
            q.punch_hole(offset, q.geometry.size_to_clusters(n) * q.cluster_size)
            raise
    return check


def validate_snapshot_l1(q: Qcow2File, s: Any) -> None:
    """qcow2_validate_table on a snapshot's L1 table, which qcow2_snapshot_goto and
    qcow2_snapshot_delete run before they change anything (block/qcow2-snapshot.c): at most
    QCOW_MAX_L1_SIZE bytes, cluster aligned, its end within int64. FormatError otherwise, so
    a snapshot's l1_size never decides how much memory is taken."""
    validate_table(int(s.l1_table_offset), int(s.l1_size), 8, QCOW_MAX_L1_SIZE, q.cluster_size,
                   "snapshot.l1_size", "snapshot.l1_table_offset")


def apply(state: State, name: str) -> None:
    """qcow2_snapshot_goto (see the module doc)."""
    q = state.q
    if q.has_data_file:
        raise UnsupportedFeature("internal snapshots with an external data file")
    s = read_snapshot_table(q)[_find(q, name)]
    validate_snapshot_l1(q, s)
    disk_size = int(s.extra_data.disk_size) if s.extra_data.disk_size is not None else state.size
    if disk_size != state.size:
        rs.resize(state, disk_size, True)
    sn_off, sn_size = int(s.l1_table_offset), int(s.l1_size)
    if sn_size > int(q.header.l1_size):
        rs.grow_l1(q, sn_size)
    cur_size = int(q.header.l1_size)
    sn_l1 = mp.read_l1(q, sn_off, sn_size) + [0] * (cur_size - sn_size)
    update_snapshot_refcount(q, sn_off, sn_size, 1)
    old_active = mp.read_l1(q)
    # The snapshot's L1 table was copied with the active table's COPIED flags, and the +1
    # just above left every table it reaches shared (refcount >= 2). QEMU writes it as the
    # active table flags and all and fixes them only after the -1 below: a crash in between
    # leaves COPIED on a shared L2 table, a corruption. Written without any COPIED flag it
    # is right as it stands; the addend-0 pass then sets the flags where the refcount has
    # dropped to 1, and the file ends byte for byte as QEMU's.
    # qcow2_snapshot_goto checks the active table's clusters before it overwrites them, the
    # active L1 ignored.
    ov.check_metadata_write(q, int(q.header.l1_table_offset), cur_size * 8, "active L1 table")
    mp.write_l1(q, [e & ~QCOW_OFLAG_COPIED for e in sn_l1])
    update_snapshot_refcount(q, int(q.header.l1_table_offset), cur_size, -1, l1=old_active)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), cur_size, 0)


def delete(state: State, name: str) -> None:
    """qcow2_snapshot_delete (see the module doc)."""
    q = state.q
    table = read_snapshot_table(q)
    i = _find(q, name)
    validate_snapshot_l1(q, table[i])
    s = table.pop(i)
    write_snapshots(q, table, _table_check(q, table))
    update_snapshot_refcount(q, int(s.l1_table_offset), int(s.l1_size), -1)
    rb.free_clusters(q, int(s.l1_table_offset), int(s.l1_size) * 8, discard=True)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), int(q.header.l1_size), 0)


def listing(state: State) -> list[dict[str, Any]]:
    """The snapshots as ``qemu-img info --output=json`` lists them (spec.info)."""
    f = open_image(state.filename)
    try:
        return list(snapshot_list(f) or [])
    finally:
        f.close()
