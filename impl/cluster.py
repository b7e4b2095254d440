"""Guest-to-host mapping through the L2 slice cache, allocation, copy-on-write, subclusters,
zeroing, discard and the overlap checks (block/qcow2-cluster.c, qcow2.c, qcow2-refcount.c).

A cached L2 slice is an ``array('Q')`` of host-order words: entry ``i`` of a slice is word
``i`` (word ``2i``, bitmap ``2i+1`` with extended L2). Every request is cut where QEMU cuts
it: at the end of an L2 slice (handle_copied / handle_alloc limit nb_clusters to
``l2_slice_size - l2_index``), so the same requests with the same ``l2_cache_entry_size``
give the same allocations as qemu-io.

Write ordering (QEMU's): a new L2 table is written, through a cache flush, before the L1
entry pointing at it (l2_allocate); an L2 slice changed to point at a new cluster depends on
the refcount cache (qcow2_alloc_cluster_link_l2 -> qcow2_cache_set_dependency) and on a file
flush after the guest data. QEMU asks for that flush only when it copied COW regions
(perform_cow -> qcow2_cache_depends_on_flush; a write with no COW region links the cluster
without it); impl asks after every allocating write, an ordering at least as strict as
QEMU's, so that a crash never leaves an L2 entry pointing at data that never arrived.

Two more barriers where QEMU is not crash-safe (issue 17), neither changing what the file
ends up holding: a cluster freed in this epoch is handed out again (QEMU's allocator order)
only after the L2 cache is written back and the file flushed (State.settle_freed), and freed
ranges are punched only after the same (State.process_discards). A write in place with
extended L2 entries zeroes only its COW regions, not the live subclusters under the new data
(QEMU's handle_alloc_space zeroes the whole range first).
"""

from __future__ import annotations

import sys
from array import array
from typing import NamedTuple

from impl import refcount as rc
from impl.hostfile import HostFile
from impl.state import ImageView, State
from spec.cow import PERFORM_COW_MERGE_MAX, QCOW2_MAX_WORKERS, cow_range
from spec.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_SUB_ALLOC_RANGE,
    QCOW_OFLAG_SUB_ZERO_RANGE,
    QCOW_OFLAG_ZERO,
    ClusterType,
    SubclusterType,
    cluster_type,
    compressed_range,
    subcluster_type,
)
from spec.errors import CorruptionError, check_node_dropped
from spec.geometry import align_down, align_up, split_aligned
from spec.hostio import HostIOError

ST = SubclusterType
_SWAP = sys.byteorder == "little"


class UnflaggedError(CorruptionError):
    """Fails the request without flagging the image: a compressed cluster that does not
    decode, or a failing backing file (qcow2_co_preadv_compressed returns -EIO)."""


# --- L2 slice codec ---------------------------------------------------------------------------

def decode_l2(data: bytes) -> array:
    words = array("Q")
    words.frombytes(data)
    if _SWAP:
        words.byteswap()
    return words


def encode_l2(words: array) -> bytes:
    if not _SWAP:
        return words.tobytes()
    out = array("Q", words)
    out.byteswap()
    return out.tobytes()


# --- lookups ----------------------------------------------------------------------------------

