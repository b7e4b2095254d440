"""Changing the virtual size (block/qcow2.c qcow2_co_truncate, preallocation off;
block/qcow2-cluster.c qcow2_grow_l1_table / qcow2_shrink_l1_table; block/qcow2-refcount.c
qcow2_shrink_reftable / qcow2_get_last_cluster).

- grow: a larger L1 table (exactly the size needed) at new clusters, the old one freed;
  with data-file-raw the new area's metadata is preallocated; over a backing file longer
  than the old size the new area is zeroed (bdrv_co_truncate's BDRV_REQ_ZERO_WRITE), which
  v2 images cannot do (UnsupportedFeature, the size stays), and made durable before the
  new size is written (QEMU writes the size first).
- shrink (``shrink=True``): clusters past the new end are fully discarded, L1 entries past
  the new L1 size zeroed and their tables freed, refcount blocks that count only
  themselves dropped, and the file cut after its last used cluster.

The caches are written back before anything is cut or dropped, so no dirty entry lands
past the new end of the file or on a cluster that was given up.
"""

from __future__ import annotations

import struct

from impl import cluster as cl
from impl import refcount as rc
from impl.state import HEADER_L1_FIELDS, HEADER_SIZE, ImageView, State
from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.errors import CorruptionError, Qcow2Error, RequestError, UnsupportedFeature
from spec.geometry import align_up
from spec.limits import QCOW_MAX_L1_SIZE


def resize(img: ImageView, new_size: int, shrink: bool) -> None:
    s = img.s
    if new_size < 0 or new_size % 512:
        raise RequestError("the new size must be a non-negative multiple of 512")
    if int(s.header.nb_snapshots) and s.version < 3:
        raise RequestError("can't resize a v2 image which has snapshots")
    old = img.size
    if new_size < old and not shrink:
        raise RequestError("use shrink=True to shrink an image")
    g = s.geometry
    l1_needed = g.l1_size_for(new_size)
    if new_size < old:
        start = align_up(new_size, s.cluster_size)
        if start < old:
            cl.cluster_discard(img, start, old - start, request=True, full=True)
        s.l2_cache.write()
        s.rc_cache.write()
        _shrink_l1(img, l1_needed)
        _shrink_reftable(img)
        _cut_file(img)
        if s.data is not None:
            s.data.truncate(new_size)
    else:
        grow_l1(img, l1_needed)
        if s.data_file_raw:
            # qcow2_co_truncate does a growing truncate of a data-file-raw image as
            # preallocation=metadata (preallocate_co), which grows the data file only.
            img.last_host_end = 0
            pos = old
            while pos < new_size:
                pos = cl.write_run(img, pos, new_size, memoryview(b""), pos, [], prealloc=True)
            end = img.last_host_end
            if s.data is not None and end > s.data.size():
                s.data.truncate(end)
        elif s.data is not None:
            s.data.truncate(new_size)
        if new_size > old and img.backing is not None and img.backing.size > old:
            _zero_new_area(img, old, new_size)
            # The zeroed area (still in the caches) durable before the size that exposes
            # it. QEMU writes the size first and zeroes after, so a crash between shows
            # the backing file's data there; here the order is the model's. Only the order
            # changes: the file at close holds the same bytes.
            s.flush_all()
    s.header.size = new_size
    # qcow2_co_truncate: the size field alone, with bdrv_pwrite_sync.
    s.pwrite_sync(HEADER_SIZE, struct.pack(">Q", new_size))
    img.size = new_size


def grow_l1(img: ImageView, min_size: int) -> None:
    """qcow2_grow_l1_table (exact size): the table copied to new clusters, overlap-checked
    first; the old one freed without a discard (QCOW2_DISCARD_OTHER). The new table and then the header
    fields are written with bdrv_pwrite_sync: the old clusters, once freed, can take guest
    data at once, and must not while the header on disk still points at them."""
    s = img.s
    old_size = s.l1_size
    if min_size <= old_size:
        return
    if min_size * 8 > QCOW_MAX_L1_SIZE:
        raise RequestError("L1 table would exceed QEMU's maximum size")
    table = s.l1_table + [0] * (min_size - old_size)
    new_off = rc.alloc_clusters(s, s.geometry.size_to_clusters(min_size * 8))
    s.rc_cache.flush()
    # The new clusters are checked against every kind of metadata, nothing ignored (the
    # header does not point at them yet). A refusal flags the image; QEMU's fail path frees
    # them in its refcount cache, which the flagged node never writes back, so the
    # allocation flushed just above stays in the file (the caller drops the caches).
    s.overlap.check_metadata(new_off, min_size * 8, 0)
    s.pwrite_sync(new_off, struct.pack(f">{min_size}Q", *table))
    old_off = s.l1_table_offset
    s.header.l1_size = min_size
    s.header.l1_table_offset = new_off
    s.l1_table = table
    s.overlap.stale = True
    s.pwrite_sync(HEADER_L1_FIELDS, struct.pack(">IQ", min_size, new_off))
    if old_size:
        rc.free_clusters(s, old_off, old_size * 8)


