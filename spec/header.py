"""The image header, its extensions and the backing file name (qcow2.rst "Header",
"Additional fields", "Header padding", "Header extensions", "String header extensions",
"Feature name table", "Bitmaps extension", "Full disk encryption header pointer").

Field docs are data (construct ``*`` docs): ``qcow2lab spec`` renders them. The feature
bitmasks stay plain integers so unknown bits survive a round trip; spec/features.py names
the known bits.
"""

from __future__ import annotations

import construct as c

from spec import features as ft
from spec.geometry import Geometry
from spec.limits import QCOW_MAGIC, V2_HEADER_LENGTH, V3_MIN_HEADER_LENGTH

this = c.this

_COMMON = (
    "magic" / c.Const(QCOW_MAGIC) * 'QCOW magic string "QFI\\xfb".',
    "version" / c.Int32ub * "Format version: 2 (compat=0.10) or 3 (compat=1.1).",
    "backing_file_offset" / c.Int64ub
    * "Offset of the backing file name (not NUL-terminated); 0 if there is no backing file.",
    "backing_file_size" / c.Int32ub
    * "Length of the backing file name in bytes, at most 1023. Undefined without a backing file.",
    "cluster_bits" / c.Int32ub
    * "log2(cluster size). 9..21 in QEMU; at least 14 with extended L2 entries.",
    "size" / c.Int64ub * "Virtual disk size in bytes.",
    "crypt_method" / c.Int32ub * "0 none, 1 AES-CBC (legacy), 2 LUKS.",
    "l1_size" / c.Int32ub * "Number of entries in the active L1 table (table at most 32 MiB).",
    "l1_table_offset" / c.Int64ub * "Offset of the active L1 table. Cluster aligned.",
    "refcount_table_offset" / c.Int64ub * "Offset of the refcount table. Cluster aligned.",
    "refcount_table_clusters" / c.Int32ub
    * "Clusters occupied by the refcount table (table at most 8 MiB).",
    "nb_snapshots" / c.Int32ub * "Number of internal snapshots (at most 65536).",
    "snapshots_offset" / c.Int64ub * "Offset of the snapshot table. Cluster aligned.",
)

_V3 = (
    "incompatible_features" / c.Int64ub
    * "Bit 0 dirty, 1 corrupt, 2 external data file, 3 compression type, 4 extended L2. "
    "An unknown set bit forbids opening.",
    "compatible_features" / c.Int64ub * "Bit 0 lazy refcounts. Unknown bits may be ignored.",
    "autoclear_features" / c.Int64ub
    * "Bit 0 bitmaps extension consistent, 1 raw external data. A writer clears unknown bits.",
    "refcount_order" / c.Int32ub * "refcount_bits = 1 << refcount_order; 0..6 (v2: always 4).",
    "header_length" / c.Int32ub
    * "Length of the header in bytes; v3: at least 104 and a multiple of 8.",
)

_COMPRESSION = (
    "compression_type" / c.Int8ub
    * "0 deflate (QEMU's 'zlib', no zlib header), 1 zstd. Non-zero requires incompatible bit 3. "
    "Present when header_length > 104.",
    "header_tail" / c.Bytes(this.header_length - (V3_MIN_HEADER_LENGTH + 1))
    * "Padding up to header_length (must be zero) or later fields: kept byte for byte.",
)

Header = c.Struct(
    *_COMMON,
    "v3" / c.If(this.version >= 3, c.Struct(*_V3))
    * "Version 3 fields (bytes 72-103); absent in version 2.",
    "ext" / c.If(
        lambda ctx: ctx.version >= 3 and ctx.v3.header_length > V3_MIN_HEADER_LENGTH,
        c.Struct(
            *(
                sc if sc.name != "header_tail"
                else "header_tail" / c.Bytes(this._.v3.header_length - (V3_MIN_HEADER_LENGTH + 1))
                * sc.docs
                for sc in _COMPRESSION
            )
        ),
    ) * "Additional fields (byte 104 on), present when header_length > 104.",
)
"""The qcow2 header: 72 bytes in v2, ``header_length`` bytes in v3."""


def header_length(h: c.Container) -> int:
    return h.v3.header_length if h.v3 is not None else V2_HEADER_LENGTH


