"""Counted host I/O (Image.stats()): what one guest request costs, asserted exactly; and
the behaviours that the counts stand for (overlap checks, O_DIRECT)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import impl
from impl.image import Image
from spec import features as ft
from spec.errors import CorruptionError, RequestError
from spec.image import open_image

K, M = 1 << 10, 1 << 20


def _data(img: Image) -> tuple[int, int]:
    st = img.stats()
    return st["data_reads"], st["data_writes"]


def test_cache_hit_4k_read_is_one_host_read(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"x" * 65536)
        img.read(4096, 4096)  # loads the slice
        img.reset_stats()
        assert img.read(8192, 4096) == b"x" * 4096
        st = img.stats()
        assert (st["reads"], st["read_bytes"], st["writes"]) == (1, 4096, 0)
        assert (st["l2_cache_hits"], st["l2_cache_misses"]) == (1, 0)


def test_read_of_host_contiguous_clusters_is_one_host_read(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M, cluster_size=4096)
    with impl.open(p) as img:
        img.write(0, b"y" * 65536)
        img.reset_stats()
        img.read(100, 60000)
        assert img.stats()["reads"] == 1


def test_miss_with_4k_slices_reads_4k_of_l2(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 1 << 30)
    with impl.open(p) as img:
        img.write(512 * M, b"z" * 4096)
    with impl.open(p, l2_cache_entry_size=4096) as img:
        img.reset_stats()
        assert img.read(512 * M, 4096) == b"z" * 4096
        st = img.stats()
        assert (st["meta_reads"], st["meta_read_bytes"]) == (1, 4096)
        assert (st["data_reads"], st["l2_cache_misses"]) == (1, 1)


def _overlay(tmp_path: Path, **opts: object) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    impl.create(base, 8 * M, cluster_size=65536)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 8M", str(base)], check=True, capture_output=True)
    top = tmp_path / "top.qcow2"
    impl.create(top, 8 * M, backing_file=base.name, backing_fmt="qcow2", **opts)  # type: ignore[arg-type]
    return base, top


def test_cow_write_over_a_backing_file_is_one_read_and_one_write(tmp_path: Path) -> None:
    _, top = _overlay(tmp_path)
    with impl.open(top) as img:
        img.write(0, b"a")  # allocates the L2 table
        img.reset_stats()
        img.backing.reset_stats()
        img.write(65536 + 1000, b"b" * 3000)  # head and tail COW, merged (perform_cow)
        st, bst = img.stats(), img.backing.stats()
        assert (st["data_reads"], st["data_writes"], st["data_write_bytes"]) == (0, 1, 65536)
        assert bst["data_reads"] == 1
        assert st["meta_writes"] == 0  # the L2 entry and refcount wait in the caches
        assert img.read(65536, 65536) == b"\x5a" * 1000 + b"b" * 3000 + b"\x5a" * (65536 - 4000)


def test_cow_of_a_run_of_two_pieces_is_one_read_and_one_write(tmp_path: Path) -> None:
    """A write over an allocated cluster and the next one, whose new cluster lands right
    after it on the host: one run of two pieces, which QEMU writes as data then tail
    region; impl sends both in one vectored write after the one tail read."""
    _, top = _overlay(tmp_path)
    with impl.open(top) as img:
        img.write(0, b"a")  # allocates the L2 table and cluster 0, the file's last
        img.reset_stats()
        img.backing.reset_stats()
        img.write(65536 - 1000, b"r" * 2000)
        st = img.stats()
        assert (st["data_reads"], st["data_writes"], st["data_write_bytes"]) == (0, 1, 65536 + 1000)
        assert img.backing.stats()["data_reads"] == 1
        assert img.read(65536 - 1000, 65536 + 1000) == b"r" * 2000 + b"\x5a" * (65536 - 1000)


def test_cow_regions_far_apart_are_read_separately(tmp_path: Path) -> None:
    _, top = _overlay(tmp_path)
    with impl.open(top) as img:
        img.write(0, b"a")
        img.backing.reset_stats()
        img.reset_stats()
        img.write(65536 + 100, b"c" * 40000)  # more than 16 KiB between the regions
        assert img.backing.stats()["data_reads"] == 2
        assert img.stats()["data_writes"] == 1


def test_whole_subcluster_write_over_backing_is_one_write_no_read(tmp_path: Path) -> None:
    _, top = _overlay(tmp_path, extended_l2=True)
    with impl.open(top) as img:
        img.write(0, b"a" * 2048)  # one subcluster: allocates the L2 table
        img.reset_stats()
        img.backing.reset_stats()
        img.write(65536 + 2048 * 3, b"s" * 2048 * 2)
        assert _data(img) == (0, 1)
        assert img.backing.stats()["data_reads"] == 0
        assert img.stats()["data_write_bytes"] == 4096
        got = img.read(65536, 65536)
        assert got == b"\x5a" * 6144 + b"s" * 4096 + b"\x5a" * (65536 - 10240)


def test_partial_write_to_a_fresh_cluster_zeroes_with_fallocate(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"a")
        img.reset_stats()
        img.write(65536 + 5, b"q" * 10)
        st = img.stats()
        assert (st["reads"], st["data_writes"], st["fallocates"]) == (0, 1, 1)
        assert img.read(65536, 20) == bytes(5) + b"q" * 10 + bytes(5)


def test_cow_from_a_compressed_cluster_is_one_read_one_write(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write_compressed(0, b"c" * 65536)
        img.reset_stats()
        img.write(100, b"d" * 100)
        assert _data(img) == (1, 1)
        assert img.read(0, 300) == b"c" * 100 + b"d" * 100 + b"c" * 100


def test_flush_orders_refcounts_before_l2(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"a")
        img.flush()
        img.write(5 * 65536, b"b")  # new cluster: refcount block and L2 slice dirty
        writes: list[int] = []
        host = img.s.host
        orig = host.pwritev

        def record(bufs, offset, *, meta=False):  # type: ignore[no-untyped-def]
            writes.append(offset)
            orig(bufs, offset, meta=meta)

        host.pwritev = record  # type: ignore[method-assign]
        img.reset_stats()
        img.flush()
        l2 = img.s.l1_table[0] & ~(1 << 63)
        refblock = img.s.reftable[0]
        assert writes == [refblock, l2]
        assert img.stats()["flushes"] >= 2


def test_the_data_file_is_flushed_when_guest_data_went_there(tmp_path: Path) -> None:
    """Every barrier (State.flush_file) also flushes an external data file written since
    its last flush: the barrier before an L2 update stands for "the guest data is on the
    disk", and that data is in the data file. One flush more, only when it is needed."""
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M, data_file=str(tmp_path / "a.data"))
    with impl.open(p) as img:
        img.write(0, b"a" * 4096)
        img.flush()
        img.reset_stats()
        img.flush()  # nothing changed since: the image file alone
        assert img.stats()["flushes"] == 1
        img.write(0, b"b" * 4096)  # in place: guest data only, no metadata
        img.reset_stats()
        img.flush()
        assert img.stats()["flushes"] == 2


