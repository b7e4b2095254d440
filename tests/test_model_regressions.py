"""Named regressions and the corners of the model's interface, each checked against QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import model
from model import mapping as mp
from spec import features as ft
from spec.entries import L2E_OFFSET_MASK, compressed_range
from spec.errors import CorruptionError, FormatError, Qcow2Error, RequestError, UnsupportedFeature
from spec.image import open_image
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, raw_content

KiB, MiB = 1024, 1024 * 1024


def _check(path: Path) -> dict[str, object]:
    return json.loads(qemu_img("check", "--output=json", str(path), check=False, cwd=path.parent).stdout)


def _clean(path: Path) -> bool:
    c = _check(path)
    return not (c.get("corruptions") or c.get("leaks") or c.get("check-errors"))


def _base(tmp: Path, size: int = 4 * MiB, pattern: int = 0xAA) -> Path:
    base = qemu_create(tmp / "base.qcow2", size)
    qemu_io(base, f"write -P {pattern} 0 {size}")
    return base


# --- named regressions ------------------------------------------------------------------------

def test_zero_cluster_over_backing_data(tmp_path: Path) -> None:
    _base(tmp_path)
    top = tmp_path / "top.qcow2"
    model.create(top, 4 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with model.open(top) as img:
        img.write_zeroes(64 * KiB, 64 * KiB)
        img.discard(192 * KiB, 64 * KiB)
        assert img.read(64 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(192 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert img.read(0, 16) == b"\xaa" * 16
        extents = img.map()
    assert raw_content(top) == raw_content(tmp_path / "base.qcow2")[:64 * KiB] + bytes(64 * KiB) + (
        b"\xaa" * 64 * KiB) + bytes(64 * KiB) + b"\xaa" * (4 * MiB - 256 * KiB)
    assert {"start": 64 * KiB, "length": 64 * KiB, "depth": 0, "present": True, "zero": True,
            "data": False} in extents
    assert _clean(top)


def test_overlay_longer_than_its_backing_file(tmp_path: Path) -> None:
    _base(tmp_path, size=1 * MiB + 512)
    top = tmp_path / "top.qcow2"
    model.create(top, 3 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with model.open(top) as img:
        # A write whose cluster straddles the backing file's end copies what is below
        # the end and zeros beyond it.
        img.write(MiB + 4 * KiB, b"\x01" * 512)
        data = img.read(0, img.size)
        extents = img.map()
    assert data == raw_content(top)
    assert data[MiB:MiB + 512] == b"\xaa" * 512
    assert data[MiB + 512:MiB + 4 * KiB] == bytes(4 * KiB - 512)
    assert data[2 * MiB:] == bytes(MiB)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert _clean(top)


def test_v2_image_with_header_extensions(tmp_path: Path) -> None:
    """A v2 header is 72 bytes, yet extensions (here the backing format) follow it."""
    _base(tmp_path)
    m = tmp_path / "m.qcow2"
    model.create(m, 4 * MiB, version=2, backing_file="base.qcow2", backing_fmt="qcow2")
    q = qemu_create(tmp_path / "q.qcow2", "4M", backing="base.qcow2", compat="0.10")
    assert m.read_bytes() == q.read_bytes()
    img_file = open_image(m)
    try:
        assert img_file.version == 2 and img_file.backing_format == "qcow2"
    finally:
        img_file.close()
    with model.open(m) as img:
        img.write(100 * KiB, b"\x02" * 3000)
        img.write_zeroes(0, 64 * KiB)  # v2 with backing: written as data
    qemu_io(q, "write -P 2 102400 3000", "write -z 0 65536")
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)


def test_extended_l2_read_spanning_clusters_with_mixed_subclusters(tmp_path: Path) -> None:
    _base(tmp_path, pattern=0xBB)
    top = tmp_path / "top.qcow2"
    model.create(top, 4 * MiB, extended_l2=True, backing_file="base.qcow2", backing_fmt="qcow2")
    with model.open(top) as img:
        img.write(0, b"\x01" * 2 * KiB)             # normal subcluster, partial (COW from backing)
        img.write(6 * KiB, b"\x02" * 4 * KiB)       # two more normal subclusters
        img.write_zeroes(12 * KiB, 2 * KiB)         # zero subcluster in an allocated cluster
        img.write_zeroes(64 * KiB, 8 * KiB)         # zero-plain subclusters in the next cluster
        img.write(90 * KiB, b"\x03" * 1 * KiB)      # normal in the next cluster
        span = img.read(1 * KiB, 100 * KiB)          # crosses the cluster boundary at 64 KiB
        extents = img.map()
    assert span == raw_content(top)[1 * KiB:101 * KiB]
    assert span[:KiB] == b"\x01" * KiB and span[KiB:5 * KiB] == b"\xbb" * 4 * KiB
    assert span[11 * KiB:13 * KiB] == bytes(2 * KiB)
    assert span[63 * KiB:71 * KiB] == bytes(8 * KiB)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert _clean(top)


def test_compressed_data_crossing_a_host_cluster_boundary(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    model.create(path, 4 * MiB, cluster_size=4096)
    rng = __import__("random").Random(7)
    clusters = [bytes(rng.choice(b"abcdefgh") for _ in range(4096)) for _ in range(6)]
    with model.open(path) as img:
        for i, data in enumerate(clusters):
            img.write_compressed(i * 4096, data)
        entries = [mp.get_entry(img.q, i * 4096)[0] for i in range(6)]
    crossing = [e for e in entries
                if (compressed_range(e, 12)[0] % 4096) + compressed_range(e, 12)[1] > 4096]
    assert crossing, "no compressed cluster crosses a host cluster boundary"
    assert raw_content(path)[:6 * 4096] == b"".join(clusters)
    with model.open(path, readonly=True) as img:
        assert img.read(0, 6 * 4096) == b"".join(clusters)
    assert _clean(path)


def test_image_declaring_encryption_is_unsupported(qemu_images: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedFeature) as e:
        model.open(qemu_images["luks"])
    assert e.value.feature == "encryption"


# --- interface corners --------------------------------------------------------------------------

def test_read_only_image_is_never_written(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    src = qemu_images["snapshots"]
    path = tmp_path / "ro.qcow2"
    shutil.copy(src, path)
    before = path.read_bytes()
    st = os.stat(path)
    with model.open(path, readonly=True) as img:
        img.read(0, img.size)
        img.map()
        img.snapshots()
        img.info()
        for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                     lambda: img.discard(0, 65536), lambda: img.write_compressed(0, bytes(65536)),
                     lambda: img.resize(8 * MiB), lambda: img.snapshot_create("x"),
                     lambda: img.snapshot_apply("first"), lambda: img.snapshot_delete("first")):
            with pytest.raises(RequestError):
                call()
    assert path.read_bytes() == before
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_requests_outside_the_image_and_bad_options(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    model.create(path, MiB)
    with pytest.raises(RequestError):
        model.open(path, bogus_option=1)
    with pytest.raises(RequestError):
        model.open(path, snapshot="x")  # snapshots open read-only only
    with model.open(path, l2_cache_size=1 << 20) as img:
        for call in (lambda: img.read(MiB - 1, 2), lambda: img.write(-1, b"x"),
                     lambda: img.write_zeroes(MiB, 1), lambda: img.discard(0, MiB + 1),
                     lambda: img.write_compressed(512, bytes(65536)), lambda: img.resize(1000),
                     lambda: img.resize(512 * KiB), lambda: img.snapshot_apply("nope")):
            with pytest.raises(RequestError):
                call()
    with pytest.raises(RequestError):
        img.read(0, 1)  # closed


@pytest.mark.parametrize("kwargs", [
    {"version": 4}, {"cluster_size": 1000}, {"cluster_size": 256}, {"refcount_bits": 3},
    {"version": 2, "refcount_bits": 8}, {"extended_l2": True, "cluster_size": 4096},
    {"compression_type": "lz4"}, {"version": 2, "lazy_refcounts": True}, {"backing_fmt": "qcow2"},
    {"data_file_raw": True}, {"preallocation": "sparse"},
])
def test_create_refuses_what_qemu_refuses(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(RequestError):
        model.create(tmp_path / "x.qcow2", MiB, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("opts", [
    {}, {"version": 2}, {"cluster_size": 512}, {"cluster_size": 4096, "refcount_bits": 64},
    {"cluster_size": 2 * MiB}, {"extended_l2": True}, {"compression_type": "zstd"},
    {"lazy_refcounts": True}, {"preallocation": "metadata"},
])
def test_create_matches_qemu_img_create(tmp_path: Path, opts: dict[str, Any]) -> None:
    m = tmp_path / "m.qcow2"
    model.create(m, 64 * MiB + 512, **opts)
    qopts = {k: v for k, v in opts.items() if k != "version"}
    if opts.get("version") == 2:
        qopts["compat"] = "0.10"
    q = qemu_create(tmp_path / "q.qcow2", 64 * MiB + 512, **qopts)
    assert m.read_bytes() == q.read_bytes()
    info = json.loads(qemu_img("info", "--output=json", str(m)).stdout)
    assert info["virtual-size"] == 64 * MiB + 512
    assert _clean(m)
    with model.open(m, readonly=True) as img:
        assert img.info()["virtual-size"] == 64 * MiB + 512
        assert img.map() == json.loads(qemu_img("map", "--output=json", str(m)).stdout)


def test_missing_backing_file_fails_at_open(tmp_path: Path) -> None:
    path = tmp_path / "top.qcow2"
    model.create(path, MiB, backing_file="nowhere.qcow2", backing_fmt="qcow2")
    with pytest.raises(FormatError):
        model.open(path)


def test_raw_backing_chain_and_relative_names(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x07" * 300 * KiB)
    mid = tmp_path / "d" / "mid.qcow2"
    model.create(mid, MiB, backing_file="../base.raw", backing_fmt="raw")
    with model.open(mid) as img:
        img.write(128 * KiB, b"\x08" * 1000)
    top = tmp_path / "d" / "top.qcow2"
    model.create(top, 2 * MiB, backing_file="mid.qcow2", backing_fmt="qcow2")
    with model.open(top) as img:
        img.write(0, b"\x09" * 10)
        data = img.read(0, img.size)
        extents = img.map()
    assert data == raw_content(top)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)


def test_lazy_refcounts_dirty_image_is_repaired_on_read_write_open(
        qemu_images: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    shutil.copy(qemu_images["lazy-dirty"], path)
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    content = raw_content(path)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(path, theirs)
    qemu_io(theirs, "read 0 1")  # QEMU repairs a dirty image when it opens it read-write
    with model.open(path) as img:
        assert img.read(0, img.size) == content
    assert not open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert _clean(path)
    assert raw_content(path) == content
    assert path.read_bytes() == theirs.read_bytes()  # same rebuilt refcount structure


def test_lazy_refcounts_set_the_dirty_bit_while_open(tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    model.create(path, MiB, lazy_refcounts=True)
    with model.open(path) as img:
        img.write(0, b"x")
        assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert not open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert _clean(path)


def _set_header_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


def test_feature_bits(tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    model.create(path, MiB)
    _set_header_u64(path, 72, 1 << 40)       # unknown incompatible bit
    with pytest.raises(UnsupportedFeature):
        model.open(path, readonly=True)
    _set_header_u64(path, 72, 0)
    _set_header_u64(path, 88, (1 << 40) | ft.QCOW2_AUTOCLEAR_BITMAPS)  # unknown + bitmaps autoclear
    with model.open(path, readonly=True):
        pass
    assert open_image(path).autoclear_features == (1 << 40) | ft.QCOW2_AUTOCLEAR_BITMAPS
    with model.open(path):
        pass
    assert open_image(path).autoclear_features == 0
    _set_header_u64(path, 80, 1 << 33)        # unknown compatible bit: ignored
    with model.open(path) as img:
        img.write(0, b"ok")
    assert _clean(path)


def test_corruption_found_during_io_sets_the_corrupt_bit(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    model.create(path, MiB)
    with model.open(path) as img:
        img.write(0, b"x" * 512)
        l2 = mp.read_l1(img.q)[0] & L2E_OFFSET_MASK
    with open(path, "r+b") as f:  # point the L2 entry at an unaligned host offset
        f.seek(l2)
        f.write(((1 << 63) | 0x50200).to_bytes(8, "big"))
    with model.open(path) as img:
        with pytest.raises(CorruptionError):
            img.read(0, 512)
        with pytest.raises(CorruptionError):
            img.read(65536, 512)  # the image is out of service once found corrupt
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(RequestError):
        model.open(path)  # QEMU refuses a read-write open of a corrupt image
    with model.open(path, readonly=True) as img:
        assert img.read(65536, 4) == bytes(4)


@pytest.mark.parametrize("damage", ["truncate", "magic", "garbage-l1", "l1-size"])
def test_malformed_files_raise_only_spec_errors(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "d.qcow2"
    model.create(path, 4 * MiB)
    with model.open(path) as img:
        img.write(0, b"y" * 200 * KiB)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:100]
    elif damage == "magic":
        data[0] = 0
    elif damage == "garbage-l1":
        data[3 * 65536:3 * 65536 + 8] = b"\xff" * 8
    else:
        data[36:40] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(Qcow2Error), model.open(path) as img:
        img.read(0, img.size)
        img.write(0, b"z" * 70000)


def test_snapshots_against_qemu(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    model.create(path, 4 * MiB)
    with model.open(path) as img:
        img.write(0, b"\x10" * 128 * KiB)
        img.snapshot_create("first")
        img.write(64 * KiB, b"\x20" * 128 * KiB)
        img.snapshot_create("second")
        img.write_zeroes(0, 64 * KiB)
        assert [s["name"] for s in img.snapshots()] == ["first", "second"]
    assert _clean(path)
    listed = json.loads(qemu_img("info", "--output=json", str(path)).stdout)["snapshots"]
    assert [s["name"] for s in listed] == ["first", "second"]
    for name in ("first", "second"):
        with model.open(path, readonly=True, snapshot=name) as img:
            assert img.read(0, img.size) == raw_content(path, snapshot=name)
    first = raw_content(path, snapshot="first")
    with model.open(path) as img:
        img.snapshot_apply("first")
        img.snapshot_delete("second")
        img.write(3 * MiB, b"after")
    assert _clean(path)
    assert raw_content(path)[:3 * MiB] == first[:3 * MiB]
    qemu_img("snapshot", "-d", "first", str(path))
    assert _clean(path)


def test_resize_grow_and_shrink(tmp_path: Path) -> None:
    m = tmp_path / "m.qcow2"
    q = qemu_create(tmp_path / "q.qcow2", "1M")
    model.create(m, MiB)
    with model.open(m) as img:
        img.write(0, b"a" * 70000)
        img.resize(300 * MiB)
        img.write(200 * MiB, b"b" * 5000)
        assert img.size == 300 * MiB
        img.resize(64 * KiB, shrink=True)
        assert img.read(0, 64 * KiB) == b"a" * 64 * KiB
    qemu_io(q, "write -P 0x61 0 70000")
    qemu_img("resize", str(q), str(300 * MiB))
    qemu_io(q, "write -P 0x62 209715200 5000")
    qemu_img("resize", "--shrink", str(q), str(64 * KiB))
    assert raw_content(m) == raw_content(q)
    assert _clean(m)
    assert m.read_bytes() == q.read_bytes()


def test_data_write_over_metadata_is_refused_and_flags_corruption(tmp_path: Path) -> None:
    """A data cluster that points at the L1 table: QEMU's overlap check refuses the write
    and marks the image corrupt (qcow2_pre_write_overlap_check)."""
    path = tmp_path / "o.qcow2"
    model.create(path, MiB)
    with model.open(path) as img:
        img.write(0, b"x" * 512)
        l1 = mp.read_l1(img.q)
        l2 = l1[0] & L2E_OFFSET_MASK
        l1_offset = int(img.q.header.l1_table_offset)
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(((1 << 63) | l1_offset).to_bytes(8, "big"))
    before = path.read_bytes()[l1_offset:l1_offset + 512]
    with model.open(path) as img, pytest.raises(CorruptionError):
        img.write(0, b"\xff" * 512)
    assert path.read_bytes()[l1_offset:l1_offset + 512] == before
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


def test_check_agrees_with_qemu_img_check(tmp_path: Path) -> None:
    path = tmp_path / "k.qcow2"
    model.create(path, 4 * MiB)
    with model.open(path) as img:
        img.write(0, b"q" * 300 * KiB)
        img.snapshot_create("s")
        img.write(0, b"r" * 100 * KiB)
    ours = model.check(path)
    assert ours.exit_code == 0 and ours.corruptions == 0 and ours.leaks == 0
    theirs = _check(path)
    assert ours.allocated_clusters == theirs["allocated-clusters"]
    assert ours.image_end_offset == theirs["image-end-offset"]
    with open(path, "ab") as f:  # a leaked cluster: refcount 1, referenced by nothing
        f.write(bytes(65536))
    with model.open(path) as img:
        from model import refcounts as rc
        rc.update_refcount(img.q, (path.stat().st_size // 65536 - 1) * 65536, 65536, 1)
    assert model.check(path).leaks == 1 == _check(path)["leaks"]
    fixed = model.check(path, repair="leaks")
    assert fixed.leaks_fixed == 1
    assert _clean(path)


def test_refcount_table_growth_keeps_the_image_valid(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: a refcount block counts 64 clusters and the
    first refcount table 64 blocks, so 3 MiB of data needs new refcount blocks and a new,
    larger refcount table (alloc_refcount_block, qcow2_refcount_area)."""
    path = tmp_path / "g.qcow2"
    model.create(path, 16 * MiB, cluster_size=512, refcount_bits=64)
    q = qemu_create(tmp_path / "q.qcow2", 16 * MiB, cluster_size=512, refcount_bits=64)
    cmds = []
    with model.open(path) as img:
        for off in range(0, 3 * MiB, 40000):
            img.write(off, bytes([off % 251 + 1]) * 40000)
            cmds.append(f"write -P {off % 251 + 1} {off} 40000")
        data = img.read(0, 4 * MiB)
    qemu_io(q, *cmds)
    assert open_image(path).header.refcount_table_clusters > 1
    assert path.read_bytes() == q.read_bytes()  # same refcount blocks, same new table
    assert _clean(path)
    assert raw_content(path)[:4 * MiB] == data


