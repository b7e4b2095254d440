"""L1 and L2 tables: the references they hold and the rules on their entries
(qcow2.rst "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor";
block/qcow2-refcount.c check_refcounts_l1, check_refcounts_l2, check_oflag_copied).

Entries are decoded with numpy, a whole table at a time, with the masks of spec/entries.py;
the classification is qcow2_get_cluster_type's (spec.entries.cluster_type), vectorised.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spec import entries as en
from spec.features import QCOW2_AUTOCLEAR_DATA_FILE_RAW
from spec.refcounts import BDRV_MAX_LENGTH, Comparison, Kind, StoredRefcounts
from spec.rules.context import Context

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    U64 = npt.NDArray[np.uint64]
    Mask = npt.NDArray[np.bool_]
else:
    # Executed at first use: a small clean image is checked without numpy
    # (spec/rules/quick.py), and importing it is most of qcow2lab check's start-up.
    from spec.lazy import numpy as np


def _u(v: int) -> np.uint64:
    return np.uint64(v)


@dataclass
class L2View:
    """One L2 table, decoded: first words, bitmaps (zeros without extended L2) and classes."""

    entries: U64
    bitmaps: U64
    compressed: Mask
    zero_plain: Mask
    allocated: Mask
    """NORMAL or ZERO_ALLOC: a host cluster is in use."""
    unallocated: Mask

    @property
    def offsets(self) -> U64:
        return self.entries & _u(en.L2E_OFFSET_MASK)


def decode_l2(ctx: Context, data: bytes) -> L2View:
    words = np.frombuffer(data, dtype=">u8").astype(np.uint64)
    if ctx.img.extended_l2:
        entries, bitmaps = words[0::2], words[1::2]
    else:
        entries, bitmaps = words, np.zeros_like(words)
    has_data_file = ctx.img.has_data_file
    compressed = (entries & _u(en.QCOW_OFLAG_COMPRESSED)) != 0
    zero = ~compressed & ((entries & _u(en.QCOW_OFLAG_ZERO)) != 0) & (not ctx.img.extended_l2)
    has_off = (entries & _u(en.L2E_OFFSET_MASK)) != 0
    copied = (entries & _u(en.QCOW_OFLAG_COPIED)) != 0
    normal = ~compressed & ~zero & (has_off | (copied & has_data_file))
    return L2View(entries, bitmaps, compressed, zero & ~has_off, normal | (zero & has_off),
                  ~compressed & ~zero & ~normal)


BATCH_ENTRIES = 16384
"""L2 entries decoded together. Small clusters mean many small L2 tables, and a numpy pass per
table then costs more than the table, so several tables share a pass; larger batches spill out
of the CPU caches and get slower again (measured with ``qcow2lab bench check``: 8-16 Ki
entries is the sweet spot for 4 KiB and 64 KiB clusters alike). Memory stays bounded."""


@dataclass
class L2Batch:
    """Consecutive L2 tables of one L1 table, decoded together (entries in table order)."""

    view: L2View
    table: npt.NDArray[np.int64]
    """Per entry: its table's position in ``l2_offsets``."""
    index: npt.NDArray[np.int64]
    """Per entry: its index inside its table."""
    l2_offsets: list[int]
    l1_indexes: list[int]

    def at(self, j: int) -> int:
        """Host offset of entry ``j`` of the batch."""
        return self.l2_offsets[int(self.table[j])] + int(self.index[j]) * self.esize

    def hosts(self, idx: npt.NDArray[np.int64]) -> list[int]:
        """Host offsets of entries ``idx`` of the batch (``at``, for many at once: a wrecked
        image has a finding on nearly every entry)."""
        bases = np.asarray(self.l2_offsets, dtype=np.int64)
        return (bases[self.table[idx]] + self.index[idx] * self.esize).tolist()

    esize: int = 8


