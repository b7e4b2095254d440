"""Reading an image file through the schemas, with QEMU's open-time validation.

``ImageFile`` parses the header, the extensions and the backing file name eagerly, and the
tables on demand. The checks and their order follow block/qcow2.c (qcow2_do_open,
qcow2_read_extensions, validate_table_offset) and block/qcow2-snapshot.c
(qcow2_read_snapshots). Each failed check raises FormatError naming the field path, or
UnsupportedFeature; no construct or OS error escapes. Memory stays bounded: every size is
checked against QEMU's limits (spec/limits.py) before anything is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import construct as c

from spec import features as ft
from spec import header as hd
from spec import limits as lim
from spec.bitmaps import bitmap_directory
from spec.errors import FormatError, UnsupportedFeature
from spec.geometry import Geometry
from spec.snapshot import SNAPSHOT_HEADER_SIZE, SnapshotHeader
from spec.tables import l1_table, l2_table, refcount_block, refcount_table

INT64_MAX = (1 << 63) - 1

QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_CRYPT_LUKS = 2


def parse(schema: c.Construct, data: bytes, where: str, **ctx: Any) -> Any:
    """Parse ``data`` with ``schema``; a construct error becomes FormatError with its path."""
    try:
        return schema.parse(data, **ctx)
    except c.ConstructError as e:
        inner = str(e).split("\n", 1)
        path = (getattr(e, "path", None) or "").replace("(parsing) -> ", "").replace(" -> ", ".")
        raise FormatError(inner[-1], f"{where}.{path}" if path else where) from None


def pread_exact(f: BinaryIO, offset: int, n: int, where: str) -> bytes:
    """Read exactly ``n`` bytes; a short read means the file is truncated (FormatError)."""
    try:
        data = os.pread(f.fileno(), n, offset)
    except (OSError, OverflowError) as e:
        raise FormatError(f"cannot read {n} bytes at {offset}: {e}", where) from None
    if len(data) != n:
        raise FormatError(f"file ends before {offset + n} (needed {n} bytes at {offset})", where)
    return data


def validate_table_offset(offset: int, entries: int, entry_len: int, cluster_size: int,
                          where: str) -> None:
    """QEMU's validate_table_offset: cluster aligned, and the end does not overflow int64."""
    size = entries * entry_len
    if size > INT64_MAX - offset:
        raise FormatError("table extends past the maximum file size", where)
    if offset % cluster_size:
        raise FormatError("table offset is not cluster aligned", where)


@dataclass
class Extension:
    """A parsed header extension, with its raw parse kept for round trips."""

    type: int
    length: int
    data: Any
    raw: c.Container

    @property
    def name(self) -> str:
        return hd.EXTENSION_NAMES.get(self.type, f"unknown 0x{self.type:08x}")


