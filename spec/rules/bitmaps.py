"""Persistent bitmaps as ``qemu-img check`` counts them (qcow2.rst "Bitmaps",
"Bitmap directory", "Bitmap table"; block/qcow2-bitmap.c bitmap_list_load, check_dir_entry,
check_table_entry, qcow2_check_bitmaps_refcounts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from spec import entries as en
from spec import limits as lim
from spec.bitmaps import (
    BITMAP_DIR_ENTRY_HEADER_SIZE,
    BME_FLAG_IN_USE,
    BME_RESERVED_FLAGS,
    BT_DIRTY_TRACKING_BITMAP,
)
from spec.features import QCOW2_AUTOCLEAR_BITMAPS
from spec.header import QCOW2_EXT_MAGIC_BITMAPS
from spec.refcounts import Kind
from spec.rules.context import Context

if TYPE_CHECKING:
    import numpy as np
else:
    # Executed at first use: a small clean image is checked without numpy
    # (spec/rules/quick.py), and importing it is most of qcow2lab check's start-up.
    from spec.lazy import numpy as np

BME_MAX_PHYS_SIZE = 0x20000000
"""Bytes of bitmap data QEMU accepts per bitmap (block/qcow2-bitmap.c)."""


@dataclass
class DirEntry:
    offset: int
    table_offset: int
    table_size: int
    flags: int
    name: bytes


def _dir_entry_problem(ctx: Context, table_offset: int, table_size: int, flags: int, btype: int,
                       gran: int, name_size: int) -> str | None:
    """What check_dir_entry rejects, or None."""
    cs = ctx.cluster_size
    if table_size == 0 or table_offset == 0 or table_offset % cs:
        return "bitmap table offset or size is invalid"
    if table_size > lim.BME_MAX_TABLE_SIZE:
        return "bitmap table too large"
    if not lim.BME_MIN_GRANULARITY_BITS <= gran <= lim.BME_MAX_GRANULARITY_BITS:
        return f"granularity_bits {gran} outside 9..31"
    if flags & BME_RESERVED_FLAGS:
        return f"reserved flags set ({flags:#x})"
    if name_size > lim.BME_MAX_NAME_SIZE:
        return "name too long"
    if btype != BT_DIRTY_TRACKING_BITMAP:
        return f"unknown bitmap type {btype}"
    phys = table_size * cs
    if phys > BME_MAX_PHYS_SIZE:
        return "bitmap data too large"
    # A bitmap that is not in use must cover the whole disk; an in-use one may be stale.
    if not flags & BME_FLAG_IN_USE and ctx.img.size > (phys * 8) << gran:
        return "bitmap table too small for the disk size"
    return None


def load_directory(ctx: Context) -> list[DirEntry]:
    """bitmap_list_load: any failure counts one corruption and stops QEMU's check."""
    ext = ctx.img.extension(QCOW2_EXT_MAGIC_BITMAPS)
    assert ext is not None
    d = ext.data
    start, size, nb = int(d.bitmap_directory_offset), int(d.bitmap_directory_size), int(d.nb_bitmaps)

    def broken(msg: str, at: int | None = None) -> Exception:
        return ctx.abort("BITMAP-DIRECTORY-VALID", start if at is None else at, msg)

    if size == 0:
        raise broken("bitmap directory size is zero")
    data = ctx.read(start, size)
    pos, out = 0, list[DirEntry]()
    while pos < size:
        if pos + BITMAP_DIR_ENTRY_HEADER_SIZE > size:
            raise broken("bitmap directory entry runs past the directory", start + pos)
        if len(out) + 1 > nb:
            raise broken("more bitmaps in the directory than nb_bitmaps", start + pos)
        e = data[pos:pos + BITMAP_DIR_ENTRY_HEADER_SIZE]
        t_off, t_size = int.from_bytes(e[0:8], "big"), int.from_bytes(e[8:12], "big")
        flags, btype, gran = int.from_bytes(e[12:16], "big"), e[16], e[17]
        name_size, extra = int.from_bytes(e[18:20], "big"), int.from_bytes(e[20:24], "big")
        length = BITMAP_DIR_ENTRY_HEADER_SIZE + extra + name_size
        nxt = pos + length + (-length % 8)
        if nxt > size:
            raise broken("bitmap directory entry runs past the directory", start + pos)
        if extra:
            raise broken("bitmap extra data (QEMU supports none)", start + pos)
        problem = _dir_entry_problem(ctx, t_off, t_size, flags, btype, gran, name_size)
        if problem:
            raise broken(f"bitmap {len(out)}: {problem}", start + pos)
        name = data[pos + BITMAP_DIR_ENTRY_HEADER_SIZE + extra:pos + length]
        out.append(DirEntry(start + pos, t_off, t_size, flags, name))
        pos = nxt
    if len(out) != nb:
        raise broken(f"{len(out)} bitmaps in the directory, nb_bitmaps says {nb}")
    return out


def count_bitmaps(ctx: Context) -> None:
    """qcow2_check_bitmaps_refcounts: directory, tables and data clusters are referenced.

    QEMU ignores the extension unless the bitmaps autoclear bit is set (qcow2_read_extensions),
    so without it the bitmap clusters are leaks.
    """
    img = ctx.img
    ext = img.extension(QCOW2_EXT_MAGIC_BITMAPS)
    if ext is None or not img.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS:
        return
    d = ext.data
    ctx.ref(int(d.bitmap_directory_offset), int(d.bitmap_directory_size), Kind.BITMAP_DIRECTORY,
            "bitmap directory")
    bms = load_directory(ctx)
    cs = ctx.cluster_size
    for bm in bms:
        ctx.ref(bm.table_offset, bm.table_size * 8, Kind.BITMAP_TABLE, "bitmap table")
        table = np.frombuffer(ctx.read(bm.table_offset, bm.table_size * 8), dtype=">u8").astype(np.uint64)
        offs = table & np.uint64(en.BME_TABLE_ENTRY_OFFSET_MASK)
        bad = (table & np.uint64(en.BME_TABLE_ENTRY_RESERVED_MASK)) != 0
        bad |= (offs != 0) & (((table & np.uint64(en.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
                              | ((offs % np.uint64(cs)) != 0))
        if bad.any():
            j = int(np.nonzero(bad)[0][0])
            # bitmap_table_load refuses the whole table: one corruption, and the check fails.
            raise ctx.abort("BITMAP-TABLE-ENTRY-VALID", bm.table_offset + 8 * j,
                            f"bitmap {bm.name!r}: table entry {j} = {int(table[j]):#x} is invalid")
        ctx.refs(offs[offs != 0], cs, Kind.BITMAP_DATA, "bitmap data")
    seen: set[bytes] = set()
    for bm in bms:
        if bm.name in seen:
            raise ctx.abort("BITMAP-NAMES-UNIQUE", bm.offset, f"bitmap name {bm.name!r} is not unique")
        seen.add(bm.name)
    for bm in bms:
        if bm.flags & BME_FLAG_IN_USE:
            ctx.add("BITMAP-NOT-IN-USE", bm.offset, f"bitmap {bm.name!r} is marked in use")