def _zero_new_area(img: ImageView, old: int, new_size: int) -> None:
    """The grown area reads as zeros, not as the longer backing file: zero clusters from
    the old size rounded up to a subcluster, then explicit zeros over the unaligned head
    (qcow2_co_truncate with BDRV_REQ_ZERO_WRITE, the new size already in effect)."""
    s = img.s
    zero_start = align_up(old, s.geometry.subcluster_size)
    img.size = new_size
    try:
        if new_size > zero_start and not cl.zeroize(img, zero_start, new_size - zero_start, False):
            raise UnsupportedFeature("zeroing the grown area over a backing file needs the "
                                     "zero flag (qcow2 v3)")
        if zero_start > old:
            cl.write(img, old, memoryview(bytes(min(zero_start, new_size) - old)))
    except Qcow2Error:
        img.size = old
        raise


def _shrink_l1(img: ImageView, new_l1: int) -> None:
    """qcow2_shrink_l1_table: entries past ``new_l1`` zeroed (l1_size stays), their L2
    tables freed and punched out, last first."""
    s = img.s
    if new_l1 >= s.l1_size:
        return
    freed = [e & L1E_OFFSET_MASK for e in s.l1_table[new_l1:]]
    s.l1_table[new_l1:] = [0] * len(freed)
    # The zeroed entries are flushed before their L2 tables are freed (bdrv_pwrite_zeroes,
    # then bdrv_flush of the file).
    s.pwrite_sync(s.l1_table_offset + 8 * new_l1, bytes(8 * len(freed)))
    s.overlap.stale = True
    for off in reversed(freed):
        if off:
            rc.free_clusters(s, off, s.cluster_size, discard=True)


def _shrink_reftable(img: ImageView) -> None:
    """qcow2_shrink_reftable: refcount blocks counting nothing but themselves are dropped.
    The shorter table is written with bdrv_pwrite_sync; then each dropped block's own
    refcount goes to 0, its cache entry is dropped unwritten and its cluster punched out
    (qcow2_discard_refcount_block), and the allocator may reuse it."""
    s = img.s
    cs = s.cluster_size
    per = s.geometry.refcount_block_entries
    dropped: list[int] = []
    for i, e in enumerate(s.reftable):
        off = e & REFT_OFFSET_MASK
        if not off:
            continue
        counts = s.rc_cache.get(off)
        own = off // cs % per if off // cs // per == i else -1
        nonzero = counts.nonzero()[0]
        if len(nonzero) == 0 or (len(nonzero) == 1 and int(nonzero[0]) == own):
            dropped.append(i)
    if not dropped:
        return
    kept = list(s.reftable)
    for i in dropped:
        kept[i] = 0
    s.pwrite_sync(s.refcount_table_offset, struct.pack(f">{len(kept)}Q", *kept))
    s.overlap.stale = True
    for i in dropped:
        _discard_refcount_block(s, s.reftable[i] & REFT_OFFSET_MASK)
        s.reftable[i] = 0


def _discard_refcount_block(s: State, block: int) -> None:
    """qcow2_discard_refcount_block: the block's own refcount (1, or the image is corrupt)
    set to 0 in whichever block counts it, possibly itself."""
    cs = s.cluster_size
    per = s.geometry.refcount_block_entries
    idx = block // cs
    counter = s.reftable[idx // per] & REFT_OFFSET_MASK
    if counter & (cs - 1) or not counter:
        raise CorruptionError(f"refcount block {block:#x} is not counted by an aligned block")
    counts = s.rc_cache.get(counter)
    if int(counts[idx % per]) != 1:
        raise CorruptionError(f"invalid refcount {int(counts[idx % per])} of refcount block {block:#x}")
    counts[idx % per] = 0
    s.rc_cache.mark_dirty(counter)
    s.free_cluster_index = min(s.free_cluster_index, idx)
    s.rc_cache.discard(block)
    s.host.punch_hole(block, cs)


def _cut_file(img: ImageView) -> None:
    """Cut the file after the last cluster with a refcount (qcow2_get_last_cluster)."""
    s = img.s
    cs = s.cluster_size
    s.l2_cache.write()
    s.rc_cache.write()
    size = s.host.size()
    last = -(-size // cs) - 1
    while last >= 0 and rc.get_refcount(s, last) == 0:
        last -= 1
    if (last + 1) * cs < size:
        s.host.truncate((last + 1) * cs)
