"""Hostile images: open_image() and every table read either succeed or raise FormatError /
UnsupportedFeature, never anything else, and never read more than the file holds.

The fuzz test takes real images of the catalogue and damages them: header fields set to
boundary values, extension lengths, table entries, random bytes, truncation. The named
tests pin the error CLASS of each limit QEMU enforces at open (block/qcow2.c qcow2_do_open,
qcow2_read_extensions, qcow2_validate_table; block/qcow2-snapshot.c qcow2_do_read_snapshots;
block/qcow2-bitmap.c bitmap_list_load, check_dir_entry, check_table_entry).
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from spec import entries as en
from spec import features as ft
from spec import header as hd
from spec import limits as lim
from spec.errors import FormatError, Qcow2Error, UnsupportedFeature
from spec.image import ImageFile, open_image

# Header fields: name -> (offset, width), qcow2.rst "Header".
FIELDS = {
    "magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8), "incompatible_features": (72, 8),
    "compatible_features": (80, 8), "autoclear_features": (88, 8), "refcount_order": (96, 4),
    "header_length": (100, 4), "compression_type": (104, 1),
}

FUZZ_BASES = ["v3", "v2-backing", "snapshots", "bitmap", "extended-l2", "refcount-bits-1",
              "deflate-compressed", "cluster-512", "data-file", "zstd-compressed", "luks"]


# --- helpers ----------------------------------------------------------------------------------

def put(data: bytearray, offset: int, width: int, value: int) -> None:
    data[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")


def get(data: bytes | bytearray, offset: int, width: int) -> int:
    return int.from_bytes(data[offset:offset + width], "big")


def set_field(data: bytearray, name: str, value: int) -> None:
    put(data, *FIELDS[name], value)


@dataclass(frozen=True)
class Layout:
    """Where an intact image keeps things (found with the schemas, before any damage)."""

    cluster_size: int
    header_length: int
    extensions: tuple[tuple[int, int], ...]  # (offset, type)
    tables: tuple[tuple[int, int], ...]  # (offset, bytes) of L1, refcount table, snapshots, ...


@functools.cache
def layout(path: Path) -> Layout:
    with open_image(path) as img:
        h = img.header
        tables = [(h.l1_table_offset, h.l1_size * 8),
                  (h.refcount_table_offset, h.refcount_table_clusters * img.cluster_size)]
        if h.nb_snapshots:
            tables.append((h.snapshots_offset, img.cluster_size))
        for sn in img.snapshots:
            tables.append((sn.l1_table_offset, sn.l1_size * 8))
        bext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        if bext is not None:
            tables.append((bext.data.bitmap_directory_offset, bext.data.bitmap_directory_size))
            for b in img.bitmaps:
                tables.append((b.bitmap_table_offset, b.bitmap_table_size * 8))
        l1 = img.l1_table()
        tables += [(e & en.L1E_OFFSET_MASK, img.cluster_size) for e in l1 if e & en.L1E_OFFSET_MASK][:2]
        return Layout(img.cluster_size, img.header_length,
                      tuple((e.offset, e.type) for e in img.extensions), tuple(tables))


class ReadLog:
    """Records every os.pread: the largest request shows that memory stays bounded."""

    def __init__(self) -> None:
        self.largest = 0
        self.count = 0
        self._real = os.pread

    def __call__(self, fd: int, n: int, offset: int) -> bytes:
        self.largest = max(self.largest, n)
        self.count += 1
        return self._real(fd, n, offset)


@contextmanager
def logged_reads() -> Iterator[ReadLog]:
    log = ReadLog()
    with mock.patch("os.pread", log):
        yield log


def read_everything(img: ImageFile, cap: int = 6) -> None:
    """Every table the image names, a few of each kind (enough to reach every code path)."""
    done: set[int] = set()

    def l2s(l1: list[int]) -> None:
        for e in l1:
            off = e & en.L1E_OFFSET_MASK
            if off and off not in done and len(done) < cap:
                done.add(off)
                img.l2_table(off)

    l2s(img.l1_table())
    blocks = [e & en.REFT_OFFSET_MASK for e in img.refcount_table() if e & en.REFT_OFFSET_MASK]
    for off in blocks[:cap]:
        img.refcount_block(off)
    for sn in img.snapshot_table()[:cap]:
        l2s(img.snapshot_l1_table(sn))
    for b in img.bitmap_directory()[:cap]:
        img.bitmap_table(b)


def outcome(path: Path) -> type[Qcow2Error] | None:
    """None if the image opens and every table reads, else the error class raised."""
    try:
        with open_image(path) as img:
            read_everything(img)
    except Qcow2Error as e:
        assert type(e) in (FormatError, UnsupportedFeature), repr(e)
        return type(e)
    return None


def damaged(src: Path, dst: Path, change: Callable[[bytearray], None]) -> Path:
    data = bytearray(src.read_bytes())
    change(data)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def make(qemu_images: dict[str, Path], tmp_path: Path) -> Callable[..., Path]:
    """make(base, change) -> path of a damaged copy of the catalogue image ``base``."""
    counter = iter(range(10**6))

    def _make(base: str, change: Callable[[bytearray], None]) -> Path:
        return damaged(qemu_images[base], tmp_path / f"{base}-{next(counter)}.qcow2", change)

    return _make


def fields(**values: int) -> Callable[[bytearray], None]:
    def change(data: bytearray) -> None:
        for name, v in values.items():
            set_field(data, name, v)
    return change


# --- the fuzz test --------------------------------------------------------------------------

def _values(width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 63, 64, 103, 104, 105, 112, 511, 512, 1023, 1024,
                         4096, 65535, 65536, 65537, 1 << 20, 1 << 22, (1 << 22) + 1, 1 << 31, top >> 1, top,
                         top - 511]),
        st.integers(0, top),
    )


@st.composite
def mutation(draw: st.DrawFn, lay: Layout, size: int) -> tuple[str, int, int, int]:
    """One edit as (kind, offset, width, value)."""
    kind = draw(st.sampled_from(["field", "field", "field", "ext", "table", "byte", "truncate"]))
    if kind == "field":
        name = draw(st.sampled_from(sorted(FIELDS)))
        off, width = FIELDS[name]
        return name, off, width, draw(_values(width))
    if kind == "ext" and lay.extensions:
        off, _ = draw(st.sampled_from(lay.extensions))
        which = draw(st.sampled_from([(0, 4), (4, 4)]))  # type or length
        return "ext", off + which[0], which[1], draw(_values(4))
    if kind == "table" and lay.tables:
        base, n = draw(st.sampled_from(lay.tables))
        if n >= 8:
            off = base + 8 * draw(st.integers(0, max(0, min(n, size - base) // 8 - 1)))
            return "table", off, 8, draw(_values(8))
    if kind == "truncate":
        return "truncate", draw(st.integers(0, size)), 0, 0
    return "byte", draw(st.integers(0, min(size, lay.cluster_size) - 1)), 1, draw(st.integers(0, 255))


FUZZ_SETTINGS = {"deadline": None,
                 "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=400, **FUZZ_SETTINGS)  # type: ignore[arg-type]
@given(data=st.data())
def test_fuzz_hostile_images(qemu_images: dict[str, Path], data: st.DataObject) -> None:
    fuzz_one(qemu_images, data)


@pytest.mark.slow
@settings(max_examples=20000, **FUZZ_SETTINGS)  # type: ignore[arg-type]
@given(data=st.data())
def test_fuzz_hostile_images_campaign(qemu_images: dict[str, Path], data: st.DataObject) -> None:
    fuzz_one(qemu_images, data)


def fuzz_one(qemu_images: dict[str, Path], data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(FUZZ_BASES))
    src = qemu_images[base]
    raw = bytearray(src.read_bytes())
    lay = layout(src)
    edits = data.draw(st.lists(mutation(lay, len(raw)), min_size=1, max_size=4))
    note(f"{base}: {edits}")
    for kind, off, width, value in edits:
        if kind == "truncate":
            del raw[off:]
        elif off + width <= len(raw):
            put(raw, off, width, value)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "hostile.qcow2"
        p.write_bytes(bytes(raw))
        with logged_reads() as log:
            result = outcome(p)
        note(f"outcome: {result}, largest read {log.largest}, reads {log.count}")
        event(f"outcome: {result.__name__ if result else 'opens and reads'}")
        # Bounded memory: no single read asks for more than the file holds (os.pread
        # allocates what it is asked for, whatever the file has).
        assert log.largest <= max(len(raw), lim.V3_MIN_HEADER_LENGTH)


def test_intact_bases_read_cleanly(qemu_images: dict[str, Path]) -> None:
    """The fuzz bases themselves open and read without error (so damage is what fails)."""
    for base in FUZZ_BASES:
        assert outcome(qemu_images[base]) is None, base


# --- named limits: header ----------------------------------------------------------------------

def test_bad_magic(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(magic=0x51464900))) is FormatError


def test_not_even_a_header(tmp_path: Path) -> None:
    p = tmp_path / "short.qcow2"
    p.write_bytes(lim.QCOW_MAGIC + b"\0\0\0\3")
    assert outcome(p) is FormatError
    p.write_bytes(b"")
    assert outcome(p) is FormatError
    assert outcome(tmp_path / "missing.qcow2") is FormatError


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(make: Callable[..., Path], version: int) -> None:
    assert outcome(make("v3", fields(version=version))) is UnsupportedFeature


@pytest.mark.parametrize("bits", [0, 8, 22, 64, 0xFFFFFFFF])
def test_cluster_bits_out_of_range(make: Callable[..., Path], bits: int) -> None:
    assert outcome(make("v3", fields(cluster_bits=bits))) is FormatError


def test_cluster_bits_too_small_for_extended_l2(make: Callable[..., Path]) -> None:
    # 8 KiB clusters with extended L2 have 256-byte subclusters: QEMU refuses.
    assert outcome(make("extended-l2", fields(cluster_bits=13))) is FormatError


@pytest.mark.parametrize("hlen", [0, 72, 103, 65537, 0xFFFFFFFF])
def test_header_length_out_of_range(make: Callable[..., Path], hlen: int) -> None:
    assert outcome(make("v3", fields(header_length=hlen))) is FormatError


def test_header_length_not_multiple_of_8_is_accepted(make: Callable[..., Path], tmp_path: Path) -> None:
    """qcow2.rst asks for a multiple of 8, QEMU does not check: a 105-byte header whose
    extensions start right after still opens (qemu-img info accepts it too)."""
    def change(data: bytearray) -> None:
        area = bytes(data[112:1024])
        set_field(data, "header_length", 105)
        data[105:105 + len(area)] = area

    p = make("v3", change)
    assert outcome(p) is None
    with open_image(p) as img:
        assert img.header_length == 105 and img.header.ext.header_tail == b""
        assert img.extensions[0].offset == 105


def test_unknown_header_fields_kept(make: Callable[..., Path]) -> None:
    """Bytes past the known header (header_length > 112) are kept byte for byte."""
    def change(data: bytearray) -> None:
        area = bytes(data[112:2048])
        set_field(data, "header_length", 128)
        data[112:128] = bytes(range(0xE0, 0xF0))
        data[128:128 + len(area)] = area

    p = make("v3", change)
    with open_image(p) as img:
        assert img.header.ext.header_tail == bytes(7) + bytes(range(0xE0, 0xF0))
        assert hd.Header.build(img.header) == p.read_bytes()[:128]
    assert outcome(p) is None


def test_backing_file_offset_past_first_cluster(make: Callable[..., Path]) -> None:
    assert outcome(make("v2-backing", fields(backing_file_offset=65537))) is FormatError


@pytest.mark.parametrize("n", [1024, 65535, 0xFFFFFFFF])
def test_backing_file_name_too_long(make: Callable[..., Path], n: int) -> None:
    assert outcome(make("v2-backing", fields(backing_file_size=n))) is FormatError


def test_backing_file_name_may_not_fit_in_cluster(make: Callable[..., Path]) -> None:
    # Fewer than 1023 bytes, but past the end of the first cluster.
    p = make("v2-backing", fields(backing_file_offset=65536 - 10, backing_file_size=11))
    assert outcome(p) is FormatError


def test_backing_file_name_is_a_c_string(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    """QEMU stops the name at a NUL and never checks its encoding: such images open."""
    with open_image(qemu_images["v2-backing"]) as img:
        off, n = img.header.backing_file_offset, img.header.backing_file_size

    def change(data: bytearray) -> None:
        data[off + 2] = 0
        data[off + 1] = 0xFF

    with open_image(make("v2-backing", change)) as img:
        assert img.backing_file is not None and len(img.backing_file) == 2
        assert img.backing_file_raw is not None and len(img.backing_file_raw) == n
        assert os.fsencode(img.backing_file) == img.backing_file_raw[:2]


@pytest.mark.parametrize("bit", [5, 31, 63])
def test_unknown_incompatible_bit(make: Callable[..., Path], bit: int) -> None:
    assert outcome(make("v3", fields(incompatible_features=1 << bit))) is UnsupportedFeature


def test_unknown_incompatible_bit_named_by_feature_table(make: Callable[..., Path]) -> None:
    """The image's own feature name table names the bit in the error (QEMU does the same)."""
    lay = layout(make("v3", lambda d: None))
    off = next(o for o, t in lay.extensions if t == hd.QCOW2_EXT_MAGIC_FEATURE_TABLE)

    def change(data: bytearray) -> None:
        set_field(data, "incompatible_features", 1 << 9)
        data[off + 8:off + 8 + 48] = b"\0\x09" + b"future thing".ljust(46, b"\0")

    with pytest.raises(UnsupportedFeature) as info:
        open_image(make("v3", change))
    assert info.value.feature == "future thing"


