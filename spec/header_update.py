"""The header cluster as qcow2_update_header (block/qcow2.c) writes it: rebuilt whole from what
QEMU keeps in memory, never patched.

QEMU reads the header, its extensions and the backing file name once at open
(qcow2_do_open, qcow2_read_extensions) and, whenever it rewrites the header (the corrupt
flag, a clean dirty bit, unknown autoclear bits cleared, the bitmaps' header syncs), writes
one whole cluster: the fixed header (v2: 72 bytes; v3: sizeof(QCowHeader), 112, then the
unknown header fields it kept), zeros, then its extensions in a fixed order: backing format,
external data file name, encryption header pointer, its own feature name table (v3, clusters
over 4 KiB), bitmaps (while it counts any), the unknown extensions it kept (its list takes
each at the head, so they come back in reverse file order), the end marker, and the backing
file name right after it. Whatever else the cluster held (a damaged padding byte, a damaged
feature name, an ignored duplicate extension, a bitmaps extension QEMU ignored because the
autoclear bit was clear) is gone: the rest of the cluster is zeros. Names are C strings, cut
at the first NUL, as QEMU copies them.

``HeaderMemory`` is that state, taken from the parsed image at open; ``header_cluster``
builds the cluster, or returns None where QEMU's rebuild does not fit one cluster (-ENOSPC:
nothing is written).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import construct as c

from spec import features as ft
from spec import header as hd
from spec.image import QCOW_CRYPT_LUKS, ImageFile

QCOW_HEADER_SIZE = 112
"""sizeof(QCowHeader) in QEMU 7.2: the v3 fields, compression_type and 7 bytes of padding."""

_KNOWN = frozenset((hd.QCOW2_EXT_MAGIC_END, hd.QCOW2_EXT_MAGIC_BACKING_FORMAT,
                    hd.QCOW2_EXT_MAGIC_FEATURE_TABLE, hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER,
                    hd.QCOW2_EXT_MAGIC_BITMAPS, hd.QCOW2_EXT_MAGIC_DATA_FILE))
"""The extension types qcow2_read_extensions knows; every other one is kept unread."""


def _c_bytes(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


@dataclass
class HeaderMemory:
    """What QEMU keeps of the header cluster besides the fixed fields (BDRVQcow2State). One
    object per open image, shared by its writers: the bitmap store changes ``bitmaps``."""

    unknown_fields: bytes
    """unknown_header_fields: v3 header bytes from 112 to header_length."""
    backing_format: bytes | None
    """image_backing_format (a C string; empty, not None, when the name starts with NUL)."""
    data_file: bytes | None
    """image_data_file."""
    crypto: bytes | None
    """The encryption header pointer's 16 bytes (crypto_header), when its offset is not 0."""
    unknown_exts: tuple[tuple[int, bytes], ...]
    """unknown_header_ext, in the list's order (the file's, reversed)."""
    backing_file: bytes | None
    """image_backing_file (a C string), None without a backing file offset."""
    bitmaps: tuple[int, int, int] | None
    """nb_bitmaps, bitmap_directory_size, bitmap_directory_offset; None while QEMU counts no
    bitmaps (no extension, or the autoclear bit clear when it was read)."""

    def set_bitmaps(self, nb: int, size: int, offset: int) -> None:
        """The bitmaps extension's values in memory (s->nb_bitmaps and the directory)."""
        self.bitmaps = (nb, size, offset) if nb else None


