"""Internal snapshots (qcow2.rst "Snapshots"; block/qcow2-snapshot.c).

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
data cluster it reaches. Writes then copy-on-write shared clusters (refcount > 1, no
COPIED flag: model/image.py). The operations, in QEMU's order:

- create (qcow2_snapshot_create): copy the active L1 to new clusters (COPIED bits and
  all), add a reference to everything the active L1 reaches and clear COPIED where the
  refcount is no longer 1 (qcow2_update_snapshot_refcount +1), rewrite the snapshot table
  to new clusters (qcow2_write_snapshots) and free the old one.
- apply (qcow2_snapshot_goto): resize to the snapshot's disk size if it differs, grow the
  active L1 if needed, add a reference to what the snapshot reaches, write the snapshot's
  L1 over the active one, drop a reference from what the old active L1 reached, then fix
  COPIED flags of the new active tables.
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
from typing import TYPE_CHECKING, Any

import construct as c

from model import mapping as mp
from model import refcounts as rc
from spec.entries import L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COPIED, ClusterType, cluster_type
from spec.errors import CorruptionError, RequestError, UnsupportedFeature
from spec.image import open_image, parse
from spec.info import snapshot_list
from spec.limits import QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE
from spec.snapshot import SnapshotHeader

if TYPE_CHECKING:
    from model.image import Image
    from model.qfile import Qcow2File

EXTRA_DATA_SIZE = 24
"""sizeof(QCowSnapshotExtraData): vm_state_size_large, disk_size, icount."""


def _table(q: Qcow2File) -> list[c.Container]:
    """The snapshot table as it is on disk now (qcow2_read_snapshots), parsed with the spec
    schema entry by entry; QEMU's size limits bound what is read."""
    out = []
    offset = int(q.header.snapshots_offset)
    total = 0
    for i in range(int(q.header.nb_snapshots)):
        fixed = q.pread(offset, 40)
        extra = int.from_bytes(fixed[36:40], "big")
        n = 40 + extra + int.from_bytes(fixed[12:14], "big") + int.from_bytes(fixed[14:16], "big")
        n += -n % 8
        total += n
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA or total > QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptionError(f"snapshot {i} exceeds QEMU's limits")
        out.append(parse(SnapshotHeader, q.pread(offset, n), f"snapshots[{i}]"))
        offset += n
    return out


def _find(q: Qcow2File, name: str) -> int:
    table = _table(q)
    for by in ("id_str", "name"):
        for i, s in enumerate(table):
            if bytes(s[by]).decode("utf-8", "surrogateescape") == name:
                return i
    raise RequestError(f"can't find snapshot {name!r}")


