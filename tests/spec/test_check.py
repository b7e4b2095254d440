"""``qcow2lab check`` against ``qemu-img check``.

Every catalogue image gives qemu-img's JSON field for field. Then each mutation breaks one rule
in a copy of a valid image; the rule must be reported, and our verdict (exit code: 0 clean,
1 check errors, 2 corruptions, 3 leaks) must be the one qemu-img gives for the same file.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from difftest.cli import main
from spec import entries as en
from spec import features as ft
from spec import header as hd
from spec.check import check as spec_check
from spec.image import ImageFile, open_image
from spec.rules import RULES_BY_ID, check
from tests.qemu import SECRET_ARGS, create, qemu_io

LUKS_OPTS = "driver=qcow2,encrypt.key-secret=sec0,file.filename="


def qemu_check(path: Path, *, luks: bool = False) -> tuple[int, dict[str, object] | None]:
    """qemu-img check --output=json: (exit code, JSON or None when it printed none)."""
    target = ["--image-opts", LUKS_OPTS + str(path)] if luks else ["-f", "qcow2", str(path)]
    argv = ["qemu-img", "check", *(SECRET_ARGS if luks else []), "--output=json", *target]
    # QEMU opens a relative data file name relative to its working directory: run beside the image.
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=path.parent)
    try:
        return r.returncode, json.loads(r.stdout)
    except json.JSONDecodeError:
        return r.returncode, None


# --- catalogue: field for field ---------------------------------------------------------------


def test_catalogue_matches_qemu_img(qemu_images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in qemu_images.items():
        code, want = qemu_check(path, luks=name == "luks")
        monkeypatch.chdir(path.parent)  # as qemu-img, for the relative data file names
        got = check(path)
        assert want is not None, name
        want["filename"] = str(path)  # --image-opts (LUKS) names the file differently
        assert got.to_json() == want, name
        assert got.exit_code == code, name


def test_cli_json_is_qemu_img_byte_for_byte(qemu_images: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("zstd-compressed", "lazy-dirty", "snapshots", "deflate-compressed", "v2-backing"):
        path = qemu_images[name]
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", "--output=json", str(path)],
                           capture_output=True, text=True, cwd=path.parent)
        code = main(["check", "--output=json", str(path)])
        assert capsys.readouterr().out == r.stdout, name
        assert code == r.returncode, name


def test_cli_human_output(qemu_images: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(qemu_images["lazy-dirty"])]) == 2
    out = capsys.readouterr().out
    assert "REFCOUNT-MATCHES-REFERENCES at 0x" in out and "COPIED-IFF-REFCOUNT-1 at 0x" in out
    assert "block/qcow2-refcount.c compare_refcounts" in out
    assert "\n2 errors were found on the image.\n" in out
    path = qemu_images["v3"]
    assert main(["check", str(path)]) == 0
    qemu = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True)
    assert capsys.readouterr().out == qemu.stdout  # a clean image: qemu-img's summary lines exactly


def test_cli_unopenable_file_is_a_check_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "junk.qcow2"
    p.write_bytes(b"not an image" * 100)
    assert main(["check", str(p)]) == 1
    assert "IMAGE-OPENS" in capsys.readouterr().out
    assert qemu_check(p)[0] == 1


@pytest.mark.parametrize("engine", ["model", "impl"])
def test_each_engine_checks_with_the_shared_engine(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One check-and-repair engine (DESIGN.md): each engine's check hands the call to
    spec.check's (loaded on first use, for start-up time), it is not a copy."""
    import spec.check

    seen: list[tuple[str, object]] = []

    def shared(path: str, *, repair: object = None) -> str:
        seen.append((path, repair))
        return "the shared engine's result"

    monkeypatch.setattr(spec.check, "check", shared)
    assert importlib.import_module(engine).check("x.qcow2", repair="leaks") == "the shared engine's result"
    assert seen == [("x.qcow2", "leaks")]


