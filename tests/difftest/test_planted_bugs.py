"""Mutation tests of the differential tester: plausible bugs are injected into an engine
(monkeypatched for one test, never edited), and the state machine must find each within a
bounded number of examples and shrink it to at most six operations.

Every bug is planted in the model and, at the equivalent place, in the impl (the engine
runs against qemu-io alone, so the divergence is the mutant's). Three bugs only the impl can
have are planted in it too: a dirty L2 slice dropped on eviction, a refcount block written
after the L2 entry that needs it (seen by ``check_live``: the live file, caches unflushed,
fails qemu-img check), and a COW tail read from the wrong offset.

The configuration is pinned where each bug lives (a qcow2 backing file shorter than the
image, 4 KiB clusters; 16 KiB clusters with extended L2 for the bitmap mutant) and the seed is
fixed; ``test_unmutated_model_is_clean_here`` is the
control: without a mutant the same campaign finds nothing, so a found divergence is the
mutant's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from difftest.core import qemuio
from difftest.core.campaign import Shard, Stats, run_shard
from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep
from difftest.core.targets import module_available

pytestmark = pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(not module_available(e), reason=f"needs {e}"), id=e)
           for e in ("model", "impl")]
"""The engines every mutant is planted in, each run against qemu-io alone."""

DEFAULT_CACHE = {"l2_cache_size": None, "l2_cache_entry_size": None, "refcount_cache_size": None,
                 "overlap_check": "cached"}
"""Cache options pinned too: each free field of the configuration is more for the shrinker to
get through (with them drawn, copied-left-after-snapshot shrank to 12 operations, not 6)."""
PINNED = {"version": 3, "cluster_size": 4096, "backing": "qcow2", "backing_size": "shorter",
          "data_file": False, **DEFAULT_CACHE}
MAX_SHRUNK_STEPS = 6


EXTENDED = {**PINNED, "cluster_size": 16384, "extended_l2": True}
"""Where the subcluster bitmap matters (extended L2 needs clusters of 16 KiB or more)."""


TINY_L2 = {"version": 3, "cluster_size": 4096, "backing": "none", "data_file": False,
           "lazy_refcounts": False, **DEFAULT_CACHE, "l2_cache_entry_size": 512, "l2_cache_size": 1024,
           "size": 1 << 20}
"""Two 512-byte L2 slices (the minimum cache) over an image of four slices in one L2 table
(allocated once: allocating a table flushes the refcount cache, which would hide the
write-ordering mutant): a request in another slice than the last two evicts one."""


def campaign(tmp_path: Path, *, examples: int, finish: bool, seed: int = 11, steps: int = 12,
             overrides: dict[str, Any] | None = None, engine: str = "model") -> Stats:
    return run_shard(Shard([engine, "qemu"], seed=seed, examples=examples, steps=steps,
                           overrides=overrides or PINNED,
                           db_dir=None, repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "w"),
                           finish=finish, multiple_bugs=False))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("pinned", ["pinned", "extended", "tiny-l2"])
def test_unmutated_engine_is_clean_here(tmp_path: Path, engine: str, pinned: str) -> None:
    if engine == "model" and pinned == "tiny-l2":
        pytest.skip("the impl-only mutants' configuration")
    overrides = {"pinned": PINNED, "extended": EXTENDED, "tiny-l2": TINY_L2}[pinned]
    stats = campaign(tmp_path, examples=12, finish=True, overrides=overrides, engine=engine)
    assert stats.divergences == []


def _zero_flag_ignored(mp: pytest.MonkeyPatch) -> None:
    """Reads of a zero cluster fall through to the backing file."""
    import model.read as mi
    from spec.entries import SubclusterType
    orig: Callable[..., bytes] = mi.read_subcluster

    def read_subcluster(self: Any, pos: int, n: int, entry: int, bitmap: int) -> bytes:
        q = self.q
        t = mi.subcluster_type(entry, bitmap, q.geometry.subcluster_index(pos),
                               extended_l2=q.extended_l2, has_data_file=q.has_data_file)
        if t in (SubclusterType.ZERO_PLAIN, SubclusterType.ZERO_ALLOC):
            return bytes(mi.backing_read(self, pos, n))
        return orig(self, pos, n, entry, bitmap)

    mp.setattr(mi, "read_subcluster", read_subcluster)


def _garbage_past_backing_end(mp: pytest.MonkeyPatch) -> None:
    """Reads beyond a shorter backing file return stale bytes instead of zeros."""
    import model.read as mi

    def backing_read(self: Any, pos: int, n: int) -> bytes:
        if self.backing is None:
            return bytes(n)
        inside = max(0, min(n, self.backing.size - pos))
        head = self.backing.read(pos, inside) if inside else b""
        return bytes(head) + b"\xb1" * (n - inside)

    mp.setattr(mi, "backing_read", backing_read)


def _discard_keeps_refcount(mp: pytest.MonkeyPatch) -> None:
    """A guest discard unmaps the cluster but never drops its reference (a leak)."""
    import spec.refblocks as rc
    orig = rc.free_clusters

    def free_clusters(q: Any, offset: int, length: int, *, discard: bool = False) -> None:
        if discard:
            return
        orig(q, offset, length, discard=discard)

    mp.setattr(rc, "free_clusters", free_clusters)


def _compressed_size_short(mp: pytest.MonkeyPatch) -> None:
    """Compressed clusters are stored a few bytes short of their compressed size."""
    import model.compress as cz
    orig = cz.compress

    def compress(data: bytes, ctype: Any, limit: int) -> bytes | None:
        out: bytes | None = orig(data, ctype, limit)
        return out[:-4] if out and len(out) > 8 else out

    mp.setattr(cz, "compress", compress)


def _l1_bound_off_by_one(mp: pytest.MonkeyPatch) -> None:
    """The last L1 entry is treated as past the end of the L1 table."""
    import model.mapping as mpg
    orig = mpg.read_l1_entry

    def read_l1_entry(q: Any, index: int, l1: tuple[int, int] | None = None) -> int:
        size = int(q.header.l1_size) if l1 is None else l1[1]
        return 0 if index >= size - 1 else orig(q, index, l1)

    mp.setattr(mpg, "read_l1_entry", read_l1_entry)


def _bitmap_wrong_word(mp: pytest.MonkeyPatch) -> None:
    """Extended L2: an entry's subcluster bitmap is taken from the next entry's pair."""
    import model.mapping as mpg
    orig_get = mpg.L2Table.__getitem__
    orig_entry = mpg.read_l2_entry

    def getitem(self: Any, i: int) -> tuple[int, int]:
        e, b = orig_get(self, i)
        return (e, orig_get(self, i + 1)[1]) if self.extended_l2 and i + 1 < len(self) else (e, b)

    def read_l2_entry(q: Any, offset: int, index: int) -> tuple[int, int]:
        e, b = orig_entry(q, offset, index)
        return (e, orig_entry(q, offset, index + 1)[1]) if q.extended_l2 else (e, b)

    mp.setattr(mpg.L2Table, "__getitem__", getitem)
    mp.setattr(mpg, "read_l2_entry", read_l2_entry)


def _copied_left_after_snapshot(mp: pytest.MonkeyPatch) -> None:
    """Creating a snapshot leaves the active L1 entries' COPIED flags set, so the next write
    changes an L2 table the snapshot shares in place."""
    import model.mapping as mpg
    import model.snapshots as sn
    orig = sn.update_snapshot_refcount

    def update(q: Any, l1_offset: int, l1_size: int, addend: int, l1: list[int] | None = None) -> None:
        before = mpg.read_l1(q, l1_offset, l1_size) if addend == 1 else None
        orig(q, l1_offset, l1_size, addend, l1)
        if before is not None and l1_offset == int(q.header.l1_table_offset):
            mpg.write_l1(q, before, l1_offset)

    mp.setattr(sn, "update_snapshot_refcount", update)


# -- the same bugs in the impl --------------------------------------------------------------

def _impl_zero_flag_ignored(mp: pytest.MonkeyPatch) -> None:
    """Reads of a zero (sub)cluster fall through to the backing file (read_into's types)."""
    import impl.image as ii
    from spec.entries import SubclusterType as ST
    orig = ii.subcluster_type
    as_unallocated = {ST.ZERO_PLAIN: ST.UNALLOCATED_PLAIN, ST.ZERO_ALLOC: ST.UNALLOCATED_ALLOC}

    def subcluster_type(*a: Any, **kw: Any) -> Any:
        t = orig(*a, **kw)
        return as_unallocated.get(t, t)

    mp.setattr(ii, "subcluster_type", subcluster_type)


def _impl_garbage_past_backing_end(mp: pytest.MonkeyPatch) -> None:
    import impl.image as ii

    def _backing_read(self: Any, pos: int, buf: memoryview) -> None:
        if self.backing is None:
            return
        inside = max(0, min(len(buf), self.backing.size - pos))
        if inside:
            self.backing.read_into(pos, buf[:inside])
        buf[inside:] = b"\xb1" * (len(buf) - inside)

    mp.setattr(ii.Image, "_backing_read", _backing_read)


def _impl_discard_keeps_refcount(mp: pytest.MonkeyPatch) -> None:
    import impl.refcount as rc
    orig = rc.free_clusters

    def free_clusters(s: Any, offset: int, length: int, *, discard: bool = False) -> None:
        if not discard:
            orig(s, offset, length, discard=discard)

    mp.setattr(rc, "free_clusters", free_clusters)


def _impl_compressed_size_short(mp: pytest.MonkeyPatch) -> None:
    import impl.compress as cz
    orig = cz.deflate

    def deflate(data: Any, ctype: Any, limit: int) -> bytes | None:
        out = orig(data, ctype, limit)
        return out[:-4] if out and len(out) > 8 else out

    mp.setattr(cz, "deflate", deflate)


def _impl_l1_bound_off_by_one(mp: pytest.MonkeyPatch) -> None:
    """Lookups (l2_slice) treat the last L1 entry as past the end of the table."""
    import impl.cluster as cl
    orig = cl.l2_slice

    def l2_slice(s: Any, guest: int, l1: list[int] | None = None) -> Any:
        g = s.geometry
        table = s.l1_table if l1 is None else l1
        return None if guest >> (g.cluster_bits + g.l2_bits) >= len(table) - 1 else orig(s, guest, l1)

    mp.setattr(cl, "l2_slice", l2_slice)


def _impl_bitmap_wrong_word(mp: pytest.MonkeyPatch) -> None:
    import impl.cluster as cl

    def get_entry(s: Any, guest: int, l1: list[int] | None = None) -> tuple[int, int]:
        found = cl.l2_slice(s, guest, l1)
        if found is None:
            return 0, 0
        words, w = found
        if not s.extended_l2:
            return words[w], 0
        return words[w], words[w + 3] if w + 3 < len(words) else words[w + 1]

    mp.setattr(cl, "get_entry", get_entry)


def _impl_copied_left_after_snapshot(mp: pytest.MonkeyPatch) -> None:
    import impl.snapshot as sn
    orig = sn.update_snapshot_refcount

    def update(s: Any, l1_offset: int, l1_size: int, addend: int, l1: list[int] | None = None) -> None:
        before = list(s.l1_table) if addend == 1 and l1_offset == s.l1_table_offset else None
        orig(s, l1_offset, l1_size, addend, l1)
        if before is not None:
            s.l1_table[:] = before
            s.host.pwrite(l1_offset, struct.pack(f">{len(before)}Q", *before), meta=True)

    mp.setattr(sn, "update_snapshot_refcount", update)


# -- bugs only the impl can have ---------------------------------------------------------------

def _impl_dirty_slice_dropped(mp: pytest.MonkeyPatch) -> None:
    """An L2 slice evicted from the cache is dropped without being written back."""
    from impl.cache import Qcow2Cache
    orig = Qcow2Cache._make_room

    def _make_room(self: Any) -> None:
        if self.name == "l2" and len(self.tables) >= self.capacity:
            victim = next((o for o in self.tables if o not in self.pinned), None)
            self.dirty.discard(victim)
        orig(self)

    mp.setattr(Qcow2Cache, "_make_room", _make_room)


def _impl_refcount_after_l2(mp: pytest.MonkeyPatch) -> None:
    """The L2 cache never depends on the refcount cache: a slice pointing at a new cluster
    can reach the file (on eviction) before the refcount block that counts it."""
    from impl.cache import Qcow2Cache
    orig = Qcow2Cache.set_dependency

    def set_dependency(self: Any, other: Any) -> None:
        if self.name != "l2":
            orig(self, other)

    mp.setattr(Qcow2Cache, "set_dependency", set_dependency)


def _impl_cow_tail_wrong_offset(mp: pytest.MonkeyPatch) -> None:
    """The COW tail is read at the host offset taken as a guest offset (the two offsets of
    perform_cow mixed up), whether it is read alone or within one read of both regions."""
    import impl.cluster as cl
    orig = cl._data_with_cow

    class Misreading:
        def __init__(self, img: Any, starts: tuple[int, int], end_at: int, tail: int, wrong_at: int) -> None:
            self.img, self.starts, self.end_at, self.tail, self.wrong_at = img, starts, end_at, tail, wrong_at

        def __getattr__(self, name: str) -> Any:
            return getattr(self.img, name)

        def read_internal(self, off: int, n: int) -> bytes:
            if self.tail and off + n == self.end_at and off in self.starts:
                wrong = bytes(self.img.read_internal(self.wrong_at, self.tail))
                return bytes(self.img.read_internal(off, n - self.tail)) + wrong
            return bytes(self.img.read_internal(off, n))

    def _data_with_cow(img: Any, first: int, host: int, start_from: int, start_to: int,
                       end_from: int, end_to: int, *rest: Any, **kw: Any) -> None:
        lying = Misreading(img, (first + start_from, first + end_from), first + end_to, end_to - end_from,
                           host + end_from)
        orig(lying, first, host, start_from, start_to, end_from, end_to, *rest, **kw)

    mp.setattr(cl, "_data_with_cow", _data_with_cow)


MUTANTS: list[tuple[Any, ...]] = [
    # name, injector per engine, divergence kinds that betray it, teardown checks needed,
    # examples, steps, pinned configuration, seed, engines whose search is `slow`
    ("zero-flag-ignored", {"model": _zero_flag_ignored, "impl": _impl_zero_flag_ignored},
     {"bytes"}, False, 40, 12, PINNED, 11, set()),
    ("garbage-past-shorter-backing",
     {"model": _garbage_past_backing_end, "impl": _impl_garbage_past_backing_end},
     {"bytes"}, False, 40, 12, PINNED, 11, set()),
    # Found only by the teardown checks, so every shrink step pays for qemu-img check, compare
    # and the rules (~50 s): the impl's search runs with -m slow only.
    ("discard-keeps-refcount", {"model": _discard_keeps_refcount, "impl": _impl_discard_keeps_refcount},
     {"check", "rules", "layout"}, True, 40, 12, PINNED, 11, {"impl"}),
    ("compressed-size-short", {"model": _compressed_size_short, "impl": _impl_compressed_size_short},
     {"bytes", "error", "crossread"}, False, 60, 12, PINNED, 11, set()),
    ("l1-bound-off-by-one", {"model": _l1_bound_off_by_one, "impl": _impl_l1_bound_off_by_one},
     {"bytes", "map", "error"}, False, 40, 12, PINNED, 11, set()),
    ("bitmap-wrong-word", {"model": _bitmap_wrong_word, "impl": _impl_bitmap_wrong_word},
     {"bytes", "map", "error"}, False, 40, 12, EXTENDED, 11, set()),
    ("copied-left-after-snapshot",
     {"model": _copied_left_after_snapshot, "impl": _impl_copied_left_after_snapshot},
     {"bytes", "check", "rules", "crossread", "live"}, True, 80, 20, PINNED, 11, {"impl"}),
    # The cache bugs need requests in three slices or more: Hypothesis's shrinking stops at
    # 7 to 9 operations, and the deletion pass after it (difftest/core/minimize.py) takes
    # them to 6 or fewer. Each search costs about a minute, so they run with -m slow; the
    # default run replays hand-written reproducers (test_impl_only_bug_has_a_short_reproducer).
    ("dirty-slice-dropped-on-eviction", {"impl": _impl_dirty_slice_dropped},
     {"bytes", "map", "error", "crossread", "check", "rules", "live"}, False, 40, 12, TINY_L2, 1, {"impl"}),
    ("refcount-written-after-l2", {"impl": _impl_refcount_after_l2},
     {"live"}, True, 60, 12, TINY_L2, 11, {"impl"}),
    ("cow-tail-wrong-offset", {"impl": _impl_cow_tail_wrong_offset},
     {"bytes", "crossread"}, False, 40, 12, PINNED, 11, set()),
]
CASES = [pytest.param(engine, *m[:-1], id=f"{m[0]}-{engine}",
                      marks=[pytest.mark.skipif(not module_available(engine), reason=f"needs {engine}"),
                             *([pytest.mark.slow] if engine in m[-1] else [])])
         for m in MUTANTS for engine in ("model", "impl") if engine in m[1]]


@pytest.mark.parametrize(("engine", "name", "injectors", "kinds", "finish", "examples", "steps", "overrides",
                          "seed"), CASES)
def test_mutant_is_found_and_shrunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, name: str,
                                    injectors: dict[str, Callable[[pytest.MonkeyPatch], None]],
                                    kinds: set[str], finish: bool, examples: int, steps: int,
                                    overrides: dict[str, Any], seed: int) -> None:
    injectors[engine](monkeypatch)
    stats = campaign(tmp_path, examples=examples, finish=finish, steps=steps, overrides=overrides,
                     engine=engine, seed=seed)
    found = [d for d in stats.divergences if d.kind in kinds]
    assert found, f"{name} not found: {[(d.kind, d.message) for d in stats.divergences]}"
    assert min(d.steps for d in found) <= MAX_SHRUNK_STEPS, \
        [(d.steps, d.message) for d in found]
    assert all(d.repro_dir and (Path(d.repro_dir) / "test_repro.py").exists() for d in found)


