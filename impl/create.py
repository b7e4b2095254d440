"""Creating an image as ``qemu-img create -f qcow2`` lays it out (block/qcow2.c
qcow2_co_create; qcow2_update_header for the extensions; qcow2_grow_l1_table for the L1).

Cluster 0 holds the header, its extensions (backing format, data file name, and the feature
name table on v3 images with clusters over 4 KiB) and the backing file name; cluster 1 the
refcount table; cluster 2 the refcount block counting clusters 0-2; then the L1 table,
placed by the impl's own allocator as QEMU's allocator places it, and ending the file.
``preallocation=metadata`` then links every cluster without writing data (preallocate_co).
Encryption is set up last (qcow2_set_up_encryption): a LUKS area is allocated after all of
that, the header gets crypt_method and, for LUKS, the crypto header extension.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import construct as c

from impl import cluster as cl
from impl import refcount as rc
from impl.cache import Qcow2Cache
from impl.hostfile import HostFile
from impl.state import State
from spec import encryption as enc
from spec import features as ft
from spec import header as hd
from spec import limits as lim
from spec.errors import RequestError
from spec.geometry import Geometry, align_up

BDRV_SECTOR_SIZE = 512


def create(path: str | os.PathLike[str], size: int, *, version: int = 3, cluster_size: int = 65536,
           refcount_bits: int = 16, extended_l2: bool = False, compression_type: str = "zlib",
           lazy_refcounts: bool = False, backing_file: str | None = None,
           backing_fmt: str | None = None, data_file: str | None = None,
           data_file_raw: bool = False, preallocation: str = "off",
           encrypt_format: str | None = None, encrypt_key_secret: bytes | str | None = None,
           encrypt_cipher_alg: str | None = None, encrypt_cipher_mode: str | None = None,
           encrypt_ivgen_alg: str | None = None, encrypt_ivgen_hash_alg: str | None = None,
           encrypt_hash_alg: str | None = None, encrypt_iter_time: int | None = None) -> None:
    """Create a qcow2 image (the options of ``qemu-img create -o``); RequestError for what
    qcow2_co_create refuses. ``preallocation=falloc|full`` give valid images but not
    QEMU's layout (as in the model).

    ``encrypt_*`` are ``-o encrypt.*`` with the model's meaning (``encrypt_key_secret`` is
    the secret's data): ``encrypt_format`` "luks" (spec.encryption.build_luks_area) or "aes"
    (legacy, crypt_method 1). Checked by spec.encryption.create_options: RequestError for
    what qemu-img refuses, UnsupportedFeature for an algorithm the cryptography package
    lacks."""
    path = str(path)
    _check(size, version, cluster_size, refcount_bits, extended_l2, compression_type,
           lazy_refcounts, backing_file, backing_fmt, data_file, data_file_raw, preallocation)
    luks = enc.create_options(encrypt_format, encrypt_key_secret, {
        "cipher_alg": encrypt_cipher_alg, "cipher_mode": encrypt_cipher_mode,
        "ivgen_alg": encrypt_ivgen_alg, "ivgen_hash_alg": encrypt_ivgen_hash_alg,
        "hash_alg": encrypt_hash_alg, "iter_time": encrypt_iter_time})
    size = align_up(size, BDRV_SECTOR_SIZE)
    if data_file_raw:
        # qcow2_co_create: a raw data file must read as the disk, so its metadata is
        # preallocated.
        preallocation = "metadata"
    g = Geometry(cluster_size.bit_length() - 1, extended_l2, refcount_bits.bit_length() - 1)
    ctype = ft.CompressionType.ZSTD if compression_type == "zstd" else ft.CompressionType.ZLIB
    header = c.Container(
        magic=lim.QCOW_MAGIC, version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=g.cluster_bits, size=size, crypt_method=0, l1_size=0, l1_table_offset=0,
        refcount_table_offset=cluster_size, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0, v3=None, ext=None)
    if version >= 3:
        incompat = ((ft.QCOW2_INCOMPAT_DATA_FILE if data_file else 0)
                    | (ft.QCOW2_INCOMPAT_COMPRESSION if ctype is not ft.CompressionType.ZLIB else 0)
                    | (ft.QCOW2_INCOMPAT_EXTL2 if extended_l2 else 0))
        # sizeof(QCowHeader) is 105 with compression_type; QEMU pads it to 112.
        header.v3 = c.Container(
            incompatible_features=incompat,
            compatible_features=ft.QCOW2_COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
            autoclear_features=ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0,
            refcount_order=g.refcount_order, header_length=112)
        header.ext = c.Container(compression_type=int(ctype), header_tail=bytes(7))
    fmt = backing_fmt if backing_file else None
    if luks is not None:
        # The final header, with the crypto header extension, must fit too.
        _header_cluster(header, version, cluster_size, backing_file, fmt, data_file, (0, 0))
    first = _header_cluster(header, version, cluster_size, backing_file, fmt, data_file)
    refblock = bytearray(cluster_size)
    decode, encode = rc.block_codec(g.refcount_order)
    counts = decode(bytes(refblock))  # type: ignore[operator]
    counts[:min(3, g.refcount_block_entries)] = 1
    try:
        with open(path, "wb") as f:
            f.write(first)
            f.write(struct.pack(">Q", 2 * cluster_size).ljust(cluster_size, b"\0"))
            f.write(encode(counts))  # type: ignore[operator]
        if data_file:
            with open(data_file, "wb") as f:  # relative to the cwd, as qemu-img create does
                f.truncate(size)
    except OSError as e:
        raise RequestError(f"cannot create {e.filename}: {e.strerror}") from None
    l1_size = g.l1_size_for(size)
    if l1_size or preallocation != "off":
        _grow_l1(path, header, g, ctype, l1_size)
    if preallocation != "off":
        _preallocate(path, size, full=preallocation == "full")
    if encrypt_format is not None:
        area = _set_up_luks(path, g, ctype, luks, encrypt_key_secret) if luks is not None else None
        with open(path, "r+b") as f:
            enc.mark_encrypted(header, f.read(cluster_size), area)
            f.seek(0)
            f.write(_header_cluster(header, version, cluster_size, backing_file, fmt, data_file, area))


@contextmanager
def _bare_state(path: str, header: c.Container, g: Geometry, ctype: ft.CompressionType) -> Iterator[State]:
    """The image as the allocator needs it while create works on it: the refcount table
    ``header`` points at, small caches, no backing chain (an encrypted one has no key
    here) and no overlap checks; the refcount cache is flushed at the end."""
    decode, encode = rc.block_codec(g.refcount_order)
    host = HostFile(path, readonly=False)
    try:
        s = State(host, header, g, data=None, compression_type=ctype)
        s.sync = False
        s.l2_cache = Qcow2Cache(host, g.cluster_size, 16, cl.decode_l2, cl.encode_l2, name="l2")
        s.rc_cache = Qcow2Cache(host, g.cluster_size, 4, decode, encode, name="refcount")  # type: ignore[arg-type]
        n = int(header.refcount_table_clusters) * g.cluster_size // 8
        s.reftable = list(struct.unpack(f">{n}Q", host.pread(int(header.refcount_table_offset), 8 * n)))
        yield s
        s.rc_cache.flush()
    finally:
        host.close()


def _grow_l1(path: str, header: c.Container, g: Geometry, ctype: ft.CompressionType,
             l1_size: int) -> None:
    """qcow2_grow_l1_table from nothing: allocate, write the zeroed table, point the header
    at it."""
    with _bare_state(path, header, g, ctype) as s:
        if l1_size:
            off = rc.alloc_clusters(s, g.size_to_clusters(l1_size * 8))
            s.rc_cache.flush()
            s.host.pwrite(off, bytes(l1_size * 8), meta=True)
            header.l1_size = l1_size
            header.l1_table_offset = off
            s.l1_table = [0] * l1_size
            s.write_header()


def _set_up_luks(path: str, g: Geometry, ctype: ft.CompressionType, luks: enc.LuksCreateOptions,
                 key: bytes | str | None) -> tuple[int, int]:
    """qcow2_set_up_encryption for LUKS: the area (header and slot 0's key material,
    zero-padded to whole clusters) in clusters allocated after everything so far
    (qcow2_crypto_hdr_init_func, _write_func). Returns the extension's (offset, length)."""
    area, _master = enc.build_luks_area(key, luks)
    with open(path, "rb") as f:
        now = hd.Header.parse(f.read(g.cluster_size))
    with _bare_state(path, now, g, ctype) as s:
        n = g.size_to_clusters(len(area))
        off = rc.alloc_clusters(s, n)
        s.rc_cache.flush()
        s.host.pwrite(off, area + bytes(n * g.cluster_size - len(area)), meta=True)
    return off, len(area)


