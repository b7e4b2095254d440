"""Snapshot operations under ``overlap_check=all`` (deep seeds 70003 and 70005).

In that mode QEMU 7.2 checks writes against the snapshots' (inactive) L2 tables, so on a
valid image it refuses its own write-back of an L2 table that a new snapshot shares, and
flags the image: a later ``snapshot -a`` or ``snapshot -d`` fails ("overlaps with inactive
L2 table"). The qemu side runs snapshots through ``qemu-img snapshot``, which must get the
image's driver options (it ran with the default mode before, and disagreed with the impl);
the model implements no mode but "cached" and sits "all" out (difftest/core/targets.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from difftest.core import qemuio
from difftest.core.config import Config
from difftest.core.lockstep import Lockstep

pytestmark = pytest.mark.skipif(not qemuio.available(), reason="qemu-io is the oracle")


def test_apply_refused_on_a_v3_image_flags_every_side(tmp_path: Path) -> None:
    cfg = Config(version=3, cluster_size=512, backing="raw", size=34816, overlap_check="all")
    ls = Lockstep(tmp_path, cfg, ["model", "impl", "qemu"])
    try:
        assert [t.name for t in ls.targets] == ["impl", "qemu"]
        assert any(n.startswith("target-skipped: model") for n in ls.notes)
        assert ls.snapshot_create(name="s0")
        ls.write_random(off=1024, n=513, seed=284)
        assert ls.snapshot_create(name="s1")
        assert not ls.snapshot_apply(name="s0")  # refused alike: CorruptionError on both
        assert ls.oracle_broken
        assert any(n.startswith("qemu-dropped") for n in ls.notes)
        ls.finish()
    finally:
        ls.close()


def test_delete_refused_on_a_v2_image_reopens_on_every_side(tmp_path: Path) -> None:
    # A v2 header has no corrupt bit: both sides reopen the image and go on alike.
    cfg = Config(version=2, cluster_size=1024, backing="qcow2", size=134656, overlap_check="all")
    ls = Lockstep(tmp_path, cfg, ["impl", "qemu"])
    try:
        ls.write_zeroes(off=536, n=2048, unmap=True)
        assert ls.snapshot_create(name="s1")
        assert ls.snapshot_create(name="s0")
        ls.write(off=1536, n=2560, byte=0)
        assert not ls.snapshot_delete(name="s1")
        assert not ls.oracle_broken
        ls.write(off=0, n=4096, byte=0x5A)
        ls.read(0, 8192)
        ls.finish()
    finally:
        ls.close()


@pytest.mark.parametrize("mode", ["cached", "none"])
def test_the_model_runs_the_modes_a_valid_image_cannot_tell_apart(tmp_path: Path, mode: str) -> None:
    cfg = Config(version=3, cluster_size=512, size=34816, overlap_check=mode)
    ls = Lockstep(tmp_path, cfg, ["model", "impl"])
    try:
        assert [t.name for t in ls.targets] == ["model", "impl"]
    finally:
        ls.close()


def test_a_map_after_qemus_refused_apply_on_v2_is_a_note(tmp_path: Path) -> None:
    """Deep seed 100080: the refused apply leaves a v2 image (no corrupt bit, so both sides
    reopen it) with an L2 table a snapshot shares marked COPIED; the flush before qemu-img
    map then refused its write-back and flagged QEMU's image. QEMU's file is corrupt by its
    own doing from the apply on (next test), so the comparisons end there, noted, and the
    map compares nothing."""
    cfg = Config(version=2, cluster_size=65536, backing="qcow2", size=537068032, overlap_check="all")
    ls = Lockstep(tmp_path, cfg, ["model", "impl", "qemu"])
    try:
        ls.write(off=65536, n=79770, byte=0)
        assert ls.snapshot_create(name="s1")
        ls.write_compressed(off=47513600, n=65536, seed=1625)
        assert ls.snapshot_create(name="s0")
        assert not ls.snapshot_apply(name="s1")
        assert ls.oracle_broken
        assert any(n.startswith("qemu-corrupt: QEMU's failed snapshot_apply") for n in ls.notes), ls.notes
        ls.write_compressed(off=0, n=65536, seed=575)
        ls.compare_map(off=0, n=513)
        ls.finish()
    finally:
        ls.close()


def test_apply_refused_half_way_on_a_v2_image_ends_the_comparisons(tmp_path: Path) -> None:
    """Deep seed 110087: on a v2 image qemu-img's apply writes the active L1 table with the
    COPIED flags the snapshot kept, then its -1 pass refuses its own L2 write-back; QEMU's
    file is left with an L2 table of refcount 2 marked COPIED, which the impl does not copy.
    QEMU then writes into the shared table and loses the write at close, so the example
    stops comparing (qemu-corrupt) instead of reporting a difference in bytes."""
    cfg = Config(version=2, cluster_size=16384, backing="raw", size=33604096, overlap_check="all")
    ls = Lockstep(tmp_path, cfg, ["impl", "qemu"])
    try:
        ls.write_compressed(off=4456448, n=16384, byte=196)
        assert ls.snapshot_create(name="s0")
        ls.write_compressed(off=4145152, n=16384, seed=645)
        assert ls.snapshot_create(name="s0")
        assert not ls.snapshot_apply(name="s0")
        assert ls.oracle_broken
        assert any(n.startswith("qemu-corrupt: QEMU's failed snapshot_apply") for n in ls.notes)
        ls.write_compressed(off=5898240, n=16384, byte=196)
        ls.reopen()
        ls.finish()
    finally:
        ls.close()
