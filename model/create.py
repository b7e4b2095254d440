"""Creating an image as ``qemu-img create -f qcow2`` lays it out (block/qcow2.c,
qcow2_co_create and qcow2_co_create_opts; qcow2_update_header for the extensions).

Layout of a new image, cluster by cluster:

====  =================================================================================
0     header; extensions: backing format, external data file name, feature name table
      (v3 with clusters over 4 KiB only), end; then the backing file name
      (qcow2_update_header's order)
1     refcount table, one cluster, entry 0 -> cluster 2
2     refcount block: clusters 0..3 have refcount 1
3     L1 table, just large enough for the virtual size (qcow2_grow_l1_table through
      qcow2_co_truncate); the file ends right after its l1_size entries
====  =================================================================================

The L1 table is allocated through the model's allocator, as QEMU allocates it through its
own, so large tables and small refcount blocks come out where QEMU puts them.

Errors: RequestError for options QEMU rejects (the error texts say which rule);
UnsupportedFeature for a preallocation mode the model does not lay out like QEMU.
"""

from __future__ import annotations

import os
import struct

import construct as c

from model import mapping as mp
from model import write as wr
from model.image import open as open_model
from spec import encryption as enc
from spec import features as ft
from spec import header as hd
from spec import limits as lim
from spec import refblocks as rb
from spec.errors import RequestError
from spec.geometry import Geometry, align_up
from spec.image import ImageFile
from spec.qfile import Qcow2File