@pytest.mark.parametrize("options", [{"cache": "sometimes"}, {"l2_cache_size": -1},
                                     {"overlap_check": "paranoid"}, {"refcount_cache_size": "big"}])
def test_bad_option_values_are_request_errors(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "o.qcow2"
    model.create(path, MiB)
    with pytest.raises(RequestError):
        model.open(path, **options)


def _mask_snapshot_dates(path: Path) -> bytes:
    """The file with every snapshot's date (bytes 16-23 of its entry) zeroed."""
    data = bytearray(path.read_bytes())
    img = open_image(path)
    try:
        off = img.header.snapshots_offset
        for s in img.snapshot_table():
            data[off + 16:off + 24] = bytes(8)
            n = 40 + s.extra_data_size + s.id_str_size + s.name_size
            off += n + (-n % 8)
    finally:
        img.close()
    return bytes(data)


def test_snapshot_operations_are_byte_identical_to_qemu(tmp_path: Path) -> None:
    """Create, apply and delete snapshots through the model and through qemu-img snapshot,
    with writes in between: after every step both files are the same but for the dates."""
    m = tmp_path / "m.qcow2"
    model.create(m, 4 * MiB)
    q = qemu_create(tmp_path / "q.qcow2", "4M")
    steps: list[tuple[str, ...]] = [
        ("write", "0", "131072", "16"), ("snap", "-c", "first"), ("write", "65536", "131072", "32"),
        ("zero", "0", "65536"), ("snap", "-c", "second"), ("write", "300000", "5000", "48"),
        ("snap", "-a", "first"), ("write", "70000", "1000", "64"), ("snap", "-d", "second"),
        ("write", "1000000", "70000", "80"), ("snap", "-d", "first")]
    for step in steps:
        with model.open(m) as img:
            if step[0] == "write":
                img.write(int(step[1]), bytes([int(step[3])]) * int(step[2]))
                qemu_io(q, f"write -P {step[3]} {step[1]} {step[2]}")
            elif step[0] == "zero":
                img.write_zeroes(int(step[1]), int(step[2]))
                qemu_io(q, f"write -z {step[1]} {step[2]}")
            else:
                op = {"-c": img.snapshot_create, "-a": img.snapshot_apply, "-d": img.snapshot_delete}
                op[step[1]](step[2])
                qemu_img("snapshot", step[1], step[2], str(q))
        assert _mask_snapshot_dates(m) == _mask_snapshot_dates(q), step
    assert _clean(m)


# --- divergences found by the differential tester ----------------------------------------------

def _pair(tmp: Path, backing: str, backing_fmt: str, size: int, **opts: Any) -> tuple[Path, Path]:
    """The same starting image written twice by qemu-img: one for QEMU, one for the model."""
    q = qemu_create(tmp / "q.qcow2", size, backing=backing, backing_fmt=backing_fmt, **opts)
    m = tmp / "m.qcow2"
    shutil.copyfile(q, m)
    return q, m


def _map(path: Path) -> object:
    return json.loads(qemu_img("map", "--output=json", str(path), cwd=path.parent).stdout)


@pytest.mark.parametrize(("old", "new", "opts", "raw_backing"), [
    (MiB + 512, 3 * MiB, {}, False),                  # unaligned head, then zero clusters
    (MiB, 3 * MiB, {}, True),                         # aligned old size, raw backing file
    (MiB + 512, MiB + 1024, {}, False),               # only the head write
    (MiB + 6 * KiB, 3 * MiB + 512, {"cluster_size": 16 * KiB, "extended_l2": True}, False),
    (MiB + 512, 3 * MiB, {"cluster_size": 512}, False),
    (MiB + 512, 8 * MiB, {"cluster_size": 4096}, False),  # the L1 table grows too
])
def test_grow_over_longer_backing_file_reads_zeros_like_qemu(
        tmp_path: Path, old: int, new: int, opts: dict[str, Any], raw_backing: bool) -> None:
    """block/io.c bdrv_co_truncate + block/qcow2.c qcow2_co_truncate (BDRV_REQ_ZERO_WRITE):
    the grown area must not show the backing file's data past the old size."""
    if raw_backing:
        base = tmp_path / "base.raw"
        base.write_bytes(b"\xaa" * 4 * MiB)
        bname, bfmt = "base.raw", "raw"
    else:
        _base(tmp_path)
        bname, bfmt = "base.qcow2", "qcow2"
    q, m = _pair(tmp_path, bname, bfmt, old, **opts)
    qemu_io(q, f"truncate {new}")
    with model.open(m) as img:
        img.resize(new)
        assert img.size == new
        assert img.read(old, new - old) == bytes(new - old)
        assert img.read(0, old) == b"\xaa" * old
    assert m.read_bytes() == q.read_bytes()
    assert _map(m) == _map(q)
    assert raw_content(m) == raw_content(q) == b"\xaa" * old + bytes(new - old)
    assert _clean(m)


def test_grow_over_shorter_backing_file_is_metadata_only(tmp_path: Path) -> None:
    """No zeroing when the backing file ends before the old size (bdrv_co_truncate)."""
    _base(tmp_path)
    q, m = _pair(tmp_path, "base.qcow2", "qcow2", 5 * MiB)
    size_before = m.stat().st_size
    qemu_io(q, f"truncate {6 * MiB}")
    with model.open(m) as img:
        img.resize(6 * MiB)
    assert m.read_bytes() == q.read_bytes()
    assert m.stat().st_size == size_before


def test_v2_grow_over_longer_backing_file_fails_like_qemu(tmp_path: Path) -> None:
    """v2 has no zero flag, so qcow2_subcluster_zeroize refuses (-ENOTSUP) and the truncate
    fails after the L1 table has grown; the size stays the old one."""
    import subprocess

    _base(tmp_path)
    q, m = _pair(tmp_path, "base.qcow2", "qcow2", MiB + 512, compat="0.10")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"truncate {1024 * MiB}", str(q)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    with model.open(m) as img:
        with pytest.raises(UnsupportedFeature):
            img.resize(1024 * MiB)
        assert img.size == MiB + 512
        assert img.read(0, 512) == b"\xaa" * 512
    assert m.read_bytes() == q.read_bytes()
    assert _clean(m)


def test_refcount_overflow_in_snapshot_create_is_a_request_error(tmp_path: Path) -> None:
    """refcount_bits=1: a snapshot needs refcount 2 on the data cluster. QEMU's
    update_refcount fails the request (-EINVAL) without flagging corruption and restores what
    it changed; qcow2_snapshot_create leaks its L1 copy. The model leaves the same file."""
    q = qemu_create(tmp_path / "q.qcow2", 4096, cluster_size=512, refcount_bits=1)
    qemu_io(q, "write -q -c -P 0x0 0 512", "write -q -P 0x0 0 1", "write -q -P 0x0 0 1")
    m = tmp_path / "m.qcow2"
    shutil.copyfile(q, m)
    assert qemu_img("snapshot", "-c", "s0", str(q), check=False).returncode != 0
    with model.open(m) as img:
        with pytest.raises(RequestError):
            img.snapshot_create("s0")
        assert img.snapshots() == []
        assert img.read(0, 512) == bytes(512)  # not flagged corrupt: requests still served
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    cm, cq = _check(m), _check(q)
    cm.pop("filename")
    cq.pop("filename")
    assert cm == cq
    assert cm.get("leaks") == 1 and not cm.get("corruptions")


@pytest.mark.parametrize("version", [2, 3])
def test_create_512_byte_clusters_with_raw_backing_matches_qemu(tmp_path: Path, version: int) -> None:
    """v3 images with clusters of 4 KiB or less carry no feature name table
    (qcow2_update_header), so the header, the backing format and the name fit in 512 bytes."""
    (tmp_path / "base.raw").write_bytes(b"\xb1" * 4096)
    q = qemu_create(tmp_path / "q.qcow2", 4096, backing="base.raw", backing_fmt="raw",
                    cluster_size=512, compat="1.1" if version == 3 else "0.10")
    m = tmp_path / "m.qcow2"
    model.create(m, 4096, version=version, cluster_size=512, backing_file="base.raw", backing_fmt="raw")
    assert m.read_bytes() == q.read_bytes()
    with model.open(m) as img:
        assert img.read(0, 4096) == b"\xb1" * 4096


# --- difftest seed-0 divergences (quick profile): compressed writes vs the process model ------

def _lockstep(tmp: Path, **cfg: Any) -> Any:
    from difftest.config import Config
    from difftest.lockstep import Lockstep

    base = dict(version=3, refcount_bits=16, extended_l2=False, compression_type="zlib",
                backing="none", backing_size="same", data_file=False, data_file_raw=False)
    return Lockstep(tmp, Config(**{**base, **cfg}), ["model", "qemu"])


def test_snapshot_op_resets_compressed_packing_like_qemu_img_snapshot(tmp_path: Path) -> None:
    # qemu's side runs ``qemu-img snapshot`` between two qemu-io opens, so QEMU's
    # free_byte_offset (qcow2_alloc_bytes) starts again after it; the model target is closed
    # and reopened around the operation the same way. Before, the model packed the next
    # compressed cluster after the old offset, inside the snapshot's L1 table, and failed
    # with CorruptionError where QEMU succeeded.
    ls = _lockstep(tmp_path, cluster_size=65536, lazy_refcounts=True, size=524288)
    try:
        ls.write_compressed(off=458752, n=65536, byte=0)
        ls.write_zeroes(off=458752, n=65536, unmap=False)
        ls.snapshot_create(name="s0")
        ls.write(off=134656, n=1, byte=0)
        ls.write_compressed(off=262144, n=65536, byte=196)
        ls.finish()  # map, qemu-img check, rules, qemu-img compare, cross reads
    finally:
        ls.close()
    model_file = (tmp_path / "model" / "top.qcow2").read_bytes()
    qemu_file = (tmp_path / "qemu" / "top.qcow2").read_bytes()
    assert _mask_snapshot_dates(tmp_path / "model" / "top.qcow2") == \
        _mask_snapshot_dates(tmp_path / "qemu" / "top.qcow2")
    assert len(model_file) == len(qemu_file)


def test_lazy_refcount_map_sees_written_refcounts_like_qemu(tmp_path: Path) -> None:
    # With lazy_refcounts QEMU's flush keeps refcount blocks in its cache, so a
    # ``qemu-img map -U`` of the live file saw stale refcounts and decided differently in
    # qcow2_detect_metadata_preallocation (zero=true,data=true vs data only at the tail of a
    # partly written cluster). compare_map now closes and reopens every target first.
    ls = _lockstep(tmp_path, cluster_size=65536, lazy_refcounts=True, size=524288)
    try:
        ls.write_compressed(off=0, n=65536, byte=0)
        ls.flush()
        ls.write(off=262144, n=153382, byte=0)
        ls.write_compressed(off=0, n=65536, byte=0)
        assert ls.compare_map()
        ls.finish()
    finally:
        ls.close()
    assert _map(tmp_path / "model" / "top.qcow2") == _map(tmp_path / "qemu" / "top.qcow2")


def test_compressed_packing_into_reused_cluster_corrupts_like_qemu(tmp_path: Path) -> None:
    # QEMU 7.2 (one qemu-io process) packs a compressed cluster into a host cluster that was
    # freed and reused for data: qemu-img check then reports an OFLAG_COPIED error. The model
    # reproduces it on purpose; the tester counts identical corruption as agreement.
    ls = _lockstep(tmp_path, cluster_size=4096, lazy_refcounts=False, size=32768)
    try:
        ls.write_compressed(off=0, n=4096, byte=0)
        ls.flush()
        ls.write(off=16384, n=1, byte=0)
        ls.write_compressed(off=0, n=4096, byte=0)
        ls.write_zeroes(off=0, n=293, unmap=False)
        ls.write_compressed(off=4096, n=4096, seed=29)
        ls.write_zeroes(off=0, n=4608, unmap=False)
        ls.write(off=4096, n=4095, byte=255)
        ls.write_compressed(off=0, n=4096, seed=7834)
        ls.write_compressed(off=28672, n=4096, seed=168)
        ls.write_compressed(off=4096, n=4096, seed=23213)
        ls.write_compressed(off=12288, n=4096, byte=196)
        ls.finish()
    finally:
        ls.close()
    checks = {name: _check(tmp_path / name / "top.qcow2") for name in ("model", "qemu")}
    for c in checks.values():
        c.pop("filename", None)
    assert checks["qemu"]["corruptions"] == 1
    assert checks["model"] == checks["qemu"]
    assert any(n.startswith("qemu-corrupt") for n in ls.notes)


def test_unaligned_compressed_write_with_data_file_is_unsupported_like_qemu(tmp_path: Path) -> None:
    # qcow2_co_pwritev_compressed_part checks for a data file before the alignment, so a
    # half-cluster compressed write fails with ENOTSUP in QEMU, not EINVAL.
    ls = _lockstep(tmp_path, cluster_size=1024, lazy_refcounts=False, size=8192, data_file=True)
    try:
        ls.write_compressed(off=0, n=1024, byte=0)
        ls.write_compressed(off=0, n=512, byte=0)
        ls.finish()
    finally:
        ls.close()
    img = model.open(str(tmp_path / "model" / "top.qcow2"))
    try:
        with pytest.raises(UnsupportedFeature):
            img.write_compressed(0, bytes(512))
    finally:
        img.close()


# --- difftest divergences, quick profile (issue #3): model vs qemu-io directly ------------------

def _short_raw_base(tmp: Path, size: int, data: int) -> None:
    """A raw backing file of ``size`` bytes whose first ``data`` bytes are 0xb1 and the rest a
    hole (the file is extended with truncate)."""
    base = tmp / "base.raw"
    base.write_bytes(b"\xb1" * data)
    os.truncate(base, size)


@pytest.mark.parametrize(("base_size", "base_data", "cluster_size", "zero_at"), [
    (66048, 66048, 16 * KiB, 66048),   # the seed-0 reproducer: subcluster wholly past the end
    (66048, 66048, 16 * KiB, 66559),   # same subcluster, the 1 byte at its end (head check)
    (5120, 4096, 64 * KiB, 4096),      # subcluster straddles the end: hole, then past the end
    (5120, 4096, 64 * KiB, 6143),      # the same from its last byte
])
def test_partial_subcluster_zeroes_past_short_raw_backing_end_like_qemu(
        tmp_path: Path, base_size: int, base_data: int, cluster_size: int, zero_at: int) -> None:
    """qcow2_co_pwrite_zeroes on a partial subcluster asks is_zero about the rest of it.
    Past the end of a shorter backing file block status answers nothing at that layer (pnum
    0, EOF) and bdrv_co_common_block_status_above turns that into ZERO|ALLOCATED; is_zero
    loops over the answers (zeros of a backing hole, then zeros past the end). The model's
    raw layer answered with a negative length there, so the piece was written as data, and a
    later compressed write to that cluster failed where QEMU's succeeds."""
    _short_raw_base(tmp_path, base_size, base_data)
    q, m = _pair(tmp_path, "base.raw", "raw", 128 * KiB, cluster_size=cluster_size, extended_l2=True)
    cl = zero_at - zero_at % cluster_size
    qemu_io(q, f"write -q -z {zero_at} 1")
    with model.open(m) as img:
        img.write_zeroes(zero_at, 1)
    assert _map(m) == _map(q)
    assert m.read_bytes() == q.read_bytes()
    qemu_io(q, f"write -q -c -P 0x5 {cl} {cluster_size}")
    with model.open(m) as img:
        img.write_compressed(cl, b"\x05" * cluster_size)
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)
    assert _clean(m)


