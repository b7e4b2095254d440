"""Refcounts computed from references, and refcounts as stored, for ``qemu-img check``.

qcow2.rst "Host cluster management": the refcount of a host cluster is the number of
references to it. ``Tally`` builds that number from the references a walker hands it, the way
block/qcow2-refcount.c (calculate_refcounts, inc_refcounts) builds its in-memory table;
``StoredRefcounts`` reads the on-disk refcount table and blocks as qcow2_get_refcount does;
``compare`` pairs them as compare_refcounts does.

Memory stays bounded by the image file, not by what its tables claim. QEMU 7.2 refuses to
count a reference that ends one cluster or more past the end of the file
(qcow2_inc_refcounts_imrt: one corruption per such reference, nothing counted); ``Tally``
does the same and hands the refused references back to the caller. What remains past the end
of the file is less than two clusters, kept in a small dictionary; clusters inside the file
live in numpy arrays.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spec.entries import REFT_OFFSET_MASK
from spec.geometry import Geometry

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    UIntArray = npt.NDArray[np.uint64]
else:
    from spec.lazy import numpy as np  # executed at first use: CLI start-up (spec/lazy.py)


class Kind(enum.IntEnum):
    """What a host cluster holds, for overlap reporting (QEMU's QCow2MetadataOverlap plus data)."""

    FREE = 0
    HEADER = 1
    ACTIVE_L1 = 2
    L2 = 3
    DATA = 4
    COMPRESSED = 5
    SNAPSHOT_TABLE = 6
    INACTIVE_L1 = 7
    REFCOUNT_TABLE = 8
    REFCOUNT_BLOCK = 9
    CRYPTO_HEADER = 10
    BITMAP_DIRECTORY = 11
    BITMAP_TABLE = 12
    BITMAP_DATA = 13


SHAREABLE = frozenset({Kind.L2, Kind.DATA, Kind.COMPRESSED})
"""Kinds that several references may legitimately share (snapshots share L2 tables and data;
compressed clusters pack several streams into one host cluster)."""


@dataclass
class Overlap:
    cluster: int
    first: Kind
    second: Kind


def _stored_dtype(refcount_bits: int) -> type[np.unsignedinteger]:
    if refcount_bits <= 8:
        return np.uint8
    if refcount_bits <= 16:
        return np.uint16
    return np.uint32 if refcount_bits == 32 else np.uint64


def _computed_dtype(refcount_bits: int) -> type[np.unsignedinteger]:
    # One size wider than the refcount itself, so a sum can exceed refcount_max before clamping.
    if refcount_bits <= 8:
        return np.uint16
    if refcount_bits <= 16:
        return np.uint32
    return np.uint64


@dataclass
class Tally:
    """Expected refcounts: one per reference, as inc_refcounts counts them."""

    geometry: Geometry
    file_size: int
    counts: npt.NDArray[np.unsignedinteger] = field(init=False)
    kinds: npt.NDArray[np.uint8] = field(init=False)
    beyond: dict[int, int] = field(default_factory=dict)
    """Counts of the (at most two) clusters past the end of the file QEMU still counts."""
    beyond_kinds: dict[int, Kind] = field(default_factory=dict)
    nb_clusters: int = 0
    """QEMU's refcount_table_size: the file's clusters, grown to the highest reference + 1."""
    overflows: list[tuple[int, int]] = field(default_factory=list)
    """(cluster, increments dropped) where the count would pass refcount_max."""
    overlaps: list[Overlap] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.refcount_max = (1 << self.geometry.refcount_bits) - 1
        self.file_clusters = -(-self.file_size // self.geometry.cluster_size)
        self.counts = np.zeros(self.file_clusters, dtype=_computed_dtype(self.geometry.refcount_bits))
        self.kinds = np.zeros(self.file_clusters, dtype=np.uint8)
        self.nb_clusters = self.file_clusters

    # --- adding references -----------------------------------------------------------------
    def past_eof(self, offset: int, size: int) -> bool:
        """QEMU's refusal: the region ends a cluster or more past the end of the file."""
        return offset + size - self.file_size >= self.geometry.cluster_size

    def add_range(self, offset: int, size: int, kind: Kind) -> bool:
        """One reference to every cluster touched by [offset, offset + size).

        Returns False, counting nothing, when QEMU refuses the reference (``past_eof``).
        """
        if size <= 0:
            return True
        if self.past_eof(offset, size):
            return False
        cb = self.geometry.cluster_bits
        first, last = offset >> cb, (offset + size - 1) >> cb
        if first == last and first < self.file_clusters:
            self._add_one_inside(first, kind)  # the common case, without numpy's per-call cost
        else:
            self.add_clusters(np.arange(first, last + 1, dtype=np.int64), kind)
        return True

    def add_regions(self, offsets: UIntArray, sizes: UIntArray, kind: Kind) -> UIntArray:
        """``add_range`` for many regions at once; returns the offsets QEMU refuses."""
        if offsets.size == 0:
            return offsets
        o = offsets.astype(np.uint64)
        end = o + sizes.astype(np.uint64)
        refused = end >= np.uint64(self.file_size + self.geometry.cluster_size)
        o, end = o[~refused], end[~refused]
        if o.size:
            cb = np.uint64(self.geometry.cluster_bits)
            first = (o >> cb).astype(np.int64)
            last = ((end - np.uint64(1)) >> cb).astype(np.int64)
            span = int((last - first).max()) + 1
            self.add_clusters(np.concatenate([(first + k)[first + k <= last] for k in range(span)]), kind)
        return offsets[refused]

    def add_clusters(self, clusters: IntArray, kind: Kind) -> None:
        """One reference to each listed cluster index (repeats count again)."""
        if clusters.size == 0:
            return
        self.nb_clusters = max(self.nb_clusters, int(clusters.max()) + 1)
        inside = clusters[clusters < self.file_clusters]
        if inside.size:
            self._add_inside(inside, kind)
        for k in clusters[clusters >= self.file_clusters].tolist():
            self._add_one_past_eof(int(k), kind)

    def _add_one_inside(self, k: int, kind: Kind) -> None:
        """``_add_inside`` for a single cluster inside the file, with the same effects."""
        self.nb_clusters = max(self.nb_clusters, k + 1)
        n = int(self.counts[k]) + 1
        if n > self.refcount_max:
            self.overflows.append((k, n - self.refcount_max))
            n = self.refcount_max
        self.counts[k] = n
        old = int(self.kinds[k])
        if old == Kind.FREE:
            self.kinds[k] = kind
        elif kind not in SHAREABLE or old != kind:
            self.overlaps.append(Overlap(k, Kind(old), kind))

    def _add_inside(self, clusters: IntArray, kind: Kind) -> None:
        if clusters.size == 1 or bool(np.all(clusters[1:] > clusters[:-1])):
            # Already unique and sorted (a table's clusters usually are): skip np.unique's sort.
            uniq, reps = clusters, np.ones(clusters.size, dtype=np.int64)
        else:
            uniq, reps = np.unique(clusters, return_counts=True)
        new = self.counts[uniq].astype(np.uint64) + reps.astype(np.uint64)
        over = new > self.refcount_max
        if over.any():
            for k, n in zip(uniq[over].tolist(), (new[over] - self.refcount_max).tolist(), strict=True):
                self.overflows.append((int(k), int(n)))
            new = np.minimum(new, self.refcount_max)
        self.counts[uniq] = new.astype(self.counts.dtype)
        old = self.kinds[uniq]
        clash = old != Kind.FREE
        if kind in SHAREABLE:
            clash &= old != kind
        else:
            clash |= reps > 1
        for k, o in zip(uniq[clash].tolist(), old[clash].tolist(), strict=True):
            self.overlaps.append(Overlap(int(k), Kind(o) if o else kind, kind))
        fresh = uniq[old == Kind.FREE]
        self.kinds[fresh] = kind

    def _add_one_past_eof(self, k: int, kind: Kind) -> None:
        n = self.beyond.get(k, 0)
        if n >= self.refcount_max:
            self.overflows.append((k, 1))
        else:
            self.beyond[k] = n + 1
        old = self.beyond_kinds.get(k)
        if old is None:
            self.beyond_kinds[k] = kind
        elif old != kind or kind not in SHAREABLE:
            self.overlaps.append(Overlap(k, old, kind))

    # --- reading back --------------------------------------------------------------------------
    def get(self, k: int) -> int:
        if k < self.file_clusters:
            return int(self.counts[k])
        return self.beyond.get(k, 0)


# --- stored refcounts --------------------------------------------------------------------------


def decode_refcount_block(data: bytes, refcount_bits: int) -> UIntArray:
    """All refcounts of one block (qcow2.rst "Host cluster management").

    Widths of 8 bits and more are big-endian integers; narrower ones pack from the least
    significant bit of each byte (block/qcow2-refcount.c, get_refcount_ro0..ro2).
    """
    if refcount_bits >= 8:
        return np.frombuffer(data, dtype=f">u{refcount_bits // 8}").astype(np.uint64)
    raw = np.frombuffer(data, dtype=np.uint8)
    per_byte = 8 // refcount_bits
    shifts = np.arange(per_byte, dtype=np.uint8) * refcount_bits
    vals = (raw[:, None] >> shifts[None, :]) & ((1 << refcount_bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


BDRV_MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)
"""QEMU's block layer refuses any request reaching past this offset (include/block/block_int.h,
bdrv_check_qiov_request): such a read is an I/O error, not zeros."""

Reader = Callable[[int, int], bytes]
"""read(offset, n) -> n bytes, zero-filled past the end of the file (as QEMU's block layer)."""


@dataclass
class StoredRefcounts:
    """The refcounts the image stores, read as qcow2_get_refcount reads them.

    An index past the refcount table, or a zero table entry, means refcount 0. A refcount block
    offset that is not cluster aligned, or lies beyond what the block layer can address, cannot
    be read: QEMU fails the lookup (-EIO), and check counts one check error per cluster it
    cannot look up.
    """

    geometry: Geometry
    reftable: UIntArray
    read: Reader
    _cache: dict[int, UIntArray] = field(default_factory=dict)

    @property
    def entries_per_block(self) -> int:
        return self.geometry.refcount_block_entries

    def block_offset(self, rt_index: int) -> int:
        if rt_index >= self.reftable.size:
            return 0
        return int(self.reftable[rt_index]) & REFT_OFFSET_MASK

    def readable(self, rt_index: int) -> bool:
        off = self.block_offset(rt_index)
        end = off + self.geometry.cluster_size
        return self.geometry.offset_in_cluster(off) == 0 and end <= BDRV_MAX_LENGTH

    def block(self, rt_index: int, count: int | None = None) -> UIntArray | None:
        """Refcounts of block ``rt_index`` (only its first ``count`` when given: a 2 MiB block
        of 1-bit refcounts has 16 Mi entries, and a small file needs a few); None if
        unreadable; zeros if unallocated."""
        n = self.entries_per_block if count is None else min(count, self.entries_per_block)
        off = self.block_offset(rt_index)
        if off == 0:
            return np.zeros(n, dtype=np.uint64)
        if not self.readable(rt_index):
            return None
        cached = self._cache.get(off)
        if cached is None and n < self.entries_per_block:
            bits = self.geometry.refcount_bits
            return decode_refcount_block(self.read(off, -(-n * bits // 8)), bits)[:n]
        if cached is None:
            if len(self._cache) >= 256:
                self._cache.clear()
            cached = decode_refcount_block(self.read(off, self.geometry.cluster_size),
                                           self.geometry.refcount_bits)
            self._cache[off] = cached
        return cached[:n]

    def get(self, k: int) -> int | None:
        """Stored refcount of cluster ``k``; None when QEMU cannot read it."""
        rbe = self.entries_per_block
        if self.block_offset(k // rbe) == 0:
            return 0  # without building a block of zeros: a wrecked L1 asks for many such
        blk = self.block(k // rbe)
        return None if blk is None else int(blk[k % rbe])

    def dense(self, n: int) -> tuple[npt.NDArray[np.unsignedinteger], npt.NDArray[np.bool_]]:
        """(refcounts, unreadable mask) of clusters 0..n-1."""
        rbe = self.entries_per_block
        values = np.zeros(n, dtype=_stored_dtype(self.geometry.refcount_bits))
        bad = np.zeros(n, dtype=np.bool_)
        for i in range(min(self.reftable.size, -(-n // rbe))):
            lo, hi = i * rbe, min(n, (i + 1) * rbe)
            blk = self.block(i, hi - lo)
            if blk is None:
                bad[lo:hi] = True
            else:
                values[lo:hi] = blk
        return values, bad

    def past(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(cluster, refcount) for clusters in [start, end) with a readable, non-zero refcount."""
        rbe = self.entries_per_block
        first_block = start // rbe
        last_block = min(self.reftable.size, -(-end // rbe))
        for i in range(first_block, last_block):
            if self.block_offset(i) == 0 or not self.readable(i):
                continue
            blk = self.block(i)
            assert blk is not None
            lo = max(start, i * rbe)
            hi = min(end, (i + 1) * rbe)
            sub = blk[lo - i * rbe: hi - i * rbe]
            for j in np.nonzero(sub)[0].tolist():
                yield lo + int(j), int(sub[j])

    def unreadable_runs(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(first cluster, count) of clusters in [start, end) behind an unaligned block offset."""
        rbe = self.entries_per_block
        for i in range(start // rbe, min(self.reftable.size, -(-end // rbe))):
            if self.block_offset(i) and not self.readable(i):
                lo, hi = max(start, i * rbe), min(end, (i + 1) * rbe)
                if hi > lo:
                    yield lo, hi - lo


# --- comparison ---------------------------------------------------------------------------------


@dataclass
class Mismatch:
    cluster: int
    stored: int
    computed: int


@dataclass
class Comparison:
    """What compare_refcounts finds: mismatches, unreadable clusters and the highest used one."""

    mismatches: list[Mismatch]
    unreadable: list[tuple[int, int]]
    """(first cluster, count) runs whose stored refcount cannot be read."""
    highest_cluster: int
    stored_dense: npt.NDArray[np.unsignedinteger]
    """Stored refcounts of the clusters inside the file (reused by the COPIED check)."""
    unreadable_dense: npt.NDArray[np.bool_]


def compare(tally: Tally, stored: StoredRefcounts) -> Comparison:
    """Compare stored with computed refcounts for clusters 0..tally.nb_clusters-1.

    As compare_refcounts: an unreadable stored refcount is skipped (a check error); the highest
    cluster with either refcount non-zero sets image-end-offset.
    """
    n_dense = min(tally.file_clusters, tally.nb_clusters)
    values, bad = stored.dense(n_dense)
    computed = tally.counts[:n_dense]
    ok = ~bad
    diff = np.nonzero((values != computed) & ok)[0]
    mismatches = [Mismatch(int(k), int(values[k]), int(computed[k])) for k in diff.tolist()]
    used = np.nonzero(((values > 0) | (computed > 0)) & ok)[0]
    highest = int(used[-1]) if used.size else 0
    unreadable = _runs(np.nonzero(bad)[0])

    # Past the end of the file: only referenced clusters and stored non-zero ones can differ.
    if tally.nb_clusters > n_dense:
        start, end = n_dense, tally.nb_clusters
        bad_runs = list(stored.unreadable_runs(start, end))
        unreadable += bad_runs

        def is_bad(k: int) -> bool:
            return any(lo <= k < lo + n for lo, n in bad_runs)

        seen: dict[int, int] = dict(stored.past(start, end))
        for k in tally.beyond:
            seen.setdefault(k, 0)
        for k in sorted(seen):
            if is_bad(k):
                continue
            s, c = seen[k], tally.beyond.get(k, 0)
            if s or c:
                highest = max(highest, k)
            if s != c:
                mismatches.append(Mismatch(k, s, c))
    return Comparison(mismatches, unreadable, highest, values, bad)


def _runs(idx: IntArray) -> list[tuple[int, int]]:
    if idx.size == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0]
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks + 1, [idx.size]))
    return [(int(idx[s]), int(e - s)) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
