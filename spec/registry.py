"""The catalogue of on-disk structures that docs/spec.md documents, in reading order.

Each entry points at the construct schema that code parses with; spec/render.py walks it
to compute the byte or bit ranges, so nothing here states an offset. What an entry adds is
what a schema cannot say about itself: its qcow2.rst section and a paragraph on where the
structure lives and when it is present.

``part`` picks a slice of a schema whose top-level fields nest: ``""`` keeps the top-level
fields that do not nest, a field name keeps that nested field's children. The ranges stay
those of the whole schema (the header's version 3 fields start at byte 72, not 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import construct as c

from spec.bitmaps import BitmapDirectoryEntry
from spec.header import (
    BitmapsExtension,
    CryptoHeaderPointer,
    FeatureNameEntry,
    Header,
    HeaderExtension,
)
from spec.limits import MAX_CLUSTER_BITS, MIN_CLUSTER_BITS
from spec.luks import LuksArea, LuksHeader, LuksKeyMaterial, LuksKeySlot
from spec.snapshot import SnapshotHeader
from spec.tables import (
    BitmapTableEntry,
    ExtendedL2Entry,
    L1Entry,
    L2Entry,
    RefcountTableEntry,
    SubclusterBitmap,
    compressed_descriptor,
)

Unit = Literal["bytes", "bits"]

COMPRESSED_DESCRIPTOR_CLUSTER_BITS: tuple[int, ...] = (MIN_CLUSTER_BITS, 16, MAX_CLUSTER_BITS)
"""cluster_bits values the descriptor is rendered for: the smallest, QEMU's default, the largest."""

# The two string extensions have no structure beyond "the whole payload is a name", so
# HeaderExtension leaves them to its GreedyBytes default. These one-field schemas exist to
# give them a row in the reference; their content rules are qcow2.rst's
# ("String header extensions") and block/qcow2.c, qcow2_read_extensions.
BackingFormatExtension = c.Struct(
    "backing_format" / c.GreedyBytes
    * "Format name of the backing file, e.g. raw or qcow2 (not NUL-terminated). "
    "QEMU refuses 16 bytes or more (block/qcow2.c, qcow2_read_extensions).",
)
"""Payload of the backing file format name extension (type 0xe2792aca)."""

DataFileExtension = c.Struct(
    "data_file" / c.GreedyBytes
    * "File name of the external data file (not NUL-terminated). Required when incompatible bit 2 is set.",
)
"""Payload of the external data file name extension (type 0x44415441)."""

BackingFileName = c.Struct(
    "backing_file_name" / c.GreedyBytes
    * "backing_file_size bytes of file name (not NUL-terminated), at backing_file_offset.",
)
"""The backing file name: not a header extension, but stored beside them in the first cluster."""


@dataclass(frozen=True)
class Structure:
    """One documented on-disk structure."""

    key: str
    """Stable identifier (Markdown anchor, test lookups)."""
    title: str
    schema: c.Construct
    section: str
    """The qcow2.rst section that defines it."""
    unit: Unit
    """"bytes" for Structs; "bits" for BitStructs of 64-bit entries, bit 0 the least significant."""
    description: str
    part: str | None = None
    """None: every field. "": the top-level fields that do not nest. A name: that field's children."""
    document: str = "qcow2.rst"
    """The document ``section`` belongs to (the LUKS structures come from the LUKS1 spec)."""


def _compressed_entries() -> tuple[Structure, ...]:
    return tuple(
        Structure(
            key=f"compressed_descriptor_{cb}",
            title=f"Compressed cluster descriptor, cluster_bits = {cb}",
            schema=compressed_descriptor(cb),
            section="Compressed Clusters Descriptor",
            unit="bits",
            description=(
                "An L2 entry with bit 62 set. The split point is x = 62 - (cluster_bits - 8), "
                f"here {62 - (cb - 8)}: the sector count sits above it, the host byte offset below. "
                "Bytes to read run from the offset to the end of the last 512-byte sector counted; "
                "with extended L2 entries the second 64 bits must be zero."
            ),
        )
        for cb in COMPRESSED_DESCRIPTOR_CLUSTER_BITS
    )