def test_snapshot_refcount_overflow_keeps_copied_updates_already_made_like_qemu(tmp_path: Path) -> None:
    """qcow2_update_snapshot_refcount changes each L2 entry in the cached table as it goes.
    When a later entry's refcount overflows (three compressed clusters packed in one host
    cluster, refcount_bits=2: 3 + 1 > 3) the earlier data cluster keeps its raised refcount
    and its cleared COPIED flag, and QEMU writes that L2 table out. The model used to drop
    the L2 update, leaving COPIED on a cluster with refcount 2: qemu-img check then found a
    corruption in the model's file only."""
    q, m = _pair(tmp_path, "", "", 64 * KiB, cluster_size=4096, refcount_bits=2)
    qemu_io(q, "write -q -P 0x1 0 4096", "write -q -c -P 0x0 4096 4096",
            "write -q -c -P 0x0 8192 4096", "write -q -c -P 0x0 12288 4096")
    shutil.copyfile(q, m)
    assert qemu_img("snapshot", "-c", "s1", str(q), check=False).returncode != 0
    with model.open(m) as img:
        with pytest.raises(RequestError):
            img.snapshot_create("s1")
        assert img.snapshots() == []
        assert img.read(0, 4096) == b"\x01" * 4096
    assert m.read_bytes() == q.read_bytes()
    cm, cq = _check(m), _check(q)
    cm.pop("filename")
    cq.pop("filename")
    assert cm == cq
    assert not cm.get("corruptions") and cm.get("leaks")
    # A write to the now shared data cluster copies it, in both.
    qemu_io(q, "write -q -P 0x2 0 512")
    with model.open(m) as img:
        img.write(0, b"\x02" * 512)
    assert m.read_bytes() == q.read_bytes()


