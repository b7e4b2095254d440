"""A write-back cache of fixed-size metadata entries: L2 slices and refcount blocks
(QEMU block/qcow2-cache.c, written anew; the API has QEMU's verbs).

- ``get(offset)`` returns the decoded entry at host ``offset``, reading it on a miss;
  ``get_empty(offset)`` returns a zeroed entry without reading (for a freshly allocated
  table); ``put`` releases it (QEMU counts references so that an entry in use is never
  evicted; requests here run one at a time, so ``put`` only ends the pinning).
- ``mark_dirty`` schedules the entry for write-back; ``flush`` writes every dirty entry.
- ``set_dependency(other)``: before any dirty entry of this cache reaches the file, every
  dirty entry of ``other`` must (qcow2_cache_set_dependency: the L2 cache depends on the
  refcount cache, so a refcount block counting a new cluster is written before the L2 entry
  that points at it). ``depends_on_flush()``: the file must be flushed before the next
  write-back (qcow2_cache_depends_on_flush: guest data before the L2 entry mapping it).
- LRU eviction writes a dirty victim back first (qcow2_cache_do_get picks the entry with
  the lowest lru_counter among the unreferenced ones).
- ``clean_unused`` drops clean, unreferenced entries not used since the previous call
  (qcow2_cache_clean_unused, run every ``cache_clean_interval`` seconds by
  cache_clean_timer_cb); the owner calls ``maybe_clean`` on every request, since there is
  no event loop.
- ``discard(offset)``: drop an entry without writing it (qcow2_cache_discard: the cluster
  was freed).
- Slots: QEMU's cache is an array of ``capacity`` slots, and qcow2_cache_write and
  qcow2_cache_flush write the dirty entries back in slot order, so with two write-backs the
  overlap check refuses, the slot order decides which refusal QEMU meets (and reports)
  first. Each entry here keeps the slot QEMU would have given it (``slot``): on a miss,
  qcow2_cache_do_get scans the slots circularly from (offset / entry size * 4) % capacity
  and takes the first one with the smallest lru_counter among the unreferenced; an empty
  slot (never used, discarded, cleaned) has lru_counter 0 and every used one more
  (qcow2_cache_put bumps it), so that is the first free slot from there on, or, when none
  is free, the evicted LRU entry's own slot. Kept on the miss path only: a hit does not
  touch it.

An entry is decoded once when it is loaded (``decode``), so a hit is a dict lookup and the
caller indexes the decoded array; ``encode`` turns it back into bytes on write-back.
"""

from __future__ import annotations

import errno
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from impl.hostfile import HostFile
from spec.errors import CorruptionError
from spec.hostio import HostIOError

Decode = Callable[[bytes], Any]
Encode = Callable[[Any], bytes]


class CacheStats:
    __slots__ = ("evictions", "hits", "misses", "writebacks")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.writebacks = 0


