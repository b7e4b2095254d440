"""Model-specific regressions: the ones that need the model's internals, or that drive the
model through difftest's Lockstep.

The guest-visible regressions against qemu-io, written once for every engine, are in
tests/conformance/ (the Lockstep cases below have direct engine-against-qemu-io versions
there too). What stays here: the Lockstep runs (they test the tester's handling as much as
the model), the fsync a flush costs (the model has no I/O counters yet; impl asserts its
flushes through ``stats()``), and the model's own record of a preallocated-looking layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import model
from spec.errors import RequestError, UnsupportedFeature
from tests.conformance.helpers import MiB, backing_with_holes_in_refcounted_clusters, mask_snapshot_dates
from tests.qemu import qemu_img


def _check(path: Path) -> dict[str, object]:
    return json.loads(qemu_img("check", "--output=json", str(path), check=False, cwd=path.parent).stdout)


def _map(path: Path) -> object:
    return json.loads(qemu_img("map", "--output=json", str(path), cwd=path.parent).stdout)


# --- difftest seed-0 divergences (quick profile): compressed writes vs the process model ------

def _lockstep(tmp: Path, **cfg: Any) -> Any:
    from difftest.core.config import Config
    from difftest.core.lockstep import Lockstep

    base = dict(version=3, refcount_bits=16, extended_l2=False, compression_type="zlib",
                backing="none", backing_size="same", data_file=False, data_file_raw=False)
    return Lockstep(tmp, Config(**{**base, **cfg}), ["model", "qemu"])


def test_snapshot_op_resets_compressed_packing_like_qemu_img_snapshot(tmp_path: Path) -> None:
    # qemu's side runs ``qemu-img snapshot`` between two qemu-io opens, so QEMU's
    # free_byte_offset (qcow2_alloc_bytes) starts again after it; the model target is closed
    # and reopened around the operation the same way. Before, the model packed the next
    # compressed cluster after the old offset, inside the snapshot's L1 table, and failed
    # with CorruptionError where QEMU succeeded.
    ls = _lockstep(tmp_path, cluster_size=65536, lazy_refcounts=True, size=524288)
    try:
        ls.write_compressed(off=458752, n=65536, byte=0)
        ls.write_zeroes(off=458752, n=65536, unmap=False)
        ls.snapshot_create(name="s0")
        ls.write(off=134656, n=1, byte=0)
        ls.write_compressed(off=262144, n=65536, byte=196)
        ls.finish()  # map, qemu-img check, rules, qemu-img compare, cross reads
    finally:
        ls.close()
    model_file = (tmp_path / "model" / "top.qcow2").read_bytes()
    qemu_file = (tmp_path / "qemu" / "top.qcow2").read_bytes()
    assert mask_snapshot_dates(tmp_path / "model" / "top.qcow2") == \
        mask_snapshot_dates(tmp_path / "qemu" / "top.qcow2")
    assert len(model_file) == len(qemu_file)


def test_lazy_refcount_map_sees_written_refcounts_like_qemu(tmp_path: Path) -> None:
    # With lazy_refcounts QEMU's flush keeps refcount blocks in its cache, so a
    # ``qemu-img map -U`` of the live file saw stale refcounts and decided differently in
    # qcow2_detect_metadata_preallocation (zero=true,data=true vs data only at the tail of a
    # partly written cluster). compare_map now closes and reopens every target first.
    ls = _lockstep(tmp_path, cluster_size=65536, lazy_refcounts=True, size=524288)
    try:
        ls.write_compressed(off=0, n=65536, byte=0)
        ls.flush()
        ls.write(off=262144, n=153382, byte=0)
        ls.write_compressed(off=0, n=65536, byte=0)
        assert ls.compare_map()
        ls.finish()
    finally:
        ls.close()
    assert _map(tmp_path / "model" / "top.qcow2") == _map(tmp_path / "qemu" / "top.qcow2")


def test_compressed_packing_into_reused_cluster_corrupts_like_qemu(tmp_path: Path) -> None:
    # QEMU 7.2 (one qemu-io process) packs a compressed cluster into a host cluster that was
    # freed and reused for data: qemu-img check then reports an OFLAG_COPIED error. The model
    # reproduces it on purpose; the tester counts identical corruption as agreement.
    ls = _lockstep(tmp_path, cluster_size=4096, lazy_refcounts=False, size=32768)
    try:
        ls.write_compressed(off=0, n=4096, byte=0)
        ls.flush()
        ls.write(off=16384, n=1, byte=0)
        ls.write_compressed(off=0, n=4096, byte=0)
        ls.write_zeroes(off=0, n=293, unmap=False)
        ls.write_compressed(off=4096, n=4096, seed=29)
        ls.write_zeroes(off=0, n=4608, unmap=False)
        ls.write(off=4096, n=4095, byte=255)
        ls.write_compressed(off=0, n=4096, seed=7834)
        ls.write_compressed(off=28672, n=4096, seed=168)
        ls.write_compressed(off=4096, n=4096, seed=23213)
        ls.write_compressed(off=12288, n=4096, byte=196)
        ls.finish()
    finally:
        ls.close()
    checks = {name: _check(tmp_path / name / "top.qcow2") for name in ("model", "qemu")}
    for c in checks.values():
        c.pop("filename", None)
    assert checks["qemu"]["corruptions"] == 1
    assert checks["model"] == checks["qemu"]
    assert any(n.startswith("qemu-corrupt") for n in ls.notes)


def test_unaligned_compressed_write_with_data_file_is_unsupported_like_qemu(tmp_path: Path) -> None:
    # qcow2_co_pwritev_compressed_part checks for a data file before the alignment, so a
    # half-cluster compressed write fails with ENOTSUP in QEMU, not EINVAL.
    ls = _lockstep(tmp_path, cluster_size=1024, lazy_refcounts=False, size=8192, data_file=True)
    try:
        ls.write_compressed(off=0, n=1024, byte=0)
        ls.write_compressed(off=0, n=512, byte=0)
        ls.finish()
    finally:
        ls.close()
    img = model.open(str(tmp_path / "model" / "top.qcow2"))
    try:
        with pytest.raises(UnsupportedFeature):
            img.write_compressed(0, bytes(512))
    finally:
        img.close()


# --- the model's own bookkeeping ---------------------------------------------------------------

@pytest.mark.parametrize(("cache", "fsyncs"), [("writeback", 1), ("none", 1), ("unsafe", 0)])
def test_flush_fsyncs_unless_cache_unsafe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          cache: str, fsyncs: int) -> None:
    """cache="unsafe" is qemu-io -t unsafe (BDRV_O_NO_FLUSH): the difftest runs every target
    in it, so the model's flush must then skip the fsync, and only then; so must the
    barriers between dependent writes (model/state.py ModelFile)."""
    path = tmp_path / "f.qcow2"
    model.create(path, 1 << 20)
    calls: list[int] = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    with model.open(path, cache=cache) as img:
        img.write(0, b"x" * 512)
        barriers = len(calls)
        img.flush()
        assert len(calls) - barriers == fsyncs
        assert (barriers > 0) == (fsyncs > 0)
    with model.open(path, readonly=True) as img:
        assert img.read(0, 512) == b"x" * 512


def test_backing_file_with_holes_is_taken_for_preallocated(tmp_path: Path) -> None:
    """The model's record of QEMU's decision (BDRVQcow2State.metadata_preallocation) behind
    test_is_zero_sees_holes_under_a_backing_file_that_looks_preallocated
    (tests/conformance/test_zero_discard.py): the backing layer with holes in its
    refcounted clusters looks preallocated, decided at the first block-status query."""
    backing_with_holes_in_refcounted_clusters(tmp_path)
    path = tmp_path / "m.qcow2"
    model.create(path, 8 * MiB, cluster_size=2 * MiB, extended_l2=True, backing_file="base.qcow2",
                 backing_fmt="qcow2")
    with model.open(path) as img:
        assert img.backing.metadata_preallocation is None  # type: ignore[union-attr]
        img.write_zeroes(196708, 65536)
        assert img.backing.metadata_preallocation is True  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["none", "constant", "all"])
def test_overlap_check_modes_the_model_does_not_implement_are_refused(tmp_path: Path, mode: str) -> None:
    """DESIGN.md: a behaviour-changing option an engine does not implement is refused with
    RequestError, never accepted and ignored; the model implements QEMU's default, cached."""
    path = tmp_path / "m.qcow2"
    model.create(path, 1 << 20)
    with pytest.raises(RequestError):
        model.open(path, overlap_check=mode)
    with model.open(path, overlap_check="cached") as img:
        img.write(0, b"x")
