"""write_zeroes and discard: the zero flag, deallocation, and zeroing over a backing file
(QEMU's is_zero questions about the rest of a partial subcluster)."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.conformance.helpers import (
    KiB,
    MiB,
    backing_with_holes_in_refcounted_clusters,
    base,
    clean,
    pair,
    qemu_map,
)
from tests.qemu import create as qemu_create
from tests.qemu import qemu_io, raw_content


def test_zero_cluster_over_backing_data(engine: ModuleType, tmp_path: Path) -> None:
    base(tmp_path)
    top = tmp_path / "top.qcow2"
    engine.create(top, 4 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with engine.open(top) as img:
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
    assert clean(top)


def _short_raw_base(tmp: Path, size: int, data: int) -> None:
    """A raw backing file of ``size`` bytes whose first ``data`` bytes are 0xb1 and the rest a
    hole (the file is extended with truncate)."""
    b = tmp / "base.raw"
    b.write_bytes(b"\xb1" * data)
    os.truncate(b, size)


@pytest.mark.parametrize(("base_size", "base_data", "cluster_size", "zero_at"), [
    (66048, 66048, 16 * KiB, 66048),   # the seed-0 reproducer: subcluster wholly past the end
    (66048, 66048, 16 * KiB, 66559),   # same subcluster, the 1 byte at its end (head check)
    (5120, 4096, 64 * KiB, 4096),      # subcluster straddles the end: hole, then past the end
    (5120, 4096, 64 * KiB, 6143),      # the same from its last byte
])
def test_partial_subcluster_zeroes_past_short_raw_backing_end_like_qemu(
        engine: ModuleType, tmp_path: Path, base_size: int, base_data: int, cluster_size: int,
        zero_at: int) -> None:
    """qcow2_co_pwrite_zeroes on a partial subcluster asks is_zero about the rest of it.
    Past the end of a shorter backing file block status answers nothing at that layer (pnum
    0, EOF) and bdrv_co_common_block_status_above turns that into ZERO|ALLOCATED; is_zero
    loops over the answers (zeros of a backing hole, then zeros past the end). The model's
    raw layer once answered with a negative length there, so the piece was written as data,
    and a later compressed write to that cluster failed where QEMU's succeeds."""
    _short_raw_base(tmp_path, base_size, base_data)
    q, m = pair(tmp_path, "base.raw", "raw", 128 * KiB, cluster_size=cluster_size, extended_l2=True)
    cl = zero_at - zero_at % cluster_size
    qemu_io(q, f"write -q -z {zero_at} 1")
    with engine.open(m) as img:
        img.write_zeroes(zero_at, 1)
    assert qemu_map(m) == qemu_map(q)
    assert m.read_bytes() == q.read_bytes()
    qemu_io(q, f"write -q -c -P 0x5 {cl} {cluster_size}")
    with engine.open(m) as img:
        img.write_compressed(cl, b"\x05" * cluster_size)
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)
    assert clean(m)


def test_zeroes_refused_at_a_compressed_tail_leave_freed_clusters_unpunched(
        engine: ModuleType, tmp_path: Path) -> None:
    """Deep campaign seed 20062: an unmapping zero write whose whole clusters come first and
    whose tail ends inside a compressed cluster. The driver frees the whole clusters, then
    refuses the tail (-ENOTSUP), and QEMU drops the discards it held, so a freed cluster keeps
    its bytes in the file; the block layer then writes the whole piece as zero data. The
    engines once punched the freed cluster out, so the files differed in that cluster."""
    b = tmp_path / "base.raw"
    b.write_bytes(b"\x33" * 128 * KiB)
    q, m = pair(tmp_path, "base.raw", "raw", 128 * KiB, cluster_size=16 * KiB, extended_l2=True)
    data = bytes(range(256)) * 64 + b"\xb2"
    (tmp_path / "data").write_bytes(data)
    qemu_io(q, f"write -q -s {tmp_path / 'data'} 48k {len(data)}", "write -q -c -P 0 96k 16k",
            "write -q -z -u 65025 48640")
    with engine.open(m) as img:
        img.write(48 * KiB, data)
        img.write_compressed(96 * KiB, bytes(16 * KiB))
        img.write_zeroes(65025, 48640, unmap=True)
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)
    assert clean(m)


def test_is_zero_sees_holes_under_a_backing_file_that_looks_preallocated(
        engine: ModuleType, tmp_path: Path) -> None:
    """Found by a deep campaign (seed 9158): a backing file with holes inside its refcounted
    clusters (here dug with fallocate -d; the campaign's sparse copies make them) looks
    preallocated to qcow2_detect_metadata_preallocation, so QEMU's block status asks the host
    file about holes for every request of that open, not only for qemu-img map. A partial
    write_zeroes then finds the rest of its subcluster zero and zeroes it instead of writing
    data. The decision is made once per open, at the first block-status query."""
    backing_with_holes_in_refcounted_clusters(tmp_path)
    q = qemu_create(tmp_path / "q.qcow2", 8 * MiB, backing="base.qcow2", backing_fmt="qcow2",
                    cluster_size=2 * MiB, extended_l2="on")
    qemu_io(q, "write -q -z 196708 65536")
    path = tmp_path / "m.qcow2"
    engine.create(path, 8 * MiB, cluster_size=2 * MiB, extended_l2=True, backing_file="base.qcow2",
                  backing_fmt="qcow2")
    with engine.open(path) as img:
        img.write_zeroes(196708, 65536)
        extents = img.map()
    assert {"start": 196608, "length": 131072, "depth": 0, "present": True, "zero": True,
            "data": False} in extents
    assert path.read_bytes() == q.read_bytes()
    assert clean(path)
