"""QEMU's refcount block cache during a repair, as far as it decides what reaches the file.

``qemu-img check -r`` repairs refcounts through the refcount block cache
(block/qcow2-refcount.c compare_refcounts -> update_refcount, block/qcow2-cache.c). A dirty
block reaches the file only when the cache evicts it (the least recently used of its
entries; qemu-img opens with the default of MIN_REFCOUNT_CACHE_SIZE = 4 clusters,
block/qcow2.c read_cache_sizes) or when the node is flushed or closed. When the repair stops
at the metadata overlap check, qcow2_signal_corruption makes the node unusable, and the
dirty blocks still cached are dropped unwritten.

The fix pass (spec/check/fix_pass.py) writes each repair at once. This class follows the
cache's lookups to know which blocks QEMU would still hold dirty, keeping what the file held
before each became dirty, so that a stop (``drop``) puts those bytes back.
"""

from __future__ import annotations

from collections import OrderedDict

from spec import refblocks as rb
from spec.check.overlap import pre_write
from spec.errors import CorruptionError
from spec.qfile import Qcow2File

ENTRIES = 4
"""Refcount cache entries of a node opened with default options (qemu-img check)."""


class RefblockCache:
    def __init__(self, q: Qcow2File, l1: list[int], entries: int = ENTRIES) -> None:
        self.q = q
        self.l1 = l1
        """QEMU's copy of the active L1 table, for the overlap check of a write-back."""
        self.entries = entries
        self.per_block = q.geometry.refcount_block_entries
        self.lru: OrderedDict[int, bytes | None] = OrderedDict()
        """Cached block offsets, least recently used first, each with the bytes the file
        held before it became dirty (None: clean)."""

    def block_of(self, cluster: int) -> int:
        """The refcount block qcow2_get_refcount looks up for ``cluster``; 0 when it reads
        no block (past the refcount table, no block, or an unaligned one)."""
        try:
            return rb.refblock_offset(self.q, None, cluster // self.per_block)
        except CorruptionError:
            return 0

    def touch(self, cluster: int) -> None:
        """A lookup of ``cluster``'s refcount (qcow2_cache_get)."""
        block = self.block_of(cluster)
        if block:
            self._get(block)

    def scan(self, start: int, end: int) -> int:
        """compare_refcounts' lookups of the clusters from ``start`` (where the last scan
        stopped) to ``end``, in order: each block once. Returns where it stopped."""
        while start < end:
            self.touch(start)
            start = (start // self.per_block + 1) * self.per_block
        return start

    def before_update(self, cluster: int) -> None:
        """update_refcount is about to change ``cluster``'s refcount in its cached block."""
        block = self.block_of(cluster)
        if not block:
            return
        self._get(block)
        if self.lru[block] is None:
            self.lru[block] = self.q.pread(block, self.q.cluster_size)

    def empty(self) -> None:
        """qcow2_cache_empty: a rebuilt structure leaves nothing of the old one cached."""
        self.lru.clear()

    def drop(self) -> None:
        """The node was made unusable: what is still dirty never reaches the file."""
        for block, before in self.lru.items():
            if before is not None:
                self.q.pwrite(block, before)
        self.lru.clear()

    def _get(self, block: int) -> None:
        if block in self.lru:
            self.lru.move_to_end(block)
            return
        if len(self.lru) >= self.entries:
            victim, before = next(iter(self.lru.items()))
            if before is not None:
                # qcow2_cache_entry_flush checks the write against every metadata kind but
                # refcount blocks; a stop here leaves the victim dirty (and dropped).
                pre_write(self.q, victim, self.q.cluster_size, frozenset({"refcount block"}), self.l1)
            del self.lru[victim]
        self.lru[block] = None
