"""Persistent dirty bitmaps kept as QEMU 7.2 keeps them (spec/bitmap_store.py).

Each recipe runs through qemu-io and through the engine on copies of one image, session by
session (one qemu-io process, one open/close of the engine), and the files must come out
byte-identical: the in-use flags written in place at the open, every guest write,
write_zeroes and discard setting the enabled bitmaps' bits, and the close writing new
data clusters (none for an all-zero region), new tables and a new directory, then freeing
the old ones (the data clusters punched). ``qemu-img check`` finds both files clean.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from spec import bitmaps as bm
from spec.errors import CorruptionError, UnsupportedFeature
from spec.header import QCOW2_EXT_MAGIC_BITMAPS
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, check_json
from tests.qemu import qemu_io

Op = tuple[str, int, int, int]
"""(kind, offset, length, pattern): kind "write", "zero", "discard", "resize" (to ``offset``);
"reopen" ends a session."""
REOPEN: Op = ("reopen", 0, 0, 0)


def _image(tmp: Path, size: str, bitmaps: list[list[str]], *, opts: str = "") -> Path:
    src = tmp / "src.qcow2"
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", str(src), size]
    if opts:
        cmd[5:5] = ["-o", opts]
    subprocess.run(cmd, check=True)
    for args in bitmaps:
        subprocess.run(["qemu-img", "bitmap", "--add", *args[1:], str(src), args[0]], check=True)
    return src


def _sessions(ops: list[Op]) -> list[list[Op]]:
    out: list[list[Op]] = [[]]
    for op in ops:
        if op[0] == "reopen":
            out.append([])
        else:
            out[-1].append(op)
    return out


def _qemu_cmd(op: Op) -> str:
    kind, off, n, pat = op
    if kind == "write":
        return f"write -q -P {pat} {off} {n}"
    if kind == "zero":
        return f"write -q -z {off} {n}"
    if kind == "resize":
        return f"truncate {off}"
    return f"discard -q {off} {n}"


def _run(engine: ModuleType, src: Path, tmp: Path, ops: list[Op]) -> tuple[Path, Path]:
    theirs, ours = tmp / "q.qcow2", tmp / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    for session in _sessions(ops):
        qemu_io(theirs, *[_qemu_cmd(op) for op in session] or ["read -q 0 512"])
        with engine.open(ours) as img:
            for kind, off, n, pat in session:
                if kind == "write":
                    img.write(off, bytes([pat]) * n)
                elif kind == "zero":
                    img.write_zeroes(off, n)
                elif kind == "resize":
                    img.resize(off, shrink=True)
                else:
                    img.discard(off, n)
    return theirs, ours


def _same(theirs: Path, ours: Path) -> None:
    a, b = theirs.read_bytes(), ours.read_bytes()
    if a != b:
        first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        pytest.fail(f"files differ: sizes {len(a)} / {len(b)}, first difference at {first:#x}")
    for path in (theirs, ours):
        report = check_json(path)
        assert (report.get("leaks", 0), report.get("corruptions", 0)) == (0, 0), (path, report)


def _entries(path: Path) -> list[tuple[bytes, int, int, list[int]]]:
    img = open_image(path)
    try:
        return [(bytes(e.name), int(e.flags), int(e.granularity_bits), img.bitmap_table(e))
                for e in img.bitmaps]
    finally:
        img.close()


def _poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _dir_offset(path: Path) -> int:
    img = open_image(path)
    try:
        ext = img.extension(QCOW2_EXT_MAGIC_BITMAPS)
        assert ext is not None
        return int(ext.data.bitmap_directory_offset)
    finally:
        img.close()


def test_plain_writes_keep_the_bitmap(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 64 * KiB, 1), ("write", MiB, 4 * KiB, 2)])
    _same(theirs, ours)
    [(name, flags, gbits, table)] = _entries(ours)
    assert (name, flags, gbits) == (b"b0", bm.BME_FLAG_AUTO, 16)  # in_use cleared at close
    assert sum(1 for e in table if e) == 1  # one data cluster: bits 0 and 16


def test_a_disabled_bitmap_is_stored_again_but_gets_no_bits(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0", "--disable"]])
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 64 * KiB, 1)])
    _same(theirs, ours)
    [(_, flags, _, table)] = _entries(ours)
    assert flags == 0 and not any(table)
    assert _entries(src)[0][3] == table  # the same (empty) content, in a new table


@pytest.mark.parametrize("granularity", ["64k", "1M"])
def test_granularity(engine: ModuleType, tmp_path: Path, granularity: str) -> None:
    src = _image(tmp_path, "64M", [["b0", "-g", granularity]])
    theirs, ours = _run(engine, src, tmp_path, [("write", 3 * MiB + 5, 70 * KiB, 7),
                                                ("write", 63 * MiB, 512, 8)])
    _same(theirs, ours)


def test_write_zeroes_and_discard_set_bits_too(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    qemu_io(src, "write -q -P 1 0 1M")
    theirs, ours = _run(engine, src, tmp_path, [("zero", 4 * MiB, 128 * KiB, 0),
                                                ("discard", 0, 64 * KiB, 0),
                                                ("discard", 9 * MiB, 4 * KiB, 0)])
    _same(theirs, ours)


def test_two_bitmaps_and_many_bitmap_clusters(engine: ModuleType, tmp_path: Path) -> None:
    # 4 KiB clusters and 512-byte granularity over 64 MiB: 16 bitmap clusters for b1.
    src = _image(tmp_path, "64M", [["b0"], ["b1", "-g", "512"]], opts="cluster_size=4096")
    qemu_io(src, "write -q -P 1 0 8k")
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 4 * KiB, 2), ("write", 20 * MiB, 4 * KiB, 3),
                                                ("zero", 40 * MiB, 64 * KiB, 0),
                                                ("discard", 63 * MiB, 8 * KiB, 0)])
    _same(theirs, ours)
    assert [sum(1 for e in t if e) for _, _, _, t in _entries(ours)] == [1, 4]


def test_an_in_use_bitmap_from_a_crashed_writer_is_left_as_it_is(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"], ["b1"]])
    qemu_io(src, "write -q -P 1 0 64k")
    # b0's writer crashed: its entry still says in use (flags at byte 12 of the entry).
    _poke(src, _dir_offset(src) + 12, struct.pack(">I", bm.BME_FLAG_IN_USE | bm.BME_FLAG_AUTO))
    before = _entries(src)
    theirs, ours = _run(engine, src, tmp_path, [("write", 2 * MiB, 4 * KiB, 4)])
    _same(theirs, ours)
    after = _entries(ours)
    assert after[0] == before[0]  # b0: the same flags and table
    assert after[1][1] == bm.BME_FLAG_AUTO and after[1][3] != before[1][3]  # b1 rewritten


def test_only_in_use_bitmaps_change_nothing_of_theirs(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    _poke(src, _dir_offset(src) + 12, struct.pack(">I", bm.BME_FLAG_IN_USE | bm.BME_FLAG_AUTO))
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 4 * KiB, 4)])
    _same(theirs, ours)
    assert _entries(ours) == _entries(src)


def test_an_all_ones_table_entry_is_loaded_and_stored_as_data(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    table_offset = open_image(src).bitmaps[0].bitmap_table_offset
    _poke(src, int(table_offset), struct.pack(">Q", 1))  # BME_TABLE_ENTRY_FLAG_ALL_ONES
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 4 * KiB, 4)])
    _same(theirs, ours)
    [(_, _, _, table)] = _entries(ours)
    assert table[0] and ours.read_bytes()[table[0]:table[0] + 128] == b"\xff" * 128


def test_a_read_only_open_leaves_the_file_untouched(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    qemu_io(src, "write -q -P 1 0 64k")
    before = src.read_bytes()
    subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -q 0 64k", str(src)], check=True)
    assert src.read_bytes() == before
    with engine.open(src, readonly=True) as img:
        assert img.read(0, 64 * KiB) == b"\x01" * (64 * KiB)
    assert src.read_bytes() == before


def test_reopen_twice(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"], ["b1", "-g", "1M", "--disable"]])
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 64 * KiB, 1), REOPEN,
                                                ("write", 5 * MiB, 4 * KiB, 2), ("discard", 0, 64 * KiB, 0),
                                                REOPEN, ("zero", 8 * MiB, MiB, 0)])
    _same(theirs, ours)


def test_unknown_autoclear_bits_are_cleared_with_the_bitmaps_kept(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    _poke(src, 88, struct.pack(">Q", 1 | 1 << 5))  # autoclear_features: bitmaps + unknown bit 5
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 4 * KiB, 1)])
    _same(theirs, ours)
    assert struct.unpack_from(">Q", ours.read_bytes(), 88)[0] == 1


@pytest.mark.parametrize("new_size", [128 * MiB, 32 * MiB])
def test_a_resize_resizes_the_bitmaps(engine: ModuleType, tmp_path: Path, new_size: int) -> None:
    # bdrv_dirty_bitmap_truncate: grown bits start clear, a shrink drops the bits past the end.
    src = _image(tmp_path, "64M", [["b0"], ["b1", "-g", "512"]])
    theirs, ours = _run(engine, src, tmp_path, [("write", 0, 64 * KiB, 1), ("write", 40 * MiB, 64 * KiB, 2),
                                                ("resize", new_size, 0, 0), ("write", 20 * MiB, 4 * KiB, 3)])
    _same(theirs, ours)


def test_an_in_use_bitmap_refuses_a_resize(engine: ModuleType, tmp_path: Path) -> None:
    src = _image(tmp_path, "64M", [["b0"]])
    _poke(src, _dir_offset(src) + 12, struct.pack(">I", bm.BME_FLAG_IN_USE | bm.BME_FLAG_AUTO))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "truncate 128M", "-c", "write -q -P 1 0 4k",
                        str(theirs)], capture_output=True, text=True)
    assert "Bitmap 'b0' is inconsistent and cannot be used" in r.stderr  # qcow2_truncate_bitmaps_check
    with engine.open(ours) as img:
        with pytest.raises(UnsupportedFeature, match="inconsistent"):
            img.resize(128 * MiB)
        img.write(0, b"\x01" * (4 * KiB))
    _same(theirs, ours)


def test_a_table_past_the_end_of_the_file_is_freed_as_qemu_frees_it(engine: ModuleType,
                                                                    tmp_path: Path) -> None:
    # The table reads as zeros (an all-zero bitmap). Freeing it at close reaches a cluster
    # no refcount block covers: QEMU's update_refcount hooks up a block there first, in the
    # first free cluster, the old directory's, freed just before; the overlap check must
    # already protect the new directory, not the old one (the impl flagged the image).
    src = _image(tmp_path, "4M", [["b0"]])
    qemu_io(src, "write -q -P 1 0 64k")
    _poke(src, _dir_offset(src), struct.pack(">Q", 1 << 40))  # b0's table offset
    theirs, ours = _run(engine, src, tmp_path, [("write", MiB, 4 * KiB, 2)])
    a, b = theirs.read_bytes(), ours.read_bytes()
    assert a == b
    reftable = int(open_image(theirs).header.refcount_table_offset)
    assert struct.unpack_from(">Q", a, reftable + 8 * ((1 << 40) >> 31))[0]  # the block QEMU hooked up


def test_the_close_checks_no_active_l2_table(engine: ModuleType, tmp_path: Path) -> None:
    # The refcount table moved out of reach (reads as zeros, cannot be written: EFBIG). The
    # write fails hooking up a refcount block; at the close the store's allocation tries again
    # and writes its new self-describing block over the active L2 table before the hook-up
    # fails: qcow2_close freed the L1 table first, so the overlap check skips active L2 tables
    # (qcow2_check_metadata_overlap) and QEMU flags nothing ("Lost persistent bitmaps").
    # Found by the damaged campaign (seed 3, flip-1422@bitmap): both engines flagged the
    # image, and the impl had kept the failed hook-up in its refcount table.
    src = _image(tmp_path, "4M", [], opts="cluster_size=4096")
    qemu_io(src, "write -q -P 0x11 0 64k")
    subprocess.run(["qemu-img", "bitmap", "--add", str(src), "b0"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "128k", str(src), "b1"], check=True)
    qemu_io(src, "write -q -P 0x22 1M 64k")
    _poke(src, 48, struct.pack(">I", 0x7FFFFFFF))  # refcount_table_offset's high half
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 2 351744 4096",
                        "-c", "discard -q 998912 4096", str(theirs)], capture_output=True, text=True)
    assert "write failed: File too large" in r.stderr + r.stdout
    assert "Lost persistent bitmaps" in r.stderr + r.stdout
    with engine.open(ours) as img:
        with pytest.raises(CorruptionError, match="File too large"):
            img.write(351744, b"\x02" * 4096)
        img.discard(998912, 4096)
    assert ours.read_bytes() == theirs.read_bytes()
    assert not struct.unpack_from(">Q", ours.read_bytes(), 72)[0]  # no corrupt bit


def test_the_bitmaps_bit_without_an_extension_refuses_every_checked_write(engine: ModuleType,
                                                                          tmp_path: Path) -> None:
    # QEMU then checks writes against a bitmap directory at (0, 0), whose last byte wraps to
    # 2^64 - 1 (ranges_overlap): the first write is refused and the image flagged. The impl
    # leaves QEMU's bytes; the cacheless model wrote its refcount update and L2 table before
    # the refused write (difftest/damaged/notes.py, metadata-overlap), so it is held to the
    # refusal and the flag.
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True)
    _poke(src, 88, struct.pack(">Q", 1))  # autoclear_features: the bitmaps bit, no extension
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 4k", str(theirs)],
                       capture_output=True, text=True)
    assert "overlaps with bitmap directory" in r.stderr + r.stdout
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with bitmap directory"):
        img.write(0, b"\x01" * (4 * KiB))
    for path in (theirs, ours):
        assert struct.unpack_from(">Q", path.read_bytes(), 72)[0] & 2  # the corrupt bit
    if engine.__name__ == "impl":
        assert ours.read_bytes() == theirs.read_bytes()
