"""Block status and ``qemu-img map`` (block/qcow2.c qcow2_co_block_status, block/io.c
bdrv_co_block_status and bdrv_co_common_block_status_above, qemu-img.c img_map,
get_block_status, entry_mergeable, dump_map_entry).

Three levels, as in QEMU:

1. ``qcow2_layer_status``: one qcow2 node. The subcluster type at ``offset`` decides the
   flags, and the answer covers the following subclusters of the same type (host-contiguous
   for allocated ones), up to the end of the L2 table (qcow2_get_host_offset):

   ==================  ==========================  ===================================
   subcluster type     flags                       offset
   ==================  ==========================  ===================================
   NORMAL              DATA | ALLOCATED            host offset (data file if external)
   COMPRESSED          DATA | ALLOCATED            none (one cluster at a time)
   ZERO_ALLOC          ZERO | ALLOCATED            host offset
   ZERO_PLAIN          ZERO | ALLOCATED            none
   UNALLOCATED_ALLOC   (ZERO if nothing below)     host offset
   UNALLOCATED_PLAIN   (ZERO if nothing below)     none
   ==================  ==========================  ===================================

   The generic layer adds ZERO to an unallocated answer when there is no backing file, or
   when the offset is at or past the backing file's end; it is then still not ALLOCATED.
   When the image looks preallocated (detect_metadata_preallocation, decided once per open
   at the first query) a caller that wants zeros also learns which data clusters lie over
   holes of the host file (BDRV_BLOCK_RECURSE): is_zero as much as qemu-img map.

2. ``status_above``: the whole chain, and the two questions QEMU asks it: ``is_zero``
   (write_zeroes' partial subclusters) and ``is_zero_fast`` (handle_alloc_space's COW
   regions).

3. ``image_map``: qemu-img map's walk: descend while a layer says neither DATA nor ZERO,
   count the depth, then merge neighbouring extents that agree on every field (and whose
   offsets continue).
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Any

from model import mapping as mp
from model.backing import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_EOF,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    Layer,
    Status,
)
from model.state import State
from spec import refblocks as rb
from spec.entries import HOST_OFFSET_TYPES, L2E_OFFSET_MASK, SubclusterType, subcluster_type
from spec.errors import CorruptionError
from spec.hostio import HostIOError

if TYPE_CHECKING:
    import numpy as np
else:
    from spec.lazy import numpy as np  # executed at first use: CLI start-up (spec/lazy.py)



def qcow2_layer_status(s: State, offset: int, n: int, want_zero: bool = True) -> Status:
    """bdrv_co_block_status for one qcow2 node (see the module doc)."""
    if s.metadata_preallocation is None:
        # qcow2_co_block_status decides this once per open, at its first call.
        s.metadata_preallocation = detect_metadata_preallocation(s)
    if offset >= s.size:
        return Status(BDRV_BLOCK_EOF, 0)
    n = min(n, s.size - offset)
    q, g = s.q, s.q.geometry
    cs, scs = q.cluster_size, g.subcluster_size
    i1 = g.l1_index(offset)
    start_in_cluster = g.offset_in_cluster(offset)
    # qcow2_get_host_offset never looks past the end of the L2 table.
    avail = (g.l2_entries - g.l2_index(offset)) * cs
    needed = min(n + start_in_cluster, avail)
    l2off = mp.l2_offset(q, mp.read_l1_entry(q, i1, s.snapshot_l1), i1)
    host: int | None = None
    if not l2off:
        t = SubclusterType.UNALLOCATED_PLAIN
        covered = needed
    else:
        idx = g.l2_index(offset)
        sc0 = g.subcluster_index(offset)
        ext, dfile = q.extended_l2, q.has_data_file
        # Only the entries the answer can span are read (at most to the table's end).
        entries = mp.read_l2_entries(q, l2off, idx, max(1, g.size_to_clusters(needed)))
        e0, b0 = entries[0]
        t = subcluster_type(e0, b0, sc0, extended_l2=ext, has_data_file=dfile)
        if t is SubclusterType.INVALID:
            raise CorruptionError(f"invalid cluster entry {e0:#x} (guest {offset:#x})")
        if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC) and q.version < 3:
            # qcow2_get_host_offset, as for a read (model/read.py): v2 has no zero flag.
            raise CorruptionError(f"zero cluster entry found in pre-v3 image (guest {offset:#x})")
        with_offset = t in HOST_OFFSET_TYPES
        if with_offset:
            hc = e0 & L2E_OFFSET_MASK
            if hc % cs:
                raise CorruptionError(f"cluster allocation offset {hc:#x} unaligned")
            host = hc + start_in_cluster
        if t is SubclusterType.COMPRESSED:
            entries = entries[:1]
        count = 0
        expected = e0 & L2E_OFFSET_MASK
        per_cluster = g.subclusters_per_cluster
        for i, (e, b) in enumerate(entries):
            if with_offset and (e & L2E_OFFSET_MASK) != expected:
                break
            first = sc0 if i == 0 else 0
            same = first
            while same < per_cluster and subcluster_type(e, b, same, extended_l2=ext,
                                                         has_data_file=dfile) is t:
                same += 1
            count += same - first
            if same < per_cluster:
                break
            expected += cs
        covered = min((count + sc0) * scs, needed)
    pnum = covered - start_in_cluster
    flags = 0
    if t in HOST_OFFSET_TYPES and s.crypto is None:
        # qcow2_co_block_status hides host offsets of encrypted images (the bytes there are
        # ciphertext), so their map has no "offset" and never recurses into the file.
        flags |= BDRV_BLOCK_OFFSET_VALID
    if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
        flags |= BDRV_BLOCK_ZERO
    elif t not in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
        flags |= BDRV_BLOCK_DATA
    # The generic part of bdrv_co_block_status.
    if flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
        flags |= BDRV_BLOCK_ALLOCATED
    elif s.backing is None or (want_zero and offset >= s.backing.size):
        # Past a shorter backing file's end only a caller that wants zeros is told so
        # here (bdrv_co_block_status); the chain walk finds them below either way.
        flags |= BDRV_BLOCK_ZERO
    if offset + pnum == s.size:
        flags |= BDRV_BLOCK_EOF
    filename = None
    if flags & BDRV_BLOCK_OFFSET_VALID:
        filename = s.data_filename if q.has_data_file else s.filename
    if want_zero and s.metadata_preallocation and flags & BDRV_BLOCK_DATA and host is not None \
            and flags & BDRV_BLOCK_OFFSET_VALID:
        # BDRV_BLOCK_RECURSE: ask the qcow2 file itself (bs->file, even with a data file)
        # whether the host range is a hole (bdrv_co_block_status's recursion).
        filename = s.filename
        fflags, fpnum = file_status(q.f, host, pnum)
        if fflags & BDRV_BLOCK_EOF and (not fpnum or fflags & BDRV_BLOCK_ZERO):
            flags |= BDRV_BLOCK_ZERO
        else:
            pnum = fpnum
            flags |= fflags & BDRV_BLOCK_ZERO
            flags &= ~BDRV_BLOCK_EOF
            if offset + pnum == s.size:
                flags |= BDRV_BLOCK_EOF
    return Status(flags, pnum, host, filename)


def file_status(f: Any, offset: int, n: int) -> tuple[int, int]:
    """file-posix's raw_co_block_status with the generic wrapper: DATA or ZERO (a hole,
    by SEEK_DATA/SEEK_HOLE) and how far it extends; EOF at the end of the file."""
    fd = f.fileno()
    size = os.fstat(fd).st_size
    if offset >= size:
        return BDRV_BLOCK_EOF, 0
    n = min(n, size - offset)
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        data = None
    if data is None:
        flags, pnum = BDRV_BLOCK_ZERO, n
    elif data == offset:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
        flags, pnum = BDRV_BLOCK_DATA, min(n, hole - offset)
    else:
        flags, pnum = BDRV_BLOCK_ZERO, min(n, data - offset)
    if offset + pnum == size:
        flags |= BDRV_BLOCK_EOF
    return flags, pnum


def detect_metadata_preallocation(s: State) -> bool:
    """QEMU's guess that an image is preallocated (block/qcow2-refcount.c,
    qcow2_detect_metadata_preallocation, asked by block/qcow2.c qcow2_co_block_status):
    the image looks preallocated when clearly more clusters have a refcount than the host
    file has space allocated. The format says nothing of it. QEMU then asks the file about
    holes (BDRV_BLOCK_RECURSE) when reporting data clusters to a caller that wants
    zeros. qcow2_co_block_status decides it at its first call after the open and keeps the
    answer (metadata_preallocation_checked); the model does the same (State.
    metadata_preallocation), except in image_map, which is a fresh qemu-img process."""
    q = s.q
    cs = q.cluster_size
    st = os.fstat(q.f.fileno())
    real_clusters = st.st_blocks * 512 // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-st.st_size // cs)
    entries = q.geometry.refcount_block_entries
    # Only the reftable entries whose blocks cover the file are read.
    reach = min(int(q.header.refcount_table_clusters) * cs // 8, -(-end_cluster // entries))
    table = struct.unpack(f">{reach}Q", q.pread(int(q.header.refcount_table_offset), 8 * reach))
    # Only clusters below the end of the file are counted: below the threshold there, the
    # count cannot reach it (the common case of a file without holes), and QEMU's walk goes
    # to the end of the file; what it can still meet is an unaligned refcount block, decided
    # without reading a single block.
    walk = end_cluster >= threshold
    count = 0
    # QEMU stops counting at the threshold; whole blocks are counted here, which gives the
    # same answer because the count only grows.
    for rt in range(reach):
        if count >= threshold:
            break
        off = table[rt] & ~0x1FF
        if off % cs:
            # qcow2_get_refcount flags an unaligned block ("Refblock offset ... unaligned"):
            # the node is dropped (bs->drv NULL) and the detection fails, which
            # qcow2_co_block_status takes for "not preallocated" and goes on; the request
            # then fails at the block layer's next call (check_node_dropped), or succeeds
            # flagged.
            s.q.signalled = s.q.signalled or \
                f"refcount block offset {off:#x} unaligned (reftable index {rt:#x})"
            return False
        if off and walk:
            k = min(entries, end_cluster - rt * entries)
            try:
                block = rb.refblock_array(q, off)
            except HostIOError:
                # qcow2_get_refcount could not read the block: the detection fails, taken
                # for "not preallocated", and the request goes on (damaged seed 17,
                # flip-1263@snap: a reftable entry at 2^63).
                return False
            count += int(np.count_nonzero(block[:k]))
    return count >= threshold


def status_above(s: State, offset: int, n: int, *, want_zero: bool = True) -> tuple[int, int]:
    """(flags, pnum) of bdrv_block_status_above(bs, NULL, ...): the chain as one node.
    ``want_zero=False`` is bdrv_co_is_zero_fast's cheaper question."""
    st = qcow2_layer_status(s, offset, n, want_zero)
    if st.length == 0 or st.flags & BDRV_BLOCK_ALLOCATED:
        return st.flags, st.length
    n = st.length
    flags, pnum = st.flags, st.length
    layer: Layer | None = s.backing
    while layer is not None:
        st = layer.layer_status(offset, n, want_zero)
        if st.length == 0:
            # A short backing file: zeros past its end count as allocated there.
            return BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, n
        flags, pnum = st.flags, st.length
        if flags & BDRV_BLOCK_ALLOCATED:
            break
        n = pnum
        layer = layer.backing
    return flags, pnum


