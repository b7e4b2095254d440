"""Guest writes (block/qcow2.c qcow2_co_pwritev_part over block/qcow2-cluster.c
qcow2_alloc_host_offset), and preallocation over the same path (block/qcow2.c
preallocate_co).

The request is consumed in runs of host-contiguous clusters. Per cluster:

===================================  =============================================
L2 entry                             action (block/qcow2-cluster.c)
===================================  =============================================
NORMAL or ZERO_ALLOC with COPIED      written in place (handle_copied). Touched
                                      subclusters that were not NORMAL get the rest
                                      of their bytes copied from what they read as
                                      (calculate_l2_meta, keep_old); ZERO flag
                                      cleared, alloc bits set (link_l2).
anything else (unallocated, zero      new cluster (handle_alloc: qcow2_alloc_clusters,
plain, compressed, or shared with     or qcow2_alloc_clusters_at to stay contiguous).
a snapshot: refcount > 1)             Naive COW: what the old cluster read as is
                                      merged with the data and written; the entry
                                      becomes offset|COPIED; the old cluster loses a
                                      reference (qcow2_alloc_cluster_link_l2).
===================================  =============================================

With extended L2 entries only the COW range calculate_l2_meta picks is written and
marked allocated. The COW regions are read as perform_cow reads them (one read
across the new data when both exist and at most 16 KiB lie between, else each
alone); when such a read fails (a compressed cluster that does not decode) the
request fails and the fresh clusters are freed (qcow2_alloc_cluster_abort).
Replaced clusters lose their reference once the whole request is linked, so no
piece of a request reuses a cluster another piece gave up (qcow2_co_pwritev_part).
Whether a COW region may be zeroed instead of copied is bdrv_co_is_zero_fast's
answer (handle_alloc_space), not is_zero's.
With an external data file, host offset = guest offset and no
refcounts are used (do_alloc_cluster_offset).
On an encrypted image every request is first widened to whole 512-byte sectors (the block
layer's padding for the cipher's alignment), and every data write, COW regions included, is
encrypted for the host offset it lands at (spec/encryption.py, Qcow2Crypto).

The COW choices that look arbitrary are QEMU's, and each is a named function below:
``handle_alloc_space`` (zero the new clusters instead of copying zeros) and
``perform_cow`` (which guest bytes the COW reads).

Errors: CorruptionError from the tables, an unaligned host offset, an invalid entry, or a
write that would overlap metadata (model/overlap.py; the facade flags the image);
UnflaggedError when a COW read fails.
"""

from __future__ import annotations

from typing import NamedTuple

from model import mapping as mp
from model import mapping_report as st
from model import overlap as ov
from model import read as rd
from model.state import State, UnflaggedError, mark_dirty
from spec import refblocks as rb
from spec.encryption import SECTOR_SIZE
from spec.entries import (
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_SUB_ALLOC_RANGE,
    QCOW_OFLAG_SUB_ZERO_RANGE,
    ClusterType,
    SubclusterType,
    cluster_type,
    subcluster_type,
)
from spec.errors import CorruptionError
from spec.geometry import align_down, align_up
from spec.qfile import Qcow2File


class Cow(NamedTuple):
    """The range a write to new clusters covers, split around the new data, as offsets from
    the start of its first cluster (calculate_l2_meta's cow_start and cow_end): bytes
    [start_from, start_to) and [end_from, end_to) keep what they read as now."""

    start_from: int
    start_to: int
    end_from: int
    end_to: int


PERFORM_COW_MERGE_MAX = 16384
"""perform_cow (block/qcow2.c) reads both COW regions in one request when at most this
many bytes of new data lie between them."""

