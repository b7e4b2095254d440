"""Crash consistency (difftest/crash/): the recorder, the crash states, the model's barriers,
and three planted ordering bugs the campaign must catch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import model
from difftest.core.config import Config
from difftest.crash import campaign as cc
from difftest.crash import repro
from difftest.crash.ops import Op
from difftest.crash.states import CrashState, materialize, states
from model import mapping as mp
from model import write as wr
from spec import hostio
from spec.hostio import HostOp

W, F = hostio.WRITE, hostio.FLUSH


def _w(off: int, data: bytes) -> HostOp:
    return HostOp(W, "f", off, len(data), data)


# --- the recorder ------------------------------------------------------------------------------

def test_nothing_is_recorded_unless_a_campaign_installs_a_monitor(tmp_path: Path) -> None:
    path = str(tmp_path / "a.qcow2")
    model.create(path, 1 << 20, cluster_size=4096)
    assert hostio.active is None
    rec = hostio.Recorder()
    with model.open(path, cache="unsafe") as img:
        img.write(0, b"x" * 100)
        with hostio.monitoring(rec):
            img.write(8192, b"y" * 4096)
            img.flush()
        img.write(16384, b"z" * 100)
    kinds = [op.kind for op in rec.ops]
    # A barrier for the unflushed write before, then the allocating write: refcount block,
    # data (which needs no barrier of its own), barrier, L2 entry; then the guest flush.
    # cache=unsafe skips the fdatasync, not the barrier.
    assert kinds == [F, W, W, F, W, F], [str(o) for o in rec.ops]
    assert rec.ops[2].data == b"y" * 4096
    assert hostio.active is None


def test_a_metadata_write_follows_a_barrier_whenever_something_is_unflushed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.state import ModelFile
    path = str(tmp_path / "a.qcow2")
    model.create(path, 1 << 20, cluster_size=512, refcount_bits=1, lazy_refcounts=True)
    rec = hostio.Recorder()
    pwrite = ModelFile.pwrite

    def tagged(self: ModelFile, offset: int, data: bytes, f: Any = None) -> None:
        rec.ops.append(HostOp("metadata", path))
        pwrite(self, offset, data, f)

    monkeypatch.setattr(ModelFile, "pwrite", tagged)
    with hostio.monitoring(rec), model.open(path, cache="unsafe") as img:
        img.write(1000, b"x" * 3000)
        img.discard(0, 4096)
        img.write_zeroes(0, 700, unmap=True)
        img.write_compressed(8192, b"c" * 512)
    # The tag comes before pwrite's barrier; the write itself is the next write call.
    unflushed, tagged_next, metadata = False, False, 0
    for i, op in enumerate(rec.ops):
        if op.kind == "metadata":
            tagged_next = True
        elif op.kind == F:
            unflushed = False
        elif op.kind != hostio.READ:
            if tagged_next and op.kind == W:
                metadata += 1
                assert not unflushed, f"metadata write {i} with unflushed writes before it"
                tagged_next = False
            unflushed = True
    assert metadata > 10


# --- crash states ------------------------------------------------------------------------------

def test_states_are_prefixes_reorderings_after_the_last_flush_and_torn_writes() -> None:
    import random
    stream = [_w(0, b"a" * 1024), HostOp(F, "f"), _w(1024, b"b"), _w(2048, b"c"), _w(4096, b"d")]
    got = list(states(stream, random.Random(1), reorders=8))
    prefix = [s for s in got if s.family == "prefix"]
    assert [s.cut for s in prefix] == [0, 1, 3, 4, 5]
    for s in got:
        if s.family == "reordered":
            assert 0 in s.applied and s.cut == 5
            assert s.applied != (0, 2, 3, 4)[:len(s.applied)]
    torn = [s for s in got if s.family == "torn"]
    assert all(s.torn is not None and s.torn[0] == 0 for s in torn)


def test_a_reordered_write_carries_the_whole_sectors_the_page_cache_held() -> None:
    # Two writes into one sector: the later one reaches the disk with the earlier one's
    # bytes, since the disk stores what the cache held, a whole sector.
    stream = [_w(0, b"\0" * 1024), HostOp(F, "f"), _w(0, b"AA"), _w(1, b"B")]
    out = materialize(b"", stream, CrashState("reordered", 4, (0, 3)), "f")
    assert out[:3] == b"AB\0"
    torn = materialize(b"", stream, CrashState("torn", 1, (), (0, (1,))), "f")
    assert torn == bytes(1024)
    assert len(materialize(b"", stream, CrashState("prefix", 0, ()), "f")) == 0


def test_reordered_states_cover_every_whole_call_subset_of_a_small_epoch_and_torn_ones() -> None:
    import random
    stream = [_w(0, b"a" * 1024), HostOp(F, "f"), _w(1024, b"b" * 1024), _w(4096, b"c"),
              _w(8192, b"d")]
    got = list(states(stream, random.Random(1), reorders=16, bases={"f": b""}))
    whole = {s.applied for s in got if s.family == "reordered" and s.torn is None}
    # 2**3 - 3 - 1 subsets of the epoch (2, 3, 4) that are not prefixes of it.
    assert whole == {(0, 3), (0, 4), (0, 2, 4), (0, 3, 4)}
    parts = [s for s in got if s.family == "reordered" and s.torn is not None]
    assert parts and all(s.torn is not None and s.torn[0] == 2 and len(s.torn[1]) == 1
                         for s in parts)
    # The epoch's prefix then call 2 torn is the torn family's, not a reordering.
    assert all(s.applied != (0,) for s in parts)


def test_a_flush_makes_durable_only_the_calls_to_its_own_file() -> None:
    import random
    d = HostOp(W, "data", 0, 512, b"x" * 512)
    stream = [d, _w(0, b"m" * 512), HostOp(F, "f"), _w(512, b"n" * 512)]
    got = list(states(stream, random.Random(1), reorders=16))
    reordered = {s.applied for s in got if s.family == "reordered"}
    # The image's flush leaves the data file's write pending: it can be lost after it.
    assert (1, 3) in reordered


def test_the_guest_oracle_allows_each_size_since_the_flush() -> None:
    from difftest.crash.oracle import GuestOracle
    o = GuestOracle(b"\1" * 1024)
    o.resized(2048)
    o.wrote(1024, bytes(1024))
    assert o.allowed_sizes() == {1024, 2048}
    assert o.bad_sectors(b"\1" * 1024 + bytes(1024)) == []
    assert o.bad_sectors(b"\1" * 1024 + b"\2" * 1024) == [2, 3]
    o.flushed(b"\1" * 1024 + bytes(1024))
    assert o.allowed_sizes() == {2048}


def test_only_copied_flags_that_lose_nothing_are_forgiven() -> None:
    from difftest.crash.judge import harmless_copied
    ok = ("Leaked cluster 5 refcount=2 reference=1\n"
          "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000005000 refcount=2\n"
          "ERROR OFLAG_COPIED data cluster: l2_entry=6000 refcount=1\n")
    assert harmless_copied(ok, 12) == 2
    # Set on a cluster that a snapshot maps too: an in-place write would change the snapshot.
    shared = "ERROR OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=8000000000004000 refcount=2\n"
    assert harmless_copied(shared, 12) == 0


# --- the model is safe ------------------------------------------------------------------------

SEQUENCE = [Op("write", 0, 5000, 7), Op("write", 70000, 300, 999), Op("flush"),
            Op("discard", 4096, 8192), Op("write_zeroes", 100, 9000, 1),
            Op("write_compressed", 32768, 4096, 3), Op("reopen"), Op("write", 81920, 10000, 5)]
CONFIGS = {
    "v3 4K backing": Config(cluster_size=4096, size=4096 * 37 + 1536, backing="qcow2"),
    "lazy": Config(cluster_size=4096, size=4096 * 37 + 1536, lazy_refcounts=True),
    "v2": Config(version=2, cluster_size=4096, size=4096 * 37 + 1536, backing="raw"),
    "512B rc1": Config(cluster_size=512, refcount_bits=1, size=512 * 300),
    "extl2": Config(cluster_size=32768, extended_l2=True, size=32768 * 8, backing="qcow2",
                    backing_size="shorter"),
}


def _run(tmp_path: Path, cfg: Config, ops: list[Op], seed: int = 1,
         engine: str = "model") -> cc.Result:
    return cc.run_example(engine, cfg, ops, seed, tmp_path / "ex", tmp_path / "backing")


@pytest.mark.parametrize("engine", ["model", "impl"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_crash_state_of_the_model_is_good(tmp_path: Path, name: str, engine: str) -> None:
    cfg = CONFIGS[name]
    ops = [op if op.kind != "write_compressed" else Op(op.kind, 4 * cfg.cluster_size,
                                                       cfg.cluster_size, 3) for op in SEQUENCE]
    res = _run(tmp_path, cfg, [op for op in ops if op.off + op.n <= cfg.size], engine=engine)
    assert res.failure is None, res.failure.describe()
    assert res.judged["prefix"] > 10 and res.judged["reordered"] + res.judged["torn"] > 0


METADATA_SEQUENCE = [Op("write", 0, 5000, 7), Op("snapshot_create", arg=0), Op("write", 100, 9000, 8),
                     Op("snapshot_delete", arg=0), Op("resize", 0, 4096 * 40),
                     Op("write", 4096 * 38, 8192, 5), Op("flush"), Op("resize", 0, 4096 * 30),
                     Op("write", 100, 900, 6),
                     Op("resize", 0, 4096 * 33)]


@pytest.mark.parametrize("engine", ["model", "impl"])
@pytest.mark.parametrize("name", ["v3 4K backing", "lazy"])
def test_snapshots_and_resize_leave_good_crash_states(tmp_path: Path, name: str, engine: str) -> None:
    res = _run(tmp_path, CONFIGS[name], METADATA_SEQUENCE, engine=engine)
    assert not res.errors, res.errors
    assert res.failure is None, res.failure.describe()
    assert res.judged["reordered"] > 10


def test_the_model_with_a_data_file_leaves_good_crash_states(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=4096 * 37 + 1536, data_file=True, backing="raw")
    ops = [op for op in SEQUENCE if op.kind != "write_compressed"]
    res = _run(tmp_path, cfg, ops)
    assert res.failure is None, res.failure.describe()
    assert res.judged["reordered"] > 10


def test_the_impl_with_a_data_file_leaves_good_crash_states(tmp_path: Path) -> None:
    # The barrier before an L2 update flushed the image file only, not the data file the
    # guest data went to (impl/state.py State.flush_file now flushes both).
    cfg = Config(cluster_size=4096, size=4096 * 37 + 1536, data_file=True, backing="raw")
    res = _run(tmp_path, cfg, [Op("write", 0, 5000, 7), Op("write", 70000, 300, 999), Op("flush")],
               engine="impl")
    assert res.failure is None, res.failure.describe()


def test_a_forgiven_copied_flag_on_a_v2_image_needs_no_dirty_bit(tmp_path: Path) -> None:
    # A version 2 header ends before incompatible_features: the bytes there (the backing file
    # name) are no dirty bit.
    cfg = Config(version=2, cluster_size=65536, size=2426368, backing="raw", backing_size="longer")
    res = cc.run_example("model", cfg, [Op("write", 0, 0x149B, 478318), Op("snapshot_create", arg=1)],
                         102107, tmp_path / "ex", tmp_path / "backing")
    assert res.failure is None, res.failure.describe()


def test_a_grow_over_a_longer_backing_file_shows_no_backing_data(tmp_path: Path) -> None:
    # QEMU 7.2 writes the grown size before the zeros over the longer backing file; both
    # engines make the zeros durable first (impl/resize.py flushed its caches too late).
    cfg = Config(cluster_size=512, size=4096, backing="raw", backing_size="longer")
    ops = [Op("discard", 1, 1), Op("write", 0, 1, 1), Op("resize", 0, 0x1200)]
    assert _run(tmp_path / "m", cfg, ops).failure is None
    res = _run(tmp_path / "i", cfg, ops, engine="impl")
    assert res.failure is None, res.failure.describe()


@pytest.mark.parametrize("engine", ["model", "impl"])
def test_snapshot_apply_leaves_good_crash_states(tmp_path: Path, engine: str) -> None:
    # QEMU 7.2's qcow2_snapshot_goto writes the snapshot's L1 table, COPIED flags copied
    # at create included, as the active one and fixes the flags only after the old
    # table's -1: the engines write it with the flags cleared (model/snapshots.py apply).
    cfg = CONFIGS["v3 4K backing"]
    ops = [Op("write", 0, 5000, 7), Op("snapshot_create", arg=0), Op("write", 100, 9000, 8),
           Op("snapshot_apply", arg=0)]
    res = _run(tmp_path, cfg, ops, engine=engine)
    assert res.failure is None, res.failure.describe()


# --- planted bugs -----------------------------------------------------------------------------

def _l2_without_barrier(mp_write_l2: Callable[..., None]) -> Callable[..., None]:
    def write_l2(q: Any, off: int, table: Any) -> None:
        q.unflushed = False  # the barrier before the L2 write is skipped
        mp_write_l2(q, off, table)
    return write_l2


def _free_without_barrier(free: Callable[..., None]) -> Callable[..., None]:
    def free_any_cluster(q: Any, entry: int, *, request: bool) -> None:
        q.unflushed = False  # the refcount drop may land before the unlinking L2 entry
        free(q, entry, request=request)
    return free_any_cluster


@pytest.fixture
def data_after_l2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """COW and guest data of an allocating write issued after the L2 entry that maps it."""
    later: list[tuple[Any, int, bytes]] = []
    write_run, write_l2 = wr.write_run, mp.write_l2

    def late_run(s: Any, *args: Any, **kwargs: Any) -> int:
        s.q.data_pwrite = lambda o, d: later.append((s.q, o, d))
        try:
            return write_run(s, *args, **kwargs)
        finally:
            del s.q.data_pwrite

    def l2_then_data(q: Any, off: int, table: Any) -> None:
        write_l2(q, off, table)
        while later:
            qq, o, d = later.pop(0)
            type(qq).data_pwrite(qq, o, d)

    monkeypatch.setattr(wr, "handle_alloc_space", lambda *a, **k: False)
    monkeypatch.setattr(wr, "write_run", late_run)
    monkeypatch.setattr(mp, "write_l2", l2_then_data)
    yield


PLANTED = {
    "l2 before refcount": (lambda mpatch: mpatch.setattr(mp, "write_l2", _l2_without_barrier(mp.write_l2)),
                           Config(cluster_size=4096, size=4096 * 37 + 1536),
                           [Op("write", 0, 4096, 7)]),
    "freed cluster reused early": (
        lambda mpatch: mpatch.setattr(mp, "free_any_cluster", _free_without_barrier(mp.free_any_cluster)),
        Config(cluster_size=4096, size=4096 * 37 + 1536),
        [Op("write", 0, 4096, 7), Op("flush"), Op("discard", 0, 4096), Op("write", 8192, 4096, 9)]),
}


def _impl_plant(cls_path: str, name: str) -> Callable[[pytest.MonkeyPatch], None]:
    def plant(mpatch: pytest.MonkeyPatch) -> None:
        import importlib
        mod, cls = cls_path.rsplit(".", 1)
        mpatch.setattr(getattr(importlib.import_module(mod), cls), name, lambda *a, **k: None)
    return plant


IMPL_PLANTED = {
    # The L2 cache no longer waits for the refcount cache (qcow2_cache_set_dependency).
    "l2 before refcount": (_impl_plant("impl.cache.Qcow2Cache", "set_dependency"),
                           Config(cluster_size=4096, size=4096 * 37 + 1536),
                           [Op("write", 0, 4096, 7)]),
    # A compressed cluster freed by an overwrite is reused at once, its L2 update unflushed.
    "freed cluster reused early": (_impl_plant("impl.state.State", "settle_freed"),
                                   Config(cluster_size=4096, size=4096 * 37 + 1536),
                                   [Op("write_compressed", 0, 4096, 7), Op("flush"),
                                    Op("write", 0, 4096, 8), Op("write", 8192, 4096, 9)]),
}
ENGINE_PLANTED = [("model", bug) for bug in PLANTED] + [("impl", bug) for bug in IMPL_PLANTED]


@pytest.mark.parametrize(("engine", "bug"), ENGINE_PLANTED)
def test_planted_ordering_bugs_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          engine: str, bug: str) -> None:
    plant, cfg, ops = (PLANTED if engine == "model" else IMPL_PLANTED)[bug]
    assert _run(tmp_path, cfg, ops, engine=engine).failure is None  # the unplanted engine is safe
    plant(monkeypatch)
    res = _run(tmp_path, cfg, ops, engine=engine)
    assert res.failure is not None
    assert len(res.failure.ops) <= 6
    saved = repro.save(res.failure, tmp_path / "repro", bug.replace(" ", "-"))
    again = repro.replay(saved)
    assert again.failure is not None and again.failure.problems == res.failure.problems


def test_planted_data_after_its_l2_entry_is_caught(tmp_path: Path, data_after_l2: None) -> None:
    cfg = Config(cluster_size=4096, size=4096 * 37 + 1536, backing="raw")
    res = _run(tmp_path, cfg, [Op("write", 0, 4096, 7)])
    assert res.failure is not None
    assert any("guest sectors" in p for p in res.failure.problems), res.failure.problems


@pytest.mark.slow
@pytest.mark.parametrize("bug", [*PLANTED, "data after l2"])
def test_the_campaign_finds_and_shrinks_each_planted_bug(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: str,
        request: pytest.FixtureRequest) -> None:
    if bug == "data after l2":
        request.getfixturevalue("data_after_l2")
    else:
        PLANTED[bug][0](monkeypatch)
    rep = cc.campaign("model", seconds=240, seed=4, max_ops=12, shrink_seconds=120,
                      workdir=tmp_path)
    assert rep.failure is not None, f"not caught in {rep.examples} examples"
    assert len(rep.failure.ops) <= 6, rep.failure.describe()


@pytest.mark.slow
def test_a_model_campaign_finds_no_bad_state(tmp_path: Path) -> None:
    rep = cc.campaign("model", seconds=300, seed=11, workdir=tmp_path)
    assert rep.failure is None, rep.failure.describe()
    assert rep.total > 1000


# --- QEMU's own writes --------------------------------------------------------------------------

def test_qemu_io_writes_are_recorded_through_blklogwrites(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=4096 * 37 + 1536, backing="qcow2")
    res = cc.run_example("qemu", cfg, [Op("write", 0, 5000, 7), Op("flush"),
                                       Op("write", 70000, 300, 999), Op("reopen"),
                                       Op("discard", 0, 4096)], 1, tmp_path / "ex",
                         tmp_path / "backing")
    assert res.failure is None, res.failure.describe()
    assert res.judged["prefix"] >= 10


def test_the_crash_verb_has_defaults_for_qcow2lab_run() -> None:
    from difftest.cli import crash
    args = crash.defaults(time_budget=5.0)
    assert (args.engines, args.time_budget, args.jobs) == ("model", 5.0, 1)


def test_a_run_that_corrupts_the_file_without_a_crash_is_skipped_not_judged(tmp_path: Path) -> None:
    # QEMU 7.2 packs compressed data after a remembered offset whose cluster was freed and
    # reused (model/compressed.py alloc_bytes reproduces it): the file is corrupt with no
    # crash at all, which is the lockstep's qemu-corrupt case, not a crash-safety finding.
    cfg = Config(cluster_size=512, size=4096)
    ops = [Op("write_compressed", 0, 512, 1), Op("discard", 0, 1024), Op("write", 0x688, 1, 1),
           Op("write_compressed", 0, 512, 1)]
    res = _run(tmp_path, cfg, ops)
    assert res.live_corrupt and not res.judged and res.failure is None