def _qemu_io_fails(path: Path, cmd: str) -> str:
    """Run one qemu-io command that must fail; returns its message."""
    import subprocess

    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path.resolve())],
                       capture_output=True, text=True, cwd=path.parent)
    assert r.returncode != 0
    return r.stdout + r.stderr


def test_empty_compressed_write_pads_the_file_to_a_sector_like_qemu(tmp_path: Path) -> None:
    """qcow2_co_pwritev_compressed_part takes a 0-byte compressed write as the end of a
    compressed stream: it truncates the host file to its length in whole sectors. Packed
    compressed data leaves the file ending mid-sector, so the file grows to the next 512.
    The model refused the request (RequestError) where QEMU succeeds."""
    q, m = _pair(tmp_path, "", "", 64 * KiB, cluster_size=4096)
    data = bytes(range(256)) * 8 + bytes(2048)
    (tmp_path / "c.bin").write_bytes(data)
    qemu_io(q, "write -q -c -s c.bin 4096 4096")
    shutil.copyfile(q, m)
    assert q.stat().st_size % 512  # the compressed bytes end mid-sector
    qemu_io(q, "write -q -c -P 0 8192 0")
    with model.open(m) as img:
        img.write_compressed(8192, b"")
        assert img.read(4096, 4096) == data
    assert q.stat().st_size % 512 == 0
    assert m.read_bytes() == q.read_bytes()
    assert _clean(m)