def test_unknown_compatible_and_autoclear_bits_are_fine(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(compatible_features=1 << 40, autoclear_features=1 << 40))) is None


def test_compression_type(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(compression_type=2))) is UnsupportedFeature
    # zstd without the incompatible bit, and the bit with zlib: QEMU's EINVAL.
    assert outcome(make("v3", fields(compression_type=1))) is FormatError
    assert outcome(make("zstd-compressed", fields(compression_type=0))) is FormatError


def test_refcount_order(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(refcount_order=7))) is FormatError
    assert outcome(make("v3", fields(refcount_order=0xFFFFFFFF))) is FormatError


def test_crypt_method(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(crypt_method=3))) is FormatError
    # LUKS without the header pointer extension.
    assert outcome(make("v3", fields(crypt_method=2))) is FormatError


# --- named limits: tables ----------------------------------------------------------------------

def test_refcount_table(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(refcount_table_clusters=0))) is FormatError
    # Over QCOW_MAX_REFTABLE_SIZE (8 MiB): 129 clusters of 64 KiB.
    assert outcome(make("v3", fields(refcount_table_clusters=129))) is FormatError
    assert outcome(make("v3", fields(refcount_table_clusters=0xFFFFFFFF))) is FormatError
    assert outcome(make("v3", fields(refcount_table_offset=65536 + 512))) is FormatError
    assert outcome(make("v3", fields(refcount_table_offset=(1 << 63) - 65536))) is FormatError
    # Within the limit, but past the end of the file.
    assert outcome(make("v3", fields(refcount_table_clusters=128))) is FormatError


