"""The snapshot table on the raw file: read as qcow2_read_snapshots reads it, written as
qcow2_write_snapshots writes it (qcow2.rst "Snapshots"; block/qcow2-snapshot.c).

Shared by the model's snapshot operations and the repair engine's rewrite of a table whose
entries lack the version 3 extra data (spec/check/fix_pass.py). Entries are parsed with the
spec schema (spec.snapshot.SnapshotHeader), one at a time; QEMU's size limits bound what is
read.

Errors: CorruptionError for a table past QEMU's limits; RequestError for a table that would
grow past them.
"""

from __future__ import annotations

import construct as c

from spec import refblocks as rb
from spec.errors import CorruptionError, RequestError
from spec.image import parse
from spec.limits import QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE
from spec.qfile import Qcow2File
from spec.snapshot import SnapshotHeader

EXTRA_DATA_SIZE = 24
"""sizeof(QCowSnapshotExtraData): vm_state_size_large, disk_size, icount."""


def read_snapshot_table(q: Qcow2File) -> list[c.Container]:
    """The snapshot table as it is on disk now (qcow2_read_snapshots)."""
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


def snapshot_table_size(q: Qcow2File) -> int:
    """Bytes the table takes: entries 8-byte aligned, the last one not padded."""
    size = 0
    for s in read_snapshot_table(q):
        size += -size % 8
        size += 40 + int(s.extra_data_size) + int(s.id_str_size) + int(s.name_size)
    return size


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
    offset = rb.alloc_clusters(q, q.geometry.size_to_clusters(len(data))) if data else (
        q.free_cluster_index * q.cluster_size)
    if data:
        q.pwrite(offset, data)
    old_offset, old_size = int(q.header.snapshots_offset), snapshot_table_size(q)
    q.header.nb_snapshots = len(entries)
    q.header.snapshots_offset = offset
    q.write_header()
    if old_size:
        rb.free_clusters(q, old_offset, old_size, discard=True)
