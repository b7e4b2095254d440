"""The differential tester's own machinery: the qemu-io channel, the lockstep harness, the
Hypothesis campaign (qemu against qemu must never diverge), fault injection with shrinking,
the reproducers and the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from difftest.cli import main
from difftest.core import qemuio
from difftest.core.campaign import Shard, run_shard, run_shards
from difftest.core.config import Config, configs, parse_overrides
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep, normalize_map
from difftest.core.repro import pytest_body, shell_script
from spec.errors import CorruptionError, RequestError

pytestmark = pytest.mark.skipif(not qemuio.available(), reason="qemu-io is the oracle")


# -- pure helpers ---------------------------------------------------------------------------

def test_parse_hexdump_unaligned_and_short_last_line() -> None:
    text = ("00000ffa:  41 41 41 41 41 41 00 01 02 03 04 05 06 07 08 09  AAAAAA..........\n"
            "0000100a:  0a 0b 0c  ...\nread 19/19 bytes at offset 4090\n")
    assert qemuio.parse_hexdump(text, 19) == b"A" * 6 + bytes(range(13))


def test_parse_hexdump_refuses_short_output() -> None:
    with pytest.raises(qemuio.QemuIoDied):
        qemuio.parse_hexdump("00000000:  41  A\n", 2)


def test_runs_cover_data_exactly() -> None:
    data = b"\0" * 700 + b"xyz" + b"\x11" * 512 + b"ab" + b"\x22" * 511
    pieces = qemuio.runs(data, 512)
    assert [(a, n, b) for a, n, b in pieces if b is not None] == [(0, 700, 0), (703, 512, 0x11)]
    assert b"".join(data[a:a + n] for a, n, _ in pieces) == data


def test_normalize_map_merges_and_clips() -> None:
    ext = [{"start": 0, "length": 4096, "depth": 0, "present": True, "zero": False, "data": True,
            "offset": 1 << 20},
           {"start": 4096, "length": 4096, "depth": 0, "present": True, "zero": False, "data": True,
            "offset": 9 << 20},
           {"start": 8192, "length": 8192, "depth": 0, "present": False, "zero": True, "data": False}]
    assert normalize_map(ext, 100, 9000) == [(100, 8092, True, False, True, 0),
                                             (8192, 808, False, True, False, 0)]


def test_normalize_map_can_ignore_host_holes_in_data() -> None:
    ext = [{"start": 0, "length": 4096, "depth": 0, "present": True, "zero": False, "data": True},
           {"start": 4096, "length": 4096, "depth": 0, "present": True, "zero": True, "data": True},
           {"start": 8192, "length": 4096, "depth": 0, "present": True, "zero": True, "data": False}]
    assert normalize_map(ext, 0, 12288, host_holes=False) == [(0, 8192, True, False, True, 0),
                                                              (8192, 4096, True, True, False, 0)]
    assert len(normalize_map(ext, 0, 12288)) == 3


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_zero_range_page_cache_is_not_a_divergence(tmp_path: Path) -> None:
    """Found by ``make run`` (seed 2): after a 1-byte write (handle_alloc_space zeroes the
    cluster with ZERO_RANGE) and a snapshot, qemu-img map takes the zero flag of the data
    cluster from the host file's holes, and those depend on what readahead left in the
    page cache (see normalize_map). Guest-visible state is the same on both sides."""
    ls = Lockstep(tmp_path, Config(version=3, cluster_size=65536, refcount_bits=16, size=524288),
                  ["model", "qemu"])
    try:
        ls.write(off=0, n=1, byte=0)
        ls.discard(off=0, n=4097)
        ls.snapshot_create(name="s0")
        ls.finish()
    finally:
        ls.close()


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_zero_length_compressed_write_agrees(tmp_path: Path) -> None:
    """Found by ``make run``: an empty compressed write reached qemu-io as ``write -s`` with
    an empty pattern file, which qemu-io refuses; QEMU itself accepts the request."""
    ls = Lockstep(tmp_path, Config(version=2, cluster_size=512, size=4096), ["model", "qemu"])
    try:
        assert ls.write_compressed(off=2048, n=0, byte=0)
        assert ls.write_compressed(off=0, n=0, seed=1)
        ls.finish()
    finally:
        ls.close()


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_qemu_packing_corruption_fails_alike(tmp_path: Path) -> None:
    """Found by ``make run`` (seed 39): QEMU 7.2 packs compressed data into a host cluster a
    normal write then reuses (qcow2_alloc_bytes), and the model does the same. Overwriting
    that cluster leaves guest [1024, 1536) undecodable in both files: reads must fail alike
    (qemu's EIO inside the image is a CorruptionError), and teardown notes the damage.
    A campaign counts those notes through ``on_close``: the hook runs once, when the run is
    closed, not when the teardown closes the targets before adding its notes."""
    closed: list[tuple[int, list[str]]] = []
    ls = Lockstep(tmp_path, Config(version=3, cluster_size=512, size=4096), ["model", "qemu"],
                  on_close=[lambda run: closed.append((sum(run.ops.values()), list(run.notes)))])
    try:
        ls.write_compressed(off=512, n=512, byte=0)
        ls.write_compressed(off=512, n=512, seed=0)
        ls.write(off=0, n=1, byte=0)
        ls.write_compressed(off=1024, n=512, byte=0)
        ls.write_compressed(off=0, n=512, seed=0)
        assert not ls.read(off=1024, n=512)
        ls.finish()
        assert closed == []
    finally:
        ls.close()
    ls.close()
    assert closed == [(8, ls.notes)]  # six operations, the teardown's check_live and compare_map
    assert any(n.startswith("qemu-corrupt-live") for n in ls.notes)  # the live check's excuse
    assert any(n.startswith("qemu-unreadable") for n in ls.notes)
    assert any(n.startswith("qemu-corrupt") for n in ls.notes)


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-img")
def test_qemu_packing_without_a_qemu_target_fails_check_alike(tmp_path: Path) -> None:
    """Found by a model,impl campaign (seed 7): with no qemu target the engines reproduce
    QEMU 7.2 packing compressed data into a live cluster (a data cluster ends up COPIED with
    refcount 2), and qemu-img check calls both files corrupt, as it calls QEMU's own file
    after this sequence. Targets that fail check and the rules alike are noted, not
    reported."""
    cfg = Config(version=3, cluster_size=4096, refcount_bits=2, lazy_refcounts=True, size=153088,
                 l2_cache_size=65536, l2_cache_entry_size=4096)
    with Lockstep(tmp_path, cfg, ["model", "impl"]) as ls:
        for off, byte in ((90112, 0), (126976, 196), (61440, 0), (86016, 0)):
            ls.write_compressed(off=off, n=4096, byte=byte)
        ls.write(off=78336, n=8192, byte=17)
        ls.write(off=552, n=511, byte=0)
        ls.write_compressed(off=122880, n=4096, byte=51)
        ls.finish()
        assert any(n.startswith("qemu-corrupt: the targets reproduced") for n in ls.notes)


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_a_write_whose_cow_fails_on_qemus_packing_damage_leaves_a_tail_only_in_qemus_file(
        tmp_path: Path) -> None:
    """Deep campaign seed 40145, shrunk: QEMU packs cluster 5's compressed data into a host
    cluster that guest cluster 0 then takes over; the last write's COW of cluster 5 fails on
    every side, but QEMU had written the request's 11 bytes into the new cluster first (a
    run of two pieces: data before COW) and leaves them past the end of its file. The
    engines once read first and wrote nothing (noted qemu-corrupt-tail then); they now
    write a run as QEMU does, so the files are identical."""
    cfg = Config(version=3, cluster_size=1024, backing="raw", backing_size="same", size=8192,
                 overlap_check="cached")
    with Lockstep(tmp_path, cfg, ["model", "impl", "qemu"]) as ls:
        ls.write_compressed(off=1024, n=1024, byte=0)
        ls.write(off=1232, n=2, byte=0)
        ls.write_random(off=1, n=2048, seed=28)
        ls.write_compressed(off=5120, n=1024, byte=0)
        ls.write_zeroes(off=1, n=2560, unmap=True)
        ls.write_random(off=3073, n=1656, seed=1078)
        ls.write(off=4095, n=1036, byte=17)
        ls.finish()
        assert {"layout-identical: model = qemu", "layout-identical: impl = qemu"} <= set(ls.notes), ls.notes


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_the_same_orphan_cluster_inside_both_files_is_the_packing_tail_too(tmp_path: Path) -> None:
    """Deep campaign seed 90078, shrunk from 200 to 15 operations: the same mechanism as seed
    40145, but the freed cluster was already inside both files, so the files are as long as
    each other and differed only in that last cluster (QEMU's the write's bytes, the engines'
    zeros), past both image end offsets. Identical now that the engines write a run's data
    before its COW, as QEMU does."""
    cfg = Config(version=3, cluster_size=4096, backing="qcow2", backing_size="longer", size=32768)
    with Lockstep(tmp_path, cfg, ["model", "impl", "qemu"]) as ls:
        ls.write_random(off=8193, n=1490, seed=341)
        ls.write_compressed(off=4096, n=4096, seed=276)
        ls.write_compressed(off=28672, n=4096, seed=589)
        ls.write_compressed(off=24576, n=4096, byte=0)
        ls.write_random(off=16385, n=4097, seed=5983)
        ls.write_compressed(off=24576, n=4096, seed=10749)
        ls.discard(off=28672, n=4096)
        ls.write_compressed(off=28672, n=4096, byte=0)
        ls.write_random(off=512, n=8192, seed=5658)
        ls.write_compressed(off=28672, n=4096, seed=1061)
        ls.discard(off=28671, n=4097)
        ls.write_random(off=8191, n=11776, seed=27)
        ls.write_compressed(off=28672, n=4096, byte=51)
        ls.write_random(off=7680, n=8192, seed=0)
        ls.write_random(off=21212, n=8192, seed=5125)
        ls.finish()
        assert {"layout-identical: model = qemu", "layout-identical: impl = qemu"} <= set(ls.notes), ls.notes


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_qemus_packing_damage_is_remembered_across_a_snapshot_reopen(tmp_path: Path) -> None:
    """Deep campaign seed 100035: QEMU packs compressed data into a live cluster, then a
    snapshot operation reopens every in-process target (in_separate_process), which lost
    what the engine had seen; a later write over the damaged compressed cluster fails on every
    side, QEMU's parallel pieces having written the next cluster where the engines stopped.
    The damage is remembered across the reopen: noted qemu-corrupt-live, not a divergence."""
    cfg = Config(version=3, cluster_size=65536, compression_type="zstd", backing="qcow2", size=524288)
    with Lockstep(tmp_path, cfg, ["model", "impl", "qemu"]) as ls:
        ls.write_compressed(off=196608, n=65536, byte=196)
        ls.write_zeroes(off=65536, n=196096, unmap=True)
        ls.write_compressed(off=131072, n=65536, seed=23968)
        ls.write_compressed(off=393216, n=65536, byte=51)
        ls.write(off=65024, n=131072, byte=90)
        ls.resize(new_size=523776, shrink=True)
        ls.snapshot_create(name="s0")
        ls.write_compressed(off=458752, n=65024, seed=65535)
        ls.write(off=458240, n=3113, byte=90)
        ls.write_random(off=461824, n=513, seed=2093)
        ls.finish()
        # The engines now write a host run and the later runs of a failed request as QEMU
        # does (data before COW, tasks started before any finishes), so they agree with
        # QEMU here and nothing is excused.
        assert not ls.oracle_broken, ls.notes
        assert "layout-identical: impl = qemu" in ls.notes, ls.notes


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_content_after_qemus_packing_damage_is_not_compared_with_qemu(tmp_path: Path) -> None:
    """Deep campaign seed 50074: QEMU packs compressed data into a live cluster, later writes
    hide the damage from qemu-img check, and the guest content at 81920 ends up different
    from the engines' (which agree with each other). The oracle is gone, as during the run:
    noted, and the engines are still held to each other."""
    cfg = Config(version=3, cluster_size=16384, size=131072, overlap_check="cached")
    with Lockstep(tmp_path, cfg, ["model", "impl", "qemu"]) as ls:
        ls.write_compressed(off=0, n=16384, byte=0)
        ls.write(off=1, n=16384, byte=90)
        ls.write_compressed(off=98304, n=16384, seed=165)
        ls.write_compressed(off=65536, n=16384, byte=51)
        ls.write_compressed(off=81920, n=16384, seed=255)
        ls.write_compressed(off=98304, n=16384, seed=14013)
        ls.write(off=66048, n=16385, byte=90)
        ls.write_compressed(off=65536, n=16384, seed=27799)
        ls.finish()
        # Agreement now (see the test above): the engines reproduce QEMU's content too.
        assert not any(n.startswith("qemu-corrupt-live: qemu's content") for n in ls.notes), ls.notes
        assert "layout-identical: impl = qemu" in ls.notes, ls.notes


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_failed_snapshot_apply_keeps_sizes_in_step(tmp_path: Path) -> None:
    """Found by ``make run`` (seed 16): with refcount_bits=2 applying a snapshot overflows a
    refcount and fails, after QEMU (and the model) restored the snapshot's virtual size."""
    ls = Lockstep(tmp_path, Config(version=3, cluster_size=4096, refcount_bits=2, backing="raw",
                                   backing_size="longer", size=153088), ["model", "qemu"])
    try:
        ls.resize(new_size=157184, shrink=False)
        ls.snapshot_create(name="s0")
        ls.write_zeroes(off=0, n=1, unmap=True)
        ls.snapshot_create(name="s0")
        assert not ls.snapshot_apply(name="s0")
        ls.resize(new_size=157696, shrink=False)
        assert not ls.snapshot_apply(name="s0")
        assert ls.size == 157184
        ls.finish()
    finally:
        ls.close()


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_disagreement_on_an_image_qemu_corrupted_is_a_note(tmp_path: Path) -> None:
    """Found by a deep campaign (seed 5025): QEMU packs the compressed cluster at 3072 into
    a host cluster it reuses, then runs the two pieces of the write at 3583 concurrently, so
    what it reads back depends on their order. Its own image fails qemu-img check by then:
    the example stops being compared and says why."""
    with Lockstep(tmp_path, Config(version=2, cluster_size=512, backing="raw", backing_size="same",
                                size=4096), ["model", "qemu"]) as ls:
        ls.write_compressed(off=0, n=512, byte=0)
        ls.write(off=3584, n=1, byte=0)
        ls.write_zeroes(off=0, n=513, unmap=False)
        ls.write_compressed(off=3072, n=512, byte=0)
        ls.write_zeroes(off=512, n=511, unmap=False)
        ls.write(off=3583, n=3, byte=0)
        ls.read(off=3584, n=2)
        ls.finish()
    # The two pieces are two write tasks; the engines now run the second after the first
    # failed, as QEMU does, so they read back what QEMU reads (no disagreement to excuse).
    assert not ls.oracle_broken, ls.notes


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_a_lazy_refcount_image_is_not_taken_for_a_corrupt_oracle(tmp_path: Path) -> None:
    """With lazy_refcounts QEMU keeps its refcount blocks in its cache across a flush, so
    its live file always fails ``qemu-img check -U``; a real disagreement on such an image
    was once excused as ``qemu-corrupt-live`` (the planted dropped byte went unnoticed).
    QEMU's image is judged after a close, which writes the refcounts."""
    cfg = Config(cluster_size=4096, size=65536, lazy_refcounts=True)
    with pytest.raises(Divergence) as found, \
            Lockstep(tmp_path, cfg, ["py:tests.difftest.test_difftest:faulty", "qemu"]) as ls:
        ls.write(off=4096, n=4096, byte=0x33)  # allocates: stale refcounts in qemu's live file
        ls.write(off=1, n=1000, byte=0x5A)  # the faulty target drops the last byte
    assert found.value.kind == "bytes"
    assert not ls.oracle_broken and not any(n.startswith("qemu-corrupt-live") for n in ls.notes)