SLICE = 256 << 10
"""The guest bytes one 512-byte L2 slice maps with 4 KiB clusters (64 entries)."""
FOUR_SLICES = [("write", (k * SLICE, 4096, 0x11)) for k in range(4)]
"""Requests in four slices of one L2 table: with two slices cached, the third and fourth
evict a dirty slice whose new cluster's refcount block is still dirty too."""
REPRODUCERS = [
    pytest.param(_impl_dirty_slice_dropped, TINY_L2, [*FOUR_SLICES, ("read", (SLICE, 4096))], "bytes",
                 id="dirty-slice-dropped-on-eviction"),
    pytest.param(_impl_refcount_after_l2, TINY_L2, [*FOUR_SLICES, ("check_live", ())], "live",
                 id="refcount-written-after-l2"),
    pytest.param(_impl_cow_tail_wrong_offset, {**PINNED, "size": 8 * 4096}, [("write", (0, 512, 0x11))],
                 "bytes", id="cow-tail-wrong-offset"),
]


@pytest.mark.skipif(not module_available("impl"), reason="needs impl")
@pytest.mark.parametrize(("inject", "pinned", "ops", "kind"), REPRODUCERS)
def test_impl_only_bug_has_a_short_reproducer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              inject: Callable[[pytest.MonkeyPatch], None],
                                              pinned: dict[str, Any], ops: list[tuple[str, tuple[Any, ...]]],
                                              kind: str) -> None:
    """At most six operations betray each impl-only bug, and the same ones pass without it."""
    assert len(ops) <= MAX_SHRUNK_STEPS
    cfg = Config(**pinned)

    def replay(where: Path) -> Divergence | None:
        with Lockstep(where, cfg, ["impl", "qemu"]) as ls:
            try:
                for op, args in ops:
                    getattr(ls, op)(*args)
                ls.finish()
            except Divergence as d:
                return d
        return None

    assert replay(tmp_path / "clean") is None
    inject(monkeypatch)
    found = replay(tmp_path / "mutant")
    assert found is not None and found.kind == kind, found
