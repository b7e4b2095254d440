"""The open image's state, which every operation module takes (model/read.py, write.py,
zeroes.py, compressed.py, snapshots.py, resize.py, mapping_report.py).

``State`` holds what QEMU's BDRVQcow2State holds for one open node and the model needs: the
raw file and header (``ModelFile``, spec.qfile), the backing layer, the virtual size, the L1
table reads go through, and QEMU's per-open decisions (metadata preallocation, where the
last preallocated run ended). Nothing here is a cache of on-disk data: every table is read
from the file when it is needed.

Errors: ``UnflaggedError`` marks a CorruptionError that fails the request without flagging
the image (model/image.py, Image._guard).
"""

from __future__ import annotations

from typing import BinaryIO

from model.backing import Layer
from model.overlap import check_metadata_write
from spec import features as ft
from spec.encryption import Qcow2Crypto
from spec.errors import CorruptionError, RequestError
from spec.image import ImageFile
from spec.info import virtual_size
from spec.qfile import Qcow2File


class ModelFile(Qcow2File):
    """spec's raw file plus the model's write ordering and its compressed-cluster packing
    cursor (BDRVQcow2State.free_byte_offset; model/compressed.py, qcow2_alloc_bytes).

    Ordering. The model writes every metadata update straight to the file, so where QEMU
    orders cache write-backs (block/qcow2-cache.c qcow2_cache_set_dependency,
    qcow2_cache_depends_on_flush) the model puts a barrier, a flush, before every metadata
    write that follows an unflushed write. Since each operation module already writes in
    the order that keeps the file consistent step by step (refcounts raised before the L2
    entry that uses them, COW and guest data before the L2 entry that maps them, an L2 table
    before its L1 entry, an L2 entry cleared before the refcount it held drops, the dirty bit
    before lazy metadata and cleared last), the barrier makes each step durable before the
    next one depends on it, on a disk that reorders writes between flushes too. A freed
    cluster is reused only after the refcount write that freed it, and that write came after
    a barrier which made the unlinking L2 entry durable. ``sync`` False (cache=unsafe) keeps
    the barriers (a recorder sees them) and skips the fdatasync.
    """

    def __init__(self, img: ImageFile, f: BinaryIO, *, readonly: bool,
                 data_f: BinaryIO | None = None) -> None:
        super().__init__(img, f, readonly=readonly, data_f=data_f)
        self.free_byte_offset = 0
        self.packing_cluster_freed = False
        """The cluster of free_byte_offset has been freed since it was remembered."""
        self.packed_into_live_cluster = False
        """alloc_bytes reproduced QEMU's packing into a cluster something else owns."""
        self.sync = True
        """False with cache="unsafe": barriers and flushes skip the fdatasync."""
        self.l1_released = False
        """The close has begun: QEMU's qcow2_close freed the L1 table, so its overlap checks
        no longer see active L2 tables (model/overlap.py)."""

    def barrier(self) -> None:
        if self.unflushed:
            self.flush_all(sync=self.sync)

    def check_refblock_write(self, offset: int, n: int) -> None:
        """QEMU flushes the blocks alloc_refcount_block and qcow2_refcount_area write at
        once, so the model checks them as it writes them (model/overlap.py)."""
        check_metadata_write(self, offset, n, "refcount block")

    def refcount_freed(self, cluster_index: int) -> None:
        super().refcount_freed(cluster_index)
        if self.free_byte_offset and cluster_index == self.free_byte_offset // self.cluster_size:
            self.packing_cluster_freed = True


class State:
    """One open qcow2 image, as the operation modules see it (see the module doc)."""

    def __init__(self, q: ModelFile, backing: Layer | None) -> None:
        self.q = q
        self.backing = backing
        self.filename = q.path
        self.data_filename = q.image_file.data_file
        self.cluster_size = q.cluster_size
        self.size = virtual_size(int(q.header.size))
        self.readonly = q.readonly
        self.last_host_end = 0
        """Where the last allocating run ended on the host (preallocate_co's file end)."""
        self.metadata_preallocation: bool | None = None
        """BDRVQcow2State.metadata_preallocation(_checked): whether this open image looks
        preallocated, decided at its first block-status query and kept for the life of the
        open, as QEMU does (see status.detect_metadata_preallocation); None until then.
        map() answers as a fresh ``qemu-img map`` process would, deciding anew."""
        self.snapshot_l1: tuple[int, int] | None = None
        """(l1_table_offset, l1_size) when open(snapshot=...) redirected reads."""
        self.crypto: Qcow2Crypto | None = None
        """The unlocked payload cipher of an encrypted image (spec/encryption.py; QEMU's
        s->crypto), set by open(key_secret=...). Data clusters go through it (read.py,
        write.py); metadata and compressed clusters never do."""


class UnflaggedError(CorruptionError):
    """Fails the request and flags nothing: a compressed cluster that does not decode
    (qcow2_co_preadv_compressed returns -EIO), or a failed read of a backing file (QEMU
    flags the backing node, if anything, not this one). Public methods raise it as a plain
    CorruptionError (Image._guard)."""


def check_range(s: State, offset: int, n: int) -> None:
    """RequestError unless [offset, offset+n) lies inside the image (blk_check_byte_request)."""
    if offset < 0 or n < 0 or offset + n > s.size:
        raise RequestError(f"request [{offset}, {offset + n}) outside the image (size {s.size})")


def mark_dirty(s: State) -> None:
    """With lazy refcounts QEMU sets the dirty bit before the first allocating write
    (qcow2_mark_dirty) and clears it on a clean close (qcow2_mark_clean). The model
    updates refcounts eagerly, so the file is always consistent; the bit is still set
    so that the header says what QEMU's would."""
    h = s.q.header
    if h.v3 is not None and h.v3.compatible_features & ft.QCOW2_COMPAT_LAZY_REFCOUNTS:
        s.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, True)
