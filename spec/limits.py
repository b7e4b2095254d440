"""QEMU 7.2's implementation limits (block/qcow2.h unless noted).

An image that passes these may still be refused for other reasons, but an image that breaks
one is refused at open with FormatError: this is what keeps memory and time bounded whatever a
header claims.
"""

from __future__ import annotations

QCOW_MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
"""512-byte clusters; qcow2.rst "Header", cluster_bits."""
MAX_CLUSTER_BITS = 21
"""2 MiB clusters: QEMU's implementation limit (block/qcow2.h)."""
MIN_CLUSTER_BITS_EXTENDED_L2 = 14
"""qcow2.rst: with extended L2 entries cluster_bits must be at least 14 (16 KiB)."""

QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
"""Bytes; qcow2.rst "Header", size note."""
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024
"""Bytes; qcow2.rst "Host cluster management"."""
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS
"""Bytes of snapshot table QEMU accepts (qcow2-snapshot.c, qcow2_read_snapshots).
The padding after the last entry is not counted."""
QCOW_BACKING_FORMAT_MAX = 15
"""Longest backing format name: QEMU copies it into a 16-byte buffer with a NUL
(block/qcow2.c, qcow2_read_extensions, QCOW2_EXT_MAGIC_BACKING_FORMAT)."""
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_MAX_NAME_SIZE = 1023
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_TABLE_SIZE = 0x8000000
"""Entries; block/qcow2-bitmap.c."""
BME_MAX_PHYS_SIZE = 0x20000000
"""Bytes of bitmap data one bitmap may occupy (block/qcow2-bitmap.c, check_dir_entry): with the
table-size check this bounds a bitmap table to 8 MiB for 512-byte clusters."""
BACKING_FILE_NAME_MAX = 1023
"""qcow2.rst: backing_file_size must not be longer than 1023 bytes."""
MAX_REFCOUNT_ORDER = 6
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
QCOW_HEADER_STRUCT_SIZE = 112
"""sizeof(QCowHeader) in block/qcow2.h: 104 bytes of fields, compression_type, 7 padding bytes.
QEMU keeps header bytes past this as "unknown header fields" (qcow2_do_open)."""
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
QCOW2_COMPRESSED_SECTOR_SIZE = 512
QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER = 32
QCOW2_MAX_BACKING_DEPTH = 256
"""Chain depth at which a loop is assumed (QEMU: BLOCK_PROBE... bdrv_open nesting)."""