def test_qemu_packing_into_a_live_cluster_ends_the_comparison(tmp_path: Path) -> None:
    """Found by a deep campaign (seed 9724, reduced from 84 steps): the fourth write is where
    QEMU packs compressed data into a live data cluster. Later writes replace the damage, so
    QEMU's file passes qemu-img check again when the targets disagree at the discard; the
    model says when it reproduced the packing, so the disagreement is excused all the same."""
    with Lockstep(tmp_path, Config(version=3, cluster_size=512, size=4096), ["model", "qemu"]) as ls:
        ls.write_compressed(off=2048, n=512, byte=0)
        ls.write(off=1536, n=788, byte=0)
        ls.write_random(off=3584, n=4, seed=212)
        assert not ls.targets[0].image.packed_into_live_cluster
        ls.write_compressed(off=0, n=512, byte=0)
        assert ls.targets[0].image.packed_into_live_cluster
        ls.write(off=3584, n=63, byte=0)
        ls.write_random(off=256, n=1852, seed=5954)
        ls.write_random(off=0, n=1024, seed=720)
        ls.discard(off=1536, n=511)
        ls.finish()
    # The packing is reproduced, and what follows now agrees with QEMU (the engines write a
    # host run as QEMU does), so nothing is excused.
    assert not ls.oracle_broken, ls.notes


