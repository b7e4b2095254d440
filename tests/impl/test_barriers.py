"""Reviewer findings on what impl leaves on the disk at a crash: the lazy-refcounts dirty bit,
and the write barriers (write, then flush) QEMU puts between switching to a new table and
reusing the old one. A crash is a process that exits without closing the image (os._exit
in a fork), or a recorded host-call stream cut short; qemu-io's "abort" is QEMU's."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import impl
from impl import refcount as rc
from spec import features as ft
from tests import qemu
from tests.impl.helpers import incompatible_features

K, M = 1 << 10, 1 << 20


def _crash_after(p: Path, fn: Callable[[Any], None]) -> None:
    """Open ``p``, run ``fn`` on the image, and die without closing it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            img = impl.open(p)
            fn(img)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


LAZY_CASES = {
    "overwrite in place": ("write -P 2 0 512", lambda im: im.write(0, b"\2" * 512)),
    "zero write": ("write -z 128k 64k", lambda im: im.write_zeroes(128 * K, 64 * K)),
    "zero write, unmap": ("write -z -u 0 64k", lambda im: im.write_zeroes(0, 64 * K, unmap=True)),
    "discard": ("discard 0 64k", lambda im: im.discard(0, 64 * K)),
    "compressed write": ("write -c -P 3 128k 64k", lambda im: im.write_compressed(128 * K, b"\3" * 64 * K)),
    "grow": ("truncate 2M", lambda im: im.resize(2 * M)),
    "allocating write": ("write -P 3 256k 4k", lambda im: im.write(256 * K, b"\3" * 4 * K)),
}


@pytest.mark.parametrize("case", list(LAZY_CASES))
def test_lazy_refcounts_dirty_bit_only_where_qemu_sets_it(tmp_path: Path, case: str) -> None:
    """Finding 7: QEMU sets the dirty bit only when new clusters are linked into an L2 table
    (qcow2_alloc_cluster_link_l2 -> qcow2_mark_dirty). impl set it for overwrites, zero
    writes and discards too."""
    qcmd, fn = LAZY_CASES[case]
    q, p = tmp_path / "q.qcow2", tmp_path / "i.qcow2"
    for f in (q, p):
        qemu.create(f, "1M", lazy_refcounts=True)
        qemu.qemu_io(f, "write -P 1 0 64k")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", qcmd, "-c", "abort", str(q)],
                   capture_output=True)
    _crash_after(p, fn)
    dirty = ft.QCOW2_INCOMPAT_DIRTY
    assert incompatible_features(p) & dirty == incompatible_features(q) & dirty
    assert bool(incompatible_features(q) & dirty) == (case == "allocating write")


# --- crash states of one operation -------------------------------------------------------------

def _dangerous(path: Path) -> list[str]:
    """What qemu-img check finds in a crash state that can lose data, as opposed to what a
    crash may leave behind in QEMU too: leaked clusters (a refcount above the references),
    COPIED clear on a cluster with refcount 1, and COPIED on a cluster with refcount > 1
    while the image has no snapshot (the second reference is not visible yet). Anything
    else qemu-img reports as an ERROR is dangerous: a refcount below the references, a
    table pointing at guest data, an image qemu-img cannot open."""
    r = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    nb_snapshots = struct.unpack_from(">I", path.read_bytes()[:64], 60)[0]
    bad = []
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"OFLAG_COPIED.*refcount=(\d+)", line)
        if m and (int(m[1]) == 1 or not nb_snapshots):
            continue
        if "ERROR" in line or line.startswith("qemu-img:") or "check-errors" in line.lower():
            bad.append(line)
    return bad


def _crash_states_are_safe(tmp_path: Path, p: Path, setup: Callable[[Any], None],
                           op: Callable[[Any], None]) -> int:
    """Run ``setup`` and flush, then record the host calls of ``op``; no crash state those
    calls allow (difftest/crash/states.py: every prefix, reorderings inside a flush epoch,
    a torn last write) may be dangerous (``_dangerous``). Returns how many were checked."""
    import random

    from difftest.crash.engines import monitored
    from difftest.crash.states import materialize, states
    from spec.hostio import Recorder, monitoring

    with monitored("impl") as eng:
        img = eng.open(str(p))
        setup(img)
        img.flush()
        base = p.read_bytes()
        rec = Recorder()
        with monitoring(rec):
            op(img)
        img.close()
    stream = [o for o in rec.ops if o.path == str(p)]
    n = 0
    crashed = tmp_path / "crashed.qcow2"
    for state in states(stream, random.Random(1), reorders=8):
        crashed.write_bytes(materialize(base, stream, state, str(p)))
        assert _dangerous(crashed) == [], state.describe(stream)
        n += 1
    return n


