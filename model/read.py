"""Guest reads (block/qcow2.c qcow2_co_preadv_part, qcow2_co_preadv_task,
qcow2_co_preadv_compressed).

A request is cut into per-subcluster primitives; each cluster's entry is looked up afresh in
the tables on disk (model/mapping.py), and each subcluster is classified from it:

============================  ==============================================
subcluster type               bytes read
============================  ==============================================
UNALLOCATED_PLAIN / _ALLOC     backing file, zeros past its end or without one
                               (qcow2_co_preadv_task: bdrv_co_preadv on backing)
ZERO_PLAIN / ZERO_ALLOC        zeros, never the backing file
NORMAL                         host cluster (data file when external),
                               decrypted when the image is encrypted
COMPRESSED                     the decompressed cluster (qcow2_co_preadv_compressed),
                               never decrypted (QEMU stores it unencrypted)
INVALID                        CorruptionError, image flagged corrupt
                               (qcow2_get_host_offset)
============================  ==============================================

Errors: CorruptionError for an invalid entry or an unaligned host offset (the facade flags
the image); UnflaggedError for a compressed cluster that does not decode or a backing file
that cannot be read (the request fails, nothing is flagged).
"""

from __future__ import annotations

from model import compress as cz
from model import mapping as mp
from model.state import State, UnflaggedError
from spec.encryption import SECTOR_SIZE
from spec.entries import HOST_OFFSET_TYPES, L2E_OFFSET_MASK, SubclusterType, compressed_range, subcluster_type
from spec.errors import CorruptionError
from spec.geometry import align_down, align_up


def read(s: State, offset: int, n: int) -> bytes:
    """Guest bytes [offset, offset+n), without a range check: COW reads reach past the guest
    end within the last cluster, as QEMU's do (perform_cow reads through the driver)."""
    out = bytearray()
    pos, end = offset, offset + n
    q = s.q
    cs, scs = q.cluster_size, q.geometry.subcluster_size
    while pos < end:
        # One lookup per cluster; then each subcluster is classified from that entry.
        entry, bitmap = mp.get_entry(q, pos, s.snapshot_l1)
        cluster_end = min(end, align_down(pos, cs) + cs)
        while pos < cluster_end:
            piece_end = min(cluster_end, align_down(pos, scs) + scs)
            out += read_subcluster(s, pos, piece_end - pos, entry, bitmap)
            pos = piece_end
    return bytes(out)


def read_subcluster(s: State, pos: int, n: int, entry: int, bitmap: int) -> bytes:
    """[pos, pos+n) within one subcluster, mapped by (entry, bitmap) (see the module doc)."""
    q = s.q
    t = subcluster_type(entry, bitmap, q.geometry.subcluster_index(pos),
                        extended_l2=q.extended_l2, has_data_file=q.has_data_file)
    host = entry & L2E_OFFSET_MASK
    if t in HOST_OFFSET_TYPES and host % q.cluster_size:
        raise CorruptionError(f"cluster allocation offset {host:#x} unaligned (guest {pos:#x})")
    if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC) and q.version < 3:
        # qcow2_get_host_offset (block/qcow2-cluster.c): v2 has no zero flag, so an entry
        # with it set is corruption; QEMU flags the image and fails the read with EIO.
        raise CorruptionError(f"zero cluster entry found in pre-v3 image (guest {pos:#x})")
    if t in (SubclusterType.UNALLOCATED_PLAIN, SubclusterType.UNALLOCATED_ALLOC):
        return backing_read(s, pos, n)
    if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
        return bytes(n)
    if t is SubclusterType.NORMAL:
        at = host + q.geometry.offset_in_cluster(pos)
        if s.crypto is not None:
            return _decrypted(s, at, pos, n)
        return q.data_pread(at, n)
    if t is SubclusterType.COMPRESSED:
        # Compressed clusters are stored and read unencrypted, even in an encrypted image
        # (qcow2_co_preadv_task decompresses without decrypting; spec CRYPT-COMPRESSED).
        cluster = _decompress(s, entry)
        start = q.geometry.offset_in_cluster(pos)
        return cluster[start:start + n]
    raise CorruptionError(f"invalid cluster entry {entry:#x}/{bitmap:#x} (guest {pos:#x})")


def _decrypted(s: State, host: int, pos: int, n: int) -> bytes:
    """[pos, pos+n) of a data subcluster at host offset ``host``, decrypted. The cipher works
    on whole 512-byte sectors, so the sectors around the range are read and decrypted
    (QEMU's request alignment is the sector on an encrypted image; qcow2_co_preadv_encrypted
    numbers each sector by its host offset for LUKS, its guest offset for legacy AES)."""
    assert s.crypto is not None
    head = pos % SECTOR_SIZE
    length = align_up(head + n, SECTOR_SIZE)
    raw = s.q.data_pread(host - head, length)
    return s.crypto.decrypt(host - head, pos - head, raw)[head:head + n]


def _decompress(s: State, entry: int) -> bytes:
    q = s.q
    coff, csize = compressed_range(entry, q.cluster_bits)
    ctype = q.image_file.compression_type
    try:
        return cz.decompress(q.pread(coff, csize), ctype, q.cluster_size)
    except CorruptionError as e:
        # qcow2_co_preadv_compressed fails the request with -EIO but does not flag the
        # image; mark the error so the facade lets it through unflagged.
        raise UnflaggedError(str(e)) from None


def backing_read(s: State, pos: int, n: int) -> bytes:
    """The backing layer's bytes; zeros past its end or without one (block/io.c,
    bdrv_aligned_preadv clamps to the layer's length and zero-fills the rest)."""
    if s.backing is None or pos >= s.backing.size:
        return bytes(n)
    inside = min(n, s.backing.size - pos)
    try:
        return s.backing.read(pos, inside) + bytes(n - inside)
    except CorruptionError as e:
        raise UnflaggedError(str(e)) from None
