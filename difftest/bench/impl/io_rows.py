"""The request rows of ``qcow2lab bench impl``: reads that hit the cache, sequential reads,
allocating writes, COW writes, subclusters, the COW operation count and overlap checks.

qemu-img bench has no random mode: it sends ``count`` requests from ``offset`` every
``step`` bytes. Rows compared with it therefore use that same strided pattern on both sides;
a step that is not a multiple of the cluster size (64 KiB + 4 KiB) moves each request to a
different place in its cluster, so COW regions vary as they do for random writes. Rows
compared with os.pread use random offsets (a fixed seed).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import impl
import model
from difftest.bench.impl.common import (
    DirectReader,
    G,
    K,
    M,
    Progress,
    RowResult,
    Workspace,
    alternate,
    median,
    qemu_aio_modes,
    qemu_img_bench,
    qemu_img_create,
    random_offsets,
    timed,
)
from impl import cluster as cl
from spec import hostio
from spec.entries import L2E_OFFSET_MASK
from spec.hostio import FALLOC_FL_ZERO_RANGE, fallocate

READ_IMAGE = 1 * G
READS = 20000
WRITES = 4000
COW_IMAGE = 512 * M
COW_STEP = 64 * K + 4 * K
SUBCLUSTER_STEP = 128 * K + 4 * K
SUBCLUSTER_CACHE = "none"
"""The post measured a disk, not the page cache: with cache="none" the plain image's COW
(read 124 KiB from the backing file, write 128 KiB) costs what it costs on a device."""


def _host_of(img: Any, guest: int) -> int:
    e, _ = cl.get_entry(img.s, guest)
    return (e & L2E_OFFSET_MASK) + guest % img.cluster_size


def _ratio_row(row: str, workload: str, ours: list[float], peer: list[float], unit: str,
               target: float, peer_label: str, **extra: Any) -> RowResult:
    o, p = median(ours), median(peer)
    ratio = o / p if p else float("inf")
    return RowResult(row, workload, o, p, unit, ratio, f">= {target}x", ratio >= target,
                     peer_label=peer_label, figures={"ours_rounds": ours, "peer_rounds": peer},
                     **extra)


# --- reads ------------------------------------------------------------------------------------

def read_hit(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    path = ws.prealloc(READ_IMAGE, 64 * K)
    offs = random_offsets(1, READS, READ_IMAGE, 4 * K)
    fd = os.open(path, os.O_RDONLY)
    with impl.open(path, readonly=True) as img:
        hosts = [_host_of(img, o) for o in offs]  # also loads every slice the reads need

        def ours() -> float:
            r = img.read
            return READS / timed(lambda: [r(o, 4096) for o in offs])

        def peer() -> float:
            p = os.pread
            return READS / timed(lambda: [p(fd, 4096, h) for h in hosts])

        o, p = alternate(rounds, [ours, peer], progress, "read-hit")
        img.reset_stats()
        ours()
        st = img.stats()
    os.close(fd)
    counts = {"requests": READS, "host_reads": st["reads"], "host_read_bytes": st["read_bytes"],
              "l2_misses": st["l2_cache_misses"], "l2_hits": st["l2_cache_hits"]}
    return _ratio_row("read-hit", "random 4 KiB reads, 1 GiB fully allocated, 64 KiB clusters, "
                      "whole L2 cached", o, p, "IOPS", 0.7, "os.pread", counts=counts)


def read_hit_qemu(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    """Against qemu-img bench at queue depth 1, each aio mode with the cache mode it allows
    (aio=native needs cache=none, so impl runs cache="none" for that one comparison); the
    ratio is against QEMU's best mode."""
    path = ws.prealloc(READ_IMAGE, 64 * K)
    n = READ_IMAGE // (64 * K)
    offs = [i * 64 * K for i in range(n)]
    per_mode: dict[str, dict[str, float]] = {}
    for cache in ("writeback", "none"):
        with impl.open(path, readonly=True, cache=cache) as img:
            for o in offs[::512]:
                img.read(o, 4096)  # load every L2 table: the row is about hits

            def ours(img: Any = img) -> float:
                r = img.read
                return n / timed(lambda: [r(o, 4096) for o in offs])

            hosts = [_host_of(img, o) for o in offs]
            floor = median(_pread_floor(path, hosts, direct=cache == "none") for _ in range(rounds))

            for mode in qemu_aio_modes(cache):
                def peer(mode: str = mode, cache: str = cache) -> float:
                    return n / qemu_img_bench(path, count=n, size=4096, step=64 * K, aio=mode,
                                              cache=cache)
                mine, theirs = alternate(rounds, [ours, peer], progress, f"read-hit-qemu {mode}/{cache}")
                per_mode[f"{mode}/{cache}"] = {"impl": median(mine), "qemu": median(theirs),
                                               "ratio": median(mine) / median(theirs),
                                               "os_pread_floor": floor,
                                               "floor_ratio": floor / median(theirs)}
    best = min(per_mode, key=lambda k: per_mode[k]["ratio"])
    b = per_mode[best]
    return RowResult("read-hit-qemu", "4 KiB reads, one per cluster of the 1 GiB image, queue depth 1",
                     b["impl"], b["qemu"], "IOPS", b["ratio"], ">= 2.5x", b["ratio"] >= 2.5,
                     peer_label=f"qemu-img bench {best}", figures={"modes": per_mode},
                     note=f"ratio against QEMU's best aio mode at the same cache mode; bare os.pread "
                          f"of the same host offsets reaches {b['floor_ratio']:.2f}x of it")


