"""Header feature bits (qcow2.rst "Header", bytes 72-95) and QEMU's names for them.

The header schema keeps the three bitmasks as plain integers so unknown bits survive a
parse/build round trip; this table gives the known bits their names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FeatureType(enum.IntEnum):
    """Feature name table ``type`` byte (qcow2.rst "Feature name table")."""

    INCOMPATIBLE = 0
    COMPATIBLE = 1
    AUTOCLEAR = 2


QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_MASK = 0x1F

QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0
QCOW2_COMPAT_FEAT_MASK = 0x1

QCOW2_AUTOCLEAR_BITMAPS = 1 << 0
QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1
QCOW2_AUTOCLEAR_MASK = 0x3


@dataclass(frozen=True)
class Feature:
    type: FeatureType
    bit: int
    name: str
    """The name QEMU writes into the feature name table (block/qcow2.c, qcow2_update_header)."""
    meaning: str


FEATURES: tuple[Feature, ...] = (
    Feature(FeatureType.INCOMPATIBLE, 0, "dirty bit",
            "refcounts may be stale; rebuild them from the L1/L2 tables before use"),
    Feature(FeatureType.INCOMPATIBLE, 1, "corrupt bit",
            "some structure may be corrupt; never write except to repair"),
    Feature(FeatureType.INCOMPATIBLE, 2, "external data file",
            "guest data lives in an external file at host offset == guest offset"),
    Feature(FeatureType.INCOMPATIBLE, 3, "compression type",
            "compression_type (byte 104) is present and non-zero"),
    Feature(FeatureType.INCOMPATIBLE, 4, "extended L2 entries",
            "L2 entries are 128 bits with 32 subcluster allocation/zero bits"),
    Feature(FeatureType.COMPATIBLE, 0, "lazy refcounts",
            "refcount updates may be postponed while the dirty bit is set"),
    Feature(FeatureType.AUTOCLEAR, 0, "bitmaps",
            "the bitmaps extension is consistent"),
    Feature(FeatureType.AUTOCLEAR, 1, "raw external data",
            "the external data file is a consistent raw image on its own"),
)

KNOWN_MASKS: dict[FeatureType, int] = {
    FeatureType.INCOMPATIBLE: QCOW2_INCOMPAT_MASK,
    FeatureType.COMPATIBLE: QCOW2_COMPAT_FEAT_MASK,
    FeatureType.AUTOCLEAR: QCOW2_AUTOCLEAR_MASK,
}


class CompressionType(enum.IntEnum):
    """compression_type, header byte 104 (qcow2.rst "Additional fields")."""

    ZLIB = 0
    """Raw deflate (RFC 1951) without a zlib header, despite QEMU's name for it."""
    ZSTD = 1


COMPRESSION_NAMES = {CompressionType.ZLIB: "zlib", CompressionType.ZSTD: "zstd"}


def bit_names(mask: int, ftype: FeatureType) -> list[str]:
    """Names of the known bits set in ``mask``, then ``bit N`` for unknown ones."""
    known = {f.bit: f.name for f in FEATURES if f.type == ftype}
    return [known.get(b, f"bit {b}") for b in range(64) if mask >> b & 1]
