"""impl/cache.py writes its dirty entries back in QEMU's cache-slot order (block/qcow2-cache.c:
qcow2_cache_do_get places a missed entry, qcow2_cache_write walks the slots by index), not in
host-offset or LRU order: with two write-backs the overlap check refuses, that order decides
which refusal comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from impl.cache import Qcow2Cache
from spec.errors import CorruptionError
from tests.impl.test_cache import RecordingFile, _cache, _file


def _k(offset: int) -> int:
    return offset // 512


def test_write_back_follows_qemus_slot_order(tmp_path: Path) -> None:
    f = _file(tmp_path)
    c: Qcow2Cache = _cache(f, 3)  # 3 slots of 512-byte entries; entry k lives at 512 * k
    # qcow2_cache_do_get starts its scan at (offset / 512 * 4) % 3 = (4k) % 3 = k % 3 and takes
    # the first empty slot from there on (an empty slot has lru_counter 0), circularly.
    c.get(512 * 5)  # start 2: slot 2 is empty, k5 -> slot 2
    c.get(512 * 1)  # start 1: slot 1 is empty, k1 -> slot 1
    c.get(512 * 3)  # start 0: slot 0 is empty, k3 -> slot 0
    c.mark_dirty(512 * 3)
    c.discard(512 * 1)  # qcow2_cache_discard: slot 1 is empty again
    c.get(512 * 4)  # start 1: slot 1 is empty, k4 -> slot 1
    c.get(512 * 5)  # a hit: the LRU order is now k3, k4, k5
    # Full: the LRU entry k3 is evicted (written back first, it is dirty) and k6 takes its
    # slot 0, the only slot with ref 0 and the smallest lru_counter.
    c.get(512 * 6)
    assert f.log == [("write", 512 * 3)]
    assert {_k(o): i for o, i in c.slot.items()} == {6: 0, 4: 1, 5: 2}
    for k in (4, 5, 6):
        c.mark_dirty(512 * k)
    f.log.clear()
    c.flush()
    # Slot order k6, k4, k5: not host-offset order (4, 5, 6), not LRU order (4, 5, 6), and not
    # "lowest free slot first" either (that would give k5 slot 0, k4 slot 1, k6 slot 2).
    assert f.log == [("write", 512 * 6), ("write", 512 * 4), ("write", 512 * 5), ("flush", 0)]


def test_the_first_refusal_in_slot_order_is_the_one_raised(tmp_path: Path) -> None:
    f: RecordingFile = _file(tmp_path)
    c = _cache(f, 3)
    for k in (2, 7, 3):  # starts 2, 1, 0: k2 -> slot 2, k7 -> slot 1, k3 -> slot 0
        c.get(512 * k)
        c.mark_dirty(512 * k)

    def check(offset: int, n: int) -> None:
        if offset in (512 * 2, 512 * 7):
            raise CorruptionError(f"overlap at {offset:#x}")

    c.check_write = check
    with pytest.raises(CorruptionError, match="overlap at 0xe00"):  # k7 (slot 1) before k2 (slot 2)
        c.flush()
    # QEMU's loop goes on past a refusal: the one entry not refused reached the file, the
    # refused ones stay dirty.
    assert [e for e in f.log if e[0] == "write"] == [("write", 512 * 3)]
    assert c.dirty == {512 * 2, 512 * 7}


def test_cleaned_and_evicted_slots_are_reused(tmp_path: Path) -> None:
    t = [0.0]
    f = _file(tmp_path)
    c = _cache(f, 4, clock=t)  # 4 slots: (4k) % 4 = 0, every scan starts at slot 0
    for k in (9, 8, 1, 5):
        c.get(512 * k)  # slots 0, 1, 2, 3 in turn
    c.clean_unused()  # marks the epoch
    c.get(512 * 1)  # used since: kept
    c.clean_unused()  # qcow2_cache_clean_unused empties slots 0, 1 and 3
    c.get(512 * 4)  # the first empty slot from 0: slot 0
    c.get(512 * 2)  # slot 1
    assert {_k(o): i for o, i in c.slot.items()} == {4: 0, 2: 1, 1: 2}
    for k in (1, 2, 4):
        c.mark_dirty(512 * k)
    c.write()
    assert f.log == [("write", 512 * 4), ("write", 512 * 2), ("write", 512 * 1)]