def _preallocate(path: str, size: int, *, full: bool) -> None:
    """preallocate_co: link every cluster without data, then end the host file (or data
    file) at the last allocated subcluster. ``falloc`` and ``full`` give the same layout
    here (QEMU puts their data area after a fresh refcount area: not reproduced), ``full``
    writing the zeros; the guest sees the same either way."""
    from impl.image import open as open_image

    with open_image(path, cache="unsafe") as img:
        s = img.s
        img.last_host_end = 0
        pos = 0
        while pos < size:
            pos = cl.write_run(img, pos, size, memoryview(b""), pos, [], prealloc=True)
        s.l2_cache.write()
        s.rc_cache.write()
        target = s.data_host()
        end = img.last_host_end
        at = target.size()
        if end > at and not full:
            target.truncate(end)
        for chunk in range(at, end, 1 << 20):
            target.pwrite(chunk, bytes(min(1 << 20, end - chunk)))


def _header_cluster(header: c.Container, version: int, cluster_size: int, backing_file: str | None,
                    backing_fmt: str | None, data_file: str | None,
                    crypto: tuple[int, int] | None = None) -> bytes:
    """Cluster 0 in qcow2_update_header's order: header, extensions (``crypto`` is the
    LUKS area's offset and length), end marker, backing file name."""
    exts: list[tuple[int, bytes]] = []
    if backing_fmt:
        exts.append((hd.QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_fmt.encode()))
    if data_file:
        exts.append((hd.QCOW2_EXT_MAGIC_DATA_FILE, data_file.encode()))
    if crypto is not None:
        exts.append((hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER,
                     hd.CryptoHeaderPointer.build({"offset": crypto[0], "length": crypto[1]})))
    if version >= 3 and cluster_size > 4096:
        # Not for clusters of 4 KiB or less: the room is kept for the backing file name.
        names = b"".join(bytes([int(f.type), f.bit]) + f.name.encode().ljust(46, b"\0")
                         for f in ft.FEATURES)
        exts.append((hd.QCOW2_EXT_MAGIC_FEATURE_TABLE, names))
    body = b"".join(struct.pack(">II", t, len(d)) + d + bytes(-len(d) % 8) for t, d in exts)
    body += bytes(8)
    fixed_len = len(hd.Header.build(header))
    if backing_file:
        name = backing_file.encode()
        header.backing_file_offset = fixed_len + len(body)
        header.backing_file_size = len(name)
        body += name
    out = hd.Header.build(header) + body
    if len(out) > cluster_size:
        raise RequestError("header, extensions and backing file name do not fit in one cluster")
    return out.ljust(cluster_size, b"\0")