@pytest.mark.parametrize(("offset", "n", "error"), [
    (0, 0, UnsupportedFeature),     # the data file check comes before the empty-write case
    (0, 512, UnsupportedFeature),
    (1, 512, RequestError),         # qemu-io refuses a write -c that is not sector-aligned
    (512, 100, RequestError),
])
def test_compressed_write_checks_in_qemus_order_with_a_data_file(
        tmp_path: Path, offset: int, n: int, error: type[Qcow2Error]) -> None:
    q, m = _pair(tmp_path, "", "", 8 * KiB, cluster_size=1024, data_file="data.raw")
    msg = _qemu_io_fails(q, f"write -c -P 0 {offset} {n}")
    assert ("not supported" in msg.lower()) == (error is UnsupportedFeature)
    model.create(m, 8 * KiB, cluster_size=1024, data_file=str(tmp_path / "mdata.raw"))
    with model.open(m) as img, pytest.raises(error):
        img.write_compressed(offset, bytes(n))


def _with_undecodable_compressed_cluster(tmp: Path) -> tuple[Path, Path]:
    """Two copies of a 4 KiB-cluster image whose guest cluster 1 is compressed but whose
    compressed bytes are garbage: reading it fails with EIO in QEMU. Its neighbours are
    compressed clusters that decode, so COW regions there are not zero (handle_alloc_space
    would otherwise skip the COW reads)."""
    q, m = _pair(tmp, "", "", 64 * KiB, cluster_size=4096)
    qemu_io(q, "write -q -c -P 0x33 0 4096", "write -q -c -P 0x11 4096 4096",
            "write -q -c -P 0x33 8192 4096")
    with model.open(q, readonly=True) as img:
        coff, csize = compressed_range(mp.get_entry(img.q, 4096)[0], 12)
    with open(q, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * csize)
    shutil.copyfile(q, m)
    return q, m