def is_zero(s: State, offset: int, n: int) -> bool:
    """is_zero (block/qcow2.c): every block-status answer over the range, through the
    chain, says ZERO. QEMU asks in a loop because the chain's answer does not merge
    zeros of different kinds (an unallocated hole of the backing file, then zeros past
    a short backing file's end): one answer may stop short of the range."""
    n = min(n, s.size - offset)
    while n > 0:
        if s.q.signalled is not None:
            return False  # the node was dropped: bdrv_co_block_status answers ENOMEDIUM
        flags, pnum = status_above(s, offset, n)
        if not flags & BDRV_BLOCK_ZERO or pnum <= 0:
            return False
        offset += pnum
        n -= pnum
    return True


def is_zero_fast(s: State, offset: int, n: int) -> bool:
    """bdrv_co_is_zero_fast, as handle_alloc_space asks it about COW regions
    (is_zero_cow): ONE block-status answer of the chain (want_zero off) must cover the
    range and say ZERO. Unlike is_zero there is no clamp to the image end, so a COW
    region past the end (the last cluster of an unaligned image) is not zero and is
    copied; and a raw backing file answers DATA, holes included."""
    if n <= 0:
        return True
    if s.q.signalled is not None:
        return False  # the node was dropped: bdrv_co_block_status answers ENOMEDIUM
    flags, pnum = status_above(s, offset, n, want_zero=False)
    return pnum == n and bool(flags & BDRV_BLOCK_ZERO)