def write(s: State, offset: int, data: bytes) -> None:
    """Write guest bytes (see the module doc); no range check (the facade's)."""
    mark_dirty(s)
    if s.crypto is not None and (offset % SECTOR_SIZE or len(data) % SECTOR_SIZE):
        # An encrypted image's request alignment is the 512-byte sector (qcow2_refresh_limits),
        # so the block layer widens the write to whole sectors, filling the edges with what
        # they read as now (block/io.c bdrv_co_pwritev_part's padding), before qcow2 sees it.
        start = align_down(offset, SECTOR_SIZE)
        stop = align_up(offset + len(data), SECTOR_SIZE)
        head = rd.read(s, start, offset - start) if offset > start else b""
        tail_at = offset + len(data)
        tail = rd.read(s, tail_at, stop - tail_at) if stop > tail_at else b""
        offset, data = start, head + bytes(data) + tail
    pos, end = offset, offset + len(data)
    # The clusters the request replaces lose their reference only when the whole request
    # is done. QEMU allocates every piece of a request (qcow2_alloc_host_offset in the
    # loop of qcow2_co_pwritev_part) before the write tasks, running concurrently,
    # link their L2 entries and free what they replace (qcow2_alloc_cluster_link_l2);
    # so a later piece never reuses a cluster an earlier piece gave up.
    frees: list[int] = []
    try:
        while pos < end:
            pos = write_run(s, pos, end, data, offset, frees=frees)
    finally:
        for old in frees:
            mp.free_any_cluster(s.q, old, request=False)


def write_run(s: State, pos: int, end: int, data: bytes, base: int, *, prealloc: bool = False,
              frees: list[int] | None = None) -> int:
    """One pass of qcow2_alloc_host_offset: as many clusters as are contiguous on the host.
    Returns the guest offset where the run stopped. ``prealloc`` allocates and links
    without writing (preallocate_co; link_l2 with m->prealloc leaves the bitmap alone).
    The old entries the run replaces are appended to ``frees`` for the caller to free;
    without it they are freed at the end of the run."""
    q, g = s.q, s.q.geometry
    cs = q.cluster_size
    expected: int | None = None
    own_frees = frees is None
    if frees is None:
        frees = []
    while pos < end:
        l2off = mp.l2_table_for_write(q, pos)
        table = mp.read_l2(q, l2off)
        idx = g.l2_index(pos)
        want = min(g.size_to_clusters(pos % cs + (end - pos)), g.l2_entries - idx)
        entry = table[idx][0]
        in_place = not needs_new_alloc(s, entry)
        if in_place:
            host = entry & L2E_OFFSET_MASK
            if host % cs:
                raise CorruptionError(f"data cluster offset {host:#x} unaligned (guest {pos:#x})")
            if expected is not None and host != expected:
                break
            n = count_clusters(s, table, idx, want, new_alloc=False)
            nbytes = min(end - pos, n * cs - pos % cs)
            write_clusters(s, pos, nbytes, host, data, base, keep_old=True, prealloc=prealloc)
        else:
            n = count_clusters(s, table, idx, want, new_alloc=True)
            if q.has_data_file:
                host = align_down(pos, cs)
            elif expected is None:
                host = rb.alloc_clusters(q, n)
            else:
                n = alloc_clusters_at(q, expected, n)
                if n == 0:
                    break
                host = expected
            nbytes = min(end - pos, n * cs - pos % cs)
            try:
                frees += write_clusters(s, pos, nbytes, host, data, base, keep_old=False,
                                        prealloc=prealloc)
            except UnflaggedError:
                # The COW read failed (-EIO): qcow2_alloc_cluster_abort gives the fresh
                # clusters back, without a discard; nothing was linked.
                if not q.has_data_file:
                    rb.free_clusters(q, host, n * cs)
                raise
        expected = host + pos % cs + nbytes
        # preallocate_co makes the file reach host_offset + bytes of its last
        # qcow2_alloc_host_offset: the exact end over clusters already allocated, and with
        # QEMU 7.2 the whole last subcluster over new ones (observed; a data-file-raw image
        # grown inside its last, already linked cluster ends exactly at the new size).
        s.last_host_end = expected if in_place else align_up(expected, g.subcluster_size)
        pos += nbytes
    if own_frees:
        for old in frees:
            mp.free_any_cluster(s.q, old, request=False)
    return pos