def test_unsafe_cache_never_syncs(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p, cache="unsafe") as img:
        img.write(0, b"a" * 70000)
        img.flush()
        assert img.stats()["flushes"] == 0


def _point_at(img: Image, guest: int, host: int) -> None:
    """Damage the active L2 entry of ``guest`` to map ``host`` (test set-up only)."""
    from impl import cluster as cl

    key, words, w = cl.slice_for_write(img.s, guest)
    words[w] = host | (1 << 63)
    img.s.l2_cache.mark_dirty(key)


def test_write_onto_metadata_is_refused_and_flags_corrupt(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"a")
        _point_at(img, 65536, img.s.l1_table_offset)
        with pytest.raises(CorruptionError):
            img.write(65536, b"x" * 512)
        with pytest.raises(CorruptionError):
            img.read(0, 1)
    with open_image(p) as f:
        assert f.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(RequestError):
        impl.open(p)


def test_overlap_check_none_lets_the_write_through(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p, overlap_check="none") as img:
        img.write(0, b"a")
        # Point at the refcount table's cluster: refused by default, not checked here.
        _point_at(img, 65536, img.s.refcount_table_offset)
        img.write(65536 + 4096, b"x" * 8)


@pytest.mark.parametrize("mode, refused", [("cached", False), ("all", True)])
def test_all_includes_inactive_l2_tables(tmp_path: Path, mode: str, refused: bool) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"a")
        shared_l2 = img.s.l1_table[0] & ~(1 << 63)
        img.snapshot_create("s")
        img.write(0, b"b")  # unshares the L2 table: the old one is the snapshot's only
        assert img.s.l1_table[0] & ~(1 << 63) != shared_l2
    with impl.open(p, overlap_check=mode) as img:
        _point_at(img, 65536, shared_l2)
        if refused:
            with pytest.raises(CorruptionError):
                img.write(65536, b"x")
        else:
            img.write(65536, b"x")


