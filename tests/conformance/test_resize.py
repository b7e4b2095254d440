"""resize(): growing and shrinking as ``qemu-img resize`` and qemu-io's truncate do, over
longer and shorter backing files, on v2 images, and with a raw external data file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spec.errors import UnsupportedFeature
from tests.conformance.helpers import KiB, MiB, base, clean, pair, qemu_map
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, raw_content


def test_resize_grow_and_shrink(engine: ModuleType, tmp_path: Path) -> None:
    m = tmp_path / "m.qcow2"
    q = qemu_create(tmp_path / "q.qcow2", "1M")
    engine.create(m, MiB)
    with engine.open(m) as img:
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
    assert clean(m)
    assert m.read_bytes() == q.read_bytes()


@pytest.mark.parametrize(("old", "new", "opts", "raw_backing"), [
    (MiB + 512, 3 * MiB, {}, False),                  # unaligned head, then zero clusters
    (MiB, 3 * MiB, {}, True),                         # aligned old size, raw backing file
    (MiB + 512, MiB + 1024, {}, False),               # only the head write
    (MiB + 6 * KiB, 3 * MiB + 512, {"cluster_size": 16 * KiB, "extended_l2": True}, False),
    (MiB + 512, 3 * MiB, {"cluster_size": 512}, False),
    (MiB + 512, 8 * MiB, {"cluster_size": 4096}, False),  # the L1 table grows too
])
def test_grow_over_longer_backing_file_reads_zeros_like_qemu(
        engine: ModuleType, tmp_path: Path, old: int, new: int, opts: dict[str, Any],
        raw_backing: bool) -> None:
    """block/io.c bdrv_co_truncate + block/qcow2.c qcow2_co_truncate (BDRV_REQ_ZERO_WRITE):
    the grown area must not show the backing file's data past the old size."""
    if raw_backing:
        b = tmp_path / "base.raw"
        b.write_bytes(b"\xaa" * 4 * MiB)
        bname, bfmt = "base.raw", "raw"
    else:
        base(tmp_path)
        bname, bfmt = "base.qcow2", "qcow2"
    q, m = pair(tmp_path, bname, bfmt, old, **opts)
    qemu_io(q, f"truncate {new}")
    with engine.open(m) as img:
        img.resize(new)
        assert img.size == new
        assert img.read(old, new - old) == bytes(new - old)
        assert img.read(0, old) == b"\xaa" * old
    assert m.read_bytes() == q.read_bytes()
    assert qemu_map(m) == qemu_map(q)
    assert raw_content(m) == raw_content(q) == b"\xaa" * old + bytes(new - old)
    assert clean(m)


def test_grow_over_shorter_backing_file_is_metadata_only(engine: ModuleType, tmp_path: Path) -> None:
    """No zeroing when the backing file ends before the old size (bdrv_co_truncate)."""
    base(tmp_path)
    q, m = pair(tmp_path, "base.qcow2", "qcow2", 5 * MiB)
    size_before = m.stat().st_size
    qemu_io(q, f"truncate {6 * MiB}")
    with engine.open(m) as img:
        img.resize(6 * MiB)
    assert m.read_bytes() == q.read_bytes()
    assert m.stat().st_size == size_before


def test_v2_grow_over_longer_backing_file_fails_like_qemu(engine: ModuleType, tmp_path: Path) -> None:
    """v2 has no zero flag, so qcow2_subcluster_zeroize refuses (-ENOTSUP) and the truncate
    fails after the L1 table has grown; the size stays the old one."""
    base(tmp_path)
    q, m = pair(tmp_path, "base.qcow2", "qcow2", MiB + 512, compat="0.10")
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"truncate {1024 * MiB}", str(q)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    with engine.open(m) as img:
        with pytest.raises(UnsupportedFeature):
            img.resize(1024 * MiB)
        assert img.size == MiB + 512
        assert img.read(0, 512) == b"\xaa" * 512
    assert m.read_bytes() == q.read_bytes()
    assert clean(m)