def preallocate(s: State, offset: int, n: int, *, full: bool) -> None:
    """preallocate_co over [offset, offset+n): allocate and link every cluster, then make
    the host file (or data file) reach the last allocated byte."""
    q = s.q
    s.last_host_end = 0
    pos, end = offset, offset + n
    while pos < end:
        pos = write_run(s, pos, end, b"", pos, prealloc=True)
    target = q.data_f if q.has_data_file else None
    size = q.file_size(target)
    # QEMU's file (or data file) then ends where write_run says (last_host_end).
    if s.last_host_end > size:
        if full:
            chunk = 1 << 20
            for at in range(size, s.last_host_end, chunk):
                q.pwrite(at, bytes(min(chunk, s.last_host_end - at)), target)
        else:
            q.truncate(s.last_host_end, target)


def needs_new_alloc(s: State, entry: int) -> bool:
    """cluster_needs_new_alloc: only NORMAL or ZERO_ALLOC clusters with COPIED (refcount
    exactly 1) can be written in place."""
    q = s.q
    t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
    if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        return not entry & QCOW_OFLAG_COPIED
    return True


def count_clusters(s: State, table: mp.L2Table, idx: int, want: int, *, new_alloc: bool) -> int:
    """count_single_write_clusters: consecutive clusters of the same kind; in-place ones
    must also be contiguous on the host."""
    expected = table[idx][0] & L2E_OFFSET_MASK
    i = 0
    while i < want:
        entry = table[idx + i][0]
        if needs_new_alloc(s, entry) != new_alloc:
            break
        if not new_alloc:
            if entry & L2E_OFFSET_MASK != expected:
                break
            expected += s.cluster_size
        i += 1
    return i