BDRV_SECTOR_SIZE = 512
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def create(path: str | os.PathLike[str], size: int, *, version: int = 3, cluster_size: int = 65536,
           refcount_bits: int = 16, extended_l2: bool = False, compression_type: str = "zlib",
           lazy_refcounts: bool = False, backing_file: str | None = None,
           backing_fmt: str | None = None, data_file: str | None = None,
           data_file_raw: bool = False, preallocation: str = "off",
           encrypt_format: str | None = None, encrypt_key_secret: bytes | str | None = None,
           encrypt_cipher_alg: str | None = None, encrypt_cipher_mode: str | None = None,
           encrypt_ivgen_alg: str | None = None, encrypt_ivgen_hash_alg: str | None = None,
           encrypt_hash_alg: str | None = None, encrypt_iter_time: int | None = None) -> None:
    """Create a qcow2 image at ``path`` (overwriting it) with the options of
    ``qemu-img create -f qcow2 -o ...``. ``size`` is rounded up to whole sectors, as
    qemu-img does.

    ``data_file`` names the external data file; like qemu-img, a relative name is relative
    to the current directory (also when the image is opened later). It is created, or
    truncated to ``size``. ``data_file_raw`` implies metadata preallocation
    (qcow2_co_create: the data file must read as the guest disk).

    ``encrypt_*`` are ``-o encrypt.*`` (``encrypt_key_secret`` is the secret's data, where
    qemu-img takes the id of a ``--object secret``): ``encrypt_format`` "luks" writes a LUKS1
    header with one key slot (spec.encryption.build_luks_area; the rest take QEMU's
    defaults: aes-256, xts, plain64, sha256, iter_time 2000 ms, turned into PBKDF2 iterations
    by spec.encryption.PBKDF2_ITERS_PER_SECOND instead of QEMU's benchmark); "aes" makes a
    legacy AES-CBC image (crypt_method 1), which qemu-img 7.2 still creates.

    Raises:
        RequestError: an option or combination QEMU refuses (qcow2_co_create,
            qcrypto_block_luks_create).
        UnsupportedFeature: a cipher or hash QEMU accepts and the cryptography package lacks.
    """
    path = str(path)
    _validate(size, version, cluster_size, refcount_bits, extended_l2, compression_type,
              lazy_refcounts, backing_file, backing_fmt, data_file, data_file_raw, preallocation)
    luks = enc.create_options(encrypt_format, encrypt_key_secret, {
        "cipher_alg": encrypt_cipher_alg, "cipher_mode": encrypt_cipher_mode,
        "ivgen_alg": encrypt_ivgen_alg, "ivgen_hash_alg": encrypt_ivgen_hash_alg,
        "hash_alg": encrypt_hash_alg, "iter_time": encrypt_iter_time})
    size = align_up(size, BDRV_SECTOR_SIZE)
    if data_file_raw and preallocation == "off":
        preallocation = "metadata"
    cluster_bits = cluster_size.bit_length() - 1
    refcount_order = refcount_bits.bit_length() - 1
    geometry = Geometry(cluster_bits, extended_l2, refcount_order)
    ctype = ft.CompressionType.ZSTD if compression_type == "zstd" else ft.CompressionType.ZLIB

    incompat = 0
    if data_file:
        incompat |= ft.QCOW2_INCOMPAT_DATA_FILE
    if ctype is not ft.CompressionType.ZLIB:
        incompat |= ft.QCOW2_INCOMPAT_COMPRESSION
    if extended_l2:
        incompat |= ft.QCOW2_INCOMPAT_EXTL2
    header = c.Container(
        magic=lim.QCOW_MAGIC, version=version, backing_file_offset=0, backing_file_size=0,
        cluster_bits=cluster_bits, size=size, crypt_method=0, l1_size=0, l1_table_offset=0,
        refcount_table_offset=cluster_size, refcount_table_clusters=1, nb_snapshots=0,
        snapshots_offset=0, v3=None, ext=None,
    )
    if version >= 3:
        # sizeof(QCowHeader) is 105 bytes with compression_type; QEMU rounds it up to 112.
        header.v3 = c.Container(
            incompatible_features=incompat,
            compatible_features=ft.QCOW2_COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
            autoclear_features=ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW if data_file_raw else 0,
            refcount_order=refcount_order, header_length=112)
        header.ext = c.Container(compression_type=int(ctype), header_tail=bytes(7))

    def header_cluster(crypto: tuple[int, int] | None) -> bytes:
        cluster0 = bytearray(hd.Header.build(header))
        exts = _extensions(version, cluster_size, backing_fmt if backing_file else None, data_file, crypto)
        for etype, data in exts:
            # qcow2.rst "Header extensions": type, length, data, padding to 8 bytes.
            cluster0 += etype.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data + bytes(-len(data) % 8)
        cluster0 += bytes(8)  # end of the extension list
        if backing_file:
            name = backing_file.encode()
            header.backing_file_offset = len(cluster0)
            header.backing_file_size = len(name)
            cluster0 += name
            cluster0[:len(hd.Header.build(header))] = hd.Header.build(header)
        if len(cluster0) > cluster_size:
            raise RequestError("header, extensions and backing file name do not fit in one cluster")
        return bytes(cluster0) + bytes(cluster_size - len(cluster0))

    # The header is written plain first; encryption is set up last (see _set_up_encryption).
    cluster0 = header_cluster(None)
    if luks is not None:
        # Check now that the final header (with the crypto header extension) fits.
        header_cluster((0, 0))

    # spec.tables.refcount_table / refcount_block, packed without construct (its per-entry
    # build took ~0.9 s per image; tests/model/test_tables.py): one refcount block at
    # cluster 2, counting the header, the table and itself.
    reftable = struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8)
    refblock = bytearray(cluster_size)
    for i in range(min(3, geometry.refcount_block_entries)):
        rb.refcount_set(refblock, i, geometry.refcount_bits, 1)
    try:
        with open(path, "wb") as f:
            f.write(cluster0)
            f.write(reftable)
            f.write(refblock)
    except OSError as e:
        raise RequestError(f"cannot create {path}: {e.strerror}") from None
    if data_file:
        dpath = data_file  # relative to the current directory, as qemu-img create does
        try:
            with open(dpath, "wb") as f:
                f.truncate(size)
        except OSError as e:
            raise RequestError(f"cannot create data file {dpath}: {e.strerror}") from None
    _grow_l1(path, header, geometry, size)
    if preallocation != "off":
        _preallocate(path, size, preallocation)
    if encrypt_format is not None:
        area = _set_up_encryption(path, geometry, luks, encrypt_key_secret)
        with open(path, "r+b") as hf:
            enc.mark_encrypted(header, hf.read(cluster_size), area)
            hf.seek(0)
            hf.write(header_cluster(area))


def _set_up_encryption(path: str, geometry: Geometry, luks: enc.LuksCreateOptions | None,
                       key: bytes | str | None) -> tuple[int, int] | None:
    """qcow2_set_up_encryption: for LUKS, allocate the LUKS area after everything create has
    allocated so far (the L1 table, preallocated metadata), zero its clusters and write the
    header and key material into it (qcow2_crypto_hdr_init_func, _write_func). Returns the
    header extension's (offset, length); None for legacy AES, which has no on-disk part."""
    if luks is None:
        return None
    area, _master = enc.build_luks_area(key, luks)
    with open(path, "r+b") as f:
        head = f.read(lim.V3_MIN_HEADER_LENGTH + 8)
        header = hd.Header.parse(head)
        img = ImageFile(path=path, f=f, header=header, extensions=[], geometry=geometry)
        q = Qcow2File(img, f, readonly=False)
        nclusters = geometry.size_to_clusters(len(area))
        off = rb.alloc_clusters(q, nclusters)
        q.pwrite(off, area + bytes(nclusters * geometry.cluster_size - len(area)))
    return off, len(area)


