"""Refcounts on the raw file: read, update, allocate (qcow2.rst "Host cluster management";
block/qcow2-refcount.c).

Shared by the check-and-repair engine (spec/check/) and the model; uncached (the impl has
its own refcount cache). Every refcount read goes to the refcount table and block on disk;
every update reads the block, changes one entry and writes the whole block back.
Allocation follows QEMU's algorithm, not just its result, so that a writer picks the same
host offsets:

- ``alloc_clusters`` scans for ``n`` contiguous free clusters starting at
  ``free_cluster_index`` and leaves the cursor after them (alloc_clusters_noref);
- a refcount going to 0 moves the cursor back (update_refcount; Qcow2File.refcount_freed);
- a missing refcount block is placed at the next free cluster; if it does not describe
  itself its own refcount is set first, and the caller's search starts over from the
  clusters it had found (alloc_refcount_block and update_refcount, the -EAGAIN protocol).
  A decrement does this too: update_refcount fetches the block of every cluster it changes
  through alloc_refcount_block, so freeing a cluster no block covers (a damaged L2 entry
  far past the data) hooks up a new block, or grows the table, and then fails with Again;
  qcow2_free_clusters only logs that, and what was allocated stays;
- a refcount table that is too small is replaced by a larger one placed with new,
  self-describing refcount blocks at the start of the first uncovered refblock range
  (qcow2_refcount_area).

Errors: CorruptionError for an unaligned refcount block offset, a refcount underflow, or an
allocation at offset 0; RequestError for a refcount overflow (the image stays consistent);
HostIOError (EFBIG) for a refcount table past QEMU's limit (qcow2_refcount_area).
``free_clusters`` ignores failures, Again included, as qcow2_free_clusters does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from typing import TYPE_CHECKING

from spec.entries import REFT_OFFSET_MASK
from spec.errors import CorruptionError, RequestError
from spec.geometry import Geometry, align_up, div_round_up
from spec.hostio import HostIOError
from spec.limits import QCOW_MAX_REFTABLE_SIZE
from spec.qfile import Qcow2File
from spec.refcounts import decode_refcount_block

if TYPE_CHECKING:
    import numpy as np
else:
    from spec.lazy import numpy as np  # executed at first use: CLI start-up (spec/lazy.py)


class Again(Exception):
    """A refcount block was allocated; the caller's free-cluster search must start over
    (update_refcount's -EAGAIN)."""


# --- tables -------------------------------------------------------------------------------

# The layouts are spec.tables.refcount_table and spec.tables.refcount_block; they are
# decoded here with struct, numpy and integer arithmetic because construct is too slow to
# run on every lookup (tests/model/test_tables.py checks both readings agree).

def read_reftable(q: Qcow2File) -> list[int]:
    n = q.header.refcount_table_clusters * q.cluster_size // 8
    data = q.pread(q.header.refcount_table_offset, n * 8)
    return list(struct.unpack(f">{n}Q", data))


def write_reftable(q: Qcow2File, table: list[int]) -> None:
    q.pwrite(q.header.refcount_table_offset, struct.pack(f">{len(table)}Q", *table))


def refcount_get(block: bytes | bytearray, index: int, bits: int) -> int:
    """Entry ``index`` of a refcount block (qcow2.rst "Refcount block entry"): widths below
    a byte are packed from the least significant bit; wider ones are big-endian."""
    if bits < 8:
        per = 8 // bits
        return (block[index // per] >> (bits * (index % per))) & ((1 << bits) - 1)
    w = bits // 8
    return int.from_bytes(block[index * w:(index + 1) * w], "big")


def refcount_set(block: bytearray, index: int, bits: int, value: int) -> None:
    if bits < 8:
        per = 8 // bits
        shift = bits * (index % per)
        mask = ((1 << bits) - 1) << shift
        block[index // per] = (block[index // per] & ~mask) | (value << shift)
        return
    w = bits // 8
    block[index * w:(index + 1) * w] = value.to_bytes(w, "big")


def encode_refblock(values: list[int], bits: int) -> bytes:
    """The inverse of spec.refcounts.decode_refcount_block (values must fit ``bits``)."""
    if bits >= 8:
        return np.asarray(values, dtype=np.uint64).astype(f">u{bits // 8}").tobytes()
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    packed = (np.asarray(values, dtype=np.uint8).reshape(-1, per) << shifts).sum(axis=1, dtype=np.uint8)
    return packed.tobytes()


def refblock_array(q: Qcow2File, offset: int) -> np.ndarray:
    """The whole refcount block at ``offset`` (bulk walks, not lookups)."""
    return decode_refcount_block(q.pread(offset, q.cluster_size), q.geometry.refcount_bits)


def write_refblock(q: Qcow2File, offset: int, values: list[int]) -> None:
    q.pwrite(offset, encode_refblock(values, q.geometry.refcount_bits))


def refblock_offset(q: Qcow2File, table: list[int] | None, rt_index: int) -> int:
    """The refcount block for reftable index ``rt_index``; 0 if there is none. Without
    ``table`` only that entry is read from the file (a refcount table can be 8 MiB)."""
    h = q.header
    if rt_index >= h.refcount_table_clusters * q.cluster_size // 8:
        return 0
    if table is None:
        entry = int.from_bytes(q.pread(h.refcount_table_offset + 8 * rt_index, 8), "big")
    else:
        entry = table[rt_index]
    off = entry & REFT_OFFSET_MASK
    if off % q.cluster_size:
        # qcow2_get_refcount: "Refblock offset ... unaligned" is a corruption.
        raise CorruptionError(f"refcount block offset {off:#x} unaligned (reftable index {rt_index})")
    return off


# --- reading --------------------------------------------------------------------------------

def get_refcount(q: Qcow2File, cluster_index: int) -> int:
    """Refcount of host cluster ``cluster_index``; 0 where no refcount block covers it."""
    g = q.geometry
    block = refblock_offset(q, None, cluster_index // g.refcount_block_entries)
    if not block:
        return 0
    return refcount_get(q.pread(block, q.cluster_size), cluster_index % g.refcount_block_entries,
                        g.refcount_bits)


# --- updating --------------------------------------------------------------------------------

def update_refcount(q: Qcow2File, offset: int, length: int, addend: int, *, discard: bool = False) -> None:
    """Add ``addend`` to the refcount of every cluster touched by [offset, offset+length).

    ``discard``: a cluster whose refcount drops to 0 has its host range punched out, as QEMU
    does when the free's discard type is passed through (update_refcount_discard,
    qcow2_process_discards; pass-discard-request and pass-discard-snapshot default on).

    Raises Again (after undoing what it did) when a refcount block had to be allocated,
    like update_refcount's -EAGAIN, for a decrement as for an increase (alloc_refcount_block
    serves both); RequestError on overflow (after undoing what it did), CorruptionError on
    underflow.
    """
    if length <= 0:
        return
    cs = q.cluster_size
    start = offset - offset % cs
    end = align_up(offset + length, cs)
    for done, cl in enumerate(range(start, end, cs)):
        idx = cl // cs
        try:
            block = _refblock_for_update(q, idx)
        except Again:
            # update_refcount: the caller restarts its search, and tries the same clusters
            # first since they may still be free.
            q.free_cluster_index = min(q.free_cluster_index, start // cs)
            if done:
                # update_refcount restores the refcounts it already changed before failing.
                update_refcount(q, start, done * cs, -addend)
            raise
        except CorruptionError:
            if done:
                # The same restore after any failure; its own failure is ignored (QEMU
                # discards the undo's result).
                with contextlib.suppress(CorruptionError, Again):
                    update_refcount(q, start, done * cs, -addend)
            raise
        data = bytearray(q.pread(block, cs))
        i = idx % q.geometry.refcount_block_entries
        new = refcount_get(data, i, q.geometry.refcount_bits) + addend
        if new < 0:
            raise CorruptionError(f"refcount of cluster {idx} would drop below zero ({new})")
        if new > q.refcount_max:
            # update_refcount fails the whole request with -EINVAL, without signalling
            # corruption, after restoring the refcounts it already raised in this call; the
            # image stays consistent (a caller's earlier steps, such as a snapshot's L1 copy,
            # are left as QEMU leaves them). The caller asked for more references than the
            # refcount width can count (refcount_bits=1 and a snapshot, say): RequestError.
            if done:
                update_refcount(q, start, done * cs, -addend)
            raise RequestError(f"refcount of cluster {idx} would exceed {q.refcount_max}")
        refcount_set(data, i, q.geometry.refcount_bits, new)
        if not (new == 0 and cl == block):
            q.pwrite(block, bytes(data))
        # else: a refcount block whose own cluster is freed (a damaged entry pointing at it):
        # update_refcount finds the cluster in its refcount cache and discards that entry
        # (qcow2_cache_is_table_offset, qcow2_cache_discard), dirty as it is, so this very
        # decrement never reaches the file. (A free after a COW has just flushed the cache,
        # qcow2_cache_set_dependency, so nothing else is lost with it.)
        if new == 0:
            q.refcount_freed(idx)
        if new == 0 and discard:
            q.punch_hole(cl, cs)


def free_clusters(q: Qcow2File, offset: int, length: int, *, discard: bool = False) -> None:
    """Drop one reference to every cluster of [offset, offset+length).

    qcow2_free_clusters reports a failed update ("qcow2_free_clusters failed") and goes on,
    leaving a leak or an error for qemu-img check; this does the same. Again is such a
    failure too: a cluster no refcount block covered got a new block (or a larger table),
    which stays, and its reference is not dropped (its refcount was 0 all along).
    """
    with contextlib.suppress(CorruptionError, Again):
        update_refcount(q, offset, length, -1, discard=discard)


# --- allocation ------------------------------------------------------------------------------

def alloc_clusters_noref(q: Qcow2File, n: int) -> int:
    """n contiguous clusters with refcount 0, scanning from the cursor (alloc_clusters_noref).
    Nothing changes during the scan, so each refcount block it crosses is read once."""
    found = 0
    per_block = q.geometry.refcount_block_entries
    bits = q.geometry.refcount_bits
    while found < n:
        idx = q.free_cluster_index
        block = refblock_offset(q, None, idx // per_block)
        data = q.pread(block, q.cluster_size) if block else b""
        for i in range(idx % per_block, per_block):
            q.free_cluster_index += 1
            found = found + 1 if not data or refcount_get(data, i, bits) == 0 else 0
            if found == n:
                break
    return (q.free_cluster_index - n) * q.cluster_size


def alloc_clusters(q: Qcow2File, n: int) -> int:
    """Allocate ``n`` contiguous clusters with refcount 1; returns the host offset
    (qcow2_alloc_clusters)."""
    while True:
        offset = alloc_clusters_noref(q, n)
        try:
            update_refcount(q, offset, n * q.cluster_size, 1)
        except Again:
            continue
        return offset


def _refblock_for_update(q: Qcow2File, cluster_index: int) -> int:
    """The refcount block covering ``cluster_index``, allocated if there is none
    (alloc_refcount_block, for an increase and a decrease alike). Raises Again after
    hooking up a new block."""
    g = q.geometry
    rt_index = cluster_index // g.refcount_block_entries
    try:
        block = refblock_offset(q, None, rt_index)
    except HostIOError:
        raise  # a failed host read is the request's errno, never a flag
    except CorruptionError as e:
        # qcow2_signal_corruption (an unaligned block): it flags the image even inside a free.
        q.signalled = q.signalled or str(e)
        raise
    if block:
        return block
    table_entries = q.header.refcount_table_clusters * q.cluster_size // 8
    new_block = alloc_clusters_noref(q, 1)
    if new_block == 0:
        # qcow2_signal_corruption flags the image here even when the caller ignores the
        # failure (a free): the writer takes ``signalled`` when the operation ends.
        q.signalled = "preventing invalid allocation of a refcount block at offset 0"
        raise CorruptionError(q.signalled)
    entries = g.refcount_block_entries
    block_data = bytearray(q.cluster_size)
    if new_block // q.cluster_size // entries == rt_index:
        # The block describes itself.
        refcount_set(block_data, new_block // q.cluster_size % entries, g.refcount_bits, 1)
    else:
        update_refcount(q, new_block, q.cluster_size, 1)
    _checked_refblock_write(q, new_block, bytes(block_data))
    if rt_index < table_entries:
        # The hook-up is not overlap-checked: QEMU 7.2 writes the entry with a plain
        # bdrv_pwrite_sync (alloc_refcount_block).
        table = read_reftable(q)
        table[rt_index] = new_block
        write_reftable(q, table)
        raise Again
    _grow_reftable(q, cluster_index, rt_index, new_block)
    raise Again


def _checked_refblock_write(q: Qcow2File, offset: int, data: bytes) -> None:
    """A refcount block written at once, after the writer's overlap check. A refusal is
    qcow2_signal_corruption: it flags the image even inside a free, whose failure QEMU
    ignores, so it is also left in ``signalled``."""
    try:
        q.check_refblock_write(offset, len(data))
    except HostIOError:
        raise  # the check's own reads failed on the host: the request's errno, never a flag
    except CorruptionError as e:
        q.signalled = q.signalled or str(e)
        raise
    q.pwrite(offset, data)


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous: bool) -> tuple[int, int]:
    """(refcount blocks, refcount table clusters) needed to count ``clusters`` clusters plus
    themselves: the fixed point qcow2_refcount_metadata_size computes. ``generous`` adds
    room for half the table again once, as QEMU does when growing."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = div_round_up(clusters + table + blocks, per_block)
        table = div_round_up(blocks, per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += div_round_up(table, 2)
            n = 0
            generous = False
            continue
        if n == last:
            return blocks, table


def refcount_area(g: Geometry, cluster_index: int, new_block: int) -> tuple[int, int, int, int]:
    """Where alloc_refcount_block's growth puts its area and how large the new table is:
    (start of the area in bytes, refcount blocks it counts, table entries, table clusters).
    The area starts at the first refblock range past the ones in use, counting the block
    just allocated; the table is half as large again as the blocks, cluster-aligned.
    Raises HostIOError (EFBIG) past QEMU's limit."""
    cs = g.cluster_size
    entries = g.refcount_block_entries
    blocks_used = div_round_up(max(cluster_index + 1, new_block // cs + 1), entries)
    start = blocks_used * entries * cs
    total_blocks, _ = refcount_metadata_size(start // cs, cs, g.refcount_order, True)
    table_size = align_up(total_blocks + div_round_up(total_blocks, 2), cs // 8)
    if total_blocks > QCOW_MAX_REFTABLE_SIZE or table_size > QCOW_MAX_REFTABLE_SIZE:
        # qcow2_refcount_area compares entry counts with the limit in bytes: a table of up
        # to 8 Mi entries (64 MiB) is written, which QEMU's open then refuses ("Reference
        # count table too large"). Past that, EFBIG, after the new block was written.
        raise HostIOError(f"refcount table of {table_size} entries: {os.strerror(errno.EFBIG)}")
    return start, total_blocks, table_size, table_size * 8 // cs


def grown_reftable(old: list[int], table_size: int) -> list[int]:
    """The entries qcow2_refcount_area copies into a new refcount table of ``table_size``
    entries: those up to the last one whose offset bits are set (max_refcount_table_index,
    update_max_refcount_table_index), reserved bits and all; an entry past it that holds
    only reserved bits is not copied (damaged seed 13, flip-1206@bitmap and
    flip-5136@bitmap). The rest is zeros."""
    last = next((i for i in range(len(old) - 1, 0, -1) if old[i] & REFT_OFFSET_MASK), 0)
    return (old[:last + 1] + [0] * table_size)[:table_size]


def _grow_reftable(q: Qcow2File, cluster_index: int, new_index: int, new_block: int) -> None:
    """Replace the refcount table by a larger one (alloc_refcount_block's second half, then
    qcow2_refcount_area with additional_clusters 0 and a generous size).

    The area starts at the first refblock range past the ones in use (counting the refblock
    just allocated). New refcount blocks for every missing table entry up to the computed
    count come first, then the table; the area's clusters get refcount 1 in the blocks that
    cover them; the header is switched and the old table freed.
    """
    g = q.geometry
    cs = q.cluster_size
    entries = g.refcount_block_entries
    start, total_blocks, table_size, table_clusters = refcount_area(g, cluster_index, new_block)
    new_table = grown_reftable(read_reftable(q), table_size)
    new_table[new_index] = new_block
    area_index = start // cs // entries
    additional = sum(1 for i in range(area_index, total_blocks) if not new_table[i])
    table_offset = start + additional * cs
    end = table_offset + table_clusters * cs
    block_offset = start
    bits = g.refcount_bits
    for i in range(area_index, total_blocks):
        if new_table[i]:
            data = bytearray(q.pread(new_table[i], cs))
        else:
            data = bytearray(cs)
            new_table[i] = block_offset
            block_offset += cs
        first_covered = i * entries * cs
        if first_covered < end:
            j = (start - first_covered) // cs if first_covered < start else 0
            for k in range(j, min((end - first_covered) // cs, entries)):
                refcount_set(data, k, bits, 1)
        _checked_refblock_write(q, new_table[i], bytes(data))
    # The new table and the header switch are not overlap-checked: qcow2_refcount_area
    # writes them with plain bdrv_pwrite_sync (only its blocks' cache flush is checked).
    q.pwrite(table_offset, struct.pack(f">{table_size}Q", *new_table))
    old_offset, old_clusters = q.header.refcount_table_offset, q.header.refcount_table_clusters
    q.header.refcount_table_offset = table_offset
    q.header.refcount_table_clusters = table_clusters
    q.write_header()
    free_clusters(q, old_offset, old_clusters * cs)
