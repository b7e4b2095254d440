"""Changing the virtual size (block/qcow2.c qcow2_co_truncate; block/qcow2-cluster.c
qcow2_grow_l1_table, qcow2_shrink_l1_table; block/qcow2-refcount.c qcow2_shrink_reftable,
qcow2_get_last_cluster).

======================  ===================================================================
request                 what happens
======================  ===================================================================
grow                    the L1 table is replaced by a larger one (exactly the size needed)
                        at newly allocated clusters, the old one freed; the header size
                        is updated. Nothing else is allocated, unless:
grow, data-file-raw     metadata preallocation of the new area (every new cluster linked
                        to its offset in the data file), which grows the data file.
grow over a backing     the new area is zeroed (v3: zero clusters, plus a written head
file longer than the    cluster when the old size is not subcluster-aligned); v2 fails
old size                with UnsupportedFeature, the size unchanged (_zero_new_area).
shrink (shrink=True)    clusters past the new end (rounded up to a cluster) are fully
                        discarded (entries 0, clusters freed and punched out); L1 entries
                        past the new L1 size are zeroed and their L2 tables freed; refcount
                        blocks that only count themselves are dropped; the file is cut after
                        the last used cluster.
======================  ===================================================================

With an external data file, the data file is resized to the new size too.

Errors: RequestError for a size that is not a multiple of 512, a shrink without
``shrink=True``, a v2 image with snapshots (QEMU refuses it); UnsupportedFeature for a
v2 image grown over a longer backing file; CorruptionError from the tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model import mapping as mp
from model import overlap as ov
from model import write as wr
from model import zeroes as zr
from model.state import State, mark_dirty
from spec import refblocks as rb
from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.errors import Qcow2Error, RequestError, UnsupportedFeature
from spec.geometry import align_up
from spec.limits import QCOW_MAX_L1_SIZE
from spec.qfile import Qcow2File

if TYPE_CHECKING:
    import numpy as np
else:
    from spec.lazy import numpy as np  # executed at first use: CLI start-up (spec/lazy.py)


def grow_l1(q: Qcow2File, min_size: int) -> None:
    """qcow2_grow_l1_table with exact_size: copy the table to a larger one (overlap-checked
    first)."""
    old_size = int(q.header.l1_size)
    if min_size <= old_size:
        return
    if min_size * 8 > QCOW_MAX_L1_SIZE:
        raise RequestError("L1 table would exceed QEMU's maximum size")
    table = mp.read_l1(q) + [0] * (min_size - old_size)
    new_off = rb.alloc_clusters(q, q.geometry.size_to_clusters(min_size * 8))
    # The new clusters are checked against every kind of metadata, nothing ignored (the
    # header does not point at them yet). QEMU flushed its refcount cache first and frees
    # them on a refusal only in that cache, never written back once the image is flagged:
    # the allocation stays in the file, as here.
    ov.check_metadata_write(q, new_off, min_size * 8, "")
    mp.write_l1(q, table, new_off)
    old_off = int(q.header.l1_table_offset)
    q.header.l1_size = min_size
    q.header.l1_table_offset = new_off
    q.write_header()
    if old_size:
        rb.free_clusters(q, old_off, old_size * 8)


def resize(s: State, new_size: int, shrink: bool) -> None:
    """qcow2_co_truncate with preallocation off (see the module doc)."""
    q = s.q
    if new_size < 0 or new_size % 512:
        raise RequestError("the new size must be a non-negative multiple of 512")
    nb_snapshots = int(q.header.nb_snapshots)
    if nb_snapshots and q.version < 3:
        raise RequestError("can't resize a v2 image which has snapshots")
    old = s.size
    if new_size < old and not shrink:
        raise RequestError("use shrink=True to shrink an image")
    mark_dirty(s)
    g = q.geometry
    new_l1 = g.l1_size_for(new_size)
    if new_size < old:
        start = align_up(new_size, q.cluster_size)
        if start < old:
            zr.cluster_discard(s, start, old - start, request=True, full=True)
        _shrink_l1(q, new_l1)
        _shrink_reftable(q)
        _cut_file(q)
        if q.has_data_file:
            q.truncate(new_size, q.data_f)
    else:
        grow_l1(q, new_l1)
        if q.data_file_raw:
            # qcow2_co_truncate: with data-file-raw a growing truncate without
            # preallocation is done as preallocation=metadata, so that the L2 tables keep
            # covering the whole data file (as qemu-img create made them). preallocate_co
            # links every new cluster to its own offset in the data file and only grows
            # the data file, never cuts it.
            wr.preallocate(s, old, new_size - old, full=False)
        elif q.has_data_file:
            q.truncate(new_size, q.data_f)
        if new_size > old and s.backing is not None and s.backing.size > old:
            _zero_new_area(s, old, new_size)
    q.header.size = new_size
    q.write_header()
    s.size = new_size


def _zero_new_area(s: State, old: int, new_size: int) -> None:
    """Make [old, new_size) read as zeros instead of backing data.

    block/io.c bdrv_co_truncate asks the driver for BDRV_REQ_ZERO_WRITE when the image
    grows and its backing file is longer than the old size; block/qcow2.c qcow2_co_truncate
    then, with the new size already in effect (total_sectors), zeroes from the old size
    rounded up to a subcluster to the new end with qcow2_subcluster_zeroize, and only then
    writes explicit zeros over the unaligned head [old, that boundary) with an ordinary
    write (which allocates its cluster and copies the part below ``old`` from the backing
    file). If the zeroing is refused (v2 image: no zero flag, and a discard would expose the
    backing file) QEMU fails the truncate with -ENOTSUP after the L1 table has grown, and
    the size stays the old one.
    """
    zero_start = align_up(old, s.q.geometry.subcluster_size)
    s.size = new_size
    try:
        if new_size > zero_start and not zr.zeroize(s, zero_start, new_size - zero_start, False):
            raise UnsupportedFeature("zeroing the grown area over a backing file needs the "
                                     "zero flag (qcow2 v3)")
        if zero_start > old:
            wr.write(s, old, bytes(min(zero_start, new_size) - old))
    except Qcow2Error:
        s.size = old
        raise


def _shrink_l1(q: Qcow2File, new_l1: int) -> None:
    """qcow2_shrink_l1_table: zero the entries past ``new_l1``; free their L2 tables. The
    header keeps the old l1_size."""
    table = mp.read_l1(q)
    if new_l1 >= len(table):
        return
    freed = [e & L1E_OFFSET_MASK for e in table[new_l1:]]
    mp.write_l1(q, table[:new_l1] + [0] * (len(table) - new_l1))
    for off in reversed(freed):
        if off:
            rb.free_clusters(q, off, q.cluster_size, discard=True)


def _shrink_reftable(q: Qcow2File) -> None:
    """qcow2_shrink_reftable: drop refcount blocks that count nothing but themselves."""
    cs = q.cluster_size
    bits = q.geometry.refcount_bits
    entries = q.geometry.refcount_block_entries
    table = np.frombuffer(q.pread(int(q.header.refcount_table_offset),
                                  int(q.header.refcount_table_clusters) * cs), dtype=">u8")
    dropped: list[int] = []
    # Only the non-zero entries matter (numpy finds them: with 2 MiB clusters the table has
    # 262144 entries).
    for i in np.flatnonzero(table & np.uint64(REFT_OFFSET_MASK)).tolist():
        off = int(table[i]) & REFT_OFFSET_MASK
        data = bytearray(q.pread(off, cs))
        if off // cs // entries == i:
            rb.refcount_set(data, off // cs % entries, bits, 0)
        if data == bytes(cs):
            dropped.append(i)
    if not dropped:
        return
    new = table.copy()
    new[dropped] = 0
    rb.write_reftable(q, new.tolist())
    for i in dropped:
        rb.free_clusters(q, int(table[i]) & REFT_OFFSET_MASK, cs, discard=True)


def _cut_file(q: Qcow2File) -> None:
    """Truncate the file after the last cluster with a refcount (qcow2_get_last_cluster)."""
    cs = q.cluster_size
    size = q.file_size()
    last = -(-size // cs) - 1
    while last >= 0 and rb.get_refcount(q, last) == 0:
        last -= 1
    if (last + 1) * cs < size:
        q.truncate((last + 1) * cs)