def l2_slice(s: State, guest: int, l1: list[int] | None = None) -> tuple[array, int] | None:
    """(slice words, word index of ``guest``'s entry), or None without an L2 table
    (qcow2_get_host_offset's lookup through l2_load)."""
    i1 = guest >> s.l1_shift
    table = s.l1_table if l1 is None else l1
    if i1 >= len(table):
        return None
    l2off = table[i1] & L1E_OFFSET_MASK
    if not l2off:
        return None
    if l2off & (s.cluster_size - 1):
        raise CorruptionError(f"L2 table offset {l2off:#x} unaligned (L1 index {i1:#x})")
    l2i = (guest >> s.cluster_bits) & s.l2_mask
    per = s.slice_entries
    cache = s.l2_cache
    words = cache.get(l2off + (l2i // per) * cache.entry_size)
    return words, (l2i % per) << s.extended_l2


def get_entry(s: State, guest: int, l1: list[int] | None = None) -> tuple[int, int]:
    """(l2_entry, l2_bitmap) mapping ``guest``; (0, 0) without an L2 table."""
    found = l2_slice(s, guest, l1)
    if found is None:
        return 0, 0
    words, w = found
    return (words[w], words[w + 1]) if s.extended_l2 else (words[w], 0)


def slice_for_write(s: State, guest: int) -> tuple[int, array, int]:
    """get_cluster_table: (cache key, slice words, word index) of a writable L2 slice,
    allocating the table or unsharing it from a snapshot first (l2_allocate)."""
    g = s.geometry
    i1 = guest >> (g.cluster_bits + g.l2_bits)
    l1e = s.l1_table[i1]
    l2off = l1e & L1E_OFFSET_MASK
    if l2off & (s.cluster_size - 1):
        raise CorruptionError(f"L2 table offset {l2off:#x} unaligned (L1 index {i1:#x})")
    if not (l2off and l1e & QCOW_OFLAG_COPIED):
        l2off = _l2_allocate(s, i1, l2off)
    l2i = (guest >> g.cluster_bits) & (g.l2_entries - 1)
    per = s.slice_entries
    key = l2off + (l2i // per) * s.l2_cache.entry_size
    return key, s.l2_cache.get(key), (l2i % per) << (1 if s.extended_l2 else 0)


def _l2_allocate(s: State, i1: int, old: int) -> int:
    """l2_allocate: a new table (copy of the old one, or zeros), written through a cache
    flush before the L1 entry; a table shared with a snapshot loses this reference
    (get_cluster_table, QCOW2_DISCARD_OTHER: no hole punched)."""
    cs = s.cluster_size
    new = rc.alloc_clusters(s, 1)
    if new == 0:
        # Refcounts that call the header free (damage, a truncated refcount block) would put
        # the table on it: l2_allocate flags the image instead, before any flush.
        raise CorruptionError("preventing invalid allocation of L2 table at offset 0")
    old_entry = s.l1_table[i1]
    try:
        s.rc_cache.flush()
        es = s.l2_cache.entry_size
        for k in range(0, cs, es):
            # The old slice is taken first: loading it may evict, and the fresh one must stay.
            src = s.l2_cache.get(old + k) if old else None
            fresh = s.l2_cache.get_empty(new + k)
            if src is not None:
                fresh[:] = src
            s.l2_cache.mark_dirty(new + k)
        s.l2_cache.flush()
        s.l1_table[i1] = new | QCOW_OFLAG_COPIED
        s.write_l1_entry(i1, sync=False)
    except HostIOError:
        # l2_allocate's fail path: the L1 entry is restored and the new table freed
        # (QCOW2_DISCARD_ALWAYS), its cached slices dropped with it, so a write that failed on
        # the host (EFBIG for an L1 table a damaged offset put out of reach) leaks nothing.
        s.l1_table[i1] = old_entry
        rc.free_clusters(s, new, cs, discard=True)
        raise
    # The L1 entry is in the file now. QEMU's fail path would free the new table even when
    # only the flush after it fails (bdrv_pwrite_sync), leaving the file's L1 entry on a free
    # cluster; here the table stays in use and the error goes up (a leak of the old table at
    # worst), so a failed flush never makes the image corrupt.
    s.overlap.stale = True
    s.flush_file()
    if old:
        rc.free_clusters(s, old, cs)
    return new


def needs_new_alloc(s: State, entry: int) -> bool:
    """cluster_needs_new_alloc: only NORMAL/ZERO_ALLOC clusters with COPIED (refcount 1) are
    written in place."""
    t = cluster_type(entry, extended_l2=s.extended_l2, has_data_file=s.has_data_file)
    if t is ClusterType.NORMAL or t is ClusterType.ZERO_ALLOC:
        return not entry & QCOW_OFLAG_COPIED
    return True


def _count(s: State, words: array, w: int, want: int, new_alloc: bool) -> int:
    """count_single_write_clusters: consecutive clusters of one kind; in-place ones also
    contiguous on the host."""
    step = 2 if s.extended_l2 else 1
    first_host = words[w] & L2E_OFFSET_MASK
    run = words[w:w + want * step:step]
    for i, e in enumerate(run):
        if needs_new_alloc(s, e) != new_alloc:
            return i
        if not new_alloc and e & L2E_OFFSET_MASK != first_host + i * s.cluster_size:
            return i
    return len(run)


# --- writing ----------------------------------------------------------------------------------

def write(img: ImageView, offset: int, data: memoryview) -> None:
    """qcow2_co_pwritev_part: runs of host-contiguous clusters (qcow2_alloc_host_offset).
    Clusters the request replaces are freed only after the whole request, so no piece
    reuses what another piece gave up."""
    frees: list[int] = []
    failed: list[UnflaggedError] = []
    runs = 0
    pos, end = offset, offset + len(data)
    try:
        # A failed COW read does not stop the later runs (write tasks in QEMU's pool; see
        # model/write.py, write); the request fails with the first error.
        while pos < end and (not failed or runs <= QCOW2_MAX_WORKERS):
            pos = write_run(img, pos, end, data, offset, frees, failed=failed)
            runs += 1
        if failed:
            raise failed[0]
    finally:
        for old in frees:
            free_any_cluster(img.s, old, request=False)


class _Piece(NamedTuple):
    """One piece of a run qcow2_alloc_host_offset hands back: ``n`` clusters from guest
    ``pos`` (``nbytes`` of new data) at host cluster ``host``, in slice ``key`` from word
    ``w``; ``cow`` is calculate_l2_meta's (start_from, start_to, end_from, end_to) from the
    piece's first cluster, None when every touched subcluster already holds data (no
    QCowL2Meta); ``known_zero``: both COW regions are known to read as zeros (a plain
    unallocated cluster without a backing file, inside the image)."""

    pos: int
    nbytes: int
    host: int
    n: int
    in_place: bool
    key: int
    w: int
    cow: tuple[int, int, int, int] | None
    known_zero: bool


def write_run(img: ImageView, pos: int, end: int, data: memoryview, base: int, frees: list[int],
              *, prealloc: bool = False, failed: list[UnflaggedError] | None = None) -> int:
    """One qcow2_alloc_host_offset and its write task: clusters that continue on the host,
    each piece cut at the slice end. Returns where it stopped; the old entries the run
    replaces go to ``frees``; a failed COW read goes to ``failed`` when given, else is raised.

    As in QEMU the whole run is mapped first (new clusters allocated); a run of one piece is
    then written with its COW in at most one read and one vectored write (merge_cow). A run
    of several pieces has its data written first in one request, then each piece's COW
    regions copied and the piece linked, the last piece first (QEMU's QCowL2Meta list is
    built by prepending): when a COW read fails there (a compressed cluster that does not
    decode), the later pieces stay linked, that piece and the earlier ones are given back,
    and the data written first stays in the file, as with QEMU (model/write.py, write_run)."""
    s = img.s
    start = pos
    pieces: list[_Piece] = []
    pos = _map_run(img, pos, end, pieces)
    if not pieces:
        return pos
    last = pieces[-1]
    last_end = last.host + last.pos % s.cluster_size + last.nbytes
    # Where preallocate_co makes the file end: exact over allocated clusters, the whole
    # last subcluster over new ones (model/write.py, _host_end).
    img.last_host_end = last_end if last.in_place else align_up(last_end, s.geometry.subcluster_size)
    metas = [p for p in pieces if p.cow is not None]
    if prealloc:
        for p in reversed(metas):
            frees += _link(img, p, prealloc=True)
        return pos
    task_host = pieces[0].host + pieces[0].pos % s.cluster_size
    s.overlap.check(task_host, pos - start)  # qcow2_co_pwritev_part
    piece = data[start - base:pos - base]
    target = s.data_host()
    if len(pieces) == 1:
        p = pieces[0]
        if p.cow is None:
            # Plain overwrite of allocated subclusters: one host write, no metadata.
            if s.crypto is not None:
                piece = memoryview(s.crypto.encrypt(task_host, start, bytes(piece)))
            target.pwrite(task_host, piece)
            return pos
        first = p.pos - p.pos % s.cluster_size
        try:
            _data_with_cow(img, first, p.host, *p.cow, piece, p.known_zero, in_place=p.in_place)
        except UnflaggedError as e:
            _abort(s, metas)
            return _failed(e, failed, pos)
        # The guest data (and COW) reach the disk before the L2 entry mapping them. QEMU
        # does this only after COW regions (perform_cow); here always (see the module doc).
        s.l2_cache.depends_on_flush()
        frees += _link(img, p)
        return pos
    # Several pieces: only the first can have a head region and only the last a tail (the
    # run continues across whole clusters), so on success the run goes out as QEMU's data
    # write plus those two regions would leave it, in one vectored write.
    zeroed = {p.pos for p in reversed(metas) if _zero_cow(img, p)}
    regions: list[tuple[int, int, bytes]] = []  # (piece index, offset in its first cluster, bytes)
    for i in range(len(metas) - 1, -1, -1):
        if metas[i].pos in zeroed:
            continue
        try:
            regions += [(i, at, buf) for at, buf in _read_cow_regions(img, metas[i])]
        except UnflaggedError as e:
            _fail_run(img, metas, i, regions, task_host, start, piece, frees)
            return _failed(e, failed, pos)
    lead = pieces[0]
    at = task_host
    bufs: list[bytes | memoryview] = [piece]
    for i, off, buf in regions:
        if metas[i] is lead and off < lead.pos % s.cluster_size:
            bufs.insert(0, buf)
            at -= len(buf)
        else:
            bufs.append(buf)
    # The regions' own checks (do_perform_cow_write); once the image is flagged nothing
    # after is compared (the difftest's qemu-dropped), so one check over the whole suffices.
    s.overlap.check(at, sum(len(b) for b in bufs))
    if s.crypto is not None:
        guest = start - (task_host - at)
        bufs = [s.crypto.encrypt(at, guest, b"".join(bufs))]
    target.pwritev(bufs, at)
    s.l2_cache.depends_on_flush()
    for p in reversed(metas):
        frees += _link(img, p)
    return pos


def _failed(e: UnflaggedError, failed: list[UnflaggedError] | None, pos: int) -> int:
    """A run's COW read failed: raise it, or keep it for the caller and go on from ``pos``."""
    if failed is None:
        raise e
    failed.append(e)
    return pos


def _fail_run(img: ImageView, metas: list[_Piece], i: int, regions: list[tuple[int, int, bytes]],
              task_host: int, start: int, piece: memoryview, frees: list[int]) -> None:
    """A COW read of piece ``metas[i]`` failed in a run of several pieces. The file is left
    as QEMU leaves it: the run's data was written first, the pieces after ``i`` (their COW
    read already) got their regions and are linked, ``i`` and the ones before are given
    back (qcow2_handle_l2meta, then qcow2_alloc_cluster_abort)."""
    s = img.s
    target = s.data_host()
    if s.crypto is not None:
        piece = memoryview(s.crypto.encrypt(task_host, start, bytes(piece)))
    target.pwrite(task_host, piece)
    s.l2_cache.depends_on_flush()
    for j in range(len(metas) - 1, i, -1):
        p = metas[j]
        first = p.pos - p.pos % s.cluster_size
        for k, at, buf in regions:
            if k == j:
                s.overlap.check(p.host + at, len(buf))  # do_perform_cow_write
                if s.crypto is not None:
                    buf = s.crypto.encrypt(p.host + at, first + at, buf)
                target.pwrite(p.host + at, buf)
        frees += _link(img, p)
    _abort(s, metas[:i + 1])


def _map_run(img: ImageView, pos: int, end: int, pieces: list[_Piece]) -> int:
    """qcow2_alloc_host_offset: the pieces of one host-contiguous run, appended to
    ``pieces`` (new clusters allocated as they are found). Returns where the run stopped."""
    s = img.s
    cs = s.cluster_size
    expected: int | None = None
    while pos < end:
        key, words, w = slice_for_write(s, pos)
        in_slice = w >> (1 if s.extended_l2 else 0)
        want = min(-(-(pos % cs + end - pos) // cs), s.slice_entries - in_slice)
        entry = words[w]
        in_place = not needs_new_alloc(s, entry)
        if in_place:
            # handle_copied: the run continues only where the host offsets do.
            host = entry & L2E_OFFSET_MASK
            if host & (cs - 1):
                raise CorruptionError(f"data cluster offset {host:#x} unaligned (guest {pos:#x})")
            n = 0 if expected not in (None, host) else _count(s, words, w, want, False)
        else:
            host, n = _place(s, pos, expected, _count(s, words, w, want, True))
        if not n:
            break
        nbytes = min(end - pos, n * cs - pos % cs)
        # An invalid entry fails the mapping after this piece's clusters were allocated:
        # QEMU leaks them (handle_alloc returns before its QCowL2Meta exists).
        pieces.append(_plan(img, pos, nbytes, host, n, in_place, key, w))
        expected = host + pos % cs + nbytes
        pos += nbytes
    return pos


def write_new_cluster(img: ImageView, offset: int, data: memoryview, key: int, w: int) -> None:
    """write() for its commonest allocating case, without the general bookkeeping: plain L2
    entries, no data file, the request inside one cluster whose entry is 0 (unallocated, no
    zero flag) in slice ``key`` (word ``w``) of a table this image owns. The host calls and
    cache operations are write()'s for that case: calculate_l2_meta's COW covers the whole
    cluster (no subclusters), the old entry frees nothing, and the new cluster is given back
    if the COW read fails (qcow2_alloc_cluster_abort)."""
    s = img.s
    cs = s.cluster_size
    host = rc.alloc_clusters(s, 1)
    within = offset & (cs - 1)
    first = offset - within
    end_from = within + len(data)
    known_zero = _zeros_known(img, first + cs)
    try:
        _data_with_cow(img, first, host, 0, within, end_from, cs, data, known_zero, below=True)
    except UnflaggedError:
        rc.free_clusters(s, host, cs)  # qcow2_alloc_cluster_abort, no discard
        raise
    cache = s.l2_cache
    cache.depends_on_flush()  # see _write_clusters: data before the entry mapping it
    img.mark_dirty()
    words = cache.get(key)
    if not s.lazy_refcounts:
        _link_dependency(s)
    words[w] = host | QCOW_OFLAG_COPIED
    cache.mark_dirty(key)
    img.last_host_end = host + end_from


def _link_dependency(s: State) -> None:
    """qcow2_alloc_cluster_link_l2's qcow2_cache_set_dependency (L2 cache on the refcount
    cache), whose result QEMU ignores: a write-back it forces (the refcount cache depending
    on the L2 cache after a free) that the overlap check refuses flags the image, and the
    request still links its clusters and succeeds (qemu-io -t unsafe: "Marking image as
    corrupt", no "write failed"; damaged seed 12, flip-635@v3; seed 14, flip-2771@v3 through
    write_new_cluster)."""
    try:
        s.l2_cache.set_dependency(s.rc_cache)
    except HostIOError:
        raise
    except CorruptionError as e:
        if isinstance(e, UnflaggedError):
            raise
        s.signalled = s.signalled or str(e)


def _abort(s: State, pieces: list[_Piece]) -> None:
    """qcow2_alloc_cluster_abort for each piece after a COW read failed (-EIO) before it
    was linked: its new clusters are given back, without a discard."""
    if s.has_data_file:
        return
    for p in pieces:
        if not p.in_place:
            rc.free_clusters(s, p.host, p.n * s.cluster_size)


def _place(s: State, pos: int, expected: int | None, n: int) -> tuple[int, int]:
    """do_alloc_cluster_offset: (host offset, clusters) for ``n`` new clusters at guest
    ``pos``. An external data file maps guest = host; the first piece of a run takes a
    free range anywhere, the later ones only what is free right after it (0 ends the run)."""
    if s.has_data_file:
        return pos - pos % s.cluster_size, n
    if expected is None:
        return rc.alloc_clusters(s, n), n
    return expected, rc.alloc_clusters_at(s, expected, n)


def _plan(img: ImageView, pos: int, nbytes: int, host: int, n: int, in_place: bool, key: int,
          w: int) -> _Piece:
    """calculate_l2_meta for ``n`` clusters of one slice: CorruptionError on an invalid
    touched subcluster; no COW range when the piece is written in place over subclusters
    that all hold data."""
    s = img.s
    g = s.geometry
    cs, scs = s.cluster_size, g.subcluster_size
    ext, dfile = s.extended_l2, s.has_data_file
    step = 2 if ext else 1
    words = s.l2_cache.get(key)
    first = pos - pos % cs
    start_to = pos - first
    end_from = start_to + nbytes

    def pair(i: int) -> tuple[int, int]:
        j = w + i * step
        return (words[j], words[j + 1]) if ext else (words[j], 0)

    # Touched subclusters, and whether any is invalid (qcow2_get_subcluster_type).
    all_normal = True
    for i in range(n):
        e, b = pair(i)
        lo = max(start_to, i * cs) - i * cs
        hi = min(end_from, (i + 1) * cs) - i * cs
        for sc in range(lo // scs, (hi - 1) // scs + 1):
            t = subcluster_type(e, b, sc, extended_l2=ext, has_data_file=dfile)
            if t is ST.INVALID:
                raise CorruptionError(f"invalid cluster entry {e:#x}/{b:#x}")
            if t is not ST.NORMAL:
                all_normal = False
    if in_place and all_normal:
        return _Piece(pos, nbytes, host, n, in_place, key, w, None, False)

    # calculate_l2_meta: where the COW starts in the first cluster and ends in the last.
    e0, el = pair(0), pair(n - 1)
    start_from, end_to = cow_range(g, e0, el, start_to, end_from, keep_old=in_place, has_data_file=dfile)
    known_zero = not ext and not dfile and not e0[0] and not el[0] and _zeros_known(img, first + n * cs)
    return _Piece(pos, nbytes, host, n, in_place, key, w, (start_from, start_to, end_from, end_to),
                  known_zero)


def _zeros_known(img: ImageView, end: int) -> bool:
    """The COW regions of plain unallocated clusters ending at guest offset ``end`` read as
    zeros, known without asking block status (what is_zero_fast would answer): no backing
    file, inside the image, and this image's first block-status query already made, which
    decides its metadata preallocation there and then (qcow2_co_block_status), on the file as
    it is at that moment. Skipping that query, the guess came later, on a file the write had
    grown, and met an unaligned refcount block QEMU never reached (damaged seed 18,
    flip-2969@v3)."""
    return img.backing is None and end <= img.size and img.metadata_preallocation is not None


def _link(img: ImageView, p: _Piece, *, prealloc: bool = False) -> list[int]:
    """qcow2_alloc_cluster_link_l2 for a piece: its entries point at its clusters (COPIED),
    with extended L2 entries its COW range marked allocated. Returns the old entries that
    lose a reference."""
    s = img.s
    cs, scs = s.cluster_size, s.geometry.subcluster_size
    ext = s.extended_l2
    step = 2 if ext else 1
    assert p.cow is not None
    start_from, end_to = p.cow[0], p.cow[3]
    # The only place QEMU sets the lazy-refcounts dirty bit (qcow2_mark_dirty), before the
    # new L2 entries.
    img.mark_dirty()
    words = s.l2_cache.get(p.key)
    if not s.lazy_refcounts:
        _link_dependency(s)
    olds: list[int] = []
    for i in range(p.n):
        j = p.w + i * step
        old_e = words[j]
        if not p.in_place and old_e:
            olds.append(old_e)
        words[j] = (p.host + i * cs) | QCOW_OFLAG_COPIED
        if ext and not prealloc:
            lo = (max(start_from, i * cs) - i * cs) // scs
            hi = (min(end_to, (i + 1) * cs) - i * cs - 1) // scs + 1
            bits = words[j + 1] | QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi)
            words[j + 1] = bits & ~QCOW_OFLAG_SUB_ZERO_RANGE(lo, hi)
    s.l2_cache.mark_dirty(p.key)
    return olds


def _zero_cow(img: ImageView, p: _Piece) -> bool:
    """handle_alloc_space for a piece of a run of several: when its COW regions read as
    zeros, zero them on the host (the whole range for new clusters, the regions alone in
    place, see _data_with_cow) instead of copying; False when they must be copied."""
    s = img.s
    assert p.cow is not None
    start_from, start_to, end_from, end_to = p.cow
    head, tail = start_to - start_from, end_to - end_from
    first = p.pos - p.pos % s.cluster_size
    if not (head or tail) or s.crypto is not None:
        return False
    if not (p.known_zero or (img.is_zero_fast(first + start_from, head)
                             and img.is_zero_fast(first + end_from, tail))):
        return False
    s.overlap.check(p.host + start_from, end_to - start_from)
    target = s.data_host()
    if p.in_place:
        return _zero_cow_regions(target, p.host, start_from, start_to, end_from, end_to)
    return bool(target.zero_range(p.host + start_from, end_to - start_from))


def _read_cow_regions(img: ImageView, p: _Piece) -> list[tuple[int, bytes]]:
    """A piece's COW regions as perform_cow reads them (both in one read across the data
    when at most PERFORM_COW_MERGE_MAX bytes lie between, else each alone): (offset in
    the piece's first cluster, bytes) each. UnflaggedError when a read fails."""
    assert p.cow is not None
    start_from, start_to, end_from, end_to = p.cow
    head, tail = start_to - start_from, end_to - end_from
    first = p.pos - p.pos % img.s.cluster_size
    if head and tail and end_from - start_to <= PERFORM_COW_MERGE_MAX:
        whole = img.read_internal(first + start_from, end_to - start_from)
        return [(start_from, whole[:head]), (end_from, whole[len(whole) - tail:])]
    out: list[tuple[int, bytes]] = []
    if head:
        out.append((start_from, img.read_internal(first + start_from, head)))
    if tail:
        out.append((end_from, img.read_internal(first + end_from, tail)))
    return out


def _data_with_cow(img: ImageView, first: int, host: int, start_from: int, start_to: int,
                   end_from: int, end_to: int, piece: memoryview, known_zero: bool = False,
                   *, in_place: bool = False, below: bool = False) -> None:
    """The guest data plus its COW regions, in two host operations at most: one read (of
    both regions together when perform_cow merges them, else each alone) and one vectored
    write. When both regions read as zeros (bdrv_co_is_zero_fast) and the host can zero
    cheaply, the range is zeroed with fallocate and only the data is written
    (handle_alloc_space; never on an encrypted image, where zeroed host bytes would not
    read back as zeros: the COW regions are read as plaintext and written encrypted with
    the data, for the new host offset, as perform_cow does). Written in place (extended
    L2: subclusters of a cluster already in use), only the COW regions are zeroed: QEMU
    zeroes the whole range, the live subclusters under the new data included, so a crash
    before the data write would leave zeros there that were never written; the final file
    is the same.

    ``below``: the cluster is plain unallocated in this image (no subclusters), so what its
    COW regions read as, and whether they are zeros, is the backing chain's answer: asked
    there directly (Image.read_below, is_zero_fast_below), not through this image's lookup."""
    s = img.s
    target = s.data_host()
    s.overlap.check(host + start_from, end_to - start_from)
    head, tail = start_to - start_from, end_to - end_from
    zero_fast = img.is_zero_fast_below if below else img.is_zero_fast
    read = img.read_below if below else img.read_internal
    if ((head or tail) and s.crypto is None
            and (known_zero or (zero_fast(first + start_from, head)
                                and zero_fast(first + end_from, tail)))
            and (_zero_cow_regions(target, host, start_from, start_to, end_from, end_to) if in_place
                 else target.zero_range(host + start_from, end_to - start_from))):
        target.pwrite(host + start_to, piece)
        return
    bufs: list[bytes | memoryview] = []
    if head and tail and end_from - start_to <= PERFORM_COW_MERGE_MAX:
        whole = memoryview(read(first + start_from, end_to - start_from))  # slices, no copies
        bufs = [whole[:head], piece, whole[len(whole) - tail:]]
    else:
        if head:
            bufs.append(read(first + start_from, head))
        bufs.append(piece)
        if tail:
            bufs.append(read(first + end_from, tail))
    if s.crypto is not None:
        bufs = [s.crypto.encrypt(host + start_from, first + start_from, b"".join(bufs))]
    target.pwritev(bufs, host + start_from)


def _zero_cow_regions(target: HostFile, host: int, start_from: int, start_to: int, end_from: int,
                      end_to: int) -> bool:
    """Zero the head and the tail COW regions apart (see _data_with_cow); False when the
    host cannot zero cheaply (the caller then writes them)."""
    zr = target.zero_range
    head, tail = start_to - start_from, end_to - end_from
    return bool((not head or zr(host + start_from, head)) and (not tail or zr(host + end_from, tail)))


def free_any_cluster(s: State, entry: int, *, request: bool) -> None:
    """qcow2_free_any_cluster: drop the reference an L2 entry held; ``request``
    (QCOW2_DISCARD_REQUEST, passed through) punches freed clusters out of the file."""
    t = cluster_type(entry, extended_l2=s.extended_l2, has_data_file=s.has_data_file)
    cs = s.cluster_size
    if s.has_data_file:
        if request and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and s.data is not None:
            s.data.punch_hole(entry & L2E_OFFSET_MASK, cs)
        return
    if t is ClusterType.COMPRESSED:
        coff, csize = compressed_range(entry, s.cluster_bits)
        rc.free_clusters(s, coff, csize, discard=request)
    elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
        off = entry & L2E_OFFSET_MASK
        if off % cs == 0:  # QEMU reports an unaligned one and frees nothing
            rc.free_clusters(s, off, cs, discard=request)


# --- zeroes and discard -------------------------------------------------------------------------

def write_zeroes(img: ImageView, offset: int, n: int, unmap: bool) -> None:
    """bdrv_co_do_pwrite_zeroes over qcow2_co_pwrite_zeroes: pieces cut at subclusters; a
    piece the driver refuses (-ENOTSUP) is written as zero data."""
    for start, length in split_aligned(offset, n, img.s.geometry.subcluster_size):
        check_node_dropped(img.s.signalled)
        if not _driver_zeroes(img, start, length, unmap):
            # The zero-data fallback is a new block-layer call (bdrv_driver_pwritev): a
            # node the status query dropped fails it (ENOMEDIUM).
            check_node_dropped(img.s.signalled)
            write(img, start, memoryview(bytes(length)))


def _driver_zeroes(img: ImageView, offset: int, n: int, unmap: bool) -> bool:
    """qcow2_co_pwrite_zeroes: a partial subcluster is zeroed only when the rest of it
    already reads as zeros (is_zero) and it is unallocated or zero."""
    s = img.s
    g = s.geometry
    scs = g.subcluster_size
    end = offset + n
    head = offset % scs
    tail = 0 if end == img.size else align_up(end, scs) - end
    if head or tail:
        if not (img.is_zero(offset - head, head) and img.is_zero(end, tail)):
            return False
        offset -= head
        n = scs
        e, b = get_entry(s, offset)
        t = subcluster_type(e, b, g.subcluster_index(offset), extended_l2=s.extended_l2,
                            has_data_file=s.has_data_file)
        if t not in (ST.UNALLOCATED_PLAIN, ST.UNALLOCATED_ALLOC, ST.ZERO_PLAIN, ST.ZERO_ALLOC):
            return False
    return zeroize(img, offset, n, unmap)


def zeroize(img: ImageView, offset: int, n: int, unmap: bool) -> bool:
    """qcow2_subcluster_zeroize; False = -ENOTSUP."""
    s = img.s
    cs = s.cluster_size
    end = offset + n
    if s.data_file_raw and s.data is not None:
        size = s.data.size()
        if offset < size:
            s.data.pwrite(offset, bytes(min(n, size - offset)))
    if s.version < 3:
        # No zero flag: without a backing file a discarded cluster reads as zeros; with
        # one it would show the backing data, so the driver refuses.
        if img.backing is not None:
            return False
        cluster_discard(img, offset, n, request=True, full=False)
        return True
    # Partial clusters at either end go by subclusters; the end of the image counts as
    # a cluster boundary.
    whole_from = min(end, align_up(offset, cs))
    whole_to = end if end >= img.size else max(whole_from, align_down(end, cs))
    if whole_from > offset and not _zero_subclusters(s, offset, whole_from - offset):
        return False
    # A tail in a compressed cluster is refused after the whole clusters are done; QEMU
    # keeps their L2 and refcount updates but drops the queued discards unissued
    # (qcow2_subcluster_zeroize's fail path: qcow2_process_discards with ret < 0).
    try:
        with s.discards_held():
            _each_cluster(img, whole_from, whole_to,
                          lambda old_e, old_b: _zero_entry(s, old_e, old_b, unmap), request=True)
            if whole_to != end and not _zero_subclusters(s, whole_to, end - whole_to):
                raise _Refused
    except _Refused:
        return False
    return True


class _Refused(Exception):
    """-ENOTSUP part-way through a held-discard walk: the held discards are dropped."""


def _zero_entry(s: State, old_e: int, old_b: int, unmap: bool) -> tuple[int, int, bool]:
    """zero_in_l2_slice for one entry: the zero flag (or all-zero bitmap); the host cluster
    is let go if compressed, or if ``unmap`` and allocated."""
    t = cluster_type(old_e, extended_l2=s.extended_l2, has_data_file=s.has_data_file)
    allocated = t in (ClusterType.NORMAL, ClusterType.COMPRESSED, ClusterType.ZERO_ALLOC)
    let_go = t is ClusterType.COMPRESSED or (unmap and allocated)
    new_e = 0 if let_go else old_e
    if s.extended_l2:
        return new_e, QCOW_L2_BITMAP_ALL_ZEROES, let_go
    return new_e | QCOW_OFLAG_ZERO, old_b, let_go


def _zero_subclusters(s: State, offset: int, n: int) -> bool:
    """zero_l2_subclusters within one cluster; False for a compressed cluster."""
    g = s.geometry
    key, words, w = slice_for_write(s, offset)
    e, b = words[w], words[w + 1]
    if cluster_type(e, extended_l2=True, has_data_file=s.has_data_file) is ClusterType.COMPRESSED:
        return False
    sc = g.subcluster_index(offset)
    hi = sc + -(-n // g.subcluster_size)
    nb = (b | QCOW_OFLAG_SUB_ZERO_RANGE(sc, hi)) & ~QCOW_OFLAG_SUB_ALLOC_RANGE(sc, hi)
    if nb != b:
        words[w + 1] = nb
        s.l2_cache.mark_dirty(key)
    return True


def _for_each_cluster(img: ImageView, pos: int, end: int, change: object, *, request: bool) -> None:
    """_each_cluster with the freed clusters' discards held and merged until the walk ends
    (qcow2_cluster_discard and qcow2_subcluster_zeroize set s->cache_discards, then
    qcow2_process_discards): neighbouring clusters go out as one punched range."""
    with img.s.discards_held():
        _each_cluster(img, pos, end, change, request=request)


def _each_cluster(img: ImageView, pos: int, end: int, change: object, *, request: bool) -> None:
    """Walk whole clusters slice by slice (zero_in_l2_slice / discard_in_l2_slice): each
    entry gets ``change(old_e, old_b) -> (new_e, new_b, let_go)``; a changed entry whose
    host cluster is let go drops that reference. The table is allocated (or unshared) even where nothing
    changes (get_cluster_table)."""
    s = img.s
    cs = s.cluster_size
    ext = s.extended_l2
    step = 2 if ext else 1
    fn = change  # typed loosely to keep the signature short
    while pos < end:
        key, words, w = slice_for_write(s, pos)
        stop = len(words)
        while pos < end and w < stop:
            old_e = words[w]
            old_b = words[w + 1] if ext else 0
            new_e, new_b, let_go = fn(old_e, old_b)  # type: ignore[operator]
            if new_e != old_e or new_b != old_b:
                words[w] = new_e
                if ext:
                    words[w + 1] = new_b
                s.l2_cache.mark_dirty(key)
                if let_go:
                    free_any_cluster(s, old_e, request=request)
                    words = s.l2_cache.get(key)
            w += step
            pos += cs


def discard(img: ImageView, offset: int, n: int) -> None:
    """qcow2_co_pdiscard: whole clusters only (a last partial one at the image end counts);
    v2 images with a backing file ignore discards (no zero flag to hide the backing)."""
    s = img.s
    cs = s.cluster_size
    if s.version < 3 and img.backing is not None:
        return
    for start, length in split_aligned(offset, n, cs):
        check_node_dropped(s.signalled)
        if (start % cs or length % cs) and (start % cs or start + length != img.size):
            continue
        cluster_discard(img, start, length, request=True, full=False)


def cluster_discard(img: ImageView, offset: int, n: int, *, request: bool, full: bool) -> None:
    """qcow2_cluster_discard / discard_in_l2_slice."""
    s = img.s
    backing = img.backing is not None

    def change(old_e: int, old_b: int) -> tuple[int, int, bool]:
        if full:
            return 0, 0, True
        t = cluster_type(old_e, extended_l2=s.extended_l2, has_data_file=s.has_data_file)
        if backing or t in (ClusterType.NORMAL, ClusterType.COMPRESSED, ClusterType.ZERO_ALLOC):
            if s.extended_l2:
                return 0, QCOW_L2_BITMAP_ALL_ZEROES, True
            return (QCOW_OFLAG_ZERO if s.version >= 3 else 0), 0, True
        return old_e, old_b, False

    _for_each_cluster(img, offset, offset + n, change, request=request)