@dataclass
class ImageFile:
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

    # --- convenience views of the header -------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.header.version)

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

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
        return hd.header_length(self.header)

    @property
    def compression_type(self) -> ft.CompressionType:
        if self.header.ext is None:
            return ft.CompressionType.ZLIB
        return ft.CompressionType(self.header.ext.compression_type)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & ft.QCOW2_INCOMPAT_DATA_FILE)

    @property
    def extended_l2(self) -> bool:
        return self.geometry.extended_l2

    def extension(self, ext_type: int) -> Extension | None:
        return next((e for e in self.extensions if e.type == ext_type), None)

    # --- tables, read on demand ----------------------------------------------------------
    def read(self, offset: int, n: int, where: str) -> bytes:
        return pread_exact(self.f, offset, n, where)

    def l1_table(self, offset: int | None = None, n: int | None = None) -> list[int]:
        off = self.header.l1_table_offset if offset is None else offset
        cnt = self.header.l1_size if n is None else n
        return list(parse(l1_table(cnt), self.read(off, cnt * 8, "l1_table"), "l1_table"))

    def l2_table(self, offset: int) -> list[Any]:
        data = self.read(offset, self.cluster_size, "l2_table")
        return list(parse(l2_table(self.geometry), data, "l2_table"))

    def refcount_table(self) -> list[int]:
        n = self.header.refcount_table_clusters * self.cluster_size // 8
        data = self.read(self.header.refcount_table_offset, n * 8, "refcount_table")
        return list(parse(refcount_table(n), data, "refcount_table"))

    def refcount_block(self, offset: int) -> list[int]:
        data = self.read(offset, self.cluster_size, "refcount_block")
        return list(parse(refcount_block(self.geometry), data, "refcount_block"))

    def snapshot_table(self) -> list[c.Container]:
        """The snapshot table, with QEMU's limits (qcow2-snapshot.c, qcow2_read_snapshots)."""
        entries = []
        offset = self.header.snapshots_offset
        total = 0
        for i in range(self.header.nb_snapshots):
            where = f"snapshots[{i}]"
            fixed = self.read(offset, SNAPSHOT_HEADER_SIZE, where)
            extra, id_len, name_len = (
                int.from_bytes(fixed[36:40], "big"),
                int.from_bytes(fixed[12:14], "big"),
                int.from_bytes(fixed[14:16], "big"),
            )
            if extra > lim.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                raise FormatError("too much extra metadata", f"{where}.extra_data_size")
            n = SNAPSHOT_HEADER_SIZE + extra + id_len + name_len
            n += -n % 8
            total += n
            if total > lim.QCOW_MAX_SNAPSHOTS_SIZE:
                raise FormatError("snapshot table too big", "header.nb_snapshots")
            entries.append(parse(SnapshotHeader, self.read(offset, n, where), where))
            offset += n
        return entries

    def bitmap_directory(self) -> list[c.Container]:
        ext = self.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        if ext is None:
            return []
        d = ext.data
        data = self.read(d.bitmap_directory_offset, d.bitmap_directory_size, "bitmap_directory")
        return list(parse(bitmap_directory(d.nb_bitmaps), data, "bitmap_directory"))

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_name(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("not valid UTF-8", where) from None


def open_image(path: str | os.PathLike[str]) -> ImageFile:
    """Open ``path`` read-only and validate it as qcow2_do_open does. See the module doc."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - owned by the returned ImageFile
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", str(path)) from None
    try:
        return _load(str(path), f)
    except BaseException:
        f.close()
        raise


def _load(path: str, f: BinaryIO) -> ImageFile:
    file_size = os.fstat(f.fileno()).st_size
    head = os.pread(f.fileno(), lim.V3_MIN_HEADER_LENGTH, 0)
    if head[:4] != lim.QCOW_MAGIC:
        raise FormatError("not a qcow2 image (bad magic)", "header.magic")
    if len(head) < lim.V2_HEADER_LENGTH:
        raise FormatError("file too short for a qcow2 header", "header")
    version = int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise UnsupportedFeature(f"qcow2 version {version}")
    cluster_bits = int.from_bytes(head[20:24], "big")
    if not lim.MIN_CLUSTER_BITS <= cluster_bits <= lim.MAX_CLUSTER_BITS:
        raise FormatError(f"unsupported cluster size (cluster_bits={cluster_bits})", "header.cluster_bits")
    cluster_size = 1 << cluster_bits
    if version == 2:
        hlen = lim.V2_HEADER_LENGTH
    else:
        if len(head) < lim.V3_MIN_HEADER_LENGTH:
            raise FormatError("file too short for a version 3 header", "header")
        hlen = int.from_bytes(head[100:104], "big")
        if hlen < lim.V3_MIN_HEADER_LENGTH:
            raise FormatError("header too short", "header.v3.header_length")
        if hlen > cluster_size:
            raise FormatError("header exceeds cluster size", "header.v3.header_length")
    h = parse(hd.Header, pread_exact(f, 0, hlen, "header"), "header")
    backing_offset = h.backing_file_offset
    if backing_offset > cluster_size:
        raise FormatError("invalid backing file offset", "header.backing_file_offset")

    incompat = h.v3.incompatible_features if h.v3 else 0
    unknown = incompat & ~ft.QCOW2_INCOMPAT_MASK
    if unknown:
        raise UnsupportedFeature(", ".join(ft.bit_names(unknown, ft.FeatureType.INCOMPATIBLE)),
                                 f"unsupported incompatible feature bits 0x{unknown:x}")
    refcount_order = h.v3.refcount_order if h.v3 else 4
    if refcount_order > lim.MAX_REFCOUNT_ORDER:
        raise FormatError("reference count entry width too large", "header.v3.refcount_order")

    ctype = h.ext.compression_type if h.ext else 0
    if ctype not in (0, 1):
        raise UnsupportedFeature(f"compression type {ctype}")
    if ctype != 0 and not incompat & ft.QCOW2_INCOMPAT_COMPRESSION:
        raise FormatError("non-default compression type without the compression type feature bit",
                          "header.ext.compression_type")
    if ctype == 0 and incompat & ft.QCOW2_INCOMPAT_COMPRESSION:
        raise FormatError("compression type feature bit set with zlib compression",
                          "header.v3.incompatible_features")

    if h.crypt_method > QCOW_CRYPT_LUKS:
        raise FormatError(f"unsupported encryption method {h.crypt_method}", "header.crypt_method")
    extended_l2 = bool(incompat & ft.QCOW2_INCOMPAT_EXTL2)
    geometry = Geometry(cluster_bits, extended_l2, refcount_order)
    if geometry.subcluster_size < 1 << lim.MIN_CLUSTER_BITS:
        raise FormatError("unsupported subcluster size", "header.cluster_bits")

    if h.refcount_table_clusters == 0 and not incompat & ft.QCOW2_INCOMPAT_DATA_FILE:
        # QEMU accepts an empty refcount table only to let check repair it; we refuse early.
        raise FormatError("image does not contain a reference count table", "header.refcount_table_clusters")
    if h.refcount_table_clusters > lim.QCOW_MAX_REFTABLE_SIZE // cluster_size:
        raise FormatError("reference count table too large", "header.refcount_table_clusters")
    validate_table_offset(h.refcount_table_offset, h.refcount_table_clusters, cluster_size, cluster_size,
                          "header.refcount_table_offset")
    if h.nb_snapshots > lim.QCOW_MAX_SNAPSHOTS:
        raise FormatError("too many snapshots", "header.nb_snapshots")
    validate_table_offset(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_HEADER_SIZE, cluster_size,
                          "header.snapshots_offset")
    if h.l1_size > lim.QCOW_MAX_L1_SIZE // 8:
        raise FormatError("active L1 table too large", "header.l1_size")
    if h.l1_size < geometry.l1_size_for(h.size):
        raise FormatError("L1 table is too small", "header.l1_size")
    validate_table_offset(h.l1_table_offset, h.l1_size, 8, cluster_size, "header.l1_table_offset")

    ext_end = backing_offset if backing_offset else cluster_size
    extensions = _read_extensions(f, hlen, ext_end, h, file_size)
    img = ImageFile(path=path, f=f, header=h, extensions=extensions, geometry=geometry, file_size=file_size)
    for e in extensions:
        if e.type == hd.QCOW2_EXT_MAGIC_BACKING_FORMAT:
            img.backing_format = _decode_name(e.data, "extensions.backing_format")
        elif e.type == hd.QCOW2_EXT_MAGIC_DATA_FILE:
            img.data_file = _decode_name(e.data, "extensions.data_file")
        elif e.type == hd.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            img.feature_names = list(e.data.entries)

    if backing_offset:
        n = h.backing_file_size
        if n > min(lim.BACKING_FILE_NAME_MAX, cluster_size - backing_offset):
            raise FormatError("backing file name too long", "header.backing_file_size")
        img.backing_file = _decode_name(pread_exact(f, backing_offset, n, "backing_file"), "backing_file")
    if h.crypt_method == QCOW_CRYPT_LUKS and img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is None:
        raise FormatError("LUKS encryption without a full disk encryption header pointer", "extensions")
    return img


def _read_extensions(f: BinaryIO, start: int, end: int, h: c.Container, file_size: int) -> list[Extension]:
    """The extension list between the header and ``end`` (qcow2_read_extensions)."""
    out: list[Extension] = []
    offset = start
    seen: set[int] = set()
    while offset < end:
        where = f"extensions[{len(out)}]"
        fixed = pread_exact(f, offset, 8, where)
        etype, elen = int.from_bytes(fixed[:4], "big"), int.from_bytes(fixed[4:], "big")
        if offset + 8 > end or elen > end - offset - 8:
            raise FormatError("header extension too large", f"{where}.length")
        padded = elen + (-elen % 8)
        raw_bytes = pread_exact(f, offset, 8 + min(padded, end - offset - 8), where)
        raw_bytes += b"\0" * (8 + padded - len(raw_bytes))  # padding may run past ext_end
        raw = parse(hd.HeaderExtension, raw_bytes, where)
        ext = Extension(etype, elen, raw.data, raw)
        if etype == hd.QCOW2_EXT_MAGIC_END:
            out.append(ext)
            return out
        _validate_extension(ext, h, where)
        if etype in hd.EXTENSION_NAMES and etype in seen:
            raise FormatError(f"duplicate {ext.name} extension", where)
        seen.add(etype)
        out.append(ext)
        offset += 8 + padded
    return out


def _validate_extension(ext: Extension, h: c.Container, where: str) -> None:
    if ext.type == hd.QCOW2_EXT_MAGIC_BACKING_FORMAT and ext.length >= 16:
        raise FormatError("backing format name too long", f"{where}.length")
    if ext.type == hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        if h.crypt_method != QCOW_CRYPT_LUKS:
            raise FormatError("encryption header pointer without LUKS encryption", where)
        if ext.length != 16:
            raise FormatError("encryption header pointer has the wrong size", f"{where}.length")
    if ext.type == hd.QCOW2_EXT_MAGIC_BITMAPS:
        if ext.length != 24:
            raise FormatError("invalid bitmaps extension length", f"{where}.length")
        autoclear = h.v3.autoclear_features if h.v3 else 0
        if autoclear & ft.QCOW2_AUTOCLEAR_BITMAPS:
            d = ext.data
            if d.reserved32:
                raise FormatError("reserved field is not zero", f"{where}.data.reserved32")
            if d.nb_bitmaps == 0 or d.nb_bitmaps > lim.QCOW2_MAX_BITMAPS:
                raise FormatError("invalid number of bitmaps", f"{where}.data.nb_bitmaps")
            if d.bitmap_directory_offset % (1 << h.cluster_bits):
                raise FormatError("invalid bitmap directory offset", f"{where}.data.bitmap_directory_offset")
            if d.bitmap_directory_size > lim.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                raise FormatError("bitmap directory too large", f"{where}.data.bitmap_directory_size")