def memory_of(img: ImageFile) -> HeaderMemory:
    """The state qcow2_do_open keeps from a parsed image."""
    h = img.header
    unknown_fields = b""
    if h.v3 is not None and int(h.v3.header_length) > QCOW_HEADER_SIZE:
        unknown_fields = bytes(h.ext.header_tail)[QCOW_HEADER_SIZE - 105:]
    last: dict[int, bytes] = {}
    unknown: list[tuple[int, bytes]] = []
    for e in img.extensions:
        if e.type == hd.QCOW2_EXT_MAGIC_END:
            break
        raw = hd.HeaderExtension.build(e.raw)[8:8 + e.length]
        if e.type in _KNOWN:
            last[e.type] = raw
        else:
            unknown.insert(0, (e.type, raw))
    crypto = last.get(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    if crypto is not None and (int(h.crypt_method) != QCOW_CRYPT_LUKS
                               or not int.from_bytes(crypto[:8], "big")):
        crypto = None  # only read with LUKS; written back while its offset is not 0
    data_file = last.get(hd.QCOW2_EXT_MAGIC_DATA_FILE)
    has_data_file = h.v3 is not None and bool(int(h.v3.incompatible_features) & ft.QCOW2_INCOMPAT_DATA_FILE)
    if not has_data_file:
        data_file = None  # written only for an image with a data file (has_data_file)
    bitmaps = None
    ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if img.bitmaps_enabled and ext is not None:
        d = ext.data
        bitmaps = (int(d.nb_bitmaps), int(d.bitmap_directory_size), int(d.bitmap_directory_offset))
    fmt = last.get(hd.QCOW2_EXT_MAGIC_BACKING_FORMAT)
    return HeaderMemory(
        unknown_fields=unknown_fields,
        backing_format=None if fmt is None else _c_bytes(fmt),
        data_file=None if data_file is None else _c_bytes(data_file),
        crypto=crypto,
        unknown_exts=tuple(unknown),
        backing_file=None if img.backing_file_raw is None else _c_bytes(img.backing_file_raw),
        bitmaps=bitmaps)


def _ext(etype: int, data: bytes) -> bytes:
    return struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)


def header_cluster(mem: HeaderMemory, header: c.Container, cluster_size: int) -> bytes | None:
    """The cluster qcow2_update_header writes for ``header`` (the engine's fixed fields in
    memory), or None if it does not fit (QEMU: -ENOSPC, nothing written)."""
    h = c.Container(header)
    h.size = int(header.size) // 512 * 512  # bs->total_sectors * BDRV_SECTOR_SIZE
    h.backing_file_offset = 0
    h.backing_file_size = 0
    if header.v3 is not None:
        h.v3 = c.Container(header.v3)
        h.v3.header_length = QCOW_HEADER_SIZE + len(mem.unknown_fields)
        compression = int(header.ext.compression_type) if header.ext is not None else 0
        h.ext = c.Container(compression_type=compression, header_tail=bytes(7) + mem.unknown_fields)
    body = b""
    if mem.backing_format is not None:
        body += _ext(hd.QCOW2_EXT_MAGIC_BACKING_FORMAT, mem.backing_format)
    if mem.data_file is not None:
        body += _ext(hd.QCOW2_EXT_MAGIC_DATA_FILE, mem.data_file)
    if mem.crypto is not None:
        body += _ext(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER, mem.crypto)
    if header.v3 is not None and cluster_size > 4096:
        names = b"".join(bytes([int(f.type), f.bit]) + f.name.encode().ljust(46, b"\0") for f in ft.FEATURES)
        body += _ext(hd.QCOW2_EXT_MAGIC_FEATURE_TABLE, names)
    if mem.bitmaps is not None:
        nb, size, offset = mem.bitmaps
        body += _ext(hd.QCOW2_EXT_MAGIC_BITMAPS, struct.pack(">IIQQ", nb, 0, size, offset))
    for etype, data in mem.unknown_exts:
        body += _ext(etype, data)
    body += bytes(8)
    fixed_len = len(hd.Header.build(h))
    if mem.backing_file is not None:
        h.backing_file_offset = fixed_len + len(body)
        h.backing_file_size = len(mem.backing_file)
        body += mem.backing_file
    out = hd.Header.build(h) + body
    if len(out) > cluster_size:
        return None
    return out + bytes(cluster_size - len(out))
