"""Internal snapshots: create, apply, delete and list, with refcounts and COPIED flags exactly
as QEMU leaves them, including when a refcount overflows half-way."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from spec import features as ft
from spec.errors import FormatError, RequestError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, check_without_name, clean, mask_snapshot_dates, pair
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, raw_content


def test_snapshots_against_qemu(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    engine.create(path, 4 * MiB)
    with engine.open(path) as img:
        img.write(0, b"\x10" * 128 * KiB)
        img.snapshot_create("first")
        img.write(64 * KiB, b"\x20" * 128 * KiB)
        img.snapshot_create("second")
        img.write_zeroes(0, 64 * KiB)
        assert [s["name"] for s in img.snapshots()] == ["first", "second"]
    assert clean(path)
    listed = json.loads(qemu_img("info", "--output=json", str(path)).stdout)["snapshots"]
    assert [s["name"] for s in listed] == ["first", "second"]
    for name in ("first", "second"):
        with engine.open(path, readonly=True, snapshot=name) as img:
            assert img.read(0, img.size) == raw_content(path, snapshot=name)
    first = raw_content(path, snapshot="first")
    with engine.open(path) as img:
        img.snapshot_apply("first")
        img.snapshot_delete("second")
        img.write(3 * MiB, b"after")
    assert clean(path)
    assert raw_content(path)[:3 * MiB] == first[:3 * MiB]
    qemu_img("snapshot", "-d", "first", str(path))
    assert clean(path)


def test_snapshot_operations_are_byte_identical_to_qemu(engine: ModuleType, tmp_path: Path) -> None:
    """Create, apply and delete snapshots through the engine and through qemu-img snapshot,
    with writes in between: after every step both files are the same but for the dates."""
    m = tmp_path / "m.qcow2"
    engine.create(m, 4 * MiB)
    q = qemu_create(tmp_path / "q.qcow2", "4M")
    steps: list[tuple[str, ...]] = [
        ("write", "0", "131072", "16"), ("snap", "-c", "first"), ("write", "65536", "131072", "32"),
        ("zero", "0", "65536"), ("snap", "-c", "second"), ("write", "300000", "5000", "48"),
        ("snap", "-a", "first"), ("write", "70000", "1000", "64"), ("snap", "-d", "second"),
        ("write", "1000000", "70000", "80"), ("snap", "-d", "first")]
    for step in steps:
        with engine.open(m) as img:
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
        assert mask_snapshot_dates(m) == mask_snapshot_dates(q), step
    assert clean(m)


def test_refcount_overflow_in_snapshot_create_is_a_request_error(engine: ModuleType, tmp_path: Path) -> None:
    """refcount_bits=1: a snapshot needs refcount 2 on the data cluster. QEMU's
    update_refcount fails the request (-EINVAL) without flagging corruption and restores what
    it changed; qcow2_snapshot_create leaks its L1 copy. The engine leaves the same file."""
    q = qemu_create(tmp_path / "q.qcow2", 4096, cluster_size=512, refcount_bits=1)
    qemu_io(q, "write -q -c -P 0x0 0 512", "write -q -P 0x0 0 1", "write -q -P 0x0 0 1")
    m = tmp_path / "m.qcow2"
    shutil.copyfile(q, m)
    assert qemu_img("snapshot", "-c", "s0", str(q), check=False).returncode != 0
    with engine.open(m) as img:
        with pytest.raises(RequestError):
            img.snapshot_create("s0")
        assert img.snapshots() == []
        assert img.read(0, 512) == bytes(512)  # not flagged corrupt: requests still served
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    cm, cq = check_without_name(m), check_without_name(q)
    assert cm == cq
    assert cm.get("leaks") == 1 and not cm.get("corruptions")


def test_snapshot_refcount_overflow_keeps_copied_updates_already_made_like_qemu(
        engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_update_snapshot_refcount changes each L2 entry in the cached table as it goes.
    When a later entry's refcount overflows (three compressed clusters packed in one host
    cluster, refcount_bits=2: 3 + 1 > 3) the earlier data cluster keeps its raised refcount
    and its cleared COPIED flag, and QEMU writes that L2 table out. The model once dropped
    the L2 update, leaving COPIED on a cluster with refcount 2: qemu-img check then found a
    corruption in the model's file only."""
    q, m = pair(tmp_path, "", "", 64 * KiB, cluster_size=4096, refcount_bits=2)
    qemu_io(q, "write -q -P 0x1 0 4096", "write -q -c -P 0x0 4096 4096",
            "write -q -c -P 0x0 8192 4096", "write -q -c -P 0x0 12288 4096")
    shutil.copyfile(q, m)
    assert qemu_img("snapshot", "-c", "s1", str(q), check=False).returncode != 0
    with engine.open(m) as img:
        with pytest.raises(RequestError):
            img.snapshot_create("s1")
        assert img.snapshots() == []
        assert img.read(0, 4096) == b"\x01" * 4096
    assert m.read_bytes() == q.read_bytes()
    cm, cq = check_without_name(m), check_without_name(q)
    assert cm == cq
    assert not cm.get("corruptions") and cm.get("leaks")
    # A write to the now shared data cluster copies it, in both.
    qemu_io(q, "write -q -P 0x2 0 512")
    with engine.open(m) as img:
        img.write(0, b"\x02" * 512)
    assert m.read_bytes() == q.read_bytes()


