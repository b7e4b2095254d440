"""Error classes (DESIGN.md, "Errors"): bad requests are RequestError, bad images FormatError
or UnsupportedFeature at open, inconsistencies found during I/O CorruptionError with the
image then flagged corrupt as QEMU flags it; and whatever a file claims, only spec.errors
classes leave an engine. Tests compare classes, never message text."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spec import features as ft
from spec.errors import CorruptionError, Qcow2Error, RequestError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, l2_table_offset
from tests.qemu import qemu_io

# --- bad requests ---------------------------------------------------------------------------------


def test_read_only_image_is_never_written(engine: ModuleType, qemu_images: dict[str, Path],
                                          tmp_path: Path) -> None:
    src = qemu_images["snapshots"]
    path = tmp_path / "ro.qcow2"
    shutil.copy(src, path)
    before = path.read_bytes()
    st = os.stat(path)
    with engine.open(path, readonly=True) as img:
        img.read(0, img.size)
        img.map()
        img.snapshots()
        img.info()
        for call in (lambda: img.write(0, b"x"), lambda: img.write_zeroes(0, 512),
                     lambda: img.discard(0, 65536), lambda: img.write_compressed(0, bytes(65536)),
                     lambda: img.resize(8 * MiB), lambda: img.snapshot_create("x"),
                     lambda: img.snapshot_apply("first"), lambda: img.snapshot_delete("first")):
            with pytest.raises(RequestError):
                call()
    assert path.read_bytes() == before
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_requests_outside_the_image_and_bad_options(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    engine.create(path, MiB)
    with pytest.raises(RequestError):
        engine.open(path, bogus_option=1)
    with pytest.raises(RequestError):
        engine.open(path, snapshot="x")  # snapshots open read-only only
    with engine.open(path, l2_cache_size=1 << 20) as img:
        for call in (lambda: img.read(MiB - 1, 2), lambda: img.write(-1, b"x"),
                     lambda: img.write_zeroes(MiB, 1), lambda: img.discard(0, MiB + 1),
                     lambda: img.write_compressed(512, bytes(65536)), lambda: img.resize(1000),
                     lambda: img.resize(512 * KiB), lambda: img.snapshot_apply("nope")):
            with pytest.raises(RequestError):
                call()
    with pytest.raises(RequestError):
        img.read(0, 1)  # closed


@pytest.mark.parametrize("options", [{"cache": "sometimes"}, {"l2_cache_size": -1},
                                     {"overlap_check": "paranoid"}, {"refcount_cache_size": "big"}])
def test_bad_option_values_are_request_errors(engine: ModuleType, tmp_path: Path,
                                              options: dict[str, Any]) -> None:
    path = tmp_path / "o.qcow2"
    engine.create(path, MiB)
    with pytest.raises(RequestError):
        engine.open(path, **options)


# --- bad images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "magic", "garbage-l1", "l1-size"])
def test_malformed_files_raise_only_spec_errors(engine: ModuleType, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "d.qcow2"
    engine.create(path, 4 * MiB)
    with engine.open(path) as img:
        img.write(0, b"y" * 200 * KiB)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:100]
    elif damage == "magic":
        data[0] = 0
    elif damage == "garbage-l1":
        data[3 * 65536:3 * 65536 + 8] = b"\xff" * 8
    else:
        data[36:40] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(Qcow2Error), engine.open(path) as img:
        img.read(0, img.size)
        img.write(0, b"z" * 70000)


@pytest.fixture(scope="module")
def pristine(engine: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An engine-written image with a snapshot, compressed and zero clusters."""
    path = tmp_path_factory.mktemp("pristine") / "src.qcow2"
    engine.create(path, 4 * MiB, cluster_size=4096)
    with engine.open(path) as img:
        img.write(0, b"a" * 100000)
        img.write_compressed(200 * KiB, b"b" * 4096)
        img.write_zeroes(50000, 30000)
        img.snapshot_create("s")
        img.write(10000, b"c" * 9000)
    return path.read_bytes()


def _exercise(engine: ModuleType, path: Path) -> None:
    try:
        with engine.open(path) as img:
            img.read(0, img.size)
            img.map()
            img.snapshots()
            img.write(3000, b"z" * 20000)
            img.write_zeroes(0, 8192)
            img.discard(0, 65536)
            img.write_compressed(4096 * 50, b"q" * 4096)
            img.snapshot_create("t")
            img.snapshot_apply("s")
            img.snapshot_delete("t")
            img.resize(8 * MiB)
    except Qcow2Error:
        pass
    with contextlib.suppress(Qcow2Error):
        engine.check(path)


