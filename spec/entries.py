"""Decoding of L1, L2, refcount-table and bitmap-table entries with QEMU's masks.

These integer helpers are what model/ and impl/ call on the hot path. The declarative
BitStruct schemas in spec/tables.py describe the same bits for the reference document, and
tests/spec/test_entries.py checks that both readings agree on every bit pattern.

Cluster and subcluster classification follows block/qcow2.h (qcow2_get_cluster_type,
qcow2_get_subcluster_type) fact for fact.
"""

from __future__ import annotations

import enum

from spec.limits import QCOW2_COMPRESSED_SECTOR_SIZE

# qcow2.rst "Cluster mapping": L1 and L2 entry flags.
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# qcow2.rst "Bitmap table".
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1 << 0
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE

# qcow2.rst "Extended L2 Entries": bits 0-31 allocation, bits 32-63 reads-as-zero.
QCOW_L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
QCOW_L2_BITMAP_ALL_ZEROES = QCOW_L2_BITMAP_ALL_ALLOC << 32


def QCOW_OFLAG_SUB_ALLOC(sc: int) -> int:  # QEMU's macro name
    return 1 << sc


def QCOW_OFLAG_SUB_ZERO(sc: int) -> int:  # QEMU's macro name
    return 1 << (32 + sc)


def QCOW_OFLAG_SUB_ALLOC_RANGE(lo: int, hi: int) -> int:  # QEMU's macro name
    """Allocation bits for subclusters lo..hi-1."""
    return ((1 << hi) - 1) & ~((1 << lo) - 1)


def QCOW_OFLAG_SUB_ZERO_RANGE(lo: int, hi: int) -> int:  # QEMU's macro name
    return QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi) << 32


class ClusterType(enum.Enum):
    """block/qcow2.h QCow2ClusterType."""

    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"


class SubclusterType(enum.Enum):
    """block/qcow2.h QCow2SubclusterType. Without extended L2 a cluster is one subcluster."""

    UNALLOCATED_PLAIN = "unallocated-plain"
    UNALLOCATED_ALLOC = "unallocated-alloc"
    ZERO_PLAIN = "zero-plain"
    ZERO_ALLOC = "zero-alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"
    INVALID = "invalid"


HOST_OFFSET_TYPES = frozenset({SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC,
                               SubclusterType.UNALLOCATED_ALLOC})
"""The subcluster types whose L2 entry carries a host cluster offset that a lookup validates:
qcow2_get_host_offset (block/qcow2-cluster.c) marks the image corrupt and fails the request
with EIO when that offset is not cluster aligned, even where the subcluster itself reads as
zeros or from the backing file (an unallocated or zero subcluster of an allocated cluster)."""


def cluster_type(l2_entry: int, *, extended_l2: bool, has_data_file: bool = False) -> ClusterType:
    """Classify a (first-word) L2 entry the way qcow2_get_cluster_type does.

    With extended L2 the zero flag (bit 0) is not used; zeroes live in the bitmap. With an
    external data file, host offset 0 is a real offset, so COPIED disambiguates it from an
    unallocated entry (all data-file clusters have an implicit refcount of 1).
    """
    if l2_entry & QCOW_OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if l2_entry & QCOW_OFLAG_ZERO and not extended_l2:
        return ClusterType.ZERO_ALLOC if l2_entry & L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    if not l2_entry & L2E_OFFSET_MASK:
        if has_data_file and l2_entry & QCOW_OFLAG_COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


_SUBCLUSTER_OF_CLUSTER = {
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
}
"""Without extended L2 the one subcluster has its cluster's type."""