def test_repair_of_a_clean_image_writes_nothing(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "clean.qcow2"
    shutil.copyfile(qemu_images["v3"], dst)
    before = dst.read_bytes()
    # The engine's entry point (model.check and impl.check are this function).
    for mode in ("leaks", "all"):
        r = spec_check(dst, repair=mode)
        assert (r.exit_code, r.corruptions_fixed, r.leaks_fixed) == (0, 0, 0)
    assert main(["check", "-r", "all", str(dst)]) == 0
    assert dst.read_bytes() == before


# --- mutations ----------------------------------------------------------------------------------


class Target:
    """A copy of a valid image, located through the schemas and edited in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.img: ImageFile = open_image(path)
        self.cs = self.img.cluster_size
        self.esize = self.img.geometry.l2_entry_size

    def u64(self, off: int) -> int:
        return int.from_bytes(os.pread(self.img.f.fileno(), 8, off), "big")

    def put(self, off: int, value: int, n: int = 8) -> None:
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), value.to_bytes(n, "big"), off)

    def put_bytes(self, off: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), data, off)

    def u32(self, off: int) -> int:
        return int.from_bytes(os.pread(self.img.f.fileno(), 4, off), "big")

    # locators
    def l1(self, i: int = 0) -> int:
        return int(self.img.header.l1_table_offset) + 8 * i

    def l2_entries(self) -> list[tuple[int, int]]:
        """(host offset of the entry, first word) of every non-zero active L2 entry."""
        out = []
        for i, e in enumerate(self.img.l1_table()):
            l2 = e & en.L1E_OFFSET_MASK
            if not l2:
                continue
            for j in range(self.img.geometry.l2_entries):
                off = l2 + j * self.esize
                v = self.u64(off)
                if v:
                    out.append((off, v))
            del i
        return out

    def entry(self, pred: Callable[[int], bool]) -> tuple[int, int]:
        return next((o, v) for o, v in self.l2_entries() if pred(v))

    def normal(self) -> tuple[int, int]:
        return self.entry(lambda v: not v & en.QCOW_OFLAG_COMPRESSED and bool(v & en.L2E_OFFSET_MASK)
                          and not v & en.QCOW_OFLAG_ZERO)

    def compressed(self) -> tuple[int, int]:
        return self.entry(lambda v: bool(v & en.QCOW_OFLAG_COMPRESSED))

    def reftable(self, i: int = 0) -> int:
        return int(self.img.header.refcount_table_offset) + 8 * i

    def set_refcount(self, cluster: int, value: int) -> None:
        g = self.img.geometry
        rb = self.u64(self.reftable(cluster // g.refcount_block_entries)) & en.REFT_OFFSET_MASK
        idx = cluster % g.refcount_block_entries
        bits = g.refcount_bits
        if bits >= 8:
            self.put(rb + idx * bits // 8, value, bits // 8)
        else:
            byte_off = rb + idx * bits // 8
            old = os.pread(self.img.f.fileno(), 1, byte_off)[0]
            shift = (idx * bits) % 8
            mask = ((1 << bits) - 1) << shift
            self.put(byte_off, (old & ~mask) | (value << shift), 1)

    def grow(self, clusters: int = 1) -> int:
        """Append zeroed clusters; returns the index of the first new one."""
        size = self.path.stat().st_size
        first = -(-size // self.cs)
        os.truncate(self.path, (first + clusters) * self.cs)
        return first

    def snapshot(self, i: int) -> int:
        """Host offset of snapshot table entry ``i``."""
        off = int(self.img.header.snapshots_offset)
        for _ in range(i):
            n = 40 + self.u32(off + 36) + (self.u64(off + 8) >> 16 & 0xFFFF) + (self.u64(off + 8) & 0xFFFF)
            off += n + (-n % 8)
        return off

    def ext_offset(self, ext_type: int) -> int:
        """Host offset of the data of header extension ``ext_type``."""
        off = self.img.header_length
        while True:
            t, n = self.u32(off), self.u32(off + 4)
            if t == ext_type:
                return off + 8
            assert t != 0, "extension not found"
            off += 8 + n + (-n % 8)

    def bitmap_dir(self) -> int:
        return self.u64(self.ext_offset(hd.QCOW2_EXT_MAGIC_BITMAPS) + 16)


def _flag_l1_reserved(t: Target) -> None:
    t.put(t.l1(), t.u64(t.l1()) | 1 << 1)


def _misalign_l1(t: Target) -> None:
    t.put(t.l1(), t.u64(t.l1()) + 512)


def _clear_l1_copied(t: Target) -> None:
    t.put(t.l1(), t.u64(t.l1()) & ~en.QCOW_OFLAG_COPIED)


def _flag_l2_reserved(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v | 1 << 4)


def _misalign_data(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v + 512)


def _clear_l2_copied(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v & ~en.QCOW_OFLAG_COPIED)


def _copied_on_compressed(t: Target) -> None:
    off, v = t.compressed()
    t.put(off, v | en.QCOW_OFLAG_COPIED)


def _bitmap_on_compressed(t: Target) -> None:
    off, _ = t.compressed()
    t.put(off + 8, 1)


def _compressed_with_data_file(t: Target) -> None:
    # With a data file, guest cluster 0 maps to host offset 0 (the entry is just COPIED).
    off, _ = t.entry(lambda v: bool(v & en.QCOW_OFLAG_COPIED))
    t.put(off, en.QCOW_OFLAG_COMPRESSED | 0x10000)


def _alloc_and_zero(t: Target) -> None:
    off, _ = t.normal()
    t.put(off + 8, t.u64(off + 8) | 1 << 32 | 1)


def _alloc_bits_unallocated(t: Target) -> None:
    # An L2 entry of an allocated table that maps nothing gets allocation bits.
    l2 = t.u64(t.l1()) & en.L1E_OFFSET_MASK
    for j in range(t.img.geometry.l2_entries):
        off = l2 + j * t.esize
        if t.u64(off) == 0 and t.u64(off + 8) == 0:
            t.put(off + 8, 1)
            return
    raise AssertionError("no unallocated entry")


def _reftable_reserved(t: Target) -> None:
    t.put(t.reftable(), t.u64(t.reftable()) | 1)


def _misalign_refblock(t: Target) -> None:
    t.put(t.reftable(), t.u64(t.reftable()) + 512)


def _refblock_outside(t: Target) -> None:
    t.put(t.reftable(1), 1 << 40)


def _refblock_twice(t: Target) -> None:
    t.put(t.reftable(1), t.u64(t.reftable()))


def _zero_data_refcount(t: Target) -> None:
    _, v = t.normal()
    t.set_refcount((v & en.L2E_OFFSET_MASK) // t.cs, 0)


def _leak_cluster(t: Target) -> None:
    t.set_refcount(t.grow(), 1)


def _data_twice(t: Target) -> None:
    entries = [(o, v) for o, v in t.l2_entries()
               if v & en.L2E_OFFSET_MASK and not v & en.QCOW_OFLAG_COMPRESSED]
    (_, v0), (o1, _) = entries[0], entries[1]
    t.put(o1, v0)


def _data_on_l1(t: Target) -> None:
    off, _ = t.normal()
    t.put(off, en.QCOW_OFLAG_COPIED | int(t.img.header.l1_table_offset))


def _data_far_away(t: Target) -> None:
    off, _ = t.normal()
    t.put(off, en.QCOW_OFLAG_COPIED | 1 << 55)


def _data_to_fresh_cluster(t: Target) -> None:
    off, _ = t.normal()
    t.put(off, en.QCOW_OFLAG_COPIED | t.grow() * t.cs)


def _snapshot_l1_misaligned(t: Target) -> None:
    s = t.snapshot(0)
    t.put(s, t.u64(s) + 512)


def _snapshot_l1_past_eof(t: Target) -> None:
    t.put(t.snapshot(0), (t.grow(0) + 3) * t.cs)


def _snapshot_l1_unreadable(t: Target) -> None:
    # Aligned, but past what QEMU's block layer addresses (BDRV_MAX_LENGTH): the read fails.
    t.put(t.snapshot(0), (1 << 63) - t.cs)


def _snapshot_l1_huge(t: Target) -> None:
    t.put(t.snapshot(0) + 8, 1 << 23, 4)


def _snapshot_extra_huge(t: Target) -> None:
    t.put(t.snapshot(0) + 36, 2000, 4)


def _snapshot_same_id(t: Target) -> None:
    s0, s1 = t.snapshot(0), t.snapshot(1)
    id0 = os.pread(t.img.f.fileno(), 1, s0 + 40 + t.u32(s0 + 36))
    t.put_bytes(s1 + 40 + t.u32(s1 + 36), id0)


def _bitmap_granularity(t: Target) -> None:
    t.put(t.bitmap_dir() + 17, 40, 1)


def _bitmap_table_reserved(t: Target) -> None:
    table = t.u64(t.bitmap_dir())
    t.put(table, t.u64(table) | 1 << 60)


def _bitmap_in_use(t: Target) -> None:
    d = t.bitmap_dir()
    t.put(d + 12, t.u32(d + 12) | 1, 4)


def _bitmaps_bit_cleared(t: Target) -> None:
    t.put(88, t.u64(88) & ~ft.QCOW2_AUTOCLEAR_BITMAPS)


def _raw_without_data_file(t: Target) -> None:
    t.put(88, t.u64(88) | ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)


def _data_file_bit_without_name(t: Target) -> None:
    t.put(72, t.u64(72) | ft.QCOW2_INCOMPAT_DATA_FILE)


def _header_padding(t: Target) -> None:
    assert t.img.header_length >= 112
    t.put(106, 0x5A, 1)


def _corrupt_bit(t: Target) -> None:
    t.put(72, t.u64(72) | ft.QCOW2_INCOMPAT_CORRUPT)


def _unknown_autoclear(t: Target) -> None:
    t.put(88, t.u64(88) | 1 << 7)


def _zero_flag_v2(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v | en.QCOW_OFLAG_ZERO)


def _zero_flag_extl2(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v | en.QCOW_OFLAG_ZERO)


def _raw_data_moved(t: Target) -> None:
    off, v = t.normal()
    t.put(off, v + 4 * t.cs)


def _crypto_misaligned(t: Target) -> None:
    d = t.ext_offset(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    t.put(d, t.u64(d) + 512)


def _feature_table_type(t: Target) -> None:
    d = t.ext_offset(hd.QCOW2_EXT_MAGIC_FEATURE_TABLE)
    t.put(d, 7, 1)


def _compression_bit_cleared(t: Target) -> None:
    t.put(72, t.u64(72) & ~ft.QCOW2_INCOMPAT_COMPRESSION)


def _bad_magic(t: Target) -> None:
    t.put(0, 0x51464900, 4)


def _drop_backing(t: Target) -> None:
    assert t.img.backing_file
    (t.path.parent / t.img.backing_file).unlink()


def _hide_crypto_header(t: Target) -> None:
    d = t.ext_offset(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    t.put(d - 8, 0x12345678, 4)  # an unknown extension type: the pointer is gone


def _dirty_without_lazy(t: Target) -> None:
    t.put(72, t.u64(72) | ft.QCOW2_INCOMPAT_DIRTY)


def _bitmaps_reserved_ignored(t: Target) -> None:
    _bitmaps_bit_cleared(t)
    t.put(t.ext_offset(hd.QCOW2_EXT_MAGIC_BITMAPS) + 4, 1, 4)


def _data_file_name_without_bit(t: Target) -> None:
    t.put(72, t.u64(72) & ~ft.QCOW2_INCOMPAT_DATA_FILE)
    t.put(88, t.u64(88) & ~ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW)


def _compressed_offset_high(t: Target) -> None:
    off, v = t.compressed()
    t.put(off, v | 1 << 58)


def _duplicate_bitmap_name(t: Target) -> None:
    d = t.bitmap_dir()
    n0 = int.from_bytes(os.pread(t.img.f.fileno(), 2, d + 18), "big")
    name0 = os.pread(t.img.f.fileno(), n0, d + 24)
    second = d + 24 + n0 + (-(24 + n0) % 8)
    assert int.from_bytes(os.pread(t.img.f.fileno(), 2, second + 18), "big") == n0
    t.put_bytes(second + 24, name0)


def _short_header_length(t: Target) -> None:
    # End the extension list right away (the feature name table is optional), so that the
    # list still parses when it starts at byte 108.
    assert t.img.header_length == 112
    t.put_bytes(112, bytes(16))
    t.put(100, 108, 4)


def _add_snapshot(t: Target, extra: bytes) -> None:
    """Give the image a one-entry snapshot table with an empty L1 table, refcounted."""
    k = t.grow()
    entry = (0).to_bytes(8, "big") + (0).to_bytes(4, "big") + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")
    entry += bytes(20) + len(extra).to_bytes(4, "big") + extra + b"1" + b"s"
    t.put_bytes(k * t.cs, entry)
    t.put(60, 1, 4)
    t.put(64, k * t.cs)
    t.set_refcount(k, 1)


def _snapshot_in_data_file_image(t: Target) -> None:
    _add_snapshot(t, bytes(16))


def _snapshot_without_v3_extra(t: Target) -> None:
    _add_snapshot(t, b"")


def _luks_magic(t: Target) -> None:
    d = t.ext_offset(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    t.put_bytes(t.u64(d), b"LUKZ")


def _bitmaps_bit_without_extension(t: Target) -> None:
    t.put(88, t.u64(88) | ft.QCOW2_AUTOCLEAR_BITMAPS)


def _huge_file(t: Target) -> None:
    # More than INT_MAX clusters of 512 bytes, as a sparse file.
    os.truncate(t.path, (1 << 31) * 512 + 512)


@dataclass(frozen=True)
class Mutation:
    rule: str
    base: str
    edit: Callable[[Target], None]


MUTATIONS = [
    Mutation("L1-RESERVED-ZERO", "v3", _flag_l1_reserved),
    Mutation("L1-L2-ALIGNED", "v3", _misalign_l1),
    Mutation("L1-COPIED-IFF-REFCOUNT-1", "v3", _clear_l1_copied),
    Mutation("L2-RESERVED-ZERO", "v3", _flag_l2_reserved),
    Mutation("L2-DATA-ALIGNED", "v3", _misalign_data),
    Mutation("COPIED-IFF-REFCOUNT-1", "v3", _clear_l2_copied),
    Mutation("COMPRESSED-NO-COPIED", "zstd-compressed", _copied_on_compressed),
    Mutation("COMPRESSED-NO-BITMAP", "local:extl2-compressed", _bitmap_on_compressed),
    Mutation("COMPRESSED-NO-DATA-FILE", "local:data-file", _compressed_with_data_file),
    Mutation("SUBCLUSTER-BITMAP-VALID", "extended-l2", _alloc_and_zero),
    Mutation("SUBCLUSTER-BITMAP-VALID", "extended-l2", _alloc_bits_unallocated),
    Mutation("REFTABLE-RESERVED-ZERO", "v3", _reftable_reserved),
    Mutation("REFBLOCK-ALIGNED", "v3", _misalign_refblock),
    Mutation("REFCOUNT-READABLE", "v3", _misalign_refblock),
    Mutation("REFBLOCK-INSIDE-FILE", "cluster-512", _refblock_outside),
    Mutation("REFBLOCK-REFCOUNT-1", "cluster-512", _refblock_twice),
    Mutation("REFCOUNT-MATCHES-REFERENCES", "v3", _zero_data_refcount),
    Mutation("REFCOUNT-MATCHES-REFERENCES", "refcount-bits-4", _data_to_fresh_cluster),
    Mutation("REFCOUNT-NO-LEAK", "v3", _leak_cluster),
    Mutation("REFCOUNT-NO-LEAK", "refcount-bits-2", _leak_cluster),
    Mutation("REFCOUNT-NO-OVERFLOW", "refcount-bits-1", _data_twice),
    Mutation("METADATA-NO-OVERLAP", "v3", _data_on_l1),
    Mutation("REFERENCE-INSIDE-FILE", "v3", _data_far_away),
    Mutation("REFERENCE-INSIDE-FILE", "snapshots", _snapshot_l1_past_eof),
    Mutation("SNAPSHOT-L1-ALIGNED", "snapshots", _snapshot_l1_misaligned),
    Mutation("SNAPSHOT-L1-SIZE", "snapshots", _snapshot_l1_huge),
    Mutation("L1-READABLE", "snapshots", _snapshot_l1_unreadable),
    Mutation("CHECK-COMPLETES", "snapshots", _snapshot_l1_unreadable),
    Mutation("SNAPSHOT-TABLE-READABLE", "snapshots", _snapshot_extra_huge),
    Mutation("SNAPSHOT-ID-UNIQUE", "snapshots", _snapshot_same_id),
    Mutation("BITMAP-DIRECTORY-VALID", "bitmap", _bitmap_granularity),
    Mutation("BITMAP-TABLE-ENTRY-VALID", "bitmap", _bitmap_table_reserved),
    Mutation("BITMAP-NOT-IN-USE", "bitmap", _bitmap_in_use),
    Mutation("FEATURE-BITMAPS-EXTENSION", "bitmap", _bitmaps_bit_cleared),
    Mutation("FEATURE-RAW-NEEDS-DATA-FILE", "v3", _raw_without_data_file),
    Mutation("FEATURE-DATA-FILE-NAME", "v3", _data_file_bit_without_name),
    Mutation("FEATURE-COMPRESSION-TYPE", "zstd-compressed", _compression_bit_cleared),
    Mutation("HEADER-PADDING-ZERO", "v3", _header_padding),
    Mutation("HEADER-NOT-CORRUPT", "v3", _corrupt_bit),
    Mutation("HEADER-UNKNOWN-AUTOCLEAR-ZERO", "v3", _unknown_autoclear),
    Mutation("L2-NO-ZERO-FLAG-V2", "v2-backing", _zero_flag_v2),
    Mutation("EXTL2-ZERO-FLAG-CLEAR", "extended-l2", _zero_flag_extl2),
    Mutation("DATA-FILE-IDENTITY-MAP", "local:data-file-raw", _raw_data_moved),
    Mutation("CRYPTO-HEADER-ALIGNED", "luks", _crypto_misaligned),
    Mutation("EXT-FEATURE-TABLE-WHOLE", "v3", _feature_table_type),
    Mutation("IMAGE-OPENS", "v3", _bad_magic),
    Mutation("IMAGE-SIZE-LIMIT", "local:cluster-512", _huge_file),
    Mutation("BACKING-FILE-OPENS", "v2-backing", _drop_backing),
    Mutation("FEATURE-LUKS-CRYPTO-HEADER", "luks", _hide_crypto_header),
    Mutation("CRYPTO-HEADER-LUKS", "luks", _luks_magic),
    Mutation("FEATURE-BITMAPS-EXTENSION", "v3", _bitmaps_bit_without_extension),
    Mutation("FEATURE-LAZY-DIRTY", "v3", _dirty_without_lazy),
    Mutation("EXT-BITMAPS-RESERVED-ZERO", "bitmap", _bitmaps_reserved_ignored),
    Mutation("DATA-FILE-NAME-NEEDS-BIT", "local:data-file-raw", _data_file_name_without_bit),
    Mutation("COMPRESSED-OFFSET-RESERVED", "local:cluster-512-compressed", _compressed_offset_high),
    Mutation("BITMAP-NAMES-UNIQUE", "bitmap", _duplicate_bitmap_name),
    Mutation("HEADER-LENGTH-ALIGNED", "v3", _short_header_length),
    Mutation("SNAPSHOT-NO-DATA-FILE", "local:data-file", _snapshot_in_data_file_image),
    Mutation("SNAPSHOT-EXTRA-DATA-V3", "v3", _snapshot_without_v3_extra),
]


def _local_base(name: str, d: Path) -> Path:
    """Bases the catalogue lacks, with absolute data file names (QEMU resolves a relative one
    against its working directory)."""
    if name == "extl2-compressed":
        p = create(d / "extl2c.qcow2", "1M", extended_l2=True)
        qemu_io(p, "write -c -P 0x12 0 64k", "write -P 0x13 64k 64k")
    elif name == "data-file":
        p = create(d / "df.qcow2", "1M", data_file=str(d / "df.data"))
        qemu_io(p, "write -P 0x21 0 64k")
    elif name == "data-file-raw":
        p = create(d / "dfr.qcow2", "1M", data_file=str(d / "dfr.data"), data_file_raw=True)
        qemu_io(p, "write -P 0x22 0 64k")
    elif name == "cluster-512-compressed":
        p = create(d / "c512c.qcow2", "64k", cluster_size=512)
        qemu_io(p, "write -c -P 0x24 0 512", "write -P 0x25 512 512")
    elif name == "cluster-512":
        p = create(d / "c512.qcow2", "64k", cluster_size=512)
        qemu_io(p, "write -P 0x23 0 1k")
    else:
        raise AssertionError(name)
    return p


def _verdict(code: int) -> str:
    return {0: "clean", 1: "check-errors", 2: "corruptions", 3: "leaks"}[code]


@pytest.mark.parametrize("mut", MUTATIONS, ids=lambda m: f"{m.rule}-{m.edit.__name__.strip('_')}")
def test_mutation_reports_rule_and_qemu_verdict(mut: Mutation, qemu_images: dict[str, Path],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if mut.base.startswith("local:"):
        src = _local_base(mut.base.split(":", 1)[1], tmp_path)
        dst = src.with_name("mutant.qcow2")
        shutil.copyfile(src, dst)
    else:
        src = qemu_images[mut.base]
        dst = tmp_path / "mutant.qcow2"
        shutil.copyfile(src, dst)
        with open_image(src) as img:
            if img.data_file:
                shutil.copyfile(src.parent / img.data_file, tmp_path / img.data_file)
    with open_image(src) as img:
        if img.backing_file:  # qemu-img check opens the backing chain too
            shutil.copyfile(src.parent / img.backing_file, dst.parent / img.backing_file)
    t = Target(dst)
    try:
        mut.edit(t)
    finally:
        t.img.close()
    monkeypatch.chdir(dst.parent)
    result = check(dst)
    assert mut.rule in {f.rule for f in result.findings}
    qemu_code, want = qemu_check(dst, luks=mut.base == "luks")
    assert _verdict(result.exit_code) == _verdict(qemu_code)
    if want is not None:
        # qemu-img printed a result: every counter and number must be the same.
        want["filename"] = str(dst)
        assert result.to_json() == want
    if RULES_BY_ID[mut.rule].qemu_counts:
        assert result.exit_code != 0


def test_every_counted_rule_with_a_mutation_changes_the_verdict() -> None:
    counted = {m.rule for m in MUTATIONS if RULES_BY_ID[m.rule].qemu_counts}
    assert len({m.rule for m in MUTATIONS}) >= 35
    assert len(counted) >= 25


# --- random campaign (slow) -------------------------------------------------------------------


def _metadata_regions(img: ImageFile) -> list[tuple[int, int]]:
    """(offset, length) of the header and the tables a random flip may hit."""
    h, cs = img.header, img.cluster_size
    regions = [(0, img.header_length + 256), (int(h.l1_table_offset), int(h.l1_size) * 8),
               (int(h.refcount_table_offset), 64)]
    regions += [(e & en.L1E_OFFSET_MASK, cs) for e in img.l1_table() if e & en.L1E_OFFSET_MASK]
    regions += [(e & en.REFT_OFFSET_MASK, min(cs, 4096)) for e in img.refcount_table() if e]
    if h.nb_snapshots:
        regions.append((int(h.snapshots_offset), 256))
        regions += [(int(sn.l1_table_offset), int(sn.l1_size) * 8) for sn in img.snapshot_table()]
    return [r for r in regions if r[1] > 0]


@pytest.mark.slow
def test_random_metadata_flips_agree_with_qemu(qemu_images: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """400 images with 1-3 random bit flips or byte writes in their metadata: the JSON (or,
    when qemu-img prints none, the exit code) is the same as qemu-img check's."""
    rng = random.Random(20261121)
    names = sorted(n for n in qemu_images if not n.startswith("corpus:") and n != "luks")
    disagree = []
    for i in range(400):
        name = rng.choice(names)
        src = qemu_images[name]
        d = tmp_path / str(i)
        d.mkdir()
        dst = d / "m.qcow2"
        shutil.copyfile(src, dst)
        with open_image(src) as img:
            for side in (img.backing_file, img.data_file):
                if side:
                    shutil.copyfile(src.parent / side, d / side)
            regions = _metadata_regions(img)
        with open(dst, "r+b") as f:
            for _ in range(rng.randint(1, 3)):
                off, n = rng.choice(regions)
                pos = off + rng.randrange(n)
                old = os.pread(f.fileno(), 1, pos)
                if old:
                    new = old[0] ^ 1 << rng.randrange(8) if rng.random() < 0.6 else rng.randrange(256)
                    os.pwrite(f.fileno(), bytes([new]), pos)
        monkeypatch.chdir(d)
        ours = check(dst)
        code, want = qemu_check(dst)
        if want is not None:
            want["filename"] = str(dst)
        if ours.exit_code != code or (want is not None and ours.to_json() != want):
            disagree.append((i, name, code, ours.exit_code))
    assert disagree == []
