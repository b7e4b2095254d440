"""Block status and ``qemu-img map`` for the impl (block/qcow2.c qcow2_co_block_status,
block/io.c bdrv_co_block_status and bdrv_co_common_block_status_above, qemu-img.c img_map /
get_block_status / entry_mergeable), and raw backing files.

A layer answers (flags, bytes covered, host offset, file name) for one node; the chain is
walked from the top, descending while a layer says neither DATA nor ZERO. Looks up go
through the L2 slice cache, so a status query never reads a table it already has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from impl import cluster as cl
from spec.entries import L2E_OFFSET_MASK, SubclusterType, subcluster_type
from spec.errors import CorruptionError, FormatError

if TYPE_CHECKING:
    from impl.image import Image

# block/block-common.h
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20

ST = SubclusterType
_HAS_OFFSET = (ST.NORMAL, ST.ZERO_ALLOC, ST.UNALLOCATED_ALLOC)


@dataclass
class Status:
    flags: int
    length: int
    offset: int | None = None
    filename: str | None = None


class Layer(Protocol):
    size: int
    filename: str
    backing: Layer | None

    def read_into(self, offset: int, buf: memoryview) -> None: ...
    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> Status: ...
    def close(self) -> None: ...


class RawLayer:
    """A raw backing file; guest offset = file offset; the size in whole sectors
    (bdrv_refresh_total_sectors)."""

    backing: Layer | None = None

    def __init__(self, filename: str) -> None:
        self.filename = filename
        try:
            self.fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise FormatError(f"could not open backing file: {e.strerror}", filename) from None
        self.size = -(-os.fstat(self.fd).st_size // 512) * 512
        self.reads = 0

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; zeros past the end of the file."""
        self.reads += 1
        try:
            got = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            raise CorruptionError(f"cannot read backing file: {e.strerror}") from None
        if got < len(buf):
            buf[got:] = bytes(len(buf) - got)

    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> Status:
        """raw-format over file-posix: DATA with an offset; a hole (SEEK_DATA/SEEK_HOLE) is
        ZERO; at or past the end, EOF covering nothing. A caller that does not want zeros
        (bdrv_co_is_zero_fast) gets DATA for the whole range."""
        if offset >= self.size:
            return Status(BDRV_BLOCK_EOF, 0)
        n = min(n, self.size - offset)
        base = BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED
        if not want_zero:
            eof = BDRV_BLOCK_EOF if offset + n == self.size else 0
            return Status(BDRV_BLOCK_DATA | base | eof, n, offset, self.filename)
        file_size = os.fstat(self.fd).st_size
        if offset >= file_size:
            return Status(BDRV_BLOCK_ZERO | base | BDRV_BLOCK_EOF, n, offset, self.filename)
        flags, length = _hole_or_data(self.fd, offset, n, file_size)
        return Status(flags | base, length, offset, self.filename)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _hole_or_data(fd: int, offset: int, n: int, file_size: int) -> tuple[int, int]:
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError:
        data = file_size
    if data > offset:
        return BDRV_BLOCK_ZERO, min(n, data - offset)
    hole = os.lseek(fd, offset, os.SEEK_HOLE)
    return BDRV_BLOCK_DATA, min(n, hole - offset)


def file_status(fd: int, offset: int, n: int) -> tuple[int, int]:
    """raw_co_block_status of the qcow2 file itself, with EOF (BDRV_BLOCK_RECURSE)."""
    size = os.fstat(fd).st_size
    if offset >= size:
        return BDRV_BLOCK_EOF, 0
    n = min(n, size - offset)
    flags, pnum = _hole_or_data(fd, offset, n, size)
    if offset + pnum == size:
        flags |= BDRV_BLOCK_EOF
    return flags, pnum