def _entry(top: Layer, offset: int, n: int) -> dict[str, Any]:
    """get_block_status in qemu-img.c: one extent at ``offset``."""
    depth = 0
    layer: Layer = top
    while True:
        st = layer.layer_status(offset, n)
        n = st.length
        if st.flags & (BDRV_BLOCK_ZERO | BDRV_BLOCK_DATA):
            break
        if layer.backing is None:
            st = Status(0, n)
            break
        layer = layer.backing
        depth += 1
    e: dict[str, Any] = {"start": offset, "length": n, "depth": depth,
                         "present": bool(st.flags & BDRV_BLOCK_ALLOCATED),
                         "zero": bool(st.flags & BDRV_BLOCK_ZERO),
                         "data": bool(st.flags & BDRV_BLOCK_DATA)}
    if st.flags & BDRV_BLOCK_OFFSET_VALID:
        e["offset"] = st.offset
        e["filename"] = st.filename
    return e


def _mergeable(cur: dict[str, Any], nxt: dict[str, Any]) -> bool:
    """entry_mergeable in qemu-img.c."""
    if cur["length"] == 0:
        return False
    for k in ("zero", "data", "depth", "present"):
        if cur[k] != nxt[k]:
            return False
    if ("offset" in cur) != ("offset" in nxt) or cur.get("filename") != nxt.get("filename"):
        return False
    return not ("offset" in cur and cur["offset"] + cur["length"] != nxt["offset"])


