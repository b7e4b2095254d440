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

from collections.abc import Callable

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
    return read_entries(q.pread, int(q.header.snapshots_offset), int(q.header.nb_snapshots))


_ZERO_ENTRY = bytes(40)
"""An entry with no ID, name or extra data, all fields zero: what a table past EOF reads as."""


def read_entries(pread: Callable[[int, int], bytes], offset: int, count: int) -> list[c.Container]:
    """``count`` entries from ``offset``, read with ``pread(offset, n)`` (either engine's
    host file), within QEMU's limits on extra data and on the table's size."""
    out = []
    total = 0
    zero: c.Container | None = None
    for i in range(count):
        fixed = pread(offset, 40)
        extra = int.from_bytes(fixed[36:40], "big")
        n = 40 + extra + int.from_bytes(fixed[12:14], "big") + int.from_bytes(fixed[14:16], "big")
        n += -n % 8
        total += n
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA or total > QCOW_MAX_SNAPSHOTS_SIZE:
            raise CorruptionError(f"snapshot {i} exceeds QEMU's limits")
        if fixed == _ZERO_ENTRY:
            # A table past the end of the file reads as zeros (up to 65,536 such entries, as
            # QEMU lists them): the empty entry is parsed once and copied.
            if zero is None:
                zero = parse(SnapshotHeader, _ZERO_ENTRY, f"snapshots[{i}]")
            out.append(c.Container(zero))
        else:
            out.append(parse(SnapshotHeader, pread(offset, n), f"snapshots[{i}]"))
        offset += n
    return out


def snapshot_table_size(q: Qcow2File) -> int:
    """Bytes the table on disk takes (table_size)."""
    return table_size(read_snapshot_table(q))


def table_size(entries: list[c.Container]) -> int:
    """Bytes a table of ``entries`` takes: entries 8-byte aligned, the last one not padded."""
    size = 0
    for s in entries:
        size += -size % 8
        size += 40 + int(s.extra_data_size) + len(bytes(s.id_str)) + len(bytes(s.name))
    return size


def encode_entries(entries: list[c.Container]) -> list[tuple[int, bytes]]:
    """(offset in the table, bytes) of each entry (encode_entry), 8-byte aligned, as
    qcow2_write_snapshots writes them: one entry after the other, with the alignment gaps
    between them never written. A reused cluster keeps its old bytes in those gaps in QEMU's
    file, so writing the gaps (as zeros) would make a file that differs from QEMU's.
    RequestError past QCOW_MAX_SNAPSHOTS_SIZE."""
    pieces, size = [], 0
    for s in entries:
        size += -size % 8
        data = encode_entry(s)
        pieces.append((size, data))
        size += len(data)
    if size > QCOW_MAX_SNAPSHOTS_SIZE:
        raise RequestError("snapshot table too large")
    return pieces


def pieces_size(pieces: list[tuple[int, bytes]]) -> int:
    """Bytes the table of encode_entries' ``pieces`` takes (the last entry is not padded)."""
    return pieces[-1][0] + len(pieces[-1][1]) if pieces else 0


def encode_entry(s: c.Container) -> bytes:
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


def write_snapshots(q: Qcow2File, entries: list[c.Container],
                    check: Callable[[int, int], None] | None = None) -> None:
    """qcow2_write_snapshots: the whole table to new clusters (entry by entry, see
    encode_entries), then the header, then the old table is freed. ``check(offset, size)``
    runs on the new clusters before anything is written (the engine's overlap check,
    qcow2_pre_write_overlap_check); it raises to refuse the write, the allocation kept."""
    pieces = encode_entries(entries)
    size = pieces_size(pieces)
    offset = rb.alloc_clusters(q, q.geometry.size_to_clusters(size)) if size else (
        q.free_cluster_index * q.cluster_size)
    if check is not None:
        check(offset, size)
    for at, data in pieces:
        q.pwrite(offset + at, data)
    old_offset, old_size = int(q.header.snapshots_offset), snapshot_table_size(q)
    q.header.nb_snapshots = len(entries)
    q.header.snapshots_offset = offset
    q.write_header()
    if old_size:
        rb.free_clusters(q, old_offset, old_size, discard=True)
