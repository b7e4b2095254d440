"""Compressed writes: one cluster compressed (block/qcow2.c
qcow2_co_pwritev_compressed_part/_task; block/qcow2-cluster.c
qcow2_alloc_compressed_cluster_offset; block/qcow2-refcount.c qcow2_alloc_bytes).

``data`` is one whole cluster at a cluster-aligned offset (the last cluster may be
short when it ends at the end of the image; it is zero-padded). If compression does
not save at least one byte the cluster is written normally, as QEMU does. The
compressed bytes are packed after the previous compressed cluster, possibly running
into the next host cluster.

The checks, in QEMU's order:

==================================  ===============================================
request                             outcome
==================================  ===============================================
offset or length not a multiple     RequestError (qemu-io-cmds.c write_f refuses
of 512                              ``write -c`` that is not sector-aligned)
outside the image                   RequestError (blk_check_byte_request)
external data file                  UnsupportedFeature (qcow2_co_pwritev_compressed
                                    _part, before any other check)
empty (``data`` is b"")             success; the host file's length is rounded up
                                    to a multiple of 512 (same function: the empty
                                    write ends a compressed stream, qemu-img
                                    convert -c)
not one cluster, cluster-aligned    RequestError (-EINVAL)
==================================  ===============================================

Errors: RequestError (alignment, size, range, or the cluster is already allocated: QEMU
fails that with -EIO), UnsupportedFeature (external data file: QEMU refuses compression
there), CorruptionError.

Where the compressed bytes go is QEMU's allocator for them, ``alloc_bytes``
(qcow2_alloc_bytes), including its habit of packing after ``free_byte_offset`` into a
cluster that has since been freed and reused (model/__init__.py).
"""

from __future__ import annotations

from model import compress as cz
from model import mapping as mp
from model import overlap as ov
from model import write as wr
from model.state import ModelFile, State, check_range, mark_dirty
from spec import refblocks as rb
from spec.entries import L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, csize_shift
from spec.errors import RequestError, UnsupportedFeature
from spec.geometry import align_up

BDRV_SECTOR_SIZE = 512


def check_request(s: State, offset: int, n: int) -> None:
    """What is refused before the block layer writes anything (so no bitmap bit is set)."""
    if offset % BDRV_SECTOR_SIZE or n % BDRV_SECTOR_SIZE:
        raise RequestError("compressed writes must be sector aligned (qemu-io write -c)")
    check_range(s, offset, n)


def write_compressed(s: State, offset: int, data: bytes) -> None:
    """Write one cluster compressed (see the module doc)."""
    check_request(s, offset, len(data))
    cs = s.cluster_size
    # qcow2_co_pwritev_compressed_part refuses an external data file (-ENOTSUP) before
    # it looks at the alignment (-EINVAL), so that check comes first here too.
    if s.q.has_data_file:
        raise UnsupportedFeature("compressed writes with an external data file")
    if not data:
        # The driver takes an empty compressed write as "the stream is complete" and
        # truncates the file to its own length as the block layer sees it, in whole
        # sectors (bdrv_getlength): a file ending mid-sector after packed compressed
        # data is padded with zeros. Nothing else changes (not even the dirty bit).
        size = s.q.file_size()
        if size % BDRV_SECTOR_SIZE:
            s.q.truncate(align_up(size, BDRV_SECTOR_SIZE))
        return
    if offset % cs:
        raise RequestError("compressed writes must be cluster aligned")
    if len(data) != cs and not (0 < len(data) < cs and offset + len(data) == s.size):
        raise RequestError("compressed writes must cover exactly one cluster")
    _write_cluster(s, offset, bytes(data) + bytes(cs - len(data)))


def _write_cluster(s: State, offset: int, data: bytes) -> None:
    """One whole cluster (zero-padded) at a cluster-aligned offset."""
    q = s.q
    mark_dirty(s)
    out = cz.compress(data, q.image_file.compression_type, q.cluster_size - 1)
    if out is None:
        wr.write(s, offset, data[:min(len(data), s.size - offset)])
        return
    l2off = mp.l2_table_for_write(q, offset)
    table = mp.read_l2(q, l2off)
    idx = q.geometry.l2_index(offset)
    if table[idx][0] & L2E_OFFSET_MASK:
        raise RequestError("compressed writes need an unallocated cluster (QEMU: -EIO)")
    host = alloc_bytes(q, len(out))
    ov.check_data_write(q, host, len(out))
    nb_additional = ((host + len(out) - 1) >> 9) - (host >> 9)
    entry = QCOW_OFLAG_COMPRESSED | (nb_additional << csize_shift(q.cluster_bits)) | host
    # The data first, the L2 entry that maps it after (a barrier between, ModelFile): a
    # power cut must not leave an entry pointing at bytes that were never written.
    q.data_pwrite(host, out)
    table = mp.read_l2(q, l2off)
    table[idx] = (entry, 0)
    mp.write_l2(q, l2off, table)


def alloc_bytes(q: ModelFile, size: int) -> int:
    """QEMU's allocator for compressed data (block/qcow2-refcount.c, qcow2_alloc_bytes):
    ``size`` bytes right after the previous compressed cluster (``free_byte_offset``), so
    that several share one host cluster; the data may continue into the next cluster when
    that one is the next free one; each touched cluster gains one reference. The format
    only asks that a descriptor point at the bytes; the packing, and its cursor that
    survives a free of its cluster (see below), are QEMU's habit."""
    cs = q.cluster_size
    offset = q.free_byte_offset
    owned = rb.get_refcount(q, offset // cs) if offset else 0
    if offset and owned == q.refcount_max:
        offset = 0
    remembered = offset
    free_in_cluster = cs - offset % cs
    while True:
        if not offset or free_in_cluster < size:
            new_cluster = rb.alloc_clusters_noref(q, 1)
            if not offset or align_up(offset, cs) != new_cluster:
                offset = new_cluster
                free_in_cluster = cs
            else:
                free_in_cluster += cs
        try:
            rb.update_refcount(q, offset, size, 1)
        except rb.Again:
            offset = 0
            continue
        break
    if remembered and offset == remembered and q.packing_cluster_freed and owned:
        # QEMU 7.2 keeps packing after free_byte_offset although that cluster was freed and
        # has since been allocated to something else (model/__init__.py): the compressed
        # bytes go over live data or metadata. Reproduced, and recorded so that a harness
        # knows QEMU's own image is damaged from here on.
        q.packed_into_live_cluster = True
    q.packing_cluster_freed = False
    q.free_byte_offset = (offset + size) if (offset + size) % cs else 0
    return offset
