"""Reading an image file through the schemas, with QEMU's open-time validation.

``ImageFile`` parses the header, the extensions, the backing file name, the snapshot table,
the bitmap directory and the tables of saved bitmaps eagerly (QEMU reads all of them at
open), and the L1, L2 and refcount tables on demand. The checks and their order follow block/qcow2.c
(qcow2_do_open, qcow2_read_extensions, qcow2_validate_table), block/qcow2-snapshot.c
(qcow2_do_read_snapshots) and block/qcow2-bitmap.c (bitmap_list_load, check_dir_entry,
check_table_entry).

Error classes. What QEMU refuses with ENOTSUP (a qcow2 version other than 2 or 3, an unknown
compression type, unknown incompatible feature bits, bitmap extra data) is
UnsupportedFeature: the image may be fine, we just do not know the feature. Everything else
QEMU refuses at open (EINVAL, EFBIG, ...) is FormatError. No construct or OS error escapes.

Bounded memory. Every read is checked against the file size before any buffer is allocated
(``pread_exact``), and every table size is checked against QEMU's limits (spec/limits.py)
before it is read, so a header can claim anything without costing more than QEMU would
allocate (at most 32 MiB for an L1 table, 8 MiB for the refcount table, 64 MiB of snapshot
table, 64 MiB of bitmap directory, 8 MiB for a bitmap table).

Where we differ from QEMU, on purpose:
- QEMU's file driver reads past the end of the file as zeros; we refuse any structure that
  does not fit in the file with FormatError (QEMU itself never writes such a file), except
  the snapshot table, which is read as QEMU reads it: the last entry's padding is often
  missing, and a table past the end of the file opens in QEMU and serves guest I/O, so the
  engines must open it too (issue 15; `check` still reports its entries as incomplete).
  In ``check_mode`` the header, its extensions and the backing file name are read as QEMU
  reads them, zero-filled past the end of the file, so ``qemu-img check``'s verdict on a
  truncated header can be matched (spec/rules counts what follows from the zeros).
- Nothing outside the file is opened: a missing external data file name ("'data-file' is
  required" in QEMU), the backing chain and encryption keys are the caller's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import construct as c

from spec import bitmaps as bm
from spec import features as ft
from spec import header as hd
from spec import limits as lim
from spec.entries import (
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BME_TABLE_ENTRY_RESERVED_MASK,
)
from spec.errors import FormatError, UnsupportedFeature
from spec.geometry import Geometry
from spec.snapshot import SNAPSHOT_HEADER_SIZE, SnapshotHeader, snapshot_entry_size
from spec.tables import bitmap_table, l1_table, l2_table, refcount_block, refcount_table

INT64_MAX = lim.INT64_MAX

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2

_PARSE_ERRORS = (c.ConstructError, ValueError, OverflowError, TypeError, KeyError, IndexError)
"""What construct may raise on hostile bytes besides ConstructError (e.g. a size lambda that
yields nonsense); all of it means "these bytes do not fit the schema"."""


def parse(schema: c.Construct, data: bytes, where: str, **ctx: Any) -> Any:
    """Parse ``data`` with ``schema``; a construct error becomes FormatError with its path."""
    try:
        return schema.parse(data, **ctx)
    except _PARSE_ERRORS as e:
        inner = str(e).split("\n", 1)
        path = (getattr(e, "path", None) or "").replace("(parsing) -> ", "").replace(" -> ", ".")
        raise FormatError(inner[-1], f"{where}.{path}" if path else where) from None


def pread_zero_filled(f: BinaryIO, offset: int, n: int, where: str, file_size: int) -> bytes:
    """``n`` bytes at ``offset``, zeros past the end of the file (QEMU's file driver).

    Only for the small reads of the header area (``n`` at most a cluster), so the buffer
    stays bounded whatever the header claims.
    """
    if offset < 0 or n < 0:
        raise FormatError(f"invalid read of {n} bytes at {offset}", where)
    if offset >= file_size:
        return bytes(n)
    data = pread_exact(f, offset, min(n, file_size - offset), where, file_size)
    return data + bytes(n - len(data))


def pread_exact(f: BinaryIO, offset: int, n: int, where: str, file_size: int | None = None) -> bytes:
    """Read exactly ``n`` bytes; a read past the end of the file is FormatError.

    The size is checked before reading, because os.pread allocates its whole buffer first:
    this is what keeps a hostile offset or length from costing memory.
    """
    if offset < 0 or n < 0:
        raise FormatError(f"invalid read of {n} bytes at {offset}", where)
    try:
        if file_size is None:
            file_size = os.fstat(f.fileno()).st_size
        if offset + n > file_size:
            raise FormatError(f"file ends before {offset + n} (needed {n} bytes at {offset})", where)
        data = os.pread(f.fileno(), n, offset)
    except (OSError, OverflowError) as e:
        raise FormatError(f"cannot read {n} bytes at {offset}: {e}", where) from None
    if len(data) != n:
        raise FormatError(f"file ends before {offset + n} (needed {n} bytes at {offset})", where)
    return data


def validate_table_offset(offset: int, entries: int, entry_len: int, cluster_size: int,
                          where: str) -> None:
    """The offset half of QEMU's qcow2_validate_table: the table's end fits in an int64 and
    its start is cluster aligned."""
    size = entries * entry_len
    if size > INT64_MAX - offset:
        raise FormatError("table extends past the maximum file size", where)
    if offset % cluster_size:
        raise FormatError("table offset is not cluster aligned", where)


def validate_table(offset: int, entries: int, entry_len: int, max_size_bytes: int, cluster_size: int,
                   where_size: str, where_offset: str) -> None:
    """QEMU's qcow2_validate_table (block/qcow2.c): size limit first (EFBIG), then offset."""
    if entries > max_size_bytes // entry_len:
        raise FormatError(f"table too large ({entries} entries of {entry_len} bytes)", where_size)
    validate_table_offset(offset, entries, entry_len, cluster_size, where_offset)


def c_string(raw: bytes) -> str:
    """A name QEMU keeps as a C string: cut at the first NUL, undecodable bytes kept.

    QEMU never checks the encoding of backing file, backing format or data file names; it
    copies the bytes and stops at a NUL. surrogateescape keeps any byte sequence
    (os.fsencode gives the original bytes back), so such names open, as in QEMU.
    """
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


@dataclass
class Extension:
    """A parsed header extension, with its raw parse kept for round trips."""

    type: int
    length: int
    data: Any
    raw: c.Container
    offset: int = 0
    """File offset of the extension's type field."""

    @property
    def name(self) -> str:
        return hd.EXTENSION_NAMES.get(self.type, f"unknown 0x{self.type:08x}")

    @property
    def size(self) -> int:
        """Bytes the extension occupies: 8 + length + padding to 8."""
        return 8 + self.length + (-self.length % 8)


@dataclass
class ImageFile(hd.HeaderViews):
    """An opened qcow2 file, read through the schemas. Never writes."""

    path: str
    f: BinaryIO
    header: c.Container
    extensions: list[Extension]
    geometry: Geometry
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: list[c.Container] = field(default_factory=list)
    file_size: int = 0
    backing_file_raw: bytes | None = None
    """The backing file name bytes exactly as stored (``backing_file`` is its C-string reading)."""
    snapshots: list[c.Container] = field(default_factory=list)
    """The snapshot table, read and checked at open as qcow2_read_snapshots does."""
    snapshot_offsets: list[int] = field(default_factory=list)
    """File offset of each snapshot table entry."""
    bitmaps: list[c.Container] = field(default_factory=list)
    """The bitmap directory, read and checked at open as bitmap_list_load does."""

    # --- convenience views of the header -------------------------------------------------
    @property
    def bitmaps_enabled(self) -> bool:
        """QEMU uses the bitmaps extension only while the autoclear bitmaps bit is set
        (qcow2_read_extensions); otherwise the bitmaps count as absent."""
        return (self.extension(hd.QCOW2_EXT_MAGIC_BITMAPS) is not None
                and bool(self.autoclear_features & ft.QCOW2_AUTOCLEAR_BITMAPS))

    def extension(self, ext_type: int) -> Extension | None:
        """The extension of this type QEMU uses: the last one (each occurrence overwrites the
        previous in qcow2_read_extensions; duplicates are not an error there)."""
        found = [e for e in self.extensions if e.type == ext_type]
        return found[-1] if found else None

    # --- tables, read on demand ----------------------------------------------------------
    def read(self, offset: int, n: int, where: str) -> bytes:
        if offset + n > self.file_size:
            # The file may have grown since open (a caller that writes through the same file).
            try:
                self.file_size = os.fstat(self.f.fileno()).st_size
            except (OSError, ValueError) as e:
                raise FormatError(f"cannot stat: {e}", where) from None
        return pread_exact(self.f, offset, n, where, self.file_size)

    def read_zero_filled(self, offset: int, n: int, where: str) -> bytes:
        """``n`` bytes at ``offset``, zeros past the end of the file, as QEMU's file driver
        reads (``n`` is bounded by the caller: one snapshot table entry, one bitmap table)."""
        return pread_zero_filled(self.f, offset, n, where, self.file_size)

    def l1_table(self, offset: int | None = None, n: int | None = None) -> list[int]:
        """The active L1 table, or ``n`` entries at ``offset`` (a snapshot's L1 table).

        Any L1 table is bounded by QCOW_MAX_L1_SIZE and cluster aligned, as QEMU checks before
        it reads a snapshot's table (qcow2-snapshot.c, qcow2_snapshot_goto and friends).
        """
        off = self.header.l1_table_offset if offset is None else offset
        cnt = self.header.l1_size if n is None else n
        validate_table(off, cnt, 8, lim.QCOW_MAX_L1_SIZE, self.cluster_size, "l1_table.l1_size",
                       "l1_table.l1_table_offset")
        return list(parse(l1_table(cnt), self.read(off, cnt * 8, "l1_table"), "l1_table"))

    def snapshot_l1_table(self, snapshot: c.Container) -> list[int]:
        """A snapshot's L1 table (qcow2.rst "Snapshots": l1_table_offset, l1_size)."""
        return self.l1_table(snapshot.l1_table_offset, snapshot.l1_size)

    def _check_cluster(self, offset: int, where: str) -> None:
        # QEMU treats a misaligned L2 or refcount block offset as corruption
        # (qcow2-cluster.c l2_load / qcow2-refcount.c qcow2_get_refcount); a reader of
        # structures reports it as a malformed image.
        if offset <= 0 or offset % self.cluster_size:
            raise FormatError(f"offset {offset:#x} is not a non-zero cluster-aligned offset", where)

    def l2_table(self, offset: int) -> list[Any]:
        self._check_cluster(offset, "l2_table")
        data = self.read(offset, self.cluster_size, "l2_table")
        return list(parse(l2_table(self.geometry), data, "l2_table"))

    def refcount_table(self) -> list[int]:
        n = self.header.refcount_table_clusters * self.cluster_size // 8
        data = self.read(self.header.refcount_table_offset, n * 8, "refcount_table")
        return list(parse(refcount_table(n), data, "refcount_table"))

    def refcount_block(self, offset: int) -> list[int]:
        self._check_cluster(offset, "refcount_block")
        data = self.read(offset, self.cluster_size, "refcount_block")
        return list(parse(refcount_block(self.geometry), data, "refcount_block"))

    def snapshot_table(self) -> list[c.Container]:
        """The snapshot table, read again from the file with QEMU's checks (open read it once
        already; reading again sees changes made through the header since)."""
        self.snapshots, self.snapshot_offsets = _read_snapshots(self)
        return list(self.snapshots)

    def bitmap_directory(self) -> list[c.Container]:
        """The bitmap directory, read again with QEMU's checks; empty without usable bitmaps."""
        self.bitmaps = _read_bitmap_directory(self) if self.bitmaps_enabled else []
        return list(self.bitmaps)

    def bitmap_table(self, entry: c.Container) -> list[int]:
        """A bitmap's table, each entry checked as check_table_entry does (qcow2-bitmap.c).

        The size was bounded when the directory was read (check_dir_entry), so the table is at
        most BME_MAX_PHYS_SIZE / cluster_size entries.
        """
        n = entry.bitmap_table_size
        if not 0 < n <= min(lim.BME_MAX_TABLE_SIZE, lim.BME_MAX_PHYS_SIZE // self.cluster_size):
            raise FormatError("bitmap table size out of range", "bitmap_table.size")
        validate_table_offset(entry.bitmap_table_offset, n, 8, self.cluster_size, "bitmap_table.offset")
        # Past the end of the file the table reads as zeros (entries for all-zero clusters),
        # as QEMU's file driver reads it, and QEMU opens the image (issue 15). The size is
        # bounded above, so the zeros are too.
        data = self.read_zero_filled(entry.bitmap_table_offset, n * 8, "bitmap_table")
        table: list[int] = list(parse(bitmap_table(n), data, "bitmap_table"))
        for i, e in enumerate(table):
            off = e & BME_TABLE_ENTRY_OFFSET_MASK
            if (e & BME_TABLE_ENTRY_RESERVED_MASK
                    or (off and (e & BME_TABLE_ENTRY_FLAG_ALL_ONES or off % self.cluster_size))):
                raise FormatError("invalid bitmap table entry", f"bitmap_table[{i}]")
        return table

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_name(raw: bytes, where: str) -> str:
    """Kept for callers of the old helper: names are C strings now (see ``c_string``)."""
    return c_string(raw)


def open_image(path: str | os.PathLike[str], *, check_mode: bool = False) -> ImageFile:
    """Open ``path`` read-only and validate it as qcow2_do_open does. See the module doc.

    ``check_mode`` is QEMU's BDRV_O_CHECK (how `qemu-img check` opens): an empty refcount
    table is allowed and the snapshot table and bitmaps are not read at open, because a
    check must be able to report (and repair) exactly those.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - owned by the returned ImageFile
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot open: {e}", str(path)) from None
    try:
        return _load(str(path), f, check_mode)
    except BaseException:
        f.close()
        raise


def _be(data: bytes, start: int, n: int) -> int:
    return int.from_bytes(data[start:start + n], "big")


def _load(path: str, f: BinaryIO, check_mode: bool = False) -> ImageFile:
    try:
        file_size = os.fstat(f.fileno()).st_size
        head = os.pread(f.fileno(), lim.V3_MIN_HEADER_LENGTH, 0)
    except OSError as e:
        raise FormatError(f"cannot read: {e}", "header") from None
    if check_mode:
        # qcow2_do_open reads the fixed header with bdrv_pread, which zero-fills past the end
        # of the file: a cut header is then judged on its zeros (version 0, cluster_bits 0,
        # header_length 0, ... are refused as such; a cut after byte 104 may open).
        head += bytes(lim.V3_MIN_HEADER_LENGTH - len(head))
    read = pread_zero_filled if check_mode else pread_exact
    if head[:4] != lim.QCOW_MAGIC:
        raise FormatError("not a qcow2 image (bad magic)", "header.magic")
    if len(head) < lim.V2_HEADER_LENGTH:
        raise FormatError("file too short for a qcow2 header", "header")
    version = _be(head, 4, 4)
    if version not in (2, 3):
        # ENOTSUP in qcow2_do_open.
        raise UnsupportedFeature(f"qcow2 version {version}")
    cluster_bits = _be(head, 20, 4)
    if not lim.MIN_CLUSTER_BITS <= cluster_bits <= lim.MAX_CLUSTER_BITS:
        raise FormatError(f"unsupported cluster size (cluster_bits={cluster_bits})", "header.cluster_bits")
    cluster_size = 1 << cluster_bits
    if version == 2:
        hlen = lim.V2_HEADER_LENGTH
    else:
        if len(head) < lim.V3_MIN_HEADER_LENGTH:
            raise FormatError("file too short for a version 3 header", "header")
        hlen = _be(head, 100, 4)
        if hlen < lim.V3_MIN_HEADER_LENGTH:
            raise FormatError("header too short", "header.v3.header_length")
        # qcow2.rst also wants a multiple of 8; QEMU does not check that, so neither do we.
    if hlen > cluster_size:
        raise FormatError("header exceeds cluster size", "header.v3.header_length")
    h = parse(hd.Header, read(f, 0, hlen, "header", file_size), "header")
    backing_offset = h.backing_file_offset
    if backing_offset > cluster_size:
        raise FormatError("invalid backing file offset", "header.backing_file_offset")
    # The extensions end where the backing file name starts, or at the end of the first
    # cluster (qcow2_do_open, ext_end).
    ext_end = backing_offset if backing_offset else cluster_size

    incompat = h.v3.incompatible_features if h.v3 else 0
    autoclear = h.v3.autoclear_features if h.v3 else 0

    # validate_compression_type runs before the feature-bit check in qcow2_do_open.
    ctype = h.ext.compression_type if h.ext else 0
    if ctype not in (ft.CompressionType.ZLIB, ft.CompressionType.ZSTD):
        raise UnsupportedFeature(f"compression type {ctype}")
    if ctype != ft.CompressionType.ZLIB and not incompat & ft.QCOW2_INCOMPAT_COMPRESSION:
        raise FormatError("non-default compression type without the compression type feature bit",
                          "header.ext.compression_type")
    if ctype == ft.CompressionType.ZLIB and incompat & ft.QCOW2_INCOMPAT_COMPRESSION:
        raise FormatError("compression type feature bit set with zlib compression",
                          "header.v3.incompatible_features")

    unknown = incompat & ~ft.QCOW2_INCOMPAT_MASK
    if unknown:
        raise UnsupportedFeature(", ".join(_unknown_feature_names(f, hlen, ext_end, h, file_size, unknown)),
                                 f"unsupported incompatible feature bits 0x{unknown:x}")
    # The corrupt bit only forbids opening read/write; this reader never writes.

    extended_l2 = bool(incompat & ft.QCOW2_INCOMPAT_EXTL2)
    if extended_l2 and cluster_bits < lim.MIN_CLUSTER_BITS_EXTENDED_L2:
        # QEMU's test is on the subcluster size (below 512 bytes), which is the same thing.
        raise FormatError("unsupported subcluster size", "header.cluster_bits")
    refcount_order = h.v3.refcount_order if h.v3 else 4
    if refcount_order > lim.MAX_REFCOUNT_ORDER:
        raise FormatError("reference count entry width too large", "header.v3.refcount_order")
    geometry = Geometry(cluster_bits, extended_l2, refcount_order)

    if h.refcount_table_clusters == 0 and not check_mode:
        # QEMU refuses this unless opened for `qemu-img check` (BDRV_O_CHECK), which can rebuild.
        raise FormatError("image does not contain a reference count table", "header.refcount_table_clusters")
    validate_table(h.refcount_table_offset, h.refcount_table_clusters, cluster_size,
                   lim.QCOW_MAX_REFTABLE_SIZE, cluster_size,
                   "header.refcount_table_clusters", "header.refcount_table_offset")
    if not check_mode:
        validate_table(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE,
                       SNAPSHOT_HEADER_SIZE * lim.QCOW_MAX_SNAPSHOTS, cluster_size,
                       "header.nb_snapshots", "header.snapshots_offset")
    validate_table(h.l1_table_offset, h.l1_size, 8, lim.QCOW_MAX_L1_SIZE, cluster_size,
                   "header.l1_size", "header.l1_table_offset")
    # QEMU computes this index with 64-bit wrap-around (size_to_l1) and then fails for sizes
    # near 2^64 when the block layer refreshes the sector count; exact arithmetic refuses
    # those same images here.
    l1_needed = geometry.l1_size_for(h.size)
    if l1_needed > lim.INT_MAX:
        raise FormatError("image is too big", "header.size")
    if h.l1_size < l1_needed:
        raise FormatError("L1 table is too small", "header.l1_size")
    if h.crypt_method > QCOW_CRYPT_LUKS:
        # qcow2_update_options_prepare: EINVAL.
        raise FormatError(f"unsupported encryption method {h.crypt_method}", "header.crypt_method")

    extensions = _read_extensions(f, hlen, ext_end, h, file_size, zero_fill=check_mode)
    img = ImageFile(path=path, f=f, header=h, extensions=extensions, geometry=geometry, file_size=file_size)
    for ext in extensions:
        # A later duplicate replaces an earlier one, as in qcow2_read_extensions.
        if ext.type == hd.QCOW2_EXT_MAGIC_BACKING_FORMAT:
            # QEMU copies the name into a C string, and an empty one means "probe the
            # backing file" (block.c, bdrv_open_backing_file passes a driver only for a
            # non-empty bs->backing_format): a name starting with NUL is no format at all.
            img.backing_format = c_string(ext.data) or None
        elif ext.type == hd.QCOW2_EXT_MAGIC_DATA_FILE:
            img.data_file = c_string(ext.data)
        elif ext.type == hd.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            img.feature_names = list(ext.data.entries)

    if not incompat & ft.QCOW2_INCOMPAT_DATA_FILE and autoclear & ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        raise FormatError("data-file-raw requires a data file", "header.v3.autoclear_features")
    if h.crypt_method == QCOW_CRYPT_LUKS and img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is None:
        raise FormatError("LUKS encryption without a full disk encryption header pointer", "extensions")

    if backing_offset:
        n = h.backing_file_size
        if n > min(lim.BACKING_FILE_NAME_MAX, cluster_size - backing_offset):
            raise FormatError("backing file name too long", "header.backing_file_size")
        raw = parse(hd.backing_file_name(n), read(f, backing_offset, n, "backing_file", file_size),
                    "backing_file")
        img.backing_file_raw = raw
        img.backing_file = c_string(raw)

    if not check_mode:
        img.snapshots, img.snapshot_offsets = _read_snapshots(img)
        if img.bitmaps_enabled:
            img.bitmaps = _read_bitmap_directory(img)
    return img


def _unknown_feature_names(f: BinaryIO, start: int, end: int, h: c.Container, file_size: int,
                           unknown: int) -> list[str]:
    """Names for unknown incompatible bits from the image's own feature name table, as
    report_unsupported_feature does; a broken extension area just leaves them unnamed."""
    names: dict[int, str] = {}
    try:
        for e in _read_extensions(f, start, end, h, file_size, validate=False):
            if e.type == hd.QCOW2_EXT_MAGIC_FEATURE_TABLE:
                for fe in e.data.entries:
                    if fe.type == ft.FeatureType.INCOMPATIBLE:
                        names[fe.bit] = c_string(fe.name)
    except FormatError:
        pass
    return [names.get(b, f"bit {b}") for b in range(64) if unknown >> b & 1]


def _read_extensions(f: BinaryIO, start: int, end: int, h: c.Container, file_size: int,
                     validate: bool = True, zero_fill: bool = False) -> list[Extension]:
    """The extension list between the header and ``end`` (qcow2_read_extensions).

    The list ends at an end marker or when the next extension would start at or past
    ``end``. An extension's data must end by ``end``, but its padding may run past it; the
    padding beyond ``end`` is not read (it is taken as zeros). ``zero_fill``: bytes past the
    end of the file read as zeros (check mode, as QEMU reads them).
    """
    read = pread_zero_filled if zero_fill else pread_exact
    out: list[Extension] = []
    offset = start
    while offset < end:
        where = f"extensions[{len(out)}]"
        fixed = read(f, offset, 8, where, file_size)
        etype, elen = _be(fixed, 0, 4), _be(fixed, 4, 4)
        if offset + 8 > end or elen > end - offset - 8:
            raise FormatError("header extension too large", f"{where}.length")
        padded = elen + (-elen % 8)
        raw_bytes = read(f, offset, 8 + min(padded, end - offset - 8), where, file_size)
        raw_bytes += b"\0" * (8 + padded - len(raw_bytes))
        raw = parse(hd.HeaderExtension, raw_bytes, where)
        ext = Extension(etype, elen, raw.data, raw, offset)
        out.append(ext)
        if etype == hd.QCOW2_EXT_MAGIC_END:
            return out
        if validate:
            _validate_extension(ext, h, where)
        offset += 8 + padded
    return out


def _validate_extension(ext: Extension, h: c.Container, where: str) -> None:
    cluster_size = 1 << h.cluster_bits
    if ext.type == hd.QCOW2_EXT_MAGIC_BACKING_FORMAT and ext.length > lim.QCOW_BACKING_FORMAT_MAX:
        raise FormatError("backing format name too long", f"{where}.length")
    if ext.type == hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        if h.crypt_method != QCOW_CRYPT_LUKS:
            raise FormatError("encryption header pointer without LUKS encryption", where)
        if ext.length != 16:
            raise FormatError("encryption header pointer has the wrong size", f"{where}.length")
        if ext.data.offset % cluster_size:
            raise FormatError("encryption header offset is not cluster aligned", f"{where}.data.offset")
    if ext.type == hd.QCOW2_EXT_MAGIC_BITMAPS:
        if ext.length != 24:
            raise FormatError("invalid bitmaps extension length", f"{where}.length")
        autoclear = h.v3.autoclear_features if h.v3 else 0
        # Without the autoclear bit QEMU ignores the extension's content (the bitmaps are
        # considered inconsistent and dropped), so nothing else is checked then.
        if autoclear & ft.QCOW2_AUTOCLEAR_BITMAPS:
            d = ext.data
            if d.reserved32:
                raise FormatError("reserved field is not zero", f"{where}.data.reserved32")
            if d.nb_bitmaps > lim.QCOW2_MAX_BITMAPS:
                raise FormatError("too many bitmaps", f"{where}.data.nb_bitmaps")
            if d.nb_bitmaps == 0:
                raise FormatError("bitmaps extension with zero bitmaps", f"{where}.data.nb_bitmaps")
            if d.bitmap_directory_offset % cluster_size:
                raise FormatError("invalid bitmap directory offset", f"{where}.data.bitmap_directory_offset")
            if d.bitmap_directory_size > lim.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                raise FormatError("bitmap directory too large", f"{where}.data.bitmap_directory_size")


def _read_snapshots(img: ImageFile) -> tuple[list[c.Container], list[int]]:
    """The snapshot table with QEMU's limits (qcow2-snapshot.c, qcow2_do_read_snapshots).

    Entries start 8-byte aligned. The table length QEMU limits counts every entry and the
    padding between entries, not the padding after the last one.
    """
    h = img.header
    nb = h.nb_snapshots
    if not nb:
        return [], []
    validate_table(h.snapshots_offset, nb, SNAPSHOT_HEADER_SIZE,
                   SNAPSHOT_HEADER_SIZE * lim.QCOW_MAX_SNAPSHOTS, img.cluster_size,
                   "header.nb_snapshots", "header.snapshots_offset")
    entries: list[c.Container] = []
    offsets: list[int] = []
    offset = h.snapshots_offset
    table_length = 0
    zero_entry: c.Container | None = None
    for i in range(nb):
        where = f"snapshots[{i}]"
        table_length += -table_length % 8
        offset += -offset % 8
        if offset >= img.file_size:
            # QEMU's file driver reads past the end of the file as zeros, so qemu-io opens
            # such an image and lists an empty-named snapshot per missing entry (issue 15).
            # Each is the 40-byte all-zero entry: parsed once, copied for the rest.
            if zero_entry is None:
                zero_entry = parse(SnapshotHeader, bytes(SNAPSHOT_HEADER_SIZE), where)
            table_length += SNAPSHOT_HEADER_SIZE
            if table_length > lim.QCOW_MAX_SNAPSHOTS_SIZE:
                raise FormatError("snapshot table too big", "header.nb_snapshots")
            entries.append(c.Container(zero_entry))
            offsets.append(offset)
            offset += SNAPSHOT_HEADER_SIZE
            continue
        fixed = img.read_zero_filled(offset, SNAPSHOT_HEADER_SIZE, where)
        id_len, name_len, extra = _be(fixed, 12, 2), _be(fixed, 14, 2), _be(fixed, 36, 4)
        if extra > lim.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError("too much extra metadata", f"{where}.extra_data_size")
        n = snapshot_entry_size(extra, id_len, name_len)
        table_length += n
        if table_length > lim.QCOW_MAX_SNAPSHOTS_SIZE:
            raise FormatError("snapshot table too big", "header.nb_snapshots")
        # The schema includes the entry's padding. What lies past the end of the file reads
        # as zeros, as in QEMU (the last entry's padding is often missing from the file).
        body = img.read_zero_filled(offset, n + -n % 8, where)
        entries.append(parse(SnapshotHeader, body, where))
        offsets.append(offset)
        offset += n
    return entries, offsets


def _read_bitmap_directory(img: ImageFile) -> list[c.Container]:
    """The bitmap directory with QEMU's checks (qcow2-bitmap.c, bitmap_list_load and
    check_dir_entry). QEMU runs them at open (qcow2_load_dirty_bitmaps) and fails the open."""
    ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    assert ext is not None
    d = ext.data
    size = d.bitmap_directory_size
    if size == 0:
        raise FormatError("bitmap directory size is zero", "bitmaps.bitmap_directory_size")
    validate_table_offset(d.bitmap_directory_offset, size, 1, img.cluster_size,
                          "bitmaps.bitmap_directory_offset")
    data = img.read(d.bitmap_directory_offset, size, "bitmap_directory")
    entries: list[c.Container] = []
    pos = 0
    while pos < size:
        where = f"bitmap_directory[{len(entries)}]"
        if pos + bm.BITMAP_DIR_ENTRY_HEADER_SIZE > size:
            raise FormatError("broken bitmap directory", where)
        if len(entries) + 1 > d.nb_bitmaps:
            raise FormatError("more bitmaps found than the extension declares", "bitmaps.nb_bitmaps")
        name_size, extra = _be(data, pos + 18, 2), _be(data, pos + 20, 4)
        n = bm.dir_entry_size(name_size, extra)
        if pos + n > size:
            raise FormatError("broken bitmap directory", where)
        if extra:
            # bitmap_list_load: QEMU supports no bitmap extra data whatever the flags say.
            raise UnsupportedFeature("bitmap extra data")
        entry = parse(bm.BitmapDirectoryEntry, data[pos:pos + n], where)
        _check_dir_entry(img, entry, where)
        if any(bytes(other.name) == bytes(entry.name) for other in entries):
            # bitmap_list_load refuses a directory whose names are not unique.
            raise FormatError("duplicate bitmap name", f"{where}.name")
        entries.append(entry)
        pos += n
    if len(entries) != d.nb_bitmaps:
        raise FormatError("fewer bitmaps found than the extension declares", "bitmaps.nb_bitmaps")
    return entries


def _check_dir_entry(img: ImageFile, e: c.Container, where: str) -> None:
    """check_dir_entry (qcow2-bitmap.c); QEMU fails the open with EINVAL on any of these."""
    cs = img.cluster_size
    bad = (e.bitmap_table_size == 0 or e.bitmap_table_offset == 0 or e.bitmap_table_offset % cs
           or e.bitmap_table_size > lim.BME_MAX_TABLE_SIZE
           or not lim.BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= lim.BME_MAX_GRANULARITY_BITS
           or e.flags & bm.BME_RESERVED_FLAGS or e.name_size > lim.BME_MAX_NAME_SIZE
           or e.type != bm.BT_DIRTY_TRACKING_BITMAP)
    if bad:
        raise FormatError("bitmap does not satisfy the constraints", where)
    phys = e.bitmap_table_size * cs
    if phys > lim.BME_MAX_PHYS_SIZE:
        raise FormatError("bitmap too large", f"{where}.bitmap_table_size")
    # A bitmap in use may be short (not saved after a resize); a saved one must cover the
    # whole disk. QEMU compares against the virtual size (bdrv_getlength of the qcow2 node).
    length = img.size // 512 * 512  # bs->total_sectors * BDRV_SECTOR_SIZE
    if e.flags & bm.BME_FLAG_IN_USE:
        return
    if length > (phys * 8) << e.granularity_bits:
        raise FormatError("bitmap table too small for the disk", f"{where}.bitmap_table_size")
    # A saved bitmap is loaded at open (qcow2-bitmap.c, load_bitmap): its table must have
    # exactly the clusters its serialized data needs, and every table entry must be valid.
    if e.bitmap_table_size != bitmap_table_clusters(length, e.granularity_bits, cs):
        raise FormatError("bitmap table size does not match the disk size", f"{where}.bitmap_table_size")
    img.bitmap_table(e)


def bitmap_table_clusters(disk_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Clusters of bitmap data a saved bitmap has (qcow2-bitmap.c, load_bitmap_data).

    QEMU serializes a dirty bitmap in whole 64-bit words, one bit per ``2**granularity_bits``
    bytes of disk (util/hbitmap.c, hbitmap_serialization_size), and stores that in clusters.
    """
    if disk_size == 0:
        return 0
    words = (((disk_size - 1) >> granularity_bits) >> 6) + 1
    return -(-words * 8 // cluster_size)