@pytest.mark.parametrize(("offset", "n", "fails"), [
    (4096, 4096, False),          # the cluster is overwritten whole: no COW, nothing read
    (100, 8192, True),            # COW head and tail, 8 KiB between: one read across it
    (100, 24576, False),          # more than 16 KiB between: two reads, around it
    (4096, 4000, True),           # COW tail inside the cluster itself
])
def test_cow_reads_only_what_perform_cow_reads_like_qemu(
        tmp_path: Path, offset: int, n: int, fails: bool) -> None:
    """perform_cow reads the COW regions of an allocation (nothing when there are none; one
    read spanning the new data when both exist and at most 16 KiB lie between). The model
    read the whole range, so overwriting an undecodable compressed cluster whole failed in
    the model only (seed 6 of the quick profile)."""
    q, m = _with_undecodable_compressed_cluster(tmp_path)
    r = __import__("subprocess").run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x22 {offset} {n}", str(q)],
        capture_output=True, text=True)
    assert ("Input/output error" in r.stdout + r.stderr) == fails
    with model.open(m) as img:
        if fails:
            with pytest.raises(CorruptionError):
                img.write(offset, b"\x22" * n)
        else:
            img.write(offset, b"\x22" * n)
            assert img.read(offset, n) == b"\x22" * n
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