class Qcow2Cache:
    """See the module doc. Entries are keyed by host offset; the OrderedDict's order is
    the LRU order (least recently used first)."""

    def __init__(self, host: HostFile, entry_size: int, capacity: int, decode: Decode,
                 encode: Encode, *, name: str, flush_file: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("cache capacity must be at least one entry")
        self.host = host
        self.entry_size = entry_size
        self.capacity = capacity
        self.decode = decode
        self.encode = encode
        self.name = name
        self.tables: OrderedDict[int, Any] = OrderedDict()
        self.slot: dict[int, int] = {}
        """Host offset -> the index of QEMU's cache slot holding it (the module doc)."""
        self._taken = bytearray(capacity)
        """1 for a slot in use: bytearray.find(0, start) finds the first free one in C."""
        self.dirty: set[int] = set()
        self.pinned: dict[int, int] = {}
        self.used_since_clean: set[int] = set()
        self.mru: int | None = None
        """The key at the LRU end, marked used since the last clean, or None when that is not
        known: a reader that hits it again has nothing to move or mark (image.py's inline
        read; QEMU's hit only bumps an lru_counter). Every method that reorders, drops or
        clears resets it."""
        self.depends: Qcow2Cache | None = None
        self.flush_needed = False
        self.flush_file = flush_file or (lambda: None)
        self.stats = CacheStats()
        self.clock = clock
        self.clean_interval = 0.0
        self.next_clean = math.inf
        self.check_write: Callable[[int, int], None] = lambda offset, n: None
        """The overlap check of a write-back, (offset, bytes): the image's checker with
        this cache's own kind ignored, set by image.py (qcow2_cache_entry_flush runs
        qcow2_pre_write_overlap_check before every write-back); raises CorruptionError."""

    # --- lookups ---------------------------------------------------------------------------
    def get(self, offset: int) -> Any:
        """The decoded entry at ``offset`` (qcow2_cache_get)."""
        table = self.tables.get(offset)
        if table is not None:
            self.stats.hits += 1
            self.tables.move_to_end(offset)
            self.used_since_clean.add(offset)
            self.mru = offset
            return table
        self.stats.misses += 1
        self._make_room()
        table = self.decode(self.host.pread(offset, self.entry_size, meta=True))
        self.tables[offset] = table
        self._take_slot(offset)
        self.used_since_clean.add(offset)
        self.mru = offset
        return table

    def get_empty(self, offset: int) -> Any:
        """A zeroed entry at ``offset``, not read from the file (qcow2_cache_get_empty)."""
        if offset in self.tables:
            self.tables.move_to_end(offset)
        else:
            self._make_room()
            self._take_slot(offset)
        table = self.decode(bytes(self.entry_size))
        self.tables[offset] = table
        self.used_since_clean.add(offset)
        self.mru = offset
        return table

    def pin(self, offset: int) -> None:
        self.pinned[offset] = self.pinned.get(offset, 0) + 1

    def put(self, offset: int) -> None:
        """Release a pinned entry (qcow2_cache_put)."""
        n = self.pinned.get(offset, 0) - 1
        if n <= 0:
            self.pinned.pop(offset, None)
        else:
            self.pinned[offset] = n

    def mark_dirty(self, offset: int) -> None:
        """qcow2_cache_entry_mark_dirty."""
        self.dirty.add(offset)

    # --- ordering --------------------------------------------------------------------------
    def set_dependency(self, other: Qcow2Cache) -> None:
        """qcow2_cache_set_dependency: ``other`` is written before any of this cache's
        dirty entries. A cache that already depends on a third one flushes that first."""
        if other.depends is not None:
            other.flush_dependency()
        if self.depends is not None and self.depends is not other:
            self.flush_dependency()
        self.depends = other

    def depends_on_flush(self) -> None:
        """qcow2_cache_depends_on_flush: flush the file before the next write-back."""
        self.flush_needed = True

    def flush_dependency(self) -> None:
        if self.depends is not None:
            self.depends.flush()
            self.depends = None
        self.flush_needed = False

    # --- write-back --------------------------------------------------------------------------
    def _write_entry(self, offset: int) -> None:
        """qcow2_cache_entry_flush: honour the dependency, then write one dirty entry."""
        if offset not in self.dirty:
            return
        if self.depends is not None:
            self.flush_dependency()
        elif self.flush_needed:
            self.flush_file()
            self.flush_needed = False
        # After the barriers, as in QEMU: a refused entry stays dirty and is never written.
        self.check_write(offset, self.entry_size)
        self.host.pwrite(offset, self.encode(self.tables[offset]), meta=True)
        self.stats.writebacks += 1
        self.dirty.discard(offset)

    def write(self, *, barrier: bool = False) -> None:
        """qcow2_cache_write: every dirty entry, in QEMU's slot order (the module doc). An entry the overlap
        check refuses does not stop the others (QEMU's loop goes on and returns the error at
        the end), so the rest of the cache still reaches the file; a host I/O error stops
        here, as before.

        ``barrier``: a write-back of the impl's own that QEMU does not make at this point (an
        ordering barrier before freed clusters are reused or punched, a status query). An
        entry the check refuses, or the host refuses (EFBIG past the file size limit), then
        stays dirty, and nothing is raised: QEMU meets (and flags, or fails with) that only
        at its own write-back (a flush, an eviction, the close); damaged seed 15,
        flip-3290@overlay: a refcount block at 2 PiB, written back by the preallocation
        guess, failed a write that QEMU completes."""
        refused: CorruptionError | None = None
        for offset in sorted(self.dirty, key=self.slot.__getitem__):
            try:
                self._write_entry(offset)
            except HostIOError as e:
                # Only the file-size limit is QEMU's to meet later; any other host error
                # (EIO, ENOSPC) fails the request here, as a failed barrier must.
                if not barrier or not _file_too_large(e):
                    raise
            except CorruptionError as e:
                refused = refused or e
        if refused is not None and not barrier:
            raise refused

    def flush(self) -> None:
        """qcow2_cache_flush: write every dirty entry, then flush the file (always, as
        QEMU does; cache=unsafe makes the file flush a no-op)."""
        self.write()
        self.flush_file()

    def _make_room(self) -> None:
        if len(self.tables) < self.capacity:
            return
        for victim in self.tables:
            if victim not in self.pinned:
                break
        else:
            raise RuntimeError(f"{self.name} cache: every entry is in use")
        self._write_entry(victim)
        del self.tables[victim]
        self._free_slot(victim)
        self.used_since_clean.discard(victim)
        if victim == self.mru:
            self.mru = None
        self.stats.evictions += 1

    def _take_slot(self, offset: int) -> None:
        """The slot qcow2_cache_do_get gives a missed ``offset``: the first free one scanning
        circularly from its lookup index (after an eviction, the victim's own)."""
        start = offset // self.entry_size * 4 % self.capacity
        i = self._taken.find(0, start)
        if i < 0:
            i = self._taken.find(0, 0, start)
        self._taken[i] = 1
        self.slot[offset] = i

    def _free_slot(self, offset: int) -> None:
        """The entry left its slot (evicted, discarded, cleaned): the slot is empty again."""
        self._taken[self.slot.pop(offset)] = 0

    # --- dropping ------------------------------------------------------------------------------
    def discard(self, offset: int) -> None:
        """qcow2_cache_discard: forget the entry, dirty or not (its cluster was freed)."""
        if offset == self.mru:
            self.mru = None
        if self.tables.pop(offset, None) is not None:
            self._free_slot(offset)
            self.dirty.discard(offset)
            self.pinned.pop(offset, None)
            self.used_since_clean.discard(offset)

    def discard_range(self, start: int, length: int) -> None:
        """Forget every entry inside [start, start+length) (all slices of a freed table)."""
        if self.entry_size == length:
            self.discard(start)
            return
        for off in [o for o in self.tables if start <= o < start + length]:
            self.discard(off)

    def clean_unused(self) -> int:
        """qcow2_cache_clean_unused: drop clean, unpinned entries not used since the last
        call. Returns how many were dropped."""
        drop = [o for o in self.tables
                if o not in self.used_since_clean and o not in self.dirty and o not in self.pinned]
        for o in drop:
            del self.tables[o]
            self._free_slot(o)
        self.used_since_clean.clear()
        self.mru = None
        return len(drop)

    def maybe_clean(self) -> None:
        """Run clean_unused when ``clean_interval`` seconds have passed since the last run
        (cache_clean_timer_cb); 0 disables it, as in QEMU."""
        if self.clean_interval <= 0:
            return
        now = self.clock()
        if now >= self.next_clean:
            self.clean_unused()
            self.next_clean = now + self.clean_interval

    def start_clean_timer(self, interval: float) -> None:
        """cache_clean_timer_init: the first clean runs ``interval`` seconds from now."""
        self.clean_interval = interval
        # 0 disables it: never due, so a reader comparing the clock with next_clean (the
        # image's inline read) needs no second test.
        self.next_clean = self.clock() + interval if interval > 0 else math.inf


def _file_too_large(e: HostIOError) -> bool:
    """The host call behind ``e`` failed with EFBIG (HostFile raises from the OSError)."""
    cause = e.__context__
    return isinstance(cause, OSError) and cause.errno == errno.EFBIG