def test_qemu_dropping_a_corrupt_image_ends_the_comparison(tmp_path: Path) -> None:
    """Found by a deep campaign (seed 9127): QEMU keeps packing compressed data after the
    offset it remembers, in a cluster that was freed and then became an L2 table; the
    overlap check refuses the write, on both sides, and flags the image corrupt. QEMU then
    drops the node: later requests fail with ENOMEDIUM and its dirty caches never reach the
    file, so nothing after that point can be compared (the model has no caches). Both files
    must carry the corrupt bit; the example ends with a note, not a divergence."""
    with Lockstep(tmp_path, Config(version=2, cluster_size=512, size=34816), ["model", "qemu"]) as ls:
        assert ls.write_compressed(off=0, n=512, byte=0)
        assert ls.write(off=0, n=1, byte=0)
        assert not ls.write_compressed(off=32768, n=512, byte=0)  # refused everywhere
        assert ls.oracle_broken
        assert not ls.flush() and not ls.read(off=0, n=1)  # no longer run or compared
        ls.finish()
    assert any(n.startswith("qemu-dropped") for n in ls.notes)


def test_the_corrupt_bit_in_one_file_only_is_a_divergence(tmp_path: Path) -> None:
    with Lockstep(tmp_path, Config(version=2, cluster_size=512, size=34816), ["model", "model2"]) as ls:
        ls.write_compressed(off=0, n=512, byte=0)
        ls.write(off=0, n=1, byte=0)
        # model2 detects the overlap but neither flags the image nor stops serving
        ls.targets[1].image.corrupt = lambda message: CorruptionError(message)
        with pytest.raises(Divergence, match="only some targets flagged the image corrupt"):
            ls.write_compressed(off=32768, n=512, byte=0)


