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
request fails and the fresh clusters are freed (qcow2_alloc_cluster_abort). A run of
several pieces has its data written before any COW (merge_cow merges only a run of one
piece), so there the data stays in the file (write_run).
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
from spec.cow import PERFORM_COW_MERGE_MAX, QCOW2_MAX_WORKERS, cow_range
from spec.encryption import SECTOR_SIZE
from spec.entries import (
    L2E_OFFSET_MASK,
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
    failed: list[UnflaggedError] = []
    runs = 0
    try:
        # The runs are write tasks in an AioTaskPool of QCOW2_MAX_WORKERS: a failed COW read
        # does not stop the loop, which checks the pool's status only before the next run and
        # sees an error only once a task has finished; with qemu-io's thread-pool I/O every
        # task yields at its first request, so each run is started, up to the one that has
        # to wait for a free worker (after which the error is taken to be seen: the first
        # task finishes first). The request then fails with the first error (deep seed
        # 130192: the run after a failed COW wrote its data in place).
        while pos < end and (not failed or runs <= QCOW2_MAX_WORKERS):
            pos = write_run(s, pos, end, data, offset, frees, failed=failed)
            runs += 1
        if failed:
            raise failed[0]
    finally:
        for old in frees:
            mp.free_any_cluster(s.q, old, request=False)


class Segment(NamedTuple):
    """One piece of a run that qcow2_alloc_host_offset hands back: ``n`` clusters from guest
    ``pos`` (``nbytes`` of new data) at host cluster ``host``, written in place or to new
    clusters, with the COW range calculate_l2_meta gives it; ``cow`` is None when every
    touched subcluster already holds data (no QCowL2Meta: nothing to copy or link)."""

    pos: int
    nbytes: int
    host: int
    n: int
    in_place: bool
    cow: Cow | None


def write_run(s: State, pos: int, end: int, data: bytes, base: int, frees: list[int], *,
              prealloc: bool = False, failed: list[UnflaggedError] | None = None) -> int:
    """One qcow2_alloc_host_offset and the write task over its host-contiguous run; returns
    the guest offset where the run stopped. ``prealloc`` allocates and links without
    writing (preallocate_co; link_l2 with m->prealloc leaves the bitmap alone). The old
    entries the run replaces are appended to ``frees``, for the caller to free. A failed
    COW read (UnflaggedError) is appended to ``failed`` when given, and raised otherwise.

    QEMU first maps the whole run (allocating, and computing every piece's COW range), and
    an error there writes nothing. Then the task writes (qcow2_co_pwritev_task):
    a run of one piece with COW regions goes through perform_cow in one write (merge_cow);
    any other run has its guest data written first, in one request over the whole run, and
    then each piece's COW regions are copied and linked, the last piece first (QEMU's list
    of QCowL2Meta is built by prepending). A COW read that fails (a compressed cluster that
    does not decode) stops there: the later pieces stay linked, that piece and the earlier
    ones are given back, and the data written first stays in the file."""
    q = s.q
    start = pos
    segs: list[Segment] = []
    pos = _map_run(s, pos, end, segs)
    if not segs:
        return pos
    s.last_host_end = _host_end(s, segs[-1])
    metas = [sg for sg in segs if sg.cow is not None]
    if prealloc:
        for sg in reversed(metas):
            frees += _link(s, sg, prealloc=True)
    else:
        task_host = segs[0].host + segs[0].pos % q.cluster_size
        ov.check_data_write(q, task_host, pos - start)  # qcow2_co_pwritev_part
        zeroed = {sg.pos for sg in reversed(metas) if handle_alloc_space(s, sg)}
        piece = data[start - base:pos - base]
        if len(segs) == 1 and metas and segs[0].pos not in zeroed and _has_cow(metas[0]):
            # merge_cow: the data goes out with the COW regions, in perform_cow's write.
            try:
                perform_cow(s, metas[0], piece)
            except UnflaggedError as e:
                _abort(s, metas)
                return _failed(e, failed, pos)
            frees += _link(s, metas[0])
        else:
            q.data_pwrite(task_host, _encrypted(s, task_host, start, piece))
            for i in range(len(metas) - 1, -1, -1):
                sg = metas[i]
                try:
                    if sg.pos not in zeroed:
                        perform_cow(s, sg, None)
                except UnflaggedError as e:
                    _abort(s, metas[:i + 1])
                    return _failed(e, failed, pos)
                frees += _link(s, sg)
    return pos


def _failed(e: UnflaggedError, failed: list[UnflaggedError] | None, pos: int) -> int:
    """A run's COW read failed: raise it, or keep it for the caller and go on from ``pos``."""
    if failed is None:
        raise e
    failed.append(e)
    return pos


def _map_run(s: State, pos: int, end: int, segs: list[Segment]) -> int:
    """qcow2_alloc_host_offset: the pieces of one host-contiguous run, appended to ``segs``
    (new clusters allocated as they are found). Returns where the run stopped."""
    q, g = s.q, s.q.geometry
    cs = q.cluster_size
    expected: int | None = None
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
        # An invalid entry fails the mapping after this piece's clusters were allocated:
        # QEMU leaks them (handle_alloc returns before its QCowL2Meta exists).
        cow = _plan_cow(s, table, idx, n, pos, nbytes, keep_old=in_place)
        segs.append(Segment(pos, nbytes, host, n, in_place, cow))
        expected = host + pos % cs + nbytes
        pos += nbytes
    return pos


def _host_end(s: State, sg: Segment) -> int:
    """Where preallocate_co makes the file end after this last piece: exactly at its end
    over clusters already allocated, and with QEMU 7.2 at the end of its last subcluster
    over new ones (observed; a data-file-raw image grown inside its last, already linked
    cluster ends exactly at the new size)."""
    end = sg.host + sg.pos % s.cluster_size + sg.nbytes
    return end if sg.in_place else align_up(end, s.q.geometry.subcluster_size)


def _abort(s: State, segs: list[Segment]) -> None:
    """qcow2_alloc_cluster_abort for each piece after a COW read failed (-EIO, the image not
    flagged): new clusters are given back, without a discard; nothing was linked. After an
    error that flags the image QEMU gives them back in its cache only, which never reaches
    the file once the node is dropped, so the cacheless model leaves them."""
    if s.q.has_data_file:
        return
    for sg in segs:
        if not sg.in_place:
            rb.free_clusters(s.q, sg.host, sg.n * s.cluster_size)


def _has_cow(sg: Segment) -> bool:
    cow = sg.cow
    return cow is not None and (cow.start_from < cow.start_to or cow.end_from < cow.end_to)


def preallocate(s: State, offset: int, n: int, *, full: bool) -> None:
    """preallocate_co over [offset, offset+n): allocate and link every cluster, then make
    the host file (or data file) reach the last allocated byte."""
    q = s.q
    s.last_host_end = 0
    pos, end = offset, offset + n
    while pos < end:
        frees: list[int] = []
        pos = write_run(s, pos, end, b"", pos, frees, prealloc=True)
        for old in frees:
            mp.free_any_cluster(q, old, request=False)
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


def _plan_cow(s: State, table: mp.L2Table, idx: int, n: int, pos: int, nbytes: int,
              *, keep_old: bool) -> Cow | None:
    """calculate_l2_meta for a piece: CorruptionError on an invalid touched subcluster;
    None when the piece is written in place over subclusters that all hold data."""
    cs, scs = s.cluster_size, s.q.geometry.subcluster_size
    first = align_down(pos, cs)
    w_lo, w_hi = pos - first, pos - first + nbytes
    types = [(table[idx + i], _subcluster_type(s, table[idx + i], sc * scs))
             for i in range(n)
             for sc in range(max(w_lo, i * cs) // scs, (min(w_hi, (i + 1) * cs) - 1) // scs + 1)]
    for (e, b), t in types:
        if t is SubclusterType.INVALID:
            raise CorruptionError(f"invalid cluster entry {e:#x}/{b:#x}")
    if keep_old and all(t is SubclusterType.NORMAL for _, t in types):
        # Written over data: no QCowL2Meta. (A preallocation links anything else kept in
        # place, a ZERO_ALLOC cluster say, like a write would, so it turns into data.)
        return None
    return calculate_l2_meta(s, table, idx, n, pos, nbytes, keep_old=keep_old)


def _link(s: State, sg: Segment, *, prealloc: bool = False) -> list[int]:
    """qcow2_alloc_cluster_link_l2: point the piece's entries at its clusters (COPIED), and
    with extended L2 entries mark the COW range allocated. Returns the old entries that
    lose a reference."""
    q, g = s.q, s.q.geometry
    cs, scs = q.cluster_size, g.subcluster_size
    assert sg.cow is not None
    lo_b, hi_b = sg.cow.start_from, sg.cow.end_to
    l2off = mp.l2_table_for_write(q, sg.pos)
    table = mp.read_l2(q, l2off)
    idx = g.l2_index(sg.pos)
    olds: list[int] = []
    for i in range(sg.n):
        old_e, old_b = table[idx + i]
        if not sg.in_place and old_e:
            olds.append(old_e)
        new_b = old_b if prealloc else 0
        if q.extended_l2 and not prealloc:
            lo = (max(lo_b, i * cs) - i * cs) // scs
            hi = (min(hi_b, (i + 1) * cs) - i * cs - 1) // scs + 1
            new_b = (old_b | QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi)) & ~QCOW_OFLAG_SUB_ZERO_RANGE(lo, hi)
        table[idx + i] = ((sg.host + i * cs) | QCOW_OFLAG_COPIED, new_b)
    mp.write_l2(q, l2off, table)
    return olds


def calculate_l2_meta(s: State, table: mp.L2Table, idx: int, n: int, pos: int, nbytes: int,
                      *, keep_old: bool) -> Cow:
    """The COW range of a write of [pos, pos+nbytes) over the ``n`` entries of ``table``
    from ``idx`` (block/qcow2-cluster.c, calculate_l2_meta; spec/cow.py). ``keep_old``: the
    clusters are written in place."""
    start_to = pos - align_down(pos, s.cluster_size)
    end_from = start_to + nbytes
    start_from, end_to = cow_range(s.q.geometry, table[idx], table[idx + n - 1], start_to, end_from,
                                   keep_old=keep_old, has_data_file=s.q.has_data_file)
    return Cow(start_from, start_to, end_from, end_to)


def _subcluster_type(s: State, pair: tuple[int, int], offset: int) -> SubclusterType:
    q = s.q
    return subcluster_type(pair[0], pair[1], q.geometry.subcluster_index(offset),
                           extended_l2=q.extended_l2, has_data_file=q.has_data_file)


def handle_alloc_space(s: State, sg: Segment) -> bool:
    """QEMU's shortcut for COW regions that read as zeros (block/qcow2.c handle_alloc_space,
    is_zero_cow): when the piece has a COW region and each one is zero by ONE answer of
    bdrv_co_is_zero_fast (mapping_report.is_zero_fast), the range is zeroed on the host
    with a write-zeroes request that may not fall back to writing (fallocate; Qcow2File.
    write_zeroes_no_fallback); the data is written after, with the run's. Returns False
    (nothing zeroed) when the shortcut does not apply and the COW must be copied
    (perform_cow). Holes in the host file are what ``qemu-img map`` sees, so this matters
    to its output."""
    q, cow, host = s.q, sg.cow, sg.host
    assert cow is not None
    first = align_down(sg.pos, s.cluster_size)
    if not _has_cow(sg):
        return False
    if s.crypto is not None:
        # Zeroed host bytes do not read back as zeros through a cipher: QEMU skips the
        # shortcut on encrypted images and writes encrypted zeros (handle_alloc_space).
        return False
    if not (st.is_zero_fast(s, first + cow.start_from, cow.start_to - cow.start_from)
            and st.is_zero_fast(s, first + cow.end_from, cow.end_to - cow.end_from)):
        return False
    target = q.data_f if q.has_data_file else None
    ov.check_data_write(q, host + cow.start_from, cow.end_to - cow.start_from)
    if sg.in_place:
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
        return True
    return q.write_zeroes_no_fallback(host + cow.start_from, cow.end_to - cow.start_from, target)


def perform_cow(s: State, sg: Segment, piece: bytes | None) -> None:
    """Naive COW (block/qcow2.c perform_cow): what the piece's COW regions read as now,
    written to its clusters; with the new data laid over them in one write when ``piece``
    is given (merge_cow), else each region in a write of its own.

    Which guest bytes are read is QEMU's choice: nothing without COW regions; the whole
    range, the new data's part included, when both regions exist and at most
    PERFORM_COW_MERGE_MAX bytes lie between them; else each region alone. It matters where
    reading fails (a compressed cluster that does not decode, UnflaggedError): a cluster
    that is overwritten whole is read only in the first case."""
    cow, host = sg.cow, sg.host
    assert cow is not None
    first = align_down(sg.pos, s.cluster_size)
    head, tail = cow.start_to - cow.start_from, cow.end_to - cow.end_from
    merged = bytearray(cow.end_to - cow.start_from)
    if head and tail and cow.end_from - cow.start_to <= PERFORM_COW_MERGE_MAX:
        merged[:] = rd.read(s, first + cow.start_from, len(merged))
    else:
        if head:
            merged[:head] = rd.read(s, first + cow.start_from, head)
        if tail:
            merged[len(merged) - tail:] = rd.read(s, first + cow.end_from, tail)
    # On an encrypted image the COW regions were read as plaintext and are encrypted with the
    # new data for the new host offset (perform_cow, do_perform_cow_encrypt).
    if piece is not None:
        merged[head:head + len(piece)] = piece
        regions = [(cow.start_from, cow.end_to)]
    else:
        regions = [(lo, hi) for lo, hi in ((cow.start_from, cow.start_to), (cow.end_from, cow.end_to))
                   if hi > lo]
    for lo, hi in regions:
        # do_perform_cow_write checks each write it makes.
        ov.check_data_write(s.q, host + lo, hi - lo)
        chunk = bytes(merged[lo - cow.start_from:hi - cow.start_from])
        s.q.data_pwrite(host + lo, _encrypted(s, host + lo, first + lo, chunk))


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
