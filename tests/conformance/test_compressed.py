"""Compressed clusters: packing several into host clusters, QEMU's end-of-stream write, and
the order in which QEMU refuses a compressed write."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from spec.entries import compressed_range
from spec.errors import Qcow2Error, RequestError, UnsupportedFeature
from tests.conformance.helpers import (
    KiB,
    MiB,
    Step,
    check_without_name,
    clean,
    l2_entry,
    pair,
    qemu_io_fails,
    qemu_io_failures,
    run_steps,
)
from tests.qemu import qemu_io, raw_content


def test_compressed_data_crossing_a_host_cluster_boundary(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    engine.create(path, 4 * MiB, cluster_size=4096)
    rng = random.Random(7)
    clusters = [bytes(rng.choice(b"abcdefgh") for _ in range(4096)) for _ in range(6)]
    with engine.open(path) as img:
        for i, data in enumerate(clusters):
            img.write_compressed(i * 4096, data)
    entries = [l2_entry(path, i * 4096) for i in range(6)]
    crossing = [e for e in entries
                if (compressed_range(e, 12)[0] % 4096) + compressed_range(e, 12)[1] > 4096]
    assert crossing, "no compressed cluster crosses a host cluster boundary"
    assert raw_content(path)[:6 * 4096] == b"".join(clusters)
    with engine.open(path, readonly=True) as img:
        assert img.read(0, 6 * 4096) == b"".join(clusters)
    assert clean(path)


def test_empty_compressed_write_pads_the_file_to_a_sector_like_qemu(engine: ModuleType,
                                                                    tmp_path: Path) -> None:
    """qcow2_co_pwritev_compressed_part takes a 0-byte compressed write as the end of a
    compressed stream: it truncates the host file to its length in whole sectors. Packed
    compressed data leaves the file ending mid-sector, so the file grows to the next 512.
    The model once refused the request (RequestError) where QEMU succeeds."""
    q, m = pair(tmp_path, "", "", 64 * KiB, cluster_size=4096)
    data = bytes(range(256)) * 8 + bytes(2048)
    (tmp_path / "c.bin").write_bytes(data)
    qemu_io(q, "write -q -c -s c.bin 4096 4096")
    shutil.copyfile(q, m)
    assert q.stat().st_size % 512  # the compressed bytes end mid-sector
    qemu_io(q, "write -q -c -P 0 8192 0")
    with engine.open(m) as img:
        img.write_compressed(8192, b"")
        assert img.read(4096, 4096) == data
    assert q.stat().st_size % 512 == 0
    assert m.read_bytes() == q.read_bytes()
    assert clean(m)


@pytest.mark.parametrize(("offset", "n", "error"), [
    (0, 0, UnsupportedFeature),     # the data file check comes before the empty-write case
    (0, 512, UnsupportedFeature),
    (1, 512, RequestError),         # qemu-io refuses a write -c that is not sector-aligned
    (512, 100, RequestError),
])
def test_compressed_write_checks_in_qemus_order_with_a_data_file(
        engine: ModuleType, tmp_path: Path, offset: int, n: int, error: type[Qcow2Error]) -> None:
    q, m = pair(tmp_path, "", "", 8 * KiB, cluster_size=1024, data_file="data.raw")
    msg = qemu_io_fails(q, f"write -c -P 0 {offset} {n}")
    assert ("not supported" in msg.lower()) == (error is UnsupportedFeature)
    engine.create(m, 8 * KiB, cluster_size=1024, data_file=str(tmp_path / "mdata.raw"))
    with engine.open(m) as img, pytest.raises(error):
        img.write_compressed(offset, bytes(n))


def test_compressed_packing_into_reused_cluster_corrupts_like_qemu(engine: ModuleType,
                                                                   tmp_path: Path) -> None:
    """QEMU 7.2 (one qemu-io process) packs a compressed cluster into a host cluster that was
    freed and reused for data: qemu-img check then reports an OFLAG_COPIED error. An engine
    reproduces it on purpose, in one open, and leaves the same file (a difftest seed-0
    divergence of the quick profile, here without the tester). The compressed writes to
    clusters already allocated fail in both."""
    q, m = pair(tmp_path, "", "", 32768, cluster_size=4096, lazy_refcounts=False)
    steps: list[Step] = [
        ("compress", 0, 4096, 0), ("flush", 0, 0, 0), ("write", 16384, 1, 0), ("compress", 0, 4096, 0),
        ("zero", 0, 293, 0), ("compress", 4096, 4096, random.Random(29).randbytes(4096)),
        ("zero", 0, 4608, 0), ("write", 4096, 4095, 255),
        ("compress", 0, 4096, random.Random(7834).randbytes(4096)),
        ("compress", 28672, 4096, random.Random(168).randbytes(4096)),
        ("compress", 4096, 4096, random.Random(23213).randbytes(4096)), ("compress", 12288, 4096, 196)]
    with engine.open(m) as img:
        cmds, refused = run_steps(img, tmp_path, steps)
    assert refused
    assert qemu_io_failures(q, *cmds) == refused
    cq = check_without_name(q)
    assert cq["corruptions"] == 1
    assert check_without_name(m) == cq
    assert m.read_bytes() == q.read_bytes()


def _zstd_image_with_frames(tmp_path: Path, payload: bytes) -> tuple[Path, Path]:
    """A zstd image (qemu-img) whose first cluster is compressed, with the compressed bytes
    then replaced by ``payload`` (padded with zeros to the descriptor's length); ``q`` for
    qemu-io and ``m`` for the engine."""
    q, m = pair(tmp_path, "", "", 1 * MiB, compression_type="zstd")
    rng = random.Random(5)
    # Half random: it compresses to a little over 32 KiB, room for any payload below.
    data = bytes(rng.getrandbits(8) for _ in range(36 * KiB)) + bytes(28 * KiB)
    (tmp_path / "c.bin").write_bytes(data)
    qemu_io(q, "write -q -c -s c.bin 0 64k", "write -q -P 0x11 64k 64k")
    coff, csize = compressed_range(l2_entry(q, 0), 16)
    assert len(payload) <= csize
    with open(q, "r+b") as f:
        f.seek(coff)
        f.write(payload.ljust(csize, b"\0"))
    shutil.copyfile(q, m)
    return q, m


def test_zstd_frame_bigger_than_a_cluster_fails_the_read_in_bounded_memory(
        engine: ModuleType, tmp_path: Path) -> None:
    """A 32 KiB zstd frame claiming 1 GiB of zeros: QEMU decodes into a one-cluster buffer
    and fails the read (-EIO) without flagging the image (block/qcow2-threads.c
    qcow2_zstd_decompress). Both engines once decoded the whole frame (1 GiB of RSS)."""
    import resource

    import zstandard

    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))
    too_big = zstandard.ZstdCompressor().compress(b"z" * (64 * KiB + 1))
    for payload in (bomb, too_big):
        q, m = _zstd_image_with_frames(tmp_path, payload)
        assert qemu_io_failures(q, "read 0 64k", "read -P 0x11 64k 64k") == 1
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with engine.open(m) as img:
            with pytest.raises(Qcow2Error):
                img.read(0, 64 * KiB)
            assert img.read(64 * KiB, 64 * KiB) == b"\x11" * 64 * KiB
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
        assert check_without_name(m) == check_without_name(q)


def test_zstd_cluster_in_two_frames_reads_like_qemu(engine: ModuleType, tmp_path: Path) -> None:
    """QEMU reads frames one after another until the cluster is full, so a cluster stored
    as two frames (another writer's choice) reads back whole; the bytes after them are
    ignored."""
    import zstandard

    half = [bytes([i]) * (32 * KiB) for i in (0x21, 0x22)]
    frames = b"".join(zstandard.ZstdCompressor().compress(h) for h in half)
    q, m = _zstd_image_with_frames(tmp_path, frames)
    assert qemu_io_failures(q, "read -P 0x21 0 32k", "read -P 0x22 32k 32k") == 0
    with engine.open(m) as img:
        assert img.read(0, 64 * KiB) == b"".join(half)


def _make_undecodable(q: Path, guest: int) -> None:
    """Overwrite the compressed data of the 4 KiB cluster at ``guest`` so it no longer decodes."""
    coff, _ = compressed_range(l2_entry(q, guest), 12)
    with open(q, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * 16)  # BTYPE 11: not a deflate stream


def test_failed_cow_of_a_run_keeps_the_data_written_first_like_qemu(engine: ModuleType,
                                                                    tmp_path: Path) -> None:
    """A write over an allocated cluster and a compressed one that does not decode, whose new
    cluster lands right after the allocated one: QEMU maps both as one host run, so it does
    not merge the data with the COW (merge_cow needs the run to be the one piece) and writes
    the run's data first; the COW read then fails (EIO) and the new cluster is given back.
    The allocated cluster keeps the new bytes and the freed one holds its byte (difftest
    seed 110061, where an engine read first and wrote nothing)."""
    q, m = pair(tmp_path, "", "", 64 * KiB, cluster_size=4096)
    qemu_io(q, "write -q -c -P 1 4096 4096", "write -q -P 2 0 4096")
    _make_undecodable(q, 4096)
    host0 = l2_entry(q, 0) & ((1 << 56) - 512)
    assert host0 + 4096 == q.stat().st_size  # the next cluster is free: one host run
    shutil.copyfile(q, m)
    assert "Input/output error" in qemu_io_fails(q, "write -q -P 7 3584 513")
    with engine.open(m) as img, pytest.raises(Qcow2Error):
        img.write(3584, b"\x07" * 513)
    assert m.read_bytes() == q.read_bytes()
    qemu_io(q, "read -q -P 2 0 3584", "read -q -P 7 3584 512")
    assert q.read_bytes()[host0 + 4096] == 7


def test_failed_cow_does_not_stop_the_requests_later_runs_like_qemu(engine: ModuleType,
                                                                    tmp_path: Path) -> None:
    """A write over a compressed cluster that does not decode and then an allocated cluster
    elsewhere on the host: two runs, which QEMU starts as concurrent write tasks. The first
    fails its COW read (EIO), the second still writes its data in place, and the request
    fails (deep seed 130192, where both engines stopped at the first run)."""
    q, m = pair(tmp_path, "", "", 64 * KiB, cluster_size=4096)
    qemu_io(q, "write -q -P 2 8192 4096", "write -q -c -P 1 4096 4096")
    _make_undecodable(q, 4096)
    shutil.copyfile(q, m)
    assert "Input/output error" in qemu_io_fails(q, "write -q -P 7 7680 1024")
    with engine.open(m) as img, pytest.raises(Qcow2Error):
        img.write(7680, b"\x07" * 1024)
    assert m.read_bytes() == q.read_bytes()
    qemu_io(q, "read -q -P 7 8192 512", "read -q -P 2 8704 3584")