def subcluster_type(
    l2_entry: int, l2_bitmap: int, sc_index: int, *, extended_l2: bool, has_data_file: bool = False
) -> SubclusterType:
    """Classify subcluster ``sc_index`` as qcow2_get_subcluster_type does.

    Invalid combinations (block/qcow2.h): on an allocated cluster, a subcluster bit set in both
    halves of the bitmap; on an unallocated cluster, any allocation bit set.
    """
    ctype = cluster_type(l2_entry, extended_l2=extended_l2, has_data_file=has_data_file)
    if not extended_l2:
        # The two common answers first: an Enum's hash is computed in Python, so a dict
        # lookup costs more than these comparisons (this runs for every cluster touched).
        if ctype is ClusterType.NORMAL:
            return SubclusterType.NORMAL
        if ctype is ClusterType.UNALLOCATED:
            return SubclusterType.UNALLOCATED_PLAIN
        return _SUBCLUSTER_OF_CLUSTER[ctype]
    if ctype is ClusterType.COMPRESSED:
        return SubclusterType.COMPRESSED
    if ctype is ClusterType.NORMAL:
        if (l2_bitmap >> 32) & l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
            return SubclusterType.INVALID
        if l2_bitmap & QCOW_OFLAG_SUB_ZERO(sc_index):
            return SubclusterType.ZERO_ALLOC
        if l2_bitmap & QCOW_OFLAG_SUB_ALLOC(sc_index):
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    # UNALLOCATED (ZERO_* cannot occur: the zero flag is ignored with extended L2)
    if l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC:
        return SubclusterType.INVALID
    if l2_bitmap & QCOW_OFLAG_SUB_ZERO(sc_index):
        return SubclusterType.ZERO_PLAIN
    return SubclusterType.UNALLOCATED_PLAIN


def l2_bitmap_is_valid(l2_entry: int, l2_bitmap: int, *, has_data_file: bool = False) -> bool:
    """True unless the extended-L2 bitmap is one of the invalid combinations."""
    ctype = cluster_type(l2_entry, extended_l2=True, has_data_file=has_data_file)
    if ctype is ClusterType.COMPRESSED:
        return l2_bitmap == 0
    if ctype is ClusterType.NORMAL:
        return not ((l2_bitmap >> 32) & l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC)
    return not (l2_bitmap & QCOW_L2_BITMAP_ALL_ALLOC)


# --- Compressed cluster descriptor (qcow2.rst "Compressed Clusters Descriptor") -------------


def csize_shift(cluster_bits: int) -> int:
    """x = 62 - (cluster_bits - 8): first bit of the sector-count field."""
    return 62 - (cluster_bits - 8)


def csize_mask(cluster_bits: int) -> int:
    return (1 << (cluster_bits - 8)) - 1


def cluster_offset_mask(cluster_bits: int) -> int:
    return (1 << csize_shift(cluster_bits)) - 1


def compressed_host_offset(l2_entry: int, cluster_bits: int) -> int:
    return l2_entry & cluster_offset_mask(cluster_bits)


def compressed_nb_sectors(l2_entry: int, cluster_bits: int) -> int:
    """The field stores "additional sectors"; the total count is one more."""
    return ((l2_entry >> csize_shift(cluster_bits)) & csize_mask(cluster_bits)) + 1


def compressed_range(l2_entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes to read) of a compressed cluster's data.

    The byte count runs from the offset to the end of the last 512-byte sector the
    descriptor names (block/qcow2-cluster.c, qcow2_parse_compressed_l2_entry); the stream may
    stop short of it.
    """
    off = compressed_host_offset(l2_entry, cluster_bits)
    nb = compressed_nb_sectors(l2_entry, cluster_bits)
    return off, nb * QCOW2_COMPRESSED_SECTOR_SIZE - (off & (QCOW2_COMPRESSED_SECTOR_SIZE - 1))


def make_compressed_entry(host_offset: int, compressed_size: int, cluster_bits: int) -> int:
    """Build a compressed L2 entry for ``compressed_size`` bytes at ``host_offset``.

    The sector count covers [host_offset, host_offset + compressed_size) rounded out to
    512-byte sectors, as qcow2_alloc_compressed_cluster_offset computes it.
    """
    first = host_offset >> 9
    last = (host_offset + compressed_size - 1) >> 9
    nb_additional = last - first
    if nb_additional > csize_mask(cluster_bits) or host_offset > cluster_offset_mask(cluster_bits):
        raise ValueError("compressed descriptor does not fit")
    return QCOW_OFLAG_COMPRESSED | (nb_additional << csize_shift(cluster_bits)) | host_offset


def compressed_entry_reserved_ok(l2_entry: int, cluster_bits: int) -> bool:
    """Offset bits beyond 55 must be zero for small cluster_bits (qcow2.rst), and COPIED unset."""
    if l2_entry & QCOW_OFLAG_COPIED:
        return False
    return not compressed_host_offset(l2_entry, cluster_bits) >> 56
