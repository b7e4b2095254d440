"""Persistent dirty bitmaps (qcow2.rst "Bitmaps", "Bitmap directory"; block/qcow2-bitmap.c)."""

from __future__ import annotations

import construct as c

this = c.this

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~0x7 & 0xFFFFFFFF
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
    return c.Array(nb_bitmaps, BitmapDirectoryEntry)