def _extensions(version: int, cluster_size: int, backing_fmt: str | None,
                data_file: str | None, crypto: tuple[int, int] | None = None) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    if backing_fmt:
        out.append((hd.QCOW2_EXT_MAGIC_BACKING_FORMAT, backing_fmt.encode()))
    if data_file:
        out.append((hd.QCOW2_EXT_MAGIC_DATA_FILE, data_file.encode()))
    if crypto is not None:
        # qcow2_update_header: the full disk encryption header pointer comes after these.
        out.append((hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER, hd.CryptoHeaderPointer.build(
            {"offset": crypto[0], "length": crypto[1]})))
    if version >= 3 and cluster_size > 4096:
        # qcow2_update_header omits the feature name table for clusters of 4 KiB and less,
        # to leave room for a backing file name in the header cluster.
        table = b"".join(
            bytes([int(f.type), f.bit]) + f.name.encode().ljust(46, b"\0") for f in ft.FEATURES)
        out.append((hd.QCOW2_EXT_MAGIC_FEATURE_TABLE, table))
    return out


def _grow_l1(path: str, header: c.Container, geometry: Geometry, size: int) -> None:
    """qcow2_grow_l1_table from l1_size 0: allocate the table, write it, point the header.

    The file does not pass open-time validation yet (its L1 is too small for its size), so
    it is wrapped directly rather than through spec.image.open_image."""
    n = geometry.l1_size_for(size)
    if n == 0:
        return
    with open(path, "r+b") as f:
        img = ImageFile(path=path, f=f, header=header, extensions=[], geometry=geometry)
        q = Qcow2File(img, f, readonly=False)
        off = rb.alloc_clusters(q, geometry.size_to_clusters(n * 8))
        mp.write_l1(q, [0] * n, off)
        q.header.l1_size = n
        q.header.l1_table_offset = off
        q.write_header()


def _preallocate(path: str, size: int, mode: str) -> None:
    """preallocate_co: allocate and link every cluster without writing data, then extend the
    file to the last allocated byte. ``falloc`` and ``full`` are laid out the same way here
    (QEMU places their data area behind a fresh refcount area instead); ``full`` also writes
    the zeros."""
    with open_model(path) as img:
        wr.preallocate(img.state, 0, size, full=mode == "full")


def _validate(size: int, version: int, cluster_size: int, refcount_bits: int, extended_l2: bool,
              compression_type: str, lazy_refcounts: bool, backing_file: str | None,
              backing_fmt: str | None, data_file: str | None, data_file_raw: bool,
              preallocation: str) -> None:
    """The checks of qcow2_co_create, in the same spirit and order."""
    if not isinstance(size, int) or size < 0:
        raise RequestError("image size must be a non-negative integer")
    if version not in (2, 3):
        raise RequestError(f"invalid compat level {version}")
    if (cluster_size & (cluster_size - 1)) or not (
            1 << lim.MIN_CLUSTER_BITS <= cluster_size <= 1 << lim.MAX_CLUSTER_BITS):
        raise RequestError("cluster size must be a power of two between 512 and 2M")
    if extended_l2:
        if version < 3:
            raise RequestError("extended L2 entries are only supported with compat=1.1 and above")
        if cluster_size < 1 << lim.MIN_CLUSTER_BITS_EXTENDED_L2:
            raise RequestError("extended L2 entries are only supported with cluster sizes of at least 16 KiB")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise RequestError("refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise RequestError("different refcount widths than 16 bits require compatibility level 1.1 or above")
    if version < 3 and lazy_refcounts:
        raise RequestError("lazy refcounts only supported with compatibility level 1.1 and above")
    if compression_type not in ("zlib", "zstd"):
        raise RequestError(f"unknown compression type {compression_type}")
    if compression_type != "zlib" and version < 3:
        raise RequestError("non-zlib compression type is only supported with compatibility level 1.1 "
                           "and above")
    if backing_fmt and not backing_file:
        raise RequestError("backing format cannot be used without backing file")
    if backing_file and len(backing_file.encode()) > lim.BACKING_FILE_NAME_MAX:
        raise RequestError("backing file name too long")
    if data_file and version < 3:
        raise RequestError("external data files are only supported with compatibility level 1.1 and above")
    if data_file_raw and not data_file:
        raise RequestError("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        raise RequestError("backing file and data-file-raw cannot be used together")
    if preallocation not in PREALLOCATION_MODES:
        raise RequestError(f"invalid preallocation mode {preallocation}")
    if backing_file and preallocation != "off" and not extended_l2:
        raise RequestError("backing file and preallocation can only be used at the same time "
                           "if extended_l2 is on")