STRUCTURES: tuple[Structure, ...] = (
    Structure(
        key="header_v2",
        title="Header: version 2 part",
        schema=Header,
        part="",
        section="Header",
        unit="bytes",
        description=(
            "At offset 0 of the image file, big-endian like every qcow2 field. Version 2 images "
            "end the header here; version 3 images continue with the fields below."
        ),
    ),
    Structure(
        key="header_v3",
        title="Header: version 3 part",
        schema=Header,
        part="v3",
        section="Header",
        unit="bytes",
        description=(
            "Present when version >= 3. For version 2 QEMU assumes no features, refcount_order 4 "
            "and a 72-byte header."
        ),
    ),
    Structure(
        key="header_additional",
        title="Header: additional fields",
        schema=Header,
        part="ext",
        section="Additional fields (version 3 and higher)",
        unit="bytes",
        description=(
            "Present only when header_length exceeds 104. Fields past header_length read as zero, "
            "which is why a 104-byte header means compression_type 0 (deflate)."
        ),
    ),
    Structure(
        key="header_extension",
        title="Header extension",
        schema=HeaderExtension,
        section="Header extensions",
        unit="bytes",
        description=(
            "A list of these follows the header (at header_length, or at byte 72 in version 2), "
            "ended by an extension of type 0, and must fit in the first cluster. The known types "
            "are listed under \"Header extension types\" below."
        ),
    ),
    Structure(
        key="feature_name_entry",
        title="Feature name table entry",
        schema=FeatureNameEntry,
        section="Feature name table",
        unit="bytes",
        description=(
            "The feature name table extension (type 0x6803f857) is an array of these; it lets a "
            "tool name feature bits it does not implement."
        ),
    ),
    Structure(
        key="bitmaps_extension",
        title="Bitmaps extension",
        schema=BitmapsExtension,
        section="Bitmaps extension",
        unit="bytes",
        description=(
            "Payload of extension type 0x23852875. Valid only while autoclear bit 0 is set; "
            "otherwise the bitmaps are stale and must be ignored."
        ),
    ),
    Structure(
        key="crypto_header_pointer",
        title="Full disk encryption header pointer",
        schema=CryptoHeaderPointer,
        section="Full disk encryption header pointer",
        unit="bytes",
        description="Payload of extension type 0x0537be77; where the LUKS header lives in the image file.",
    ),
    Structure(
        key="luks_area",
        title="LUKS area",
        schema=LuksArea,
        part="",
        section="Full disk encryption header pointer",
        unit="bytes",
        description=(
            "With crypt_method 2, the extension above points at this area: the LUKS1 partition "
            "header (next), zero padding, then the key material of the eight key slots. QEMU "
            "allocates it as clusters of its own, refcounted like any cluster, of payload_offset "
            "* 512 bytes (crypto/block-luks.c qcrypto_block_luks_create, block/qcow2.c "
            "qcow2_crypto_hdr_init_func). Offsets below are relative to the area's start. "
            "Guest data does not live here: it stays in ordinary clusters (see Encryption below)."
        ),
    ),
    Structure(
        key="luks_header",
        title="LUKS partition header (phdr)",
        schema=LuksHeader,
        section="2.4 The partition header (phdr)",
        document="LUKS1 on-disk format 1.2.1",
        unit="bytes",
        description=(
            "At offset 0 of the LUKS area, 592 bytes, big-endian. Name fields are NUL-terminated "
            "ASCII. QEMU parses and checks it even without the key, for qemu-img info "
            "(crypto/block-luks.c, QCryptoBlockLUKSHeader)."
        ),
    ),
    Structure(
        key="luks_key_slot",
        title="LUKS key slot descriptor",
        schema=LuksKeySlot,
        section="2.4 The partition header (phdr)",
        document="LUKS1 on-disk format 1.2.1",
        unit="bytes",
        description=(
            "key_slots[i] of the header, at byte 208 + 48 * i of the LUKS area. QEMU writes only "
            "slot 0 active; slot i's key material starts at sector 8 + i * (the key material "
            "rounded up to 4 KiB, in sectors)."
        ),
    ),
    Structure(
        key="luks_key_material",
        title="LUKS key material (anti-forensic split master key)",
        schema=LuksKeyMaterial,
        section="2.2 AF-Splitter; 2.4 key material",
        document="LUKS1 on-disk format 1.2.1",
        unit="bytes",
        description=(
            "At key_material_offset * 512 bytes into the LUKS area, key_bytes * stripes bytes "
            "(stripes is always 4000): 256000 bytes for aes-256-xts. Offsets are relative to the "
            "slot's material."
        ),
    ),
    Structure(
        key="backing_format_extension",
        title="Backing file format name",
        schema=BackingFormatExtension,
        section="Header extensions",
        unit="bytes",
        description="Payload of extension type 0xe2792aca; the whole payload is the name.",
    ),
    Structure(
        key="data_file_extension",
        title="External data file name",
        schema=DataFileExtension,
        section="Header extensions",
        unit="bytes",
        description="Payload of extension type 0x44415441; the whole payload is the name.",
    ),
    Structure(
        key="backing_file_name",
        title="Backing file name",
        schema=BackingFileName,
        section="Header extensions",
        unit="bytes",
        description=(
            "Stored in the first cluster, after the end of the header extension area; nothing else "
            "may live there. At most 1023 bytes. QEMU reads it as a C string, so a NUL ends it early "
            "(block/qcow2.c, qcow2_do_open)."
        ),
    ),
    Structure(
        key="l1_entry",
        title="L1 table entry",
        schema=L1Entry,
        section="Cluster mapping",
        unit="bits",
        description=(
            "The L1 table is l1_size of these at l1_table_offset; entry i maps guest offsets "
            "i * (cluster_size * l2_entries) onwards through one L2 table."
        ),
    ),
    Structure(
        key="l2_entry",
        title="L2 table entry (standard cluster descriptor)",
        schema=L2Entry,
        section="Cluster mapping",
        unit="bits",
        description=(
            "An L2 table fills one cluster; each entry maps one guest cluster. With bit 62 clear "
            "the entry reads as below; with bit 62 set it is a compressed cluster descriptor."
        ),
    ),
    Structure(
        key="extended_l2_entry",
        title="Extended L2 entry",
        schema=ExtendedL2Entry,
        section="Extended L2 Entries",
        unit="bytes",
        description=(
            "With incompatible bit 4 every L2 entry is 128 bits: the standard entry, then a "
            "bitmap over the cluster's 32 subclusters."
        ),
    ),
    Structure(
        key="subcluster_bitmap",
        title="Subcluster allocation bitmap",
        schema=SubclusterBitmap,
        section="Extended L2 Entries",
        unit="bits",
        description=(
            "The second 64 bits of an extended L2 entry. Setting both bits of a subcluster is "
            "invalid; on an unallocated cluster every allocation bit must be clear."
        ),
    ),
    *_compressed_entries(),
    Structure(
        key="refcount_table_entry",
        title="Refcount table entry",
        schema=RefcountTableEntry,
        section="Host cluster management",
        unit="bits",
        description=(
            "The refcount table is refcount_table_clusters clusters of these at "
            "refcount_table_offset; each points at one refcount block."
        ),
    ),
    Structure(
        key="snapshot_header",
        title="Snapshot table entry",
        schema=SnapshotHeader,
        section="Snapshots",
        unit="bytes",
        description=(
            "nb_snapshots of these lie back to back at snapshots_offset, each padded to 8 bytes. "
            "Version 3 images must carry at least 16 bytes of extra data."
        ),
    ),
    Structure(
        key="bitmap_directory_entry",
        title="Bitmap directory entry",
        schema=BitmapDirectoryEntry,
        section="Bitmap directory",
        unit="bytes",
        description=(
            "nb_bitmaps of these lie back to back at bitmap_directory_offset, each padded to 8 bytes."
        ),
    ),
    Structure(
        key="bitmap_table_entry",
        title="Bitmap table entry",
        schema=BitmapTableEntry,
        section="Bitmap table",
        unit="bits",
        description=(
            "A bitmap table is bitmap_table_size of these; each covers one cluster of bitmap data."
        ),
    ),
)
"""Every documented structure, in the order docs/spec.md presents them."""


def by_key(key: str) -> Structure:
    """The structure named ``key``; KeyError if there is none."""
    for s in STRUCTURES:
        if s.key == key:
            return s
    raise KeyError(key)