def _check(size: int, version: int, cluster_size: int, refcount_bits: int, extended_l2: bool,
           compression_type: str, lazy_refcounts: bool, backing_file: str | None,
           backing_fmt: str | None, data_file: str | None, data_file_raw: bool,
           preallocation: str) -> None:
    """qcow2_co_create's refusals."""
    rules: list[tuple[bool, str]] = [
        (not isinstance(size, int) or size < 0, "image size must be a non-negative integer"),
        (version not in (2, 3), f"invalid compat level {version}"),
        (not isinstance(cluster_size, int) or cluster_size & (cluster_size - 1) != 0
         or not 1 << lim.MIN_CLUSTER_BITS <= cluster_size <= 1 << lim.MAX_CLUSTER_BITS,
         "cluster size must be a power of two between 512 and 2M"),
        (extended_l2 and version < 3, "extended L2 entries need compat=1.1"),
        (extended_l2 and cluster_size < 1 << lim.MIN_CLUSTER_BITS_EXTENDED_L2,
         "extended L2 entries need clusters of at least 16 KiB"),
        (not isinstance(refcount_bits, int) or not 1 <= refcount_bits <= 64
         or refcount_bits & (refcount_bits - 1) != 0,
         "refcount width must be a power of two and may not exceed 64 bits"),
        (version < 3 and refcount_bits != 16, "refcount widths other than 16 need compat=1.1"),
        (version < 3 and lazy_refcounts, "lazy refcounts need compat=1.1"),
        (compression_type not in ("zlib", "zstd"), f"unknown compression type {compression_type}"),
        (compression_type != "zlib" and version < 3, "zstd compression needs compat=1.1"),
        (bool(backing_fmt) and not backing_file, "backing format needs a backing file"),
        (bool(backing_file) and len((backing_file or "").encode()) > lim.BACKING_FILE_NAME_MAX,
         "backing file name too long"),
        (bool(data_file) and version < 3, "external data files need compat=1.1"),
        (data_file_raw and not data_file, "data-file-raw requires data-file"),
        (data_file_raw and bool(backing_file), "backing file and data-file-raw cannot be used together"),
        (preallocation not in ("off", "metadata", "falloc", "full"),
         f"invalid preallocation mode {preallocation}"),
        (bool(backing_file) and preallocation != "off" and not extended_l2,
         "backing file and preallocation need extended_l2"),
    ]
    for bad, why in rules:
        if bad:
            raise RequestError(why)