def image_map(top: Layer, offset: int, n: int, *, with_filename: bool = False) -> list[dict[str, Any]]:
    """The extents ``qemu-img map --output=json`` prints for [offset, offset+n) of the chain
    from ``top`` (a model Image).

    Keys: start, length, depth, present, zero, data, and offset when QEMU knows one.
    ``with_filename`` adds the host file name (for the human output)."""
    end = offset + n
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    pos = offset
    layer: Layer | None = top
    chain: list[State] = []
    while layer is not None:
        # The qcow2 layers are model Images, which carry their State; raw layers have none.
        state = getattr(layer, "state", None)
        if isinstance(state, State):
            chain.append(state)
        layer = layer.backing
    # qemu-img map is a process of its own: every layer decides afresh. This open's own
    # decisions are put back afterwards.
    kept = [state.metadata_preallocation for state in chain]
    for state in chain:
        state.metadata_preallocation = detect_metadata_preallocation(state)
    try:
        extents = _walk(top, pos, end)
    finally:
        for state, value in zip(chain, kept, strict=True):
            state.metadata_preallocation = value
    for nxt in extents:
        if cur is not None and _mergeable(cur, nxt):
            cur["length"] += nxt["length"]
            continue
        if cur is not None:
            out.append(cur)
        cur = nxt
    if cur is not None:
        out.append(cur)
    if not with_filename:
        for e in out:
            e.pop("filename", None)
    return out


def _walk(top: Layer, pos: int, end: int) -> list[dict[str, Any]]:
    out = []
    while pos < end:
        e = _entry(top, pos, end - pos)
        pos += e["length"]
        out.append(e)
    return out


def format_json(extents: list[dict[str, Any]]) -> str:
    """dump_map_entry's JSON form, byte for byte (qemu-img.c)."""
    lines = []
    for e in extents:
        s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]},'
             f' "present": {_b(e["present"])}, "zero": {_b(e["zero"])}, "data": {_b(e["data"])}')
        if "offset" in e:
            s += f', "offset": {e["offset"]}'
        lines.append(s + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _hex(v: int) -> str:
    """C's %#x: no 0x prefix for zero."""
    return f"{v:#x}" if v else "0"


def format_human(extents: list[dict[str, Any]]) -> tuple[str, bool]:
    """dump_map_entry's human form; (text, ok). Not ok when data has no offset (compressed,
    encrypted or external clusters): qemu-img then reports an error and stops."""
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"]
    for e in extents:
        if e["data"] and "offset" not in e:
            return "".join(out), False
        if e["data"] and not e["zero"]:
            out.append(f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e.get('offset', 0)):<16}"
                       f"{e.get('filename') or ''}\n")
    return "".join(out), True


def _b(v: bool) -> str:
    return "true" if v else "false"
