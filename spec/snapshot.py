"""The snapshot table (qcow2.rst "Snapshots"; block/qcow2-snapshot.c for QEMU's reading)."""

from __future__ import annotations

import construct as c

this = c.this

SNAPSHOT_HEADER_SIZE = 40
SNAPSHOT_EXTRA_DATA_V3_MIN = 16
"""Version 3 images must carry extra data at least up to byte 55 (vm_state_size_large, disk_size)."""

SnapshotExtraData = c.Struct(
    "vm_state_size_large" / c.If(this._.extra_data_size >= 8, c.Int64ub)
    * "Bytes 40-47: VM state size; when present, vm_state_size is ignored.",
    "disk_size" / c.If(this._.extra_data_size >= 16, c.Int64ub)
    * "Bytes 48-55: virtual disk size of the snapshot.",
    "icount" / c.If(this._.extra_data_size >= 24, c.Int64ub)
    * "Bytes 56-63: record/replay instruction count; -1 (all ones) if icount was disabled.",
    "unknown" / c.GreedyBytes * "Extra data this version does not know: kept byte for byte.",
)

SnapshotHeader = c.Struct(
    "l1_table_offset" / c.Int64ub * "Offset of the snapshot's L1 table. Cluster aligned.",
    "l1_size" / c.Int32ub * "Number of entries in the snapshot's L1 table.",
    "id_str_size" / c.Int16ub * "Length of the unique ID string.",
    "name_size" / c.Int16ub * "Length of the snapshot name.",
    "date_sec" / c.Int32ub * "Creation time, seconds since the Epoch.",
    "date_nsec" / c.Int32ub * "Creation time, sub-second part in nanoseconds.",
    "vm_clock_nsec" / c.Int64ub * "Guest run time until the snapshot, in nanoseconds.",
    "vm_state_size" / c.Int32ub * "VM state size in bytes; 0 without VM state.",
    "extra_data_size" / c.Int32ub * "Size of the extra data (QEMU: at most 1024).",
    "extra_data" / c.FixedSized(this.extra_data_size, SnapshotExtraData)
    * "Extra data: vm_state_size_large, disk_size, icount, then unknown bytes.",
    "id_str" / c.Bytes(this.id_str_size) * "Unique ID string (not NUL-terminated).",
    "name" / c.Bytes(this.name_size) * "Snapshot name (not NUL-terminated).",
    "padding" / c.Bytes(
        lambda ctx: -(SNAPSHOT_HEADER_SIZE + ctx.extra_data_size + ctx.id_str_size + ctx.name_size) % 8
    ) * "Padding to a multiple of 8.",
)
"""One snapshot table entry (variable length, 8-byte aligned)."""


def snapshot_entry_size(extra_data_size: int, id_str_size: int, name_size: int) -> int:
    """Bytes of one entry without its trailing padding (what QEMU adds to the table length)."""
    return SNAPSHOT_HEADER_SIZE + extra_data_size + id_str_size + name_size


def snapshot_table(nb_snapshots: int) -> c.Construct:
    """``nb_snapshots`` entries, contiguous at ``snapshots_offset``."""
    return c.Array(nb_snapshots, SnapshotHeader)
