"""The catalogue of invariants (qcow2.rst plus what QEMU 7.2 enforces).

Each ``Rule`` is one invariant: a stable ``id``, a one-line ``statement``, the ``source``
(qcow2.rst section and/or the QEMU function that enforces it) and the ``severity``, which is
the counter ``qemu-img check`` bumps for a violation (corruptions, leaks or check errors).

``qemu_counts`` says whether ``qemu-img check`` itself counts a violation of this rule. Some
rules are the spec's own (reserved bits, header padding) and QEMU 7.2 does not look at them;
others are already counted through another rule (an overlap shows up to QEMU as a refcount
mismatch). Such findings are reported but do not change the counters, so the verdict stays
QEMU's. ``Finding`` is one violation at one place; ``CheckResult`` counts them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.Enum):
    """How ``qemu-img check`` counts a violation (qapi ImageCheck fields)."""

    CORRUPTION = "corruption"
    LEAK = "leak"
    CHECK_ERROR = "check-error"


@dataclass(frozen=True)
class Rule:
    id: str
    statement: str
    source: str
    severity: Severity
    qemu_counts: bool = True
    """False: reported, but ``qemu-img check`` does not count it (see the module doc)."""


@dataclass(frozen=True)
class Finding:
    """One violation of ``rule`` (a RULES id).

    ``offset`` is the host offset of the offending bytes (entry, table or cluster) or None
    when the violation has no single place (a feature-bit mismatch). ``stored``/``computed``
    are the two refcounts of a refcount finding;
    together with ``offset`` they are what a repair needs to act without re-walking the image.
    A refcount finding's ``offset`` is the host offset of the cluster.
    """

    rule: str
    offset: int | None
    message: str
    stored: int | None = None
    computed: int | None = None
    count: int = 1
    """How many times ``qemu-img check`` counts this finding (a run of clusters it counts one
    by one, such as those behind an unreadable refcount block, is one finding)."""

    @property
    def severity(self) -> Severity:
        return RULES_BY_ID[self.rule].severity

    @property
    def counted(self) -> bool:
        return RULES_BY_ID[self.rule].qemu_counts


_C = Severity.CORRUPTION
_L = Severity.LEAK
_E = Severity.CHECK_ERROR

_REF = "block/qcow2-refcount.c"
_SNAP = "block/qcow2-snapshot.c"
_BMP = "block/qcow2-bitmap.c"

RULES: tuple[Rule, ...] = (
    # --- opening ------------------------------------------------------------------------
    Rule("IMAGE-OPENS",
         "The header, extensions and table pointers pass QEMU's open-time validation.",
         "qcow2.rst §Header, §Header extensions; block/qcow2.c qcow2_do_open, qcow2_read_extensions, "
         "validate_table_offset (qemu-img check exits 1 when the image cannot be opened)",
         _E),
    Rule("CHECK-COMPLETES",
         "The check runs to the end: no table that QEMU must load fails to load.",
         "qemu-img.c img_check, collect_image_check (a failed check exits 1 without a result); "
         f"{_REF} qcow2_check_refcounts", _E),
    Rule("IMAGE-SIZE-LIMIT",
         "The image file has at most INT_MAX clusters.",
         f"{_REF} qcow2_check_refcounts", _E),
    # --- header and features ------------------------------------------------------------
    Rule("BACKING-FILE-OPENS",
         "Every file of the backing chain exists, opens in its named (or probed) format and the "
         "chain never comes back to a file already in it (QEMU opens the whole chain to check).",
         "qcow2.rst §Header (backing_file_offset); block.c bdrv_open_backing_file (a relative name "
         "is taken relative to the image's directory)", _E),
    Rule("HEADER-LENGTH-ALIGNED",
         "A version 3 header_length is a multiple of 8.",
         "qcow2.rst §Header (header_length), §Header padding", _C, qemu_counts=False),
    Rule("HEADER-PADDING-ZERO",
         "Header bytes after the last known additional field, up to header_length, are zero.",
         "qcow2.rst §Header padding", _C, qemu_counts=False),
    Rule("HEADER-NOT-CORRUPT",
         "The corrupt incompatible bit is clear.",
         "qcow2.rst §Header (incompatible_features bit 1); block/qcow2.c qcow2_do_open",
         _C, qemu_counts=False),
    Rule("HEADER-UNKNOWN-AUTOCLEAR-ZERO",
         "No unknown autoclear feature bit is set (a writer that does not know a bit clears it).",
         "qcow2.rst §Header (autoclear_features)", _C, qemu_counts=False),
    Rule("FEATURE-BITMAPS-EXTENSION",
         "The bitmaps autoclear bit is set exactly when a bitmaps extension is present.",
         "qcow2.rst §Header (autoclear bit 0), §Bitmaps extension; block/qcow2.c qcow2_read_extensions",
         _C, qemu_counts=False),
    Rule("FEATURE-RAW-NEEDS-DATA-FILE",
         "The raw external data autoclear bit is set only together with the external data file bit.",
         "qcow2.rst §Header (autoclear bit 1); block/qcow2.c qcow2_do_open", _E),
    Rule("FEATURE-DATA-FILE-NAME",
         "An image with the external data file bit names its data file, and that file exists.",
         "qcow2.rst §Header (incompatible bit 2), §External data file name; block/qcow2.c qcow2_do_open",
         _E),
    Rule("DATA-FILE-NAME-NEEDS-BIT",
         "An external data file name extension appears only with the external data file bit.",
         "qcow2.rst §External data file name (QEMU ignores the name without the bit)",
         _C, qemu_counts=False),
    Rule("FEATURE-COMPRESSION-TYPE",
         "The compression type bit is set exactly when compression_type is non-zero.",
         "qcow2.rst §Header (incompatible bit 3), §Additional fields; block/qcow2.c "
         "validate_compression_type", _E),
    Rule("FEATURE-LUKS-CRYPTO-HEADER",
         "crypt_method is LUKS exactly when a full disk encryption header pointer extension exists.",
         "qcow2.rst §Full disk encryption header pointer; block/qcow2.c qcow2_read_extensions", _E),
    Rule("CRYPTO-HEADER-ALIGNED",
         "The LUKS header offset is cluster aligned.",
         "qcow2.rst §Full disk encryption header pointer; block/qcow2.c qcow2_read_extensions", _E),
    Rule("CRYPTO-HEADER-LUKS",
         "A LUKS image's encryption header is a LUKS1 header QEMU accepts (magic, version 1, "
         "NUL-terminated names, known algorithms, key slots inside the header area).",
         "qcow2.rst §Full disk encryption header pointer; crypto/block-luks.c "
         "qcrypto_block_luks_check_header (checked at open, with or without the key)", _E),
    Rule("FEATURE-LAZY-DIRTY",
         "The dirty bit is set only on an image with lazy refcounts.",
         "qcow2.rst §Header (incompatible bit 0, compatible bit 0)", _C, qemu_counts=False),
    Rule("EXT-FEATURE-TABLE-WHOLE",
         "The feature name table holds whole 48-byte entries with known types.",
         "qcow2.rst §Feature name table", _C, qemu_counts=False),
    Rule("EXT-BITMAPS-RESERVED-ZERO",
         "The bitmaps extension's reserved field is zero.",
         "qcow2.rst §Bitmaps extension; block/qcow2.c qcow2_read_extensions", _C, qemu_counts=False),
    # --- L1 tables --------------------------------------------------------------------------
    Rule("L1-RESERVED-ZERO",
         "L1 entry bits 0-8 and 56-62 are zero, in the active and in every snapshot L1 table.",
         f"qcow2.rst §Cluster mapping (L1 table entry); {_REF} check_refcounts_l1", _C),
    Rule("L1-L2-ALIGNED",
         "An L1 entry's L2 table offset is cluster aligned.",
         f"qcow2.rst §Cluster mapping; {_REF} check_refcounts_l1", _C),
    Rule("L1-COPIED-IFF-REFCOUNT-1",
         "In the active L1 table, COPIED is set exactly when the L2 table's refcount is 1.",
         f"qcow2.rst §Cluster mapping (L1 bit 63); {_REF} check_oflag_copied", _C),
    Rule("L1-READABLE",
         "An L1 table can be read in full: it lies within what the block layer addresses.",
         f"{_REF} check_refcounts_l1", _E),
    # --- L2 tables --------------------------------------------------------------------------
    Rule("L2-RESERVED-ZERO",
         "Standard (non-compressed) L2 entry bits 1-8 and 56-61 are zero.",
         f"qcow2.rst §Cluster mapping (Standard Cluster Descriptor); {_REF} check_refcounts_l2", _C),
    Rule("EXTL2-ZERO-FLAG-CLEAR",
         "With extended L2 entries, the zero flag (L2 bit 0) is clear; zeroes live in the bitmap.",
         "qcow2.rst §Cluster mapping (Standard Cluster Descriptor, bit 0)", _C, qemu_counts=False),
    Rule("L2-DATA-ALIGNED",
         "A standard or preallocated-zero L2 entry's host offset is cluster aligned.",
         f"qcow2.rst §Cluster mapping; {_REF} check_refcounts_l2", _C),
    Rule("COPIED-IFF-REFCOUNT-1",
         "In active L2 tables, COPIED is set on a standard cluster exactly when its refcount is 1.",
         f"qcow2.rst §Cluster mapping (L2 bit 63); {_REF} check_oflag_copied", _C),
    Rule("L2-NO-ZERO-FLAG-V2",
         "Version 2 images do not use the zero flag (L2 bit 0).",
         "qcow2.rst §Cluster mapping (bit 0 is reserved in version 2)", _C, qemu_counts=False),
    Rule("DATA-FILE-IDENTITY-MAP",
         "With raw external data, every allocated cluster's host offset equals its guest offset.",
         "qcow2.rst §Header (autoclear bit 1); block/qcow2-cluster.c (data file allocation)",
         _C, qemu_counts=False),
    # --- compressed clusters ----------------------------------------------------------------
    Rule("COMPRESSED-NO-COPIED",
         "A compressed cluster descriptor never has COPIED set.",
         f"qcow2.rst §Compressed Clusters Descriptor; {_REF} check_refcounts_l2", _C),
    Rule("COMPRESSED-NO-DATA-FILE",
         "An image with an external data file has no compressed clusters.",
         f"qcow2.rst §Header (incompatible bit 2); {_REF} check_refcounts_l2", _C),
    Rule("COMPRESSED-NO-BITMAP",
         "With extended L2, a compressed cluster's subcluster bitmap is zero.",
         f"qcow2.rst §Extended L2 Entries; {_REF} check_refcounts_l2", _C),
    Rule("COMPRESSED-OFFSET-RESERVED",
         "A compressed descriptor's host offset bits above 55 are zero.",
         "qcow2.rst §Compressed Clusters Descriptor", _C, qemu_counts=False),
    # --- subclusters ------------------------------------------------------------------------
    Rule("SUBCLUSTER-BITMAP-VALID",
         "No subcluster is both allocated and zero; an unallocated cluster has no allocation bits.",
         f"qcow2.rst §Extended L2 Entries; block/qcow2.h qcow2_get_subcluster_type; {_REF} "
         "check_refcounts_l2", _C),
    # --- refcounts ---------------------------------------------------------------------------
    Rule("REFTABLE-RESERVED-ZERO",
         "Refcount table entry bits 0-8 are zero.",
         f"qcow2.rst §Host cluster management; {_REF} check_refblocks", _C),
    Rule("REFBLOCK-ALIGNED",
         "A refcount block offset is cluster aligned.",
         f"qcow2.rst §Host cluster management; {_REF} check_refblocks", _C),
    Rule("REFBLOCK-INSIDE-FILE",
         "A refcount block lies inside the image file.",
         f"{_REF} check_refblocks", _C),
    Rule("REFBLOCK-REFCOUNT-1",
         "Every refcount block has a refcount of exactly 1.",
         f"qcow2.rst §Host cluster management; {_REF} check_refblocks", _C),
    Rule("REFCOUNT-READABLE",
         "The stored refcount of every host cluster can be read (its refcount block is aligned and "
         "addressable).",
         f"{_REF} compare_refcounts, qcow2_get_refcount", _E),
    Rule("REFCOUNT-MATCHES-REFERENCES",
         "No host cluster's stored refcount is below the number of references to it.",
         f"qcow2.rst §Host cluster management; {_REF} compare_refcounts", _C),
    Rule("REFCOUNT-NO-LEAK",
         "No host cluster's stored refcount is above the number of references to it.",
         f"qcow2.rst §Host cluster management; {_REF} compare_refcounts", _L),
    Rule("REFERENCE-INSIDE-FILE",
         "Every referenced region (table, cluster, compressed data) ends less than one cluster past "
         "the end of the image file.",
         f"{_REF} qcow2_inc_refcounts_imrt (each such reference counts once and is not counted "
         "as a reference)", _C),
    Rule("REFCOUNT-NO-OVERFLOW",
         "No host cluster has more references than refcount_bits can count.",
         f"{_REF} inc_refcounts", _C),
    Rule("METADATA-NO-OVERLAP",
         "No host cluster holds two different structures (header, L1, L2, refcount, snapshot, "
         "bitmap, data); only L2 tables and data clusters are shared.",
         f"qcow2.rst §Host cluster management; {_REF} qcow2_check_metadata_overlap "
         "(qemu-img check sees it as a refcount mismatch)", _C, qemu_counts=False),
    # --- snapshots ---------------------------------------------------------------------------
    Rule("SNAPSHOT-TABLE-READABLE",
         "The snapshot table can be read: at most 65536 entries, 1 KiB extra data each, 64 MiB total, "
         "cluster aligned.",
         f"qcow2.rst §Snapshots; {_SNAP} qcow2_read_snapshots, qcow2_check_read_snapshot_table", _E),
    Rule("SNAPSHOT-L1-SIZE",
         "A snapshot's L1 table has at most 32 MiB / 8 entries.",
         f"qcow2.rst §Snapshots; {_SNAP} qcow2_check_fix_snapshot_table; {_REF} calculate_refcounts",
         _C),
    Rule("SNAPSHOT-L1-ALIGNED",
         "A snapshot's L1 table offset is cluster aligned.",
         f"qcow2.rst §Snapshots; {_SNAP} qcow2_check_fix_snapshot_table", _C),
    Rule("SNAPSHOT-NO-DATA-FILE",
         "An image with an external data file has no internal snapshots.",
         f"qcow2.rst §External data file; {_REF} calculate_refcounts", _C),
    Rule("SNAPSHOT-EXTRA-DATA-V3",
         "In version 3, every snapshot's extra data holds at least vm_state_size_large and disk_size.",
         f"qcow2.rst §Snapshots; {_SNAP} qcow2_do_read_snapshots, qcow2_check_read_snapshot_table "
         "(an incomplete entry)", _C),
    Rule("SNAPSHOT-ID-UNIQUE",
         "Snapshot IDs are unique within the table.",
         "qcow2.rst §Snapshots (unique ID string)", _C, qemu_counts=False),
    # --- bitmaps ------------------------------------------------------------------------------
    Rule("BITMAP-DIRECTORY-VALID",
         "The bitmap directory is readable and its entries are sane: reserved flags zero, type 1, "
         "granularity 9..31, no extra data, table aligned and sized for the disk, entries fill the "
         "directory size exactly.",
         f"qcow2.rst §Bitmap directory; {_BMP} bitmap_list_load, check_dir_entry, "
         "qcow2_check_bitmaps_refcounts", _C),
    Rule("BITMAP-NAMES-UNIQUE",
         "Bitmap names are unique within the image.",
         f"qcow2.rst §Bitmap directory (name); {_BMP} qcow2_load_dirty_bitmaps (QEMU refuses to open "
         "an image with two bitmaps of the same name)", _E),
    Rule("BITMAP-TABLE-ENTRY-VALID",
         "Bitmap table entries have reserved bits zero, aligned offsets and no all-ones flag with an "
         "offset.",
         f"qcow2.rst §Bitmap table; {_BMP} check_table_entry, qcow2_check_bitmaps_refcounts", _C),
    Rule("BITMAP-NOT-IN-USE",
         "No bitmap of a cleanly closed image has the in_use flag set.",
         f"qcow2.rst §Bitmap directory (flags bit 0); {_BMP} qcow2_load_dirty_bitmaps",
         _C, qemu_counts=False),
)

RULES_BY_ID: dict[str, Rule] = {r.id: r for r in RULES}
assert len(RULES_BY_ID) == len(RULES), "rule ids must be unique"
