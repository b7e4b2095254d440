"""parse -> build -> the same bytes, for every structure of every image QEMU wrote.

For each image of the catalogue (tests/images.py, plus the shared corpus) the raw bytes of
every structure are read straight from the file and compared with what the schema builds
from its own parse: the header (with header_tail), each extension, the backing file name,
the active L1 table, every L2 table reachable from it and from every snapshot's L1 table,
the refcount table and every refcount block, each snapshot table entry, the bitmap
directory and the bitmap tables, the LUKS header pointer, the LUKS area it points at (the
phdr, each key slot descriptor and each slot's key material) and every compressed cluster
descriptor. A final test checks that each kind of structure was met at least once, so that
the round trip cannot pass by finding nothing to test.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import construct as c
import pytest

from spec import entries as en
from spec import header as hd
from spec import luks as lk
from spec.bitmaps import BitmapDirectoryEntry, bitmap_directory
from spec.image import ImageFile, open_image
from spec.snapshot import SnapshotHeader
from spec.tables import (
    ExtendedL2Entry,
    L1Entry,
    L2Entry,
    bitmap_table,
    compressed_descriptor,
    l1_table,
    l2_table,
    refcount_block,
    refcount_table,
)
from tests.images import BUILDERS, corpus_images

SEEN: Counter[str] = Counter()
"""Structure kind -> times round-tripped, over the whole catalogue."""

EXPECTED_KINDS = {
    "header", "header_tail", "extension:end", "extension:backing file format",
    "extension:feature name table", "extension:bitmaps", "extension:crypto header pointer",
    "extension:external data file name", "backing_file", "l1_table", "l1_entry", "l2_table",
    "l2_table_extended", "l2_entry", "l2_entry_extended", "snapshot_l1_table", "snapshot_l2_table",
    "refcount_table", "refcount_block", "snapshot", "snapshot_extra_data", "bitmap_directory",
    "bitmap_directory_entry", "bitmap_table", "compressed_descriptor", "luks_header_pointer",
    "luks_area", "luks_header", "luks_key_slot", "luks_key_material",
    *(f"refcount_block:{bits}" for bits in (1, 2, 4, 8, 16, 32, 64)),
}

EXT_KIND = {
    hd.QCOW2_EXT_MAGIC_END: "extension:end",
    hd.QCOW2_EXT_MAGIC_BACKING_FORMAT: "extension:backing file format",
    hd.QCOW2_EXT_MAGIC_FEATURE_TABLE: "extension:feature name table",
    hd.QCOW2_EXT_MAGIC_BITMAPS: "extension:bitmaps",
    hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER: "extension:crypto header pointer",
    hd.QCOW2_EXT_MAGIC_DATA_FILE: "extension:external data file name",
}

NAMES = [*BUILDERS, *(f"corpus:{p.name}" for p in corpus_images())]


def roundtrip(kind: str, schema: c.Construct, raw: bytes) -> Any:
    """Parse ``raw`` with ``schema``, build it back and insist on the very same bytes."""
    obj = schema.parse(raw)
    assert schema.build(obj) == raw, kind
    SEEN[kind] += 1
    return obj


def check_l2(img: ImageFile, offset: int, kind: str, done: set[int]) -> None:
    """One L2 table: the whole table, then each entry's bits, then compressed descriptors."""
    if offset in done:
        return
    done.add(offset)
    g = img.geometry
    raw = img.read(offset, img.cluster_size, kind)
    table = roundtrip(kind if not g.extended_l2 else f"{kind}_extended", l2_table(g), raw)
    assert img.l2_table(offset) == list(table)
    if kind == "snapshot_l2_table":
        return
    for e in table:
        word = e.l2_entry if g.extended_l2 else e
        if g.extended_l2:
            roundtrip("l2_entry_extended", ExtendedL2Entry, ExtendedL2Entry.build(e))
        if not word:
            continue
        wbytes = word.to_bytes(8, "big")
        roundtrip("l2_entry", L2Entry, wbytes)
        if word & en.QCOW_OFLAG_COMPRESSED:
            d = roundtrip("compressed_descriptor", compressed_descriptor(g.cluster_bits), wbytes)
            assert d.host_offset == en.compressed_host_offset(word, g.cluster_bits)
            assert d.nb_additional_sectors + 1 == en.compressed_nb_sectors(word, g.cluster_bits)
            assert en.compressed_entry_reserved_ok(word, g.cluster_bits)