class Plain:
    """A model image behind the bare Image interface, like a foreign ``py:`` target: the
    harness must compare it through read() and map() alone."""

    def __init__(self, img: Any) -> None:
        self.img = img
        self.size, self.cluster_size = img.size, img.cluster_size

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.img.read(off, n))

    def write(self, off: int, data: bytes) -> None:
        self.img.write(off, data)

    def discard(self, off: int, n: int) -> None:
        self.img.discard(off, n)

    def map(self, off: int = 0, n: int | None = None) -> list[dict[str, Any]]:
        return list(self.img.map(off, n))

    def flush(self) -> None:
        self.img.flush()

    def close(self) -> None:
        self.img.close()


class PlainModel:
    def __init__(self, drop_writes: bool = False) -> None:
        self.drop_writes = drop_writes

    def create(self, path: str, size: int, **kw: Any) -> None:
        import model
        model.create(path, size, **kw)

    def open(self, path: str, readonly: bool = False) -> Plain:
        import model
        img = Plain(model.open(path, readonly=readonly))
        if self.drop_writes:
            img.img.write = lambda off, data: None
        return img


plain = PlainModel()
drops_writes = PlainModel(drop_writes=True)
"""A write the plain side drops: it reads zeros as qemu does, but allocates nothing. A
``py:`` target runs in a worker process (difftest/adapters/isolation.py), so the bug is
planted in the adapter, not patched into the harness's copy."""