def test_snapshot_create_is_crash_safe(tmp_path: Path) -> None:
    """Finding 3: qcow2_snapshot_create raises the refcounts, flushes everything
    (qcow2_update_snapshot_refcount ends in bdrv_flush), writes the active L1 table with
    bdrv_pwrite_sync, and qcow2_write_snapshots flushes before and after writing the new
    table and syncs the header. impl wrote the header before the L2 entries whose COPIED
    flag the snapshot cleared, so a crash left COPIED on clusters with refcount 2."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 4 * M, cluster_size=4096)
    n = _crash_states_are_safe(
        tmp_path, p, lambda im: (im.write(0, b"a" * 64 * K), im.write(2 * M, b"b" * 4 * K)),
        lambda im: im.snapshot_create("s1"))
    assert n > 5


def test_snapshot_apply_is_crash_safe(tmp_path: Path) -> None:
    """Finding 3: qcow2_snapshot_goto raises the refcounts of the snapshot's clusters and
    flushes them before the active L1 table is overwritten (bdrv_pwrite_sync). impl
    overwrote the L1 table while the +1 refcounts were only in its cache.

    QEMU writes the snapshot's L1 table as it read it before the +1 pass, so until the
    last pass (addend 0) fixes the flags the active L1 table may carry COPIED on an L2
    table the snapshot shares. impl writes it with no COPIED flag instead (impl/snapshot.py
    apply), so the COPIED rule holds here too."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 4 * M, cluster_size=4096)

    def setup(im: Any) -> None:
        im.write(0, b"a" * 64 * K)
        im.snapshot_create("s1")
        im.write(0, b"b" * 512)
        im.write(3 * M, b"c" * 4 * K)

    n = _crash_states_are_safe(tmp_path, p, setup, lambda im: im.snapshot_apply("s1"))
    assert n > 5


def test_snapshot_delete_is_crash_safe(tmp_path: Path) -> None:
    p = tmp_path / "i.qcow2"
    impl.create(p, 4 * M, cluster_size=4096)

    def setup(im: Any) -> None:
        im.write(0, b"a" * 64 * K)
        im.snapshot_create("s1")
        im.write(0, b"b" * 8 * K)

    _crash_states_are_safe(tmp_path, p, setup, lambda im: im.snapshot_delete("s1"))


# --- finding 6: barriers where a table moves ---------------------------------------------------

def test_grow_l1_syncs_the_switch_before_the_old_table_is_reused(tmp_path: Path) -> None:
    """qcow2_grow_l1_table writes the new table and the header fields with
    bdrv_pwrite_sync before freeing the old table; the next allocation may put guest data
    in its cluster. impl wrote the header with no flush, so a crash could leave the header
    on the old L1 cluster holding guest data."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 1 * M)

    def op(im: Any) -> None:
        im.resize(1 << 30)
        im.write(64 * K, b"\xff" * 64 * K)  # lands in the old L1 cluster

    _crash_states_are_safe(tmp_path, p, lambda im: im.write(0, b"a" * 512), op)


def test_refcount_table_growth_is_crash_safe(tmp_path: Path) -> None:
    """qcow2_refcount_area: new refcount blocks flushed, the new table and the header
    fields written with bdrv_pwrite_sync, then the old table freed; the next data cluster
    takes its place."""
    p = tmp_path / "i.qcow2"
    # 512-byte clusters and 64-bit refcounts: a block counts 64 clusters and the first
    # table (one cluster) 64 blocks, 2 MiB of file; the table grows near there.
    impl.create(p, 64 * M, cluster_size=512, refcount_bits=64)

    def setup(im: Any) -> None:
        for i in range(0, 1920 * K, 64 * K):
            im.write(i, b"r" * 64 * K)

    def op(im: Any) -> None:
        old = im.s.refcount_table_offset
        pos = 1920 * K
        while im.s.refcount_table_offset == old and pos < 2048 * K:
            # One cluster at a time: the allocation that grows the table is retried after
            # the old table was freed, and takes its cluster for guest data.
            im.write(pos, b"g" * 512)
            pos += 512
        assert im.s.refcount_table_offset != old
        assert rc.get_refcount(im.s, old // 512) == 1

    _crash_states_are_safe(tmp_path, p, setup, op)


def test_l2_allocation_and_shrink_are_crash_safe(tmp_path: Path) -> None:
    """l2_allocate: the table flushed before the L1 entry (qcow2_write_l1_entry,
    bdrv_pwrite_sync); qcow2_shrink_l1_table and qcow2_shrink_reftable sync the cleared
    entries before freeing what they pointed at."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 64 * M, cluster_size=4096)

    def setup(im: Any) -> None:
        for i in range(0, 64 * M, 4 * M):
            im.write(i, b"s" * 512)

    def op(im: Any) -> None:
        im.resize(8 * M, shrink=True)
        im.write(6 * M + 3 * 4096, b"t" * 512)

    _crash_states_are_safe(tmp_path, p, setup, op)