def read_seq(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    path = ws.prealloc(READ_IMAGE, 64 * K)
    req = 1 * M
    fd = os.open(path, os.O_RDONLY)
    with impl.open(path, readonly=True) as img:
        extents: list[list[tuple[int, int]]] = []
        for g in range(0, READ_IMAGE, req):
            runs: list[tuple[int, int]] = []
            for c in range(g, g + req, 64 * K):
                h = _host_of(img, c)
                if runs and runs[-1][0] + runs[-1][1] == h:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 64 * K)
                else:
                    runs.append((h, 64 * K))
            extents.append(runs)

        def ours() -> float:
            r = img.read
            return READ_IMAGE / M / timed(lambda: [r(g, req) for g in range(0, READ_IMAGE, req)])

        def peer() -> float:
            p = os.pread
            return READ_IMAGE / M / timed(lambda: [p(fd, n, h) for runs in extents for h, n in runs])

        o, p = alternate(rounds, [ours, peer], progress, "read-seq")
        img.reset_stats()
        ours()
        st = img.stats()
    os.close(fd)
    counts = {"requests": READ_IMAGE // req, "host_reads": st["reads"],
              "host_extents": sum(len(r) for r in extents)}
    return _ratio_row("read-seq", "sequential 1 MiB reads of the 1 GiB image", o, p, "MiB/s", 0.9,
                      "os.pread", counts=counts)


# --- allocating writes --------------------------------------------------------------------------

def _impl_writes(path: Path, count: int, step: int, **options: Any) -> tuple[float, dict[str, int]]:
    """IOPS of ``count`` 4 KiB writes every ``step`` bytes, flush included, and the counts."""
    data = b"a" * 4096
    with impl.open(path, **options) as img:
        w = img.write

        def go() -> None:
            for i in range(count):
                w(i * step, data)
            img.flush()

        t = timed(go)
        st = img.stats()
        if img.backing is not None:
            bst = img.backing.stats()
            st["backing_data_reads"] = bst["data_reads"]
            st["backing_data_read_bytes"] = bst["data_read_bytes"]
    return count / t, st


def _best_qemu(fresh: Any, count: int, step: int, cache: str) -> tuple[float, str]:
    best, best_mode = 0.0, ""
    for mode in qemu_aio_modes(cache):
        iops = count / qemu_img_bench(fresh(), count=count, size=4096, step=step, write=True,
                                      aio=mode, cache=cache, flush_at_end=True)
        if iops > best:
            best, best_mode = iops, mode
    return best, best_mode