def check_luks_area(area: bytes) -> None:
    """The LUKS area: the whole area, the phdr, each slot descriptor and each slot's key material."""
    whole = roundtrip("luks_area", lk.LuksArea, area)
    h = roundtrip("luks_header", lk.LuksHeader, area[:lk.LUKS_HEADER_SIZE])
    assert whole.phdr == h and len(area) == h.payload_offset * lk.LUKS_SECTOR_SIZE
    for i, slot in enumerate(h.key_slots):
        at = lk.LUKS_HEADER_SIZE - 48 * (lk.LUKS_NUM_KEY_SLOTS - i)
        assert roundtrip("luks_key_slot", lk.LuksKeySlot, area[at:at + 48]) == slot
        params = {"stripes": slot.stripes, "key_bytes": h.key_bytes}
        start = slot.key_material_offset * lk.LUKS_SECTOR_SIZE
        raw = area[start:start + lk._splitkey_sectors(h.key_bytes, slot.stripes) * lk.LUKS_SECTOR_SIZE]
        material = lk.LuksKeyMaterial.parse(raw, **params)
        assert lk.LuksKeyMaterial.build(material, **params) == raw
        assert len(material.stripes) == slot.stripes and not any(material.padding)
        SEEN["luks_key_material"] += 1


def check_image(img: ImageFile) -> None:
    h = img.header
    hlen = img.header_length
    roundtrip("header", hd.Header, img.read(0, hlen, "header"))
    if h.ext is not None:
        SEEN["header_tail"] += 1
        assert len(h.ext.header_tail) == hlen - 105

    offset = hlen
    for ext in img.extensions:
        assert ext.offset == offset
        raw = img.read(ext.offset, ext.size, "extension")
        parsed = roundtrip(EXT_KIND.get(ext.type, "extension:unknown"), hd.HeaderExtension, raw)
        assert parsed == ext.raw
        offset += ext.size
    if img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is not None:
        ptr = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ptr is not None
        roundtrip("luks_header_pointer", hd.CryptoHeaderPointer, hd.CryptoHeaderPointer.build(ptr.data))
        assert ptr.data.offset % img.cluster_size == 0 and ptr.data.length > 0
        check_luks_area(img.read(ptr.data.offset, ptr.data.length, "luks_area"))

    if h.backing_file_offset:
        raw = img.read(h.backing_file_offset, h.backing_file_size, "backing_file")
        name = roundtrip("backing_file", hd.backing_file_name(h.backing_file_size), raw)
        assert name == img.backing_file_raw
        assert img.backing_file is not None and img.backing_file.encode() == raw

    l1_raw = img.read(h.l1_table_offset, h.l1_size * 8, "l1_table")
    l1 = roundtrip("l1_table", l1_table(h.l1_size), l1_raw)
    assert img.l1_table() == list(l1)
    done: set[int] = set()
    for e in l1:
        if e:
            roundtrip("l1_entry", L1Entry, e.to_bytes(8, "big"))
        if e & en.L1E_OFFSET_MASK:
            check_l2(img, e & en.L1E_OFFSET_MASK, "l2_table", done)

    for i, sn in enumerate(img.snapshot_table()):
        off = img.snapshot_offsets[i]
        n = 40 + sn.extra_data_size + sn.id_str_size + sn.name_size
        padded = n + (-n % 8)
        # QEMU writes no padding after the last entry, and the file may end right there
        # (qcow2_write_snapshots): the missing padding reads as zeros.
        raw = img.read(off, min(padded, img.file_size - off), "snapshot")
        assert len(raw) >= n
        assert roundtrip("snapshot", SnapshotHeader, raw + bytes(padded - len(raw))) == sn
        if sn.extra_data_size:
            SEEN["snapshot_extra_data"] += 1
            assert sn.extra_data.disk_size == img.size
        sl1_raw = img.read(sn.l1_table_offset, sn.l1_size * 8, "snapshot_l1")
        sl1 = roundtrip("snapshot_l1_table", l1_table(sn.l1_size), sl1_raw)
        assert img.snapshot_l1_table(sn) == list(sl1)
        for e in sl1:
            if e & en.L1E_OFFSET_MASK:
                check_l2(img, e & en.L1E_OFFSET_MASK, "snapshot_l2_table", done)

    n_rt = h.refcount_table_clusters * img.cluster_size // 8
    rt = roundtrip("refcount_table", refcount_table(n_rt),
                   img.read(h.refcount_table_offset, n_rt * 8, "refcount_table"))
    assert img.refcount_table() == list(rt)
    schema = refcount_block(img.geometry)
    for e in rt:
        off = e & en.REFT_OFFSET_MASK
        if not off:
            continue
        block = roundtrip("refcount_block", schema, img.read(off, img.cluster_size, "refcount_block"))
        SEEN[f"refcount_block:{img.geometry.refcount_bits}"] += 1
        assert len(block) == img.geometry.refcount_block_entries
        assert img.refcount_block(off) == list(block)

    if img.bitmaps:
        bext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        assert bext is not None
        d = bext.data
        raw = img.read(d.bitmap_directory_offset, d.bitmap_directory_size, "bitmap_directory")
        directory = roundtrip("bitmap_directory", bitmap_directory(d.nb_bitmaps), raw)
        assert list(directory) == img.bitmap_directory()
        for entry in directory:
            roundtrip("bitmap_directory_entry", BitmapDirectoryEntry, BitmapDirectoryEntry.build(entry))
            n = entry.bitmap_table_size
            bt = roundtrip("bitmap_table", bitmap_table(n), img.read(entry.bitmap_table_offset, n * 8, "bt"))
            assert img.bitmap_table(entry) == list(bt)


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip(qemu_images: dict[str, Path], name: str) -> None:
    with open_image(qemu_images[name]) as img:
        check_image(img)


