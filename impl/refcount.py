"""Refcounts through the refcount-block cache, and QEMU's allocator (qcow2.rst "Host cluster
management"; block/qcow2-refcount.c).

The refcount table lives in memory (s->refcount_table); refcount blocks are cache entries,
decoded once into a numpy array of one element per cluster, so a lookup is an index and the
free-cluster scan is vectorised. The allocation rules are QEMU's, so the impl picks the
offsets qemu-io picks:

- alloc_clusters_noref: ``n`` contiguous clusters of refcount 0 from free_cluster_index,
  leaving the cursor after them; a cluster no refcount block covers is free;
- update_refcount: a refcount reaching 0 moves the cursor back and drops any cached table
  of that cluster (qcow2_cache_discard); decreases are ordered after the L2 update that
  dropped the reference (set_dependency refcount -> L2); the cluster is remembered as freed
  but not yet durably unmapped, and reusing it first writes the L2 cache back and flushes
  (State.settle_freed: QEMU reuses it at once, impl makes the same choice safely);
- alloc_refcount_block: a missing block goes at the next free cluster, describing itself if
  it falls in its own range, and the caller's search starts over (-EAGAIN, here ``Again``);
  a decrement takes the same path (update_refcount fetches every block through
  alloc_refcount_block), so freeing a cluster no block covers hooks up a block or grows the
  table, then fails (qcow2_free_clusters logs it; what was allocated stays). Only that
  path is slower: a covered cluster is one lookup, as before;
- a full refcount table is replaced by a larger one with self-describing blocks
  (qcow2_refcount_area).

Errors: CorruptionError (unaligned refcount block, underflow, allocation at 0); RequestError
for an overflow (nothing is left changed); HostIOError (EFBIG) for a refcount table past
QEMU's limit (qcow2_refcount_area).
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np

from impl.state import HEADER_REFTABLE_FIELDS, State
from spec.entries import REFT_OFFSET_MASK
from spec.errors import CorruptionError, RequestError
from spec.geometry import align_up
from spec.hostio import HostIOError
from spec.refblocks import grown_reftable, refcount_area


class Again(Exception):
    """update_refcount's -EAGAIN: a refcount block was hooked up; search again."""


# --- refcount block codec (qcow2.rst "Refcount block entry") ----------------------------------

