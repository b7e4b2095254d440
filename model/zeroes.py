"""Zeroing and discarding guest ranges (block/io.c bdrv_co_do_pwrite_zeroes and
bdrv_co_pdiscard; block/qcow2.c qcow2_co_pwrite_zeroes, qcow2_co_pdiscard;
block/qcow2-cluster.c qcow2_subcluster_zeroize, qcow2_cluster_discard).

**write_zeroes.** The block layer cuts the request at subcluster boundaries (pwrite_zeroes_alignment);
each piece goes to the driver, and a piece the driver refuses (-ENOTSUP) is written
as an ordinary write of zero bytes, which allocates.

===========================================  ========================================
piece                                        result
===========================================  ========================================
partial subcluster whose rest does not       refused -> written as data
already read as zero (is_zero; zeros past    (qcow2_co_pwrite_zeroes)
a shorter backing file's end count), or
whose subcluster is NORMAL/COMPRESSED
v2, no backing file                          clusters discarded: entries become 0
                                             (qcow2_subcluster_zeroize ->
                                             qcow2_cluster_discard)
v2 with a backing file                       refused -> written as data
v3, whole cluster (zero_in_l2_slice)         ZERO flag / all-zero bitmap; the host
                                             cluster is freed if it is compressed, or
                                             if ``unmap`` and it is allocated;
                                             otherwise kept (ZERO_ALLOC)
v3, subclusters of one cluster               zero bits set, alloc bits cleared
(zero_l2_subclusters)                        (compressed cluster: refused -> data)
===========================================  ========================================

A range that ends at the end of the image counts as aligned there. With a raw
external data file the data file is zeroed too.

**discard.** A v2 image with a backing file ignores discards entirely (qcow2_co_pdiscard: it
cannot mark clusters zero). The block layer cuts the request at cluster boundaries
(pdiscard_alignment); the driver ignores (-ENOTSUP, and the block layer then reports
success) every partial cluster except a last one that ends at the end of the image.
Whole clusters:

===================================  ==========================================
cluster, image                       new entry (discard_in_l2_slice)
===================================  ==========================================
allocated (NORMAL, ZERO_ALLOC,       v3: ZERO flag (extended L2: entry 0, bitmap
COMPRESSED), or any cluster when     all-zero) -- reads as zeros, hides backing;
there is a backing file              v2: 0 (unallocated)
unallocated or zero-plain, no        unchanged (already reads as zeros)
backing file
===================================  ==========================================

The old host cluster loses its reference (qcow2_free_any_cluster). As in QEMU,
the L2 table is allocated (or unshared) first even where nothing changes
(get_cluster_table).

Errors: CorruptionError from the tables (the facade flags the image).
"""

from __future__ import annotations

from model import mapping as mp
from model import mapping_report as st
from model import write as wr
from model.state import State, mark_dirty
from spec.encryption import SECTOR_SIZE
from spec.entries import (
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_SUB_ALLOC_RANGE,
    QCOW_OFLAG_SUB_ZERO_RANGE,
    QCOW_OFLAG_ZERO,
    ClusterType,
    SubclusterType,
    cluster_type,
    subcluster_type,
)
from spec.errors import check_node_dropped
from spec.geometry import align_down, align_up, split_aligned


def write_zeroes(s: State, offset: int, n: int, unmap: bool) -> None:
    """Make [offset, offset+n) read as zeros (bdrv_co_do_pwrite_zeroes, then
    See the module doc; no range check (the facade's)."""
    mark_dirty(s)
    tail: tuple[int, int] | None = None
    if s.crypto is not None:
        offset, n, tail = _encrypted_edges(s, offset, n)
    align = s.q.geometry.subcluster_size
    for start, length in split_aligned(offset, n, align):
        check_node_dropped(s.q.signalled)
        if not _driver_pwrite_zeroes(s, start, length, unmap):
            # The zero-data fallback is a new block-layer call (bdrv_driver_pwritev): a
            # node the status query dropped fails it (ENOMEDIUM).
            check_node_dropped(s.q.signalled)
            wr.write(s, start, bytes(length))
    if tail is not None:
        wr.write(s, tail[0], bytes(tail[1]))


