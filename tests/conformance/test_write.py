"""Allocating writes: copy-on-write (what perform_cow reads, and when), freeing the clusters
a write replaces, and refcount structures that grow as data does."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from spec import features as ft
from spec.entries import compressed_range
from spec.errors import CorruptionError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, clean, l2_entry, pair
from tests.qemu import create as qemu_create
from tests.qemu import qemu_io, raw_content


def _with_undecodable_compressed_cluster(tmp: Path) -> tuple[Path, Path]:
    """Two copies of a 4 KiB-cluster image whose guest cluster 1 is compressed but whose
    compressed bytes are garbage: reading it fails with EIO in QEMU. Its neighbours are
    compressed clusters that decode, so COW regions there are not zero (handle_alloc_space
    would otherwise skip the COW reads)."""
    q, m = pair(tmp, "", "", 64 * KiB, cluster_size=4096)
    qemu_io(q, "write -q -c -P 0x33 0 4096", "write -q -c -P 0x11 4096 4096",
            "write -q -c -P 0x33 8192 4096")
    coff, csize = compressed_range(l2_entry(q, 4096), 12)
    with open(q, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * csize)
    shutil.copyfile(q, m)
    return q, m


@pytest.mark.parametrize(("offset", "n", "fails"), [
    (4096, 4096, False),          # the cluster is overwritten whole: no COW, nothing read
    (100, 8192, True),            # COW head and tail, 8 KiB between: one read across it
    (100, 24576, False),          # more than 16 KiB between: two reads, around it
    (4096, 4000, True),           # COW tail inside the cluster itself
])
def test_cow_reads_only_what_perform_cow_reads_like_qemu(
        engine: ModuleType, tmp_path: Path, offset: int, n: int, fails: bool) -> None:
    """perform_cow reads the COW regions of an allocation (nothing when there are none; one
    read spanning the new data when both exist and at most 16 KiB lie between). The model
    once read the whole range, so overwriting an undecodable compressed cluster whole failed
    in the model only (seed 6 of the quick profile)."""
    q, m = _with_undecodable_compressed_cluster(tmp_path)
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x22 {offset} {n}", str(q)],
                       capture_output=True, text=True)
    assert ("Input/output error" in r.stdout + r.stderr) == fails
    with engine.open(m) as img:
        if fails:
            with pytest.raises(CorruptionError):
                img.write(offset, b"\x22" * n)
        else:
            img.write(offset, b"\x22" * n)
            assert img.read(offset, n) == b"\x22" * n
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


def test_cow_past_the_image_end_is_copied_not_zeroed_like_qemu(engine: ModuleType, tmp_path: Path) -> None:
    """handle_alloc_space asks bdrv_co_is_zero_fast, not is_zero, whether a COW region is
    zero: one block-status answer, no clamp to the image end. A write up to the end of an
    unaligned image over a compressed cluster therefore copies the cluster's tail past the
    end (perform_cow), and growing the image shows it. The model's check once clamped the
    region away, took the zeroing shortcut, and showed zeros there (deep seed 222)."""
    q, m = pair(tmp_path, "", "", 128 * KiB, cluster_size=16 * KiB, extended_l2=True)
    data = bytes(range(256)) * 126  # 32256 bytes: [48 KiB, 81408), the new image end
    (tmp_path / "d.bin").write_bytes(data)
    qemu_io(q, "write -q -c -P 0xc4 65536 16384", "truncate 81408", "write -q -s d.bin 49152 32256",
            "truncate 130560")
    with engine.open(m) as img:
        img.write_compressed(65536, b"\xc4" * 16384)
        img.resize(81408, shrink=True)
        img.write(49152, data)
        img.resize(130560)
        assert img.read(81408, 512) == b"\xc4" * 512
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)


def test_clusters_a_write_replaces_are_freed_after_the_whole_request_like_qemu(
        engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_co_pwritev_part allocates every piece of a request before its write tasks link
    the L2 entries and free the clusters they replace. The model once freed the old
    compressed cluster after the first piece, the third piece reused it, and a later
    compressed write packed its bytes into that (now data) cluster: METADATA-NO-OVERLAP
    broken in the model's file only (deep seed 205)."""
    mb2 = 2 * MiB
    q, m = pair(tmp_path, "", "", 16 * MiB, cluster_size=mb2, refcount_bits=64, extended_l2=True,
                compression_type="zstd")
    rnd = random.Random(65536).randbytes(999)
    (tmp_path / "r.bin").write_bytes(rnd)
    qemu_io(q, f"truncate {9 * mb2}", f"write -q -c -P 0x33 {8 * mb2} {mb2}", f"truncate {10 * mb2 + 512}",
            f"write -q -s r.bin {9 * mb2 + 513} 999", f"truncate {11 * mb2 + 512}",
            f"write -q -P 0xff {8 * mb2 + 512} {2 * mb2}", f"write -q -c -P 0x33 {11 * mb2} 512")
    with engine.open(m) as img:
        img.resize(9 * mb2)
        img.write_compressed(8 * mb2, b"\x33" * mb2)
        img.resize(10 * mb2 + 512)
        img.write(9 * mb2 + 513, rnd)
        img.resize(11 * mb2 + 512)
        img.write(8 * mb2 + 512, b"\xff" * 2 * mb2)
        img.write_compressed(11 * mb2, b"\x33" * 512)
    assert m.read_bytes() == q.read_bytes()
    assert clean(m)


def test_refcount_table_growth_keeps_the_image_valid(engine: ModuleType, tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: a refcount block counts 64 clusters and the
    first refcount table 64 blocks, so 3 MiB of data needs new refcount blocks and a new,
    larger refcount table (alloc_refcount_block, qcow2_refcount_area)."""
    path = tmp_path / "g.qcow2"
    engine.create(path, 16 * MiB, cluster_size=512, refcount_bits=64)
    q = qemu_create(tmp_path / "q.qcow2", 16 * MiB, cluster_size=512, refcount_bits=64)
    cmds = []
    with engine.open(path) as img:
        for off in range(0, 3 * MiB, 40000):
            img.write(off, bytes([off % 251 + 1]) * 40000)
            cmds.append(f"write -P {off % 251 + 1} {off} 40000")
        data = img.read(0, 4 * MiB)
    qemu_io(q, *cmds)
    assert open_image(path).header.refcount_table_clusters > 1
    assert path.read_bytes() == q.read_bytes()  # same refcount blocks, same new table
    assert clean(path)
    assert raw_content(path)[:4 * MiB] == data