def write_alloc(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    def fresh() -> Path:
        return qemu_img_create(ws.path("alloc.qcow2"), 1 * G)

    modes: list[str] = []

    def ours() -> float:
        return _impl_writes(fresh(), WRITES, 64 * K)[0]

    def peer() -> float:
        iops, mode = _best_qemu(fresh, WRITES, 64 * K, "writeback")
        modes.append(mode)
        return iops

    o, p = alternate(rounds, [ours, peer], progress, "write-alloc")
    floor = median(_alloc_floor(ws.path("floor.bin"), WRITES) for _ in range(rounds))
    _, st = _impl_writes(fresh(), WRITES, 64 * K)
    counts = {"requests": WRITES, "data_writes": st["data_writes"], "data_reads": st["data_reads"],
              "fallocates": st["fallocates"], "meta_writes": st["meta_writes"], "flushes": st["flushes"]}
    r = _ratio_row("write-alloc", "4 KiB writes each allocating a cluster, empty 64 KiB-cluster "
                      "image, cache=writeback, flush at the end", o, p, "IOPS", 1.5,
                      f"qemu-img bench -w (best aio: {','.join(sorted(set(modes)))})", counts=counts)
    r.figures["syscall_floor_iops"] = floor
    r.note = (f"impl's host calls alone (fallocate + pwrite per request, one fdatasync), from "
              f"Python with no engine: {floor:,.0f} IOPS = {floor / median(p):.2f}x QEMU")
    return r


def _pread_floor(path: Path, hosts: list[int], *, direct: bool) -> float:
    """IOPS of bare os.pread (or O_DIRECT preadv) of 4 KiB at ``hosts``: no engine at all."""
    if direct:
        r = DirectReader(path, 4096)

        def go() -> None:
            for h in hosts:
                r.read(h, 4096)

        t = timed(go)
        r.close()
        return len(hosts) / t
    fd = os.open(path, os.O_RDONLY)
    p = os.pread
    t = timed(lambda: [p(fd, 4096, h) for h in hosts])
    os.close(fd)
    return len(hosts) / t


def _alloc_floor(path: Path, count: int) -> float:
    """IOPS of the host calls impl makes for an allocating 4 KiB write (zero the new
    cluster with fallocate, write the data), issued from Python with nothing else."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    data = b"a" * 4096

    def go() -> None:
        for i in range(1, count + 1):
            fallocate(fd, FALLOC_FL_ZERO_RANGE, i * 64 * K, 64 * K)
            os.pwrite(fd, data, i * 64 * K)
        os.fdatasync(fd)

    t = timed(go)
    os.close(fd)
    os.unlink(path)
    return count / t


def _overlay(ws: Workspace, name: str, cluster_size: int, extended_l2: bool = False,
             size: int = COW_IMAGE) -> Path:
    return qemu_img_create(ws.path(name), size, cluster_size=cluster_size,
                           extended_l2=extended_l2, backing=ws.backing(size))


def write_cow(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    count = WRITES

    def fresh() -> Path:
        return _overlay(ws, "cow.qcow2", 64 * K)

    modes: list[str] = []

    def ours() -> float:
        return _impl_writes(fresh(), count, COW_STEP)[0]

    def peer() -> float:
        iops, mode = _best_qemu(fresh, count, COW_STEP, "writeback")
        modes.append(mode)
        return iops

    o, p = alternate(rounds, [ours, peer], progress, "write-cow")
    _, st = _impl_writes(fresh(), count, COW_STEP)
    counts = {"requests": count, "data_writes": st["data_writes"], "data_write_bytes": st["data_write_bytes"],
              "backing_data_reads": st["backing_data_reads"],
              "backing_data_read_bytes": st["backing_data_read_bytes"], "meta_writes": st["meta_writes"]}
    floor = median(_cow_floor(ws, count, st) for _ in range(rounds))
    r = _ratio_row("write-cow", "4 KiB writes over a fully written backing file, empty 64 KiB-cluster "
                   "overlay, cache=writeback, flush at the end", o, p, "IOPS", 1.0,
                   f"qemu-img bench -w (best aio: {','.join(sorted(set(modes)))})", counts=counts)
    r.figures["syscall_floor_iops"] = floor
    r.note = (f"impl's host calls alone (a read of the COW regions from the backing file, one "
              f"vectored write per request, one fdatasync), from Python with no engine: "
              f"{floor:,.0f} IOPS = {floor / median(p):.2f}x QEMU")
    return r


def _cow_floor(ws: Workspace, count: int, st: dict[str, Any]) -> float:
    """IOPS of the host calls impl makes for write-cow, sized from its counts: per request
    one buffered read of the backing file's data and one pwritev (COW and data) into a new
    file, then one fdatasync."""
    rbytes = st["backing_data_read_bytes"] // count
    data = b"a" * (st["data_write_bytes"] // count - rbytes)  # the guest data, 4 KiB
    backing = ws.backing(COW_IMAGE)
    rfd = os.open(backing, os.O_RDONLY)
    path = ws.path("cow-floor.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    size = os.fstat(rfd).st_size - rbytes - 64 * K

    def go() -> None:
        for i in range(count):
            cow = os.pread(rfd, rbytes, 64 * K + (i * COW_STEP) % size)
            os.pwritev(fd, [cow[:rbytes // 2], data, cow[rbytes // 2:]], i * 64 * K)
        os.fdatasync(fd)

    try:
        return count / timed(go)
    finally:
        os.close(rfd)
        os.close(fd)
        os.unlink(path)


def subclusters(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    count = WRITES // 2
    stats: dict[bool, dict[str, int]] = {}

    def side(ext: bool) -> float:
        path = _overlay(ws, f"sub-{ext}.qcow2", 128 * K, extended_l2=ext)
        iops, st = _impl_writes(path, count, SUBCLUSTER_STEP, cache=SUBCLUSTER_CACHE)
        stats[ext] = st
        return iops

    o, p = alternate(rounds, [lambda: side(True), lambda: side(False)], progress, "subclusters")
    counts = {f"{'ext' if ext else 'plain'}_{k}": stats[ext][k] for ext in (True, False)
              for k in ("data_write_bytes", "data_writes", "backing_data_reads", "backing_data_read_bytes")}
    progress("subclusters disk limit")
    limit = median(_subcluster_limit(ws, count, stats) for _ in range(rounds))
    r = _ratio_row("subclusters", f"write-cow on 128 KiB clusters, cache={SUBCLUSTER_CACHE}, "
                   "extended_l2=on against off", o, p, "IOPS", 10.0, "impl, extended_l2=off",
                   ours_label="impl, extended_l2=on", counts=counts)
    r.figures["disk_limit_ratio"] = limit
    r.note = (f"the disk's limit: the same host I/O replayed with O_DIRECT and no engine gives "
              f"{limit:.2f}x (impl reaches {r.ratio / limit:.2f} of it)")
    return r


def _subcluster_limit(ws: Workspace, count: int, stats: dict[bool, dict[str, int]]) -> float:
    """The ratio the disk allows between the two sides of the subclusters row: each side's
    counted host I/O per request (stats), replayed with O_DIRECT from Python with no engine,
    ``count`` requests each. Extended L2: one write of the data into a new cluster; plain:
    one read of the COW regions from the backing file's data, then one write of the cluster."""
    def per_request(st: dict[str, int], key: str) -> int:
        return -(-st[key] // count // 4096) * 4096  # O_DIRECT wants whole 4 KiB blocks

    def side(st: dict[str, int], name: str) -> float:
        wbytes, rbytes = per_request(st, "data_write_bytes"), per_request(st, "backing_data_read_bytes")
        backing = ws.backing(COW_IMAGE)
        span = 128 * K
        reader = DirectReader(backing, max(rbytes, 4096))
        path = ws.path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        buf = mmap.mmap(-1, wbytes)
        buf.write(b"a" * wbytes)
        size = os.fstat(reader.fd).st_size

        def go() -> None:
            for i in range(count):
                if rbytes:
                    # Somewhere in the backing file's data (its first 64 KiB is the header).
                    reader.read((64 * K + i * span) % (size - rbytes - 64 * K) // 4096 * 4096 + 64 * K,
                                rbytes)
                os.pwritev(fd, [buf], i * span)

        try:
            return timed(go)
        finally:
            buf.close()
            os.close(fd)
            reader.close()
            os.unlink(path)

    return side(stats[False], "limit-plain.bin") / side(stats[True], "limit-ext.bin")


# --- counted COW --------------------------------------------------------------------------------

COW_OPS_WRITES = 64
COW_OPS_IMAGE = 8 * M
"""Counts do not depend on the size: a small backing file keeps the row (and its test) quick."""


class _Counter:
    def __init__(self) -> None:
        self.ops: dict[str, int] = {}

    def host_op(self, op: hostio.HostOp) -> None:
        self.ops[op.kind] = self.ops.get(op.kind, 0) + 1


def cow_ops_counts(ws: Workspace) -> dict[str, float]:
    """Host requests per allocating COW write (one L2 table already there), impl from its
    own stats (image and backing), the model from the host-I/O hook: per write, on average."""
    offs = [64 * K + i * COW_STEP for i in range(COW_OPS_WRITES)]
    data = b"c" * 4096
    top = _overlay(ws, "ops-impl.qcow2", 64 * K, size=COW_OPS_IMAGE)
    with impl.open(top) as img:
        img.write(0, data)
        img.reset_stats()
        for o in offs:
            img.write(o, data)
        st, bst = img.stats(), img.backing.stats()
    out = {"impl_reads": (st["reads"] + bst["reads"]) / COW_OPS_WRITES,
           "impl_writes": st["writes"] / COW_OPS_WRITES,
           "impl_fallocates": st["fallocates"] / COW_OPS_WRITES}
    top = _overlay(ws, "ops-model.qcow2", 64 * K, size=COW_OPS_IMAGE)
    with model.open(top) as mimg:
        mimg.write(0, data)
        c = _Counter()
        with hostio.monitoring(c):
            for o in offs:
                mimg.write(o, data)
    out["model_reads"] = c.ops.get(hostio.READ, 0) / COW_OPS_WRITES
    out["model_writes"] = c.ops.get(hostio.WRITE, 0) / COW_OPS_WRITES
    out["model_flushes"] = c.ops.get(hostio.FLUSH, 0) / COW_OPS_WRITES
    return out


def cow_ops(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    progress("cow-ops counting")
    c = cow_ops_counts(ws)
    ours = c["impl_reads"] + c["impl_writes"]
    peer = c["model_reads"] + c["model_writes"]
    ok = c["impl_reads"] <= 1 and c["impl_writes"] <= 1
    return RowResult("cow-ops", "4 KiB allocating writes over a backing file (COW head and tail)",
                     ours, peer, "host I/O per write", ours / peer if peer else 0.0,
                     "<= 1 read + 1 write", ok, peer_label="model (naive COW)", counts=c,
                     note="counted, not timed: impl's stats(), the model through spec.hostio")


def overlap(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    def fresh() -> Path:
        return qemu_img_create(ws.path("overlap.qcow2"), 1 * G)

    def side(mode: str) -> float:
        return _impl_writes(fresh(), WRITES, 64 * K, overlap_check=mode)[0]

    # The check costs about 1 us of a 25-30 us request (cProfile), while single rounds of
    # 4,000 writes and a flush spread by +-20% here: three times the rounds (at least 15, a
    # few seconds) so the median reflects the check and not the round that met a busy disk.
    modes = [lambda: side("cached"), lambda: side("none"), lambda: side("all")]
    c, n, a = alternate(max(3 * rounds, 15), modes, progress, "overlap")
    r = _ratio_row("overlap", "4 KiB allocating writes, empty image", c, n, "IOPS", 0.9,
                   "overlap_check=none", ours_label="overlap_check=cached")
    r.figures["all"] = median(a)
    r.figures["all_ratio"] = median(a) / median(n)
    return r