def load_for_reading(img: Image, name: str) -> None:
    """qcow2_snapshot_load_tmp: point reads at the snapshot's L1 table."""
    s = _table(img.q)[_find(img.q, name)]
    img.snapshot_l1 = (int(s.l1_table_offset), int(s.l1_size))


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
                        from spec.entries import compressed_range

                        coff, csize = compressed_range(entry, q.cluster_bits)
                        rc.update_refcount(q, coff, csize, addend, discard=addend < 0)
                    refcount = 2  # compressed clusters are never written in place
                elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                    off = entry & L2E_OFFSET_MASK
                    if off % cs:
                        raise CorruptionError(f"cluster offset {off:#x} unaligned")
                    if addend:
                        rc.update_refcount(q, off, cs, addend, discard=addend < 0)
                    refcount = rc.get_refcount(q, off // cs)
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
            rc.update_refcount(q, l2off, cs, addend, discard=addend < 0)
        new = l2off | (QCOW_OFLAG_COPIED if rc.get_refcount(q, l2off // cs) == 1 else 0)
        if new != l1e:
            table[i] = new
            modified = True
    if addend >= 0 and modified:
        mp.write_l1(q, table, l1_offset)


def _entry_bytes(s: c.Container) -> bytes:
    """One snapshot table entry as qcow2_write_snapshots writes it, without its trailing
    padding: extra data at least the 24 bytes QEMU knows, unknown extra data kept."""
    extra = s.extra_data
    unknown = bytes(extra.unknown) if extra.unknown else b""
    large = extra.vm_state_size_large
    vm_state = int(large) if large is not None else int(s.vm_state_size)
    body = SnapshotHeader.build({
        "l1_table_offset": s.l1_table_offset, "l1_size": s.l1_size,
        "id_str_size": len(s.id_str), "name_size": len(s.name),
        "date_sec": s.date_sec, "date_nsec": s.date_nsec, "vm_clock_nsec": s.vm_clock_nsec,
        "vm_state_size": vm_state if vm_state <= 0xFFFFFFFF else 0,
        "extra_data_size": EXTRA_DATA_SIZE + len(unknown),
        "extra_data": {"vm_state_size_large": vm_state,
                       "disk_size": int(extra.disk_size) if extra.disk_size is not None else 0,
                       "icount": int(extra.icount) if extra.icount is not None else (1 << 64) - 1,
                       "unknown": unknown},
        "id_str": bytes(s.id_str), "name": bytes(s.name),
        "padding": bytes(-(40 + EXTRA_DATA_SIZE + len(unknown) + len(s.id_str) + len(s.name)) % 8),
    })
    return body[:40 + EXTRA_DATA_SIZE + len(unknown) + len(s.id_str) + len(s.name)]


def write_snapshots(q: Qcow2File, entries: list[c.Container]) -> None:
    """qcow2_write_snapshots: the whole table to new clusters, then the header, then the
    old table is freed. Entries are 8-byte aligned; the last one is not padded."""
    blobs = [_entry_bytes(s) for s in entries]
    data = b""
    for b in blobs:
        data += bytes(-len(data) % 8) + b
    if len(data) > QCOW_MAX_SNAPSHOTS_SIZE:
        raise RequestError("snapshot table too large")
    offset = rc.alloc_clusters(q, q.geometry.size_to_clusters(len(data))) if data else (
        q.free_cluster_index * q.cluster_size)
    if data:
        q.pwrite(offset, data)
    old_offset, old_size = int(q.header.snapshots_offset), _table_size(q)
    q.header.nb_snapshots = len(entries)
    q.header.snapshots_offset = offset
    q.write_header()
    if old_size:
        rc.free_clusters(q, old_offset, old_size, discard=True)


def _table_size(q: Qcow2File) -> int:
    size = 0
    for s in _table(q):
        size += -size % 8
        size += 40 + int(s.extra_data_size) + int(s.id_str_size) + int(s.name_size)
    return size


def create(img: Image, name: str) -> None:
    """qcow2_snapshot_create (see the module doc). The id is one more than the largest
    numeric id (find_new_snapshot_id); names need not be unique, as in qemu-img."""
    q = img.q
    if q.has_data_file:
        raise UnsupportedFeature("internal snapshots with an external data file")
    if not name:
        raise RequestError("snapshot name must not be empty")
    table = _table(q)
    if len(table) >= QCOW_MAX_SNAPSHOTS:
        raise RequestError("too many snapshots")
    ids = [int(s.id_str) for s in table if bytes(s.id_str).isdigit()]
    id_str = str(max(ids, default=0) + 1).encode()
    l1_size = int(q.header.l1_size)
    l1 = mp.read_l1(q)
    l1_offset = rc.alloc_clusters(q, q.geometry.size_to_clusters(l1_size * 8)) if l1_size else 0
    if l1_size:
        mp.write_l1(q, l1, l1_offset)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), l1_size, 1)
    now = time.time_ns()
    new = c.Container(
        l1_table_offset=l1_offset, l1_size=l1_size, id_str=id_str, name=name.encode(),
        date_sec=now // 10**9, date_nsec=now % 10**9, vm_clock_nsec=0, vm_state_size=0,
        extra_data_size=EXTRA_DATA_SIZE,
        extra_data=c.Container(vm_state_size_large=0, disk_size=img.size, icount=0, unknown=b""),
        id_str_size=len(id_str), name_size=len(name.encode()))
    write_snapshots(q, [*table, new])


def apply(img: Image, name: str) -> None:
    """qcow2_snapshot_goto (see the module doc)."""
    q = img.q
    if q.has_data_file:
        raise UnsupportedFeature("internal snapshots with an external data file")
    s = _table(q)[_find(q, name)]
    disk_size = int(s.extra_data.disk_size) if s.extra_data.disk_size is not None else img.size
    if disk_size != img.size:
        from model import resize as rs

        rs.resize(img, disk_size, True, from_snapshot=True)
    sn_off, sn_size = int(s.l1_table_offset), int(s.l1_size)
    if sn_size > int(q.header.l1_size):
        from model import resize as rs

        rs.grow_l1(q, sn_size)
    cur_size = int(q.header.l1_size)
    sn_l1 = mp.read_l1(q, sn_off, sn_size) + [0] * (cur_size - sn_size)
    update_snapshot_refcount(q, sn_off, sn_size, 1)
    old_active = mp.read_l1(q)
    mp.write_l1(q, sn_l1)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), cur_size, -1, l1=old_active)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), cur_size, 0)


def delete(img: Image, name: str) -> None:
    """qcow2_snapshot_delete (see the module doc)."""
    q = img.q
    table = _table(q)
    i = _find(q, name)
    s = table.pop(i)
    write_snapshots(q, table)
    update_snapshot_refcount(q, int(s.l1_table_offset), int(s.l1_size), -1)
    rc.free_clusters(q, int(s.l1_table_offset), int(s.l1_size) * 8, discard=True)
    update_snapshot_refcount(q, int(q.header.l1_table_offset), int(q.header.l1_size), 0)


def listing(img: Image) -> list[dict[str, Any]]:
    """The snapshots as ``qemu-img info --output=json`` lists them (spec.info)."""
    f = open_image(img.filename)
    try:
        return list(snapshot_list(f) or [])
    finally:
        f.close()