def write_clusters(s: State, pos: int, nbytes: int, host: int, data: bytes, base: int,
                   *, keep_old: bool, prealloc: bool = False) -> list[int]:
    """Write [pos, pos+nbytes) to the clusters starting at host cluster ``host`` and link
    them (calculate_l2_meta, perform_cow, qcow2_alloc_cluster_link_l2). Returns the old
    entries that lose a reference."""
    q, g = s.q, s.q.geometry
    cs, scs = q.cluster_size, g.subcluster_size
    first = align_down(pos, cs)
    l2off = mp.l2_table_for_write(q, pos)
    table = mp.read_l2(q, l2off)
    idx = g.l2_index(pos)
    n = g.size_to_clusters(pos - first + nbytes)
    cow_start_to = pos - first
    cow_end_from = cow_start_to + nbytes
    piece = data[pos - base:pos - base + nbytes]

    def sctype(i: int, at: int) -> SubclusterType:
        return _subcluster_type(s, table[idx + i], at)

    for i in range(n):
        e, b = table[idx + i]
        w_from = max(cow_start_to, i * cs)
        w_to = min(cow_end_from, (i + 1) * cs)
        for sc in range(w_from // scs, (w_to - 1) // scs + 1):
            if sctype(i, sc * scs) is SubclusterType.INVALID:
                raise CorruptionError(f"invalid cluster entry {e:#x}/{b:#x}")
    if keep_old and all(
        sctype(i, sc * scs) is SubclusterType.NORMAL
        for i in range(n)
        for sc in range(max(cow_start_to, i * cs) // scs,
                        (min(cow_end_from, (i + 1) * cs) - 1) // scs + 1)
    ):
        if prealloc:
            # calculate_l2_meta (skip_cow): nothing to link. Anything else kept in
            # place, a ZERO_ALLOC cluster say, is linked below like a write would
            # link it, and so turns into data (preallocate_co over a zeroed cluster).
            return []
        # Every touched subcluster is already allocated: a plain overwrite, no metadata.
        ov.check_data_write(q, host + cow_start_to, len(piece))
        q.data_pwrite(host + cow_start_to, _encrypted(s, host + cow_start_to, pos, piece))
        return []

    cow = calculate_l2_meta(s, table, idx, n, pos, nbytes, keep_old=keep_old)
    cow_start_from, cow_end_to = cow.start_from, cow.end_to

    if not prealloc:
        ov.check_data_write(q, host + cow_start_from, cow_end_to - cow_start_from)
        if not handle_alloc_space(s, first, host, cow, piece, in_place=keep_old):
            perform_cow(s, first, host, cow, piece)

    # Link the clusters (qcow2_alloc_cluster_link_l2).
    olds: list[int] = []
    table = mp.read_l2(q, l2off)
    for i in range(n):
        old_e, old_b = table[idx + i]
        if not keep_old and old_e:
            olds.append(old_e)
        new_b = old_b if prealloc else 0
        if q.extended_l2 and not prealloc:
            w_from = max(cow_start_from, i * cs) - i * cs
            w_to = min(cow_end_to, (i + 1) * cs) - i * cs
            lo, hi = w_from // scs, (w_to - 1) // scs + 1
            new_b = (old_b | QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi)) & ~QCOW_OFLAG_SUB_ZERO_RANGE(lo, hi)
        table[idx + i] = ((host + i * cs) | QCOW_OFLAG_COPIED, new_b)
    mp.write_l2(q, l2off, table)
    return olds


def calculate_l2_meta(s: State, table: mp.L2Table, idx: int, n: int, pos: int, nbytes: int,
                      *, keep_old: bool) -> Cow:
    """Where the COW starts in the first cluster and ends in the last, for a write of
    [pos, pos+nbytes) over the ``n`` entries of ``table`` from ``idx`` (block/qcow2-cluster.c,
    calculate_l2_meta). ``keep_old``: the clusters are written in place.

    In place, touched subclusters that were not data are completed to their boundaries. A
    new cluster is copied whole from the old one (or what it reads as), except: with
    extended L2 entries QEMU copies only from the first allocated subcluster and up to the
    last allocated one, and the rest stays unallocated in the new bitmap; a compressed
    cluster is always copied whole; one without a host cluster (plain zero, unallocated)
    only up to the subcluster boundaries around the new data.
    """
    q, g = s.q, s.q.geometry
    cs, scs = q.cluster_size, g.subcluster_size
    cow_start_to = pos - align_down(pos, cs)
    cow_end_from = cow_start_to + nbytes
    t_first = _subcluster_type(s, table[idx], pos)
    b0 = table[idx][1]
    if keep_old:
        cow_start_from = (cow_start_to if t_first is SubclusterType.NORMAL
                          else align_down(cow_start_to, scs))
    elif t_first is SubclusterType.COMPRESSED:
        cow_start_from = 0
    elif t_first in (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC):
        alloc = b0 & QCOW_L2_BITMAP_ALL_ALLOC
        first_alloc = (alloc & -alloc).bit_length() - 1 if alloc else 32
        cow_start_from = min(cow_start_to // scs, first_alloc) * scs if q.extended_l2 else 0
    else:
        cow_start_from = align_down(cow_start_to, scs)
    last_pos = pos + nbytes - 1
    t_last = _subcluster_type(s, table[idx + n - 1], last_pos)
    _, bl = table[idx + n - 1]
    sc_last = g.subcluster_index(last_pos)
    if keep_old:
        cow_end_to = cow_end_from if t_last is SubclusterType.NORMAL else align_up(cow_end_from, scs)
    elif t_last is SubclusterType.COMPRESSED:
        cow_end_to = align_up(cow_end_from, cs)
    elif t_last in (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC):
        cow_end_to = align_up(cow_end_from, cs)
        if q.extended_l2:
            alloc = bl & QCOW_L2_BITMAP_ALL_ALLOC
            clz = 32 - alloc.bit_length()
            cow_end_to -= min(g.subclusters_per_cluster - sc_last - 1, clz) * scs
    else:
        cow_end_to = align_up(cow_end_from, scs)
    return Cow(cow_start_from, cow_start_to, cow_end_from, cow_end_to)


def _subcluster_type(s: State, pair: tuple[int, int], offset: int) -> SubclusterType:
    q = s.q
    return subcluster_type(pair[0], pair[1], q.geometry.subcluster_index(offset),
                           extended_l2=q.extended_l2, has_data_file=q.has_data_file)


def handle_alloc_space(s: State, first: int, host: int, cow: Cow, piece: bytes, *,
                       in_place: bool = False) -> bool:
    """QEMU's shortcut for COW regions that read as zeros (block/qcow2.c handle_alloc_space,
    is_zero_cow): when there is a COW region and each one is zero by ONE answer of
    bdrv_co_is_zero_fast (mapping_report.is_zero_fast), the whole range is zeroed on the host
    with a write-zeroes request that may not fall back to writing (fallocate; Qcow2File.
    write_zeroes_no_fallback), and only the new data is written. Returns False (nothing
    written) when the shortcut does not apply and the COW must be copied (perform_cow).
    Holes in the host file are what ``qemu-img map`` sees, so this matters to its output."""
    q = s.q
    if cow.start_from == cow.start_to and cow.end_from == cow.end_to:
        return False
    if s.crypto is not None:
        # Zeroed host bytes do not read back as zeros through a cipher: QEMU skips the
        # shortcut on encrypted images and writes encrypted zeros (handle_alloc_space).
        return False
    if not (st.is_zero_fast(s, first + cow.start_from, cow.start_to - cow.start_from)
            and st.is_zero_fast(s, first + cow.end_from, cow.end_to - cow.end_from)):
        return False
    target = q.data_f if q.has_data_file else None
    if in_place:
        # Crash safety, where the model departs from QEMU: QEMU zeroes the whole range, the
        # new data's part included, and writes the data after. Written in place (extended
        # L2 entries: new subclusters of an allocated cluster) that part can hold live data,
        # and a power cut between the two calls would leave it zeroed, and a sector half
        # old data, half zeros. So only the COW regions are zeroed; the file's bytes and
        # holes end up the same.
        regions = [(cow.start_from, cow.start_to), (cow.end_from, cow.end_to)]
        for lo, hi in regions:
            if hi > lo and not q.write_zeroes_no_fallback(host + lo, hi - lo, target):
                return False
    elif not q.write_zeroes_no_fallback(host + cow.start_from, cow.end_to - cow.start_from,
                                        target):
        return False
    q.data_pwrite(host + cow.start_to, piece)
    return True


def perform_cow(s: State, first: int, host: int, cow: Cow, piece: bytes) -> None:
    """Naive COW (block/qcow2.c perform_cow, the model's single write): what the COW regions
    read as now, with the new data laid over them, written in one go.

    Which guest bytes are read is QEMU's choice: nothing without COW regions; the whole
    range, the new data's part included, when both regions exist and at most
    PERFORM_COW_MERGE_MAX bytes lie between them; else each region alone. It matters where
    reading fails (a compressed cluster that does not decode, UnflaggedError): a cluster
    that is overwritten whole is read only in the first case."""
    head, tail = cow.start_to - cow.start_from, cow.end_to - cow.end_from
    merged = bytearray(cow.end_to - cow.start_from)
    if head and tail and cow.end_from - cow.start_to <= PERFORM_COW_MERGE_MAX:
        merged[:] = rd.read(s, first + cow.start_from, len(merged))
    else:
        if head:
            merged[:head] = rd.read(s, first + cow.start_from, head)
        if tail:
            merged[len(merged) - tail:] = rd.read(s, first + cow.end_from, tail)
    merged[head:head + len(piece)] = piece
    # On an encrypted image the COW regions were read as plaintext and are encrypted with the
    # new data for the new host offset (perform_cow, do_perform_cow_encrypt).
    s.q.data_pwrite(host + cow.start_from,
                    _encrypted(s, host + cow.start_from, first + cow.start_from, bytes(merged)))


def _encrypted(s: State, host: int, guest: int, data: bytes) -> bytes:
    """``data`` as stored at host offset ``host`` (guest offset ``guest``): encrypted on an
    encrypted image (qcow2_co_encrypt; the sector numbers are host offsets for LUKS, guest
    offsets for legacy AES), as is otherwise. write() made every piece whole sectors."""
    if s.crypto is None:
        return data
    return s.crypto.encrypt(host, guest, data)


def alloc_clusters_at(q: Qcow2File, offset: int, n: int) -> int:
    """Allocate up to ``n`` clusters exactly at ``offset``; returns how many were free there
    (block/qcow2-refcount.c, qcow2_alloc_clusters_at). The cursor does not move. handle_alloc
    uses it to keep a run host-contiguous after its first cluster."""
    while True:
        i = 0
        while i < n and rb.get_refcount(q, offset // q.cluster_size + i) == 0:
            i += 1
        try:
            rb.update_refcount(q, offset, i * q.cluster_size, 1)
        except rb.Again:
            continue
        return i