@pytest.mark.parametrize("seed", range(40))
def test_damaged_images_raise_only_spec_errors(engine: ModuleType, pristine: bytes, tmp_path: Path,
                                               seed: int) -> None:
    """The pristine image damaged byte by byte in its header, refcount structures and tables
    (derandomized: the same damage on every run); every public operation then either works
    or raises a Qcow2Error subclass."""
    rng = random.Random(seed)
    data = bytearray(pristine)
    regions = [(0, 200), (4096, 8192), (8192, 12288), (12288, 16384), (16384, 24576), (0, len(data))]
    for _ in range(rng.randint(1, 6)):
        lo, hi = rng.choice(regions)
        data[rng.randrange(lo, min(hi, len(data)))] = rng.randrange(256)
    path = tmp_path / "x.qcow2"
    path.write_bytes(bytes(data))
    _exercise(engine, path)  # any other exception fails the test


# --- corruption found during I/O ------------------------------------------------------------------


def test_corruption_found_during_io_sets_the_corrupt_bit(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    engine.create(path, MiB)
    with engine.open(path) as img:
        img.write(0, b"x" * 512)
    l2 = l2_table_offset(path, 0)
    with open(path, "r+b") as f:  # point the L2 entry at an unaligned host offset
        f.seek(l2)
        f.write(((1 << 63) | 0x50200).to_bytes(8, "big"))
    with engine.open(path) as img:
        with pytest.raises(CorruptionError):
            img.read(0, 512)
        with pytest.raises(CorruptionError):
            img.read(65536, 512)  # the image is out of service once found corrupt
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(RequestError):
        engine.open(path)  # QEMU refuses a read-write open of a corrupt image
    with engine.open(path, readonly=True) as img:
        assert img.read(65536, 4) == bytes(4)


def test_data_write_over_metadata_is_refused_and_flags_corruption(engine: ModuleType, tmp_path: Path) -> None:
    """A data cluster that points at the L1 table: QEMU's overlap check refuses the write
    and marks the image corrupt (qcow2_pre_write_overlap_check)."""
    path = tmp_path / "o.qcow2"
    engine.create(path, MiB)
    with engine.open(path) as img:
        img.write(0, b"x" * 512)
    l2 = l2_table_offset(path, 0)
    with open_image(path) as f:
        l1_offset = int(f.header.l1_table_offset)
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(((1 << 63) | l1_offset).to_bytes(8, "big"))
    before = path.read_bytes()[l1_offset:l1_offset + 512]
    with engine.open(path) as img, pytest.raises(CorruptionError):
        img.write(0, b"\xff" * 512)
    assert path.read_bytes()[l1_offset:l1_offset + 512] == before
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT


@pytest.mark.parametrize("victim", ["l1", "reftable", "refblock", "l2"])
def test_a_data_write_onto_metadata_is_refused_like_qemu(engine: ModuleType, tmp_path: Path,
                                                         victim: str) -> None:
    """An L2 entry pointing a COPIED data cluster at metadata: the in-place write must be
    refused and the image flagged corrupt (qcow2_pre_write_overlap_check, mode "cached"),
    in the engine as in QEMU, and the metadata left as it was."""
    path = tmp_path / "o.qcow2"
    engine.create(path, MiB, cluster_size=4096)
    with engine.open(path) as img:
        img.write(0, b"a" * 4096)
    hv = open_image(path)
    h, hl = hv.header, hv.header_length
    l2 = l2_table_offset(path, 0)
    refblock = int.from_bytes(path.read_bytes()[h.refcount_table_offset:h.refcount_table_offset + 8], "big")
    # (The header cannot be a victim: host offset 0 in an L2 entry means "unallocated".)
    at = {"l1": h.l1_table_offset, "reftable": h.refcount_table_offset,
          "refblock": refblock, "l2": l2}[victim]
    with path.open("r+b") as f:
        f.seek(l2)
        f.write((at | (1 << 63)).to_bytes(8, "big"))
    q = tmp_path / "q.qcow2"
    shutil.copy(path, q)
    before = path.read_bytes()
    with engine.open(path) as img, pytest.raises(CorruptionError):
        img.write(512, b"b" * 512)
    after = path.read_bytes()
    assert after[:hl] != before[:hl]  # the corrupt bit, nothing else
    assert after[hl:] == before[hl:]
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
    with pytest.raises(subprocess.CalledProcessError):
        qemu_io(q, "write -P 98 512 512")
    assert open_image(q).incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