def l2_batches(ctx: Context, tables: list[tuple[int, int]]) -> Iterator[L2Batch]:
    """(L1 index, L2 offset) pairs -> decoded batches of whole tables, in the given order.

    A table of zeros (all entries unallocated, no bitmaps) breaks no rule and references
    nothing, so it is left out; a table wholly past the end of the file reads as zeros and
    is not even read. A wrecked L1 table (one reaching into guest data) points tens of
    thousands of times past the end of the file, and decoding those tables would dominate.
    """
    cs = ctx.cluster_size
    esize = ctx.geometry.l2_entry_size
    n = cs // esize
    per = max(1, BATCH_ENTRIES // n)
    file_size = ctx.img.file_size
    zeros = bytes(cs)
    chunk: list[tuple[int, int]] = []
    data: list[bytes] = []
    for i, off in tables:
        if off >= file_size:
            continue
        table = ctx.read(off, cs)
        if table == zeros:
            continue
        chunk.append((i, off))
        data.append(table)
        if len(chunk) == per:
            yield _batch(ctx, chunk, data, n, esize)
            chunk, data = [], []
    if chunk:
        yield _batch(ctx, chunk, data, n, esize)


def _batch(ctx: Context, chunk: list[tuple[int, int]], data: list[bytes], n: int, esize: int) -> L2Batch:
    count = len(chunk) * n
    return L2Batch(decode_l2(ctx, b"".join(data)), np.arange(count, dtype=np.int64) // n,
                   np.arange(count, dtype=np.int64) % n, [off for _, off in chunk],
                   [i for i, _ in chunk], esize)


def walk_l1(ctx: Context, l1_offset: int, l1_size: int, *, active: bool) -> None:
    """check_refcounts_l1: the L1 table, each L2 table it points to, and their clusters.

    QEMU counts one L2 table and then its clusters, table after table; the counts do not
    depend on the order, so the L2 tables are referenced first and their entries are then
    walked in batches (``l2_batches``).
    """
    if l1_size == 0:
        return
    ctx.ref(l1_offset, l1_size * 8, Kind.ACTIVE_L1 if active else Kind.INACTIVE_L1, "L1 table")
    if l1_offset + l1_size * 8 > BDRV_MAX_LENGTH:
        raise ctx.abort("L1-READABLE", l1_offset, "L1 table lies beyond what QEMU can read")
    l1 = np.frombuffer(ctx.read(l1_offset, l1_size * 8), dtype=">u8").astype(np.uint64)
    bad = np.nonzero(l1 & _u(en.L1E_RESERVED_MASK))[0]
    ctx.add_all("L1-RESERVED-ZERO", ((l1_offset + 8 * i, f"L1 entry {i} = {e:#x} has reserved bits set")
                                     for i, e in zip(bad.tolist(), l1[bad].tolist(), strict=True)))
    # QEMU tests the whole entry, not its offset, for "unallocated": an entry holding only
    # flag or reserved bits is walked as an L2 table at host offset 0 (the header).
    used = np.nonzero(l1)[0]
    l2_offsets = l1[used] & _u(en.L1E_OFFSET_MASK)
    ctx.refs(l2_offsets, ctx.cluster_size, Kind.L2, "L2 table")
    for i in used[(l2_offsets % _u(ctx.cluster_size)) != 0].tolist():
        ctx.add("L1-L2-ALIGNED", l1_offset + 8 * i,
                f"L1 entry {i}: L2 table offset {int(l1[i]) & en.L1E_OFFSET_MASK:#x} is not cluster aligned")
    for batch in l2_batches(ctx, list(zip(used.tolist(), l2_offsets.tolist(), strict=True))):
        walk_l2(ctx, batch, active=active)


def walk_l2(ctx: Context, batch: L2Batch, *, active: bool) -> None:
    """check_refcounts_l2 for a batch of tables, plus the spec-only entry rules."""
    img, cs, cb = ctx.img, ctx.cluster_size, ctx.cluster_bits
    v = batch.view
    ents, bms = v.entries, v.bitmaps

    def hits(mask: Mask, values: U64 | None = None) -> Iterator[tuple[int, int]]:
        """(host offset, value or 0) of every entry in ``mask``, in table order."""
        idx = np.nonzero(mask)[0]
        vals = values[idx].tolist() if values is not None else [0] * idx.size
        return zip(batch.hosts(idx), vals, strict=True)

    def hits3(mask: Mask, a: U64, b: U64) -> Iterator[tuple[int, int, int]]:
        idx = np.nonzero(mask)[0]
        return zip(batch.hosts(idx), a[idx].tolist(), b[idx].tolist(), strict=True)

    reserved = ~v.compressed & ((ents & _u(en.L2E_STD_RESERVED_MASK)) != 0)
    ctx.add_all("L2-RESERVED-ZERO", ((at, f"L2 entry {e:#x} has reserved bits set")
                                     for at, e in hits(reserved, ents)))

    # Compressed clusters.
    comp = v.compressed
    for at, _ in hits(comp & ((ents & _u(en.QCOW_OFLAG_COPIED)) != 0)):
        ctx.add("COMPRESSED-NO-COPIED", at, "COPIED set on a compressed cluster descriptor")
    if img.has_data_file:
        for at, _ in hits(comp):
            ctx.add("COMPRESSED-NO-DATA-FILE", at, "compressed cluster in an image with a data file")
        comp = np.zeros_like(comp)
    bad_bitmap = comp & (bms != 0)
    for at, b in hits(bad_bitmap, bms):
        ctx.add("COMPRESSED-NO-BITMAP", at, f"compressed cluster with subcluster bitmap {b:#x}")
    comp = comp & ~bad_bitmap
    if comp.any():
        omask = _u(en.cluster_offset_mask(cb))
        coff = ents[comp] & omask
        nb = ((ents[comp] >> _u(en.csize_shift(cb))) & _u(en.csize_mask(cb))) + _u(1)
        csize = nb * _u(512) - (coff & _u(511))
        ctx.refs(coff, csize, Kind.COMPRESSED, "compressed data")
        for at, _ in hits(comp & (((ents & omask) >> _u(56)) != 0)):
            ctx.add("COMPRESSED-OFFSET-RESERVED", at, "compressed host offset has bits above 55 set")
        if active:
            n = int(comp.sum())
            ctx.bfi.allocated_clusters += n
            ctx.bfi.compressed_clusters += n
            # QEMU counts every compressed cluster as fragmented (they share sectors).
            ctx.bfi.fragmented_clusters += n

    # Standard and preallocated zero clusters.
    alloc = v.allocated
    offs = v.offsets
    if img.extended_l2:
        bad = alloc & (((bms >> _u(32)) & bms & _u(en.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
        bad |= v.unallocated & ((bms & _u(en.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
        ctx.add_all("SUBCLUSTER-BITMAP-VALID", ((at, f"invalid subcluster bitmap {b:#x}")
                                                for at, b in hits(bad, bms)))
        for at, _ in hits(~v.compressed & ((ents & _u(en.QCOW_OFLAG_ZERO)) != 0)):
            ctx.add("EXTL2-ZERO-FLAG-CLEAR", at, "zero flag set in an extended L2 entry")
    elif img.version == 2:
        for at, _ in hits(~v.compressed & ((ents & _u(en.QCOW_OFLAG_ZERO)) != 0)):
            ctx.add("L2-NO-ZERO-FLAG-V2", at, "zero flag set in a version 2 image")
    ctx.add_all("L2-DATA-ALIGNED", ((at, f"host offset {o:#x} is not cluster aligned")
                                    for at, o in hits(alloc & ((offs & _u(cs - 1)) != 0), offs)))
    aoffs = offs[alloc]
    if active and aoffs.size:
        ctx.bfi.allocated_clusters += int(aoffs.size)
        # Contiguity is followed within one L2 table only (check_refcounts_l2 starts afresh
        # for each table).
        atab = batch.table[alloc]
        ctx.bfi.fragmented_clusters += int(np.count_nonzero((aoffs[1:] != aoffs[:-1] + _u(cs))
                                                            & (atab[1:] == atab[:-1])))
    if not img.has_data_file:
        # Data in an external data file is not refcounted (qcow2.rst "External data file").
        ctx.refs(aoffs, cs, Kind.DATA, "data cluster")
    elif active and img.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW:
        l1_index = np.array(batch.l1_indexes, dtype=np.uint64)[batch.table]
        guest = (batch.index.astype(np.uint64) + l1_index * _u(ctx.geometry.l2_entries)) << _u(cb)
        for at, g, o in hits3(alloc & (offs != guest), guest, offs):
            ctx.add("DATA-FILE-IDENTITY-MAP", at, f"raw data file maps guest {g:#x} to host {o:#x}")


def check_oflag_copied(ctx: Context, stored_get: StoredGet) -> None:
    """check_oflag_copied: COPIED on active L1/L2 entries iff the stored refcount is 1."""
    img, cb = ctx.img, ctx.cluster_bits
    l1_offset, l1_size = int(img.header.l1_table_offset), int(img.header.l1_size)
    if l1_size == 0:
        return
    l1 = np.frombuffer(ctx.read(l1_offset, l1_size * 8), dtype=">u8").astype(np.uint64)
    tables: list[tuple[int, int]] = []
    for i in np.nonzero(l1 & _u(en.L1E_OFFSET_MASK))[0].tolist():
        entry = int(l1[i])
        l2_offset = entry & en.L1E_OFFSET_MASK
        rc = stored_get(l2_offset >> cb)
        if rc is None:
            continue  # QEMU skips silently: compare_refcounts already counted it
        if (rc == 1) != bool(entry & en.QCOW_OFLAG_COPIED):
            ctx.add("L1-COPIED-IFF-REFCOUNT-1", l1_offset + 8 * i,
                    f"L1 entry {i} = {entry:#x}: COPIED does not match refcount {rc}", stored=rc)
        tables.append((i, l2_offset))
    for batch in l2_batches(ctx, tables):
        idx = np.nonzero(batch.view.allocated)[0]
        if idx.size == 0:
            continue
        ents = batch.view.entries[idx]
        copied = (ents & _u(en.QCOW_OFLAG_COPIED)) != 0
        if img.has_data_file:
            # Clusters in an external data file have an implicit refcount of 1.
            rcs = np.ones(idx.size, dtype=np.int64)
        else:
            rcs = stored_get.many(((ents & _u(en.L2E_OFFSET_MASK)) >> _u(cb)).astype(np.int64))
        wrong = (rcs >= 0) & ((rcs == 1) != copied)
        wrong_at = batch.hosts(idx[wrong])
        for at, e, rc2 in zip(wrong_at, ents[wrong].tolist(), rcs[wrong].tolist(), strict=True):
            ctx.add("COPIED-IFF-REFCOUNT-1", at,
                    f"L2 entry {e:#x}: COPIED does not match refcount {rc2}", stored=rc2)


class StoredGet:
    """Stored refcount lookups: the dense array compare() read for clusters inside the file,
    block reads past it."""

    def __init__(self, cmp: Comparison, stored: StoredRefcounts) -> None:
        self.cmp, self.stored = cmp, stored

    def __call__(self, k: int) -> int | None:
        if k < self.cmp.stored_dense.size:
            return None if self.cmp.unreadable_dense[k] else int(self.cmp.stored_dense[k])
        return self.stored.get(k)

    def many(self, clusters: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Stored refcounts of ``clusters``; -1 where unreadable. Refcounts that do not fit an
        int64 (64-bit refcounts near 2^64) are clamped, which keeps them != 1."""
        n = self.cmp.stored_dense.size
        out = np.full(clusters.size, -1, dtype=np.int64)
        inside = clusters < n
        ci = clusters[inside]
        vals = np.minimum(self.cmp.stored_dense[ci], np.uint64(2**62)).astype(np.int64)
        out[inside] = np.where(self.cmp.unreadable_dense[ci], -1, vals)
        for i in np.nonzero(~inside)[0].tolist():
            rc = self.stored.get(int(clusters[i]))
            out[i] = -1 if rc is None else min(rc, 2**62)
        return out