def test_l1_table(make: Callable[..., Path]) -> None:
    # Over QCOW_MAX_L1_SIZE (32 MiB of 8-byte entries).
    assert outcome(make("v3", fields(l1_size=(1 << 22) + 1))) is FormatError
    assert outcome(make("v3", fields(l1_size=0xFFFFFFFF))) is FormatError
    # Too small for the virtual size, and misaligned.
    assert outcome(make("v3", fields(size=1 << 40))) is FormatError
    assert outcome(make("v3", fields(l1_table_offset=3 * 65536 + 8))) is FormatError
    # Within the limit, but past the end of the file.
    assert outcome(make("v3", fields(l1_size=1 << 22))) is FormatError


@pytest.mark.parametrize("size", [1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
def test_image_too_big(make: Callable[..., Path], size: int) -> None:
    # QEMU: "Image is too big" (or a failed sector count refresh); never a huge L1.
    assert outcome(make("v3", fields(size=size, l1_size=1 << 22))) is FormatError


def test_snapshot_count(make: Callable[..., Path]) -> None:
    assert outcome(make("snapshots", fields(nb_snapshots=65537))) is FormatError
    assert outcome(make("snapshots", fields(nb_snapshots=0xFFFFFFFF))) is FormatError
    assert outcome(make("snapshots", fields(snapshots_offset=12345))) is FormatError
    # At the limit, far more than the file holds: the entries past its end read as zeros, as
    # in QEMU (issue 15), so the image opens with 65536 entries (test_open_agrees_with_qemu_io).
    p = make("snapshots", fields(nb_snapshots=65536))
    assert outcome(p) is None
    with open_image(p) as img:
        assert len(img.snapshots) == 65536
        assert img.snapshots[-1].l1_size == 0 and img.snapshots[-1].id_str_size == 0


def test_snapshot_extra_data_limit(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    with open_image(qemu_images["snapshots"]) as img:
        off = img.snapshot_offsets[0]
    assert outcome(make("snapshots", lambda d: put(d, off + 36, 4, 1025))) is FormatError


def test_snapshot_table_too_big(tmp_path: Path) -> None:
    """More than QCOW_MAX_SNAPSHOTS_SIZE (64 MiB) of entries: 512 entries with 65535-byte ID
    and name each. The file is sparse, so the test writes only the fixed parts."""
    p = tmp_path / "many.qcow2"
    src = bytearray(open_image_bytes_v3(tmp_path))
    entry = (40 + 65535 * 2) + (-(40 + 65535 * 2) % 8)
    set_field(src, "nb_snapshots", 512)
    set_field(src, "snapshots_offset", 1 << 20)
    with p.open("wb") as f:
        f.write(src)
        for i in range(512):
            f.seek((1 << 20) + i * entry)
            f.write(bytes(12) + (65535).to_bytes(2, "big") * 2 + bytes(24))
        f.truncate((1 << 20) + 512 * entry)
    assert lim.QCOW_MAX_SNAPSHOTS_SIZE < 512 * (40 + 2 * 65535)
    assert outcome(p) is FormatError


def open_image_bytes_v3(d: Path) -> bytes:
    from tests.qemu import create
    return create(d / "base.qcow2", "1M", cluster_size=4096).read_bytes()


def test_snapshot_l1_table(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    with open_image(qemu_images["snapshots"]) as img:
        off = img.snapshot_offsets[0]
    for edit in (lambda d: put(d, off + 8, 4, 0xFFFFFFFF), lambda d: put(d, off, 8, 65536 * 3 + 8)):
        with open_image(make("snapshots", edit)) as img, pytest.raises(FormatError):
            img.snapshot_l1_table(img.snapshots[0])


def test_l2_and_refcount_block_past_eof_or_misaligned(qemu_images: dict[str, Path]) -> None:
    with open_image(qemu_images["v3"]) as img:
        end = -(-img.file_size // img.cluster_size) * img.cluster_size
        for off in (end, end + img.cluster_size, 1 << 55, img.cluster_size + 512, 0):
            with pytest.raises(FormatError):
                img.l2_table(off)
            with pytest.raises(FormatError):
                img.refcount_block(off)


# --- named limits: extensions ---------------------------------------------------------------

def _ext(qemu_images: dict[str, Path], base: str, etype: int) -> int:
    with open_image(qemu_images[base]) as img:
        e = img.extension(etype)
        assert e is not None
        return e.offset


def test_extension_length_past_area(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    off = _ext(qemu_images, "v3", hd.QCOW2_EXT_MAGIC_FEATURE_TABLE)
    assert outcome(make("v3", lambda d: put(d, off + 4, 4, 0xFFFFFFFF))) is FormatError
    assert outcome(make("v3", lambda d: put(d, off + 4, 4, 65536 - off - 7))) is FormatError
    # With a backing file the area ends at the name: an extension may not run into it.
    boff = _ext(qemu_images, "v2-backing", hd.QCOW2_EXT_MAGIC_BACKING_FORMAT)
    assert outcome(make("v2-backing", lambda d: put(d, boff + 4, 4, 200))) is FormatError


def test_extension_area_without_end_marker(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    """The list may also end by reaching the end of the area (qcow2_read_extensions)."""
    with open_image(qemu_images["cluster-512"]) as img:
        hlen = img.header_length
        assert [e.type for e in img.extensions] == [hd.QCOW2_EXT_MAGIC_END]

    def change(data: bytearray) -> None:
        put(data, hlen, 4, 0x7777)
        put(data, hlen + 4, 4, 512 - hlen - 8)

    with open_image(make("cluster-512", change)) as img:
        assert [e.type for e in img.extensions] == [0x7777]


def test_backing_format_name_too_long(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    off = _ext(qemu_images, "extended-l2", hd.QCOW2_EXT_MAGIC_BACKING_FORMAT)
    assert outcome(make("extended-l2", lambda d: put(d, off + 4, 4, 16))) is FormatError


def test_duplicate_extensions_last_wins(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    """QEMU does not refuse a repeated extension; each one overwrites the previous."""
    src = qemu_images["extended-l2"]
    with open_image(src) as img:
        first = img.extension(hd.QCOW2_EXT_MAGIC_BACKING_FORMAT)
        assert first is not None and img.backing_format == "qcow2"
        at = first.offset + first.size
        name_end = img.header.backing_file_offset + img.header.backing_file_size
    dup = hd.QCOW2_EXT_MAGIC_BACKING_FORMAT.to_bytes(4, "big") + (3).to_bytes(4, "big") + b"raw" + bytes(5)

    def change(data: bytearray) -> None:
        assert not any(data[name_end:name_end + len(dup)])  # room in the first cluster
        data[at:at] = dup
        del data[name_end + len(dup):name_end + 2 * len(dup)]
        set_field(data, "backing_file_offset", get(data, 8, 8) + len(dup))

    with open_image(make("extended-l2", change)) as img:
        assert [e.type for e in img.extensions].count(hd.QCOW2_EXT_MAGIC_BACKING_FORMAT) == 2
        assert img.backing_format == "raw"
        assert img.backing_file == "extl2-base.qcow2"


def test_crypto_header_pointer(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    off = _ext(qemu_images, "luks", hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    assert outcome(make("luks", lambda d: put(d, off + 4, 4, 8))) is FormatError
    assert outcome(make("luks", lambda d: put(d, off + 8, 8, 65536 + 512))) is FormatError
    assert outcome(make("luks", fields(crypt_method=0))) is FormatError


def test_data_file_raw_without_data_file(make: Callable[..., Path]) -> None:
    assert outcome(make("v3", fields(autoclear_features=ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW))) is FormatError


# --- named limits: bitmaps ------------------------------------------------------------------

def _bitmaps(qemu_images: dict[str, Path]) -> tuple[int, int]:
    """(offset of the bitmaps extension, offset of the first directory entry)."""
    with open_image(qemu_images["bitmap"]) as img:
        e = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        assert e is not None and len(img.bitmaps) == 2
        return e.offset, e.data.bitmap_directory_offset


def test_bitmaps_extension(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    ext, _ = _bitmaps(qemu_images)
    assert outcome(make("bitmap", lambda d: put(d, ext + 4, 4, 16))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 8 + 4, 4, 1))) is FormatError  # reserved32
    assert outcome(make("bitmap", lambda d: put(d, ext + 8, 4, 0))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 8, 4, 65536))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 8, 4, 3))) is FormatError  # count mismatch
    assert outcome(make("bitmap", lambda d: put(d, ext + 8, 4, 1))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 16, 8, 65536 * 1024))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 16, 8, 0))) is FormatError
    assert outcome(make("bitmap", lambda d: put(d, ext + 24, 8, 65536 + 8))) is FormatError


def test_bitmaps_ignored_without_autoclear_bit(make: Callable[..., Path],
                                               qemu_images: dict[str, Path]) -> None:
    """Without the autoclear bit QEMU drops the bitmaps, whatever the extension says."""
    ext, _ = _bitmaps(qemu_images)

    def change(data: bytearray) -> None:
        set_field(data, "autoclear_features", 0)
        put(data, ext + 8, 4, 0xFFFFFFFF)

    p = make("bitmap", change)
    assert outcome(p) is None
    with open_image(p) as img:
        assert img.bitmap_directory() == []


def test_bitmap_directory_entries(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    _, d0 = _bitmaps(qemu_images)
    # Extra data: valid per qcow2.rst, not supported by QEMU.
    assert outcome(make("bitmap", lambda d: put(d, d0 + 20, 4, 8))) is UnsupportedFeature
    bad: list[tuple[int, int, int]] = [
        (8, 4, 0),            # bitmap_table_size 0
        (8, 4, 0x8000001),    # over BME_MAX_TABLE_SIZE
        (0, 8, 0),            # bitmap_table_offset 0
        (0, 8, 65536 + 8),    # misaligned
        (12, 4, 1 << 2),      # flag bit 2: reserved for QEMU
        (12, 4, 1 << 31),
        (16, 1, 2),           # type
        (17, 1, 8),           # granularity_bits < 9
        (17, 1, 32),          # > 31
        (18, 2, 1024),        # name_size > 1023 (also breaks the directory size)
        (18, 2, 200),         # entry runs past the directory
    ]
    for off, width, value in bad:
        p = make("bitmap", lambda d, o=off, w=width, v=value: put(d, d0 + o, w, v))
        assert outcome(p) is FormatError, off


def test_bitmap_table_entries(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    with open_image(qemu_images["bitmap"]) as img:
        t = img.bitmaps[0].bitmap_table_offset
        table = img.bitmap_table(img.bitmaps[0])
    assert table
    for value in (1 << 1, 1 << 60, 65536 * 7 + 512, 65536 * 7 | 1):
        assert outcome(make("bitmap", lambda d, v=value: put(d, t, 8, v))) is FormatError, value
    # Offset 0 with the all-ones flag is a valid entry.
    assert outcome(make("bitmap", lambda d: put(d, t, 8, 1))) is None


def test_truncated_images(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    for base in ("v3", "snapshots", "bitmap", "v2-backing"):
        data = qemu_images[base].read_bytes()
        for n in (3, 50, 71, 100, 111, 200, 4096, 65536, 65536 * 3, len(data) - 1):
            p = tmp_path / f"{base}-{n}.qcow2"
            p.write_bytes(data[:n])
            assert outcome(p) in (FormatError, None), (base, n)


# --- the oracle: qemu-io opens exactly the damaged images we open -------------------------

def _qemu_io_opens(path: Path) -> bool:
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-U", "-c", "info", str(path)],
                       capture_output=True, text=True, errors="replace")
    return r.returncode == 0 and "can't open" not in r.stdout + r.stderr


ORACLE_CASES: list[tuple[str, dict[str, int]]] = [
    ("v3", {}),
    ("v3", {"header_length": 103}),
    ("v3", {"header_length": 65537}),
    ("v3", {"cluster_bits": 22}),
    ("v3", {"version": 4}),
    ("v3", {"incompatible_features": 1 << 7}),
    ("v3", {"compatible_features": 1 << 7}),
    ("v3", {"compression_type": 1}),
    ("v3", {"compression_type": 7}),
    ("v3", {"refcount_order": 7}),
    ("v3", {"refcount_order": 0}),  # a width change alone still opens
    ("v3", {"refcount_table_clusters": 0}),
    ("v3", {"refcount_table_clusters": 129}),
    ("v3", {"refcount_table_offset": 65536 + 8}),
    ("v3", {"l1_size": (1 << 22) + 1}),
    ("v3", {"l1_size": 0}),
    ("v3", {"l1_table_offset": 3 * 65536 + 8}),
    ("v3", {"size": 1 << 63}),
    ("v3", {"crypt_method": 3}),
    ("v3", {"crypt_method": 2}),
    ("v3", {"backing_file_offset": 65537}),
    ("v3", {"autoclear_features": ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW}),
    ("snapshots", {}),
    ("snapshots", {"nb_snapshots": 65537}),
    ("snapshots", {"nb_snapshots": 65536}),  # past the end of the file: zeros, as QEMU reads
    ("snapshots", {"snapshots_offset": 1 << 32}),
    ("snapshots", {"snapshots_offset": 65536 + 8}),
    ("bitmap", {}),
    ("bitmap", {"size": 1 << 30}),  # saved bitmaps no longer match the disk size
    ("bitmap", {"autoclear_features": 0}),
    ("zstd-compressed", {"compression_type": 0}),
    ("cluster-512", {}),
]


@pytest.mark.parametrize(("base", "values"), ORACLE_CASES, ids=lambda v: str(v))
def test_open_agrees_with_qemu_io(make: Callable[..., Path], base: str, values: dict[str, int]) -> None:
    p = make(base, fields(**values))
    try:
        open_image(p).close()
        ours = True
    except (FormatError, UnsupportedFeature):
        ours = False
    assert ours == _qemu_io_opens(p)


def test_check_mode(make: Callable[..., Path], qemu_images: dict[str, Path]) -> None:
    """check_mode opens as `qemu-img check` does (BDRV_O_CHECK): what a check must report is
    not an open error there, but reading the broken structure still is."""
    p = make("v3", fields(refcount_table_clusters=0))
    assert outcome(p) is FormatError
    with open_image(p, check_mode=True) as img:
        assert img.refcount_table() == []
    p = make("snapshots", fields(nb_snapshots=65537))
    with open_image(p, check_mode=True) as img, pytest.raises(FormatError):
        img.snapshot_table()
    _, d0 = _bitmaps(qemu_images)
    p = make("bitmap", lambda d: put(d, d0 + 17, 1, 40))
    assert outcome(p) is FormatError
    with open_image(p, check_mode=True) as img:
        assert img.bitmaps == []
        with pytest.raises(FormatError):
            img.bitmap_directory()