def block_codec(refcount_order: int) -> tuple[object, object]:
    """(decode, encode) for refcount blocks of 2**refcount_order bits. Entries below a byte
    are packed from the least significant bit; wider ones are big-endian."""
    bits = 1 << refcount_order
    if bits >= 8:
        dt = np.dtype(f">u{bits // 8}")

        def decode(data: bytes) -> np.ndarray:
            return np.frombuffer(data, dtype=dt).copy()

        def encode(arr: np.ndarray) -> bytes:
            return arr.tobytes()

        return decode, encode
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)

    def decode_sub(data: bytes) -> np.ndarray:
        raw = np.frombuffer(data, dtype=np.uint8)
        return ((raw[:, None] >> shifts) & mask).reshape(-1)

    def encode_sub(arr: np.ndarray) -> bytes:
        return np.bitwise_or.reduce(arr.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()

    return decode_sub, encode_sub


# --- reading -----------------------------------------------------------------------------------

def _block_offset(s: State, rt_index: int) -> int:
    if rt_index >= len(s.reftable):
        return 0
    off = s.reftable[rt_index] & REFT_OFFSET_MASK
    if off % s.cluster_size:
        # qcow2_get_refcount: an unaligned refcount block is a corruption.
        raise CorruptionError(f"refcount block offset {off:#x} unaligned (reftable index {rt_index})")
    return off


def get_refcount(s: State, cluster_index: int) -> int:
    """qcow2_get_refcount; 0 where no refcount block covers the cluster."""
    per = s.geometry.refcount_block_entries
    off = _block_offset(s, cluster_index // per)
    if not off:
        return 0
    return int(s.rc_cache.get(off)[cluster_index % per])


# --- updating --------------------------------------------------------------------------------

def update_refcount(s: State, offset: int, length: int, addend: int, *, discard: bool = False) -> None:
    """Add ``addend`` to every cluster touched by [offset, offset+length) (update_refcount).
    ``discard``: a cluster that drops to 0 is queued to be punched out of the file
    (pass-discard-request; update_refcount_discard merges neighbours), and the queue is
    issued when the call ends, unless the caller holds it (s.cache_discards, as
    qcow2_cluster_discard and qcow2_update_snapshot_refcount do).
    Raises Again after undoing its own changes when a refcount block had to be allocated."""
    if addend > 0:
        # Nothing reaches 0 on an increase (its undo frees without discard), so nothing is
        # queued and there is nothing to hold: the context manager costs a request ~2 µs.
        _update_refcount(s, offset, length, addend, discard=False)
        return
    with s.discards_held():
        _update_refcount(s, offset, length, addend, discard=discard)


def _update_refcount(s: State, offset: int, length: int, addend: int, *, discard: bool) -> None:
    if length <= 0:
        return
    cs = s.cluster_size
    per = s.geometry.refcount_block_entries
    first = offset // cs
    last = (offset + length - 1) // cs
    if addend < 0:
        # The L2 entry that dropped the reference must reach the file first.
        s.rc_cache.set_dependency(s.l2_cache)

    def undo(upto: int) -> None:
        # update_refcount restores what it already changed before it fails.
        if upto > first:
            update_refcount(s, first * cs, (upto - first) * cs, -addend)

    for idx in range(first, last + 1):
        try:
            block = _block_for_update(s, idx)
        except Again:
            s.free_cluster_index = min(s.free_cluster_index, first)
            undo(idx)
            raise
        except CorruptionError:
            # update_refcount restores after any failure and ignores the undo's own result.
            with contextlib.suppress(CorruptionError, Again):
                undo(idx)
            raise
        counts = s.rc_cache.get(block) if block else None
        value = (int(counts[idx % per]) if counts is not None else 0) + addend
        if counts is None or value < 0:
            undo(idx)  # update_refcount's fail path restores the clusters before this one
            raise CorruptionError(f"refcount of cluster {idx} would drop below zero")
        if value > s.refcount_max:
            # -EINVAL without a corruption: more references than the width can count.
            undo(idx)
            raise RequestError(f"refcount of cluster {idx} would exceed {s.refcount_max}")
        counts[idx % per] = value
        s.rc_cache.mark_dirty(block)
        if not value:
            _cluster_freed(s, idx * cs, discard)


def _cluster_freed(s: State, cl: int, discard: bool) -> None:
    cs = s.cluster_size
    idx = cl // cs
    if idx < s.free_cluster_index:
        s.free_cluster_index = idx
    s.freed_unsynced.add(idx)
    if s.free_byte_offset and idx == s.free_byte_offset // cs:
        s.packing_cluster_freed = True
    # A table cached for this cluster must never be written back over its next owner.
    s.rc_cache.discard(cl)
    s.l2_cache.discard_range(cl, cs)
    if discard:
        s.queue_discard(cl, cs)


def free_clusters(s: State, offset: int, length: int, *, discard: bool = False) -> None:
    """qcow2_free_clusters: failures are reported and ignored (a leak for check to find),
    Again included: a block hooked up (or a table grown) for a cluster no block covered
    stays, and that cluster's refcount, 0 all along, is not dropped."""
    with contextlib.suppress(CorruptionError, Again):
        update_refcount(s, offset, length, -1, discard=discard)


# --- allocation ------------------------------------------------------------------------------

def alloc_clusters_noref(s: State, n: int) -> int:
    """alloc_clusters_noref: scan from the cursor for ``n`` free clusters in a row."""
    found = 0
    per = s.geometry.refcount_block_entries
    if n == 1:
        # The cursor usually sits on a free cluster whose block is cached: one look, and the
        # loop below would take the same cluster.
        idx = s.free_cluster_index
        off = _block_offset(s, idx // per)
        if off and not s.rc_cache.get(off)[idx % per]:
            s.free_cluster_index = idx + 1
            s.settle_freed(idx * s.cluster_size, s.cluster_size)
            return idx * s.cluster_size
    while found < n:
        idx = s.free_cluster_index
        i = idx % per
        off = _block_offset(s, idx // per)
        if not off:
            take = min(n - found, per - i)
            found += take
            s.free_cluster_index += take
            continue
        seg = s.rc_cache.get(off)[i:]
        pos, length = 0, len(seg)
        while pos < length and found < n:
            # The cursor usually sits on a free cluster (it stops right after the last
            # allocation), so a scalar look comes before the vectorised scans.
            if not found and seg[pos]:
                zeros = np.flatnonzero(seg[pos:] == 0)
                if not len(zeros):
                    s.free_cluster_index += length - pos
                    pos = length
                    break
                skip = int(zeros[0])
                s.free_cluster_index += skip
                pos += skip
            want = n - found
            if want == 1:
                first_used = 0 if seg[pos] else -1
            else:
                window = seg[pos:pos + want]
                first_used = int(np.flatnonzero(window)[0]) if window.any() else -1
            if first_used >= 0:
                k = first_used + 1
                found = 0
            else:
                k = min(want, length - pos)
                found += k
            s.free_cluster_index += k
            pos += k
    found_at = (s.free_cluster_index - n) * s.cluster_size
    s.settle_freed(found_at, n * s.cluster_size)
    return found_at


def alloc_clusters(s: State, n: int) -> int:
    """qcow2_alloc_clusters: ``n`` contiguous clusters with refcount 1."""
    if n == 1:
        taken = _take_cursor_cluster(s)
        if taken is not None:
            return taken
    found = -1
    while found < 0:
        candidate = alloc_clusters_noref(s, n)
        try:
            update_refcount(s, candidate, n * s.cluster_size, 1)
            found = candidate
        except Again:
            pass  # a refcount block was hooked up meanwhile: search again
    return found


def _take_cursor_cluster(s: State) -> int | None:
    """alloc_clusters_noref then update_refcount(+1) for one cluster in their commonest
    case, the same steps without the general loops: the cluster at the cursor is free and
    a refcount block covers it. None when that is not the case (nothing changed)."""
    per = s.geometry.refcount_block_entries
    idx = s.free_cluster_index
    block = _block_offset(s, idx // per)
    if not block or s.rc_cache.get(block)[idx % per]:
        return None
    cs = s.cluster_size
    s.free_cluster_index = idx + 1
    s.settle_freed(idx * cs, cs)
    s.rc_cache.get(block)[idx % per] = 1  # 0 + 1: never past refcount_max
    s.rc_cache.mark_dirty(block)
    return idx * cs


def alloc_clusters_at(s: State, offset: int, n: int) -> int:
    """qcow2_alloc_clusters_at: as many of ``n`` clusters as are free at ``offset``; the
    cursor does not move."""
    cs = s.cluster_size
    while True:
        i = 0
        while i < n and get_refcount(s, offset // cs + i) == 0:
            i += 1
        s.settle_freed(offset, i * cs)
        try:
            update_refcount(s, offset, i * cs, 1)
        except Again:
            continue
        return i


def alloc_bytes(s: State, size: int) -> int:
    """qcow2_alloc_bytes: room for a compressed cluster, packed after the previous one and
    possibly running into the next cluster when that is the next free one. QEMU 7.2 keeps
    packing after free_byte_offset even when that cluster was freed and reused meanwhile;
    reproduced, and remembered in ``packed_into_live_cluster``."""
    cs = s.cluster_size
    start = s.free_byte_offset
    owned = get_refcount(s, start // cs) if start else 0
    if owned == s.refcount_max:
        start = 0  # that cluster cannot take one more reference
    remembered = start
    room = cs - start % cs
    while True:
        if not start or room < size:
            fresh = alloc_clusters_noref(s, 1)
            if fresh == 0:
                # qcow2_alloc_bytes signals corruption rather than pack over the header.
                raise CorruptionError("preventing invalid allocation of compressed cluster at offset 0")
            if start and fresh == align_up(start, cs):
                room += cs  # the stream continues into the next cluster
            else:
                start, room = fresh, cs
        s.settle_freed(start, size)
        try:
            update_refcount(s, start, size, 1)
            break
        except Again:
            start = 0
    s.packed_into_live_cluster |= bool(remembered and start == remembered
                                       and s.packing_cluster_freed and owned)
    s.packing_cluster_freed = False
    end = start + size
    s.free_byte_offset = end if end % cs else 0
    return start


def _block_for_update(s: State, cluster_index: int) -> int:
    """alloc_refcount_block: the block covering ``cluster_index``, hooked up if missing (for
    a decrease as for an increase)."""
    rt_index = cluster_index // s.geometry.refcount_block_entries
    try:
        block = _block_offset(s, rt_index)
        if block:
            return block
        _hook_up_block(s, cluster_index, rt_index)
    except HostIOError:
        raise
    except CorruptionError as e:
        # Every corruption on this path is qcow2_signal_corruption (an unaligned block, the
        # block at offset 0, a write-back the overlap check refuses): it flags the image even
        # inside a free, whose failure QEMU ignores, so the image takes ``signalled`` when
        # the request ends.
        s.signalled = s.signalled or str(e)
        raise
    raise Again


def _hook_up_block(s: State, cluster_index: int, rt_index: int) -> None:
    """alloc_refcount_block's allocation: a new block for ``rt_index``, hooked into the
    table or into a grown one."""
    g = s.geometry
    per = g.refcount_block_entries
    cs = s.cluster_size
    # The refcount table will be written, and it may depend on L2 tables.
    if s.l2_cache is not None:
        s.l2_cache.flush()
    if s.cache_discards:
        # alloc_clusters_noref punches what the held request queued before it allocates.
        s.process_discards()
    new_block = alloc_clusters_noref(s, 1)
    if new_block == 0:
        raise CorruptionError("preventing invalid allocation of a refcount block at offset 0")
    if new_block // cs // per == rt_index:
        arr = s.rc_cache.get_empty(new_block)
        arr[new_block // cs % per] = 1
    else:
        update_refcount(s, new_block, cs, 1)
        s.rc_cache.flush()  # the new block's refcount first, as alloc_refcount_block does
        arr = s.rc_cache.get_empty(new_block)
    s.rc_cache.mark_dirty(new_block)
    # The block reaches the file before the table entry pointing at it.
    s.rc_cache.flush()
    if rt_index < s.reftable_entries:
        old = s.reftable[rt_index]
        s.reftable[rt_index] = new_block
        try:
            s.write_reftable_entry(rt_index)
        except BaseException:
            # alloc_refcount_block sets s->refcount_table[] only once bdrv_pwrite_sync has
            # hooked the block up; after a failed write the next update allocates again.
            s.reftable[rt_index] = old
            raise
        s.overlap.stale = True
        return
    _grow_reftable(s, cluster_index, rt_index, new_block)
    s.rc_cache.get(new_block)  # load_refcount_block: the block becomes the most recent entry


def _grow_reftable(s: State, cluster_index: int, new_index: int, new_block: int) -> None:
    """alloc_refcount_block's second half, then qcow2_refcount_area: new blocks for every
    missing entry of the new range, then the table after them, all counted in themselves;
    the header switched with one write; the old table freed."""
    g = s.geometry
    cs = s.cluster_size
    per = g.refcount_block_entries
    start, total_blocks, table_size, table_clusters = refcount_area(g, cluster_index, new_block)
    new_table = grown_reftable(s.reftable, table_size)
    new_table[new_index] = new_block
    area_index = start // cs // per
    missing = sum(1 for i in range(area_index, total_blocks) if not new_table[i])
    table_offset = start + missing * cs
    end = table_offset + table_clusters * cs
    next_block = start
    for i in range(area_index, total_blocks):
        if new_table[i]:
            arr = s.rc_cache.get(new_table[i])
        else:
            new_table[i] = next_block
            arr = s.rc_cache.get_empty(next_block)
            next_block += cs
        first = i * per * cs
        if first < end:
            j = (start - first) // cs if first < start else 0
            arr[j:min((end - first) // cs, per)] = 1
        s.rc_cache.mark_dirty(new_table[i])
    s.rc_cache.flush()
    # qcow2_refcount_area: the new table, then the header fields pointing at it, each
    # with bdrv_pwrite_sync, before the old table is freed (and may be reused). Neither
    # write is overlap-checked in QEMU 7.2 (only the blocks' cache flush above is), so a
    # table landing on other metadata is written, as here.
    s.pwrite_sync(table_offset, struct.pack(f">{table_size}Q", *new_table))
    old_offset, old_clusters = s.refcount_table_offset, int(s.header.refcount_table_clusters)
    s.header.refcount_table_offset = table_offset
    s.header.refcount_table_clusters = table_clusters
    s.reftable = new_table
    s.overlap.stale = True
    s.pwrite_sync(HEADER_REFTABLE_FIELDS, struct.pack(">QI", table_offset, table_clusters))
    free_clusters(s, old_offset, old_clusters * cs)
