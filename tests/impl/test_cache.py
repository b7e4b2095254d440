"""impl/cache.py on its own: LRU eviction with write-back, dependency order on flush, the
clean interval, discard. The host file is a real file behind a recording HostFile, the
way a crash-safety recorder would wrap it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from impl.cache import Qcow2Cache
from impl.hostfile import Buffer, HostFile


class RecordingFile(HostFile):
    """Every write and flush, in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path, readonly=False)
        self.log: list[tuple[str, int]] = []

    def pwritev(self, bufs: Sequence[Buffer], offset: int, *, meta: bool = False) -> None:
        self.log.append(("write", offset))
        super().pwritev(bufs, offset, meta=meta)

    def flush(self, *, sync: bool = True) -> None:
        self.log.append(("flush", 0))
        super().flush(sync=sync)


def _file(tmp_path: Path, size: int = 1 << 16) -> RecordingFile:
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * (size // 256))
    return RecordingFile(str(p))


def _cache(f: RecordingFile, capacity: int, name: str = "c", clock: list[float] | None = None) -> Qcow2Cache:
    t = clock if clock is not None else [0.0]
    return Qcow2Cache(f, 512, capacity, bytearray, bytes, name=name,
                      flush_file=lambda: f.flush(), clock=lambda: t[0])


def test_hit_is_no_io_and_miss_reads_one_entry(tmp_path: Path) -> None:
    f = _file(tmp_path)
    c = _cache(f, 4)
    a = c.get(1024)
    assert bytes(a) == bytes(range(256)) * 2
    assert (f.stats.meta_reads, f.stats.meta_read_bytes) == (1, 512)
    assert c.get(1024) is a
    assert f.stats.meta_reads == 1
    assert (c.stats.hits, c.stats.misses) == (1, 1)


def test_lru_eviction_writes_back_a_dirty_victim(tmp_path: Path) -> None:
    f = _file(tmp_path)
    c = _cache(f, 2)
    a = c.get(0)
    a[0] = 0xEE
    c.mark_dirty(0)
    c.get(512)
    c.get(0)  # 0 is now the most recently used; 512 goes first
    c.get(1024)
    assert 512 not in c.tables and 0 in c.tables
    assert f.log == []
    c.get(1536)  # evicts 0, dirty: written back first
    assert f.log == [("write", 0)]
    assert c.stats.evictions == 2
    assert (tmp_path / "f").read_bytes()[0] == 0xEE


def test_pinned_entries_are_not_evicted(tmp_path: Path) -> None:
    f = _file(tmp_path)
    c = _cache(f, 2)
    c.get(0)
    c.pin(0)
    c.get(512)
    c.get(1024)
    assert 0 in c.tables and 512 not in c.tables
    c.put(0)
    c.get(1536)
    assert 0 not in c.tables


def test_flush_writes_the_dependency_first_then_syncs(tmp_path: Path) -> None:
    f = _file(tmp_path)
    refcounts = _cache(f, 4, "refcount")
    l2 = _cache(f, 4, "l2")
    refcounts.get(4096)
    refcounts.mark_dirty(4096)
    l2.get(0)
    l2.mark_dirty(0)
    l2.set_dependency(refcounts)
    l2.flush()
    assert f.log == [("write", 4096), ("flush", 0), ("write", 0), ("flush", 0)]
    assert not l2.dirty and not refcounts.dirty and l2.depends is None


def test_eviction_honours_the_dependency(tmp_path: Path) -> None:
    f = _file(tmp_path)
    refcounts = _cache(f, 4, "refcount")
    l2 = _cache(f, 1, "l2")
    refcounts.get(4096)
    refcounts.mark_dirty(4096)
    l2.get(0)
    l2.mark_dirty(0)
    l2.set_dependency(refcounts)
    l2.get(512)
    assert f.log[:3] == [("write", 4096), ("flush", 0), ("write", 0)]


def test_depends_on_flush_syncs_before_write_back(tmp_path: Path) -> None:
    f = _file(tmp_path)
    l2 = _cache(f, 4)
    l2.get(0)
    l2.mark_dirty(0)
    l2.depends_on_flush()
    l2.write()
    assert f.log == [("flush", 0), ("write", 0)]


def test_clean_interval_drops_entries_unused_that_long(tmp_path: Path) -> None:
    f = _file(tmp_path)
    t = [100.0]
    c = _cache(f, 8, clock=t)
    c.start_clean_timer(10)
    c.get(0)
    c.get(512)
    c.mark_dirty(512)
    t[0] = 111
    c.maybe_clean()  # first run: both were used since the timer started
    assert set(c.tables) == {0, 512}
    c.get(0)
    t[0] = 122
    c.maybe_clean()  # 512 unused for a whole interval, but dirty: kept
    assert set(c.tables) == {0, 512}
    t[0] = 133
    c.maybe_clean()  # 0 unused since the last run: dropped
    assert set(c.tables) == {512}


def test_discard_forgets_a_dirty_entry(tmp_path: Path) -> None:
    f = _file(tmp_path)
    c = _cache(f, 4)
    c.get(0)
    c.mark_dirty(0)
    c.discard(0)
    c.flush()
    assert ("write", 0) not in f.log


def test_a_recorder_sees_every_host_write_of_an_image(tmp_path: Path) -> None:
    import impl
    from impl.image import Image

    seen: list[tuple[str, int]] = []

    class Recorder(HostFile):
        def pwritev(self, bufs: Sequence[Buffer], offset: int, *, meta: bool = False) -> None:
            seen.append(("meta" if meta else "data", offset))
            super().pwritev(bufs, offset, meta=meta)

        def flush(self, *, sync: bool = True) -> None:
            seen.append(("flush", 0))
            super().flush(sync=sync)

    p = tmp_path / "a.qcow2"
    impl.create(p, 1 << 26)
    Image.host_file_class = Recorder
    try:
        with impl.open(p) as img:
            img.write(0, b"r" * 512)
    finally:
        Image.host_file_class = HostFile
    kinds = [k for k, _ in seen]
    assert "data" in kinds and "meta" in kinds and kinds[-1] == "flush"
    # The data reaches the file before the L2 entry that maps it is written back.
    assert kinds.index("data") < max(i for i, k in enumerate(kinds) if k == "meta")