class HeaderViews:
    """Named views of a parsed ``Header`` and its Geometry, shared by every holder of one
    (spec.image.ImageFile, model's Qcow2File) so the v2/v3 defaults live in one place:
    a v2 header has no feature bitmasks (all zero) and always deflate compression."""

    header: c.Container
    geometry: Geometry

    @property
    def version(self) -> int:
        return int(self.header.version)

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self.geometry.cluster_bits

    @property
    def size(self) -> int:
        return int(self.header.size)

    @property
    def incompatible_features(self) -> int:
        return int(self.header.v3.incompatible_features) if self.header.v3 else 0

    @property
    def compatible_features(self) -> int:
        return int(self.header.v3.compatible_features) if self.header.v3 else 0

    @property
    def autoclear_features(self) -> int:
        return int(self.header.v3.autoclear_features) if self.header.v3 else 0

    @property
    def header_length(self) -> int:
        return header_length(self.header)

    @property
    def compression_type(self) -> ft.CompressionType:
        if self.header.ext is None:
            return ft.CompressionType.ZLIB
        return ft.CompressionType(self.header.ext.compression_type)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & ft.QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def extended_l2(self) -> bool:
        return self.geometry.extended_l2


# --- Header extensions --------------------------------------------------------------------

QCOW2_EXT_MAGIC_END = 0x00000000
QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803F857
QCOW2_EXT_MAGIC_BITMAPS = 0x23852875
QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537BE77
QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441

EXTENSION_NAMES = {
    QCOW2_EXT_MAGIC_END: "end",
    QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing file format",
    QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature name table",
    QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    QCOW2_EXT_MAGIC_CRYPTO_HEADER: "full disk encryption header pointer",
    QCOW2_EXT_MAGIC_DATA_FILE: "external data file name",
}

FeatureNameEntry = c.Struct(
    "type" / c.Int8ub * "0 incompatible, 1 compatible, 2 autoclear.",
    "bit" / c.Int8ub * "Bit number within the selected bitmask, 0..63.",
    "name" / c.Bytes(46) * "Feature name, NUL-padded (not terminated at full length).",
)
"""One 48-byte entry of the feature name table."""

FeatureNameTable = c.Struct(
    "entries" / c.GreedyRange(FeatureNameEntry) * "As many entries as the extension length holds.",
    "trailing" / c.GreedyBytes * "Bytes after the last whole entry (none in a valid table).",
)

BitmapsExtension = c.Struct(
    "nb_bitmaps" / c.Int32ub * "Number of bitmaps, at least 1 (QEMU: at most 65535).",
    "reserved32" / c.Int32ub * "Reserved, must be zero.",
    "bitmap_directory_size" / c.Int64ub * "Size of the bitmap directory in bytes.",
    "bitmap_directory_offset" / c.Int64ub * "Offset of the bitmap directory. Cluster aligned.",
)
"""Payload of the bitmaps extension (24 bytes)."""

CryptoHeaderPointer = c.Struct(
    "offset" / c.Int64ub * "Offset of the encryption (LUKS) header. Cluster aligned.",
    "length" / c.Int64ub * "Length of the written encryption header in bytes.",
)
"""Payload of the full disk encryption header pointer (16 bytes); required iff crypt_method = 2."""

HeaderExtension = c.Struct(
    "type" / c.Int32ub * "Extension type magic; 0 ends the list. Unknown types are kept.",
    "length" / c.Int32ub * "Length of the data, without padding.",
    "data" / c.FixedSized(
        this.length,
        c.Switch(
            this.type,
            {
                QCOW2_EXT_MAGIC_FEATURE_TABLE: FeatureNameTable,
                QCOW2_EXT_MAGIC_BITMAPS: BitmapsExtension,
                QCOW2_EXT_MAGIC_CRYPTO_HEADER: CryptoHeaderPointer,
            },
            default=c.GreedyBytes,
        ),
    ) * "Extension data. Backing format and data file name are strings without a NUL.",
    "padding" / c.Bytes((-this.length) % 8) * "Padding to a multiple of 8 (contents unspecified).",
)
"""One header extension: type, length, data, padding to 8 bytes."""

def backing_file_name(backing_file_size: int) -> c.Construct:
    """The backing file name at ``backing_file_offset``: raw bytes, no NUL, no padding.

    QEMU reads it into a C string (block/qcow2.c, qcow2_do_open), so a NUL inside the name
    ends it there; spec/image.py applies that when it decodes the name.
    """
    return c.Bytes(backing_file_size)


HeaderExtensions = c.RepeatUntil(lambda obj, lst, ctx: obj.type == QCOW2_EXT_MAGIC_END, HeaderExtension)
"""The extension list that follows the header, up to and including the end marker."""