def test_every_structure_was_exercised(qemu_images: dict[str, Path]) -> None:
    """Runs the whole catalogue again if needed (e.g. under -n 2, or when run alone), then
    requires every kind of structure to have been round-tripped at least once."""
    if EXPECTED_KINDS - set(SEEN):
        for name in NAMES:
            with open_image(qemu_images[name]) as img:
                check_image(img)
    missing = EXPECTED_KINDS - set(SEEN)
    assert not missing, f"never exercised: {sorted(missing)}"


def test_unknown_extension_kept_byte_for_byte(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    """An extension QEMU does not know is kept whole (qcow2_read_extensions keeps unknown
    ones to write them back): type, length, data and padding survive parse -> build."""
    src = qemu_images["v3"]
    with open_image(src) as img:
        hlen = img.header_length
        first = img.extensions[0]
        assert first.offset == hlen
    payload = bytes(range(1, 12))  # 11 bytes: not a multiple of 8, so padding is exercised
    unknown = (0x12345678).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload + b"\xa5" * 5

    # The extension area has room: shift the existing list right to make space in front.
    with open_image(src) as img:
        used = sum(e.size for e in img.extensions)
        types = [e.type for e in img.extensions]
        assert hlen + used + len(unknown) <= img.cluster_size
    data = bytearray(src.read_bytes())
    area = bytes(data[hlen:hlen + used])
    data[hlen:hlen + len(unknown) + used] = unknown + area
    out = tmp_path / "unknown-ext.qcow2"
    out.write_bytes(bytes(data))
    with open_image(out) as img:
        ext = img.extensions[0]
        assert ext.type == 0x12345678 and ext.length == len(payload) and ext.data == payload
        assert ext.name.startswith("unknown")
        raw = img.read(ext.offset, ext.size, "ext")
        assert raw == unknown
        assert hd.HeaderExtension.build(ext.raw) == unknown
        assert [e.type for e in img.extensions[1:]] == types


def test_feature_names_match_qemu(qemu_images: dict[str, Path]) -> None:
    """spec/features.py names every bit exactly as QEMU writes it into the feature name table."""
    from spec import features as ft
    from spec.image import c_string

    with open_image(qemu_images["v3"]) as img:
        written = {(int(e.type), int(e.bit)): c_string(e.name) for e in img.feature_names}
    assert written == {(int(f.type), f.bit): f.name for f in ft.FEATURES}
