"""L1, L2, refcount and bitmap tables, and the bit layout of their entries
(qcow2.rst "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor",
"Host cluster management", "Bitmap table").

Two readings of every entry exist on purpose. The BitStructs below are the declarative
reference (rendered into docs/spec.md, bit ranges computed from them); spec/entries.py has
the mask arithmetic that code runs. tests/spec/test_entries.py proves they agree.

Bit numbering: qcow2.rst counts bit 0 as the least significant bit of the big-endian
64-bit word. A BitStruct lists fields from the most significant bit down.
"""

from __future__ import annotations

from functools import cache

import construct as c

from spec.geometry import Geometry

L1Entry = c.BitStruct(
    "copied" / c.Flag * "Bit 63, QCOW_OFLAG_COPIED: the L2 table's refcount is exactly 1 "
    "(accurate only in the active L1 table).",
    "reserved_56_62" / c.BitsInteger(7) * "Bits 56-62: reserved, must be zero.",
    "l2_offset_9_55" / c.BitsInteger(47)
    * "Bits 9-55 of the L2 table offset (cluster aligned); 0 = L2 table unallocated.",
    "reserved_0_8" / c.BitsInteger(9) * "Bits 0-8: reserved, must be zero.",
)
"""An L1 table entry (64 bits)."""

L2Entry = c.BitStruct(
    "copied" / c.Flag * "Bit 63, QCOW_OFLAG_COPIED: a standard cluster whose refcount is exactly 1.",
    "compressed" / c.Flag
    * "Bit 62, QCOW_OFLAG_COMPRESSED: bits 0-61 are a compressed descriptor instead.",
    "reserved_56_61" / c.BitsInteger(6) * "Bits 56-61: reserved, must be zero.",
    "host_offset_9_55" / c.BitsInteger(47)
    * "Bits 9-55 of the host cluster offset (cluster aligned); 0 without COPIED = unallocated.",
    "reserved_1_8" / c.BitsInteger(8) * "Bits 1-8: reserved, must be zero.",
    "zero" / c.Flag * "Bit 0, QCOW_OFLAG_ZERO: reads as zeros (v3 without extended L2 only).",
)
"""A standard L2 table entry: the first 64 bits of every L2 entry."""


@cache
def compressed_descriptor(cluster_bits: int) -> c.Construct:
    """The compressed cluster descriptor for a given cluster_bits; x = 62 - (cluster_bits - 8)."""
    x = 62 - (cluster_bits - 8)
    return c.BitStruct(
        "copied" / c.Flag * "Bit 63: must be zero for compressed clusters.",
        "compressed" / c.Flag * "Bit 62: set.",
        "nb_additional_sectors" / c.BitsInteger(62 - x)
        * f"Bits {x}-61: 512-byte sectors used beyond the one holding the offset.",
        "host_offset" / c.BitsInteger(x)
        * f"Bits 0-{x - 1}: byte offset of the compressed data (not aligned); bits above 55 zero.",
    )


SubclusterBitmap = c.BitStruct(
    "zero" / c.BitsInteger(32)
    * "Bits 32-63: bit 32+n set = subcluster n reads as zeros (its allocation bit must be clear).",
    "alloc" / c.BitsInteger(32)
    * "Bits 0-31: bit n set = subcluster n is allocated in the host cluster.",
)
"""Second 64 bits of an extended L2 entry (standard clusters; all zero for compressed)."""

ExtendedL2Entry = c.Struct(
    "l2_entry" / c.Int64ub * "Standard L2 entry (bit 0, the zero flag, is unused).",
    "l2_bitmap" / c.Int64ub * "Subcluster allocation bitmap.",
)
"""An extended L2 entry (128 bits)."""

RefcountTableEntry = c.BitStruct(
    "refblock_offset_9_63" / c.BitsInteger(55)
    * "Bits 9-63 of the refcount block offset (cluster aligned); 0 = not allocated, refcounts 0.",
    "reserved_0_8" / c.BitsInteger(9) * "Bits 0-8: reserved, must be zero.",
)
"""A refcount table entry (64 bits)."""

BitmapTableEntry = c.BitStruct(
    "reserved_56_63" / c.BitsInteger(8) * "Bits 56-63: reserved, must be zero.",
    "offset_9_55" / c.BitsInteger(47)
    * "Bits 9-55 of the bitmap data cluster offset; 0 = unallocated (see bit 0).",
    "reserved_1_8" / c.BitsInteger(8) * "Bits 1-8: reserved, must be zero.",
    "all_ones" / c.Flag
    * "Bit 0: with offset 0, the cluster reads as all ones (set) or all zeros (clear); "
    "must be zero when an offset is present.",
)
"""A bitmap table entry (64 bits)."""


def l1_table(n_entries: int) -> c.Construct:
    """The L1 table: ``l1_size`` big-endian 64-bit entries, contiguous."""
    return c.Array(n_entries, c.Int64ub)


def l2_table(geometry: Geometry) -> c.Construct:
    """One L2 table: a cluster of 8-byte (standard) or 16-byte (extended) entries."""
    if geometry.extended_l2:
        return c.Array(geometry.l2_entries, ExtendedL2Entry)
    return c.Array(geometry.l2_entries, c.Int64ub)


def refcount_table(n_entries: int) -> c.Construct:
    return c.Array(n_entries, c.Int64ub)


def bitmap_table(n_entries: int) -> c.Construct:
    return c.Array(n_entries, c.Int64ub)


def _pack_subbyte(values: list[int], bits: int) -> bytes:
    per_byte = 8 // bits
    out = bytearray(len(values) // per_byte)
    for i, v in enumerate(values):
        out[i // per_byte] |= (v & ((1 << bits) - 1)) << (bits * (i % per_byte))
    return bytes(out)


def _unpack_subbyte(data: bytes, bits: int) -> list[int]:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(data[i // per_byte] >> (bits * (i % per_byte))) & mask for i in range(len(data) * per_byte)]


@cache
def refcount_block(geometry: Geometry) -> c.Construct:
    """One refcount block: a cluster of ``refcount_bits``-wide entries.

    Widths of a byte or more are big-endian integers. Narrower widths pack several entries
    per byte starting from the least significant bit (qcow2.rst "Refcount block entry";
    block/qcow2-refcount.c, get_refcount_ro0..ro2).
    """
    bits = geometry.refcount_bits
    if bits >= 8:
        return c.Array(geometry.refcount_block_entries, c.BytesInteger(bits // 8))
    return c.ExprAdapter(
        c.Bytes(geometry.cluster_size),
        decoder=lambda obj, ctx: _unpack_subbyte(obj, bits),
        encoder=lambda obj, ctx: _pack_subbyte(list(obj), bits),
    )