@pytest.mark.parametrize("extended_l2", [False, True])
def test_data_file_raw_grow_preallocates_metadata_like_qemu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extended_l2: bool) -> None:
    """qcow2_co_truncate turns a growing truncate of a data-file-raw image into
    preallocation=metadata (preallocate_co), so the new clusters are linked to their data
    file offsets and a later discard of them makes zero clusters, as for the old ones. The
    model only grew the L1 table (seed 2 of the quick profile: map differed after a discard
    of the grown tail). The data file ends with the last subcluster, whole."""
    size, new = 3 * 64 * KiB + 512, 5 * 64 * KiB + 1024
    sides = {}
    for side in ("q", "m"):
        d = tmp_path / side
        d.mkdir()
        sides[side] = d / "top.qcow2"
    qemu_create(sides["q"], size, cluster_size=64 * KiB, extended_l2=extended_l2,
                data_file="top.data", data_file_raw=True)
    monkeypatch.chdir(tmp_path / "m")  # the data file name is relative to the working directory
    model.create(sides["m"], size, cluster_size=64 * KiB, extended_l2=extended_l2,
                 data_file="top.data", data_file_raw=True)
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    qemu_io(sides["q"], f"truncate {new}", f"discard {new - 1024} 1024")
    with model.open(sides["m"]) as img:
        img.resize(new)
        img.discard(new - 1024, 1024)
        extents = img.map()
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    assert (tmp_path / "m" / "top.data").stat().st_size == (tmp_path / "q" / "top.data").stat().st_size
    q_map = json.loads(qemu_img("map", "--output=json", "top.qcow2", cwd=tmp_path / "q").stdout)
    assert extents == q_map


@pytest.mark.parametrize(("cluster_size", "extended_l2"), [(64 * KiB, True), (16 * KiB, True),
                                                           (64 * KiB, False)])
def test_metadata_preallocation_ends_the_file_at_a_subcluster_like_qemu(
        tmp_path: Path, cluster_size: int, extended_l2: bool) -> None:
    """preallocate_co extends the file to the end of the last allocation, which with
    extended L2 entries is the last subcluster, not the whole cluster."""
    size = 3 * cluster_size + 512
    q = qemu_create(tmp_path / "q.qcow2", size, cluster_size=cluster_size, extended_l2=extended_l2,
                    preallocation="metadata")
    m = tmp_path / "m.qcow2"
    model.create(m, size, cluster_size=cluster_size, extended_l2=extended_l2, preallocation="metadata")
    assert m.read_bytes() == q.read_bytes()


def test_undecodable_backing_cluster_fails_requests_without_flagging_like_qemu(tmp_path: Path) -> None:
    """A compressed cluster of the backing file that does not decode fails reads and COW
    writes of the overlay with EIO; QEMU flags neither image (qcow2_co_preadv_compressed).
    The model flagged the overlay corrupt, because the backing image's CorruptionError
    reached the overlay's guard as if its own tables were bad."""
    base = qemu_create(tmp_path / "base.qcow2", 64 * KiB, cluster_size=4096)
    qemu_io(base, "write -q -c -P 0x11 4096 4096")
    with model.open(base, readonly=True) as img:
        coff, csize = compressed_range(mp.get_entry(img.q, 4096)[0], 12)
    with open(base, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * csize)
    q, m = _pair(tmp_path, "base.qcow2", "qcow2", 64 * KiB, cluster_size=4096)
    msg = _qemu_io_fails(q, "write -P 1 4096 512")
    assert "Input/output error" in msg
    with model.open(m) as img:
        with pytest.raises(CorruptionError):
            img.read(4096, 512)
        with pytest.raises(CorruptionError):
            img.write(4096, b"\x01" * 512)
        assert img.read(0, 512) == bytes(512)  # still serving requests: not flagged
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


@pytest.mark.parametrize(("cluster_size", "size", "zero_at", "zero_n", "new"), [
    (1024, 39424, 38400, 1024, 39936),            # deep seed 110
    (16 * KiB, 607744, 591360, 16 * KiB, 608256),  # deep seed 101
])
def test_data_file_raw_grow_over_a_zero_cluster_makes_it_data_like_qemu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_size: int, size: int,
        zero_at: int, zero_n: int, new: int) -> None:
    """preallocate_co runs qcow2_alloc_host_offset over the grown area. The old last
    cluster, zeroed in place (ZERO flag, still allocated: ZERO_ALLOC), is kept by
    handle_copied, but calculate_l2_meta only skips clusters whose touched subclusters are
    all NORMAL; so it is linked again (offset|COPIED, zero flag gone) and reads as data.
    The model left the zero flag on it."""
    sides = {}
    for side in ("q", "m"):
        (tmp_path / side).mkdir()
        sides[side] = tmp_path / side / "top.qcow2"
    qemu_create(sides["q"], size, cluster_size=cluster_size, data_file="top.data", data_file_raw=True)
    qemu_io(sides["q"], f"write -q -z {zero_at} {zero_n}", f"truncate {new}")
    monkeypatch.chdir(tmp_path / "m")
    model.create(sides["m"], size, cluster_size=cluster_size, data_file="top.data", data_file_raw=True)
    with model.open(sides["m"]) as img:
        img.write_zeroes(zero_at, zero_n)
        img.resize(new)
        extents = img.map()
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    assert (tmp_path / "m" / "top.data").read_bytes() == (tmp_path / "q" / "top.data").read_bytes()
    assert extents == json.loads(qemu_img("map", "--output=json", "top.qcow2", cwd=tmp_path / "q").stdout)


def test_cow_past_the_image_end_is_copied_not_zeroed_like_qemu(tmp_path: Path) -> None:
    """handle_alloc_space asks bdrv_co_is_zero_fast, not is_zero, whether a COW region is
    zero: one block-status answer, no clamp to the image end. A write up to the end of an
    unaligned image over a compressed cluster therefore copies the cluster's tail past the
    end (perform_cow), and growing the image shows it. The model's check clamped the
    region away, took the zeroing shortcut, and showed zeros there (deep seed 222)."""
    q, m = _pair(tmp_path, "", "", 128 * KiB, cluster_size=16 * KiB, extended_l2=True)
    data = bytes(range(256)) * 126  # 32256 bytes: [48 KiB, 81408), the new image end
    (tmp_path / "d.bin").write_bytes(data)
    qemu_io(q, "write -q -c -P 0xc4 65536 16384", "truncate 81408", "write -q -s d.bin 49152 32256",
            "truncate 130560")
    with model.open(m) as img:
        img.write_compressed(65536, b"\xc4" * 16384)
        img.resize(81408, shrink=True)
        img.write(49152, data)
        img.resize(130560)
        assert img.read(81408, 512) == b"\xc4" * 512
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)


