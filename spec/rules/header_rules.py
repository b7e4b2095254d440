"""Rules on the header, the feature bits and the extensions (qcow2.rst "Header",
"Additional fields", "Header padding", "Header extensions"; block/qcow2.c qcow2_do_open,
qcow2_read_extensions).

``open_checks`` are the ones QEMU refuses to open an image for (so ``qemu-img check`` exits 1)
beyond those spec.image already enforces; ``spec_checks`` are the spec's own, which QEMU does
not count.
"""

from __future__ import annotations

import os

from spec import features as ft
from spec import header as hd
from spec.errors import FormatError, UnsupportedFeature
from spec.image import QCOW_CRYPT_LUKS, ImageFile, open_image
from spec.limits import QCOW2_MAX_BACKING_DEPTH, V3_MIN_HEADER_LENGTH
from spec.luks import luks_info, read_luks_header
from spec.rules.context import Context

FEATURE_NAME_ENTRY_SIZE = 48

QEMU_FORMATS = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http",
    "https", "iscsi", "iser", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels",
    "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication",
    "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
))
"""Block drivers of the QEMU 7.2 build the project tests against (``qemu-img --help``): a
backing format outside this list makes QEMU fail to open the backing file."""


def open_checks(ctx: Context) -> None:
    """Checks QEMU makes at open that spec.image does not; each one stops the check."""
    img = ctx.img
    raw = bool(img.autoclear_features & ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)
    if raw and not img.has_data_file:
        raise ctx.abort("FEATURE-RAW-NEEDS-DATA-FILE", None,
                        "raw external data bit without the external data file bit")
    if img.has_data_file:
        if img.data_file is None:
            raise ctx.abort("FEATURE-DATA-FILE-NAME", None,
                            "external data file bit set but no data file name extension")
        # QEMU 7.2 opens a relative name relative to its working directory, not to the image's
        # (block/qcow2.c qcow2_do_open passes it to bdrv_open_child as is); we do the same.
        if not os.path.exists(img.data_file):
            raise ctx.abort("FEATURE-DATA-FILE-NAME", None, f"data file {img.data_file!r} not found")
    problem = backing_chain_problem(img)
    if problem is not None:
        raise ctx.abort("BACKING-FILE-OPENS", int(img.header.backing_file_offset) or None, problem)
    crypto = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    if crypto is not None and int(crypto.data.offset) % ctx.cluster_size:
        raise ctx.abort("CRYPTO-HEADER-ALIGNED", int(crypto.data.offset),
                        "LUKS header offset is not cluster aligned")
    if crypto is not None and img.header.crypt_method == QCOW_CRYPT_LUKS:
        # QEMU parses and checks the LUKS header whenever it opens the image, key or not
        # (crypto/block-luks.c); spec/luks.py does the same checks.
        try:
            luks_info(read_luks_header(img))
        except (FormatError, UnsupportedFeature) as e:
            raise ctx.abort("CRYPTO-HEADER-LUKS", int(crypto.data.offset), str(e)) from None


def backing_chain_problem(img: ImageFile) -> str | None:
    """Why QEMU could not open ``img``'s backing chain, or None if it could.

    qemu-img check opens the whole chain before checking (block.c bdrv_open_backing_file), so
    a missing file, an unknown format or a bad qcow2 image anywhere down the chain makes it
    refuse the top image. A chain that comes back to a file already in it is refused by
    ``qemu-img info --backing-chain`` ("creates an infinite loop"); ``qemu-img check`` 7.2 itself
    never answers on such a chain (it keeps opening it), so we refuse it as info does.
    """
    seen = {os.path.realpath(img.path)}
    cur: ImageFile | None = None
    name, fmt, directory = img.backing_file, img.backing_format, os.path.dirname(os.path.abspath(img.path))
    try:
        for _ in range(QCOW2_MAX_BACKING_DEPTH):
            if not name:
                return None
            # QEMU copies the extension into a C string: an empty (all-NUL) format means "probe".
            if fmt and fmt not in QEMU_FORMATS:
                return f"unknown backing format {fmt!r}"
            if "://" in name:
                return None  # a protocol URL: QEMU's network drivers, not files we can follow
            # bdrv_get_full_backing_filename: a relative name is relative to the image's directory.
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                return f"backing file {name!r} not found"
            real = os.path.realpath(path)
            if real in seen:
                return f"backing file {name!r} creates an infinite loop"
            seen.add(real)
            is_qcow2 = _has_qcow2_magic(path)
            if fmt == "qcow2" and not is_qcow2:
                return f"backing file {name!r} is not a qcow2 image"
            if fmt not in (None, "", "qcow2") or not is_qcow2:
                return None  # another format ends the chain as far as the qcow2 rules go
            if cur is not None:
                cur.close()
            try:
                cur = open_image(path)
            except (FormatError, UnsupportedFeature) as e:
                return f"backing file {name!r} cannot be opened: {e}"
            name, fmt = cur.backing_file, cur.backing_format
            directory = os.path.dirname(os.path.abspath(path))
        return f"backing chain deeper than {QCOW2_MAX_BACKING_DEPTH} (a loop)"
    finally:
        if cur is not None:
            cur.close()


def _has_qcow2_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"QFI\xfb"
    except OSError:
        return False


def spec_checks(ctx: Context) -> None:
    img = ctx.img
    h = img.header
    if h.v3 is not None:
        hlen = img.header_length
        if hlen % 8:
            ctx.add("HEADER-LENGTH-ALIGNED", 100, f"header_length {hlen} is not a multiple of 8")
        if h.ext is not None:
            # Bytes 105..111 pad compression_type to 8 bytes; later bytes may be future fields.
            pad = bytes(h.ext.header_tail)[: 112 - (V3_MIN_HEADER_LENGTH + 1)]
            if any(pad):
                ctx.add("HEADER-PADDING-ZERO", V3_MIN_HEADER_LENGTH + 1, "header padding is not zero")
        if img.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT:
            ctx.add("HEADER-NOT-CORRUPT", 72, "the corrupt bit is set")
        unknown = img.autoclear_features & ~ft.QCOW2_AUTOCLEAR_MASK
        if unknown:
            ctx.add("HEADER-UNKNOWN-AUTOCLEAR-ZERO", 88, f"unknown autoclear bits {unknown:#x}")
        dirty = img.incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
        if dirty and not img.compatible_features & ft.QCOW2_COMPAT_LAZY_REFCOUNTS:
            ctx.add("FEATURE-LAZY-DIRTY", 72, "dirty bit set without lazy refcounts")
    bitmaps = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if bool(img.autoclear_features & ft.QCOW2_AUTOCLEAR_BITMAPS) != (bitmaps is not None):
        ctx.add("FEATURE-BITMAPS-EXTENSION", 88,
                "bitmaps autoclear bit and bitmaps extension disagree (QEMU then ignores the bitmaps)")
    if bitmaps is not None and bitmaps.data.reserved32:
        ctx.add("EXT-BITMAPS-RESERVED-ZERO", None, "bitmaps extension reserved field is not zero")
    if img.data_file is not None and not img.has_data_file:
        ctx.add("DATA-FILE-NAME-NEEDS-BIT", None, "data file name without the external data file bit")
    table = img.extension(hd.QCOW2_EXT_MAGIC_FEATURE_TABLE)
    if table is not None:
        bad_types = [e for e in img.feature_names if e.type > ft.FeatureType.AUTOCLEAR]
        if table.length % FEATURE_NAME_ENTRY_SIZE or bad_types:
            ctx.add("EXT-FEATURE-TABLE-WHOLE", None, "feature name table is not whole 48-byte entries "
                    "of known types")