def qcow2_status(img: Image, offset: int, n: int, want_zero: bool = True) -> Status:
    """qcow2_co_block_status plus the generic part of bdrv_co_block_status for one qcow2
    node: the subcluster type at ``offset`` decides the flags, and the answer runs over the
    following subclusters of that type (host-contiguous for allocated ones) to the end of
    the L2 table at most (qcow2_get_host_offset)."""
    if img.metadata_preallocation is None:
        img.metadata_preallocation = detect_metadata_preallocation(img)
    if offset >= img.size:
        return Status(BDRV_BLOCK_EOF, 0)
    s = img.s
    g = s.geometry
    cs, scs = s.cluster_size, g.subcluster_size
    ext, dfile = s.extended_l2, s.has_data_file
    n = min(n, img.size - offset)
    in_cluster = offset & (cs - 1)
    # qcow2_get_host_offset looks no further than the end of the L2 slice.
    per = s.slice_entries
    needed = min(n + in_cluster, (per - g.l2_index(offset) % per) * cs)
    host: int | None = None
    found = cl.l2_slice(s, offset, img.snapshot_l1)
    if found is None:
        t = ST.UNALLOCATED_PLAIN
        covered = needed
    else:
        sc0 = g.subcluster_index(offset)
        e0, b0 = cl.get_entry(s, offset, img.snapshot_l1)
        t = subcluster_type(e0, b0, sc0, extended_l2=ext, has_data_file=dfile)
        if t is ST.INVALID:
            raise CorruptionError(f"invalid cluster entry {e0:#x} (guest {offset:#x})")
        with_offset = t in _HAS_OFFSET
        if with_offset:
            hc = e0 & L2E_OFFSET_MASK
            if hc % cs:
                raise CorruptionError(f"cluster allocation offset {hc:#x} unaligned")
            host = hc + in_cluster
        clusters = 1 if t is ST.COMPRESSED else max(1, -(-needed // cs))
        expected = e0 & L2E_OFFSET_MASK
        count = 0
        per = g.subclusters_per_cluster
        pos = offset - in_cluster
        for i in range(clusters):
            e, b = cl.get_entry(s, pos + i * cs, img.snapshot_l1)
            if with_offset and e & L2E_OFFSET_MASK != expected:
                break
            first = sc0 if i == 0 else 0
            same = first
            while same < per and subcluster_type(e, b, same, extended_l2=ext, has_data_file=dfile) is t:
                same += 1
            count += same - first
            if same < per:
                break
            expected += cs
        covered = min((count + sc0) * scs, needed)
    pnum = covered - in_cluster
    flags = BDRV_BLOCK_OFFSET_VALID if t in _HAS_OFFSET else 0
    if t is ST.ZERO_PLAIN or t is ST.ZERO_ALLOC:
        flags |= BDRV_BLOCK_ZERO
    elif t is not ST.UNALLOCATED_PLAIN and t is not ST.UNALLOCATED_ALLOC:
        flags |= BDRV_BLOCK_DATA
    if flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
        flags |= BDRV_BLOCK_ALLOCATED
    elif img.backing is None or (want_zero and offset >= img.backing.size):
        flags |= BDRV_BLOCK_ZERO
    if offset + pnum == img.size:
        flags |= BDRV_BLOCK_EOF
    filename = None
    if flags & BDRV_BLOCK_OFFSET_VALID:
        filename = img.data_filename if dfile else img.filename
    if want_zero and img.metadata_preallocation and flags & BDRV_BLOCK_DATA and host is not None:
        # BDRV_BLOCK_RECURSE: the qcow2 file itself says whether the host range is a hole.
        filename = img.filename
        fflags, fpnum = file_status(s.host.fd, host, pnum)
        if fflags & BDRV_BLOCK_EOF and (not fpnum or fflags & BDRV_BLOCK_ZERO):
            flags |= BDRV_BLOCK_ZERO
        else:
            pnum = fpnum
            flags = (flags | (fflags & BDRV_BLOCK_ZERO)) & ~BDRV_BLOCK_EOF
            if offset + pnum == img.size:
                flags |= BDRV_BLOCK_EOF
    return Status(flags, pnum, host, filename)


def detect_metadata_preallocation(img: Image) -> bool:
    """qcow2_detect_metadata_preallocation: clearly more clusters have a refcount than the
    file has blocks allocated. Decided once per open, at the first status query."""
    s = img.s
    cs = s.cluster_size
    # Dirty cache entries count as written: QEMU's st_blocks sees them once flushed, and
    # the caller (map, is_zero) acts on the image as written.
    s.l2_cache.write()
    s.rc_cache.write()
    st = os.fstat(s.host.fd)
    real = st.st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end_cluster = -(-st.st_size // cs)
    if end_cluster < threshold:
        return False
    per = s.geometry.refcount_block_entries
    count = 0
    for rt in range(min(len(s.reftable), -(-end_cluster // per))):
        if count >= threshold:
            break
        off = s.reftable[rt] & ~0x1FF
        if off:
            k = min(per, end_cluster - rt * per)
            count += int(np.count_nonzero(s.rc_cache.get(off)[:k]))
    return count >= threshold


def status_above(img: Image, offset: int, n: int, *, want_zero: bool = True) -> tuple[int, int]:
    """bdrv_block_status_above(bs, NULL): the whole chain as one node."""
    st = img.layer_status(offset, n, want_zero)
    if st.length == 0 or st.flags & BDRV_BLOCK_ALLOCATED:
        return st.flags, st.length
    n = st.length
    flags, pnum = st.flags, st.length
    layer = img.backing
    while layer is not None:
        st = layer.layer_status(offset, n, want_zero)
        if st.length == 0:
            # Past a shorter backing file's end: zeros, allocated there.
            return BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED, n
        flags, pnum = st.flags, st.length
        if flags & BDRV_BLOCK_ALLOCATED:
            break
        n = pnum
        layer = layer.backing
    return flags, pnum


def _extent(img: Image, offset: int, n: int) -> dict[str, Any]:
    """qemu-img.c get_block_status: one extent and its depth."""
    depth = 0
    layer: Any = img
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


def _joins(cur: dict[str, Any], nxt: dict[str, Any]) -> bool:
    """qemu-img.c entry_mergeable."""
    if cur["length"] == 0 or any(cur[k] != nxt[k] for k in ("zero", "data", "depth", "present")):
        return False
    if ("offset" in cur) != ("offset" in nxt) or cur.get("filename") != nxt.get("filename"):
        return False
    return "offset" not in cur or cur["offset"] + cur["length"] == nxt["offset"]


def image_map(img: Image, offset: int, n: int) -> list[dict[str, Any]]:
    """The extents of ``qemu-img map --output=json``. qemu-img is a fresh process, so each
    qcow2 layer decides afresh whether it looks preallocated; this open's own decisions
    are restored afterwards."""
    chain: list[Image] = []
    layer: Any = img
    while layer is not None:
        if hasattr(layer, "metadata_preallocation"):
            chain.append(layer)
        layer = layer.backing
    kept = [q.metadata_preallocation for q in chain]
    for q in chain:
        q.metadata_preallocation = detect_metadata_preallocation(q)
    out: list[dict[str, Any]] = []
    try:
        pos, end = offset, offset + n
        while pos < end:
            e = _extent(img, pos, end - pos)
            pos += e["length"]
            if out and _joins(out[-1], e):
                out[-1]["length"] += e["length"]
            else:
                out.append(e)
    finally:
        for q, v in zip(chain, kept, strict=True):
            q.metadata_preallocation = v
    for e in out:
        e.pop("filename", None)
    return out
