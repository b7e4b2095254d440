"""Persistent dirty bitmaps (qcow2.rst "Bitmaps", "Bitmap directory"; block/qcow2-bitmap.c)."""

from __future__ import annotations

import construct as c

this = c.this

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = 0xFFFFFFFC
"""Flags QEMU 7.2 refuses (block/qcow2-bitmap.c, check_dir_entry). qcow2.rst defines bit 2,
extra_data_compatible, but QEMU counts it as reserved (it supports no extra data at all, see
bitmap_list_load), so a directory entry with bit 2 set fails to load there. We match QEMU."""
BME_SPEC_RESERVED_FLAGS = ~0x7 & 0xFFFFFFFF
"""Bits 3-31: reserved according to qcow2.rst "Bitmap directory"."""
BT_DIRTY_TRACKING_BITMAP = 1
BITMAP_DIR_ENTRY_HEADER_SIZE = 24

BitmapDirectoryEntry = c.Struct(
    "bitmap_table_offset" / c.Int64ub * "Offset of the bitmap table. Cluster aligned.",
    "bitmap_table_size" / c.Int32ub * "Number of entries in the bitmap table.",
    "flags" / c.Int32ub * "Bit 0 in_use, 1 auto, 2 extra_data_compatible; bits 3-31 zero.",
    "type" / c.Int8ub * "1 = dirty tracking bitmap; other values reserved.",
    "granularity_bits" / c.Int8ub * "log2(bytes per bit); 0..63 (QEMU: 9..31).",
    "name_size" / c.Int16ub * "Length of the name; non-zero (QEMU: at most 1023).",
    "extra_data_size" / c.Int32ub * "Size of type-specific extra data; none is defined.",
    "extra_data" / c.Bytes(this.extra_data_size) * "Extra data, kept as is.",
    "name" / c.Bytes(this.name_size) * "Bitmap name (not NUL-terminated), unique in the image.",
    "padding" / c.Bytes(
        lambda ctx: -(BITMAP_DIR_ENTRY_HEADER_SIZE + ctx.extra_data_size + ctx.name_size) % 8
    ) * "Padding to a multiple of 8; must be zero.",
)
"""One bitmap directory entry (variable length, 8-byte aligned)."""


def bitmap_directory(nb_bitmaps: int) -> c.Construct:
    """``nb_bitmaps`` entries back to back (the directory must hold exactly these)."""
    return c.Array(nb_bitmaps, BitmapDirectoryEntry)


def dir_entry_size(name_size: int, extra_data_size: int) -> int:
    """Bytes one directory entry occupies, padding included (calc_dir_entry_size)."""
    n = BITMAP_DIR_ENTRY_HEADER_SIZE + name_size + extra_data_size
    return n + (-n % 8)