def _encrypted_edges(s: State, offset: int, n: int) -> tuple[int, int, tuple[int, int] | None]:
    """On an encrypted image (request alignment: the 512-byte sector) the block layer first
    writes the partial sectors at either end as ordinary data, zeros laid over what they read
    as, and passes only the whole sectors between on as a zero write (block/io.c
    bdrv_co_do_zero_pwritev: head sector, aligned middle, tail sector; one buffer when the
    padded request is a single sector, or two adjacent ones with both edges partial).
    Writes the head now; returns the aligned middle left to zero (possibly empty) and the
    partial tail sector to write after it, as (offset, length), if any."""
    end = offset + n
    start_al, end_al = align_up(offset, SECTOR_SIZE), align_down(end, SECTOR_SIZE)
    head, tail = offset % SECTOR_SIZE, -end % SECTOR_SIZE
    padded = align_up(end, SECTOR_SIZE) - align_down(offset, SECTOR_SIZE)
    if (head or tail) and (padded == SECTOR_SIZE or (head and tail and padded == 2 * SECTOR_SIZE)):
        wr.write(s, offset, bytes(n))
        return end, 0, None
    if head:
        wr.write(s, offset, bytes(start_al - offset))
    # The tail goes after the middle, as in QEMU: zeroing the middle looks at whether the rest
    # of its last subcluster reads as zeros, and the tail sector may lie there.
    return start_al, max(end_al - start_al, 0), ((end_al, end - end_al) if tail else None)


def _driver_pwrite_zeroes(s: State, offset: int, n: int, unmap: bool) -> bool:
    """qcow2_co_pwrite_zeroes for one piece; False means -ENOTSUP."""
    q, g = s.q, s.q.geometry
    scs = g.subcluster_size
    end = offset + n
    head = offset % scs
    tail = align_up(end, scs) - end
    if end == s.size:
        tail = 0
    if head or tail:
        if not (st.is_zero(s, offset - head, head) and st.is_zero(s, end, tail)):
            return False
        offset -= head
        n = scs
        entry, bitmap = mp.get_entry(q, offset)
        t = subcluster_type(entry, bitmap, g.subcluster_index(offset), extended_l2=q.extended_l2,
                            has_data_file=q.has_data_file)
        if t not in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC,
                     SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
            return False
    return zeroize(s, offset, n, unmap)