def test_each_open_packs_compressed_data_afresh_after_a_snapshot_like_qemu(
        engine: ModuleType, tmp_path: Path) -> None:
    """``qemu-img snapshot`` runs between two opens, and every open starts its compressed
    packing (qcow2_alloc_bytes' free_byte_offset) afresh. An engine opened the same way
    leaves the same file; the model once packed the next compressed cluster after the old
    offset, inside the snapshot's L1 table, and failed with CorruptionError where QEMU
    succeeded (a difftest seed-0 divergence of the quick profile, here without the tester)."""
    q, m = pair(tmp_path, "", "", 524288, lazy_refcounts=True)
    with engine.open(m) as img:
        img.write_compressed(458752, bytes(65536))
        img.write_zeroes(458752, 65536)
    qemu_io(q, "write -q -c -P 0 458752 65536", "write -q -z 458752 65536")
    with engine.open(m) as img:
        img.snapshot_create("s0")
    qemu_img("snapshot", "-c", "s0", str(q))
    with engine.open(m) as img:
        img.write(134656, b"\x00")
        img.write_compressed(262144, b"\xc4" * 65536)
    qemu_io(q, "write -q -P 0 134656 1", "write -q -c -P 196 262144 65536")
    assert mask_snapshot_dates(m) == mask_snapshot_dates(q)
    assert check_without_name(m) == check_without_name(q)
    assert raw_content(m) == raw_content(q)


@pytest.mark.parametrize("action", ["apply", "delete", "view"])
def test_huge_snapshot_l1_size_is_refused_before_anything_changes(engine: ModuleType, tmp_path: Path,
                                                                   action: str) -> None:
    """qcow2_validate_table runs on a snapshot's L1 table before goto, delete and load_tmp
    change or read anything; qemu-img refuses the same file ("Snapshot L1 table too large")."""
    path = qemu_create(tmp_path / "s.qcow2", MiB)
    qemu_img("snapshot", "-c", "s1", str(path))
    off = open_image(path).header.snapshots_offset
    with path.open("r+b") as f:
        f.seek(off + 8)  # l1_size, after the 8-byte l1_table_offset
        f.write((0x7FFFFFFF).to_bytes(4, "big"))
    before = path.read_bytes()
    with pytest.raises(FormatError):
        if action == "view":
            with engine.open(path, readonly=True, snapshot="s1") as img:
                img.read(0, 512)
        else:
            with engine.open(path) as img:
                getattr(img, f"snapshot_{action}")("s1")
    assert path.read_bytes() == before
    verb = {"apply": "-a", "delete": "-d", "view": "-a"}[action]
    assert qemu_img("snapshot", verb, "s1", str(path), check=False).returncode != 0


def test_snapshot_table_alignment_gaps_keep_a_reused_clusters_bytes_like_qemu(
        engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_write_snapshots writes the entries one by one and never the gaps that align
    them to 8 bytes: a table placed in a freed data cluster keeps the old data there.

    Overwritten compressed clusters are freed without a host discard (QCOW2_DISCARD_NEVER,
    qcow2_alloc_cluster_link_l2), so their host clusters keep their bytes for reuse."""
    q = qemu_create(tmp_path / "q.qcow2", "4M")
    noise = tmp_path / "noise.bin"  # compresses to about 40 KiB: six fill four host clusters
    noise.write_bytes(random.Random(7).randbytes(40000) + bytes(64 * KiB - 40000))
    qemu_io(q, *(f"write -c -s {noise} {i * 64}k 64k" for i in range(6)), "write -P 0xbb 0 384k")
    m = tmp_path / "m.qcow2"
    shutil.copyfile(q, m)
    with engine.open(m) as img:
        for name in ("ab", "cd"):  # 40 + 24 + len("1") + 2 = 67 bytes: a 5-byte gap
            img.snapshot_create(name)
    for name in ("ab", "cd"):
        qemu_img("snapshot", "-c", name, str(q))
    with open_image(q) as qi:
        table = int(qi.header.snapshots_offset)
    assert q.read_bytes()[table + 67:table + 72] != bytes(5)  # the recipe reaches the gap
    assert mask_snapshot_dates(m) == mask_snapshot_dates(q)
