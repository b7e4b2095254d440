"""Reviewer findings on impl's internal snapshots, each against qemu-img/qemu-io on the same
image: snapshot L1 tables validated before use, the overlap checker's inactive L2 tables
kept current, and the order of writes and flushes that makes create/apply crash-safe."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import impl
from impl.overlap import QCOW2_OL_INACTIVE_L2
from spec.errors import CorruptionError, FormatError, Qcow2Error
from tests import qemu
from tests.impl.helpers import corrupt_bit

K, M = 1 << 10, 1 << 20


def _opts(p: Path, **o: str) -> str:
    return ",".join([f"driver=qcow2,file.filename={p}", *(f"{k}={v}" for k, v in o.items())])


def _qemu_io(p: Path, *cmds: str, opts: dict[str, str] | None = None,
             readonly: bool = False) -> str:
    argv = ["qemu-io", *(["-r"] if readonly else []), "--image-opts"]
    for cmd in cmds:
        argv += ["-c", cmd]
    r = subprocess.run([*argv, _opts(p, **(opts or {}))], capture_output=True, text=True)
    return r.stdout + r.stderr


# --- finding 4: a snapshot's l1_size is bounded before anything is allocated -----------------

@pytest.fixture
def huge_snapshot_l1(tmp_path: Path) -> Path:
    """qemu-img's image with one snapshot whose l1_size says 0x7fffffff entries."""
    p = tmp_path / "base.qcow2"
    qemu.create(p, "1M")
    qemu.qemu_io(p, "write 0 64k")
    qemu.qemu_img("snapshot", "-c", "s1", str(p))
    data = bytearray(p.read_bytes())
    snap_off = struct.unpack_from(">Q", data, 64)[0]
    struct.pack_into(">I", data, snap_off + 8, 0x7FFFFFFF)
    p.write_bytes(data)
    return p


def test_huge_snapshot_l1_size_is_refused_like_qemu(huge_snapshot_l1: Path, tmp_path: Path) -> None:
    """qcow2_snapshot_goto, _delete and _load_tmp validate the snapshot's L1 table first
    (qcow2_validate_table: "Snapshot L1 table too large"); impl once allocated 16 GiB and
    let MemoryError escape. The refused request changes nothing in the file."""
    before = huge_snapshot_l1.read_bytes()
    for args in (["-a", "s1"], ["-d", "s1"]):
        q = tmp_path / "q.qcow2"
        shutil.copyfile(huge_snapshot_l1, q)
        r = qemu.qemu_img("snapshot", *args, str(q), check=False)
        assert r.returncode != 0 and "Snapshot L1 table too large" in r.stderr
    r = qemu.qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", str(huge_snapshot_l1),
                      str(tmp_path / "x.raw"), check=False)
    assert r.returncode != 0 and "Snapshot L1 table too large" in r.stderr

    with pytest.raises(FormatError):
        impl.open(huge_snapshot_l1, readonly=True, snapshot="s1")
    for op in ("snapshot_apply", "snapshot_delete"):
        with impl.open(huge_snapshot_l1) as img:
            with pytest.raises(FormatError):
                getattr(img, op)("s1")
            assert img.read(0, 512) == b"\xcd" * 512
        assert huge_snapshot_l1.read_bytes() == before


def test_huge_snapshot_l1_size_with_overlap_check_all(huge_snapshot_l1: Path, tmp_path: Path) -> None:
    """overlap-check=all reads every snapshot's L1 table to find the inactive L2 tables;
    QEMU validates it there too and fails each write (EFBIG) without flagging the image,
    while reads go on. impl used to read 16 GiB at open."""
    q = tmp_path / "q.qcow2"
    shutil.copyfile(huge_snapshot_l1, q)
    out = _qemu_io(q, "write -P 0x11 64k 64k", "read -P 0xcd 0 512",
                   opts={"overlap-check": "all"})
    assert "write failed" in out and "read 512/512" in out and "verification failed" not in out
    assert not corrupt_bit(q)

    with impl.open(huge_snapshot_l1, overlap_check="all") as img:
        with pytest.raises(Qcow2Error):
            img.write(64 * K, b"\x11" * 64 * K)
        assert img.read(0, 512) == b"\xcd" * 512
    assert not corrupt_bit(huge_snapshot_l1)


# --- finding 2: overlap_check="all" follows the snapshot list ---------------------------------

def test_overlap_check_all_forgets_the_l2_tables_of_a_deleted_snapshot(tmp_path: Path) -> None:
    """An L2 table only a snapshot used is freed with the snapshot and may hold data next;
    QEMU reads the snapshots' L1 tables at each check, so the write is allowed. impl used to
    keep the inactive L2 list from open and refuse the write as an overlap (and flag the
    image corrupt)."""
    p, q = tmp_path / "i.qcow2", tmp_path / "q.qcow2"
    qemu.create(q, "1M")
    qemu.qemu_io(q, "write -P 0x61 0 512")
    qemu.qemu_img("snapshot", "-c", "s1", str(q))
    qemu.qemu_io(q, "write -P 0x62 0 512")  # the active L2 is copied; the old one is s1's only
    shutil.copyfile(q, p)

    qemu.qemu_img("snapshot", "-d", "s1", str(q))
    out = _qemu_io(q, "write -P 0x63 512k 64k", opts={"overlap-check": "all"})
    assert "wrote 65536/65536" in out

    with impl.open(p, overlap_check="all") as img:
        img.snapshot_delete("s1")
        img.write(512 * K, b"\x63" * 64 * K)
        assert img.read(512 * K, 64 * K) == b"\x63" * 64 * K
    assert not corrupt_bit(p)
    assert qemu.qemu_img("check", str(p), check=False).returncode == 0
    assert p.read_bytes() == q.read_bytes()


def test_overlap_check_all_sees_the_l2_tables_of_a_new_snapshot(tmp_path: Path) -> None:
    """The other direction: a snapshot created after open makes its L2 tables inactive
    metadata once the active table moves away from them."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 1 * M)
    with impl.open(p, overlap_check="all") as img:
        img.write(0, b"a" * 512)
        img.snapshot_create("s1")
        img.write(0, b"b" * 512)  # COW of the L2 table: the old one is s1's only
        checker = img.s.overlap
        with pytest.raises(CorruptionError):
            checker.check(0, 1)  # the header; rebuilds the map on the way
        inactive = [c for c, kinds in checker.clusters.items() if kinds & QCOW2_OL_INACTIVE_L2]
        assert len(inactive) == 1
        with pytest.raises(CorruptionError):
            checker.check(inactive[0] * img.cluster_size, 512)