def zeroize(s: State, offset: int, n: int, unmap: bool) -> bool:
    """qcow2_subcluster_zeroize. False means -ENOTSUP."""
    q, g = s.q, s.q.geometry
    cs = q.cluster_size
    end = offset + n
    if q.data_file_raw:
        _zero_data_file(s, offset, n)
    if q.version < 3:
        if s.backing is None:
            cluster_discard(s, offset, n, request=True, full=False)
            return True
        return False
    head = min(end, align_up(offset, cs)) - offset
    offset += head
    tail = 0 if end >= s.size else end - max(offset, align_down(end, cs))
    end -= tail
    if head and not _zero_subclusters(s, offset - head, head):
        return False
    # A tail in a compressed cluster is refused after the whole clusters are done; QEMU
    # keeps their L2 and refcount updates but drops the queued discards unissued
    # (qcow2_subcluster_zeroize's fail path calls qcow2_process_discards with ret < 0), so
    # the freed clusters keep their bytes in the file.
    punch = not (tail and _is_compressed(s, end))
    pos = offset
    while pos < end:
        l2off = mp.l2_table_for_write(q, pos)
        table = mp.read_l2(q, l2off)
        idx = g.l2_index(pos)
        while pos < end and (idx < g.l2_entries):
            old_e, old_b = table[idx]
            t = cluster_type(old_e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            allocated = t in (ClusterType.NORMAL, ClusterType.COMPRESSED, ClusterType.ZERO_ALLOC)
            do_unmap = t is ClusterType.COMPRESSED or (unmap and allocated)
            new_e = 0 if do_unmap else old_e
            new_b = old_b
            if q.extended_l2:
                new_b = QCOW_L2_BITMAP_ALL_ZEROES
            else:
                new_e |= QCOW_OFLAG_ZERO
            if (new_e, new_b) != (old_e, old_b):
                table[idx] = (new_e, new_b)
                mp.write_l2(q, l2off, table)
                if do_unmap:
                    mp.free_any_cluster(q, old_e, request=punch)
                table = mp.read_l2(q, l2off)
            idx += 1
            pos += cs
    return not (tail and not _zero_subclusters(s, end, tail))


def _is_compressed(s: State, offset: int) -> bool:
    e, _ = mp.get_entry(s.q, offset)
    return cluster_type(e, extended_l2=True, has_data_file=s.q.has_data_file) is ClusterType.COMPRESSED


def _zero_subclusters(s: State, offset: int, n: int) -> bool:
    """zero_l2_subclusters: within one cluster, mark subclusters zero."""
    q, g = s.q, s.q.geometry
    l2off = mp.l2_table_for_write(q, offset)
    table = mp.read_l2(q, l2off)
    idx = g.l2_index(offset)
    e, b = table[idx]
    if cluster_type(e, extended_l2=True, has_data_file=q.has_data_file) is ClusterType.COMPRESSED:
        return False
    sc = g.subcluster_index(offset)
    nsc = -(-n // g.subcluster_size)
    nb = (b | QCOW_OFLAG_SUB_ZERO_RANGE(sc, sc + nsc)) & ~QCOW_OFLAG_SUB_ALLOC_RANGE(sc, sc + nsc)
    if nb != b:
        table[idx] = (e, nb)
        mp.write_l2(q, l2off, table)
    return True


def _zero_data_file(s: State, offset: int, n: int) -> None:
    size = s.q.file_size(s.q.data_f)
    if offset < size:
        s.q.data_pwrite(offset, bytes(min(n, size - offset)))


def discard(s: State, offset: int, n: int) -> None:
    """Discard [offset, offset+n) (bdrv_co_pdiscard, qcow2_co_pdiscard,
    See the module doc; no range check (the facade's)."""
    cs = s.cluster_size
    if s.q.version < 3 and s.backing is not None:
        # qcow2_co_pdiscard: without the zero flag a discarded cluster would expose the
        # backing file, so v2 images with a backing file ignore discards.
        return
    for start, length in split_aligned(offset, n, cs):
        check_node_dropped(s.q.signalled)
        if (start % cs or length % cs) and (start % cs or start + length != s.size):
            continue
        mark_dirty(s)
        cluster_discard(s, start, length, request=True, full=False)


def cluster_discard(s: State, offset: int, n: int, *, request: bool, full: bool) -> None:
    """qcow2_cluster_discard over whole clusters (the last may end at the image end)."""
    q, g = s.q, s.q.geometry
    cs = q.cluster_size
    pos, end = offset, offset + n
    while pos < end:
        l2off = mp.l2_table_for_write(q, pos)
        table = mp.read_l2(q, l2off)
        idx = g.l2_index(pos)
        while pos < end and idx < g.l2_entries:
            old_e, old_b = table[idx]
            t = cluster_type(old_e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            new_e, new_b = old_e, old_b
            if full:
                new_e = new_b = 0
            elif s.backing is not None or t in (ClusterType.NORMAL, ClusterType.COMPRESSED,
                                                   ClusterType.ZERO_ALLOC):
                if q.extended_l2:
                    new_e, new_b = 0, QCOW_L2_BITMAP_ALL_ZEROES
                else:
                    new_e, new_b = (QCOW_OFLAG_ZERO if q.version >= 3 else 0), 0
            if (new_e, new_b) != (old_e, old_b):
                table[idx] = (new_e, new_b)
                mp.write_l2(q, l2off, table)
                mp.free_any_cluster(q, old_e, request=request)
                table = mp.read_l2(q, l2off)
            idx += 1
            pos += cs