def test_cache_none_uses_o_direct(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p, cache="none") as img:
        assert img.s.host.direct
        img.write(1000, b"o" * 5000)
        img.write(70000, b"p" * 3)
        assert img.read(1000, 5000) == b"o" * 5000
        assert img.read(69999, 5) == b"\0ppp\0"
    with impl.open(p, readonly=True) as img:
        assert img.read(1000, 5000) == b"o" * 5000
    assert subprocess.run(["qemu-img", "check", str(p)], capture_output=True).returncode == 0


# --- the deterministic counts behind `qcow2lab bench impl` (difftest/bench/impl/) ----------------

def _prealloc(path: Path, size: int, cluster_size: int = 65536) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"preallocation=metadata,cluster_size={cluster_size}", str(path), str(size)],
                   check=True, capture_output=True)
    return path


def test_cow_ops_row_is_one_read_and_one_write_per_cow(tmp_path: Path) -> None:
    """The cow-ops row: impl needs one read and one write per COW (head and tail together),
    against the model's naive COW, which also writes its metadata at once."""
    from difftest.bench.impl.common import Workspace
    from difftest.bench.impl.io_rows import cow_ops_counts

    c = cow_ops_counts(Workspace(tmp_path))
    assert (c["impl_reads"], c["impl_writes"]) == (1, 1)
    assert c["model_reads"] + c["model_writes"] > 2


def test_no_l2_miss_after_warm_up_when_the_cache_covers_the_disk(tmp_path: Path) -> None:
    """The cache-size row at 2.5 MiB: once every table is loaded, random reads never miss
    and read no metadata (O_DIRECT, whole-table entries)."""
    p = _prealloc(tmp_path / "a.qcow2", 2 << 30)
    with impl.open(p, readonly=True, cache="none", l2_cache_size=256 * K, l2_cache_entry_size=64 * K) as img:
        for i in range(4):  # four tables of 64 KiB, 512 MiB of guest each
            img.read(i * 512 * M, 4096)
        img.reset_stats()
        for off in range(0, 2 << 30, 7 * M + 4096):
            img.read(off, 4096)
        st = img.stats()
        assert (st["l2_cache_misses"], st["meta_reads"]) == (0, 0)
        assert st["data_reads"] == st["l2_cache_hits"] == len(range(0, 2 << 30, 7 * M + 4096))