def test_each_target_is_asked_what_its_image_supports(tmp_path: Path) -> None:
    """The model shows its own block status (spec.interface.Introspectable), qemu-io answers
    its own commands, and a bare image is compared through the interface (the reference
    target here, so the top-layer allocation comes from its map())."""
    from difftest.core.introspect import EngineIntrospection, Introspection, QemuIntrospection

    with Lockstep(tmp_path, Config(version=3, cluster_size=4096, size=1 << 20),
                  ["py:tests.difftest.test_difftest:plain", "model", "qemu"]) as ls:
        assert [(t.name, type(t.introspection)) for t in ls.targets] == [
            ("plain", Introspection), ("model", EngineIntrospection), ("qemu", QemuIntrospection)]
        assert ls.write(off=4095, n=2, byte=0x5A) and ls.discard(off=0, n=8192)
        assert ls.read(off=0, n=12288)
        ls.finish()
    with Lockstep(tmp_path / "bad", Config(version=3, cluster_size=4096, size=1 << 20),
                  ["py:tests.difftest.test_difftest:drops_writes", "qemu"]) as ls, \
            pytest.raises(Divergence, match="top-layer allocation"):
        ls.write(off=0, n=4096, byte=0)


def test_config_rules_follow_qemu_img_create() -> None:
    with pytest.raises(ValueError):
        Config(version=2, extended_l2=True).validate()
    with pytest.raises(ValueError):
        Config(cluster_size=8192, extended_l2=True).validate()
    with pytest.raises(ValueError):
        Config(data_file=True, data_file_raw=True, backing="raw").validate()
    assert parse_overrides(["cluster_size=4k", "extended_l2=on", "backing=raw"]) == {
        "cluster_size": 4096, "extended_l2": True, "backing": "raw"}
    with pytest.raises(ValueError):
        parse_overrides(["nonsense=1"])


def test_cache_options_reach_impl_and_qemu_under_their_own_names() -> None:
    cfg = Config(cluster_size=4096, l2_cache_size=1024, l2_cache_entry_size=512, overlap_check="all")
    cfg.validate()
    assert cfg.open_options() == {"l2_cache_size": 1024, "l2_cache_entry_size": 512, "overlap_check": "all"}
    assert cfg.cache_size_options() == {"l2_cache_size": 1024, "l2_cache_entry_size": 512}
    assert cfg.qemu_open_options() == "l2-cache-size=1024,l2-cache-entry-size=512,overlap-check=all"
    assert not cfg.cache_defaults and Config().cache_defaults and Config().qemu_open_options() == ""
    for bad in (Config(cluster_size=4096, l2_cache_entry_size=8192), Config(l2_cache_entry_size=768),
                Config(overlap_check="some")):
        with pytest.raises(ValueError):
            bad.validate()
    assert parse_overrides(["l2_cache_size=2k", "refcount_cache_size=default"]) == {
        "l2_cache_size": 2048, "refcount_cache_size": None}


def test_qemu_io_keeps_its_open_options_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M"],
                   check=True)
    with qemuio.QemuImage(path, options="l2-cache-size=1024,l2-cache-entry-size=512") as img:
        img.write(0, b"\x5a" * 4096)
        img.reopen()  # ``open -o`` again, with the same options
        assert img.read(0, 4096) == b"\x5a" * 4096
    with pytest.raises(RequestError):  # QEMU's own validation: 768 is not a power of two
        qemuio.QemuImage(path, options="l2-cache-entry-size=768")


def test_layout_comparison_ignores_snapshot_dates_only(tmp_path: Path) -> None:
    from difftest.core.teardown import first_difference, snapshot_dates

    files = [tmp_path / "a.qcow2", tmp_path / "b.qcow2"]
    for f in files:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(f), "1M"], check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s", str(f)], check=True)
        time.sleep(0.01)  # a later creation time
    a, b = map(str, files)
    dates = snapshot_dates(a) + snapshot_dates(b)
    at = first_difference(a, b)
    assert len(dates) == 2 and at is not None and dates[0][0] <= at < dates[0][0] + 8
    assert first_difference(a, b, dates) is None
    with open(b, "r+b") as f:  # one more byte in one file: a real difference
        f.seek(0, 2)
        f.write(b"\x01")
    assert first_difference(a, b, dates) == Path(a).stat().st_size


def test_config_strategy_draws_only_valid_configs() -> None:
    from hypothesis import given, settings

    @settings(max_examples=60, database=None)
    @given(configs())
    def check(cfg: Config) -> None:
        cfg.validate()

    check()


# -- the qemu-io channel ------------------------------------------------------------------------

