"""Mutation tests of the differential tester: plausible bugs are injected into the model
(monkeypatched for one test), and the state machine must find each within a bounded number
of examples and shrink it to at most six operations.

The configuration is pinned where each bug lives (a qcow2 backing file shorter than the
image, 4 KiB clusters; 16 KiB clusters with extended L2 for the bitmap mutant) and the seed is
fixed; ``test_unmutated_model_is_clean_here`` is the
control: without a mutant the same campaign finds nothing, so a found divergence is the
mutant's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from difftest.core import qemuio
from difftest.core.campaign import Shard, Stats, run_shard
from difftest.core.targets import module_available

pytestmark = pytest.mark.skipif(not (qemuio.available() and module_available("model")),
                                reason="needs qemu-io and the model")

PINNED = {"version": 3, "cluster_size": 4096, "backing": "qcow2", "backing_size": "shorter",
          "data_file": False}
MAX_SHRUNK_STEPS = 6


EXTENDED = {**PINNED, "cluster_size": 16384, "extended_l2": True}
"""Where the subcluster bitmap matters (extended L2 needs clusters of 16 KiB or more)."""


def campaign(tmp_path: Path, *, examples: int, finish: bool, seed: int = 11, steps: int = 12,
             overrides: dict[str, Any] | None = None) -> Stats:
    return run_shard(Shard(["model", "qemu"], seed=seed, examples=examples, steps=steps,
                           overrides=overrides or PINNED,
                           db_dir=None, repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "w"),
                           finish=finish, multiple_bugs=False))


@pytest.mark.parametrize("extended", [False, True], ids=["pinned", "extended"])
def test_unmutated_model_is_clean_here(tmp_path: Path, extended: bool) -> None:
    stats = campaign(tmp_path, examples=12, finish=True, overrides=EXTENDED if extended else PINNED)
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


MUTANTS: list[Any] = [
    # name, injector, divergence kinds that betray it, teardown checks needed, examples, steps
    pytest.param("zero-flag-ignored", _zero_flag_ignored, {"bytes"}, False, 40, 12, id="zero-flag-ignored"),
    pytest.param("garbage-past-shorter-backing", _garbage_past_backing_end, {"bytes"}, False, 40, 12,
                 id="garbage-past-shorter-backing"),
    # Found only by the teardown checks, so every shrink step pays for qemu-img check, compare
    # and the rules (~50 s).
    pytest.param("discard-keeps-refcount", _discard_keeps_refcount, {"check", "rules"}, True, 40, 12,
                 id="discard-keeps-refcount"),
    pytest.param("compressed-size-short", _compressed_size_short, {"bytes", "error", "crossread"}, False,
                 60, 12, id="compressed-size-short"),
    pytest.param("l1-bound-off-by-one", _l1_bound_off_by_one, {"bytes", "map", "error"}, False, 40, 12,
                 id="l1-bound-off-by-one"),
    pytest.param("bitmap-wrong-word", _bitmap_wrong_word, {"bytes", "map", "error"}, False, 40, 12,
                 id="bitmap-wrong-word"),
    pytest.param("copied-left-after-snapshot", _copied_left_after_snapshot,
                 {"bytes", "check", "rules", "crossread"}, True, 80, 20, id="copied-left-after-snapshot"),
]


@pytest.mark.parametrize(("name", "inject", "kinds", "finish", "examples", "steps"), MUTANTS)
def test_mutant_is_found_and_shrunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                    inject: Callable[[pytest.MonkeyPatch], None], kinds: set[str],
                                    finish: bool, examples: int, steps: int) -> None:
    inject(monkeypatch)
    overrides = EXTENDED if name == "bitmap-wrong-word" else PINNED
    stats = campaign(tmp_path, examples=examples, finish=finish, steps=steps, overrides=overrides)
    found = [d for d in stats.divergences if d.kind in kinds]
    assert found, f"{name} not found: {[(d.kind, d.message) for d in stats.divergences]}"
    assert min(d.steps for d in found) <= MAX_SHRUNK_STEPS, [(d.steps, d.message) for d in found]
    assert all(d.repro_dir and (Path(d.repro_dir) / "test_repro.py").exists() for d in found)
