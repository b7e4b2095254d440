"""Rebuilding the refcount structure from computed refcounts (block/qcow2-refcount.c,
rebuild_refcount_structure, rebuild_refcounts_write_refblocks, alloc_clusters_imrt), and
the stored refcounts a repair compares them with.

New refcount blocks and a new refcount table are placed in clusters the computed refcounts
(QEMU's in-memory refcount table, "imrt") leave free, exactly where QEMU places them; the old
structure is leaked, and the caller frees it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from spec import refblocks as rb
from spec.geometry import align_up
from spec.qfile import Qcow2File


def stored_refcounts(q: Qcow2File, limit: int | None = None) -> dict[int, int]:
    """Every non-zero refcount the refcount blocks hold, each block read once; with
    ``limit``, only the blocks covering clusters below it (compare_refcounts looks at the
    clusters of the file and no further)."""
    g = q.geometry
    entries, bits = g.refcount_block_entries, g.refcount_bits
    table = rb.read_reftable(q)
    out: dict[int, int] = {}
    count = len(table) if limit is None else min(len(table), -(-limit // entries))
    for i in range(count):
        block = rb.refblock_offset(q, table, i)
        if not block:
            continue
        data = q.pread(block, q.cluster_size)
        if not any(data):
            continue
        for j in range(entries):
            v = rb.refcount_get(data, j, bits)
            if v and (limit is None or i * entries + j < limit):
                out[i * entries + j] = v
    return out


def _alloc_imrt(imrt: list[int], count: int, first_free: list[int]) -> int:
    """alloc_clusters_imrt: ``count`` contiguous free clusters in the in-memory refcount
    array from ``first_free[0]`` on, growing the array past the end if needed; they get
    refcount 1. Returns the first cluster index."""
    cluster = first_free[0]
    found = 0
    first_gap = True
    while cluster < len(imrt) and found < count:
        if not imrt[cluster]:
            found += 1
            if first_gap:
                first_free[0] = cluster
                first_gap = False
        else:
            found = 0
        cluster += 1
    if found < count:
        imrt.extend([0] * (cluster + count - found - len(imrt)))
    cluster -= found
    for k in range(count):
        imrt[cluster + k] = 1
    return cluster


PreWrite = Callable[[int, int], None]
"""qcow2_pre_write_overlap_check before each write of a rebuild; raises to stop it."""


def _write_refblocks(q: Qcow2File, imrt: list[int], first: int, end: int, reftable: list[int],
                     pre_write: PreWrite) -> bool:
    """rebuild_refcounts_write_refblocks: write a refblock for every block range of
    [first, end) that has a non-zero refcount, allocating it in ``imrt`` if new. Returns
    whether ``reftable`` had to grow."""
    entries = q.geometry.refcount_block_entries
    grown = False
    first_free = [0]
    cluster = first
    while cluster < end:
        if cluster >= len(imrt) or not imrt[cluster]:
            cluster += 1
            continue
        index = cluster // entries
        block_start = index * entries
        if index < len(reftable) and reftable[index]:
            block = reftable[index]
        else:
            first_free[0] = max(first_free[0], block_start)
            block_cluster = _alloc_imrt(imrt, 1, first_free)
            block = block_cluster * q.cluster_size
            end = max(end, block_cluster + 1)
            if len(reftable) <= index:
                reftable.extend([0] * (align_up((index + 1) * 8, q.cluster_size) // 8 - len(reftable)))
                grown = True
            reftable[index] = block
        values = (imrt[block_start:block_start + entries] + [0] * entries)[:entries]
        pre_write(block, q.cluster_size)
        rb.write_refblock(q, block, values)
        cluster = block_start + entries
    return grown


def rebuild_refcount_structure(q: Qcow2File, imrt: list[int], pre_write: PreWrite) -> None:
    """rebuild_refcount_structure: new refcount blocks and a new refcount table, placed in
    the free clusters of the computed refcounts ``imrt``; the old structure is leaked (the
    caller frees it). Repeats until the table stops growing. ``pre_write`` is called before
    each refcount block and the table are written (QEMU's overlap check; it raises to stop)."""
    reftable: list[int] = []
    _write_refblocks(q, imrt, 0, len(imrt), reftable, pre_write)
    while True:
        clusters = -(-len(reftable) * 8 // q.cluster_size)
        start = _alloc_imrt(imrt, clusters, [0])
        if not _write_refblocks(q, imrt, start, start + clusters, reftable, pre_write):
            break
    pre_write(start * q.cluster_size, len(reftable) * 8)
    q.pwrite(start * q.cluster_size, struct.pack(f">{len(reftable)}Q", *reftable))
    q.header.refcount_table_offset = start * q.cluster_size
    q.header.refcount_table_clusters = clusters
    q.write_header()