def test_every_miss_with_4k_slices_reads_4k_of_metadata(tmp_path: Path) -> None:
    """The slices rows: with 4 KiB slices a miss reads exactly 4 KiB, with whole tables a
    whole cluster."""
    p = _prealloc(tmp_path / "a.qcow2", 4 << 30)
    offs = [(i * 2654435761) % (4 << 30) // 4096 * 4096 for i in range(300)]
    for entry in (4 * K, 64 * K):
        with impl.open(p, readonly=True, cache="none", l2_cache_size=64 * K,
                       l2_cache_entry_size=entry) as img:
            img.reset_stats()  # the open read the L1 and refcount tables
            for off in offs:
                img.read(off, 4096)
            st = img.stats()
            assert st["l2_cache_misses"] > 0
            assert st["meta_read_bytes"] == st["l2_cache_misses"] * entry
            assert st["meta_reads"] == st["l2_cache_misses"]


def test_cache_rows_trace_records_every_host_read_of_a_pass(tmp_path: Path) -> None:
    """The cache rows' disk limit replays the host reads impl made in one pass: one 4 KiB
    data read per request plus one entry-sized metadata read per L2 miss. The trace used to
    see only what went through HostFile.pread after open, so a pass of cache hits (the
    plain-image closure) recorded nothing and the limit divided by zero."""
    from difftest.bench.impl.cache_rows import Config, _Side

    p = _prealloc(tmp_path / "a.qcow2", 4 << 30)
    offs = [(i * 2654435761) % (4 << 30) // 4096 * 4096 for i in range(200)]
    for c in (Config("all", 512 * K, 64 * K), Config("few", 16 * K, 4 * K)):
        side = _Side(p, c, [offs, offs])
        try:
            side.iops()  # one timed pass, as the rows run before tracing
            side.img.reset_stats()
            trace = side.trace(offs)
            misses = side.img.stats()["l2_cache_misses"]
            data = [(o, n) for o, n, meta in trace if not meta]
            meta_reads = [n for _, n, meta in trace if meta]
            assert len(data) == len(offs) and {n for _, n in data} == {4096}
            assert meta_reads == [c.entry_size] * misses
            assert (misses == 0) == (c.name == "all")
            assert side.img.read(offs[0], 4096) == bytes(4096)  # the fast path is back
            assert "read" in side.img.__dict__
        finally:
            side.close()


def test_sequential_1m_read_of_contiguous_clusters_is_one_host_read(tmp_path: Path) -> None:
    """The read-seq row: 16 host-contiguous clusters in one request are one host read."""
    p = _prealloc(tmp_path / "a.qcow2", 64 * M)
    with impl.open(p, readonly=True) as img:
        img.read(0, 4096)
        img.reset_stats()
        img.read(M, M)
        st = img.stats()
        assert (st["reads"], st["read_bytes"]) == (1, M)


def test_allocating_write_is_one_fallocate_and_one_write(tmp_path: Path) -> None:
    """The write-alloc and overlap rows: a 4 KiB write into a fresh cluster (no backing)
    zeroes the cluster with fallocate and writes the data once; metadata waits in the caches."""
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with impl.open(p) as img:
        img.write(0, b"a" * 4096)
        img.reset_stats()
        for i in range(1, 9):
            img.write(i * 65536, b"a" * 4096)
        st = img.stats()
        assert (st["data_writes"], st["fallocates"], st["reads"], st["meta_writes"]) == (8, 8, 0, 0)


def test_bench_impl_cli_runs_a_counted_row(tmp_path: Path) -> None:
    import json
    import sys

    exe = Path(sys.executable).with_name("qcow2lab")
    out = subprocess.run([str(exe), "bench", "impl", "--help"], capture_output=True, text=True, check=True)
    assert "cow-ops" in out.stdout and "--rounds" in out.stdout
    out = subprocess.run([str(exe), "bench", "impl", "cow-ops", "--output=json", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    row = json.loads(out.stdout)["rows"][0]
    assert row["row"] == "cow-ops" and row["passed"]


def test_cache_hit_under_o_direct_is_one_host_read(tmp_path: Path) -> None:
    p = _prealloc(tmp_path / "a.qcow2", 64 * M)
    with impl.open(p, readonly=True, cache="none") as img:
        img.read(0, 4096)
        img.reset_stats()
        assert img.read(65536 + 512, 1024) == bytes(1024)
        st = img.stats()
        assert (st["reads"], st["read_bytes"], st["l2_cache_hits"], st["l2_cache_misses"]) == (1, 1024, 1, 0)


def test_backing_file_inherits_the_cache_mode(tmp_path: Path) -> None:
    """QEMU's children inherit cache.direct (block.c bdrv_backing_options): with
    cache="none" the COW reads from the backing file are O_DIRECT too."""
    _, top = _overlay(tmp_path)
    with impl.open(top, cache="none") as img:
        assert img.s.host.direct and img.backing.s.host.direct
        img.write(65536 + 100, b"d" * 100)
        assert img.read(65536, 300) == b"\x5a" * 100 + b"d" * 100 + b"\x5a" * 100


def _cache_view(img: Image) -> tuple[dict[str, int], list[int], set[int]]:
    c = img.s.l2_cache
    return img.stats(), list(c.tables), set(c.used_since_clean)


@pytest.mark.parametrize("entry", [4 * K, 64 * K])
def test_inline_read_leaves_counts_and_cache_as_the_general_path(tmp_path: Path, entry: int) -> None:
    """Image.read's inline closure and its one-read path for host-contiguous clusters (the
    read-hit and read-seq rows) against the general path (Image.read, the method the
    closure shadows; read_internal's loop, one lookup per cluster): the same bytes,
    counts, LRU order and used marks after a mix of hits, misses, evictions, cache
    cleans, multi-cluster reads over contiguous and non-contiguous clusters, zero and
    unallocated clusters."""
    import random

    size = 64 * M if entry == 4 * K else 1536 * M  # several slices, or three whole tables
    p = _prealloc(tmp_path / "a.qcow2", size)
    with impl.open(p) as img:  # holes in the layout: not every request is one host run
        img.write(3 * M, b"w" * 100)
        img.write_zeroes(5 * M, 64 * K)
        img.discard(9 * M, 128 * K)
        for hole in range(M + 64 * K, size, 3 * M):  # reads across these take the loop
            img.discard(hole, 64 * K)
    rnd = random.Random(7)
    reqs = [(rnd.randrange(0, size - 4 * M), rnd.choice([1, 512, 4096, 65536, 100000, M]))
            for _ in range(400)] + [(0, 1), (size - 5, 5), (M - 10, 20), (8 * M, 4 * M),
                                    (size // 2 - 8192, 16384)]
    opts = {"l2_cache_size": 2 * entry, "l2_cache_entry_size": entry}
    with impl.open(p, readonly=True, **opts) as fast, impl.open(p, readonly=True, **opts) as slow:
        assert fast.read is fast._fast_read and slow.read is slow._fast_read
        for i, (off, n) in enumerate(reqs):
            # Inside one cluster the general path is the method (which looks the slice up
            # once more before its loop for a cluster that is not NORMAL data); across
            # clusters it is the loop.
            ref = Image.read if off // (64 * K) == (off + n - 1) // (64 * K) else Image.read_internal
            assert fast.read(off, n) == ref(slow, off, n), (off, n)
            assert _cache_view(fast) == _cache_view(slow), (off, n)
            if i % 37 == 36:  # what the clean timer runs (no 600 s wait in a test)
                assert fast.s.l2_cache.clean_unused() == slow.s.l2_cache.clean_unused()
        assert fast.stats()["l2_cache_hits"] > 0 and fast.stats()["l2_cache_misses"] > 0


def test_inline_read_of_a_closed_or_broken_image_is_refused(tmp_path: Path) -> None:
    """A caller holding the closure (``r = img.read``) after the close gets the general
    path's answer, not a read of a closed descriptor; a resize moves the range check."""
    p = _prealloc(tmp_path / "a.qcow2", 4 * M)
    with impl.open(p) as img:
        r = img.read
        r(0, 4096)
        with pytest.raises(RequestError):
            r(4 * M, 1)
        img.resize(8 * M)
        assert r(4 * M, 4096) == bytes(4096)
        img.broken = True
        with pytest.raises(CorruptionError):
            r(0, 4096)
        img.broken = False
    with pytest.raises(RequestError, match="closed"):
        r(0, 4096)