def test_qemu_image_opens_a_path_relative_to_the_callers_folder(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-io and qemu-img run in the image's folder (where QEMU 7.2 looks for a relative
    data file); a relative path of the caller's must still name the image there
    (``qcow2lab difftest --damaged --replay difftest-repro/.../case.json`` from the checkout
    had QEMU refuse every image)."""
    (tmp_path / "sub").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "sub" / "r.qcow2"), "1M"],
                   check=True)
    monkeypatch.chdir(tmp_path)
    with qemuio.QemuImage(Path("sub") / "r.qcow2") as img:
        img.write(0, b"\x5a" * 512)
        assert img.read(0, 512) == b"\x5a" * 512
        assert img.info()["virtual-size"] == 1 << 20  # qemu-img, in the image's folder too


def test_qemu_image_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M"],
                   check=True)
    img = qemuio.QemuImage(path)
    try:
        blob = bytes(range(256)) * 20 + b"tail"
        img.write(1000, blob)
        img.write(9000, b"\x5a" * 3000)
        assert img.read(1000, len(blob)) == blob
        assert img.matches(8000, b"\0" * 1000 + b"\x5a" * 3000 + b"\0" * 100)
        assert not img.matches(8000, b"\0" * 1000 + b"\x5a" * 2999 + b"\0" * 101)
        with pytest.raises(RequestError):
            img.write((1 << 20) - 1, b"ab")
        with pytest.raises(RequestError):
            img.read(1 << 20, 1)
        img.write_zeroes(0, 4096, unmap=True)
        assert img.read(1000, 8) == b"\0" * 8
        img.snapshot_create("s0")
        img.write(0, b"\x77" * 512)
        img.snapshot_apply("s0")
        assert img.read(0, 512) == b"\0" * 512
        assert [s["name"] for s in img.snapshots()] == ["s0"]
        img.resize(2 << 20)
        assert img.size == 2 << 20
        with pytest.raises(RequestError):
            img.resize(1 << 20)  # a shrink needs shrink=True, as qemu-img resize needs --shrink
        img.reopen()
        assert img.read(9000, 4) == b"\x5a" * 4
        top = img.present_runs()
        assert top[0][2] is True and sum(n for _, n, _ in top) == 2 << 20
    finally:
        img.close()


# -- the harness and the campaign -----------------------------------------------------------------

def test_run_shards_stops_at_the_deadline_with_shards_left(tmp_path: Path) -> None:
    """More shards than the budget allows: the running ones finish, the rest are dropped
    (this once waited forever for shards it would never start)."""
    shards = [Shard(["model", "model2"], seed=i, examples=1, steps=2, db_dir=None,
                    repro_dir=str(tmp_path / "r"), workdir=str(tmp_path / "w")) for i in range(6)]
    stats = run_shards(shards, jobs=2, deadline=time.monotonic() + 0.05)
    assert stats.shards <= 2  # at most the first two started
    assert stats.divergences == []


def test_lockstep_qemu_against_qemu_with_backing_chain(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, backing="qcow2x2", backing_size="shorter", size=4096 * 37 + 1536)
    ls = Lockstep(tmp_path, cfg, ["qemu", "qemu2"])
    try:
        ls.write(100, 5000, 0x11)
        ls.write_random(7000, 3000, 5)
        ls.write_zeroes(0, 4096, unmap=True)
        ls.discard(8192, 8192)
        ls.write_compressed(4096 * 5, 4096, byte=3)
        assert not ls.write_compressed(4096 * 5 + 512, 4096, byte=3)  # misaligned: both refuse
        ls.read(0, 50000)
        assert not ls.read(cfg.size, 10)  # past the end: both refuse
        ls.resize(cfg.size + 4096)
        ls.snapshot_create("s0")
        ls.write(0, 4096 * 3, 0x44)
        ls.snapshot_apply("s0")
        ls.reopen()
        ls.compare_map()
        ls.finish()
    finally:
        ls.close()
    assert ls.ops["write"] == 2


def test_campaign_qemu_against_qemu_never_diverges(tmp_path: Path) -> None:
    stats = run_shard(Shard(["qemu", "qemu2"], seed=20261121, examples=8, steps=15, db_dir=None,
                            repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "work")))
    assert stats.divergences == []
    assert stats.examples >= 8 and sum(stats.ops.values()) > 0


class DropsLastByte:
    """An injected bug: a qemu-backed target whose writes of more than one sector that do not
    start on a sector boundary lose their last byte. Exposed as ``create``/``open``
    like a package, to run as a ``py:`` target."""

    def create(self, path: str, size: int, **kw: Any) -> None:
        from difftest.core.targets import qemu_img_create
        cfg = Config(version=kw["version"], cluster_size=kw["cluster_size"],
                     refcount_bits=kw["refcount_bits"], extended_l2=kw["extended_l2"],
                     compression_type=kw["compression_type"], lazy_refcounts=kw["lazy_refcounts"],
                     size=size)
        backing = (kw["backing_file"], kw["backing_fmt"]) if kw.get("backing_file") else None
        p = Path(path)
        subprocess.run(qemu_img_create(p, cfg, backing), cwd=p.parent, check=True)

    def open(self, path: str, readonly: bool = False) -> qemuio.QemuImage:
        img = qemuio.QemuImage(path, readonly=readonly)
        real = img.write

        def write(off: int, data: bytes) -> None:
            if off % 512 and len(data) > 512:
                data = data[:-1]
            real(off, data)

        img.write = write  # type: ignore[method-assign]
        return img


faulty = DropsLastByte()


def test_injected_fault_is_found_shrunk_and_reproduced(tmp_path: Path) -> None:
    # Hypothesis' stateful shrinker does not always reach the minimum: for this fault seeds
    # 7..12 end at 9, 5, 10, 1, 1 and 2 steps (with the project's literals kept out of the
    # draws, see campaign.py). The seed is pinned to one that gets there.
    stats = run_shard(Shard(["py:tests.difftest.test_difftest:faulty", "qemu"], seed=10, examples=25,
                            steps=12,
                            overrides={"backing": "none", "data_file": False, "cluster_size": 4096,
                                       "version": 3},
                            db_dir=None, repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "w"),
                            finish=False, multiple_bugs=False))  # per-step checks find it; stay fast
    assert stats.divergences, "the dropped byte was not noticed"
    found = stats.divergences[0]
    assert found.kind == "bytes"
    assert 1 <= found.steps <= 6
    assert found.repro_dir is not None
    where = Path(found.repro_dir)
    body = (where / "test_repro.py").read_text()
    namespace: dict[str, Any] = {}
    exec(compile(body, str(where / "test_repro.py"), "exec"), namespace)
    with pytest.raises(Divergence):
        namespace["test_repro"](tmp_path / "replay")
    script = where / "repro.sh"
    run_dir = tmp_path / "sh"
    run_dir.mkdir()
    r = subprocess.run(["sh", str(script)], cwd=run_dir, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "No errors were found" in r.stdout


def test_example_database_replays_the_failure_first(tmp_path: Path) -> None:
    shard = Shard(["py:tests.difftest.test_difftest:faulty", "qemu"], seed=7, examples=25, steps=12,
                  overrides={"backing": "none", "data_file": False, "cluster_size": 4096, "version": 3},
                  db_dir=str(tmp_path / "db"), repro_dir=str(tmp_path / "repro"),
                  workdir=str(tmp_path / "w"), shrink=False, finish=False)
    first = run_shard(shard)
    assert first.divergences
    shard.seed, shard.examples = 99, 1  # a different seed and a single example: only the replay finds it
    again = run_shard(shard)
    assert again.divergences and again.divergences[0].kind == "bytes"


def test_reproducers_render_every_operation() -> None:
    cfg = Config(cluster_size=512, backing="raw", size=8192)
    log: list[tuple[str, dict[str, Any]]] = [
        ("write", {"off": 1, "n": 600, "byte": 0x11}), ("write_random", {"off": 0, "n": 10, "seed": 3}),
        ("write_zeroes", {"off": 0, "n": 512, "unmap": True}), ("discard", {"off": 0, "n": 512}),
        ("write_compressed", {"off": 512, "n": 512, "byte": 0}), ("read", {"off": 0, "n": 16}),
        ("flush", {}), ("resize", {"new_size": 4096, "shrink": True}), ("snapshot_create", {"name": "s0"}),
        ("snapshot_apply", {"name": "s0"}), ("snapshot_delete", {"name": "s0"}), ("reopen", {}),
        ("compare_map", {"off": 0, "n": None})]
    sh = shell_script(cfg, log)
    for needle in ("write -q -P 0x11 1 600", "randbytes(10)", "write -q -z -u 0 512", "discard -q 0 512",
                   "write -q -c -P 0x0 512 512", "read -v 0 16", "truncate 4096", "snapshot -c s0",
                   "snapshot -a s0", "snapshot -d s0", "base.raw"):
        assert needle in sh
    # Resizes run in the same qemu-io, as in the harness; a shrink without shrink=True is
    # refused before reaching qemu.
    grow = shell_script(cfg, [("resize", {"new_size": 16384, "shrink": False}),
                              ("resize", {"new_size": 4096, "shrink": False})])
    assert "truncate 16384" in grow and "truncate 4096" not in grow and "qemu-img resize" not in grow
    body = pytest_body(cfg, log, ["model", "qemu"])
    compile(body, "test_repro.py", "exec")
    assert "ls.snapshot_delete(name='s0')" in body and body.rstrip().endswith("ls.close()")


@pytest.mark.parametrize("overlap", ["cached", "all"])
def test_a_reproducer_with_snapshots_runs_through(tmp_path: Path, overlap: str) -> None:
    """repro.sh runs each snapshot operation as the harness does: qemu-img snapshot has no -f,
    so the image is named alone, or by --image-opts with its driver options; the script used
    to pass -f qcow2 and every snapshot line failed ('unrecognized option')."""
    cfg = Config(cluster_size=4096, size=65536, overlap_check=overlap)
    log: list[tuple[str, dict[str, Any]]] = [
        ("write", {"off": 0, "n": 4096, "byte": 0x11}), ("snapshot_create", {"name": "s0"}),
        ("write", {"off": 0, "n": 4096, "byte": 0x22}), ("snapshot_apply", {"name": "s0"}),
        ("snapshot_create", {"name": "s1"}), ("snapshot_delete", {"name": "s0"})]
    (tmp_path / "repro.sh").write_text(shell_script(cfg, log))
    r = subprocess.run(["bash", "-e", "repro.sh"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    listed = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / "top.qcow2")],
                            capture_output=True, text=True, check=True).stdout
    assert " s1 " in listed and " s0 " not in listed
    assert ("overlap-check=all" in r.stderr) == (overlap == "all")  # set -x shows each command
    top = str(tmp_path / "top.qcow2")
    data = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 4096", top],
                          capture_output=True, text=True, check=True).stdout
    assert "Pattern verification failed" not in data


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_difftest_json_clean_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["difftest", "--targets", "qemu,qemu2", "--examples", "3", "--steps", "6", "--seed", "3",
               "--db", "none", "--repro", str(tmp_path / "r"), "--config", "cluster_size=4k",
               "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["divergences"] == [] and out["examples"] >= 3
    assert set(out) >= {"ops", "ops_per_second", "configurations", "targets"}


def test_cli_difftest_exit_1_on_divergence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["difftest", "--targets", "py:tests.difftest.test_difftest:faulty,qemu", "--examples", "25",
               "--steps", "12", "--seed", "7", "--db", "none", "--repro", str(tmp_path / "r"), "--no-shrink",
               "--config", "cluster_size=4k", "--config", "backing=none", "--config", "data_file=off",
               "--config", "version=3", "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["divergences"]


def test_cli_refuses_fewer_than_two_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["difftest", "--targets", "qemu", "--examples", "1", "--db", "none", "--output", "json"]) == 1


def test_missing_qemu_is_announced_and_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    from difftest.cli.difftest import resolve_targets
    monkeypatch.setattr(qemuio, "available", lambda: False)
    said: list[str] = []
    assert resolve_targets("qemu,qemu2", said.append) == []
    assert len(said) == 2 and all("WARNING" in m and "qemu" in m for m in said)


# --- the backing chain's set-up ------------------------------------------------------------

def test_a_large_backing_layer_carries_the_pattern_around_every_edge_point() -> None:
    from difftest.core.config import edge_points
    from difftest.core.targets import FULL_PATTERN_MAX, pattern_spans

    small = Config(cluster_size=4096, size=2 << 20, backing="qcow2")
    assert pattern_spans(small, small.backing_bytes) == [(0, small.backing_bytes)]
    big = Config(cluster_size=65536, size=(512 << 20) + 3 * 65536 + 512, backing="qcow2")
    spans = pattern_spans(big, big.backing_bytes)
    assert sum(n for _o, n in spans) < FULL_PATTERN_MAX  # the point: far less than 512 MiB
    for (o1, n1), (o2, _n2) in itertools.pairwise(spans):
        assert o1 + n1 < o2  # sorted, disjoint, merged
    assert all(o % 512 == 0 and n % 512 == 0 for o, n in spans)
    for p in edge_points(big, big.size):
        # a request drawn near p (a sector below, up to 4 clusters long) lies in one span
        lo, hi = max(0, p - 512), min(big.backing_bytes, p + 4 * big.cluster_size)
        if lo < hi:
            assert any(o <= lo and hi <= o + n for o, n in spans), p


def test_backing_chains_are_built_once_and_copied_sparse(tmp_path: Path) -> None:
    import os

    from difftest.core.targets import backing_plan, build_backing, cached_backing, copy_backing

    cfg = Config(cluster_size=4096, size=(48 << 20) + 512, backing="raw")  # above FULL_PATTERN_MAX
    cache = tmp_path / "cache"
    cache.mkdir()
    where, top = cached_backing(cfg, cache)
    assert top == ("base.raw", "raw")
    stamp = (where / "base.raw").stat().st_mtime_ns
    assert cached_backing(cfg, cache) == (where, top)
    assert (where / "base.raw").stat().st_mtime_ns == stamp  # not rebuilt
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    build_backing(cfg, fresh)
    assert (fresh / "base.raw").read_bytes() == (where / "base.raw").read_bytes()
    dst = tmp_path / "t"
    dst.mkdir()
    copy_backing(cfg, where, dst)
    for name, _fmt, size, _cmds in backing_plan(cfg):
        assert (dst / name).read_bytes() == (where / name).read_bytes()
        assert os.stat(dst / name).st_blocks * 512 < size // 4  # holes stayed holes


def test_bench_difftest_runs_end_to_end() -> None:
    """The throughput benchmark steps every target set it can (figures are printed, never
    asserted: DESIGN.md), run as a user runs it."""
    argv = ["bench", "difftest", "--ops", "60", "--rounds", "3", "--no-campaign", "--output", "json"]
    r = subprocess.run([sys.executable, "-m", "difftest.cli", *argv], capture_output=True, text=True,
                       check=True)
    rows = json.loads(r.stdout)
    sets = [row["steady"]["targets"] for row in rows]
    assert ["model", "model2"] in sets and ["model", "qemu"] in sets
    for row in rows:
        assert row["steady"]["ops"] == 60 and len(row["steady"]["rounds"]) == 3
        assert row["steady"]["ops_per_second"] == sorted(row["steady"]["rounds"])[1]


def test_a_campaign_draws_nothing_from_the_projects_literals(tmp_path: Path) -> None:
    """Hypothesis draws some values from the literals of whatever project modules are
    imported; a campaign switches that off, so its seed alone decides its examples (the
    mutant tests shrank to 6 steps or 10 depending on what an earlier test had imported)."""
    from hypothesis.internal.conjecture import providers

    import difftest.bench.harness  # noqa: F401 - a local module full of literals
    seen: list[int] = []

    def on_event(kind: str, value: Any) -> None:
        if kind == "step":
            seen.append(len(providers._get_local_constants()))

    outside = providers._get_local_constants
    run_shard(Shard(["model", "model2"], seed=3, examples=2, steps=3, db_dir=None,
                    repro_dir=str(tmp_path / "r"), workdir=str(tmp_path / "w"), finish=False), on_event)
    assert seen and set(seen) == {0}
    assert providers._get_local_constants is outside and len(outside()) > 0