def test_clusters_a_write_replaces_are_freed_after_the_whole_request_like_qemu(tmp_path: Path) -> None:
    """qcow2_co_pwritev_part allocates every piece of a request before its write tasks link
    the L2 entries and free the clusters they replace. The model freed the old compressed
    cluster after the first piece, the third piece reused it, and a later compressed write
    packed its bytes into that (now data) cluster: METADATA-NO-OVERLAP broken in the
    model's file only (deep seed 205)."""
    mb2 = 2 * MiB
    q, m = _pair(tmp_path, "", "", 16 * MiB, cluster_size=mb2, refcount_bits=64, extended_l2=True,
                 compression_type="zstd")
    rnd = __import__("random").Random(65536).randbytes(999)
    (tmp_path / "r.bin").write_bytes(rnd)
    qemu_io(q, f"truncate {9 * mb2}", f"write -q -c -P 0x33 {8 * mb2} {mb2}", f"truncate {10 * mb2 + 512}",
            f"write -q -s r.bin {9 * mb2 + 513} 999", f"truncate {11 * mb2 + 512}",
            f"write -q -P 0xff {8 * mb2 + 512} {2 * mb2}", f"write -q -c -P 0x33 {11 * mb2} 512")
    with model.open(m) as img:
        img.resize(9 * mb2)
        img.write_compressed(8 * mb2, b"\x33" * mb2)
        img.resize(10 * mb2 + 512)
        img.write(9 * mb2 + 513, rnd)
        img.resize(11 * mb2 + 512)
        img.write(8 * mb2 + 512, b"\xff" * 2 * mb2)
        img.write_compressed(11 * mb2, b"\x33" * 512)
    assert m.read_bytes() == q.read_bytes()
    assert _clean(m)


@pytest.mark.parametrize(("cache", "fsyncs"), [("writeback", 1), ("none", 1), ("unsafe", 0)])
def test_flush_fsyncs_unless_cache_unsafe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          cache: str, fsyncs: int) -> None:
    """cache="unsafe" is qemu-io -t unsafe (BDRV_O_NO_FLUSH): the difftest runs every target
    in it, so the model's flush must then skip the fsync, and only then."""
    path = tmp_path / "f.qcow2"
    model.create(path, MiB)
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    with model.open(path, cache=cache) as img:
        img.write(0, b"x" * 512)
        img.flush()
    assert len(calls) == fsyncs
    with model.open(path, readonly=True) as img:
        assert img.read(0, 512) == b"x" * 512


@pytest.mark.parametrize("victim", ["l1", "reftable", "refblock", "l2"])
def test_a_data_write_onto_metadata_is_refused_like_qemu(tmp_path: Path, victim: str) -> None:
    """An L2 entry pointing a COPIED data cluster at metadata: the in-place write must be
    refused and the image flagged corrupt (qcow2_pre_write_overlap_check, mode "cached"),
    in the model as in QEMU, and the metadata left as it was."""
    path = tmp_path / "o.qcow2"
    model.create(path, MiB, cluster_size=4096)
    with model.open(path) as img:
        img.write(0, b"a" * 4096)
    hv = open_image(path)
    h, hl = hv.header, hv.header_length
    l1_entry = int.from_bytes(path.read_bytes()[h.l1_table_offset:h.l1_table_offset + 8], "big")
    l2 = l1_entry & L2E_OFFSET_MASK
    refblock = int.from_bytes(path.read_bytes()[h.refcount_table_offset:h.refcount_table_offset + 8], "big")
    # (The header cannot be a victim: host offset 0 in an L2 entry means "unallocated".)
    at = {"l1": h.l1_table_offset, "reftable": h.refcount_table_offset,
          "refblock": refblock, "l2": l2}[victim]
    with path.open("r+b") as f:
        f.seek(l2)
        f.write((at | (1 << 63)).to_bytes(8, "big"))
    q = tmp_path / "q.qcow2"
    shutil.copy(path, q)
    before = path.read_bytes()
    with model.open(path) as img, pytest.raises(CorruptionError, match="overlaps with"):
        img.write(512, b"b" * 512)
    after = path.read_bytes()
    assert after[:hl] != before[:hl]  # the corrupt bit, nothing else
    assert after[hl:] == before[hl:]
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(subprocess.CalledProcessError):
        qemu_io(q, "write -P 98 512 512")
    assert open_image(q).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


def test_is_zero_sees_holes_under_a_backing_file_that_looks_preallocated(tmp_path: Path) -> None:
    """Found by a deep campaign (seed 9158): a backing file with holes inside its refcounted
    clusters (here dug with fallocate -d; the campaign's sparse copies make them) looks
    preallocated to qcow2_detect_metadata_preallocation, so QEMU's block status asks the host
    file about holes for every request of that open, not only for qemu-img map. A partial
    write_zeroes then finds the rest of its subcluster zero and zeroes it instead of writing
    data. The decision is made once per open, at the first block-status query."""
    base = qemu_create(tmp_path / "base.qcow2", 8 * MiB, cluster_size=2 * MiB)
    qemu_io(base, "write -q -P 0xb1 0 64k")
    host = json.loads(qemu_img("map", "--output=json", str(base)).stdout)[0]["offset"]
    # Real holes: the zeros QEMU wrote with FALLOC_FL_ZERO_RANGE are unwritten extents,
    # which SEEK_DATA reports as data once the page cache holds them.
    subprocess.run(["fallocate", "-p", "-o", str(host + 64 * KiB), "-l", str(2 * MiB - 64 * KiB),
                    str(base)], check=True)
    subprocess.run(["fallocate", "-d", str(base)], check=True)
    q = qemu_create(tmp_path / "q.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2",
                    cluster_size=2 * MiB, extended_l2="on")
    qemu_io(q, "write -q -z 196708 65536")
    path = tmp_path / "m.qcow2"
    model.create(path, 8 * MiB, cluster_size=2 * MiB, extended_l2=True, backing_file="base.qcow2",
                 backing_fmt="qcow2")
    with model.open(path) as img:
        img.write_zeroes(196708, 65536)
        assert img.backing.metadata_preallocation is True  # type: ignore[union-attr]
        extents = img.map()
    assert {"start": 196608, "length": 131072, "depth": 0, "present": True, "zero": True,
            "data": False} in extents
    assert path.read_bytes() == q.read_bytes()
    assert _clean(path)
