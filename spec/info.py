"""What ``qemu-img info`` reports about an image, computed from the image read through the schemas.

QEMU builds an ImageInfo (qapi/block-core.json) in block/qapi.c (bdrv_query_image_info) from
the driver's answers: block/qcow2.c (qcow2_co_get_info for the dirty flag and cluster size,
qcow2_get_specific_info for the "format-specific" data), block/qcow2-snapshot.c through
bdrv_query_snapshot_info_list, block/qcow2-bitmap.c (qcow2_get_bitmap_info_list) and
crypto/block-luks.c (qcrypto_block_luks_get_info, see spec/luks.py). The functions here compute
the same dict, with the same keys in the same order, from a spec.image.ImageFile and the host
file's allocated size, so that model/ and impl/ can answer ``Image.info()`` with it and the
``qcow2lab info`` command can print it.

Key order. QEMU turns the QAPI struct into a QDict and prints the QDict by walking its hash
table (qobject/qdict.c): 512 buckets chosen by a hash of the key, visited in bucket order, and
inside a bucket the most recently inserted key first. ``qdict()`` reproduces that walk, so a
Python dict built with it iterates, and serializes, in the order qemu-img prints.

Strings. QEMU handles names as C strings: a NUL ends them, and bytes that are not UTF-8 pass
through untouched to the human output (the JSON writer replaces them). Names read from the image
are therefore decoded here with "surrogateescape", which keeps every byte recoverable; the
renderers in difftest/cli/info.py re-encode them the way QEMU prints them.

Only spec.errors classes escape: an image QEMU would refuse to open for ``info`` raises
FormatError or UnsupportedFeature.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from spec import bitmaps as bmp
from spec import features as ft
from spec import header as hd
from spec.image import QCOW_CRYPT_AES, QCOW_CRYPT_LUKS, ImageFile
from spec.luks import luks_info, read_luks_header

Info = dict[str, Any]

BDRV_SECTOR_SIZE = 512
QDICT_BUCKET_MAX = 512
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


# --- QDict iteration order (qobject/qdict.c) -----------------------------------------------------

def qdict_bucket(key: str) -> int:
    """The bucket QEMU's QDict puts ``key`` in: tdb_hash(key) % 512, in 32-bit arithmetic.

    The hash (gdbm's, via tdb) starts from 0x238F13AF times the key length and adds each byte
    shifted left by (5 * i) % 24 bits; the result goes through 1103515243 * h + 12345.
    """
    data = key.encode("utf-8", "surrogateescape")
    h = (0x238F13AF * len(data)) & U32
    for i, byte in enumerate(data):
        h = (h + (byte << (i * 5 % 24))) & U32
    return ((1103515243 * h + 12345) & U32) % QDICT_BUCKET_MAX


def qdict(members: Iterable[tuple[str, Any]]) -> Info:
    """A dict whose iteration order is the order QEMU prints a QDict built from ``members``.

    ``members`` come in QAPI visit order (the struct's member order in the schema, which is
    the insertion order); a member whose value is None is an absent optional member and is
    left out. QEMU inserts each key at the head of its bucket's list and walks the buckets
    upwards, so later keys of one bucket come first.
    """
    present = [(k, v) for k, v in members if v is not None]
    order = sorted(range(len(present)), key=lambda i: (qdict_bucket(present[i][0]), -i))
    return {present[i][0]: present[i][1] for i in order}


# --- C semantics the output depends on ----------------------------------------------------------

def c_string(data: bytes, limit: int | None = None) -> str:
    """A C string from raw bytes: cut at the first NUL, then at ``limit`` bytes (pstrcpy into a
    buffer of limit + 1). Bytes that are not UTF-8 survive as surrogate escapes."""
    data = data.split(b"\0", 1)[0]
    if limit is not None:
        data = data[:limit]
    return data.decode("utf-8", "surrogateescape")


def int64(value: int) -> int:
    """A 64-bit value as QAPI's signed ``int`` sees it (QEMU stores uint64 into int64)."""
    value &= U64
    return value - (1 << 64) if value >> 63 else value


# --- Paths (util/cutils.c and block.c) -----------------------------------------------------------

def path_is_absolute(path: str) -> bool:
    """POSIX: a path is absolute when it starts with '/' (util/cutils.c, path_is_absolute)."""
    return path.startswith("/")


def path_has_protocol(path: str) -> bool:
    """"proto:rest": a ':' before any '/' means a protocol prefix (block.c, path_has_protocol)."""
    for ch in path:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False


def path_combine(base: str, filename: str) -> str:
    """util/cutils.c path_combine: ``filename`` relative to the directory part of ``base``.

    The directory part is everything up to and including the last '/', and never reaches back
    into a "proto:" prefix.
    """
    if path_is_absolute(filename):
        return filename
    start = base.index(":") + 1 if path_has_protocol(base) else 0
    slash = base.rfind("/")
    cut = max(start, slash + 1)
    return base[:cut] + filename


def full_backing_filename(image_filename: str, backing: str) -> str:
    """Where QEMU looks for a backing file (block.c, bdrv_make_absolute_filename).

    A backing name with a protocol prefix or an absolute path is taken as is; otherwise it is
    relative to the directory of the image's file name as the user gave it (bdrv_dirname on the
    protocol node), not to the current directory. The result is not normalised: "sub/x.qcow2"
    with backing "../b.qcow2" gives "sub/../b.qcow2", exactly as qemu-img prints it.
    """
    if path_has_protocol(backing) or path_is_absolute(backing):
        return backing
    return path_combine(image_filename, "") + backing


# --- Host file ------------------------------------------------------------------------------------

def allocated_size(st: os.stat_result) -> int:
    """Host bytes allocated to a file: st_blocks * 512 (block/file-posix.c,
    raw_get_allocated_file_size)."""
    return int(st.st_blocks) * 512


def virtual_size(size: int) -> int:
    """qcow2 keeps the size in whole sectors (qcow2_do_open: total_sectors = size / 512), so a
    header size that is not a multiple of 512 is reported rounded down."""
    return size // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE


def raw_info(filename: str, file_size: int, actual_size: int | None) -> Info:
    """ImageInfo of a raw image (the raw format driver over a file).

    The raw driver rounds the file length up to whole sectors (block.c,
    bdrv_refresh_total_sectors), reports no cluster size, a clean dirty flag, and no
    format-specific data in QEMU 7.2.
    """
    return qdict([
        ("filename", filename),
        ("format", "raw"),
        ("dirty-flag", False),
        ("actual-size", actual_size),
        ("virtual-size", -(-file_size // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE),
    ])


# --- qcow2 -----------------------------------------------------------------------------------------

def qcow2_info(img: ImageFile, filename: str, actual_size: int | None) -> Info:
    """ImageInfo of an opened qcow2 image, as qemu-img info (BDRV_O_NO_IO) reports it.

    ``filename`` is the name the image was opened by (QEMU prints it unchanged and resolves a
    relative backing file against it); ``actual_size`` is the host allocation of the image file
    (``allocated_size``), or None to leave "actual-size" out as QEMU does when it cannot tell.
    With BDRV_O_NO_IO QEMU 7.2 does not open an external data file, so its size is not counted.
    """
    h = img.header
    vsize = virtual_size(img.size)
    backing = _c_str(img.backing_file)
    full = fmt = None
    if backing:
        full = full_backing_filename(filename, backing)
        fmt = _c_str(img.backing_format) or None
    return qdict([
        ("filename", filename),
        ("format", "qcow2"),
        ("dirty-flag", bool(img.incompatible_features & ft.QCOW2_INCOMPAT_DIRTY)),
        ("actual-size", actual_size),
        ("virtual-size", vsize),
        ("cluster-size", img.cluster_size),
        # bs->encrypted is set for any crypt_method (qcow2_do_open).
        ("encrypted", True if h.crypt_method else None),
        ("backing-filename", backing or None),
        ("full-backing-filename", full),
        ("backing-filename-format", fmt),
        ("snapshots", snapshot_list(img)),
        ("format-specific", qdict([("type", "qcow2"), ("data", qcow2_specific(img, vsize))])),
    ])


def image_file_info(img: ImageFile) -> Info:
    """``qcow2_info`` for an image opened by ``spec.image.open_image``: the name it was opened
    by and the allocation of its file. What model/ and impl/ return from ``Image.info()``."""
    try:
        actual: int | None = allocated_size(os.fstat(img.f.fileno()))
    except (OSError, ValueError):
        actual = None  # QEMU leaves actual-size out when it cannot tell
    return qcow2_info(img, img.path, actual)


def _c_str(value: str | None) -> str:
    return "" if value is None else value.split("\0", 1)[0]


def qcow2_specific(img: ImageFile, vsize: int) -> Info:
    """ImageInfoSpecificQCow2 (block/qcow2.c, qcow2_get_specific_info).

    Version 2 reports only compat, refcount bits, encryption and the compression type (always
    zlib: the struct is zero-filled). Version 3 adds the feature flags, the external data file
    name and, when the "bitmaps" autoclear bit vouches for them, the persistent bitmaps.
    """
    refcount_bits = 1 << img.geometry.refcount_order
    encrypt = encrypt_info(img)
    if img.version == 2:
        return qdict([("compat", "0.10"), ("refcount-bits", refcount_bits), ("encrypt", encrypt),
                      ("compression-type", "zlib")])
    incompat = img.incompatible_features
    has_data_file = bool(incompat & ft.QCOW2_INCOMPAT_DATA_FILE)
    return qdict([
        ("compat", "1.1"),
        # The name comes from the extension whether or not the feature bit is set; with
        # BDRV_O_NO_IO QEMU 7.2 neither opens nor cross-checks the data file.
        ("data-file", _c_str(img.data_file) if img.data_file is not None else None),
        ("data-file-raw", bool(img.autoclear_features & ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
         if has_data_file else None),
        ("extended-l2", img.extended_l2),
        ("lazy-refcounts", bool(img.compatible_features & ft.QCOW2_COMPAT_LAZY_REFCOUNTS)),
        ("corrupt", bool(incompat & ft.QCOW2_INCOMPAT_CORRUPT)),
        ("refcount-bits", refcount_bits),
        ("encrypt", encrypt),
        ("bitmaps", bitmap_list(img)),
        ("compression-type", ft.COMPRESSION_NAMES[img.compression_type]),
    ])


def encrypt_info(img: ImageFile) -> Info | None:
    """ImageInfoSpecificQCow2Encryption: {"format": "aes"} or the LUKS header's details.

    QEMU opens the LUKS header even without a key when only info is asked (qcow2_read_extensions
    passes QCRYPTO_BLOCK_OPEN_NO_IO), so a broken header fails qemu-img info, and so it does here.
    """
    method = img.header.crypt_method
    if method == QCOW_CRYPT_AES:
        return qdict([("format", "aes")])
    if method != QCOW_CRYPT_LUKS:
        return None
    luks = luks_info(read_luks_header(img))
    slots = [qdict([("active", s.active), ("iters", s.iters), ("stripes", s.stripes),
                    ("key-offset", s.key_offset)]) for s in luks.slots]
    return qdict([
        ("format", "luks"),
        ("cipher-alg", luks.cipher_alg),
        ("cipher-mode", luks.cipher_mode),
        ("ivgen-alg", luks.ivgen_alg),
        ("ivgen-hash-alg", luks.ivgen_hash_alg),
        ("hash-alg", luks.hash_alg),
        ("payload-offset", luks.payload_offset),
        ("master-key-iters", luks.master_key_iters),
        ("uuid", c_string(luks.uuid)),
        ("slots", slots),
    ])


# --- Snapshots (block/qcow2-snapshot.c, block/qapi.c) ------------------------------------------

SNAPSHOT_ID_MAX = 127
"""QEMUSnapshotInfo.id_str is char[128]: qcow2_snapshot_list copies at most 127 bytes."""
SNAPSHOT_NAME_MAX = 255
"""QEMUSnapshotInfo.name is char[256]."""


def snapshot_list(img: ImageFile) -> list[Info] | None:
    """SnapshotInfo for each internal snapshot, or None without snapshots (no "snapshots" key).

    The VM state size is the 64-bit extra field when the extra data holds it, else the 32-bit
    one; icount is reported only when the extra data holds it and it is not -1
    (qcow2_read_snapshots, bdrv_query_snapshot_info_list).

    An image with an external data file lists none: qcow2_snapshot_list refuses with ENOTSUP
    (internal snapshots do not work with a data file), which bdrv_query_image_info treats as
    "no snapshots", although the table was still read and checked at open.
    """
    if img.header.nb_snapshots == 0 or img.incompatible_features & ft.QCOW2_INCOMPAT_DATA_FILE:
        return None
    out = []
    for sn in img.snapshot_table():
        extra = sn.extra_data
        vm_state = extra.vm_state_size_large if extra.vm_state_size_large is not None else sn.vm_state_size
        icount = extra.icount if extra.icount is not None else U64
        out.append(qdict([
            ("id", c_string(bytes(sn.id_str), SNAPSHOT_ID_MAX)),
            ("name", c_string(bytes(sn.name), SNAPSHOT_NAME_MAX)),
            ("vm-state-size", int64(vm_state)),
            ("date-sec", sn.date_sec),
            ("date-nsec", sn.date_nsec),
            ("vm-clock-sec", sn.vm_clock_nsec // 1_000_000_000),
            ("vm-clock-nsec", sn.vm_clock_nsec % 1_000_000_000),
            ("icount", int64(icount) if icount != U64 else None),
        ]))
    return out


# --- Persistent bitmaps (block/qcow2-bitmap.c) -------------------------------------------------

def bitmap_list(img: ImageFile) -> list[Info] | None:
    """Qcow2BitmapInfo for each persistent bitmap, or None when there are none.

    QEMU ignores the bitmaps extension unless the "bitmaps" autoclear bit is set
    (qcow2_read_extensions), and on open it loads every bitmap (qcow2_load_dirty_bitmaps), so
    a directory or bitmap table that would not load makes qemu-img info fail. spec.image runs
    those load-time checks when it opens the image (bitmap_list_load, check_dir_entry,
    load_bitmap, bitmap_table_load), so here the directory is only reported.
    """
    ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if ext is None or not img.autoclear_features & ft.QCOW2_AUTOCLEAR_BITMAPS:
        return None
    out = []
    for e in img.bitmap_directory():  # open_image has already run QEMU's load-time checks
        flags = [f for bit, f in ((bmp.BME_FLAG_IN_USE, "in-use"), (bmp.BME_FLAG_AUTO, "auto"))
                 if e.flags & bit]
        out.append(qdict([("name", c_string(bytes(e.name))), ("granularity", 1 << e.granularity_bits),
                          ("flags", flags)]))
    return out