@pytest.mark.parametrize("extended_l2", [False, True])
def test_data_file_raw_grow_preallocates_metadata_like_qemu(
        engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extended_l2: bool) -> None:
    """qcow2_co_truncate turns a growing truncate of a data-file-raw image into
    preallocation=metadata (preallocate_co), so the new clusters are linked to their data
    file offsets and a later discard of them makes zero clusters, as for the old ones. The
    model once only grew the L1 table (seed 2 of the quick profile: map differed after a
    discard of the grown tail). The data file ends with the last subcluster, whole."""
    size, new = 3 * 64 * KiB + 512, 5 * 64 * KiB + 1024
    sides = {}
    for side in ("q", "m"):
        d = tmp_path / side
        d.mkdir()
        sides[side] = d / "top.qcow2"
    qemu_create(sides["q"], size, cluster_size=64 * KiB, extended_l2=extended_l2,
                data_file="top.data", data_file_raw=True)
    monkeypatch.chdir(tmp_path / "m")  # the data file name is relative to the working directory
    engine.create(sides["m"], size, cluster_size=64 * KiB, extended_l2=extended_l2,
                  data_file="top.data", data_file_raw=True)
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    qemu_io(sides["q"], f"truncate {new}", f"discard {new - 1024} 1024")
    with engine.open(sides["m"]) as img:
        img.resize(new)
        img.discard(new - 1024, 1024)
        extents = img.map()
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    assert (tmp_path / "m" / "top.data").stat().st_size == (tmp_path / "q" / "top.data").stat().st_size
    q_map = json.loads(qemu_img("map", "--output=json", "top.qcow2", cwd=tmp_path / "q").stdout)
    assert extents == q_map


@pytest.mark.parametrize(("cluster_size", "size", "zero_at", "zero_n", "new"), [
    (1024, 39424, 38400, 1024, 39936),            # deep seed 110
    (16 * KiB, 607744, 591360, 16 * KiB, 608256),  # deep seed 101
])
def test_data_file_raw_grow_over_a_zero_cluster_makes_it_data_like_qemu(
        engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_size: int, size: int,
        zero_at: int, zero_n: int, new: int) -> None:
    """preallocate_co runs qcow2_alloc_host_offset over the grown area. The old last
    cluster, zeroed in place (ZERO flag, still allocated: ZERO_ALLOC), is kept by
    handle_copied, but calculate_l2_meta only skips clusters whose touched subclusters are
    all NORMAL; so it is linked again (offset|COPIED, zero flag gone) and reads as data.
    The model once left the zero flag on it."""
    sides = {}
    for side in ("q", "m"):
        (tmp_path / side).mkdir()
        sides[side] = tmp_path / side / "top.qcow2"
    qemu_create(sides["q"], size, cluster_size=cluster_size, data_file="top.data", data_file_raw=True)
    qemu_io(sides["q"], f"write -q -z {zero_at} {zero_n}", f"truncate {new}")
    monkeypatch.chdir(tmp_path / "m")
    engine.create(sides["m"], size, cluster_size=cluster_size, data_file="top.data", data_file_raw=True)
    with engine.open(sides["m"]) as img:
        img.write_zeroes(zero_at, zero_n)
        img.resize(new)
        extents = img.map()
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    assert (tmp_path / "m" / "top.data").read_bytes() == (tmp_path / "q" / "top.data").read_bytes()
    assert extents == json.loads(qemu_img("map", "--output=json", "top.qcow2", cwd=tmp_path / "q").stdout)


@pytest.mark.parametrize(("size", "steps"), [
    (2109952, [(2105856, True), (2106368, False)]),  # deep seed 90004: grown inside its linked cluster
    (2109952, [(2105344, True), (2106368, False)]),  # grown into a new cluster
    (2105344, [(2106368, False)]),
    (2105856, [(2106368, False)]),
])
def test_data_file_raw_grow_ends_the_data_file_where_qemu_does(
        engine: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        steps: list[tuple[int, bool]]) -> None:
    """preallocate_co grows the data file to host_offset + bytes of its last
    qcow2_alloc_host_offset: over new clusters QEMU 7.2's file ends with the whole last
    cluster, but a grow that stays inside the last cluster, still linked after a shrink cut
    the data file at the old size, ends it exactly at the new size. The engines once rounded
    that up to the cluster too (file sizes 2109440 against QEMU's 2106368)."""
    sides = {}
    for side in ("q", "m"):
        (tmp_path / side).mkdir()
        sides[side] = tmp_path / side / "top.qcow2"
    qemu_create(sides["q"], size, cluster_size=4 * KiB, data_file="top.data", data_file_raw=True)
    qemu_io(sides["q"], *(f"truncate {new}" for new, _ in steps))
    monkeypatch.chdir(tmp_path / "m")
    engine.create(sides["m"], size, cluster_size=4 * KiB, data_file="top.data", data_file_raw=True)
    with engine.open(sides["m"]) as img:
        for new, shrink in steps:
            img.resize(new, shrink=shrink)
    assert sides["m"].read_bytes() == sides["q"].read_bytes()
    assert (tmp_path / "m" / "top.data").read_bytes() == (tmp_path / "q" / "top.data").read_bytes()
