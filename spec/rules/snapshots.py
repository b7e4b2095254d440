"""The snapshot table as ``qemu-img check`` reads it, and the rules on its entries
(qcow2.rst "Snapshots"; block/qcow2-snapshot.c qcow2_check_read_snapshot_table,
qcow2_do_read_snapshots; block/qcow2-refcount.c calculate_refcounts)."""

from __future__ import annotations

from dataclasses import dataclass

from spec import limits as lim
from spec.rules.context import Context
from spec.snapshot import SNAPSHOT_EXTRA_DATA_V3_MIN, SNAPSHOT_HEADER_SIZE


@dataclass
class SnapshotEntry:
    offset: int
    """Host offset of the table entry."""
    l1_table_offset: int
    l1_size: int
    id_str: bytes
    name: bytes
    extra_data_size: int


def read_snapshot_table(ctx: Context) -> tuple[list[SnapshotEntry], int]:
    """(entries, snapshots_size), reading the way qcow2_do_read_snapshots does (no repair).

    The table's offset and entry count are validated first, as the check does (the open skips
    the snapshot table in check mode). Reads past the end of the file give zeros, as in QEMU.
    An entry with more than 1 KiB of extra data, or a table longer than QCOW_MAX_SNAPSHOTS_SIZE,
    makes QEMU's check fail outright.
    """
    h = ctx.img.header
    start = offset = int(h.snapshots_offset)
    nb = int(h.nb_snapshots)
    # qcow2_check_read_snapshot_table validates the table pointer itself (the open skips it in
    # check mode): a failure counts one check error and stops QEMU's check, whatever nb is.
    if nb > lim.QCOW_MAX_SNAPSHOTS:
        raise ctx.abort("SNAPSHOT-TABLE-READABLE", 60,
                        f"{nb} snapshots (QEMU: at most {lim.QCOW_MAX_SNAPSHOTS})")
    if nb * SNAPSHOT_HEADER_SIZE > lim.INT64_MAX - start or start % ctx.cluster_size:
        raise ctx.abort("SNAPSHOT-TABLE-READABLE", 64, f"snapshot table offset {start:#x} is invalid")
    out: list[SnapshotEntry] = []
    for i in range(nb):
        offset += -offset % 8
        fixed = ctx.read(offset, SNAPSHOT_HEADER_SIZE)
        l1_off = int.from_bytes(fixed[0:8], "big")
        l1_size = int.from_bytes(fixed[8:12], "big")
        id_len = int.from_bytes(fixed[12:14], "big")
        name_len = int.from_bytes(fixed[14:16], "big")
        extra = int.from_bytes(fixed[36:40], "big")
        if extra > lim.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise ctx.abort("SNAPSHOT-TABLE-READABLE", offset,
                            f"snapshot {i}: {extra} bytes of extra data (QEMU reads at most 1024)")
        pos = offset + SNAPSHOT_HEADER_SIZE + extra
        id_str = ctx.read(pos, id_len)
        name = ctx.read(pos + id_len, name_len)
        out.append(SnapshotEntry(offset, l1_off, l1_size, id_str, name, extra))
        offset = pos + id_len + name_len
        if offset - start > lim.QCOW_MAX_SNAPSHOTS_SIZE:
            raise ctx.abort("SNAPSHOT-TABLE-READABLE", start, "snapshot table is too big")
    return out, offset - start


def check_snapshot_entries(ctx: Context, snaps: list[SnapshotEntry]) -> None:
    """Spec-only rules on the entries (QEMU does not count these)."""
    seen: set[bytes] = set()
    for i, sn in enumerate(snaps):
        if ctx.img.version >= 3 and sn.extra_data_size < SNAPSHOT_EXTRA_DATA_V3_MIN:
            ctx.add("SNAPSHOT-EXTRA-DATA-V3", sn.offset,
                    f"snapshot {i}: {sn.extra_data_size} bytes of extra data, version 3 needs 16")
        if sn.id_str in seen:
            ctx.add("SNAPSHOT-ID-UNIQUE", sn.offset, f"snapshot {i}: ID {sn.id_str!r} is not unique")
        seen.add(sn.id_str)