# --- issue 17: the barriers the crash campaign asked for ------------------------------------

def _recorded(p: Path, setup: Callable[[Any], None], op: Callable[[Any], None],
              after: Callable[[Any], Any] = lambda im: None) -> tuple[list[Any], Any]:
    """The host calls changing ``p`` while ``op`` runs (after ``setup`` and a flush), and what
    ``after`` returns from the open image."""
    from difftest.crash.engines import monitored
    from spec.hostio import Recorder, monitoring

    with monitored("impl") as eng:
        img = eng.open(str(p))
        setup(img)
        img.flush()
        rec = Recorder()
        with monitoring(rec):
            op(img)
        got = after(img)
        img.close()
    return [o for o in rec.ops if o.path == str(p)], got


def test_a_cluster_freed_in_this_epoch_is_reused_only_after_its_unmapping_is_durable(
        tmp_path: Path) -> None:
    """QEMU moves free_cluster_index back as soon as a refcount drops to 0 and may write new
    data into that cluster while the L2 entry that still maps it on the disk is only dirty
    in the cache. impl takes the same cluster (the file stays QEMU's) but writes the L2
    cache back and flushes first (State.settle_freed)."""
    from spec.hostio import FLUSH, WRITE

    p = tmp_path / "i.qcow2"
    impl.create(p, 1 * M, cluster_size=4096)
    freed: list[int] = []

    def setup(im: Any) -> None:
        im.write_compressed(0, b"c" * 4096)
        freed.append(im.s.free_byte_offset - im.s.free_byte_offset % 4096)

    def op(im: Any) -> None:
        im.write(0, b"n" * 4096)      # the compressed cluster loses its only reference
        im.write(8192, b"r" * 4096)   # and the allocator hands it out again at once

    stream, l2 = _recorded(p, setup, op, lambda im: im.s.l1_table[0] & ((1 << 56) - 512))
    cl = freed[0]
    reuse = next(i for i, o in enumerate(stream)
                 if o.kind == WRITE and cl <= o.offset < cl + 4096)
    l2_writes = [i for i, o in enumerate(stream[:reuse]) if o.kind == WRITE and o.offset == l2]
    assert l2_writes, "the reused cluster was written before the L2 update that freed it"
    assert any(o.kind == FLUSH for o in stream[l2_writes[-1]:reuse])


def test_the_dirty_bit_is_flushed_before_lazy_metadata(tmp_path: Path) -> None:
    """qcow2_mark_dirty writes the bit with bdrv_pwrite_sync: it is durable before any L2
    entry or refcount block that relies on it."""
    from spec.hostio import FLUSH, WRITE

    p = tmp_path / "i.qcow2"
    impl.create(p, 1 * M, cluster_size=4096, lazy_refcounts=True)
    stream, _ = _recorded(p, lambda im: None,
                          lambda im: (im.write(64 * K, b"b" * 4096), im.flush()))
    header = next(i for i, o in enumerate(stream) if o.kind == WRITE and o.offset == 0)
    assert stream[header + 1].kind == FLUSH


def test_compressed_data_reaches_the_disk_before_its_l2_entry(tmp_path: Path) -> None:
    """The L2 slice holding the compressed descriptor is written after the data and a
    flush, even when setting the refcount dependency writes the slice back first (the
    entry is changed only after that), and with lazy refcounts too (QEMU's compressed
    path sets no dirty bit, so its refcounts must not be lazy)."""
    from spec.hostio import FLUSH, WRITE

    for lazy in (False, True):
        p = tmp_path / f"i{lazy}.qcow2"
        impl.create(p, 1 * M, cluster_size=4096, lazy_refcounts=lazy)
        stream, (l2, rb) = _recorded(
            p, lambda im: im.write_zeroes(0, 8192),
            lambda im: (im.write_compressed(4 * 4096, b"z" * 4096), im.flush()),
            lambda im: (im.s.l1_table[0] & ((1 << 56) - 512), im.s.reftable[0]))
        data = next(i for i, o in enumerate(stream) if o.kind == WRITE and o.offset not in (l2, rb, 0))
        l2w = [i for i, o in enumerate(stream) if o.kind == WRITE and o.offset == l2]
        rbw = [i for i, o in enumerate(stream) if o.kind == WRITE and o.offset == rb]
        assert l2w and l2w[-1] > data and rbw and rbw[-1] < l2w[-1]
        assert any(o.kind == FLUSH for o in stream[data:l2w[-1]])
